"""What the setup cache saves: four ways to call a jitted AMGX solve, each next to
the time AmgX itself spent in the C calls that call needed (measured by the native
core around them), plus a symmetric gradient step.

(a)  unchanged values through a reused `state`       vs AmgX solve
(a') unchanged values through a fresh linear_solve    vs AmgX solve
(b)  changed values                                   vs AmgX resetup + solve
(c)  cold (AmgX setups dropped)                       vs AmgX setup + solve
(c2) cold after `clear_cache()`                       vs AmgX setup + solve
     (which also frees the structure arrays' GPU copies: the program uploads
     them again; before runtime arrays they were constants of the program,
     never freed, so (c) is the row comparable with earlier runs)
(g)  jax.grad of a symmetric solve (forward+backward) vs AmgX setup + 2 solves

    python benchmarks/cache.py --sizes 100 200 --out docs/results/cache.jsonl
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import lineax as lx
from _common import amgx_entry, poisson3d, poisson_args, record

import lineax_amgx as lxa


def last_seconds(entry) -> float:
    """AmgX's own time in the last call's (re)setup and solve of `entry`."""
    return entry["last_setup_seconds"] + entry["last_solve_seconds"]


def drop_setups():
    """Drop the AmgX setups only (not the structure arrays' GPU copies): a cold
    setup as LRU eviction or new values beyond the cache's capacity make it."""
    from lineax_amgx._backends.amgx import _library

    _library.native().clear_cache()


def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main():
    args = poisson_args(__doc__)
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    for n in args.sizes:
        a = poisson3d(n)
        op = lxa.CSROperator.from_scipy(a, tags=tags)
        b = jnp.ones(a.shape[0])
        solver = lxa.AMGX(args.config, rtol=args.rtol)
        solve = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)
        init = jax.jit(lambda o: solver.init(o, {}))
        with_state = jax.jit(
            lambda o, v, s: lx.linear_solve(o, v, solver=solver, state=s).value
        )

        def loss(values, v):
            o = op.with_values(values)
            return jnp.sum(lx.linear_solve(o, v, solver=solver).value)

        grad = jax.jit(jax.grad(loss))
        values = [op.values * (1.0 + 1e-3 * k) for k in range(2 * args.repeats + 4)]
        jax.block_until_ready(values)
        # Compile everything once.
        state = init(op)
        jax.block_until_ready(
            (solve(op, b), with_state(op, b, state), grad(op.values, b))
        )
        results = {"a": [], "a'": [], "b": [], "c": [], "c2": [], "g": []}
        for k in range(args.repeats):
            results["a"].append((timed(lambda: with_state(op, b, state)),
                                 amgx_entry()["last_solve_seconds"]))
            solve(op, b).block_until_ready()
            results["a'"].append((timed(lambda: solve(op, b)),
                                  amgx_entry()["last_solve_seconds"]))
            o = op.with_values(values[2 * k + 1])
            wall = timed(lambda: solve(o, b))
            e = amgx_entry()
            results["b"].append((wall, last_seconds(e)))
            drop_setups()
            o = op.with_values(values[2 * k + 2])
            wall = timed(lambda: solve(o, b))
            e = amgx_entry()
            results["c"].append((wall, last_seconds(e)))
            lxa.clear_cache()
            o = op.with_values(values[2 * k + 1])
            wall = timed(lambda: solve(o, b))
            e = amgx_entry()
            results["c2"].append((wall, last_seconds(e)))
            drop_setups()
            lxa.reset_counters()
            wall = timed(lambda: grad(values[2 * k + 3], b))
            info = lxa.cache_info("amgx")
            e = amgx_entry()
            assert (info["setups"], info["solves"]) == (1, 2), info
            total = e["total_setup_seconds"] + e["total_solve_seconds"]
            results["g"].append((wall, total))
            # Leave the grad's entry resident for the next (a) with op's values.
            solve(op, b).block_until_ready()
            state = init(op)
        row = {"benchmark": "cache", "n": a.shape[0], "nnz": a.nnz,
               "config": args.config, "rtol": args.rtol}
        for name, pairs in results.items():
            wall = statistics.median(p[0] for p in pairs)
            amgx = statistics.median(p[1] for p in pairs)
            row[f"{name}_wall_s"] = wall
            row[f"{name}_amgx_s"] = amgx
            row[f"{name}_ratio"] = wall / amgx
        record(args.out, row)


if __name__ == "__main__":
    main()
