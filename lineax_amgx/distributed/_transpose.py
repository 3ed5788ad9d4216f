# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The transpose of a distributed pattern, and of its values.

Entry `(i, j)` of the global matrix is stored by the owner of row `i`; in the
transpose it is entry `(j, i)`, stored by the owner of row (= column) `j`. So the
transposed pattern is a redistribution of the entries between the ranks, built
once per pattern, collectively (`transpose_pattern`), and the values follow the
same route at run time (`transposed_values`):

    values_T = take(exchange(take(values, send_perm)), recv_perm)

`send_perm` orders the local entries by destination rank, the exchange is one
`Alltoallv` (a host callback, a sequencer turn: see `_collectives`), and
`recv_perm` puts what arrived in the transposed CSR order. Both permutations
reach compiled programs as runtime arrays (never constants); the exchange is
linear, with the reverse exchange as its transpose (reverse mode through the
transposed values), as the halo exchange.
"""

from __future__ import annotations

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import linear_call

from .._runtime_arrays import pattern_array, take
from ._comm import mpi
from ._pattern import DistributedPattern, _counts_displs
from ._sequencer import (
    new_site as _new_site,
    turn as _turn,
)


class TransposePlan:
    """How the entries of `pattern` travel to their places in the transpose (host
    arrays; `inverse()` is the way back)."""

    __slots__ = ("send_perm", "send_counts", "recv_counts", "recv_perm")

    def __init__(self, send_perm, send_counts, recv_counts, recv_perm):
        self.send_perm = send_perm  # local entries, ordered by destination rank
        self.send_counts = tuple(int(c) for c in send_counts)  # entries per rank
        self.recv_counts = tuple(int(c) for c in recv_counts)
        self.recv_perm = recv_perm  # received entries -> transposed CSR order
        for a in (send_perm, recv_perm):
            a.setflags(write=False)

    def inverse(self) -> TransposePlan:
        return TransposePlan(
            _inverse_permutation(self.recv_perm), self.recv_counts,
            self.send_counts, _inverse_permutation(self.send_perm),
        )


def _inverse_permutation(p: np.ndarray) -> np.ndarray:
    out = np.empty_like(p)
    out[p] = np.arange(p.shape[0], dtype=p.dtype)
    return out


def transpose_pattern(
    pattern: DistributedPattern,
) -> tuple[DistributedPattern, TransposePlan]:
    """Collective, cached on the pattern. The transposed pattern (the same layout:
    this rank owns the same rows of `A^T` as of `A`) and the plan of its values.

    Every rank must reach the first call for a pattern at the same point (as with
    every collective); later calls, on any rank, return the cached result without
    communicating. `jax.grad` through a solve calls it when it traces the
    backward pass, which every rank traces at the same point of the same program.
    The transpose's transpose is the pattern itself (no second exchange)."""
    cached = pattern.__dict__.get("_transpose_plan")
    if cached is not None:
        return cached
    MPI = mpi()
    lay = pattern.layout
    comm = lay.comm
    rows = pattern.row_ids.astype(np.int64) + lay.row_start  # global rows
    cols = pattern.global_indices
    dest = lay.owner(cols)
    send_perm = np.argsort(dest, kind="stable").astype(np.int32)
    send_counts = np.bincount(dest, minlength=lay.size).astype(np.int64)
    # What travels: the transposed entry (row j, column i) of every local (i, j).
    send_rows = np.ascontiguousarray(cols[send_perm])
    send_cols = np.ascontiguousarray(rows[send_perm])
    with _turn(comm, kind="pattern.transpose"):
        recv_counts = np.asarray(comm.alltoall(send_counts.tolist()), np.int64)
        n_recv = int(recv_counts.sum())
        recv_rows = np.empty(n_recv, np.int64)
        recv_cols = np.empty(n_recv, np.int64)
        for sbuf, rbuf in ((send_rows, recv_rows), (send_cols, recv_cols)):
            comm.Alltoallv(
                [sbuf, _counts_displs(send_counts), MPI.INT64_T],
                [rbuf, _counts_displs(recv_counts), MPI.INT64_T],
            )
    local_rows = recv_rows - lay.row_start
    # Transposed CSR order: by local row, then by global column (unique: the
    # entries of the pattern are).
    recv_perm = np.lexsort((recv_cols, local_rows)).astype(np.int32)
    indptr_t = np.concatenate(
        [[0], np.cumsum(np.bincount(local_rows, minlength=lay.n_local))]
    )
    pattern_t = DistributedPattern(indptr_t, recv_cols[recv_perm], lay)  # collective
    plan = TransposePlan(send_perm, send_counts, recv_counts, recv_perm)
    pattern.__dict__["_transpose_plan"] = (pattern_t, plan)
    pattern_t.__dict__.setdefault("_transpose_plan", (pattern, plan.inverse()))
    return pattern.__dict__["_transpose_plan"]


# -----------------------------------------------------------------------------
# The values (inside jit: runtime arrays and one host callback).
# -----------------------------------------------------------------------------


def _exchange_host(
    pattern: DistributedPattern, reverse: bool, site: int, buf: np.ndarray
) -> np.ndarray:
    _, plan = transpose_pattern(pattern)  # cached: no communication
    send, recv = plan.send_counts, plan.recv_counts
    if reverse:
        send, recv = recv, send
    buf = np.ascontiguousarray(buf)
    width = int(np.prod(buf.shape[1:], dtype=np.int64))
    out = np.empty((sum(recv), *buf.shape[1:]), buf.dtype)
    comm = pattern.layout.comm
    with _turn(comm, site, "transpose.reverse" if reverse else "transpose.values"):
        comm.Alltoallv(
            [buf.reshape(-1), _counts_displs([c * width for c in send])],
            [out.reshape(-1), _counts_displs([c * width for c in recv])],
        )
    return out


def _exchange_call(pattern: DistributedPattern, reverse: bool, x):
    _, plan = transpose_pattern(pattern)
    n = sum(plan.send_counts if reverse else plan.recv_counts)
    return jax.pure_callback(
        ft.partial(_exchange_host, pattern, reverse, _new_site()),
        jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype),
        x,
        vmap_method="sequential",
    )


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _exchange(pattern: DistributedPattern, x):
    """The entries ordered by destination (`send_perm` applied) sent to their
    owners in the transpose; what arrives, grouped by source rank."""
    return _exchange_call(pattern, False, x)


@_exchange.defjvp
def _exchange_jvp(pattern, primals, tangents):
    (x,), (dx,) = primals, tangents
    # Linear: the tangent is exchanged too; the transpose sends it back.
    dy = linear_call(
        lambda _, v: _exchange_call(pattern, False, v),
        lambda _, c: _exchange_call(pattern, True, c),
        (),
        dx,
    )
    return _exchange(pattern, x), dy


def transposed_values(pattern: DistributedPattern, values):
    """Collective (at run time; the first call for a pattern also at trace
    time, see `transpose_pattern`). The transposed pattern and `values` in its
    order (differentiable; blocks transposed too where the pattern has them)."""
    pattern_t, plan = transpose_pattern(pattern)
    sent = take(values, pattern_array(pattern, "transpose_send", plan.send_perm))
    received = _exchange(pattern, sent)
    values_t = take(
        received, pattern_array(pattern, "transpose_recv", plan.recv_perm)
    )
    if getattr(pattern, "block_size", 1) > 1:
        values_t = jnp.swapaxes(values_t, -1, -2)
    return pattern_t, values_t
