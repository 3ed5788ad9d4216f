"""Block vs scalar: iterations and times of elasticity solves (issue #10).

The same matrix is solved as a block operator (`CSROperator.from_scipy` of the BSR
matrix: AmgX block aggregation and block smoothers, or pyamg with a BSR matrix on
the CPU) and as scalar CSR. Forms, one JSON line each:

- `block`: block operator, default preset (`PCG_AGGREGATION_BLOCK`);
- `scalar`: scalar CSR, default preset (`PCG_AGGREGATION`);
- `scalar-same-config`: scalar CSR with the block form's configuration (the
  difference to `block` is the block structure alone);
- `block+rbm`, `scalar+rbm` (CPU only, `--near-nullspace`): with the rigid-body
  modes as near-null space (`options={"near_nullspace": rigid_body_modes(x)}`;
  AmgX ignores it).

Times are medians of jitted calls after compilation: `setup_solve_s` with new
values every call (AmgX resetup + solve), `solve_s` with unchanged values (solve
only). Problems: pyamg's 2-D Q1 elasticity (`elasticity2d`, size = grid side,
2 x 2 blocks) and trilinear 3-D elasticity (`elasticity3d`, size = cubes per side,
3 x 3 blocks, clamped at x = 0; assembled in `tests/test_blocks.py`).

    python benchmarks/blocks.py                                   # CPU, small
    python benchmarks/blocks.py --problem elasticity2d --sizes 316 708 \\
        --out docs/results/blocks.jsonl                            # GPU, large
    python benchmarks/blocks.py --problem elasticity3d --sizes 32 48 \\
        --out docs/results/blocks.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.sparse as sp
from _common import record

import lineax_amgx as lxa

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
)
from test_blocks import block_config, elasticity2d, elasticity3d  # noqa: E402

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
DEFAULT_SIZES = {
    ("elasticity2d", "cpu"): [40, 80],
    ("elasticity3d", "cpu"): [8, 14],
    ("elasticity2d", "gpu"): [316, 708],
    ("elasticity3d", "gpu"): [32, 48],
}


def problem(name: str, size: int):
    """`(A as BSR, rigid-body modes, config of the block form)`."""
    if name == "elasticity2d":
        a, B = elasticity2d(size)
        return a, B, None
    a, coords = elasticity3d(size)
    # The Jacobi weight of the block preset must satisfy omega * rho < 2 with
    # rho(D_b^-1 A) ~ 2.9; block_config() sets 0.6 whatever the preset says.
    return a, lxa.rigid_body_modes(coords), block_config()


def run(a, B, config, form, *, rtol, repeats, device):
    block = form.startswith("block")
    m = a if block else sp.csr_array(a.tocsr())
    if form == "scalar":
        config = None
    elif form == "scalar-same-config" and config is None:
        config = "PCG_AGGREGATION_BLOCK"  # what the block form gets by default
    options = {"near_nullspace": jnp.asarray(B)} if form.endswith("+rbm") else None
    op = jax.device_put(lxa.CSROperator.from_scipy(m, tags=SPD), device)
    b = jax.device_put(
        jnp.asarray(np.random.default_rng(0).standard_normal(a.shape[0])), device
    )
    solver = lxa.AMGX(config, rtol=rtol)
    f = jax.jit(
        lambda o, v: lx.linear_solve(o, v, solver=solver, options=options, throw=False)
    )
    t0 = time.perf_counter()
    sol = f(op, b)
    jax.block_until_ready(sol.value)
    first = time.perf_counter() - t0  # compile + setup + solve
    values = [op.values * (1.0 + 1e-3 * (k + 1)) for k in range(repeats)]
    jax.block_until_ready(values)
    setup_solve = []
    for v in values:
        t0 = time.perf_counter()
        s = f(op.with_values(v), b)
        jax.block_until_ready(s.value)
        setup_solve.append(time.perf_counter() - t0)
    solve_only = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sol = f(op, b)
        jax.block_until_ready(sol.value)
        solve_only.append(time.perf_counter() - t0)
    x = np.asarray(sol.value)
    rel_res = float(
        np.linalg.norm(np.asarray(b) - a @ x) / np.linalg.norm(np.asarray(b))
    )
    return dict(
        form=form,
        block_size=a.blocksize[0] if block else 1,
        converged=bool(sol.result == lx.RESULTS.successful),
        iterations=int(sol.stats["num_steps"]),
        relative_residual=rel_res,
        first_call_s=first,
        setup_solve_s=statistics.median(setup_solve),
        solve_s=statistics.median(solve_only),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--problem", choices=["elasticity2d", "elasticity3d", "both"], default="both"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--near-nullspace", action="store_true")
    parser.add_argument("--forms", nargs="+", default=None, help="a subset of forms")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    platform = "gpu" if jax.default_backend() == "gpu" else "cpu"
    device = jax.devices()[0]
    names = (
        ["elasticity2d", "elasticity3d"] if args.problem == "both" else [args.problem]
    )
    forms = ["block", "scalar", "scalar-same-config"]
    if args.near_nullspace or platform == "cpu":
        forms += ["block+rbm", "scalar+rbm"]
    if args.forms:
        forms = [f for f in forms if f in args.forms]
    for name in names:
        for size in args.sizes or DEFAULT_SIZES[(name, platform)]:
            a, B, config = problem(name, size)
            for form in forms:
                lxa.clear_cache()
                result = run(
                    a,
                    B,
                    config,
                    form,
                    rtol=args.rtol,
                    repeats=args.repeats,
                    device=device,
                )
                record(
                    args.out,
                    dict(
                        benchmark="blocks",
                        problem=name,
                        size=size,
                        n=a.shape[0],
                        backend="amgx" if platform == "gpu" else "pyamg",
                        rtol=args.rtol,
                        **result,
                    ),
                )


if __name__ == "__main__":
    main()
