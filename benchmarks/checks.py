"""What the symmetry check costs per solve (3D Poisson, tagged symmetric positive
definite, a jitted `lx.linear_solve` with unchanged values: the AmgX solve only,
the cheapest solve and so the largest share for the check).

Under `jit` the values of an operator tagged `lx.symmetric_tag` (or semidefinite)
are checked in `AMGX.init`: one gather through the pattern's mirror permutation,
one pass, and an `eqx.error_if` before the setup. Three programs, timed
interleaved (median of `--repeats`, each call blocked until ready):

- the solve with the check (what users run),
- the same solve traced with the check removed,
- the check alone (jitted by itself: an upper bound, it pays its own dispatch).

    python benchmarks/checks.py               # GPU: 100^3 = 1M unknowns
    python benchmarks/checks.py --n 30        # CPU (pyamg)

Prints `check cost: X ms per solve (Y % of the solve)` (X: the check alone;
Y: X over the solve without the check) and one JSON line (`--out` appends it).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from _common import device_name, poisson3d, record

import lineax_amgx as lxa
from lineax_amgx import _checks


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="grid side (n^3 unknowns)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--config", default="PCG_AGGREGATION")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)

    a = poisson3d(args.n)
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    op = lxa.CSROperator.from_scipy(a, tags=tags)  # the concrete check runs here
    b = jnp.asarray(np.random.default_rng(0).standard_normal(a.shape[0]))
    solver = lxa.AMGX(args.config, rtol=args.rtol)

    def solve(o, v):
        return lx.linear_solve(o, v, solver=solver).value

    with_check = jax.jit(solve)
    without_check = jax.jit(lambda o, v: solve(o, v))  # its own trace
    x = with_check(op, b)
    jax.block_until_ready(x)
    with mock.patch.object(_checks, "symmetry_checked", lambda csr, *o, claim: csr):
        jax.block_until_ready(without_check(op, b))  # traced (and compiled) here
    p = op.pattern
    alone = jax.jit(
        lambda v: _checks.require_symmetric(v, p, v, tags, claim="The operator is")
    )
    jax.block_until_ready(alone(op.values))

    # The traced check fires on a non-symmetric matrix (one entry off its mirror).
    k = int(np.flatnonzero(p.mirror != np.arange(p.nnz))[0])
    bad_values = op.values.at[k].add(1.0)
    quiet = logging.getLogger("jax._src.callback")  # it logs the raising callback
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        jax.block_until_ready(
            jax.jit(lambda v: solve(lxa.CSROperator(p, v, tags), b))(bad_values)
        )
        fired = False
    except Exception as e:  # noqa: BLE001 - the check's error, as JAX wraps it
        fired = "not symmetric" in str(e)
        # On a GPU the failed callback also stays in JAX's runtime tokens, which
        # raise it again at exit: consume it here.
        try:
            jax.effects_barrier()
        except Exception:  # noqa: BLE001, S110
            pass
    finally:
        quiet.setLevel(level)

    def concrete():  # what each CSROperator construction with these tags costs
        _checks.check_symmetric(p, op.values, tags, claim="The operator is")
        return op.values

    on, off, chk, eager = [], [], [], []
    concrete()
    for _ in range(args.repeats):
        on.append(_timed(lambda: with_check(op, b)))
        off.append(_timed(lambda: without_check(op, b)))
        chk.append(_timed(lambda: alone(op.values)))
        eager.append(_timed(concrete))
    t_on, t_off, t_chk, t_eager = (
        statistics.median(t) for t in (on, off, chk, eager)
    )
    resid = float(jnp.linalg.norm(b - op.mv(x)) / jnp.linalg.norm(b))

    print(f"{a.shape[0]:,} unknowns, {a.nnz:,} stored entries on {device_name()}; "
          f"relative residual {resid:.1e}; the check fires on a non-symmetric "
          f"matrix: {fired}")
    print(f"solve with the check:    {t_on * 1e3:9.3f} ms (median of {args.repeats})")
    print(f"solve without the check: {t_off * 1e3:9.3f} ms")
    print(f"difference:              {(t_on - t_off) * 1e3:9.3f} ms (timing noise "
          f"included)")
    print(f"construction-time check (concrete values, per CSROperator): "
          f"{t_eager * 1e3:.3f} ms")
    print(f"check cost: {t_chk * 1e3:.3f} ms per solve "
          f"({100 * t_chk / t_off:.2f} % of the solve)")
    record(args.out, {
        "benchmark": "symmetry_check_cost",
        "n": a.shape[0], "nnz": int(a.nnz), "config": args.config,
        "rtol": args.rtol, "repeats": args.repeats,
        "solve_with_check_s": t_on, "solve_without_check_s": t_off,
        "check_alone_s": t_chk, "construction_check_s": t_eager,
        "check_percent": 100 * t_chk / t_off,
        "relative_residual": resid, "check_fires": fired,
    })


if __name__ == "__main__":
    main()
