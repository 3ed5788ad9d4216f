"""What AmgX's complex modes accept and what converges: a device probe.

AmgX's README calls its complex support "currently limited". This script tries,
on complex systems in AmgX's modes dZZI (complex128) and dCCI (complex64), each
outer solver with each preconditioner and prints, per combination, whether AmgX
accepted it (or its own refusal message), the iterations and the relative
residual ||b - A x|| / ||b|| (recomputed on the host in complex128):

- a 2-D Helmholtz matrix with absorption (complex symmetric, not Hermitian):
  FGMRES, GMRES and PBiCGStab;
- a magnetic Laplacian (Hermitian positive definite): PCG, FGMRES and GMRES;
- preconditioners: Jacobi (BLOCK_JACOBI), aggregation AMG as in the complex
  preset (SIZE_8, Jacobi smoothing, coarsest level smoothed: NOSOLVER), and
  aggregation AMG as in the real presets (SIZE_4, dense LU coarse solver);
- the default complex preset (lineax_amgx's `_COMPLEX_DEFAULTS`) on both
  problems, also on the 2 x 2 block form of the Helmholtz matrix.

lineax-amgx refuses complex solves on AmgX (measured with AmgX 2.5.0, CUDA 13:
in dZZI only GMRES is registered and it does not converge; in dCCI every
combination crashed the process; lineax_amgx/_backends/amgx/_complex.py). The
probe sets the experimental opt-in LINEAX_AMGX_EXPERIMENTAL_COMPLEX=1 in the
processes that run the combinations, so that they reach AmgX; --without-opt-in
leaves it unset and shows what a user gets (the refusal, a TypeError, for every
combination).

Each combination runs in its own subprocess (unless --in-process), so that a
combination that broke the CUDA context (or the process) is reported as such and
cannot affect the next one. A refusal must reach Python as an exception; a
crashed subprocess is AmgX failing in a way no exception can report (the reason
the complex modes are refused by default).

    python3 benchmarks/complex_probe.py                   # on the GPU (AmgX)
    python3 benchmarks/complex_probe.py --without-opt-in  # the refusal, per case
    python3 benchmarks/complex_probe.py --backend pyamg   # a dry run on the CPU
    python3 benchmarks/complex_probe.py --json probe.json # also save the results

If a new AmgX build converges here, revisit the refusal (`_complex.py`) and the
complex presets: `_COMPLEX_DEFAULTS` and `GMRES_AGGREGATION_COMPLEX` in
lineax_amgx/_config.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import numpy as np

PROBLEMS = {
    "helmholtz": ("FGMRES", "GMRES", "PBICGSTAB"),
    "hermitian": ("PCG", "FGMRES", "GMRES"),
}
PRECONDITIONERS = ("JACOBI", "AMG_SIZE8_NOSOLVER", "AMG_SIZE4_DENSE_LU")
MODES = {"dZZI": "complex128", "dCCI": "complex64"}
OPT_IN = "LINEAX_AMGX_EXPERIMENTAL_COMPLEX"  # (lineax_amgx/_backends/amgx/_complex.py)


# -----------------------------------------------------------------------------
# Problems (complex matrices, scipy) and configurations.
# -----------------------------------------------------------------------------


def helmholtz(m: int, k: float = 16.0, eps: float = 0.5):
    """-Δ - k²(1 - iε) on an m x m interior grid (5 points, Dirichlet)."""
    import scipy.sparse as sp

    h = 1.0 / (m + 1)
    d2 = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(m, m)) / h**2
    eye = sp.eye(m)
    lap = sp.kron(eye, d2) + sp.kron(d2, eye)
    return sp.csr_array(lap - k**2 * (1 - 1j * eps) * sp.eye(m * m))


def hermitian(m: int, shift: float = 0.5, seed: int = 0):
    """A magnetic Laplacian on an m x m grid plus `shift`: Hermitian PD."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n = m * m
    idx = np.arange(n).reshape(m, m)
    i = np.concatenate([idx[:-1, :].ravel(), idx[:, :-1].ravel()])
    j = np.concatenate([idx[1:, :].ravel(), idx[:, 1:].ravel()])
    upper = sp.csr_array((np.exp(1j * rng.uniform(-np.pi, np.pi, i.size)), (i, j)),
                         shape=(n, n))
    deg = np.bincount(np.concatenate([i, j]), minlength=n).astype(float)
    return sp.csr_array(sp.diags(deg + shift) - upper - upper.conj().T)


def _jacobi() -> dict:
    return {"scope": "jacobi", "solver": "BLOCK_JACOBI", "relaxation_factor": 0.8,
            "max_iters": 1, "monitor_residual": 0}


def config(solver: str, precond: str) -> dict:
    """The outer solver `solver` around the preconditioner `precond` (the Krylov
    settings of the complex preset; its AMG cycle, or the real presets')."""
    import lineax_amgx as lxa

    cfg = copy.deepcopy(lxa.configs["GMRES_AGGREGATION_COMPLEX"])
    if precond == "JACOBI":
        cfg["solver"]["preconditioner"] = _jacobi()
    elif precond == "AMG_SIZE4_DENSE_LU":
        cfg["solver"]["preconditioner"] = copy.deepcopy(
            lxa.configs["PCG_AGGREGATION"]["solver"]["preconditioner"]
        )
    elif precond != "AMG_SIZE8_NOSOLVER":
        raise ValueError(f"unknown preconditioner {precond!r}")
    cfg["solver"]["solver"] = solver
    return cfg


def cases(problems, solvers, preconds):
    out = []
    for mode in MODES:
        for problem, problem_solvers in PROBLEMS.items():
            if problem not in problems:
                continue
            for solver in problem_solvers:
                if solver not in solvers:
                    continue
                for precond in preconds:
                    out.append(dict(problem=problem, mode=mode, solver=solver,
                                    precond=precond, block=1))
            out.append(dict(problem=problem, mode=mode, solver="default",
                            precond="default", block=1))
        if "helmholtz" in problems:
            out.append(dict(problem="helmholtz", mode=mode, solver="default",
                            precond="default", block=2))
    return out


# -----------------------------------------------------------------------------
# One combination (in a subprocess unless --in-process).
# -----------------------------------------------------------------------------


def run_one(case: dict, size: int, backend: str, max_steps: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import lineax as lx

    import lineax_amgx as lxa

    dtype = MODES[case["mode"]]
    if case["problem"] == "helmholtz":
        a, tags = helmholtz(size), lx.symmetric_tag
    else:
        a, tags = hermitian(size), lx.positive_semidefinite_tag
    rng = np.random.default_rng(1)
    b = (rng.standard_normal(a.shape[0]) + 1j * rng.standard_normal(a.shape[0]))
    b = b.astype(dtype)
    device = jax.devices("cpu" if backend == "pyamg" else "cuda")[0]
    op = lxa.CSROperator.from_scipy(a, tags=tags, dtype=dtype,
                                    block_size=case["block"] if case["block"] > 1
                                    else None)
    op = op.with_values(jax.device_put(op.values, device))
    cfg = None if case["solver"] == "default" else config(case["solver"],
                                                          case["precond"])
    rtol = 1e-8 if dtype == "complex128" else 1e-5
    solver = lxa.AMGX(cfg, rtol=rtol, atol=0.0, max_steps=max_steps,
                      backend=backend)
    if cfg is None:
        case = dict(case, precond=solver._resolve(op, op).text)
    out = dict(case, n=a.shape[0], rtol=rtol)
    t0 = time.perf_counter()
    try:
        sol = lx.linear_solve(op, jax.device_put(jnp.asarray(b), device),
                              solver=solver, throw=False)
        x = np.asarray(sol.value)
    except Exception as e:  # a refusal: AmgX's own message, or lineax-amgx's
        out.update(verdict="refused", message=_message(e))
        return out
    out["seconds"] = round(time.perf_counter() - t0, 3)
    res = float(np.linalg.norm(b.astype(complex) - a @ x.astype(complex))
                / np.linalg.norm(b))
    ok = sol.result == lx.RESULTS.successful
    out.update(
        verdict="converged" if ok else "accepted, not converged",
        iterations=int(sol.stats["num_steps"]),
        relative_residual=res,
        result=str(sol.result) if not ok else "successful",
    )
    return out


def _message(e: BaseException) -> str:
    text = str(e)
    keep = [line for line in text.splitlines() if line.strip()]
    # The native core's message: "AmgX <call> failed (error N: ...)" then what
    # AmgX printed; JAX prefixes its own lines.
    start = next((i for i, line in enumerate(keep) if "AmgX" in line), 0)
    text = " | ".join(keep[start:start + 6])
    return f"{type(e).__name__}: " + (text[:300] + " ..." if len(text) > 300 else text)


def _env(opt_in: bool) -> dict:
    """The environment of a combination's process: the opt-in set or unset."""
    env = dict(os.environ)
    env.pop(OPT_IN, None)
    if opt_in:
        env[OPT_IN] = "1"
    return env


def run_isolated(case: dict, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(case),
           "--size", str(args.size), "--backend", args.backend,
           "--max-steps", str(args.max_steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=args.timeout, env=_env(not args.without_opt_in))
    except subprocess.TimeoutExpired:
        return dict(case, verdict=f"timed out ({args.timeout} s)")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
    return dict(case, verdict=f"CRASHED (exit code {proc.returncode})",
                message=tail)


def _row(r: dict) -> str:
    its = r.get("iterations", "")
    res = r.get("relative_residual")
    res = f"{res:.2e}" if isinstance(res, float) else ""
    name = f"{r['problem']}{'' if r.get('block', 1) == 1 else ' (2x2 blocks)'}"
    line = (f"{name:<22} {r['mode']:<5} {r['solver']:<9} {r['precond']:<26} "
            f"{r['verdict']:<24} {its!s:>6} {res:>9}")
    if r.get("message"):
        line += f"\n{'':>4}{r['message']}"
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="amgx", choices=("amgx", "pyamg"))
    parser.add_argument("--size", type=int, default=100,
                        help="grid side (unknowns: size^2)")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds per combination (subprocess)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    parser.add_argument("--solvers", nargs="+",
                        default=sorted({s for v in PROBLEMS.values() for s in v}))
    parser.add_argument("--preconditioners", nargs="+", default=list(PRECONDITIONERS))
    parser.add_argument("--in-process", action="store_true",
                        help="run every combination in this process")
    parser.add_argument("--without-opt-in", action="store_true",
                        help=f"leave {OPT_IN} unset: lineax-amgx refuses every "
                        "complex combination on AmgX (what a user gets)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one), args.size, args.backend,
                                 args.max_steps)), flush=True)
        return
    todo = cases(args.problems, args.solvers, args.preconditioners)
    if args.in_process:  # (read when a solve is traced)
        os.environ.pop(OPT_IN, None)
        if not args.without_opt_in:
            os.environ[OPT_IN] = "1"
    opt_in = "unset" if args.without_opt_in else "=1"
    print(f"{len(todo)} combinations, backend {args.backend}, "
          f"{args.size}^2 unknowns, {OPT_IN} {opt_in}", flush=True)
    print(f"{'problem':<22} {'mode':<5} {'solver':<9} {'preconditioner':<26} "
          f"{'verdict':<24} {'iters':>6} {'residual':>9}")
    results = []
    for case in todo:
        r = (run_one(case, args.size, args.backend, args.max_steps)
             if args.in_process else run_isolated(case, args))
        results.append(r)
        print(_row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    crashed = [r for r in results if r["verdict"].startswith("CRASHED")]
    if crashed:
        print(f"\n{len(crashed)} combination(s) crashed the process (AmgX).")
        sys.exit(1)


if __name__ == "__main__":
    main()
