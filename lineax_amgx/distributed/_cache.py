# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Cache controls of the distributed entries (collective).

The distributed setups are held per rank but act together: an AmgX entry is one
rank's part of a distributed AmgX setup (destroying it is collective: AmgX's
MPI), and a CPU setup is held by the root alone for all the ranks. So the
controls that touch them are collective, and `lineax_amgx.cache_info()` /
`clear_cache()` are too once distributed operators exist in the process: one
sequencer turn per live communicator, in the order of their keys.

A call on some ranks only. MPI has no way to learn that a peer will never enter
a collective: a posted collective cannot be cancelled (`MPI_Cancel` is for
point-to-point requests only) and fault-tolerant MPI (ULFM) is not portable. So
the turn is a non-blocking agreement polled against a deadline
(`LINEAX_AMGX_MPI_TIMEOUT`, see `_sequencer`): a rank whose partners never call
raises `DistributedTimeoutError` saying which control it was waiting in, and the
partners that did not call fail at their next operation on that communicator
(its agreements are out of step for good: the posted one cannot be withdrawn).
The controls share one program point (`_SITE`), so ranks that call them from
different lines still pair up; ranks that call different controls (`cache_info`
on one rank, `clear_cache` on another) never pair and time out the same way.
"""

from __future__ import annotations

import zlib
from typing import Any

from .._backends.amgx import _library
from . import _pyamg
from ._comm import _comm, _comms, _raise_if_any, _register, _registry_lock, mpi
from ._sequencer import (
    DistributedTimeoutError,
    turn as _turn,
)

_SITE = zlib.crc32(b"lineax_amgx distributed cache control") & 0x7FFFFFFF
_ROOT = 0  # the rank holding the CPU setups (`_pyamg`)


def live_communicators() -> list[tuple[int, Any]]:
    """`(comm_key, comm)` of every communicator that distributed operators were
    built on in this process and that is still alive, by key (no MPI call)."""
    with _registry_lock:
        items = sorted(_comms.items(), key=lambda kv: kv[0])
    if not items:
        return []
    null = mpi().COMM_NULL
    return [(k, c) for k, c in items if c != null]


def _collective(comm, name: str, body):
    """`body()` as the cache control `name`, one turn of `comm` on every rank."""
    try:
        with _turn(comm, _SITE, f"cache.{name}"):
            return body()
    except DistributedTimeoutError as e:
        raise DistributedTimeoutError(
            f"lineax_amgx {name}() is collective once distributed operators "
            f"exist: every rank of their communicator ({comm.Get_size()} ranks) "
            f"must call it, and at the same point of its program (rank "
            f"{comm.Get_rank()} called it; some rank did not, or called another "
            f"cache control, in time). {e}"
        ) from e


def _clear(comm_key: int, comm) -> None:
    def body():
        err = None
        try:
            # Without AmgX loaded there is nothing to destroy: a no-op.
            _library.native().dist_clear_cache(comm_key)
            for problem in _pyamg.resident_problems(comm_key):  # the root's
                problem.evict()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank
            err = f"clearing the distributed caches failed: {e}"
        _raise_if_any(comm, err, RuntimeError)

    _collective(comm, "clear_cache", body)


def _info(comm_key: int, comm) -> dict[str, Any]:
    def body():
        amgx = [e for e in _library.native().dist_cache_info()["entries"]
                if e.get("comm_key") == comm_key]
        cpu = [dict(fingerprint=p.cache_key[0], transposed=p.cache_key[4],
                    mode=p.cache_key[2])
               for p in _pyamg.resident_problems(comm_key)]
        everyone = comm.allgather(len(amgx))
        cpu = comm.bcast(cpu, root=_ROOT)
        return dict(comm_key=comm_key, ranks=comm.Get_size(),
                    amgx_sizes=everyone, amgx_entries=amgx, pyamg_entries=cpu)

    return _collective(comm, "cache_info", body)


def collective_info(comm=None) -> dict[str, Any] | None:
    """Collective over the live communicators (or `comm`): the distributed part
    of `lineax_amgx.cache_info()`, the same on every rank but for this rank's
    AmgX entries. None when no distributed operator was built."""
    comms = [(_register(comm), comm)] if comm is not None else live_communicators()
    if not comms:
        return None
    native = dict(_library.native().dist_cache_info())
    per_comm = [_info(k, c) for k, c in comms]
    return dict(
        native, size=sum(len(c["amgx_entries"]) + len(c["pyamg_entries"])
                         for c in per_comm),
        communicators=per_comm,
    )


def collective_clear(comm=None) -> None:
    """Collective over the live communicators (or `comm`): destroy their
    distributed AmgX entries and the root's CPU setups of their operators."""
    comms = [(_register(comm), comm)] if comm is not None else live_communicators()
    for k, c in comms:
        _clear(k, c)


def cache_info() -> dict:
    """This rank's distributed AmgX entries (GPU): counters (`hits`, `misses`,
    `setups`, `resetups`, `solves`, `evictions`), `size`, `capacity`, `isolated`
    and `entries`. Not collective (no agreement): the ranks' caches change only
    inside collective calls, so every rank reports the same counters. For every
    distributed setup (AmgX's and the CPU's) on every rank, call
    `lineax_amgx.cache_info()` on every rank."""
    return dict(_library.native().dist_cache_info())


def clear_cache(comm=None) -> None:
    """Collective: destroy the distributed setups of `comm`'s operators (AmgX's,
    freeing their GPU memory, and the CPU backend's on the root). Call it on
    every rank of `comm` (default `MPI.COMM_WORLD`); `lineax_amgx.clear_cache()`
    does it for every communicator, with the single-process setups."""
    collective_clear(_comm(comm))
