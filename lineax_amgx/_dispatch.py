# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Backend dispatch: AmgX through XLA FFI on CUDA devices, pyamg on the host.

Both backends implement the same two calls, with the same shapes and meaning:

- `setup(pattern, values, ok, key) -> token`: AmgX *setup* (or resetup) for these
  values. `token` (int32[2]: cache entry id, generation) names the resident setup.
- `solve(pattern, values, token, b, x0, ok, key) -> (x, info, residual)`: a solve;
  when `token` still names the resident setup no setup runs, otherwise the backend
  sets up from `values` first (a stale token is slow, never wrong). `info` is
  int32[2] = (status, iterations); `residual` the final residual norm.

`ok` is an int32 scalar, 0 when an input holds NaN or Inf: the backend then skips
AmgX and reports `STATUS_NONFINITE`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._pattern import SparsityPattern

STATUS_SUCCESS = 0
STATUS_FAILED = 1
STATUS_DIVERGED = 2
STATUS_NOT_CONVERGED = 3
STATUS_NONFINITE = 4

MODES = {"dDDI": 8193, "dDFI": 8449, "dFFI": 8465}


class SolveKey(NamedTuple):
    """Everything static about a solve (hashable; part of the cache key)."""

    config: str  # finalised AmgX JSON
    mode: str  # "dDDI" | "dDFI" | "dFFI"
    transposed: bool
    verbose: bool
    backend: str  # "auto" | "amgx" | "pyamg"


def invalid_token():
    return jnp.array([-1, -1], dtype=jnp.int32)


def _finite(*arrays) -> jax.Array:
    ok = jnp.array(True)
    for a in arrays:
        if a is not None:
            ok = ok & jnp.all(jnp.isfinite(a))
    return ok.astype(jnp.int32)


def _impls(key: SolveKey):
    from . import _cpu, _ffi

    return _ffi, _cpu


def setup(pattern: SparsityPattern, values, key: SolveKey):
    ok = _finite(values)
    gpu, cpu = _impls(key)
    if key.backend == "pyamg":
        return cpu.setup(pattern, values, ok, key)
    if key.backend == "amgx":
        return gpu.setup(pattern, values, ok, key)
    return _platform_dependent(gpu.setup, cpu.setup, pattern, values, ok, key)


def solve(pattern: SparsityPattern, values, token, b, x0, key: SolveKey):
    ok = _finite(values, b, x0)
    gpu, cpu = _impls(key)
    if key.backend == "pyamg":
        return cpu.solve(pattern, values, token, b, x0, ok, key)
    if key.backend == "amgx":
        return gpu.solve(pattern, values, token, b, x0, ok, key)
    return _platform_dependent(
        gpu.solve, cpu.solve, pattern, values, token, b, x0, ok, key
    )


def _platform_dependent(gpu_fn, cpu_fn, pattern, *args):
    """Choose the backend by the platform the computation is lowered for, i.e.
    where the data lives (not `jax.default_backend()`)."""
    *arrays, key = args
    return jax.lax.platform_dependent(
        *arrays,
        cuda=lambda *a: gpu_fn(pattern, *a, key),
        default=lambda *a: cpu_fn(pattern, *a, key),
    )
