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
only parameter is a `RuntimeArray` entry, compared and hashed by a 64-bit key
naming the content (derived from `parts`, e.g. a pattern's fingerprint and the
array's name). So:

- the array is never a constant or an operand of the program, and equal patterns
  give equal jaxprs (one trace-cache hit, one compiled program), whether the
  operator is an argument of `jit` or closed over;
- under `vmap` it is never batched and under `jvp`/`grad` it has no tangent
  (a primitive without operands is bound at the outer level, as JAX does for any
  primitive whose inputs are all unbatched / without tangents);
- the lowering (registered by the native backend: `_backends/amgx/_runtime_arrays.py`)
  is an XLA FFI call whose handler copies the registered host array (CPU) or a
  device copy of it made once per device (CUDA) into its result.

An entry lives as long as anything that may run a program reading it: its owner
(the pattern), the jaxprs that bind it, the compiled executables (the lowering
adds it to their keepalives). Patterns made while tracing (a dense pattern of a
traced matrix, `from_bcoo` inside `jit`) die after the trace; the programs keep
their arrays. The native core holds the array's address from the first lowering
until the entry dies.
"""

from __future__ import annotations

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

    def register_runtime_array(self, key: int, array: np.ndarray) -> int: ...
    def unregister_runtime_array(self, key: int, token: int) -> None: ...


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


class RuntimeArray:
    """A host array that compiled programs read at run time: the primitive's
    parameter, compared and hashed by its content key (so equal structures give
    equal jaxprs). Whatever may still run a program that reads it holds it: its
    owner (the pattern), the jaxprs that bind it, and the compiled executables
    (their keepalives, added by the lowering). While it lives the native core
    holds its address; it unregisters itself when it dies."""

    __slots__ = ("key", "array", "token", "__weakref__")

    def __init__(self, key: int, array: np.ndarray):
        self.key = key
        self.array = array
        self.token: int | None = None  # its native registration

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, RuntimeArray) and other.key == self.key

    def __repr__(self) -> str:
        return (f"RuntimeArray(key={self.key}, shape={self.array.shape}, "
                f"dtype={self.array.dtype})")


# One live entry per key: equal structures share it (and its device copies).
_live: weakref.WeakValueDictionary[int, RuntimeArray] = weakref.WeakValueDictionary()
# Guards `_live` and native registration. Nothing that runs from a garbage
# collection takes it (`_unregister` needs no lock), so a collection inside a
# locked region cannot deadlock.
_lock = threading.Lock()


def _unregister(key: int, token: int, array: np.ndarray) -> None:
    """The native registration of a dead entry goes: after every handler still
    reading `array` is done and its device copies are freed. `array` (held by
    this finalizer until then) may go after that."""
    del array
    if _native:
        _native[0].unregister_runtime_array(key, token)


def ensure_native(entry: RuntimeArray) -> None:
    """Give the native core the entry's array (at lowering time; once)."""
    with _lock:
        if entry.token is None:
            entry.token = _native[0].register_runtime_array(entry.key, entry.array)
            fin = weakref.finalize(entry, _unregister, entry.key, entry.token,
                                   entry.array)
            fin.atexit = False  # at exit the process frees everything


def info() -> dict[str, int]:
    """How many entries are alive, and their host bytes."""
    with _lock:
        entries = list(_live.values())
    return {"arrays": len(entries), "host_bytes": sum(e.array.nbytes for e in entries)}


# ---- The primitive ----------------------------------------------------------------

runtime_array_p = Primitive("lineax_amgx_runtime_array")


@runtime_array_p.def_abstract_eval
def _abstract_eval(*, array: RuntimeArray):
    return jax.core.ShapedArray(array.array.shape, array.array.dtype)


@runtime_array_p.def_impl
def _impl(*, array: RuntimeArray):
    # Outside of any trace (eager use): an ordinary transfer.
    return jnp.asarray(array.array)


def runtime_array(owner: Any, parts: tuple[Hashable, ...], value, dtype=None):
    """`value` (a host array) as a JAX value that compiled programs read at run
    time, never as an HLO constant.

    **Arguments:**

    - `owner`: an object with a `__dict__` (the pattern the array is derived
        from) that keeps the entry alive as long as it lives, so that later traces
        find it.
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
    held = owner.__dict__.setdefault("_runtime_arrays", {})
    entry = held.get(key)
    if entry is None:
        with _lock:
            entry = _live.get(key)
            if entry is None:
                entry = _live[key] = RuntimeArray(key, array)
        held[key] = entry
    return runtime_array_p.bind(array=entry)


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
