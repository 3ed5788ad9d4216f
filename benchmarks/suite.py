# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The benchmark suite: hard problems (`problems.py`) x every solver we can run.

For each problem, size and method: time to solution at `--rtol` (setup + solve,
and the solve alone with the setup cached), the iteration count and the true
relative residual `||b - A x||_2 / ||b||_2`, computed independently in float64 on
the host with scipy. Results are JSON lines appended to `--out`
(`docs/results/suite.jsonl`); `benchmarks/report.py` merges all of them (newest
per card, problem, size, method) into `docs/benchmarks.md`.

    python benchmarks/suite.py --smoke                       # CI: tiny, CPU, seconds
    python benchmarks/suite.py --sizes 1e4 1e5               # CPU sizes (pyamg backend)
    python benchmarks/suite.py --sizes 1e6 --methods default cands lx-cg-mf \\
        --device-budget 280                                 # a GPU subset
    python benchmarks/suite.py --list                        # problems, methods, groups

How it runs. The parent process never imports JAX. It generates the problems
ahead (a process pool, cached as .npz under `--cache-dir`, keyed by the source of
`problems.py`) and starts one worker process per size, which runs the methods in
order and streams results back. A method that exceeds `--timeout` (or the
remaining `--device-budget`) or crashes its worker is recorded as an error; the
worker is restarted on the remaining tasks, so a hang or crash never kills the
suite. A method whose time exceeds `--time-cap` at one size is skipped at larger
sizes of that problem. Entries already in `--out` for this card are skipped
(`--force` reruns them), so an interrupted run resumes where it stopped.

Methods (`--methods` takes names, fnmatch patterns and groups):

- `amgx:<PRESET>`: every preset in `lineax_amgx.configs` that fits the problem
  (PCG_* need SPD, *_BLOCK need a block matrix); `default` = the preset the
  operator's tags choose. `amgx:c-<name>`: candidate configs for tuning (below),
  applied to the tag's default preset. All through
  `lineax_amgx.AMGX(config, rtol=...)` (AmgX on a GPU; pyamg on a CPU).
- `lx-cg-{csr,mf}`, `lx-gmres-{csr,mf}`, `lx-bicgstab-{csr,mf}`: Lineax's Krylov
  solvers, jitted, on the `CSROperator` or on a matrix-free stencil apply
  (slicing). CG for SPD problems, GMRES/BiCGStab for non-symmetric ones. Their
  norm is the RMS norm, so with b = ones their criterion is the same relative
  2-norm residual as AMGX's.
- `cupy-cg`, `cupy-gmres` (GPU): `cupyx.scipy.sparse.linalg` on the CSR matrix.
- `jax-spsolve` (GPU, n <= 2e5): `jax.experimental.sparse.linalg.spsolve`.
- `pyamg-sa`, `scipy-splu` (CPU): pyamg's smoothed aggregation with CG/GMRES
  called directly (the overhead of our CPU path), and SuperLU (n <= 5e4).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import fnmatch
import hashlib
import json
import math
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))  # the checkout, after an installed package

import problems as P  # noqa: E402

DEFAULT_OUT = os.path.normpath(
    os.path.join(HERE, "..", "docs", "results", "suite.jsonl")
)
SUITE_VERSION = 1

# -----------------------------------------------------------------------------
# Candidate AmgX configurations for tuning. Each is a set of overrides of the
# AMG scope (the preconditioner) of the preset the problem's tags choose
# (PCG_AGGREGATION / FGMRES_AGGREGATION / *_BLOCK), plus optional solver-level
# options (precision). The SIZE_n selectors are indistinguishable on the CPU
# (pyamg has one standard aggregation), so the CPU runs can only rank smoothers,
# sweeps, cycles and coarse-grid settings.
# -----------------------------------------------------------------------------

_JACOBI = {"scope": "jacobi", "solver": "BLOCK_JACOBI", "relaxation_factor": 0.8,
           "monitor_residual": 0, "print_solve_stats": 0}

CANDIDATES: dict[str, tuple[str, dict, dict]] = {
    # name: (description, AMG-scope overrides, AMGX(...) keyword arguments)
    "sz2": ("SIZE_2 selector (AmgX's PCG_AGGREGATION_JACOBI)",
            {"selector": "SIZE_2"}, {}),
    "sz4": ("SIZE_4 selector", {"selector": "SIZE_4"}, {}),
    "sz8": ("SIZE_8 selector", {"selector": "SIZE_8"}, {}),
    "mpw": ("MULTI_PAIRWISE selector", {"selector": "MULTI_PAIRWISE"}, {}),
    "j11": ("Jacobi 1+1 sweeps",
            {"smoother": _JACOBI, "presweeps": 1, "postsweeps": 1}, {}),
    "j33": ("Jacobi 3+3 sweeps",
            {"smoother": _JACOBI, "presweeps": 3, "postsweeps": 3}, {}),
    "l1j": ("L1-Jacobi 2+2 sweeps",
            {"smoother": {"scope": "l1", "solver": "JACOBI_L1"},
             "presweeps": 2, "postsweeps": 2}, {}),
    "mcgs": ("multicolour symmetric Gauss-Seidel 1+1",
             {"smoother": {"scope": "gs", "solver": "MULTICOLOR_GS",
                           "symmetric_GS": 1, "relaxation_factor": 1.0},
              "presweeps": 1, "postsweeps": 1}, {}),
    "dilu": ("multicolour DILU 1+1",
             {"smoother": {"scope": "dilu", "solver": "MULTICOLOR_DILU"},
              "presweeps": 1, "postsweeps": 1}, {}),
    "cheb": ("Chebyshev polynomial (order 2) 1+1",
             {"smoother": {"scope": "cheb", "solver": "CHEBYSHEV_POLY",
                           "chebyshev_polynomial_order": 2},
              "presweeps": 1, "postsweeps": 1}, {}),
    "W": ("W-cycle", {"cycle": "W"}, {}),
    "F": ("F-cycle", {"cycle": "F"}, {}),
    "lu-big": ("coarsest >= 512 rows, dense LU up to 2048 rows",
               {"min_coarse_rows": 512, "dense_lu_num_rows": 2048}, {}),
    "lu-small": ("coarsen to 2 rows, dense LU up to 64, 50 levels",
                 {"min_coarse_rows": 2, "dense_lu_num_rows": 64, "max_levels": 50},
                 {}),
    "mixed": ("float32 hierarchy, float64 vectors (precision='mixed')", {},
              {"precision": "mixed"}),
    "kcycle": ("K-cycle (cycle CGF) with flexible CG/FGMRES outside",
               {"cycle": "CGF"}, {"_outer": "flexible"}),
    "sz2-mcgs": ("SIZE_2 + multicolour symmetric GS 1+1",
                 {"selector": "SIZE_2",
                  "smoother": {"scope": "gs", "solver": "MULTICOLOR_GS",
                               "symmetric_GS": 1, "relaxation_factor": 1.0},
                  "presweeps": 1, "postsweeps": 1}, {}),
    "sz4-l1j": ("SIZE_4 + L1-Jacobi 2+2",
                {"selector": "SIZE_4",
                 "smoother": {"scope": "l1", "solver": "JACOBI_L1"},
                 "presweeps": 2, "postsweeps": 2}, {}),
}

# Presets as methods (AMG_VCYCLE is one cycle: a preconditioner, not a solver).
PRESETS = [
    "PCG_AGGREGATION", "FGMRES_AGGREGATION", "PBICGSTAB_AGGREGATION",
    "GMRES_AGGREGATION", "AMG_AGGREGATION", "PCG_CLASSICAL",
    "PCG_AGGREGATION_BLOCK", "FGMRES_AGGREGATION_BLOCK", "PCG_AGGREGATION_ISOTROPIC",
]
LINEAX = [f"lx-{k}-{o}" for k in ("cg", "gmres", "bicgstab") for o in ("mf", "csr")]
OTHERS = ["cupy-cg", "cupy-gmres", "jax-spsolve", "pyamg-sa", "scipy-splu"]
METHODS = (["amgx:default"] + [f"amgx:{p}" for p in PRESETS]
           + [f"amgx:c-{c}" for c in CANDIDATES] + LINEAX + OTHERS)
GROUPS = {
    "default": ["amgx:default"],
    "presets": [f"amgx:{p}" for p in PRESETS],
    "cands": [f"amgx:c-{c}" for c in CANDIDATES],
    "lineax": LINEAX,
    "gpu": ["cupy-cg", "cupy-gmres", "jax-spsolve"],
    "cpu": ["pyamg-sa", "scipy-splu"],
    "all": METHODS,
}
# Sizes above which a method is not attempted at all.
SIZE_LIMITS = {"jax-spsolve": 200_000, "scipy-splu": 50_000}


def default_preset(tag: str, block: int) -> str:
    """The preset `config="auto"` picks from the tags and block size alone
    (lineax_amgx._auto.choose without values; kept here: the parent has no JAX).
    The base of the candidates."""
    if block > 1:
        return "PCG_AGGREGATION_BLOCK" if tag == "spd" else "FGMRES_AGGREGATION_BLOCK"
    return "PCG_AGGREGATION" if tag == "spd" else "FGMRES_AGGREGATION"


def applies(method: str, tag: str, block: int, platform: str, n: int,
            stencil: bool = True) -> str | None:
    """None if `method` fits the problem and platform, else the reason it doesn't."""
    if n > SIZE_LIMITS.get(method, math.inf):
        return f"n > {SIZE_LIMITS[method]}"
    if method.startswith("amgx:") and not method.startswith("amgx:c-"):
        name = method[5:]
        if name.startswith("PCG") and tag != "spd":
            return "needs SPD"
        if name.endswith("_BLOCK") and block == 1:
            return "block preset"
        return None
    if method.startswith("lx-"):
        kind, op = method.split("-")[1:]
        if op == "mf" and (block > 1 or not stencil):
            return "no matrix-free form"
        if (kind == "cg") != (tag == "spd"):
            return "CG for SPD, GMRES/BiCGStab for non-symmetric"
        return None
    if method in ("cupy-cg", "cupy-gmres", "jax-spsolve") and platform != "gpu":
        return "GPU only"
    if method in ("pyamg-sa", "scipy-splu") and platform != "cpu":
        return "CPU only"
    if method == "cupy-cg" and tag != "spd":
        return "needs SPD"
    if method == "cupy-gmres" and tag == "spd":
        return "non-symmetric only"
    return None


def expand_methods(specs: list[str]) -> list[str]:
    out: list[str] = []
    for spec in specs:
        if spec in GROUPS:
            names = GROUPS[spec]
        else:
            names = [m for m in METHODS if fnmatch.fnmatchcase(m, spec)]
            if not names:
                raise SystemExit(
                    f"--methods: {spec!r} matches no method; see --list."
                )
        out += [m for m in names if m not in out]
    return out


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 10**3, "m": 10**6}.get(s[-1:], 1)
    if mult != 1:
        s = s[:-1]
    return int(round(float(s) * mult))


# -----------------------------------------------------------------------------
# The worker: runs methods, prints @@-prefixed JSON lines on stdout.
# -----------------------------------------------------------------------------


def _emit(kind: str, payload) -> None:
    sys.stdout.write(f"@@{kind} {json.dumps(payload, default=_json_default)}\n")
    sys.stdout.flush()


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class _Ctx:
    def __init__(self, args):
        self.rtol = args["rtol"]
        self.repeats = args["repeats"]
        self.repeat_budget = args["repeat_budget"]
        self.max_steps = args["max_steps"]
        self.backend = args["backend"]


def _timed(fn):
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def _measure(ctx, setup, solve):
    """Warm up (compile) once, then time `setup()` and `solve(state)` repeatedly.
    Returns (first_call_s, setups, solves, last_solution)."""
    t_s, state = _timed(setup)
    t_v, sol = _timed(lambda: solve(state))
    first = t_s + t_v
    setups, solves = [], []
    spent = 0.0
    for _ in range(ctx.repeats):
        if spent > ctx.repeat_budget:
            break
        t_s, state = _timed(setup)
        t_v, sol = _timed(lambda: solve(state))
        setups.append(t_s)
        solves.append(t_v)
        spent += t_s + t_v
    return first, setups, solves, sol


def _status(result) -> str:
    import lineax as lx

    for name in ("successful", "max_steps_reached", "breakdown", "nonfinite_input",
                 "stagnation"):
        member = getattr(lx.RESULTS, name, None)
        if member is not None and bool(result == member):
            return name
    return "failed"


def _tags(p):
    import lineax as lx

    return (lx.symmetric_tag, lx.positive_semidefinite_tag) if p.tag == "spd" else ()


def amgx_config(method: str, p):
    """(config or None, AMGX keyword arguments, resolved preset/candidate name)."""
    import lineax_amgx as lxa

    name = method[5:]
    if name == "default":
        # What config="auto" picks for this matrix (its values are NumPy here).
        return None, {}, auto_preset(p)
    if name.startswith("c-"):
        _, over, kwargs = CANDIDATES[name[2:]]
        kwargs = dict(kwargs)
        cfg = lxa.configs[default_preset(p.tag, p.block_size)]
        cfg["solver"]["preconditioner"].update(copy.deepcopy(over))
        outer = cfg["solver"]
        if kwargs.pop("_outer", None) == "flexible" and outer["solver"] == "PCG":
            outer["solver"] = "PCGF"  # a non-linear (K-cycle) preconditioner
        return cfg, kwargs, name
    return name, {}, name


_AUTO: dict = {}


def auto_preset(p) -> str:
    """The preset `lineax_amgx.AMGX()` (config="auto") uses for problem `p`
    (once per problem and size)."""
    key = (p.name, p.n)
    if key not in _AUTO:
        import lineax_amgx as lxa
        from lineax_amgx import _auto

        op = lxa.CSROperator.from_scipy(p.A, tags=_tags(p))
        spd = p.tag == "spd"
        _AUTO.clear()
        _AUTO[key] = _auto.resolve(spd, spd, op).preset
    return _AUTO[key]


def run_amgx(ctx, p, method):
    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np

    import lineax_amgx as lxa

    cfg, kwargs, _ = amgx_config(method, p)
    solver = lxa.AMGX(cfg, rtol=ctx.rtol, backend=ctx.backend, **kwargs)
    op = lxa.CSROperator.from_scipy(p.A, tags=_tags(p))
    b = jnp.asarray(p.b)
    init = jax.jit(lambda o: solver.init(o, {}))
    solve = jax.jit(
        lambda o, v, s: lx.linear_solve(o, v, solver=solver, state=s, throw=False)
    )
    on_gpu = jax.default_backend() == "gpu" and ctx.backend != "pyamg"

    def setup():
        lxa.clear_cache()
        return init(op)

    first, setups, solves, sol = _measure(ctx, setup, lambda s: solve(op, b, s))
    extra = {}
    if on_gpu:
        from _common import amgx_entry

        e = amgx_entry()
        extra["amgx_solve_s"] = e.get("last_solve_seconds")
        # AmgX's own full-setup time: one more cold setup.
        jax.block_until_ready(setup())
        extra["amgx_setup_s"] = amgx_entry().get("last_setup_seconds")
        # Resetup: new values with the setup resident (a Newton step).
        op2 = op.with_values(op.values * (1 + 1e-3))
        jax.block_until_ready(op2.values)
        t, _ = _timed(lambda: init(op2))
        extra["resetup_s"] = t
        extra["amgx_resetup_s"] = amgx_entry().get("last_setup_seconds")
        extra["gpu_bytes"] = next(
            (v for k, v in amgx_entry().items() if "bytes" in k), None
        )
    lxa.clear_cache()
    return dict(
        first_call_s=first, setup_s=statistics.median(setups) if setups else None,
        solve_s=statistics.median(solves) if solves else None,
        total_s=(statistics.median([a + c for a, c in zip(setups, solves)])
                 if setups else None),
        iterations=int(sol.stats["num_steps"]), status=_status(sol.result),
        x=np.asarray(sol.value), repeats=len(setups), **extra,
    )


def _rms(tree):
    import jax
    import jax.numpy as jnp

    leaves = jax.tree_util.tree_leaves(tree)
    sq = sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves)
    size = sum(x.size for x in leaves)
    return jnp.sqrt(sq / size)


def run_lineax(ctx, p, method):
    import functools as ft

    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np

    import lineax_amgx as lxa

    kind, form = method.split("-")[1:]
    steps = ctx.max_steps
    solver = {
        "cg": lambda: lx.CG(rtol=ctx.rtol, atol=0.0, norm=_rms, max_steps=steps),
        # Lineax's GMRES counts restart cycles (of 50 iterations) as steps.
        "gmres": lambda: lx.GMRES(rtol=ctx.rtol, atol=0.0, norm=_rms,
                                  max_steps=max(1, steps // 50), restart=50),
        "bicgstab": lambda: lx.BiCGStab(rtol=ctx.rtol, atol=0.0, norm=_rms,
                                        max_steps=steps),
    }[kind]()
    b = jnp.asarray(p.b)
    tags = _tags(p)
    if form == "csr":
        data = lxa.CSROperator.from_scipy(p.A, tags=tags)

        def make(d):
            return d
    else:
        apply, data = P.stencil_apply(*p.stencil)
        struct = jax.ShapeDtypeStruct((p.n,), jnp.float64)

        def make(d):
            return lx.FunctionLinearOperator(ft.partial(apply, d), struct, tags)

    @jax.jit
    def f(d, v):
        sol = lx.linear_solve(make(d), v, solver=solver, throw=False)
        return sol.value, sol.result, sol.stats["num_steps"]

    first, _, solves, (x, result, its) = _measure(
        ctx, lambda: None, lambda _: f(data, b)
    )
    return dict(
        first_call_s=first, setup_s=None,
        solve_s=statistics.median(solves) if solves else None,
        total_s=statistics.median(solves) if solves else None,
        iterations=int(its) * (50 if kind == "gmres" else 1),
        status=_status(result), x=np.asarray(x), repeats=len(solves),
    )


def run_cupy(ctx, p, method):
    import inspect

    import cupy as cp
    import cupyx.scipy.sparse as csp
    import cupyx.scipy.sparse.linalg as cla

    a = p.A.tocsr() if p.A.format == "bsr" else p.A
    t0 = time.perf_counter()
    A = csp.csr_matrix((cp.asarray(a.data), cp.asarray(a.indices),
                        cp.asarray(a.indptr)), shape=a.shape)
    b = cp.asarray(p.b)
    cp.cuda.Device().synchronize()
    transfer = time.perf_counter() - t0
    fn = cla.cg if method == "cupy-cg" else cla.gmres
    params = inspect.signature(fn).parameters
    kw = {"rtol" if "rtol" in params else "tol": ctx.rtol, "atol": 0.0,
          "maxiter": ctx.max_steps}
    if method == "cupy-gmres":
        kw["restart"] = 50  # maxiter counts inner iterations; callback per restart
    count = [0]

    def cb(_):
        count[0] += 1

    def once():
        count[0] = 0
        t = time.perf_counter()
        x, info = fn(A, b, callback=cb, **kw)
        cp.cuda.Device().synchronize()
        return time.perf_counter() - t, x, info

    first, x, info = once()
    times = []
    spent = 0.0
    for _ in range(ctx.repeats):
        if spent > ctx.repeat_budget:
            break
        t, x, info = once()
        times.append(t)
        spent += t
    its = count[0] * (50 if method == "cupy-gmres" else 1)
    return dict(
        first_call_s=first, setup_s=None, transfer_s=transfer,
        solve_s=statistics.median(times) if times else None,
        total_s=statistics.median(times) if times else None,
        iterations=its, status="successful" if info == 0 else f"info={info}",
        x=cp.asnumpy(x), repeats=len(times),
    )


def run_spsolve(ctx, p, method):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.sparse.linalg import spsolve

    a = p.A.tocsr() if p.A.format == "bsr" else p.A
    data, indices, indptr = (jnp.asarray(a.data), jnp.asarray(a.indices),
                             jnp.asarray(a.indptr))
    b = jnp.asarray(p.b)
    f = jax.jit(lambda d, v: spsolve(d, indices, indptr, v, tol=0.0, reorder=1))
    first, _, solves, x = _measure(ctx, lambda: None, lambda _: f(data, b))
    return dict(first_call_s=first, setup_s=None,
                solve_s=statistics.median(solves) if solves else None,
                total_s=statistics.median(solves) if solves else None,
                iterations=None, status="successful", x=np.asarray(x),
                repeats=len(solves))


def run_pyamg(ctx, p, method):
    import numpy as np
    import pyamg

    sym = "hermitian" if p.tag == "spd" else "nonsymmetric"
    res: list = []

    def setup():
        t = time.perf_counter()
        ml = pyamg.smoothed_aggregation_solver(p.A, symmetry=sym)
        return time.perf_counter() - t, ml

    def solve(ml):
        res.clear()
        t = time.perf_counter()
        x = ml.solve(p.b, tol=ctx.rtol, maxiter=ctx.max_steps, residuals=res,
                     accel="cg" if p.tag == "spd" else "fgmres")
        return time.perf_counter() - t, x

    t_s, ml = setup()
    t_v, x = solve(ml)
    first = t_s + t_v
    setups, solves = [], []
    for _ in range(ctx.repeats):
        if sum(setups) + sum(solves) > ctx.repeat_budget:
            break
        t_s, ml = setup()
        t_v, x = solve(ml)
        setups.append(t_s)
        solves.append(t_v)
    return dict(first_call_s=first, setup_s=statistics.median(setups),
                solve_s=statistics.median(solves),
                total_s=statistics.median([a + c for a, c in zip(setups, solves)]),
                iterations=len(res) - 1, status="successful", x=np.asarray(x),
                repeats=len(setups), levels=len(ml.levels))


def run_splu(ctx, p, method):
    import scipy.sparse.linalg as sla

    a = p.A.tocsc()
    t = time.perf_counter()
    lu = sla.splu(a)
    t_s = time.perf_counter() - t
    t = time.perf_counter()
    x = lu.solve(p.b)
    t_v = time.perf_counter() - t
    return dict(first_call_s=t_s + t_v, setup_s=t_s, solve_s=t_v, total_s=t_s + t_v,
                iterations=None, status="successful", x=x, repeats=1)


def _runner(method):
    if method.startswith("amgx:"):
        return run_amgx
    if method.startswith("lx-"):
        return run_lineax
    return {"cupy-cg": run_cupy, "cupy-gmres": run_cupy, "jax-spsolve": run_spsolve,
            "pyamg-sa": run_pyamg, "scipy-splu": run_splu}[method]


def _wait_problem(cache_dir, name, size):
    path = cache_path(cache_dir, name, size)
    while not os.path.exists(path):
        if os.path.exists(path + ".err"):
            with open(path + ".err") as f:
                raise RuntimeError(f"generating {name} at {size}: {f.read()}")
        time.sleep(0.1)
    return P.load(path)


def worker_main() -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    spec = json.loads(sys.stdin.read())
    import warnings

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    warnings.filterwarnings("ignore")
    from _common import device_name

    platform = jax.default_backend()
    card = device_name()
    _emit("HELLO", {"card": card, "platform": platform, "jax": jax.__version__})
    ctx = _Ctx(spec)
    done = {tuple(k) for k in spec["done"]}
    loaded = {}
    seen_configs: dict = {}
    for task in spec["tasks"]:
        name, size, method = task["problem"], task["size"], task["method"]
        try:
            if (name, size) not in loaded:
                _emit("LOADING", task)
                loaded.clear()
                loaded[(name, size)] = _wait_problem(spec["cache_dir"], name, size)
            p = loaded[(name, size)]
        except Exception:
            _emit("INTERNAL", {**task, "error": traceback.format_exc()})
            continue
        why = applies(method, p.tag, p.block_size, platform, p.n,
                      p.stencil is not None)
        resolved = method
        if why is None and method.startswith("amgx:"):
            cfg, kwargs, resolved_name = amgx_config(method, p)
            resolved = "amgx:" + resolved_name
            # A candidate that changes nothing here (e.g. SIZE_2 on a block preset).
            import lineax_amgx as lxa

            base = resolved_name if cfg is None else cfg
            sig = json.dumps([lxa.configs[base] if isinstance(base, str) else base,
                              kwargs], sort_keys=True, default=str)
            if (name, size, sig) in seen_configs:
                why = f"same config as {seen_configs[(name, size, sig)]}"
            else:
                seen_configs[(name, size, sig)] = resolved
        if why is None and method == "amgx:default" and any(
            t["method"] == resolved and t["problem"] == name and t["size"] == size
            for t in spec["tasks"]
        ):
            why = "duplicate of an explicit preset"
        if why is None and (card, name, size, resolved) in done:
            why = "already in the results (use --force)"
        if why is not None:
            _emit("SKIP", {**task, "reason": why})
            continue
        _emit("START", {**task, "resolved": resolved})
        t_method = time.perf_counter()
        rec = {"suite": SUITE_VERSION, "problem": name, "size": size, "n": p.n,
               "nnz": int(p.A.nnz), "block_size": p.block_size, "tag": p.tag,
               "method": resolved, "rtol": ctx.rtol, "card": card,
               "platform": platform, "description": p.description,
               "jax": jax.__version__, "host": socket.gethostname()}
        if method == "amgx:default" or (
            method.startswith("amgx:")
            and resolved[5:] == auto_preset(p)
        ):
            rec["default"] = True
        if resolved.startswith("amgx:"):
            rec["backend"] = "amgx" if platform == "gpu" and ctx.backend != "pyamg" \
                else "pyamg"
        try:
            out = _runner(method)(ctx, p, method)
            x = out.pop("x")
            r = p.b - p.A @ np.asarray(x, dtype=np.float64)
            rel = float(np.linalg.norm(r) / np.linalg.norm(p.b))
            out["rel_residual"] = rel
            out["converged"] = bool(math.isfinite(rel) and rel <= 10 * ctx.rtol)
            rec.update({k: _clean(v) for k, v in out.items()})
        except Exception as e:  # a method failing is a result, not a crash
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            rec["traceback"] = traceback.format_exc()[-4000:]
        rec["wall_s"] = time.perf_counter() - t_method
        _emit("RESULT", rec)
    return 0


# -----------------------------------------------------------------------------
# The parent: generation, scheduling, timeouts, budget, resume.
# -----------------------------------------------------------------------------


def _problems_digest() -> str:
    with open(os.path.join(HERE, "problems.py"), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:10]


def cache_path(cache_dir, name, size) -> str:
    return os.path.join(cache_dir, f"{name}-{size}.npz")


def _generate(cache_dir, name, size) -> float:
    path = cache_path(cache_dir, name, size)
    if os.path.exists(path):
        return 0.0
    t = time.perf_counter()
    try:
        P.save(P.make(name, size), path)
    except Exception:
        with open(path + ".err", "w") as f:
            f.write(traceback.format_exc())
        raise
    return time.perf_counter() - t


def _load_done(out: str | None) -> list:
    done = []
    if out and os.path.exists(out):
        with open(out) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("suite") and "error" not in r:
                    done.append((r.get("card"), r["problem"], r["size"], r["method"]))
    return done


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a worker started with `start_new_session=True` and what it started
    (its process group), and reap it."""
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class _Worker:
    """A worker process with a line reader thread."""

    def __init__(self, spec: dict, env: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, env=env, cwd=HERE, start_new_session=True,
        )
        self.proc.stdin.write(json.dumps(spec))
        self.proc.stdin.close()
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                kind, _, payload = line[2:].partition(" ")
                self.lines.put((kind, json.loads(payload)))
            else:
                sys.stdout.write(line)
        self.lines.put(("EOF", None))

    def kill(self):
        kill_group(self.proc)

    def stderr_tail(self, n=3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-n:]


def _fmt(v, unit="s"):
    return "-" if v is None else f"{v:.3g}{unit}"


def run_suite(args) -> int:
    t_start = time.monotonic()
    budget_end = t_start + args.device_budget if args.device_budget else math.inf
    names = args.problems or list(P.PROBLEMS)
    for n in names:
        if n not in P.PROBLEMS:
            raise SystemExit(f"--problems: unknown {n!r}; known: {list(P.PROBLEMS)}")
    methods = expand_methods(args.methods)
    sizes = sorted(parse_size(s) for s in args.sizes)
    cache_dir = os.path.join(args.cache_dir, _problems_digest())
    os.makedirs(cache_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    pool = cf.ProcessPoolExecutor(args.gen_workers) if args.gen_workers else None
    gen_jobs = {}
    if pool:
        for size in sizes:
            for name in names:
                gen_jobs[(name, size)] = pool.submit(_generate, cache_dir, name, size)
    done = [] if args.force else _load_done(args.out)
    slow: set = set()  # (problem, method) over the time cap
    n_results = n_errors = n_internal = 0
    out_f = open(args.out, "a") if args.out else None  # noqa: SIM115
    card = "?"
    stopped = False
    try:
        for size in sizes:
            if time.monotonic() > budget_end:
                stopped = True
                break
            tasks = [{"problem": n, "size": size, "method": m}
                     for n in names for m in methods if (n, m) not in slow]
            if not pool:
                for name in names:
                    t = _generate(cache_dir, name, size)
                    if t > 1:
                        print(f"# generated {name} at {size} in {t:.1f}s", flush=True)
            while tasks and not stopped:
                spec = dict(tasks=tasks, done=done, cache_dir=cache_dir,
                            rtol=args.rtol, repeats=args.repeats,
                            repeat_budget=args.repeat_budget,
                            max_steps=args.max_steps, backend=args.backend)
                w = _Worker(spec, env)
                current, deadline = None, budget_end
                remaining = list(tasks)
                while True:
                    wait = max(0.05, min(1.0, deadline - time.monotonic()))
                    try:
                        kind, msg = w.lines.get(timeout=wait)
                    except queue.Empty:
                        if time.monotonic() < deadline:
                            continue
                        w.kill()
                        if current is None or time.monotonic() >= budget_end:
                            stopped = True
                            print("# device budget spent: stopping", flush=True)
                            if current is not None:
                                remaining.pop(0)
                            break
                        rec = {"suite": SUITE_VERSION, **current, "card": card,
                               "rtol": args.rtol,
                               "error": f"timeout after {args.timeout:g}s"}
                        rec["method"] = rec.pop("resolved", rec["method"])
                        print(f"{current['problem']:>20} {current['resolved']:<28}"
                              f" TIMEOUT", flush=True)
                        _write(out_f, rec)
                        slow.add((current["problem"], current["method"]))
                        n_errors += 1
                        remaining.pop(0)
                        break
                    if kind == "HELLO":
                        card = msg["card"]
                    elif kind in ("SKIP", "LOADING"):
                        if kind == "SKIP":
                            remaining.pop(0)
                            if args.verbose:
                                print(f"# skip {msg['problem']} {msg['method']}: "
                                      f"{msg['reason']}", flush=True)
                    elif kind == "START":
                        current = msg
                        deadline = min(budget_end, time.monotonic() + args.timeout)
                    elif kind == "RESULT":
                        task_method = current["method"] if current else msg["method"]
                        current, deadline = None, budget_end
                        remaining.pop(0)
                        msg.pop("resolved", None)
                        _write(out_f, {**msg, "size": size})
                        n_results += 1
                        if "error" in msg:
                            n_errors += 1
                            print(f"{msg['problem']:>20} {msg['method']:<28} ERROR "
                                  f"{msg['error'][:200]}", flush=True)
                        else:
                            print(f"{msg['problem']:>20} {msg['method']:<28} "
                                  f"n={msg['n']:<8} setup={_fmt(msg.get('setup_s'))}"
                                  f" solve={_fmt(msg.get('solve_s'))} "
                                  f"total={_fmt(msg.get('total_s'))} "
                                  f"it={msg.get('iterations')} "
                                  f"res={_fmt(msg.get('rel_residual'), '')} "
                                  f"{msg.get('status')}", flush=True)
                            total = msg.get("total_s") or msg.get("first_call_s")
                            if total is not None and total > args.time_cap:
                                slow.add((msg["problem"], task_method))
                    elif kind == "INTERNAL":
                        n_internal += 1
                        remaining.pop(0)
                        print(f"# INTERNAL ERROR {msg['problem']} {msg['method']}:\n"
                              f"{msg['error']}", flush=True)
                    elif kind == "EOF":
                        w.proc.wait()
                        if current is not None:  # it died inside a method
                            rec = {"suite": SUITE_VERSION, **current, "card": card,
                                   "rtol": args.rtol,
                                   "error": f"worker died (rc={w.proc.returncode}): "
                                            + w.stderr_tail(800)}
                            rec["method"] = rec.pop("resolved", rec["method"])
                            print(f"{current['problem']:>20} {rec['method']:<28} "
                                  f"CRASH rc={w.proc.returncode}", flush=True)
                            _write(out_f, rec)
                            n_errors += 1
                            remaining.pop(0)
                        elif w.proc.returncode != 0:
                            n_internal += 1
                            print("# INTERNAL ERROR: worker exited with "
                                  f"{w.proc.returncode}:\n{w.stderr_tail()}",
                                  flush=True)
                            remaining = []
                        break
                tasks = [t for t in remaining
                         if (t["problem"], t["method"]) not in slow]
    finally:
        if out_f:
            out_f.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    elapsed = time.monotonic() - t_start
    print(f"# {n_results} results, {n_errors} method errors, {n_internal} internal "
          f"errors, {elapsed:.0f}s{' (stopped by the budget)' if stopped else ''}",
          flush=True)
    if n_internal or (args.strict and n_errors):
        return 1
    return 0


def _write(f, rec):
    if f is None:
        return
    rec = dict(rec)
    rec.pop("resolved", None)
    rec.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    f.write(json.dumps(rec) + "\n")
    f.flush()


def _check_generators() -> None:
    """Every generator at a tiny size: shapes, finiteness, symmetry of SPD ones."""
    import numpy as np

    for name in P.PROBLEMS:
        p = P.make(name, 300)
        a = p.A.tocsr()
        assert a.shape == (p.n, p.n) and p.b.shape == (p.n,), name
        assert np.all(np.isfinite(a.data)), name
        if p.tag == "spd":
            assert abs(a - a.T).max() <= 1e-12 * abs(a).max(), name


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return worker_main()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--problems", nargs="+", help="problem names (default: all)")
    ap.add_argument("--methods", nargs="+", default=["all"],
                    help="method names, fnmatch patterns or groups (default: all)")
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="target unknowns, e.g. 1e4 100k 1M (default: 1e6 with a "
                         "GPU, else 1e4 1e5)")
    ap.add_argument("--rtol", type=float, default=1e-8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeat-budget", type=float, default=3.0,
                    help="stop repeating a measurement after this many seconds")
    ap.add_argument("--max-steps", type=int, default=20000,
                    help="iteration cap of the unpreconditioned Krylov methods")
    ap.add_argument("--time-cap", type=float, default=20.0,
                    help="skip a method at larger sizes once it takes this long")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds one method may run (compile, warm-up, repeats)")
    ap.add_argument("--device-budget", type=float, default=None,
                    help="stop the whole suite after this many seconds")
    ap.add_argument("--backend", default="auto", choices=["auto", "amgx", "pyamg"])
    ap.add_argument("--cpu", action="store_true", help="force JAX onto the CPU")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="JSON lines file to append to ('' for none)")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                        "lineax_amgx_suite"))
    ap.add_argument("--gen-workers", type=int, default=None,
                    help="processes generating problems ahead (default: 4 with >= 8 "
                         "cores, else 0 = generate before each size)")
    ap.add_argument("--force", action="store_true",
                    help="rerun entries already in --out for this card")
    ap.add_argument("--strict", action="store_true",
                    help="exit non-zero when any method errors (not when slow)")
    ap.add_argument("--no-report", action="store_true",
                    help="do not regenerate docs/benchmarks.md afterwards")
    ap.add_argument("--smoke", action="store_true",
                    help="CI mode: tiny sizes, CPU, pyamg + Lineax CG, no files")
    ap.add_argument("--list", action="store_true", help="list problems and methods")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("problems:", " ".join(P.PROBLEMS))
        print("methods:", " ".join(METHODS))
        for g, ms in GROUPS.items():
            print(f"group {g}:", " ".join(ms))
        for c, (d, _, _) in CANDIDATES.items():
            print(f"  amgx:c-{c}: {d}")
        return 0
    has_gpu = shutil.which("nvidia-smi") is not None and not args.cpu
    tmp = None
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="suite-smoke-")
        args.sizes = args.sizes or ["1000"]
        if args.methods == ["all"]:
            args.methods = ["default", "lx-cg-mf", "lx-bicgstab-mf", "pyamg-sa"]
        if not args.problems:
            args.problems = ["poisson3d", "elasticity3d-bsr", "convdiff3d", "fem2d"]
        _check_generators()
        args.cpu, args.backend, args.strict, args.force = True, "pyamg", True, True
        args.out = os.path.join(tmp, "suite.jsonl")
        args.repeats, args.max_steps = 1, 5000
        args.cache_dir = os.path.join(tmp, "cache")
    if args.sizes is None:
        args.sizes = ["1e6"] if has_gpu else ["1e4", "1e5"]
    if args.gen_workers is None:
        args.gen_workers = 4 if (os.cpu_count() or 1) >= 8 else 0
    if args.out:
        args.out = os.path.abspath(args.out)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rc = run_suite(args)
    if args.out and not args.no_report:
        import report

        if args.smoke:
            rc = rc or report.main(["--inputs", args.out,
                                    "--markdown", os.path.join(tmp, "benchmarks.md"),
                                    "--figures", tmp])
        else:
            rc = rc or report.main(["--inputs", args.out])
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
