# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Backend dispatch: AmgX through XLA FFI on CUDA devices, pyamg on the host.

Both backends implement the same two calls, with the same shapes and meaning:

- `setup(pattern, values, ok, key) -> token`: AmgX *setup* (or resetup) for these
  values. `token` (int32[2]: cache entry id, generation) names the resident setup.
- `solve(pattern, values, token, b, x0, ok, key) -> (x, info, residual)`: a solve;
  when `token` still names the resident setup no setup runs, otherwise the backend
  sets up from `values` first (a stale token is slow, never wrong). `info` is
  int32[2] = (status, iterations); `residual` the final residual norm.

`ok` is an int32 scalar, 0 when an input holds NaN or Inf (or the matrix has a
zero row): the backend then skips AmgX and reports `STATUS_NONFINITE`.

The CPU backend takes one more, optional argument, `near_nullspace` (an `(n, k)`
array or `None`: `options["near_nullspace"]`, pyamg's `B`). AmgX has no such
input: the GPU backend drops it, with a one-time `NearNullspaceWarning`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._library import codes as _codes
from ._pattern import SparsityPattern

# Defined once, in the native core (csrc/codes.h).
STATUS_SUCCESS: int = _codes.STATUS_SUCCESS
STATUS_FAILED: int = _codes.STATUS_FAILED
STATUS_DIVERGED: int = _codes.STATUS_DIVERGED
STATUS_NOT_CONVERGED: int = _codes.STATUS_NOT_CONVERGED
STATUS_NONFINITE: int = _codes.STATUS_NONFINITE

MODES: dict[str, int] = dict(_codes.MODES)


class SolveKey(NamedTuple):
    """Everything static about a solve (hashable; part of the cache key)."""

    config: str  # finalised AmgX JSON
    mode: str  # "dDDI" | "dDFI" | "dFFI"
    transposed: bool
    verbose: bool
    backend: str  # "auto" | "amgx" | "pyamg"


def invalid_token():
    return jnp.array([-1, -1], dtype=jnp.int32)


def solve_result_shapes(b) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The solve contract's outputs: `x` like `b`, `info = int32[2](status,
    iterations)`, the residual norm as a scalar of `b`'s dtype."""
    return (
        jax.ShapeDtypeStruct(b.shape, b.dtype),
        jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((), b.dtype),
    )


def nonfinite_host_result(shape, dtype) -> tuple[np.ndarray, ...]:
    """A host solve's answer to non-finite input (AmgX is not called): zeros, the
    `STATUS_NONFINITE` status, an infinite residual."""
    return (
        np.zeros(shape, dtype),
        np.array([STATUS_NONFINITE, 0], np.int32),
        np.array(np.inf, dtype),
    )


def host_setup(host, values, ok, *extra):
    """A setup as a host callback: `host(values, ok, *extra)` returns the token
    (`extra` entries that are `None` are not passed)."""
    args = [values, ok, *(e for e in extra if e is not None)]
    args = [jax.lax.stop_gradient(a) for a in args]
    return jax.pure_callback(
        host, jax.ShapeDtypeStruct((2,), jnp.int32), *args, vmap_method="sequential"
    )


def host_solve(host, values, token, b, x0, ok, *extra):
    """A solve as a host callback: `host(values, token, b, ok, [x0], *extra)`
    returns `(x, info, residual)` (`x0` and `extra` entries that are `None` are not
    passed)."""
    args = [values, token, b, ok, *(e for e in (x0, *extra) if e is not None)]
    args = [jax.lax.stop_gradient(a) for a in args]
    return jax.pure_callback(
        host, solve_result_shapes(b), *args, vmap_method="sequential"
    )


def _finite(*arrays) -> jax.Array:
    ok = jnp.array(True)
    for a in arrays:
        if a is not None:
            ok = ok & jnp.all(jnp.isfinite(a))
    return ok.astype(jnp.int32)


def _impls(key: SolveKey, pattern):
    from . import _cpu, _distributed, _ffi

    if isinstance(pattern, _distributed.DistributedPattern):
        # One rank's rows of a distributed matrix: collective backends.
        return _distributed.gpu_backend, _distributed
    return _ffi, _cpu


def setup(
    pattern: SparsityPattern, values, key: SolveKey, near_nullspace=None, *, ok=None
):
    """`ok` (bool or int32 scalar) may be given when the caller has already
    checked the values; otherwise they are checked here."""
    ok = _finite(values) if ok is None else jnp.asarray(ok).astype(jnp.int32)
    gpu, cpu = _impls(key, pattern)
    args = (pattern, values, ok, key, near_nullspace)
    if key.backend == "pyamg":
        return cpu.setup(*args)
    if key.backend == "amgx":
        return _platform_dependent(
            _gpu(gpu.setup, explicit=True), _drop_nns(_setup_not_on_cuda), *args
        )
    return _platform_dependent(_gpu(gpu.setup), cpu.setup, *args)


def solve(
    pattern: SparsityPattern,
    values,
    token,
    b,
    x0,
    key: SolveKey,
    near_nullspace=None,
    *,
    ok=None,
):
    ok = _finite(values, b, x0) if ok is None else jnp.asarray(ok).astype(jnp.int32)
    gpu, cpu = _impls(key, pattern)
    args = (pattern, values, token, b, x0, ok, key, near_nullspace)
    if key.backend == "pyamg":
        return cpu.solve(*args)
    if key.backend == "amgx":
        return _platform_dependent(
            _gpu(gpu.solve, explicit=True), _drop_nns(_solve_not_on_cuda), *args
        )
    return _platform_dependent(_gpu(gpu.solve), cpu.solve, *args)


def _gpu(fn, explicit: bool = False):
    """The GPU entry point `fn` without the CPU-only `near_nullspace` argument
    (dropped with a one-time warning)."""

    def call(pattern, *args):
        *args, key, near_nullspace = args
        # With backend="auto" this branch is traced on every machine (see
        # `_platform_dependent`): warn only where it can run.
        if near_nullspace is not None and (explicit or _has_cuda()):
            from . import _blocks

            _blocks.warn_near_nullspace_ignored()
        return fn(pattern, *args, key)

    return call


def _drop_nns(fn):
    def call(pattern, *args):
        *args, key, _ = args
        return fn(pattern, *args, key)

    return call


def _has_cuda() -> bool:
    from ._library import has_cuda_backend

    return has_cuda_backend()


def _platform_dependent(gpu_fn, cpu_fn, pattern, *args):
    """Choose the backend by the platform the computation is lowered for, i.e.
    where the data lives (not `jax.default_backend()`)."""
    *arrays, key, near_nullspace = args
    return jax.lax.platform_dependent(
        *arrays,
        near_nullspace,
        cuda=lambda *a: gpu_fn(pattern, *a[:-1], key, a[-1]),
        default=lambda *a: cpu_fn(pattern, *a[:-1], key, a[-1]),
    )


_NOT_ON_CUDA = (
    "AMGX(backend='amgx') got arrays on a non-CUDA device, but AmgX runs on "
    "NVIDIA GPUs only. Put the operator and the right-hand side on a GPU "
    "(`jax.device_put(x, jax.devices('cuda')[0])`), or use backend='auto' (pyamg "
    "for arrays on the CPU) or backend='pyamg'."
)


def _raise_not_on_cuda(*_):
    raise RuntimeError(_NOT_ON_CUDA)


def _setup_not_on_cuda(pattern, values, ok, key):
    """`backend="amgx"` lowered for a platform without AmgX: fails when it runs,
    with a message that says why (instead of XLA's "no FFI handler")."""
    del pattern, key
    return jax.pure_callback(
        _raise_not_on_cuda, jax.ShapeDtypeStruct((2,), jnp.int32), values, ok,
        vmap_method="sequential",
    )


def _solve_not_on_cuda(pattern, values, token, b, x0, ok, key):
    del pattern, token, x0, key
    return jax.pure_callback(
        _raise_not_on_cuda, solve_result_shapes(b), values, b, ok,
        vmap_method="sequential",
    )
