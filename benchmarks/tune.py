# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Tuning sweep of AmgX's knobs (issue 26), in one device call of a few minutes.

Sections (run in this order of priority; `--device-budget` seconds in all):

- `a` easy 3-D Poisson (`problems.poisson3d`), rtol `--rtol` (1e-6): for every
  variant (`VARIANTS`, overrides of the AMG scope of the tag's preset) the solve
  with the setup cached (median), a cold setup, a resetup, iterations, the true
  residual; and matrix-free `lx.CG` (`lx-cg-mf`) in the same run. First size of
  `--sizes` with every variant, later sizes with `--large-variants` (`@topK`: the
  K fastest converged variants of the first size).
- `b` one V-cycle per variant at the first size (`AMGXPreconditioner`, jitted
  `P.mv`, median, and AmgX's own cycle time); AmgX's hierarchy (`verbose`:
  `print_grid_stats`, `obtain_timings`) captured to `gridstats-*.txt` for
  `--gridstats-variants`.
- `c` a sequence of `--seq-steps` (10) solves with changed values (`S_k A S_k`, a
  random positive diagonal `S_k` per step: resetup + solve each) for the
  `--seq-variants` (`structure_reuse_levels`) and `lx-cg-mf`, after one warm-up.
- `d` the suite's hard problems at `--hard-size` (rtol `--hard-rtol`, 1e-8, as
  the suite) with `--hard-variants`.

Every AmgX configuration is built from the package's presets (`lxa.configs`) and
validated by the package's own parser (`lineax_amgx._config.resolve`) before
anything runs, so a misspelt key fails on the CPU. One JSON line per measurement
goes to `OUT/tune.jsonl` (`skipped` lines say what did not fit the budget);
a summary is printed at the end.

    python benchmarks/tune.py --out /tmp/tune --device-budget 330        # H200
    python benchmarks/tune.py --cpu-smoke --out /tmp/tune-smoke          # CPU, tiny

How it runs: the parent starts one worker process (this file, `--worker`) and
hands it one task at a time; a task that crashes the worker (a lost CUDA context)
or exceeds its timeout is recorded as an error and the worker restarted. Tasks
that no longer fit the remaining budget (their estimated cost) are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from suite import _timed, default_preset, kill_group  # noqa: E402 (after the path)

# -----------------------------------------------------------------------------
# Variants: (description, AMG-scope overrides, AMGX keyword arguments). An
# `outer` entry of the overrides changes the outer solver of a PCG preset.
# -----------------------------------------------------------------------------

def _jacobi(w=0.8):
    return {"scope": "jacobi", "solver": "BLOCK_JACOBI", "relaxation_factor": w,
            "monitor_residual": 0, "print_solve_stats": 0}


_MCGS = {"scope": "gs", "solver": "MULTICOLOR_GS", "symmetric_GS": 1,
         "relaxation_factor": 1.0}
_DILU = {"scope": "dilu", "solver": "MULTICOLOR_DILU", "monitor_residual": 0}
_L1 = {"scope": "l1", "solver": "JACOBI_L1"}
_CHEBP = {"scope": "chebp", "solver": "CHEBYSHEV_POLY",
          "chebyshev_polynomial_order": 3}
# AmgX's Chebyshev iteration as a smoother, as in NVIDIA's own configs
# (src/configs/V-cheby-aggres-L1-trunc.json): L1-Jacobi inside, the largest
# eigenvalue from the maximum absolute row sum (mode 2: no Lanczos at setup).
_CHEBY = {"scope": "cheby", "solver": "CHEBYSHEV", "chebyshev_polynomial_order": 2,
          "chebyshev_lambda_estimate_mode": 2, "max_iters": 1,
          "preconditioner": {"scope": "chebyl1", "solver": "JACOBI_L1",
                             "max_iters": 1}}


def _nos(sweeps, **kw):
    """The coarsest level smoothed `sweeps` times instead of a dense LU."""
    return {"coarse_solver": "NOSOLVER", "coarsest_sweeps": sweeps, **kw}


# Pieces the variants combine (benchmarks/null_space.py uses them too).
SZ8_J11 = {"selector": "SIZE_8", "presweeps": 1, "postsweeps": 1}
ES3 = {"error_scaling": 3}  # the scale recomputed every cycle
ES3R = {**ES3, "reuse_scale": 1000}  # a level's first scale kept for 1000 cycles
PCGF = {"outer": {"solver": "PCGF"}}  # flexible CG outside


VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "default": ("the preset the tags choose, unchanged", {}, {}),
    # coarse levels: fewer of them (AmgX's dense LU sets min_coarse_rows to
    # dense_lu_num_rows, so that is the knob with a dense coarsest solve)
    "lu1k": ("dense LU coarsest <= 1024 rows", {"dense_lu_num_rows": 1024}, {}),
    "lu4k": ("dense LU coarsest <= 4096 rows", {"dense_lu_num_rows": 4096}, {}),
    "ml5": ("max_levels 5 (dense LU on a coarsest of a few thousand rows)",
            {"max_levels": 5}, {}),
    "ml4": ("max_levels 4", {"max_levels": 4}, {}),
    "nos": ("NOSOLVER + 2 coarsest sweeps, coarsen to 32 rows", _nos(2), {}),
    "nos-mc1k": ("NOSOLVER + 8 coarsest sweeps, stop at 1024 rows",
                 _nos(8, min_coarse_rows=1024), {}),
    "ml5-nos": ("max_levels 5, NOSOLVER + 8 coarsest sweeps",
                _nos(8, max_levels=5), {}),
    # smoother and sweeps
    "j11": ("Jacobi 0.8, 1+1 sweeps", {"presweeps": 1, "postsweeps": 1}, {}),
    "j33": ("Jacobi 0.8, 3+3 sweeps", {"presweeps": 3, "postsweeps": 3}, {}),
    "l1j": ("L1-Jacobi 2+2", {"smoother": _L1}, {}),
    "mcgs": ("multicolour symmetric GS 1+1",
             {"smoother": _MCGS, "presweeps": 1, "postsweeps": 1}, {}),
    "dilu": ("multicolour DILU 1+1 (not a symmetric cycle)",
             {"smoother": _DILU, "presweeps": 1, "postsweeps": 1}, {}),
    "chebp": ("CHEBYSHEV_POLY order 3, 1+1",
              {"smoother": _CHEBP, "presweeps": 1, "postsweeps": 1}, {}),
    "cheby": ("CHEBYSHEV (L1-Jacobi inside, order 2), 1+1",
              {"smoother": _CHEBY, "presweeps": 1, "postsweeps": 1}, {}),
    # cycle
    "W": ("W-cycle", {"cycle": "W"}, {}),
    "F": ("F-cycle", {"cycle": "F"}, {}),
    # aggregation size
    "sz2": ("SIZE_2 selector", {"selector": "SIZE_2"}, {}),
    "sz8": ("SIZE_8 selector", {"selector": "SIZE_8"}, {}),
    # float32 hierarchy
    "mixed": ("float32 hierarchy, float64 vectors", {}, {"precision": "mixed"}),
    # combinations aimed at a cheaper cycle
    "j11-lu1k": ("Jacobi 1+1, dense LU <= 1024 rows",
                 {"presweeps": 1, "postsweeps": 1, "dense_lu_num_rows": 1024}, {}),
    "sz8-j11": ("SIZE_8, Jacobi 1+1", SZ8_J11, {}),
    "sz8-lu1k": ("SIZE_8, dense LU <= 1024 rows",
                 {"selector": "SIZE_8", "dense_lu_num_rows": 1024}, {}),
    # a cheaper coarsest level for the cheaper cycle
    "sz8-j11-nos": ("SIZE_8, Jacobi 1+1, NOSOLVER + 2 coarsest sweeps",
                    {**SZ8_J11, **_nos(2)}, {}),
    # over-correction: AmgX's error_scaling 3 scales each level's coarse-grid
    # correction by <r, e>/<e, A e> (the A-norm optimum; src/aggregation/
    # aggregation_amg_level.cu), the classic remedy for unsmoothed aggregation's
    # too-small corrections of smooth errors. It makes the cycle depend on its
    # input, so besides PCG the flexible PCGF (`outer`) is measured;
    # `reuse_scale` keeps each level's first scale for that many cycles (a fixed
    # cycle after the first).
    "es3": ("error_scaling 3 (PCG)", ES3, {}),
    "es3-f": ("error_scaling 3, flexible PCGF", {**ES3, **PCGF}, {}),
    "sz8-j11-es3": ("SIZE_8, Jacobi 1+1, error_scaling 3 (PCG)",
                    {**SZ8_J11, **ES3}, {}),
    "sz8-j11-es3-f": ("SIZE_8, Jacobi 1+1, error_scaling 3, PCGF",
                      {**SZ8_J11, **ES3, **PCGF}, {}),
    "sz8-j11-es3-r": ("SIZE_8, Jacobi 1+1, error_scaling 3 with reuse_scale 1000",
                      {**SZ8_J11, **ES3R}, {}),
    "es3-r": ("error_scaling 3 with reuse_scale 1000", ES3R, {}),
    "j11-es3-r": ("Jacobi 1+1, error_scaling 3 with reuse_scale 1000",
                  {"presweeps": 1, "postsweeps": 1, **ES3R}, {}),
    "sz8-j22-es3-r": ("SIZE_8, Jacobi 2+2, error_scaling 3 with reuse_scale 1000",
                      {"selector": "SIZE_8", **ES3R}, {}),
    "sz8-j11-nos-es3-r": ("SIZE_8, Jacobi 1+1, NOSOLVER + 2 coarsest sweeps, "
                          "error_scaling 3 with reuse_scale 1000",
                          {**SZ8_J11, **_nos(2), **ES3R}, {}),
    "sz8-j11-ml4-nos-es3-r": ("SIZE_8, Jacobi 1+1, 4 levels, NOSOLVER + 4 coarsest "
                              "sweeps, error_scaling 3 with reuse_scale 1000",
                              {**SZ8_J11, "max_levels": 4, **_nos(4), **ES3R}, {}),
    # a Krylov-accelerated (K-) cycle: CG on every coarse level (AmgX's CG
    # cycle, `cycle_iters` 2), a nonlinear preconditioner, so PCGF outside
    "kcyc-f": ("SIZE_8, Jacobi 1+1, CG cycle, PCGF",
               {**SZ8_J11, "cycle": "CG", **PCGF}, {}),
    # structure reuse on resetup (section c; AmgX's src/amg.cu: 0 rebuilds all,
    # k > 0 keeps the transfer operators of the first k - 1 levels, -1 all)
    "srl1": ("structure_reuse_levels 1", {"structure_reuse_levels": 1}, {}),
    "srl2": ("structure_reuse_levels 2", {"structure_reuse_levels": 2}, {}),
    "srl3": ("structure_reuse_levels 3", {"structure_reuse_levels": 3}, {}),
    "srl-all": ("structure_reuse_levels -1 (the whole hierarchy)",
                {"structure_reuse_levels": -1}, {}),
    "es3-r-srl": ("error_scaling 3, reuse_scale 1000, structure_reuse_levels -1",
                  {**ES3R, "structure_reuse_levels": -1}, {}),
    "sz8-j11-es3-r-srl": ("SIZE_8, Jacobi 1+1, error_scaling 3, reuse_scale 1000, "
                          "structure_reuse_levels -1",
                          {**SZ8_J11, **ES3R, "structure_reuse_levels": -1}, {}),
    "sz8-j11-srl": ("SIZE_8, Jacobi 1+1, structure_reuse_levels -1",
                    {**SZ8_J11, "structure_reuse_levels": -1}, {}),
}
SWEEP = [v for v in VARIANTS if "srl" not in v]
SEQ_VARIANTS = ["default", "srl1", "srl2", "srl3", "srl-all"]

SECTIONS = ("a", "b", "c", "d")
HARD = ["contrast3d-layers", "contrast3d-checker", "aniso2d", "aniso3d",
        "elasticity3d", "elasticity3d-bsr", "convdiff3d", "fem2d"]


def variant_config(name: str, tag: str = "spd", block: int = 1, *,
                   vcycle: bool = False):
    """(config dict, AMGX kwargs): the variant applied to the tag's preset (or,
    with `vcycle`, as one V-cycle: the AMG scope as the outer solver, as the
    preset AMG_VCYCLE). Validated by the package's parser."""
    import lineax_amgx as lxa
    from lineax_amgx import _config

    if name.startswith("+"):  # a JSON override given on the command line
        over, kwargs = json.loads(name[1:]), {}
    else:
        _, over, kwargs = VARIANTS[name]
    over = copy.deepcopy(over)
    outer = over.pop("outer", {})  # overrides of the outer (Krylov) solver
    cfg = lxa.configs[default_preset(tag, block)]
    if cfg["solver"]["solver"] == "PCG":  # (PCGF for CG only, never for GMRES)
        cfg["solver"].update(outer)
    amg = cfg["solver"]["preconditioner"]
    amg.update(over)
    if vcycle:
        amg = dict(amg, scope="main", max_iters=1, monitor_residual=0)
        cfg = {"config_version": 2, "solver": amg}
    _config.resolve(cfg)  # raises ConfigError for a bad key or value
    return cfg, dict(kwargs)


def check_variants(names) -> None:
    """Every variant resolves and finalises, for every kind of preset."""
    from lineax_amgx import _config

    for name in names:
        for tag, block in (("spd", 1), ("nonsym", 1), ("spd", 3)):
            for vc in (False, True):
                cfg, _ = variant_config(name, tag, block, vcycle=vc)
                r = _config.resolve(cfg)
                r.finalise(_config.Tolerances(scaled=True), max_steps=None,
                           verbose=False)


# -----------------------------------------------------------------------------
# The worker: one task per stdin line, one "@@RESULT" JSON line per task.
# -----------------------------------------------------------------------------

class _W:
    problem = None  # the Problem of `key` = (name, size): one at a time
    op = None  # its CSROperator (built once: 1.5 s at 1M on an H200, SPD tags)
    key = None


def _problem(name, size, cache_dir=None):
    import problems as P

    if _W.key != (name, size):
        _W.problem = _W.op = None
        if cache_dir:  # generated ahead by the parent's process pool
            from suite import _wait_problem

            _W.problem = _wait_problem(cache_dir, name, size)
        else:
            _W.problem = P.make(name, size)
        _W.key = (name, size)
    return _W.problem


def _operator(p):
    import lineax_amgx as lxa

    if _W.op is None:
        _W.op = lxa.CSROperator.from_scipy(p.A, tags=_tags(p.tag))
    return _W.op


def _repeat(fn, repeats, budget):
    """Median of up to `repeats` timed calls, fewer once `budget` s are spent."""
    times, out = [], None
    for _ in range(repeats):
        t, out = _timed(fn)
        times.append(t)
        if sum(times) > budget:
            break
    return statistics.median(times), out, len(times)


def _residual(p, x, values=None, s=None):
    import numpy as np

    a = p.A if values is None else _with_data(p.A, values)
    x = np.asarray(x, dtype=np.float64)
    if s is not None:
        ax = s * (a @ (s * x))
    else:
        ax = a @ x
    r = p.b - ax
    return float(np.linalg.norm(r) / np.linalg.norm(p.b))


def _with_data(a, data):
    b = a.copy()
    b.data = data
    return b


def _tags(tag):
    import lineax as lx

    return (lx.symmetric_tag, lx.positive_semidefinite_tag) if tag == "spd" else ()


def _amgx_entry(on_gpu):
    if not on_gpu:
        return {}
    from _common import amgx_entry

    return amgx_entry()


def _status(result):
    from suite import _status as st

    return st(result)


def run_solve(t, ctx):
    """Sections a and d: one variant (or lx-cg-mf) on one problem."""
    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np

    import lineax_amgx as lxa

    p = _problem(t["problem"], t["size"], ctx.get("cache_dir"))
    rec = {"n": p.n, "nnz": int(p.A.nnz), "block_size": p.block_size, "tag": p.tag}
    if t["variant"] == "lx-cg-mf":
        from suite import _Ctx, run_lineax

        if p.stencil is None or p.tag != "spd":
            return {**rec, "skipped": "no matrix-free SPD form"}
        c = _Ctx({"rtol": t["rtol"], "repeats": ctx["repeats"],
                  "repeat_budget": ctx["repeat_budget"], "max_steps": 20000,
                  "backend": ctx["backend"]})
        out = run_lineax(c, p, "lx-cg-mf")
        x = out.pop("x")
        return {**rec, **out, "rel_residual": _residual(p, x)}
    cfg, kwargs = variant_config(t["variant"], p.tag, p.block_size)
    solver = lxa.AMGX(cfg, rtol=t["rtol"], backend=ctx["backend"], **kwargs)
    op = _operator(p)
    b = jnp.asarray(p.b)
    init = jax.jit(lambda o: solver.init(o, {}))
    solve = jax.jit(lambda o, v, s: lx.linear_solve(o, v, solver=solver, state=s,
                                                      throw=False))
    on_gpu = ctx["on_gpu"]

    def cold():
        lxa.clear_cache()
        return init(op)

    t_first, state = _timed(cold)  # compiles init
    jax.block_until_ready(solve(op, b, state))  # compiles the solve
    setup_s, state, _ = _repeat(cold, 3, ctx["repeat_budget"])
    amgx_setup = _amgx_entry(on_gpu).get("last_setup_seconds")
    solve_s, sol, reps = _repeat(lambda: solve(op, b, state), ctx["repeats"],
                                 ctx["repeat_budget"])
    amgx_solve = _amgx_entry(on_gpu).get("last_solve_seconds")
    op2 = op.with_values(op.values * (1 + 1e-3))
    jax.block_until_ready(op2.values)
    resetup_s, _ = _timed(lambda: init(op2))
    amgx_resetup = _amgx_entry(on_gpu).get("last_setup_seconds")
    lxa.clear_cache()
    rel = _residual(p, np.asarray(sol.value))
    return {**rec, "setup_s": setup_s, "solve_s": solve_s, "total_s": setup_s + solve_s,
            "resetup_s": resetup_s, "first_setup_s": t_first,
            "amgx_setup_s": amgx_setup, "amgx_solve_s": amgx_solve,
            "amgx_resetup_s": amgx_resetup, "repeats": reps,
            "iterations": int(sol.stats["num_steps"]), "status": _status(sol.result),
            "rel_residual": rel}


class _Capture:
    """Route fds 1 and 2 into a file: AmgX's verbose output goes to fd 2 (the
    native print callback), pyamg's to Python's stdout."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        self.f = open(self.path, "w")  # noqa: SIM115
        os.dup2(self.f.fileno(), 1)
        os.dup2(self.f.fileno(), 2)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.f.close()


def run_vcycle(t, ctx):
    """Section b: one application of the variant's V-cycle."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lineax_amgx as lxa

    p = _problem(t["problem"], t["size"], ctx.get("cache_dir"))
    cfg, kwargs = variant_config(t["variant"], p.tag, p.block_size, vcycle=True)
    op = _operator(p)
    r = jnp.asarray(np.random.default_rng(0).standard_normal(p.n))
    on_gpu = ctx["on_gpu"]
    lxa.clear_cache()
    t0 = time.perf_counter()
    P = lxa.AMGXPreconditioner(op, cfg, backend=ctx["backend"], **kwargs)
    jax.block_until_ready(P.token)
    setup_wall = time.perf_counter() - t0
    apply = jax.jit(lambda P, r: P.mv(r))
    cycles = []

    def once():
        out = apply(P, r)
        jax.block_until_ready(out)
        if on_gpu:
            cycles.append(_amgx_entry(on_gpu).get("last_solve_seconds"))
        return out

    once()
    once()
    cycles.clear()
    wall, y, reps = _repeat(once, max(ctx["repeats"], 11), ctx["repeat_budget"])
    y = np.asarray(y)
    # A cycle reduces the error: ||r - A P r|| / ||r|| < 1 for a convergent one.
    reduction = float(np.linalg.norm(np.asarray(r) - p.A @ y)
                      / np.linalg.norm(np.asarray(r)))
    rec = {"n": p.n, "setup_wall_s": setup_wall, "apply_wall_s": wall,
           "amgx_cycle_s": statistics.median(cycles) if cycles else None,
           "repeats": reps, "residual_reduction": reduction}
    if t.get("gridstats"):
        path = os.path.join(ctx["out"], f"gridstats-{t['variant']}-{p.n}.txt")
        lxa.clear_cache()
        with _Capture(path):
            Pv = lxa.AMGXPreconditioner(op, cfg, backend=ctx["backend"],
                                        verbose=True, **kwargs)
            for _ in range(2):
                jax.block_until_ready(apply(Pv, r))
        rec["gridstats_file"] = os.path.basename(path)
    lxa.clear_cache()
    return rec


def run_sequence(t, ctx):
    """Section c: `steps` solves with changed values, each a resetup + solve."""
    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np

    import lineax_amgx as lxa

    p = _problem(t["problem"], t["size"], ctx.get("cache_dir"))
    if p.block_size != 1:
        return {"n": p.n, "skipped": "sequences are measured on scalar CSR problems"}
    a = p.A  # sorted, no duplicates: the CSROperator's value order
    rows = np.repeat(np.arange(p.n), np.diff(a.indptr))
    rng = np.random.default_rng(1)
    steps = t["steps"]
    scales = [1.0 + t["amplitude"] * rng.random(p.n) for _ in range(steps + 1)]
    b = jnp.asarray(p.b)
    its, res, times = [], [], []
    rec = {"n": p.n, "steps": steps, "amplitude": t["amplitude"]}
    if t["variant"] == "lx-cg-mf":
        import functools as ft

        import problems as P
        from suite import _rms

        if p.stencil is None:
            return {**rec, "skipped": "no matrix-free form"}
        apply, coeffs = P.stencil_apply(*p.stencil)
        struct = jax.ShapeDtypeStruct((p.n,), jnp.float64)
        solver = lx.CG(rtol=t["rtol"], atol=0.0, norm=_rms, max_steps=20000)

        @jax.jit
        def f(c, s, v):
            op = lx.FunctionLinearOperator(
                lambda x: s * ft.partial(apply, c)(s * x), struct, _tags(p.tag))
            sol = lx.linear_solve(op, v, solver=solver, throw=False)
            return sol.value, sol.result, sol.stats["num_steps"]

        svals = [jnp.asarray(s) for s in scales]
        jax.block_until_ready(f(coeffs, svals[0], b))
        for k in range(1, steps + 1):
            dt, (x, result, n_it) = _timed(lambda k=k: f(coeffs, svals[k], b))
            times.append(dt)
            its.append(int(n_it))
            res.append(_residual(p, x, s=scales[k]))
    else:
        cfg, kwargs = variant_config(t["variant"], p.tag, p.block_size)
        solver = lxa.AMGX(cfg, rtol=t["rtol"], backend=ctx["backend"], **kwargs)
        op = _operator(p)
        vals = [jnp.asarray(a.data * s[rows] * s[a.indices]) for s in scales]

        @jax.jit
        def f(v, rhs):
            sol = lx.linear_solve(op.with_values(v), rhs, solver=solver, throw=False)
            return sol.value, sol.result, sol.stats["num_steps"]

        lxa.clear_cache()
        jax.block_until_ready(f(vals[0], b))  # compile + the first setup
        lxa.reset_counters()
        for k in range(1, steps + 1):
            dt, (x, result, n_it) = _timed(lambda k=k: f(vals[k], b))
            times.append(dt)
            its.append(int(n_it))
            res.append(_residual(p, x, values=np.asarray(vals[k])))
        info = lxa.cache_info()
        rec.update(setups=info.get("setups"), resetups=info.get("resetups"))
        lxa.clear_cache()
    return {**rec, "total_s": sum(times), "step_s": times, "iterations": its,
            "max_rel_residual": max(res), "rel_residual": max(res)}


RUNNERS = {"a": run_solve, "d": run_solve, "b": run_vcycle, "c": run_sequence}


def worker_main() -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import warnings

    import jax

    jax.config.update("jax_enable_x64", True)
    warnings.filterwarnings("ignore")
    from _common import device_name

    ctx = json.loads(sys.stdin.readline())
    ctx["on_gpu"] = jax.default_backend() == "gpu" and ctx["backend"] != "pyamg"
    _emit({"hello": True, "card": device_name(), "platform": jax.default_backend(),
           "jax": jax.__version__})
    for line in sys.stdin:
        t = json.loads(line)
        t0 = time.perf_counter()
        try:
            out = RUNNERS[t["section"]](t, ctx)
        except Exception as e:  # a failing variant is a result
            out = {"error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": traceback.format_exc()[-3000:]}
        out["wall_s"] = time.perf_counter() - t0
        _emit(out)
    return 0


def _emit(payload) -> None:
    sys.stdout.write("@@RESULT " + json.dumps(payload, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# -----------------------------------------------------------------------------
# The parent: tasks, budget, timeouts, restarts.
# -----------------------------------------------------------------------------

class _Worker:
    def __init__(self, ctx, env):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=HERE, start_new_session=True, bufsize=1,
        )
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.proc.stdin.write(json.dumps(ctx) + "\n")
        self.proc.stdin.flush()
        self.hello = None

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@RESULT "):
                self.q.put(json.loads(line[9:]))
            else:
                sys.stdout.write(line)
        self.q.put(None)

    def ask(self, task, timeout):
        """The result, or None (died) or "timeout"."""
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        return self.get(timeout)

    def get(self, timeout):
        try:
            return self.q.get(timeout=max(timeout, 0.1))
        except queue.Empty:
            return "timeout"

    def kill(self):
        kill_group(self.proc)


def estimate(task, gpu: bool) -> float:
    """Seconds a task is expected to take (for the budget), problem generation
    included when the problem changes."""
    m = task["size"] / 1e6
    if not gpu:
        return 5.0
    # compiles (~0.7 s), cold setups, solves; guesses from docs/benchmarks.md
    cost = {"a": 2 + 1.5 * m, "d": 3 + 2 * m, "b": 1.5 + 0.5 * m, "c": 3 + 1.5 * m}
    c = cost[task["section"]]
    if task["variant"] == "lx-cg-mf":
        c = 1.5 + 0.5 * m
    return c


def load_estimate(problem, size, gpu: bool) -> float:
    if not gpu:
        return 1.0
    # CSROperator.from_scipy (1.5 s at 1M, 6 s at 8M with SPD tags) after the
    # pool's generation (fem2d: ~30 s at 1M, started at the beginning)
    per_m = {"fem2d": 4.0, "elasticity3d-bsr": 4.0, "elasticity3d": 3.0}
    return per_m.get(problem, 2.0) * size / 1e6


def _top(results, k, key):
    ok = [r for r in results if r.get("section") == "a" and r.get("converged")
          and r.get("variant") not in ("default", "lx-cg-mf") and key in r]
    size = min((r["size"] for r in ok), default=None)
    ok = sorted((r for r in ok if r["size"] == size), key=lambda r: r[key])
    return [r["variant"] for r in ok[:k]]


def expand(names, results, key="solve_s"):
    out = []
    for n in names:
        if n.startswith("@top"):
            out += _top(results, int(n[4:]), key)
        else:
            out.append(n)
    seen = []
    for n in out:
        if n not in seen:
            seen.append(n)
    return seen


def plan(args):
    """Task groups in order of priority; each group is expanded when reached
    (so that `@topK` sees the results before it)."""
    first, *larger = args.sizes
    groups = []
    if "a" in args.sections:
        groups.append(("a", "poisson3d", first, args.variants + ["lx-cg-mf"], {}))
    if "b" in args.sections:
        groups.append(("b", "poisson3d", first, args.variants, {}))
    if "c" in args.sections:
        groups.append(("c", "poisson3d", first, args.seq_variants + ["lx-cg-mf"],
                       {"steps": args.seq_steps, "amplitude": args.seq_amplitude}))
    if "d" in args.sections:
        for prob in args.hard_problems:
            groups.append(("d", prob, args.hard_size, args.hard_variants, {}))
    for size in larger:
        if "a" in args.sections:
            groups.append(("a", "poisson3d", size,
                           ["lx-cg-mf"] + args.large_variants, {}))
    return groups


def run(args) -> int:
    gpu = args.gpu
    t_end = time.monotonic() + args.device_budget
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune.jsonl")
    ctx = {"backend": args.backend, "repeats": args.repeats,
           "repeat_budget": args.repeat_budget, "out": os.path.abspath(args.out)}
    groups = plan(args)
    pool = None
    if args.gen_workers:
        # Generate every problem ahead (fem2d's Delaunay takes ~30 s at 1M), in
        # the order they are needed, cached as .npz (keyed by problems.py).
        import concurrent.futures as cf

        import suite

        ctx["cache_dir"] = os.path.join(args.cache_dir, suite._problems_digest())
        os.makedirs(ctx["cache_dir"], exist_ok=True)
        import multiprocessing as mp

        # spawn, not fork: this process has imported JAX (the config checks)
        pool = cf.ProcessPoolExecutor(args.gen_workers,
                                      mp_context=mp.get_context("spawn"))
        for key in dict.fromkeys((g[1], g[2]) for g in groups):
            pool.submit(suite._generate, ctx["cache_dir"], *key)
    results: list[dict] = []
    worker = None
    card = "?"
    loaded = None
    n_err = 0
    with open(path, "a") as f:
        def write(rec):
            rec = dict(rec, card=card, date=time.strftime("%Y-%m-%d %H:%M:%S",
                                                          time.gmtime()))
            f.write(json.dumps(rec) + "\n")
            f.flush()
            results.append(rec)
            print(_line(rec), flush=True)

        for section, prob, size, names, extra in groups:
            key = "total_s" if section == "d" else "solve_s"
            for variant in expand(names, results, key):
                task = {"section": section, "problem": prob, "size": size,
                        "variant": variant,
                        "rtol": args.hard_rtol if section == "d" else args.rtol,
                        **extra}
                if variant in VARIANTS:
                    task["description"] = VARIANTS[variant][0]
                    task["overrides"] = VARIANTS[variant][1]
                    task["kwargs"] = VARIANTS[variant][2]
                if section == "b" and variant in expand(args.gridstats_variants,
                                                        results):
                    task["gridstats"] = True
                est = estimate(task, gpu)
                if loaded != (prob, size):
                    est += load_estimate(prob, size, gpu)
                left = t_end - time.monotonic()
                if est > left:
                    write({**task, "skipped": f"budget: needs ~{est:.0f}s, "
                                              f"{max(left, 0):.0f}s left"})
                    continue
                if worker is None:
                    worker = _Worker(ctx, env)
                    hello = worker.get(min(120.0, left))
                    if not isinstance(hello, dict):
                        print("# the worker did not start", flush=True)
                        worker.kill()
                        return 1
                    card = hello["card"]
                    loaded = None
                timeout = min(max(args.timeout, 4 * est), t_end - time.monotonic())
                out = worker.ask(task, timeout)
                if not isinstance(out, dict):
                    worker.kill()
                    why = ("timeout" if out == "timeout" else "the worker died "
                           f"(rc={worker.proc.returncode})")
                    worker = None
                    write({**task, "error": f"{why} after {timeout:.0f}s limit"})
                    n_err += 1
                    continue
                loaded = (prob, size)
                rec = {**task, **out}
                if "rel_residual" in rec and "error" not in rec:
                    tol = 10 * task["rtol"]
                    rec["converged"] = bool(
                        math.isfinite(rec["rel_residual"])
                        and rec["rel_residual"] <= tol
                    )
                if "error" in rec:
                    n_err += 1
                write(rec)
    if worker is not None:
        worker.proc.stdin.close()
        worker.proc.wait(timeout=60)
    if pool is not None:
        pool.shutdown(cancel_futures=True)
    summary(results)
    print(f"# {len(results)} lines in {path}; {n_err} errors", flush=True)
    return 0


def _fmt(v, unit="s"):
    if v is None:
        return "-"
    return f"{v * 1e3:.2f}ms" if unit == "ms" else f"{v:.3g}{unit}"


def _line(r):
    head = f"{r['section']} {r['problem']:>18} {r['size']:>8} {r['variant']:<10}"
    if "skipped" in r:
        return f"{head} SKIPPED {r['skipped']}"
    if "error" in r:
        return f"{head} ERROR {r['error'][:300]}"
    if r["section"] == "b":
        return (f"{head} cycle wall={_fmt(r.get('apply_wall_s'), 'ms')} "
                f"amgx={_fmt(r.get('amgx_cycle_s'), 'ms')} "
                f"reduction={r.get('residual_reduction', 0):.3g}")
    if r["section"] == "c":
        return (f"{head} {r['steps']} steps total={_fmt(r.get('total_s'))} "
                f"its={r.get('iterations')} res={r.get('max_rel_residual'):.2g} "
                f"{'ok' if r.get('converged') else 'NOT CONVERGED'}")
    return (f"{head} setup={_fmt(r.get('setup_s'))} solve={_fmt(r.get('solve_s'))} "
            f"resetup={_fmt(r.get('resetup_s'))} it={r.get('iterations')} "
            f"res={r.get('rel_residual', float('nan')):.2g} "
            f"{'ok' if r.get('converged') else 'NOT CONVERGED'}")


def summary(results):
    print("# ---- summary ----")
    for sec, key in (("a", "solve_s"), ("b", "apply_wall_s"), ("c", "total_s"),
                     ("d", "total_s")):
        rows = [r for r in results if r["section"] == sec and key in r
                and "error" not in r]
        groups = sorted({(r["problem"], r["size"]) for r in rows})
        for prob, size in groups:
            g = sorted((r for r in rows if (r["problem"], r["size"]) == (prob, size)),
                       key=lambda r: (not r.get("converged", True), r[key]))
            best = ", ".join(
                f"{r['variant']} {_fmt(r[key])}"
                + (f"/{r['iterations']}it" if isinstance(r.get("iterations"), int)
                   else "")
                + ("" if r.get("converged", True) else " ✗")
                for r in g
            )
            print(f"# {sec} {prob} {size}: {best}")


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 10**3, "m": 10**6}.get(s[-1:], 1)
    return int(round(float(s[:-1] if mult != 1 else s) * mult))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=False, default=None,
                    help="directory for tune.jsonl and gridstats-*.txt")
    ap.add_argument("--device-budget", type=float, default=None,
                    help="seconds for everything, worker start included (tasks "
                         "that do not fit are skipped and recorded as such); "
                         "default 330, 600 with --cpu-smoke")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS),
                    choices=SECTIONS)
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="Poisson sizes (default 1e6 8e6; the first gets every "
                         "variant, the others --large-variants)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="variants of sections a and b (default: all but srl*); "
                         "'+{json}' is an ad-hoc AMG-scope override")
    ap.add_argument("--large-variants", nargs="+", default=["default", "@top3"])
    ap.add_argument("--seq-variants", nargs="+", default=SEQ_VARIANTS)
    ap.add_argument("--seq-steps", type=int, default=10)
    ap.add_argument("--seq-amplitude", type=float, default=0.3,
                    help="S_k = 1 + amplitude * U(0, 1) per row, per step")
    ap.add_argument("--hard-problems", nargs="+", default=HARD)
    ap.add_argument("--hard-size", default=None, help="default 1e6")
    ap.add_argument("--hard-variants", nargs="+", default=["default", "@top2"])
    ap.add_argument("--gridstats-variants", nargs="+", default=["default", "@top1"])
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--hard-rtol", type=float, default=1e-8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--repeat-budget", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds per task at least (4x its estimate otherwise)")
    ap.add_argument("--backend", default="auto", choices=["auto", "amgx", "pyamg"])
    ap.add_argument("--gen-workers", type=int, default=None,
                    help="processes generating problems ahead (default 6 with >= 8 "
                         "cores, else 0: the worker generates each in turn)")
    ap.add_argument("--cache-dir", default=os.path.join(
        tempfile.gettempdir(), "lineax_amgx_suite"))
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU, pyamg, tiny sizes: checks the script, not speed")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for name, (d, over, kw) in VARIANTS.items():
            print(f"{name:<10} {d}: {json.dumps(over)} {kw or ''}")
        return 0
    if args.out is None:
        ap.error("--out is required")
    args.gpu = not args.cpu_smoke and _has_gpu()
    if args.cpu_smoke:
        args.backend = "pyamg"
        args.sizes = args.sizes or ["1000"]
        args.hard_size = args.hard_size or "1000"
        args.repeats, args.repeat_budget = 1, 0.5
    if args.gen_workers is None:
        args.gen_workers = 6 if (os.cpu_count() or 1) >= 8 and not args.cpu_smoke \
            else 0
    if args.device_budget is None:
        args.device_budget = 600.0 if args.cpu_smoke else 330.0
    args.sizes = [parse_size(s) for s in (args.sizes or ["1e6", "8e6"])]
    args.hard_size = parse_size(args.hard_size or "1e6")
    args.variants = args.variants or list(SWEEP)
    for name in args.variants + args.seq_variants + args.hard_variants \
            + args.large_variants + args.gridstats_variants:
        if not (name in VARIANTS or name.startswith(("@top", "+"))
                or name == "lx-cg-mf"):
            ap.error(f"unknown variant {name!r}; see --list")
    # Every configuration through the package's parser before the device is used.
    check_variants([v for v in set(args.variants + args.seq_variants
                                   + args.hard_variants + args.large_variants)
                    if not v.startswith("@") and v != "lx-cg-mf"])
    return run(args)


def _has_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


if __name__ == "__main__":
    sys.exit(main())
