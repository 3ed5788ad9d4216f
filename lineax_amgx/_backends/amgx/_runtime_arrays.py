# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The lowering of runtime arrays (`lineax_amgx._runtime_arrays`): an XLA FFI call
into the native core, which holds the registered host arrays (csrc/runtime_arrays.h).

Its CPU handler copies the host array into the result; its CUDA handler uploads it
once per device and then copies it on the device, on XLA's stream. Neither needs
AmgX, so CPU-only installs (CI) use them too.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
from jax.interpreters import mlir

from ... import _runtime_arrays
from .. import _native
from . import _library

TARGET = _native.RUNTIME_ARRAY_TARGET
_ffi_rule = jax.ffi.ffi_lowering(TARGET)
_lock = threading.Lock()
_registered: list[bool] = []


def _register_targets() -> None:
    """Register the FFI handlers (once, at the first lowering: not at import,
    which must not start JAX's backends): the CPU one always, the CUDA one where
    JAX has a CUDA backend."""
    if _registered:
        return
    with _lock:
        if _registered:
            return
        handlers = _native.runtime_array_handlers()
        jax.ffi.register_ffi_target(TARGET, handlers["cpu"], platform="cpu")
        if _library.has_cuda_backend():
            jax.ffi.register_ffi_target(TARGET, handlers["CUDA"], platform="CUDA")
        _registered.append(True)


def _lowering(ctx, *, array: _runtime_arrays.RuntimeArray):
    _register_targets()
    _runtime_arrays.ensure_native(array)
    # The executable holds the entry (and so the native registration) for as
    # long as it may run.
    ctx.module_context.add_keepalive(array)
    return _ffi_rule(ctx, key=np.int64(array.key))


mlir.register_lowering(_runtime_arrays.runtime_array_p, _lowering)
_runtime_arrays.install(_native)
