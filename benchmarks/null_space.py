"""Singular systems: iterations of a pure-Neumann 3-D Poisson solve (constant null
space) against the Dirichlet problem of the same grid, for the singular path's
coarsest-level choices.

A null space makes AMGX project `b`, solve the consistent singular system and
project the answer; every AMG scope's dense-LU coarse solve (which cannot factor
the singular coarsest matrix) becomes smoother sweeps on the coarsest level
(`_config._for_singular`). This benchmark measures what that costs in iterations
and time, next to alternatives for the coarsest level, so that the default is a
measured choice:

- `dirichlet/V` and `neumann/V` for each AMG variant V (the preset; 3 pre- and
  post-sweeps; aggregates of 2 or 8; an F-cycle): the ratio compares the two
  problems under the same variant (the Neumann one through the singular path);
- `dirichlet/coarse-sweeps-4`: the Dirichlet problem with the singular path's
  coarsest level (the coarse solve's share, apart from the boundary condition's);
- `neumann/coarse-sweeps-16`, `neumann/min-rows-256`: more coarsest sweeps, or
  coarsening stopped at 256 rows (compared with `dirichlet/preset`).

Each solve is checked (relative residual of the projected system, `x` orthogonal
to the constants); times are medians after a warm-up, blocked until ready.

    python benchmarks/null_space.py --n 100            # GPU: 1M unknowns
    python benchmarks/null_space.py --n 16 --repeats 1 # CPU (pyamg) smoke run
"""

from __future__ import annotations

import argparse
import copy
import json

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.sparse as sp
from _common import device_name, median_time, record

import lineax_amgx as lxa


def laplacian3d(n: int, boundary: str):
    """The 7-point Laplacian on an n^3 grid, Dirichlet or zero-flux (Neumann)."""
    one = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n)).tolil()
    if boundary == "neumann":
        one[0, 0] = one[n - 1, n - 1] = 1.0
    one = sp.csr_array(one)
    eye = sp.eye_array(n, format="csr")
    a = (sp.kron(sp.kron(one, eye), eye) + sp.kron(sp.kron(eye, one), eye)
         + sp.kron(sp.kron(eye, eye), one))
    a = sp.csr_array(a)
    a.sort_indices()
    return a


def variant(base: dict, *, coarse=None, sweeps=None, min_rows=None) -> dict:
    """`base` (a config dict) with its AMG preconditioner's coarsest level changed."""
    cfg = copy.deepcopy(base)
    amg = cfg["solver"]["preconditioner"]
    if coarse is not None:
        amg["coarse_solver"] = coarse
    if sweeps is not None:
        amg["coarsest_sweeps"] = sweeps
    if min_rows is not None:
        amg["min_coarse_rows"] = min_rows
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="grid side (n^3 unknowns)")
    parser.add_argument("--config", default="PCG_AGGREGATION")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)

    base = lxa.configs[args.config]
    nosolver = dict(coarse="NOSOLVER")
    # Both problems under each AMG variant (the ratio compares like with like),
    # then the singular path's coarsest-level alternatives (Neumann only).
    amg_variants = {
        "preset": {},
        "sweeps-3": {"presweeps": 3, "postsweeps": 3},
        "SIZE_2": {"selector": "SIZE_2"},
        "SIZE_8": {"selector": "SIZE_8"},
        "F-cycle": {"cycle": "F"},
    }
    cases = []
    for name, over in amg_variants.items():
        cfg = copy.deepcopy(base)
        cfg["solver"]["preconditioner"].update(over)
        cases += [(f"dirichlet/{name}", "dirichlet", cfg),
                  (f"neumann/{name}", "neumann", cfg)]
    cases += [
        ("dirichlet/coarse-sweeps-4", "dirichlet", variant(base, sweeps=4, **nosolver)),
        ("neumann/coarse-sweeps-16", "neumann", variant(base, sweeps=16, **nosolver)),
        ("neumann/min-rows-256", "neumann", variant(base, sweeps=16, min_rows=256,
                                                    **nosolver)),
    ]
    n = args.n
    mats = {k: laplacian3d(n, k) for k in ("dirichlet", "neumann")}
    rng = np.random.default_rng(0)
    rhs = rng.standard_normal(n**3)
    rhs -= rhs.mean()  # consistent for the Neumann problem too
    b = jnp.asarray(rhs)
    basis = lxa.constant_null_space(n**3)
    spd = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    ops = {k: lxa.CSROperator.from_scipy(a, tags=spd) for k, a in mats.items()}
    print(f"{n}^3 = {n**3:,} unknowns on {device_name()}, {args.config}, "
          f"rtol {args.rtol:g}")
    counts = {}
    for label, kind, cfg in cases:
        solver = lxa.AMGX(cfg, rtol=args.rtol)
        options = {"null_space": basis} if kind == "neumann" else None
        solve = jax.jit(lambda o, v, s=solver, opt=options: lx.linear_solve(
            o, v, solver=s, options=opt, throw=False))
        try:
            sol = solve(ops[kind], b)
            jax.block_until_ready(sol.value)
        except Exception as e:  # noqa: BLE001 - a variant AmgX refuses is reported
            print(f"{label:26s} refused: {str(e).splitlines()[0][:160]}")
            record(args.out, {"benchmark": "null_space", "n": n**3, "case": label,
                              "error": str(e).splitlines()[0][:300]})
            continue
        x = np.asarray(sol.value)
        resid = np.linalg.norm(rhs - mats[kind] @ x) / np.linalg.norm(rhs)
        steps = int(sol.stats["num_steps"])
        ok = sol.result == lx.RESULTS.successful
        seconds, _ = median_time(lambda: jax.block_until_ready(solve(ops[kind], b)),
                                 repeats=args.repeats, warmup=1)
        counts[label] = steps
        ref = counts.get("dirichlet/" + label.split("/")[1],
                         counts.get("dirichlet/preset"))
        ratio = "" if ref is None else f"{steps / ref:5.2f}x"
        print(f"{label:26s} {steps:4d} iterations {ratio:>7s}  {seconds * 1e3:8.1f} ms"
              f"  residual {resid:.1e}  mean(x) {x.mean():.1e}"
              f"{'' if ok else '  NOT successful: ' + str(sol.result)}")
        record(args.out, {"benchmark": "null_space", "n": n**3, "case": label,
                          "iterations": steps, "seconds": seconds,
                          "residual": float(resid), "successful": bool(ok),
                          "config": json.dumps(cfg, sort_keys=True)})


if __name__ == "__main__":
    main()
