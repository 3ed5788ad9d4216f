# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""One order for the MPI calls of every rank, whatever order XLA runs them in.

The problem. The MPI work of a distributed solve runs in host callbacks (the halo
exchange of `mv`, global norms, the gathered CPU solve) and in eager helpers
(`gather_vector`, `agree`, ...). XLA runs independent callbacks concurrently and
in any order, and an eager call may start while an earlier computation's
callbacks are still running on XLA's threads. Two ranks may therefore reach the
same two collectives in different orders: they deadlock, or worse, one rank's
`Allreduce` of a norm meets the other's `Allreduce` of a flag and both go on with
wrong numbers. Data dependencies cannot fix this in general (Lineax's autodiff
rules create independent operations that we do not write), and JAX's ordered
effects are not allowed inside `custom_jvp`, which Lineax uses.

The fix. Every MPI operation is a *turn* of the communicator's sequencer, named
by a signature that is the same on every rank: `(site, occurrence, kind)`. A
*site* is the operation's program point (a hash of the code locations on the
stack when the callback is traced or the eager helper called, leaving out JAX's
and Equinox's frames); *occurrence* counts the executions of a site. Before its
MPI calls, an operation registers its signature as pending and the ranks agree,
over a private duplicate of the communicator, on the smallest signature pending
on every rank; that operation runs next, on every rank, while the others wait. A
rank whose next operation has not been reached yet simply takes part in the next
agreement. One agreement is one small `Iallgather`.

A program whose ranks never reach the same operation (ranks running different
code) would wait forever; after `LINEAX_AMGX_MPI_TIMEOUT` seconds (default 600;
0 waits forever) every waiting rank raises `DistributedTimeoutError` naming the
operations it was waiting on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import zlib
from typing import Any

import numpy as np

# One lock for every MPI call of this package: MPI is entered by one thread at a
# time (host callbacks run on XLA's threads). Re-entrant: an operation's body may
# call helpers that are themselves operations (they become part of the turn).
lock = threading.RLock()
_cond = threading.Condition(lock)
_local = threading.local()

# Signatures exchanged per agreement (the smallest pending ones of each rank).
_SLOTS = 32


class DistributedTimeoutError(RuntimeError):
    """The ranks did not reach a common MPI operation in time."""


class DistributedOrderError(RuntimeError):
    """Two executions of one distributed operation ran concurrently, so the ranks
    cannot tell which of them to pair (see `after`)."""


def _skipped_dirs() -> tuple[str, ...]:
    import equinox
    import jax
    import jaxlib

    dirs = [os.path.dirname(m.__file__) for m in (jax, jaxlib, equinox)]
    dirs += [os.path.dirname(contextlib.__file__)]  # the standard library
    return tuple(d + os.sep for d in dirs)


_SKIP: tuple[str, ...] | None = None


def new_site() -> int:
    """The number of the MPI operation being created here (when a callback is
    traced, or when an eager helper is called): a hash of the code locations on
    the call stack, leaving out JAX's, Equinox's and the standard library's own
    frames. It names the *program point*, not the trace: whether a rank traces a
    function again or runs a trace it cached (its own affair: caches see the
    rank's local shapes), the same point gets the same number on every rank. Two
    operations of one point are told apart by their execution count."""
    global _SKIP
    if _SKIP is None:
        _SKIP = _skipped_dirs()
    h = hashlib.blake2b(digest_size=8)
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_SKIP) and not name.endswith("_sequencer.py"):
            h.update(f"{name}:{frame.f_lineno};".encode())
        frame = frame.f_back
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


def timeout() -> float:
    raw = os.environ.get("LINEAX_AMGX_MPI_TIMEOUT", "600")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"LINEAX_AMGX_MPI_TIMEOUT must be a number of seconds, got {raw!r}."
        ) from None
    return value if value > 0 else float("inf")


class _Sequencer:
    """The turn-taking of one communicator (see the module docstring)."""

    def __init__(self, comm):
        self.comm = comm
        self.control = comm.Dup()  # agreements never meet the operations' calls
        self.size = comm.Get_size()
        self.counts: dict[int, int] = {}
        self.pending: set[tuple[int, int, int]] = set()
        self.chosen: tuple[int, int, int] | None = None
        self.agreeing = False
        # After a timeout the ranks' agreements are out of step for good: every
        # later operation on this communicator raises at once.
        self.broken: str | None = None

    def signature(self, site: int | None, kind: str) -> tuple[int, int, int]:
        code = zlib.crc32(kind.encode()) & 0x7FFFFFFF
        if site is None:  # an eager operation: its program point is here
            site = new_site()
        occurrence = self.counts.get(site, 0)
        self.counts[site] = occurrence + 1
        return (site, occurrence, code)

    def _agree(self, deadline: float) -> tuple[int, int, int] | None:
        """Collective over `control`: the smallest signature pending on every rank,
        or None. Called holding `lock` (so one agreement per rank at a time)."""
        mine = sorted(self.pending)[:_SLOTS]
        send = np.full(3 * _SLOTS + 1, -1, np.int64)
        send[0] = len(mine)
        for i, sig in enumerate(mine):
            send[1 + 3 * i : 4 + 3 * i] = sig
        recv = np.empty((self.size, send.size), np.int64)
        request = self.control.Iallgather(send, recv)
        pause = 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                raise self._timeout_error(mine)
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        common = None
        for rank, row in enumerate(recv):
            n = int(row[0])
            sigs = {tuple(int(v) for v in row[1 + 3 * i : 4 + 3 * i])
                    for i in range(n)}
            sites = [sig[0] for sig in sigs]
            if len(set(sites)) < len(sites):
                # Two executions of one traced operation at once: which one is
                # "first" can differ between ranks, and pairing them wrongly
                # would exchange the wrong data. Every rank sees this row, so
                # every rank raises.
                raise DistributedOrderError(
                    f"Two executions of the same distributed operation (site "
                    f"{min(s for s in sites if sites.count(s) > 1)}) were running "
                    f"at once on rank {rank}; their order may differ between "
                    "ranks. Make one depend on the other (lineax_amgx._distributed"
                    ".after(x, *deps)), or wait for the first "
                    "(jax.block_until_ready) before starting the second."
                )
            common = sigs if common is None else common & sigs
        return min(common) if common else None

    def _timeout_error(self, mine) -> DistributedTimeoutError:
        self.broken = (
            "An earlier distributed operation on this communicator timed out; "
            "the ranks are out of step and MPI cannot be used safely on it any "
            "more (restart the job)."
        )
        return DistributedTimeoutError(
            f"Rank {self.comm.Get_rank()} of {self.size} waited "
            f"{timeout():g} s for the other ranks to reach the same MPI operation "
            f"(pending here: {mine}). Every rank must make the same distributed "
            "calls (solves, mv, norms, gather/scatter) in the same program order; "
            "a rank that raised, returned early or is still computing leaves the "
            "others waiting. (LINEAX_AMGX_MPI_TIMEOUT sets this limit.)"
        )

    def acquire(self, site: int | None, kind: str) -> None:
        """Wait until this operation is the one every rank runs next; return
        holding `lock` (released by `release`)."""
        deadline = time.monotonic() + timeout()
        with _cond:
            if self.broken is not None:
                raise DistributedTimeoutError(self.broken)
            sig = self.signature(site, kind)
            self.pending.add(sig)
            try:
                pause = 1e-4
                while True:
                    if self.chosen == sig:
                        self.chosen = None
                        break
                    if self.chosen is None and not self.agreeing:
                        self.agreeing = True
                        try:
                            chosen = self._agree(deadline)
                        finally:
                            self.agreeing = False
                        if chosen is not None:
                            self.chosen = chosen
                            _cond.notify_all()
                            pause = 1e-4
                            continue
                        # Nothing in common yet: let other threads register
                        # their operations, then agree again (every rank does).
                        _cond.wait(pause)
                        pause = min(2 * pause, 0.01)
                    else:
                        _cond.wait(0.05)
                    if time.monotonic() > deadline:
                        raise self._timeout_error(sorted(self.pending))
            finally:
                self.pending.discard(sig)
            lock.acquire()  # held for the turn (beyond this `with`)

    def release(self) -> None:
        with _cond:
            _cond.notify_all()
        lock.release()


_sequencers: dict[Any, _Sequencer] = {}


def _sequencer(comm) -> _Sequencer:
    from mpi4py import MPI

    handle = MPI._handleof(comm)
    with lock:
        seq = _sequencers.get(handle)
        if seq is None or seq.comm is not comm and seq.comm == MPI.COMM_NULL:
            # First use of this communicator (collective: the Dup). No
            # operation on it can be in flight yet: every one needs a layout
            # made with it, and making one starts here.
            seq = _sequencers[handle] = _Sequencer(comm)
        return seq


@contextlib.contextmanager
def turn(comm, site: int | None = None, kind: str = ""):
    """Run the body as the MPI operation `site` (a number from `new_site()`
    taken when the operation was created; None: the program point of this call,
    for an eager operation) of `comm`: every rank runs it at the same point of a
    common order. `kind` names the operation: ranks that reach different kinds at
    the same point never pair them (they time out instead). Nested turns of the
    same thread are part of the outer one."""
    if getattr(_local, "depth", 0) > 0:
        _local.depth += 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    seq = _sequencer(comm)
    seq.acquire(site, kind)
    _local.depth = 1
    try:
        yield
    finally:
        _local.depth = 0
        seq.release()
