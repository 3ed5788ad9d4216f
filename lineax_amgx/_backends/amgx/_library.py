# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Finding and loading AmgX at run time; registering FFI targets and patterns."""

from __future__ import annotations

import atexit
import ctypes
import glob
import os
import sys
import threading
import weakref

from ..._pattern import SparsityPattern

_LIB_NAME = "libamgxsh.so"
# Libraries AmgX links against; preloaded from known CUDA locations when the loader
# path does not have them (e.g. a CUDA toolkit that is not on LD_LIBRARY_PATH).
_CUDA_DEPS = ("libcublasLt.so.13", "libcublas.so.13", "libcusparse.so.12",
              "libcusolver.so.12", "libcublasLt.so.12", "libcublas.so.12",
              "libcusparse.so.11", "libcusolver.so.11")

_lock = threading.RLock()
_state = {"registered": False, "attempted": False, "error": None, "path": None}
_pattern_refs: dict[int, int] = {}


class AmgXNotFoundError(RuntimeError):
    """AmgX (libamgxsh.so) or a library it needs could not be loaded."""


def native():
    """The compiled extension, or a clear error if the package was not built."""
    try:
        from . import _native
    except ImportError as e:  # pragma: no cover - a broken install
        raise ImportError(
            "lineax_amgx's native extension is missing; reinstall with "
            "`pip install .` (a C++17 compiler is all it needs)."
        ) from e
    return _native


def candidate_paths() -> list[tuple[str, str]]:
    """Where AmgX is looked for, in order: (path, why)."""
    out = []
    lib = os.environ.get("LINEAX_AMGX_LIBRARY")
    if lib:
        out.append((lib, "LINEAX_AMGX_LIBRARY"))
    amgx_dir = os.environ.get("AMGX_DIR")
    if amgx_dir:
        for sub in ("lib", "lib64", "build", ""):
            out.append((os.path.join(amgx_dir, sub, _LIB_NAME), "AMGX_DIR"))
    out.append((_LIB_NAME, "loader path"))
    return out


def _cuda_lib_dirs() -> list[str]:
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        root = os.environ.get(var)
        if root:
            dirs += [os.path.join(root, "lib64"), os.path.join(root, "lib")]
    dirs += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "lib"))
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "lib"))
    seen, unique = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            unique.append(d)
    return unique


def _preload_cuda_deps() -> None:
    for name in _CUDA_DEPS:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            continue
        except OSError:
            pass
        for d in _cuda_lib_dirs():
            path = os.path.join(d, name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    pass


def load() -> str:
    """Load AmgX (once). Returns its path; raises `AmgXNotFoundError` otherwise."""
    with _lock:
        n = native()
        if n.is_loaded():
            return n.library_info()["path"]
        _preload_cuda_deps()
        errors = []
        for path, why in candidate_paths():
            if os.path.sep in path and not os.path.exists(path):
                errors.append(f"{path} ({why}): no such file")
                continue
            try:
                n.load(path)
                _state["path"] = path
                _state["error"] = None
                return path
            except RuntimeError as e:
                errors.append(f"{path} ({why}): {e}")
        msg = (
            "AmgX could not be loaded. Set LINEAX_AMGX_LIBRARY to the path of "
            "libamgxsh.so, or AMGX_DIR to AmgX's install or build directory, or put "
            "libamgxsh.so on the loader path (LD_LIBRARY_PATH). Tried:\n  "
            + "\n  ".join(errors)
            + "\nTo solve on the CPU instead, use AMGX(backend='pyamg') with arrays "
            "on the host."
        )
        _state["error"] = msg
        raise AmgXNotFoundError(msg)


def try_load() -> str | None:
    try:
        return load()
    except AmgXNotFoundError:
        return None


def register_ffi_targets() -> None:
    """Register the FFI handlers for the CUDA platform (no AmgX needed for this:
    a missing AmgX is reported when a handler runs)."""
    import jax

    with _lock:
        if _state["registered"]:
            return
        for name, capsule in native().registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _state["registered"] = True
        # Shut AmgX down before the interpreter (and CUDA) tear down. Registered
        # after JAX's own hooks, so it runs before them.
        atexit.register(_finalize_at_exit)
        # Try to load AmgX now so that the handler finds it; a failure is kept
        # and reported by the handler (and by `info()`).
        try_load()


def _finalize_at_exit() -> None:
    # After a CUDA fault inside AmgX the native core leaks instead of tearing
    # down, and leaves the process at exit() before AmgX's static destructors
    # (which would throw and abort): see `exit_without_amgx_teardown` in core.cc.
    try:
        n = native()
        if n.is_initialized():
            n.finalize()
    except Exception:  # pragma: no cover - best effort at exit
        pass


def _release_pattern(fingerprint: int) -> None:
    with _lock:
        count = _pattern_refs.get(fingerprint, 0) - 1
        if count <= 0:
            _pattern_refs.pop(fingerprint, None)
            try:
                native().unregister_pattern(fingerprint)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass
        else:
            _pattern_refs[fingerprint] = count


def register_pattern(pattern: SparsityPattern) -> None:
    """Give the native core the host structure of `pattern` (once per object)."""
    if getattr(pattern, "_native_registered", False):
        return
    with _lock:
        if getattr(pattern, "_native_registered", False):
            return
        native().register_pattern(
            pattern.fingerprint,
            pattern.indptr,
            pattern.indices,
            pattern.block_rows,
            pattern.block_cols,
            pattern.block_size,
        )
        fp = pattern.fingerprint
        _pattern_refs[fp] = _pattern_refs.get(fp, 0) + 1
        pattern._native_registered = True
        weakref.finalize(pattern, _release_pattern, pattern.fingerprint)


_cuda_backend: list[bool] = []


def has_cuda_backend() -> bool:
    """Whether JAX has a CUDA backend in this process (cached)."""
    if not _cuda_backend:
        import jax

        try:
            _cuda_backend.append(len(jax.devices("cuda")) > 0)
        except RuntimeError:
            _cuda_backend.append(False)
    return _cuda_backend[0]


def load_error() -> str | None:
    return _state["error"]
