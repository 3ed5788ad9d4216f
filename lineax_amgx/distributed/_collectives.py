# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Collectives usable inside `jit` (host callbacks): the halo exchange,
`allreduce_sum` / `global_dot` / `global_norm`, and `after` (ordering).
"""

from __future__ import annotations

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import linear_call
from jaxtyping import Array

from .._runtime_arrays import pattern_array, take
from ._comm import communicator, mpi
from ._layout import Layout
from ._pattern import DistributedPattern, _counts_displs
from ._sequencer import (
    new_site as _new_site,
    turn as _turn,
)

_INT32_MAX = np.iinfo(np.int32).max


# -----------------------------------------------------------------------------
# Host-side collectives, usable inside jit (pure callbacks).
# -----------------------------------------------------------------------------


# The halo exchange moves only what crosses ranks through the host: the entries
# other ranks need are gathered on the device before the callback, and the
# transpose's contributions are added up on the device after it. A pattern that
# communicates with no rank (`communicates` is the same on every rank) makes no
# callback at all. For a block pattern (`b x b` blocks) the plan counts block
# columns and every one of them carries its `b` consecutive entries: the counts
# are scaled by `b` here and the vectors travel flat.


def _halo_forward_host(
    pattern: DistributedPattern, site: int, sendbuf: np.ndarray
) -> np.ndarray:
    sendbuf = np.ascontiguousarray(sendbuf)
    b = pattern.block_size
    out = np.empty(pattern.halo.shape[0] * b, sendbuf.dtype)
    with _turn(pattern.layout.comm, site, "halo"):
        pattern.layout.comm.Alltoallv(
            [sendbuf, _counts_displs(np.multiply(pattern.send_counts, b))],
            [out, _counts_displs(np.multiply(pattern.recv_counts, b))],
        )
    return out


def _halo_transpose_host(
    pattern: DistributedPattern, site: int, ct: np.ndarray
) -> np.ndarray:
    ct = np.ascontiguousarray(ct)
    b = pattern.block_size
    recv = np.empty(len(pattern.send_indices) * b, ct.dtype)
    with _turn(pattern.layout.comm, site, "halo_transpose"):
        pattern.layout.comm.Alltoallv(
            [ct, _counts_displs(np.multiply(pattern.recv_counts, b))],
            [recv, _counts_displs(np.multiply(pattern.send_counts, b))],
        )
    return recv


# `_extended(pattern, x)`: `[x, halo]`, the exchange kept alive on every rank.
# A rank that receives nothing (an empty halo) but must send, or must receive
# the transpose's contributions and sends nothing, would make a callback with an
# empty output: XLA drops zero-sized operations (and unused pure callbacks), so
# that rank would never join the exchange and the others would wait for it. So
# the callbacks here also pass the first entry of the local vector through
# (as `after` does), and the result is built from their output.


def _exchange_host(pattern, site, sendbuf, head):
    return np.concatenate([np.asarray(head), _halo_forward_host(pattern, site,
                                                                sendbuf)])


def _exchange_transpose_host(pattern, site, ct, head):
    return np.concatenate([np.asarray(head), _halo_transpose_host(pattern, site,
                                                                  ct)])


def _extended_call(pattern: DistributedPattern, x):
    b = pattern.block_size
    n, h = pattern.shape[0], pattern.halo.shape[0] * b
    if not pattern.communicates:  # (then no rank has a halo)
        return jnp.concatenate([x, jnp.zeros((h,), x.dtype)])
    k = min(n, 1)
    send = pattern_array(pattern, "send_indices")
    # The b entries of every block column that is sent, flat.
    sendbuf = take(x, send) if b == 1 else take(x.reshape(-1, b), send).reshape(-1)
    out = jax.pure_callback(
        ft.partial(_exchange_host, pattern, _new_site()),
        jax.ShapeDtypeStruct((k + h,), x.dtype),
        sendbuf,
        x[:k],
        vmap_method="sequential",
    )
    return jnp.concatenate([out[:k], x[k:], out[k:]])


def _extended_transpose_call(pattern: DistributedPattern, c):
    b = pattern.block_size
    n = pattern.shape[0]
    if not pattern.communicates:
        return c[:n]
    k = min(n, 1)
    send = pattern_array(pattern, "send_indices")
    r = jax.pure_callback(
        ft.partial(_exchange_transpose_host, pattern, _new_site()),
        jax.ShapeDtypeStruct((k + len(pattern.send_indices) * b,), c.dtype),
        c[n:],
        c[:k],
        vmap_method="sequential",
    )
    base = jnp.concatenate([r[:k], c[k:n]])
    if b == 1:
        return base.at[send].add(r[k:])
    return base.reshape(-1, b).at[send].add(r[k:].reshape(-1, b)).reshape(-1)


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _extended(pattern: DistributedPattern, x):
    """`[x, x_halo]`: the local vector followed by the off-rank entries its rows
    need (`pattern.halo`), exchanged by every rank (also one that receives or
    sends nothing; a rank without rows is not supported by the exchange)."""
    return _extended_call(pattern, x)


@_extended.defjvp
def _extended_jvp(pattern, primals, tangents):
    (x,), (dx,) = primals, tangents
    dy = linear_call(
        lambda _, v: _extended_call(pattern, v),
        lambda _, c: _extended_transpose_call(pattern, c),
        (),
        dx,
    )
    return _extended(pattern, x), dy


def _allreduce_host(comm_key: int, site: int, x: np.ndarray) -> np.ndarray:
    shape = np.shape(x)
    x = np.array(x, order="C").reshape(-1)  # (ascontiguousarray makes 0-d 1-d)
    out = np.empty_like(x)
    comm = communicator(comm_key)
    with _turn(comm, site, "allreduce"):
        comm.Allreduce(x, out, op=mpi().SUM)
    return out.reshape(shape)


def _allreduce_call(comm_key: int, x):
    return jax.pure_callback(
        ft.partial(_allreduce_host, comm_key, _new_site()),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        x,
        vmap_method="sequential",
    )


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _allreduce(comm_key: int, x):
    return _allreduce_call(comm_key, x)


@_allreduce.defjvp
def _allreduce_jvp(comm_key, primals, tangents):
    (x,), (dx,) = primals, tangents
    # Replicated-output convention: every rank holds the same sum and seeds the
    # same cotangent, so the transpose hands each rank that cotangent unchanged.
    dy = linear_call(
        lambda _, v: _allreduce_call(comm_key, v), lambda _, c: c, (), dx
    )
    return _allreduce(comm_key, x), dy


def _layout_of(obj) -> Layout:
    if isinstance(obj, Layout):
        return obj
    if isinstance(obj, DistributedPattern):
        return obj.layout
    # A DistributedCSROperator (imported above this module: matched by its
    # distributed pattern).
    if isinstance(getattr(obj, "pattern", None), DistributedPattern):
        return obj.pattern.layout
    raise TypeError(
        f"Expected a Layout, DistributedPattern or DistributedCSROperator, got "
        f"{type(obj).__name__}."
    )


def _block_size_of(obj) -> int:
    """The unknowns per (block) row of what `_layout_of` accepts: a layout counts
    rows only (1); a block pattern or operator has `b` unknowns per block row."""
    if isinstance(obj, DistributedPattern):
        return obj.block_size
    pattern = getattr(obj, "pattern", None)
    return pattern.block_size if isinstance(pattern, DistributedPattern) else 1


def allreduce_sum(x, layout) -> Array:
    """Collective. The sum of `x` over all ranks, on every rank (works eagerly,
    under `jit`, `vmap` and `grad`).

    Differentiation follows the *replicated* convention: the result is the same on
    every rank and each rank differentiates the same global quantity, so the
    cotangent that reaches a rank's `x` is its own (not summed again). So when
    every rank evaluates `loss = global_dot(w, x_local)` and calls `jax.grad`,
    each gets the local part of the global gradient.

    **Arguments:**

    - `x`: an array (the same shape on every rank).
    - `layout`: a [`lineax_amgx.Layout`][] (or a pattern or operator with one).
    """
    key = _layout_of(layout).comm_key
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer):
        return _allreduce_call(key, x)
    return _allreduce(key, x)


def global_dot(x_local, y_local, layout) -> Array:
    """Collective. The global inner product `sum(x * y)` of two distributed
    vectors, on every rank."""
    return allreduce_sum(jnp.vdot(x_local, y_local), layout)


def global_norm(x_local, layout) -> Array:
    """Collective. The global 2-norm of a distributed vector, on every rank."""
    return jnp.sqrt(allreduce_sum(jnp.sum(x_local * x_local), layout))




def after(x, *deps):
    """`x`, made to depend on `deps`, so that whatever uses it runs after `deps`
    are computed.

    Use it to order distributed operations: XLA may run independent host
    callbacks concurrently and in any order, but the MPI calls inside them must be
    made in the same order on every rank. Two distributed operations (a halo
    exchange, `allreduce_sum`, a solve) with no data dependency between them in
    one `jit`-compiled function can be chained: `y = op.mv(after(x, s))`.

    The dependency is a real one: the first entry of `x` passes through an
    identity host callback that also takes the first entry of every dependency,
    and is written back into `x` (one element of each crosses to the host, not
    the arrays: any element of an MPI operation's output needs the whole
    operation). `lax.optimization_barrier` is not enough: XLA's CPU runtime turns
    it into a control dependency that its concurrent executor does not always
    honour (measured: a solve's norm ran before the setup it was chained to), and
    outside `jit` its output is the input buffer, ready before `deps`.
    """
    leaves = jax.tree.leaves(tuple(d for d in deps if d is not None))
    if not leaves:
        return x
    marks = tuple(jnp.ravel(jnp.asarray(d))[:1] for d in leaves)
    return _after_callback(jnp.asarray(x), jax.lax.stop_gradient(marks))


@jax.custom_jvp
def _after_callback(x, marks):
    flat = jnp.ravel(x)
    head = jax.pure_callback(
        _identity_host,
        jax.ShapeDtypeStruct(flat[:1].shape, flat.dtype),
        flat[:1],
        *marks,
        vmap_method="sequential",
    )
    if flat.size == 0:  # nothing to write back into: the (empty) output is `x`
        return head.reshape(x.shape)
    return jax.lax.dynamic_update_slice(flat, head, (0,)).reshape(x.shape)


@_after_callback.defjvp
def _after_jvp(primals, tangents):
    (x, deps), (dx, _) = primals, tangents
    return _after_callback(x, deps), dx  # the identity: its tangent is the tangent


def _identity_host(x, *deps):
    del deps  # only waited for
    return np.asarray(x)
