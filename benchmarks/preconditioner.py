"""AMGXPreconditioner: time per application against AmgX's own cycle time.

For a 3D Poisson matrix (7-point, SPD), one `AMGXPreconditioner` is built (one
setup); then a jitted `P.mv(r)` is timed (median after warm-up, each call blocked
until done) and set beside the time AmgX itself spent in that solve call
(`cache_info("amgx")["entries"][i]["last_solve_seconds"]`, measured by the native
core around `AMGX_solver_solve`). The difference is the cost of the JAX/FFI
boundary per application. A preconditioned `lx.CG` solve is timed too (its
iteration count and wall time per iteration).

    python benchmarks/preconditioner.py --sizes 100 \
        --out docs/results/preconditioner.jsonl
    python benchmarks/preconditioner.py --sizes 20       # on a CPU (pyamg): small

On the CPU there is no AmgX: the AmgX columns are `null`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from _common import amgx_entry, median_time, poisson3d, record

import lineax_amgx as lxa


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="grid sides n (n^3 unknowns); default 100 on a GPU, "
                        "20 on a CPU")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--config", default="AMG_VCYCLE")
    parser.add_argument("--cycles", type=int, default=None)
    parser.add_argument("--precision", default=None,
                        choices=[None, "double", "single", "mixed"])
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--no-solve", action="store_true",
                        help="skip the preconditioned CG solve")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    on_gpu = jax.default_backend() == "gpu"
    sizes = args.sizes or ([100] if on_gpu else [20])
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    rng = np.random.default_rng(0)
    for n in sizes:
        a = poisson3d(n)
        op = lxa.CSROperator.from_scipy(a, tags=tags)
        r = jnp.asarray(rng.standard_normal(a.shape[0]))
        lxa.clear_cache()
        lxa.reset_counters()

        t0 = time.perf_counter()
        P = lxa.AMGXPreconditioner(op, args.config, cycles=args.cycles,
                               precision=args.precision)
        jax.block_until_ready(P.token)
        setup_wall = time.perf_counter() - t0
        e = amgx_entry() if on_gpu else {}
        setup_amgx = e.get("last_setup_seconds")

        apply = jax.jit(lambda P, r: P.mv(r))
        cycle_times: list[float] = []

        def once():
            jax.block_until_ready(apply(P, r))
            if on_gpu:
                cycle_times.append(amgx_entry()["last_solve_seconds"])

        wall, _ = median_time(once, repeats=args.repeats, warmup=3)
        cycle = statistics.median(cycle_times[3:]) if on_gpu else None
        info = lxa.cache_info("amgx" if on_gpu else "pyamg")
        result = {
            "benchmark": "preconditioner_apply",
            "n": a.shape[0], "nnz": a.nnz, "config": args.config,
            "cycles": args.cycles or 1, "precision": args.precision,
            "setup_wall_s": setup_wall, "setup_amgx_s": setup_amgx,
            "apply_wall_median_s": wall, "amgx_cycle_median_s": cycle,
            "overhead_s": None if cycle is None else wall - cycle,
            "ratio_wall_over_amgx": None if cycle is None else wall / cycle,
            "setups": info["setups"], "resetups": info["resetups"],
            "solves": info["solves"],
        }
        if not args.no_solve:
            solver = lx.CG(rtol=args.rtol, atol=args.rtol, max_steps=1000)
            solve = jax.jit(lambda o, b, P: lx.linear_solve(
                o, b, solver, options={"preconditioner": P}))
            sol = solve(op, r, P)  # compile
            jax.block_until_ready(sol.value)
            t0 = time.perf_counter()
            sol = solve(op, r, P)
            jax.block_until_ready(sol.value)
            solve_wall = time.perf_counter() - t0
            its = int(sol.stats["num_steps"])
            resid = float(jnp.linalg.norm(r - op.mv(sol.value)) / jnp.linalg.norm(r))
            result.update(
                cg_iterations=its, cg_wall_s=solve_wall,
                cg_wall_per_iteration_s=solve_wall / max(its, 1),
                cg_relative_residual=resid,
            )
        record(args.out, result)


if __name__ == "__main__":
    main()
