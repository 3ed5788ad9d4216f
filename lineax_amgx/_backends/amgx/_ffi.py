# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The GPU backend: AmgX through XLA FFI handlers of the native core."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..._pattern import SparsityPattern
from ..contract import MODES, SolveKey, solve_result_shapes
from . import _complex, _library


def _attrs(pattern: SparsityPattern, key: SolveKey) -> dict:
    return dict(
        fingerprint=np.int64(pattern.fingerprint),
        config=key.config,
        mode=np.int32(MODES[key.mode]),
        transposed=np.int32(key.transposed),
        verbose=np.int32(key.verbose),
    )


def prepare_native() -> bool:
    """Trace time: register the FFI targets and refuse after a lost CUDA context.
    False on machines without a CUDA backend (`lax.platform_dependent` traces the
    CUDA branch there too; it never runs)."""
    if not _library.has_cuda_backend():
        return False
    _library.register_ffi_targets()
    broken = _library.native().poisoned()
    if broken:
        # Refuse at trace time: compiling a new program on a broken context
        # fails inside XLA (its autotuner) with a message that names neither
        # AmgX nor the fix.
        raise RuntimeError(
            f"AmgX cannot run: {broken}. (backend='pyamg' still solves on "
            "the CPU in this process.)"
        )
    return True


def _prepare(pattern: SparsityPattern) -> None:
    if prepare_native():
        _library.register_pattern(pattern)


def setup(pattern: SparsityPattern, values, ok, key: SolveKey):
    token = jax.ShapeDtypeStruct((2,), jnp.int32)
    refused = _complex.refused(key.mode, token)  # complex modes (see _complex)
    if refused is not None:
        return refused
    _prepare(pattern)
    call = jax.ffi.ffi_call(
        _library.codes.FFI_TARGETS["setup"], token, vmap_method="sequential"
    )
    return call(values, ok, refusal=key.refusal, **_attrs(pattern, key))


def solve(pattern: SparsityPattern, values, token, b, x0, ok, key: SolveKey):
    refused = _complex.refused(key.mode, solve_result_shapes(b))
    if refused is not None:
        return refused
    _prepare(pattern)
    call = jax.ffi.ffi_call(
        _library.codes.FFI_TARGETS["solve"],
        solve_result_shapes(b),
        vmap_method="sequential",
    )
    has_x0 = x0 is not None
    return call(
        values, token, b, x0 if has_x0 else b, ok,
        has_x0=np.int32(has_x0), **_attrs(pattern, key),
    )
