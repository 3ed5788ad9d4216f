"""3D Poisson: a jitted `lx.linear_solve` with AMGX against AmgX's own times.

Each timed call performs setup + solve with *new* values (so the cache resets up),
and the wall time of the whole jitted call is set beside the time AmgX itself spent
in its setup (resetup) and solve C calls for that same call, as measured by the
native core around those calls. Calls are interleaved in one process.

    python benchmarks/poisson.py --sizes 100 200 --out docs/results/poisson.jsonl
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from _common import amgx_entry, device_name, poisson3d, poisson_args, record

import lineax_amgx as lxa


def main():
    args = poisson_args(__doc__)
    on_gpu = jax.default_backend() == "gpu"
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    for n in args.sizes:
        a = poisson3d(n)
        op = lxa.CSROperator.from_scipy(a, tags=tags)
        b = jnp.ones(a.shape[0])
        solver = lxa.AMGX(args.config, rtol=args.rtol)
        f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver))
        values = [op.values * (1.0 + 1e-3 * k) for k in range(args.repeats + 2)]
        jax.block_until_ready(values)
        lxa.clear_cache()
        rows = []
        for k, v in enumerate(values):
            o = op.with_values(v)
            t0 = time.perf_counter()
            sol = f(o, b)
            jax.block_until_ready(sol.value)
            wall = time.perf_counter() - t0
            e = amgx_entry() if on_gpu else {}
            if k >= 2:  # after compilation and the first (full) setup
                rows.append((wall, e.get("last_setup_seconds", float("nan")),
                             e.get("last_solve_seconds", float("nan")),
                             int(sol.stats["num_steps"])))
        wall = statistics.median(r[0] for r in rows)
        setup = statistics.median(r[1] for r in rows)
        solve = statistics.median(r[2] for r in rows)
        info = lxa.cache_info("amgx") if on_gpu else lxa.cache_info("pyamg")
        # Also: a cold full setup + solve.
        lxa.clear_cache()
        t0 = time.perf_counter()
        jax.block_until_ready(f(op.with_values(values[0]), b).value)
        cold_wall = time.perf_counter() - t0
        e = amgx_entry() if on_gpu else {}
        record(args.out, {
            "benchmark": "poisson3d_setup_plus_solve",
            "n": a.shape[0], "nnz": a.nnz, "config": args.config, "rtol": args.rtol,
            "iterations": rows[-1][3],
            "wall_median_s": wall, "amgx_resetup_median_s": setup,
            "amgx_solve_median_s": solve,
            "ratio_wall_over_amgx": wall / (setup + solve) if on_gpu else None,
            "resetups": info.get("resetups"), "setups": info.get("setups"),
            "cold_wall_s": cold_wall,
            "cold_amgx_setup_s": e.get("last_setup_seconds"),
            "cold_amgx_solve_s": e.get("last_solve_seconds"),
            "cold_ratio": (
                cold_wall / (e["last_setup_seconds"] + e["last_solve_seconds"])
                if e else None
            ),
            "card": device_name(),
        })
        del values
        np.random.seed(0)


if __name__ == "__main__":
    main()
