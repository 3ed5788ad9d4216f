# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""Sparsity detection and coloring: lineax-amgx side by side with asdex.

Run from the repository root:

    PYTHONPATH=. python benchmarks/sparsity.py [--sizes 64k,1M] [--no-asdex]

Residuals are the 2-D 5-point and 3-D 7-point Laplacians plus a cubic term,
written with `jnp.pad` and slicing (what a user writes). Times are wall-clock
seconds of one call after one warm-up call on a smaller problem (JAX and numba
compilation excluded); detection never uses the pattern memo.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lineax_amgx import color_columns, detect_sparsity


def lap2(n):
    def f(u):
        v = u.reshape(n, n)
        vp = jnp.pad(v, 1)
        return (vp[2:, 1:-1] + vp[:-2, 1:-1] + vp[1:-1, 2:] + vp[1:-1, :-2]
                - 4 * v + v**3).ravel()

    return f


def lap3(n):
    def f(u):
        v = u.reshape(n, n, n)
        vp = jnp.pad(v, 1)
        return (vp[2:, 1:-1, 1:-1] + vp[:-2, 1:-1, 1:-1] + vp[1:-1, 2:, 1:-1]
                + vp[1:-1, :-2, 1:-1] + vp[1:-1, 1:-1, 2:] + vp[1:-1, 1:-1, :-2]
                - 6 * v + v**3).ravel()

    return f


CASES = {
    "64k": [("2D 5-point", lap2, 256, 2), ("3D 7-point", lap3, 40, 3)],
    "1M": [("2D 5-point", lap2, 1000, 2), ("3D 7-point", lap3, 100, 3)],
}


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64k,1M")
    parser.add_argument("--no-asdex", action="store_true")
    args = parser.parse_args()
    asdex = None
    if not args.no_asdex:
        try:
            import asdex
        except ImportError:
            print("asdex not installed: showing lineax-amgx only")
    # warm-up (compilation of helpers, numba caches)
    for _, make, _, d in CASES["64k"]:
        f = make(8 if d == 2 else 4)
        x = jnp.ones(64 if d == 2 else 64)
        p = detect_sparsity(f, x, memo=False)
        color_columns(p)
        if asdex is not None:
            ap = asdex.jacobian_sparsity(f, x)
            asdex.color_cols(ap)
    rows = []
    for size in args.sizes.split(","):
        for name, make, n, d in CASES[size]:
            f = make(n)
            x = jnp.ones(n**d)
            t_det, p = _time(lambda: detect_sparsity(f, x, memo=False))
            t_col, c = _time(lambda: color_columns(p))
            row = [size, name, f"{t_det:.2f}", f"{t_col:.2f}",
                   f"{t_det + t_col:.2f}", str(c.num_colors), str(d * 2 + 1)]
            if asdex is not None:
                ta_det, ap = _time(lambda: asdex.jacobian_sparsity(f, x))
                ta_col, (_, ka) = _time(lambda: asdex.color_cols(ap))
                same = ap.nnz == p.nnz
                row += [f"{ta_det:.2f}", f"{ta_col:.2f}", str(ka),
                        f"{(ta_det + ta_col) / (t_det + t_col):.1f}x",
                        "yes" if same else "no"]
            rows.append(row)
            print("  ".join(row), flush=True)
    head = ["size", "residual", "detect [s]", "color [s]", "total [s]", "colors",
            "bound"]
    if asdex is not None:
        head += ["asdex detect [s]", "asdex color [s]", "asdex colors", "speed-up",
                 "same nnz"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    from importlib.metadata import version

    extra = f", asdex {version('asdex')}" if asdex is not None else ""
    print(f"\njax {jax.__version__}, numpy {np.__version__}{extra}")


if __name__ == "__main__":
    main()
