"""The first call of a jitted AMGX solve (issue 20), next to raw AmgX cold.

For the 3D 7-point Poisson matrix on an n^3 grid (`--sizes`, default 100 200: 1M
and 8M unknowns), tagged symmetric positive definite (so `AMGX()` uses its default
preset for it, PCG_AGGREGATION), b = ones:

- construction: `CSROperator.from_scipy` (and `from_arrays`), values on the device;
- `lower`: `jax.jit(solve).lower(A, b)` (trace and lowering), `compile`, the first
  run (AmgX setup and solve; AmgX is finalised before each size, so this includes
  `AMGX_initialize`, as raw AmgX cold does) and the second run (the cached setup);
  `first_call` = lower + compile + first run (construction excluded);
- `mv_compile`: `jax.jit(lambda A, v: A.mv(v))`, lower + compile; `mv`: its run
  time; `fetch_indices`: the run time of a program that only reads the pattern's
  column indices (a runtime array: what each use of one costs);
- `grad_first` / `grad_second`: the first and second call of
  `jax.jit(jax.grad(loss))` with respect to the values;
- `raw`: raw AmgX cold (`benchmarks/raw_amgx_cold.c`: initialize, config,
  resources, upload, setup, solve; the CUDA context created before), built with
  `gcc` from `--raw` (libamgxsh.so) and `--amgx-include` (AmgX's include folder) and
  run first, in its own process, with the same config and tolerance.

On a machine without a GPU everything but raw AmgX runs (on the CPU backend).

    python benchmarks/first_call.py --sizes 100 200 --raw /opt/amgx/libamgxsh.so \
        --amgx-include .amgx-src/include --out docs/results/first_call.jsonl

`--compile-only` measures what the issue's acceptance asks of the CPU: the lower
and compile time of the jitted solve at each size (median of `--repeats` fresh
programs) and the growth from the first size to the last (target < 1.5x);
`--construction-only` times `from_scipy` and `from_arrays` alone:

    python benchmarks/first_call.py --compile-only --sizes 63 126
    python benchmarks/first_call.py --construction-only --sizes 100 200
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from _common import poisson3d, record

import lineax_amgx as lxa

HERE = os.path.dirname(os.path.abspath(__file__))
SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
PRESET = "PCG_AGGREGATION"  # what AMGX() picks for an SPD-tagged scalar operator


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--raw", default=None, help="path of libamgxsh.so (raw AmgX)")
    p.add_argument("--amgx-include", default=None, help="AmgX's include folder")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--construction-only", action="store_true")
    p.add_argument("--no-grad", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    jax.config.update("jax_enable_x64", True)
    return args


def median(fn, repeats: int = 7) -> float:
    jax.block_until_ready(fn())
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


# -- raw AmgX ---------------------------------------------------------------------


def _cuda_library_dirs() -> list[str]:
    """Where AmgX's CUDA libraries may be (as the package looks for them)."""
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "lib64"))
    dirs += ["/usr/local/cuda/lib64"]
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "lib"))
    return [d for d in dirs if os.path.isdir(d)]


def build_raw(library: str, include: str, workdir: str) -> str:
    """Compile raw_amgx_cold.c against `library`; returns the executable."""
    lib_dir = os.path.dirname(os.path.abspath(library))
    name = os.path.basename(library)
    exe = os.path.join(workdir, "raw_amgx_cold")
    cmd = [
        "gcc", "-O2", "-I", include, os.path.join(HERE, "raw_amgx_cold.c"),
        "-L", lib_dir, f"-l:{name}", "-ldl", "-lm", f"-Wl,-rpath,{lib_dir}",
        "-o", exe,
    ]
    subprocess.run(cmd, check=True)
    return exe


def run_raw(exe: str, n: int, rtol: float, workdir: str) -> dict:
    config = {"config_version": 2, "solver": dict(lxa.configs[PRESET]["solver"])}
    config["solver"]["tolerance"] = rtol  # RELATIVE_INI_CORE: ||r|| <= rtol ||b||
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    env = dict(os.environ)
    extra = _cuda_library_dirs()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        extra + [env.get("LD_LIBRARY_PATH", "")]
    )
    out = subprocess.run([exe, str(n), path], env=env, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"raw AmgX failed (n={n}): {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- lineax-amgx --------------------------------------------------------------------


def residual(a, x) -> float:
    x = np.asarray(x)
    return float(np.linalg.norm(1.0 - a @ x) / np.sqrt(a.shape[0]))


def measure(n: int, args) -> dict:
    # (Internal, for one measurement; imported here so that --compile-only also
    # runs against a version without runtime arrays, for comparison.)
    from lineax_amgx._runtime_arrays import pattern_array

    t0 = time.perf_counter()
    a = poisson3d(n)
    matrix = time.perf_counter() - t0
    construct, op = timed(lambda: lxa.CSROperator.from_scipy(a, tags=SPD))
    from_arrays, _ = timed(lambda: lxa.CSROperator.from_arrays(
        a.indptr, a.indices, a.data, a.shape, tags=SPD))
    b = jnp.ones(a.shape[0])
    jax.block_until_ready(b)
    solver = lxa.AMGX(rtol=args.rtol)
    # Cold for each size: AmgX shut down (the first run initialises it again,
    # as raw AmgX cold does), every compiled program and setup dropped.
    lxa.finalize()
    jax.clear_caches()
    solve = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)
    lower, lowered = timed(lambda: solve.lower(op, b))
    lowered_mb = len(lowered.as_text()) / 1e6
    compile_, compiled = timed(lowered.compile)
    run1, x = timed(lambda: compiled(op, b))
    run2, x = timed(lambda: compiled(op, b))
    mv = jax.jit(lambda o, v: o.mv(v))
    mv_compile, _ = timed(lambda: mv.lower(op, b).compile())
    # Per call: a jitted mv, and the fetch of one runtime array (the column
    # indices) alone, the cost the runtime arrays add to every use.
    mv_run = median(lambda: mv(op, b))
    fetch = jax.jit(lambda: pattern_array(op.pattern, "indices")[-1])
    fetch_run = median(fetch)
    out = {
        "benchmark": "first_call", "n": n, "unknowns": a.shape[0], "nnz": a.nnz,
        "backend": jax.default_backend(), "matrix_seconds": matrix,
        "construct_seconds": construct, "from_arrays_seconds": from_arrays,
        "lower_seconds": lower, "lowered_mb": lowered_mb,
        "compile_seconds": compile_, "run1_seconds": run1, "run2_seconds": run2,
        "first_call_seconds": lower + compile_ + run1,
        "mv_compile_seconds": mv_compile, "mv_seconds": mv_run,
        "fetch_indices_seconds": fetch_run, "residual": residual(a, x),
    }
    if not args.no_grad:

        def loss(values, v):
            return jnp.sum(lx.linear_solve(op.with_values(values), v,
                                           solver=solver).value)

        grad = jax.jit(jax.grad(loss))
        out["grad_first_seconds"], _ = timed(lambda: grad(op.values, b))
        out["grad_second_seconds"], _ = timed(lambda: grad(op.values, b))
    return out


def compile_only(args) -> None:
    """Lower and compile time of a jitted solve at each size (CPU figure)."""
    compile_times = []
    for n in args.sizes:
        a = poisson3d(n)
        op = lxa.CSROperator.from_scipy(a, tags=SPD)
        b = jnp.ones(a.shape[0])
        lowers, compiles = [], []
        for k in range(args.repeats):
            # A fresh program each time (another tolerance: another config).
            solver = lxa.AMGX(rtol=args.rtol * (1 + 1e-3 * k))
            solve = jax.jit(
                lambda o, v, s=solver: lx.linear_solve(o, v, solver=s).value
            )
            t_lower, lowered = timed(lambda: solve.lower(op, b))
            t_compile, _ = timed(lowered.compile)
            lowers.append(t_lower)
            compiles.append(t_compile)
        compile_times.append(statistics.median(compiles))
        record(args.out, {
            "benchmark": "first_call_compile", "n": n, "unknowns": a.shape[0],
            "nnz": a.nnz, "lower_seconds": statistics.median(lowers),
            "compile_seconds": compile_times[-1], "compile_all": compiles,
            "lowered_mb": len(lowered.as_text()) / 1e6,
        })
    if len(compile_times) > 1:
        print(f"compile time growth {args.sizes[0]}^3 -> {args.sizes[-1]}^3: "
              f"{compile_times[-1] / compile_times[0]:.2f}x")


def construction_only(args) -> None:
    """`from_scipy` and `from_arrays` at each size (medians of `--repeats`)."""
    for n in args.sizes:
        a = poisson3d(n)
        times = {"from_scipy": [], "from_arrays": []}
        for _ in range(args.repeats):
            times["from_scipy"].append(
                timed(lambda: lxa.CSROperator.from_scipy(a, tags=SPD))[0])
            times["from_arrays"].append(timed(lambda: lxa.CSROperator.from_arrays(
                a.indptr, a.indices, a.data, a.shape, tags=SPD))[0])
        record(args.out, {
            "benchmark": "first_call_construction", "n": n, "unknowns": a.shape[0],
            "nnz": a.nnz, **{f"{k}_seconds": statistics.median(v)
                             for k, v in times.items()},
        })


def main():
    args = parse_args()
    if args.compile_only:
        compile_only(args)
        return
    if args.construction_only:
        construction_only(args)
        return
    raw = {}
    if args.raw:
        if not args.amgx_include:
            raise SystemExit("--raw needs --amgx-include (AmgX's include folder).")
        with tempfile.TemporaryDirectory() as work:
            exe = build_raw(args.raw, args.amgx_include, work)
            # First, before JAX holds the GPU's memory.
            for n in args.sizes:
                raw[n] = run_raw(exe, n, args.rtol, work)
    elif jax.default_backend() == "gpu":
        print("raw AmgX skipped: pass --raw PATH/libamgxsh.so --amgx-include DIR")
    else:
        print("raw AmgX skipped: no GPU (it needs one)")
    for n in args.sizes:
        result = measure(n, args)
        if n in raw:
            result["raw"] = raw[n]
            result["first_call_minus_raw_seconds"] = (
                result["first_call_seconds"] - raw[n]["cold_seconds"]
            )
        record(args.out, result)


if __name__ == "__main__":
    main()
