# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The row partition of a distributed matrix: [`lineax_amgx.distributed.Layout`][].
"""

from __future__ import annotations

import numpy as np

from ._comm import DistributedError, _comm, _raise_if_any, _register, communicator
from ._sequencer import (
    turn as _turn,
)

_INT32_MAX = np.iinfo(np.int32).max


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
