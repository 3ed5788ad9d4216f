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
# callback at all.


def _halo_forward_host(
    pattern: DistributedPattern, site: int, sendbuf: np.ndarray
) -> np.ndarray:
    sendbuf = np.ascontiguousarray(sendbuf)
    out = np.empty(pattern.halo.shape[0], sendbuf.dtype)
    with _turn(pattern.layout.comm, site, "halo"):
        pattern.layout.comm.Alltoallv(
            [sendbuf, _counts_displs(pattern.send_counts)],
            [out, _counts_displs(pattern.recv_counts)],
        )
    return out


def _halo_transpose_host(
    pattern: DistributedPattern, site: int, ct: np.ndarray
) -> np.ndarray:
    ct = np.ascontiguousarray(ct)
    recv = np.empty(len(pattern.send_indices), ct.dtype)
    with _turn(pattern.layout.comm, site, "halo_transpose"):
        pattern.layout.comm.Alltoallv(
            [ct, _counts_displs(pattern.recv_counts)],
            [recv, _counts_displs(pattern.send_counts)],
        )
    return recv


def _halo_call(pattern: DistributedPattern, x):
    if not pattern.communicates:
        return jnp.zeros(pattern.halo.shape, x.dtype)
    sendbuf = take(x, Ellipsis, pattern_array(pattern, "send_indices"))
    return jax.pure_callback(
        ft.partial(_halo_forward_host, pattern, _new_site()),
        jax.ShapeDtypeStruct(pattern.halo.shape, x.dtype),
        sendbuf,
        vmap_method="sequential",
    )


def _halo_transpose_call(pattern: DistributedPattern, ct):
    """The transpose of the exchange: send the halo's cotangents back to their
    owners and add them up where they came from."""
    out = jnp.zeros((pattern.shape[0],), ct.dtype)
    if not pattern.communicates:
        return out
    recv = jax.pure_callback(
        ft.partial(_halo_transpose_host, pattern, _new_site()),
        jax.ShapeDtypeStruct((len(pattern.send_indices),), ct.dtype),
        ct,
        vmap_method="sequential",
    )
    return out.at[pattern_array(pattern, "send_indices")].add(recv)


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _halo(pattern: DistributedPattern, x):
    """The off-rank entries of `x` that the local rows need (`pattern.halo`)."""
    return _halo_call(pattern, x)


@_halo.defjvp
def _halo_jvp(pattern, primals, tangents):
    (x,), (dx,) = primals, tangents
    # The exchange is linear: its tangent is the exchange of the tangent, with
    # the reverse exchange (send back, add up) as its transpose.
    dy = linear_call(
        lambda _, v: _halo_call(pattern, v),
        lambda _, c: _halo_transpose_call(pattern, c),
        (),
        dx,
    )
    return _halo(pattern, x), dy


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
