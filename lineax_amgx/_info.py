# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`info()`: what this process can solve with."""

from __future__ import annotations

from typing import Any

from ._backends.amgx import _library


def info() -> dict[str, Any]:
    """Which AmgX library was found (path, version), which CUDA devices JAX and the
    driver see, and which backend a solve with `AMGX()` would use for arrays on the
    default device — or why AmgX is not available.

    **Returns:** a dict with keys `amgx` (`loaded`, `path`, `version`, `error`, ...),
    `cuda_devices` (names, or the reason there are none), `jax_devices`, and
    `default_backend` (`"amgx"` or `"pyamg"`).
    """
    import jax

    out: dict[str, Any] = {}
    path = _library.try_load()
    lib = dict(_library.native().library_info())
    if path is None:
        lib["error"] = _library.load_error()
    out["amgx"] = lib
    try:
        out["cuda_devices"] = list(_library.native().cuda_devices())
    except RuntimeError as e:
        out["cuda_devices"] = []
        out["cuda_error"] = str(e)
    out["jax_devices"] = [str(d) for d in jax.devices()]
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    out["default_backend"] = "amgx" if on_gpu else "pyamg"
    if on_gpu and path is None:
        out["default_backend_error"] = (
            "Arrays on the default (CUDA) device would use AmgX, which is not "
            "available: " + str(lib.get("error"))
        )
    return out
