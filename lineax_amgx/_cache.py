# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Public cache controls: one view over the native AmgX cache and the CPU cache."""

from __future__ import annotations

import os
from typing import Any

from ._backends import pyamg as _pyamg
from ._backends.amgx import _library

_COUNTERS = (*_library.codes.COUNTER_NAMES, "device_switches")


def cache_info(backend: str | None = None) -> dict[str, Any]:
    """Counters and entries of the setup caches.

    With `backend=None` (default) the two caches are summed: `"amgx"` (the native
    AmgX cache, GPU) and `"pyamg"` (the CPU hierarchy cache); pass a name to get one.

    **Returns:** a dict with `capacity`, `size`, `isolated`, the totals `hits`,
    `misses`, `setups`, `resetups`, `solves`, `evictions`, `device_switches`, and
    `entries`: one summary per resident setup (shape, nnz, block size, mode, config
    digest, fingerprint, its own counters, and for AmgX the GPU bytes and last
    setup/solve seconds).

    `runtime_arrays` (with `backend=None`): the structure arrays (column
    indices, row ids, permutations, ...) that compiled programs read at run time
    instead of holding them as constants: how many are registered, their host
    bytes, and their device copies (one per array and GPU, made at first use,
    freed by `clear_cache`).

    `device_switches` (AmgX): AmgX 2.5 keeps one cuBLAS and one cuSPARSE handle
    per process, so a process runs AmgX on one GPU at a time. A setup on another
    GPU first frees every setup of the previous one (counted in `evictions`);
    each such switch is counted here. For work on several GPUs, use one process
    per GPU.
    """
    infos = {}
    if backend in (None, "amgx"):
        infos["amgx"] = dict(_library.native().cache_info(), backend="amgx")
    if backend in (None, "pyamg"):
        infos["pyamg"] = dict(_pyamg.cache_info(), backend="pyamg")
    if backend is not None:
        if backend not in infos:
            raise ValueError(
                f"backend must be 'amgx', 'pyamg' or None, got {backend!r}."
            )
        return infos[backend]
    out: dict[str, Any] = {
        "capacity": infos["amgx"]["capacity"],
        "isolated": infos["amgx"]["isolated"],
        "size": sum(i["size"] for i in infos.values()),
        "entries": [e | {"backend": name} for name, i in infos.items()
                    for e in i["entries"]],
    }
    for c in _COUNTERS:
        out[c] = sum(i.get(c, 0) for i in infos.values())
    out["backends"] = infos
    out["runtime_arrays"] = _library.native().runtime_array_info()
    return out


def clear_cache() -> None:
    """Free every cached setup (AmgX objects and their GPU memory; pyamg
    hierarchies) and the GPU copies of the operators' structure arrays (compiled
    programs upload them again when they next run). Counters are kept. The setups
    of distributed operators (MPI) are not freed here, since destroying them is
    collective: call `lineax_amgx.distributed.clear_cache(comm)` on every rank for
    those."""
    native = _library.native()
    native.clear_cache()
    native.release_runtime_array_copies()
    _pyamg.clear_cache()


def set_cache_size(n: int, *, entries_per_key: int | None = None) -> None:
    """Set the capacity of the setup caches (entries beyond it are evicted, least
    recently used first). `0` is isolated mode: every solve creates and destroys its
    own AmgX objects (for debugging). `entries_per_key > 1` keeps several setups of
    one pattern and config resident (operators that alternate on one mesh); by
    default the AmgX cache keeps one (new values reset it up) and the CPU cache four
    (its rebuilds are cheap to keep)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"cache size must be >= 0, got {n}.")
    if entries_per_key is not None and entries_per_key < 1:
        raise ValueError(f"entries_per_key must be >= 1, got {entries_per_key}.")
    _library.native().set_cache_size(
        n, 1 if entries_per_key is None else entries_per_key
    )
    _pyamg.set_cache_size(n, entries_per_key)


def reset_counters() -> None:
    """Zero the total counters (entries keep theirs)."""
    _library.native().reset_counters()
    _pyamg.reset_counters()


def finalize() -> None:
    """Free every cached setup and the GPU copies of structure arrays, and shut
    AmgX down (`AMGX_finalize`). Idempotent; the next solve initialises AmgX
    again."""
    native = _library.native()
    native.release_runtime_array_copies()
    native.finalize()
    _pyamg.clear_cache()


def _apply_environment() -> None:
    size = os.environ.get("LINEAX_AMGX_CACHE_SIZE")
    if size is not None and size.strip():
        try:
            value = int(size)
        except ValueError:
            raise ValueError(
                f"LINEAX_AMGX_CACHE_SIZE must be an integer, got {size!r}."
            ) from None
        set_cache_size(value)
