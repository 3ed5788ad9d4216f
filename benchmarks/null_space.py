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
from tune import ES3, ES3R, PCGF, SZ8_J11

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


# Overrides of the preset's AMG scope (`outer`: of its outer solver); the pieces
# are benchmarks/tune.py's.
AMG_VARIANTS = {
    "preset": {},
    "es0": {"error_scaling": 0},  # the preset without its over-correction
    "sweeps-3": {"presweeps": 3, "postsweeps": 3},
    "SIZE_2": {"selector": "SIZE_2"},
    "SIZE_8": {"selector": "SIZE_8"},
    "F-cycle": {"cycle": "F"},
    "W-cycle": {"cycle": "W"},
    "sz8-j11": SZ8_J11,  # PCG_AGGREGATION_ISOTROPIC's cycle
    # over-correction of each coarse-grid correction (AmgX's error_scaling 3:
    # the A-norm optimal scale), with PCG or the flexible PCGF
    "es3": ES3,
    "es3-f": {**ES3, **PCGF},
    "sz8-j11-es3": {**SZ8_J11, **ES3},
    "sz8-j11-es3-f": {**SZ8_J11, **ES3, **PCGF},
    # the scale computed by a level's first cycle, then kept (a fixed cycle)
    "es3-r": ES3R,
    "sz8-j11-es3-r": {**SZ8_J11, **ES3R},
    # a K-cycle (CG on the coarse levels) inside PCGF
    "kcyc-f": {**SZ8_J11, "cycle": "CG", **PCGF},
}


def pinned(a, b):
    """The pure-Neumann matrix with unknown 0 fixed to 0 (its row and column
    replaced by the identity's): nonsingular. For a consistent `b` its solution
    solves the singular system; subtracting the mean gives the minimum-norm one."""
    a = sp.lil_array(a)
    a[0, :] = 0.0
    a[:, 0] = 0.0
    a[0, 0] = 1.0
    a = sp.csr_array(a)
    a.sort_indices()
    b = np.array(b)
    b[0] = 0.0
    return a, b


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="grid side (n^3 unknowns)")
    parser.add_argument("--config", default="PCG_AGGREGATION")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--variants", nargs="+", default=["preset"],
                        choices=list(AMG_VARIANTS))
    parser.add_argument("--pinned", action="store_true",
                        help="also the Neumann problem with one unknown fixed "
                        "(nonsingular), per variant")
    parser.add_argument("--coarsest", action="store_true",
                        help="also the singular path's coarsest-level alternatives")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)

    base = lxa.configs[args.config]
    nosolver = dict(coarse="NOSOLVER")
    # Both problems under each AMG variant (the ratio compares like with like),
    # then the singular path's coarsest-level alternatives (Neumann only).
    cases = []
    for name in args.variants:
        cfg = copy.deepcopy(base)
        over = copy.deepcopy(AMG_VARIANTS[name])
        cfg["solver"].update(over.pop("outer", {}))
        cfg["solver"]["preconditioner"].update(over)
        cases += [(f"dirichlet/{name}", "dirichlet", cfg),
                  (f"neumann/{name}", "neumann", cfg)]
        if args.pinned:
            cases.append((f"pinned/{name}", "pinned", cfg))
    if args.coarsest:
        cases += [
            ("dirichlet/coarse-sweeps-4", "dirichlet",
             variant(base, sweeps=4, **nosolver)),
            ("neumann/coarse-sweeps-16", "neumann",
             variant(base, sweeps=16, **nosolver)),
            ("neumann/min-rows-256", "neumann",
             variant(base, sweeps=16, min_rows=256, **nosolver)),
        ]
    n = args.n
    mats = {k: laplacian3d(n, k) for k in ("dirichlet", "neumann")}
    rng = np.random.default_rng(0)
    rhs = rng.standard_normal(n**3)
    rhs -= rhs.mean()  # consistent for the Neumann problem too
    rhs_of = {"dirichlet": rhs, "neumann": rhs}
    if args.pinned:
        mats["pinned"], rhs_of["pinned"] = pinned(mats["neumann"], rhs)
    bs = {k: jnp.asarray(v) for k, v in rhs_of.items()}
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
        b = bs[kind]
        try:
            sol = solve(ops[kind], b)
            jax.block_until_ready(sol.value)
        except Exception as e:  # noqa: BLE001 - a variant AmgX refuses is reported
            print(f"{label:26s} refused: {str(e).splitlines()[0][:160]}")
            record(args.out, {"benchmark": "null_space", "n": n**3, "case": label,
                              "error": str(e).splitlines()[0][:300]})
            continue
        x = np.asarray(sol.value)
        if kind == "pinned":  # a solution of the Neumann problem; minimum-norm
            x = x - x.mean()
        a = mats["neumann" if kind == "pinned" else kind]
        resid = np.linalg.norm(rhs - a @ x) / np.linalg.norm(rhs)
        steps = int(sol.stats["num_steps"])
        ok = sol.result == lx.RESULTS.successful
        seconds, _ = median_time(lambda: jax.block_until_ready(solve(ops[kind], b)),  # noqa: B023
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
