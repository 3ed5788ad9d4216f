# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Runtime arrays: static host arrays that compiled programs read at run time.

A sparsity pattern is static (known at trace time), and so are the arrays derived
from it: column indices, row ids, the transposition permutation, coloring and
decompression tables, halo plans. Written into traced code as `jnp.asarray(a)` they
become HLO constants, and XLA copies and folds O(nnz) literals in every program
that touches the operator (12 s to compile a solve at 8M unknowns; see
docs/development/architecture.md, "Runtime arrays").

`runtime_array(owner, parts, value)` instead binds `runtime_array_p`, a primitive
with **no operands** whose abstract value is `value`'s shape and dtype and whose
only parameter is a 64-bit key naming the content (derived from `parts`, e.g. a
pattern's fingerprint and the array's name). So:

- the jaxpr carries the key, never the array: equal patterns give equal jaxprs
  (one trace-cache hit, one compiled program), whether the operator is an argument
  of `jit` or closed over;
- under `vmap` it is never batched and under `jvp`/`grad` it has no tangent
  (a primitive without operands is bound at the outer level, as JAX does for any
  primitive whose inputs are all unbatched / without tangents);
- the lowering (registered by the native backend: `_backends/amgx/_runtime_arrays.py`)
  is an XLA FFI call whose handler copies the registered host array (CPU) or a
  device copy of it made once per device (CUDA) into its result.

The host array is registered here, at trace time, for as long as its `owner`
(the pattern) lives, and with the native core when a program using it is lowered
(it keeps the array's address; this module keeps the array alive).
"""

from __future__ import annotations

import collections
import hashlib
import threading
import weakref
from collections.abc import Hashable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive


class NativeRegistry(Protocol):
    """What the native core offers (installed by the backend with `install`)."""

    def register_runtime_array(self, key: int, array: np.ndarray) -> bool: ...
    def unregister_runtime_array(self, key: int) -> None: ...


class _Entry:
    __slots__ = ("array", "refs", "native")

    def __init__(self, array: np.ndarray):
        self.array = array
        self.refs = 0
        self.native = False  # registered with the native core


_lock = threading.Lock()
_entries: dict[int, _Entry] = {}
_owned: set[tuple[int, int]] = set()  # (id(owner), key)
# Releases from weakref callbacks wait here when the lock is held (the callback
# may run inside a locked region of this very thread, during a garbage collection):
# whoever holds the lock drains them when it lets go.
_pending: collections.deque[tuple[int, int]] = collections.deque()
_native: list[NativeRegistry] = []


def install(native: NativeRegistry) -> None:
    """The native registry that lowered programs read from (set once by the
    backend, at import)."""
    _native[:] = [native]


def content_key(*parts: Hashable) -> int:
    """A 63-bit key naming the content that `parts` determine (it travels as an
    int64 FFI attribute)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _locked_release(owner_id: int, key: int) -> None:
    if (owner_id, key) not in _owned:
        return
    _owned.discard((owner_id, key))
    entry = _entries.get(key)
    if entry is None:
        return
    entry.refs -= 1
    if entry.refs > 0:
        return
    del _entries[key]
    if entry.native and _native:
        # Waits for handlers still copying from the array, frees its device
        # copies; only then may the array go.
        _native[0].unregister_runtime_array(key)


def _drain() -> None:
    while _pending:
        if not _lock.acquire(blocking=False):
            return  # the holder drains when it lets go
        try:
            while _pending:
                _locked_release(*_pending.popleft())
        finally:
            _lock.release()


def _release(owner_id: int, key: int) -> None:
    _pending.append((owner_id, key))
    _drain()


def _register(owner: Any, key: int, array: np.ndarray) -> None:
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            entry = _entries[key] = _Entry(array)
        if (id(owner), key) not in _owned:
            _owned.add((id(owner), key))
            entry.refs += 1
            fin = weakref.finalize(owner, _release, id(owner), key)
            fin.atexit = False  # at exit the process frees everything
    _drain()


def ensure_native(key: int) -> None:
    """Give the native core the array `key` (at lowering time; idempotent)."""
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            raise RuntimeError(
                f"internal: runtime array {key} is lowered but not registered "
                "(its owner was garbage-collected during tracing?)."
            )
        if not entry.native:
            _native[0].register_runtime_array(key, entry.array)
            entry.native = True
    _drain()


def host_array(key: int) -> np.ndarray:
    with _lock:
        entry = _entries.get(key)
    _drain()
    if entry is None:
        raise RuntimeError(f"internal: runtime array {key} is not registered.")
    return entry.array


def info() -> dict[str, int]:
    """How many arrays are registered, and their host bytes."""
    with _lock:
        arrays = list(_entries.values())
    _drain()
    return {"arrays": len(arrays), "host_bytes": sum(e.array.nbytes for e in arrays)}


# ---- The primitive ----------------------------------------------------------------

runtime_array_p = Primitive("lineax_amgx_runtime_array")


@runtime_array_p.def_abstract_eval
def _abstract_eval(*, key: int, shape: tuple[int, ...], dtype: np.dtype):
    del key
    return jax.core.ShapedArray(shape, dtype)


@runtime_array_p.def_impl
def _impl(*, key: int, shape: tuple[int, ...], dtype: np.dtype):
    # Outside of any trace (eager use): an ordinary transfer.
    del shape, dtype
    return jnp.asarray(host_array(key))


def runtime_array(owner: Any, parts: tuple[Hashable, ...], value, dtype=None):
    """`value` (a host array) as a JAX value that compiled programs read at run
    time, never as an HLO constant.

    **Arguments:**

    - `owner`: the object (weak-referenceable) whose lifetime bounds the
        registration, e.g. the pattern the array is derived from.
    - `parts`: what determines the content (with the dtype and shape, added
        here): equal parts must mean equal arrays, e.g.
        `(pattern.fingerprint, "row_ids")`.
    - `value`: the host array (NumPy-convertible).
    - `dtype`: cast to this dtype first (canonicalised: int64 becomes int32
        without x64).
    """
    array = np.asarray(value)
    dtype = jax.dtypes.canonicalize_dtype(array.dtype if dtype is None else dtype)
    array = np.ascontiguousarray(array, dtype=dtype)
    if array.size == 0:
        return jnp.zeros(array.shape, dtype)
    key = content_key(*parts, dtype.str, array.shape)
    _register(owner, key, array)
    return runtime_array_p.bind(key=key, shape=array.shape, dtype=dtype)


def pattern_array(pattern, name: str, value=None, dtype=np.int32):
    """An array of a pattern's structure as a runtime array owned by the pattern:
    its attribute `name` (e.g. `"indices"`, `"row_ids"`), or `value`, derived from
    the pattern and named `name`. Keyed by the pattern's fingerprint(s)."""
    if value is None:
        value = getattr(pattern, name)
    parts = (
        type(pattern).__name__,
        pattern.fingerprint,
        getattr(pattern, "global_fingerprint", 0),
        name,
    )
    return runtime_array(pattern, parts, value, dtype)


def take(x, *indices):
    """`x[indices]` for index arrays known to be in range (a pattern's runtime
    arrays): without the negative-index wrapping that JAX adds for traced indices
    (a compare, add and select per entry; constant indices were wrapped at trace
    time)."""
    return x.at[indices].get(mode="promise_in_bounds", wrap_negative_indices=False)
