# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`info()`: what this process can solve with."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from ._backends.amgx import _library

# Distributions whose versions `info()` reports (distribution name -> key).
_PACKAGES = (
    ("lineax-amgx", "lineax_amgx"),
    ("jax", "jax"),
    ("jaxlib", "jaxlib"),
    ("lineax", "lineax"),
    ("equinox", "equinox"),
    ("pyamg", "pyamg"),
    ("scipy", "scipy"),
    ("numpy", "numpy"),
)


class Info(dict):
    """The dict returned by [`lineax_amgx.info`][]; `str()` (and so `print`)
    gives a readable report, `repr()` the plain dict."""

    def __str__(self) -> str:
        amgx = self.get("amgx", {})
        versions = self.get("versions", {})
        lines = ["lineax-amgx " + str(versions.get("lineax_amgx", "?"))]
        lines.append(
            "  versions: "
            + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "lineax_amgx")
        )
        if amgx.get("loaded"):
            lines.append(
                f"  AmgX: {amgx.get('version') or 'loaded'} from {amgx.get('path')}"
            )
        else:
            reason = str(amgx.get("error") or "not loaded").splitlines()[0]
            reason = reason.removesuffix(" Tried:")
            lines.append(f"  AmgX: not available ({reason})")
        devices = self.get("cuda_devices") or []
        if devices:
            lines.append("  CUDA devices: " + ", ".join(map(str, devices)))
        else:
            why = str(self.get("cuda_error") or "none").splitlines()[0]
            lines.append(f"  CUDA devices: none ({why})")
        lines.append("  JAX devices: " + ", ".join(self.get("jax_devices", [])))
        lines.append(
            f"  a solve with AMGX() on the default device uses: "
            f"{self.get('default_backend')}"
        )
        if self.get("default_backend_error"):
            lines.append("  warning: " + self["default_backend_error"].splitlines()[0])
        return "\n".join(lines)


def _versions(amgx_version: Any) -> dict[str, str]:
    out = {}
    for dist, key in _PACKAGES:
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "not installed"
    out["amgx"] = str(amgx_version) if amgx_version else "not loaded"
    out["python"] = platform.python_version()
    return out


def info(verbose: bool = False) -> Info:
    """Which AmgX library was found (path, version), which CUDA devices JAX and the
    driver see, which backend a solve with [`lineax_amgx.AMGX`][] would use for
    arrays on the default device — or why AmgX is not available — and the versions
    of the packages involved. Include `print(lineax_amgx.info())` in bug reports.

    **Arguments:**

    - `verbose`: also print the readable report (what `print(info())` shows).

    **Returns:** a dict (an `Info`, whose `str()` is the readable report) with keys
    `versions` (`lineax_amgx`, `jax`, `jaxlib`, `lineax`, `equinox`, `pyamg`,
    `scipy`, `numpy`, `amgx`, `python`), `amgx` (`loaded`, `path`, `version`,
    `error`, ...), `cuda_devices` (names; empty with a `cuda_error` when there
    are none), `jax_devices`, and `default_backend` (`"amgx"` or `"pyamg"`).
    """
    import jax

    out = Info()
    path = _library.try_load()
    lib = dict(_library.native().library_info())
    if path is None:
        lib["error"] = _library.load_error()
    amgx_version = (lib.get("version") or lib.get("api_version")) if path else None
    out["versions"] = _versions(amgx_version)
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
    if verbose:
        print(out)
    return out
