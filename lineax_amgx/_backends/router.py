# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The router: picks a backend for each setup and solve, at run time.

`AMGX(backend="auto")` follows the data: `lax.platform_dependent` lowers the AmgX
branch for CUDA arrays and the pyamg branch for anything else (both are traced;
only one runs). `backend="amgx"` / `"pyamg"` forces one. Which implementation of
a backend serves a pattern (single-process, or one rank's rows of a distributed
matrix) is looked up in the contract's registry by the pattern's type.

AmgX's complex modes are not called (`amgx/_complex.py`: measured not to converge
or to crash the process): `backend="amgx"` refuses a complex solve when it is
traced, the AmgX branch of `"auto"` when it is compiled for a CUDA device.

AmgX has no near-null-space input: the GPU branch drops `near_nullspace`, with a
one-time `NearNullspaceWarning` (not when the solver added it itself,
`quiet_near_nullspace=True`: a null space, passed on to pyamg's coarsening).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _blocks
from . import amgx as _amgx, pyamg as _pyamg  # noqa: F401 - register the backends
from .amgx import _complex, _library
from .contract import SolveKey, lookup, refuse_if, solve_result_shapes


def _finite(*arrays) -> jax.Array:
    ok = jnp.array(True)
    for a in arrays:
        if a is not None:
            ok = ok & jnp.all(jnp.isfinite(a))
    return ok.astype(jnp.int32)


def _impls(pattern):
    """The `(amgx, pyamg)` backends registered for `pattern`'s kind."""
    return lookup("amgx", pattern), lookup("pyamg", pattern)


def setup(
    pattern, values, key: SolveKey, near_nullspace=None, *, ok=None, refuse=None,
    quiet_near_nullspace=False,
):
    """`ok` (bool or int32 scalar) may be given when the caller has already
    checked the values; otherwise they are checked here. `refuse` (a traced bool
    or `None`): the setup raises `key.refusal` where it is true."""
    ok = refuse_if(_finite(values) if ok is None else ok, refuse)
    gpu, cpu = _impls(pattern)
    args = (pattern, values, ok, key, near_nullspace)
    return _route(key, gpu.setup, cpu.setup, _setup_not_on_cuda, args,
                  quiet_near_nullspace)


def solve(
    pattern,
    values,
    token,
    b,
    x0,
    key: SolveKey,
    near_nullspace=None,
    *,
    ok=None,
    quiet_near_nullspace=False,
):
    ok = _finite(values, b, x0) if ok is None else jnp.asarray(ok).astype(jnp.int32)
    gpu, cpu = _impls(pattern)
    args = (pattern, values, token, b, x0, ok, key, near_nullspace)
    return _route(key, gpu.solve, cpu.solve, _solve_not_on_cuda, args,
                  quiet_near_nullspace)


def _route(key: SolveKey, gpu_fn, cpu_fn, not_on_cuda, args, quiet=False):
    """One backend call: `cpu_fn` for `"pyamg"`; for `"amgx"` the CUDA branch
    (and, lowered for another platform, `not_on_cuda`: a clear error when it
    runs); for `"auto"` the branch of the platform the data lives on."""
    backend = key.backend
    if backend == "pyamg":
        return cpu_fn(*args)
    if backend == "amgx":
        # AmgX's complex modes are refused now (with backend="auto", when the
        # AmgX branch is compiled: see _backends/amgx/_complex.py).
        _complex.check(key.mode)
        return _platform_dependent(
            _gpu(gpu_fn, explicit=True, quiet=quiet), _drop_nns(not_on_cuda), *args
        )
    return _platform_dependent(_gpu(gpu_fn, quiet=quiet), cpu_fn, *args)


def _gpu(fn, explicit: bool = False, quiet: bool = False):
    """The GPU entry point `fn` without the CPU-only `near_nullspace` argument
    (dropped with a one-time warning, unless `quiet`)."""

    def call(pattern, *args):
        *args, key, near_nullspace = args
        # With backend="auto" this branch is traced on every machine (see
        # `_platform_dependent`): warn only where it can run.
        if near_nullspace is not None and not quiet and (explicit or _has_cuda()):
            _blocks.warn_near_nullspace_ignored()
        return fn(pattern, *args, key)

    return call


def _drop_nns(fn):
    def call(pattern, *args):
        *args, key, _ = args
        return fn(pattern, *args, key)

    return call


def _has_cuda() -> bool:
    return _library.has_cuda_backend()


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


def check_available(backend: str) -> None:
    """Refuse `backend="amgx"` up front where JAX sees no CUDA device."""
    if backend == "amgx" and not _library.has_cuda_backend():
        raise RuntimeError(
            "AMGX(backend='amgx') needs a CUDA device, but JAX sees none (devices: "
            f"{jax.devices()}). Install a CUDA build of jaxlib, or use "
            "backend='auto' (AmgX for arrays on a CUDA device, pyamg for arrays on "
            "the CPU) or backend='pyamg'."
        )
