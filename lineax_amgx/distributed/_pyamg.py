# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The CPU backend for distributed patterns: the system is gathered on rank 0
and solved with the pyamg backend; the solution is scattered back.
"""

from __future__ import annotations

import numpy as np

from .._backends import pyamg
from .._backends.contract import (
    SolveKey,
    Status,
    host_setup,
    host_solve,
    nonfinite_host_result,
)
from ._comm import _raise_if_any, agree, communicator
from ._pattern import DistributedPattern, _counts_displs, _no_near_nullspace
from ._sequencer import (
    new_site as _new_site,
    turn as _turn,
)

_INT32_MAX = np.iinfo(np.int32).max


# -----------------------------------------------------------------------------
# The CPU backend for distributed operators (the backend contract).
# -----------------------------------------------------------------------------

_ROOT = 0


# The CPU setups of each communicator's distributed operators, on the root: the
# pyamg problems (cache keys) it set up, for the cache controls (`_cache`).
_problems: dict[int, dict[tuple, pyamg.Host]] = {}


def _problem(comm_key: int, gpat, key: SolveKey) -> pyamg.Host:
    problem = pyamg.Host(gpat, key)
    held = _problems.setdefault(comm_key, {})
    for k in [k for k, p in held.items() if not p.resident()]:
        del held[k]  # evicted since: forget them (bounded by the capacity)
    held[problem.cache_key] = problem
    return problem


def resident_problems(comm_key: int) -> list[pyamg.Host]:
    """The root's resident CPU setups of `comm_key`'s operators (none elsewhere)."""
    return [p for p in _problems.get(comm_key, {}).values() if p.resident()]


def _gather_to_root(comm, local: np.ndarray, counts, root: int):
    """`local` (rows of equal trailing shape: `(n,)`, or `(nnz, b, b)` blocks)
    gathered on `root`, `counts` rows from every rank."""
    local = np.ascontiguousarray(local)
    inner = local.shape[1:]
    unit = int(np.prod(inner, dtype=np.int64))
    if comm.Get_rank() == root:
        out = np.empty(int(np.sum(counts)) * unit, local.dtype)
        comm.Gatherv(local.reshape(-1),
                     [out, _counts_displs(np.multiply(counts, unit))], root=root)
        return out.reshape(-1, *inner)
    comm.Gatherv(local.reshape(-1), None, root=root)
    return None


def setup(
    pattern: DistributedPattern, values, ok, key: SolveKey, near_nullspace=None
):
    """Collective. The CPU setup of a distributed operator: the values are
    gathered on rank 0, which sets up pyamg (the pyamg backend's cache) for the
    global matrix; every rank receives the same token. `ok` is agreed over the
    ranks: non-finite values anywhere skip the setup everywhere."""
    _no_near_nullspace(near_nullspace)
    comm_key = pattern.layout.comm_key
    site = _new_site()

    def host(values, ok):
        # The config is translated when this runs, on the root, never at trace
        # time (see pyamg.Host); a config error is raised on every rank.
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
            if comm.Get_rank() == _ROOT:
                problem = _problem(comm_key, gpat, key)
                try:
                    token = problem.setup(vals)
                except Exception as e:  # noqa: BLE001 - re-raised on every rank
                    problem.evict()  # (nothing of a failed setup is kept)
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
    _no_near_nullspace(near_nullspace)
    comm_key = pattern.layout.comm_key
    site = _new_site()
    out_dtype = np.dtype(b.dtype)
    # Vectors: the b unknowns of every block row.
    counts = np.multiply(pattern.layout.counts, pattern.block_size)
    nnz_counts = np.diff(pattern.nnz_offsets)

    def host(values, token, b, ok, *maybe_x0):
        comm = communicator(comm_key)
        rank = comm.Get_rank()
        with _turn(comm, site, "solve"):
            if not agree(int(ok) != 0, comm):
                return nonfinite_host_result(b.shape, out_dtype)
            gpat = pattern.global_pattern(_ROOT)
            problem = None if gpat is None else _problem(comm_key, gpat, key)
            # Token hit on the root: nobody sends values. One decision for all.
            hit = False
            if rank == _ROOT:
                hit = problem.holds(np.asarray(token))
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
                    x, status, steps, resid = problem.solve(
                        vals, np.asarray(token), bg, x0g
                    )
                    result = (int(status), int(steps), float(resid), None)
                    x = np.asarray(x, out_dtype)
                except Exception as e:  # noqa: BLE001 - re-raised on every rank
                    # A failed solve leaves the setup in an unknown state: evicted
                    # (only the root holds CPU setups; the error reaches every
                    # rank below).
                    problem.evict()
                    x = np.zeros(pattern.global_shape[0], out_dtype)
                    result = (Status.FAILED, 0, float("inf"), repr(e))
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
