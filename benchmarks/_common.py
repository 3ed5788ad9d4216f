"""Shared helpers of the benchmarks (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import numpy as np


def poisson_args(description: str | None = None):
    """The command line shared by the 3D-Poisson benchmarks (and x64 on)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--config", default="PCG_AGGREGATION")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    return args


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def median_time(fn, *, repeats: int = 7, warmup: int = 2) -> tuple[float, list[float]]:
    """Median wall time of `fn()` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def poisson3d(n: int):
    """7-point Laplacian on an n^3 grid (CSR, float64), built with vectorised NumPy."""
    import scipy.sparse as sp

    one = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n), format="csr")
    eye = sp.eye(n, format="csr")
    a = sp.kron(sp.kron(one, eye), eye) + sp.kron(sp.kron(eye, one), eye) + sp.kron(
        sp.kron(eye, eye), one
    )
    a = sp.csr_array(a)
    a.sort_indices()
    return a


def record(path: str | None, result: dict) -> None:
    result = dict(result, device=device_name(), host=platform.node(),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), jax=jax.__version__)
    print(json.dumps(result))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


def amgx_entry(transposed: bool = False) -> dict:
    import lineax_amgx as lxa

    info = lxa.cache_info("amgx")
    entries = [e for e in info["entries"] if e["transposed"] == transposed]
    return entries[0] if entries else {}


def to_numpy(x):
    return np.asarray(jax.device_get(x))
