# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Soak test: many solves, many patterns, threads and failing setups in one process.

Prints one JSON line per phase and a summary line; exits with status 1 if a check
fails. On a GPU (the default device is CUDA) it checks GPU memory; `--quick` runs
small counts and also works on the CPU (pyamg backend; memory is reported, not
checked).

    python benchmarks/soak.py            # GPU: < 3 minutes on an H100
    python benchmarks/soak.py --quick    # CPU or GPU, small counts

Phases:

1. `same_pattern`: `--solves` jitted solves on one pattern (2-D Poisson
   `--grid`^2) with new values and right-hand side every time (a resetup per
   solve). Every residual is checked; free GPU memory at the end must be within
   `--tolerance-mib` of its value after the first solve.
2. `patterns`: `--patterns` distinct patterns through a cache of capacity
   `--capacity`: at most that many entries resident at any time, and free memory
   at the end within the tolerance of its value once the cache was full.
3. `threads`: `--threads` Python threads solving concurrently (one GPU, shared
   jitted function): every answer right, no crash.
4. `failures`: a series of solves with a failing setup in the middle (the
   classical-AMG preset, which AmgX's CUDA 13 builds reject; on the CPU a config
   the pyamg backend rejects) and a NaN right-hand side: the error surfaces, the
   NaN is flagged, `cache_info()` stays consistent and the next solves succeed.
"""

from __future__ import annotations

import os

# Before JAX is imported: let XLA allocate on demand, so that free memory means
# something.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import lineax_amgx as lxa  # noqa: E402
from lineax_amgx._backends.amgx import _library  # noqa: E402

MiB = 2**20
SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def poisson2d(nx: int, ny: int) -> sp.csr_array:
    ex = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(nx, nx))
    ey = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(ny, ny))
    a = sp.kron(sp.eye_array(ny), ex) + sp.kron(ey, sp.eye_array(nx))
    return sp.csr_array(a)


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def free_mib() -> float | None:
    """Free memory on the current GPU (None on the CPU)."""
    if not on_gpu():
        return None
    return _library.native().free_device_memory()[0] / MiB


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MiB


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def memory_ok(start, end, tolerance) -> bool | None:
    if start is None or end is None:
        return None
    return start - end <= tolerance


# A jitted solve with its own residual check (an independent jnp SpMV): new values
# `op.values * scale` and a random right-hand side from `key`.
def make_step(solver):
    @jax.jit
    def step(op, scale, key):
        op = op.with_values(op.values * scale)
        b = jax.random.normal(key, (op.pattern.shape[0],), op.values.dtype)
        sol = lx.linear_solve(op, b, solver=solver, throw=False)
        r = jnp.linalg.norm(b - op.mv(sol.value)) / jnp.linalg.norm(b)
        return r, sol.result == lx.RESULTS.successful

    return step


def phase_same_pattern(args, rtol) -> dict:
    a = poisson2d(args.grid, args.grid)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    step = make_step(lxa.AMGX(rtol=rtol))
    keys = jax.random.split(jax.random.PRNGKey(0), args.solves)
    scales = 1.0 + 0.5 * np.sin(np.arange(args.solves))
    t0 = time.perf_counter()
    r, ok = step(op, scales[0], keys[0])
    r.block_until_ready()
    free_first, rss_first = free_mib(), rss_mib()
    worst, failures, pending = float(r), int(not ok), []
    for k in range(1, args.solves):
        pending.append(step(op, scales[k], keys[k]))
        if len(pending) == 100 or k == args.solves - 1:
            for r, ok in pending:
                worst = max(worst, float(r))
                failures += int(not ok)
            pending = []
    seconds = time.perf_counter() - t0
    free_end = free_mib()
    mem = memory_ok(free_first, free_end, args.tolerance_mib)
    return dict(
        phase="same_pattern", solves=args.solves, unknowns=a.shape[0],
        seconds=round(seconds, 2), solves_per_second=round(args.solves / seconds, 1),
        max_rel_residual=worst, failed_solves=failures,
        free_mib_after_first=free_first, free_mib_end=free_end,
        drift_mib=None if mem is None else round(free_first - free_end, 1),
        rss_mib_after_first=round(rss_first, 1), rss_mib_end=round(rss_mib(), 1),
        memory_ok=mem,
        ok=failures == 0 and worst <= 10 * rtol and mem is not False,
    )


def phase_patterns(args, rtol) -> dict:
    lxa.clear_cache()
    lxa.set_cache_size(args.capacity)
    solver = lxa.AMGX(rtol=rtol)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    worst, failures, max_size, free_full = 0.0, 0, 0, None
    for i in range(args.patterns):
        a = poisson2d(args.grid // 2, args.grid // 2 + i)  # a new pattern each time
        op = lxa.CSROperator.from_scipy(a, tags=SPD)
        b = rng.standard_normal(a.shape[0])
        sol = lx.linear_solve(op, jnp.asarray(b), solver=solver, throw=False)
        x = np.asarray(sol.value)
        worst = max(worst, float(np.linalg.norm(b - a @ x) / np.linalg.norm(b)))
        failures += int(sol.result != lx.RESULTS.successful)
        size = lxa.cache_info("amgx" if on_gpu() else "pyamg")["size"]
        max_size = max(max_size, size)
        if i == args.capacity - 1:
            free_full = free_mib()
    seconds = time.perf_counter() - t0
    free_end = free_mib()
    mem = memory_ok(free_full, free_end, args.tolerance_mib)
    info = lxa.cache_info("amgx" if on_gpu() else "pyamg")
    return dict(
        phase="patterns", patterns=args.patterns, capacity=args.capacity,
        seconds=round(seconds, 2), max_resident=max_size,
        evictions=info["evictions"], max_rel_residual=worst, failed_solves=failures,
        free_mib_cache_full=free_full, free_mib_end=free_end,
        drift_mib=None if mem is None else round(free_full - free_end, 1),
        memory_ok=mem,
        ok=(failures == 0 and worst <= 10 * rtol and max_size <= args.capacity
            and info["size"] <= args.capacity and mem is not False),
    )


def phase_threads(args, rtol) -> dict:
    lxa.set_cache_size(8)
    a = poisson2d(args.grid, args.grid)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    step = make_step(lxa.AMGX(rtol=rtol))
    per_thread = max(args.solves // 400, 5)
    results: list[tuple[float, bool]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def work(t):
        try:
            for k in range(per_thread):
                # two value sets per thread: the threads share cache entries
                r, ok = step(op, 1.0 + (t % 2), jax.random.PRNGKey(1000 * t + k))
                with lock:
                    results.append((float(r), bool(ok)))
        except Exception as e:  # reported, not raised: the phase must finish
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(t,)) for t in range(args.threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    worst = max((r for r, _ in results), default=float("inf"))
    failures = sum(not ok for _, ok in results)
    return dict(
        phase="threads", threads=args.threads, solves=len(results),
        seconds=round(time.perf_counter() - t0, 2), max_rel_residual=worst,
        failed_solves=failures, errors=errors[:3],
        ok=(not errors and failures == 0 and worst <= 10 * rtol
            and len(results) == args.threads * per_thread),
    )


def phase_failures(args, rtol) -> dict:
    lxa.set_cache_size(args.capacity)
    a = poisson2d(args.grid, args.grid)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    rng = np.random.default_rng(2)
    good = lxa.AMGX(rtol=rtol)
    if on_gpu():
        failing = lxa.AMGX("PCG_CLASSICAL", rtol=rtol)  # NVIDIA/AMGX#380 on CUDA 13
    else:
        failing = lxa.AMGX({"config_version": 2, "solver": {"solver": "KACZMARZ"}})
    events, worst, failures, sane = [], 0.0, 0, True
    for i in range(args.series):
        b = rng.standard_normal(a.shape[0])
        if i == args.series // 2:
            try:
                x = lx.linear_solve(op, jnp.asarray(b), solver=failing).value
                x.block_until_ready()
                res = float(np.linalg.norm(b - a @ np.asarray(x)) / np.linalg.norm(b))
                events.append(f"failing config solved (residual {res:.1e})")
                if not res <= 10 * rtol:
                    failures += 1
            except Exception as e:
                events.append(f"raised {type(e).__name__}: {str(e)[:200]}")
        elif i == args.series // 2 + 1:
            b[0] = np.nan
            sol = lx.linear_solve(op, jnp.asarray(b), solver=good, throw=False)
            flagged = sol.result == lx.RESULTS.nonfinite_input
            events.append(f"NaN right-hand side flagged: {bool(flagged)}")
            failures += int(not flagged)
        else:
            x = lx.linear_solve(op, jnp.asarray(b), solver=good).value
            worst = max(worst, float(np.linalg.norm(b - a @ np.asarray(x))
                                     / np.linalg.norm(b)))
        for name in ("amgx", "pyamg"):
            info = lxa.cache_info(name)
            sane &= 0 <= info["size"] <= max(info["capacity"], 0) and len(
                info["entries"]) == info["size"]
    return dict(
        phase="failures", solves=args.series, events=events, max_rel_residual=worst,
        failed_solves=failures, cache_consistent=bool(sane),
        ok=failures == 0 and worst <= 10 * rtol and bool(sane),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small counts (runs on the CPU too)")
    parser.add_argument("--solves", type=int, default=None)
    parser.add_argument("--patterns", type=int, default=None)
    parser.add_argument("--capacity", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--series", type=int, default=None)
    parser.add_argument("--grid", type=int, default=None)
    parser.add_argument("--tolerance-mib", type=float, default=64.0)
    parser.add_argument("--phases", default="same_pattern,patterns,threads,failures")
    args = parser.parse_args(argv)
    quick = args.quick
    args.solves = args.solves or (200 if quick else 10_000)
    args.patterns = args.patterns or (10 if quick else 100)
    args.series = args.series or (6 if quick else 20)
    args.grid = args.grid or (16 if quick else 64)
    rtol = 1e-8
    emit(dict(phase="start", device=str(jax.devices()[0]), quick=quick,
              free_mib=free_mib(), rss_mib=round(rss_mib(), 1),
              amgx=_library.try_load() if on_gpu() else None))
    phases = {"same_pattern": phase_same_pattern, "patterns": phase_patterns,
              "threads": phase_threads, "failures": phase_failures}
    ok = True
    t0 = time.perf_counter()
    for name in args.phases.split(","):
        try:
            record = phases[name](args, rtol)
        except Exception as e:  # a crash of a phase is a failure, not an abort
            record = dict(phase=name, ok=False, error=f"{type(e).__name__}: {e}")
        ok &= bool(record["ok"])
        emit(record)
    lxa.finalize()
    emit(dict(phase="summary", ok=ok, seconds=round(time.perf_counter() - t0, 1),
              free_mib_after_finalize=free_mib()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
