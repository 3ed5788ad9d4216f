"""Per-row reductions over a CSR matrix in JAX: the row layout against the segment
sum (3D 7-point Poisson).

What every fresh `lx.linear_solve` with AMGX runs in JAX besides AmgX: a zero-row
and finiteness check of the values (before the setup) and a true-residual mat-vec
(after the solve). Both reduce per row. A segment sum (`jax.ops.segment_sum` /
`segment_max` by row id) is a scatter: atomics on a GPU. The row layout
(`SparsityPattern.row_layout`, `_operator.row_slots`) reads each row's entries as
`(rows, max_row_length)` from `indptr`, one fused pass and no atomics. Both are
timed here, jitted, after warm-up, median of `--repeats`, blocked until ready.

    python benchmarks/rows.py --sizes 100 200
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from _common import device_name, poisson3d, poisson_args, record

import lineax_amgx as lxa
from lineax_amgx import _solver
from lineax_amgx._pattern import SparsityPattern


def timed(fn, arg, repeats):
    jax.block_until_ready(fn(arg))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    args = poisson_args(__doc__)
    for n in args.sizes:
        a = poisson3d(n)
        op = lxa.CSROperator.from_scipy(a)
        x = jnp.asarray(np.random.default_rng(0).standard_normal(a.shape[0]))
        ref = a @ np.asarray(x)
        row = {"benchmark": "rows", "n": a.shape[0], "nnz": a.nnz}
        for layout in (True, False):
            with mock.patch.object(SparsityPattern, "row_layout", layout):
                mv = jax.jit(lambda o, v: o.mv(v))
                checks = jax.jit(lambda v: _solver._value_checks(op.pattern, v))
                t_mv = timed(lambda v: mv(op, v), x, args.repeats)
                t_checks = timed(checks, op.values, args.repeats)
                err = float(np.abs(np.asarray(mv(op, x)) - ref).max())
            name = "row_layout" if layout else "segment"
            row[f"{name}_mv_s"], row[f"{name}_checks_s"] = t_mv, t_checks
            print(f"{a.shape[0]:>10,} unknowns  {name:10s}  mv {t_mv * 1e3:7.3f} ms  "
                  f"zero-row/finite checks {t_checks * 1e3:7.3f} ms  "
                  f"(max error {err:.1e}) on {device_name()}")
        record(args.out, row)


if __name__ == "__main__":
    main()
