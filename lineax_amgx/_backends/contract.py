# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The backend contract: what a solver asks of a backend, and what it gets back.

Every backend (AmgX through XLA FFI on CUDA devices, pyamg on the host, and the
collective variants of both for distributed patterns) implements the same two
calls, with the same shapes and meaning:

- `setup(pattern, values, ok, key, near_nullspace=None) -> token`: AmgX *setup*
  (or resetup) for these values. `token` (int32[2]: cache entry id, generation)
  names the resident setup.
- `solve(pattern, values, token, b, x0, ok, key, near_nullspace=None)
  -> (x, info, residual)`: a solve; when `token` still names the resident setup
  no setup runs, otherwise the backend sets up from `values` first (a stale token
  is slow, never wrong). `info` is int32[2] = (`Status`, iterations); `residual`
  the final residual norm (`solve_result_shapes`).

`ok` is an int32 scalar: `OK_RUN` (1), or `OK_SKIP` (0) when an input holds NaN
or Inf (or the matrix has a zero row): the backend then skips the solver and
reports `Status.NONFINITE`. A setup also takes `OK_REFUSE` (2): the values break
a promise the solver checked on the device (a symmetry tag on non-symmetric
values); the setup then raises `key.refusal` before it sets anything up. The
setup reads `ok` on the host anyway, so such a check costs no synchronisation of
its own.
`near_nullspace` (an `(n, k)` array or `None`: `options["near_nullspace"]`,
pyamg's `B`) is used by the CPU backend; AmgX has no such input.

Backends register themselves here (`register(name, pattern_type, backend)`), by
the kind of pattern they serve; the router (`router.py`) looks them up by name
and by the pattern's type. This module imports nothing of the package:
backends import it, and nothing above it.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from . import _native

# -----------------------------------------------------------------------------
# Codes shared with the native core: defined once, in csrc/codes.h, and read here
# from the compiled module (tests/test_native.py checks them against AmgX's
# headers).
# -----------------------------------------------------------------------------


class Status(enum.IntEnum):
    """A backend's verdict on one solve (`info[0]`)."""

    SUCCESS = _native.STATUS_SUCCESS
    FAILED = _native.STATUS_FAILED
    DIVERGED = _native.STATUS_DIVERGED
    NOT_CONVERGED = _native.STATUS_NOT_CONVERGED
    NONFINITE = _native.STATUS_NONFINITE


# AmgX modes (`AMGX_Mode`): d = device, then matrix, vector precision, int index.
MODES: dict[str, int] = dict(_native.MODES)

# -----------------------------------------------------------------------------
# Precision -> mode -> dtypes (one definition, for every solver and backend).
# -----------------------------------------------------------------------------

PRECISIONS = (None, "double", "single", "mixed")
BACKENDS = ("auto", "amgx", "pyamg")

# Precision -> mode for real and for complex operators, and the dtypes of each mode
# (matrix values, vectors). AmgX's mixed mode (dDFI) is reached by no precision:
# see `mode_for`.
_REAL_MODES = {"double": "dDDI", "single": "dFFI"}
_COMPLEX_MODES = {"double": "dZZI", "single": "dCCI"}
_MODE_DTYPES = {
    "dDDI": (jnp.float64, jnp.float64),
    "dDFI": (jnp.float32, jnp.float64),
    "dFFI": (jnp.float32, jnp.float32),
    "dZZI": (jnp.complex128, jnp.complex128),
    "dCCI": (jnp.complex64, jnp.complex64),
}


def is_complex(dtype) -> bool:
    """Whether `dtype` is a complex floating dtype."""
    return bool(jnp.issubdtype(dtype, jnp.complexfloating))


def mode_for(precision: str | None, dtype) -> str:
    """The AmgX mode for a solver's `precision` and the operator's dtype: float64
    `dDDI`, float32 `dFFI`, complex128 `dZZI`, complex64 `dCCI` (`"double"` and
    `"single"` force the precision, keeping real or complex).
    `"mixed"` runs AmgX in single precision (`dFFI`, `dCCI`) inside double
    precision iterative refinement or between double precision vectors: AmgX's
    own mixed mode (`dDFI`) fails on CUDA >= 10.1 ("Mixed precision modes not
    currently supported")."""
    modes = _COMPLEX_MODES if is_complex(dtype) else _REAL_MODES
    if precision in ("mixed", "single"):
        return modes["single"]
    if precision == "double":
        return modes["double"]
    wide = jnp.dtype(dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
    return modes["double" if wide else "single"]


def matrix_dtype(mode: str):
    """The dtype of the matrix values a backend receives in `mode`."""
    return _MODE_DTYPES[mode][0]


def vector_dtype(mode: str):
    """The dtype of the vectors a backend receives in `mode`."""
    return _MODE_DTYPES[mode][1]


def real_dtype(dtype):
    """The real dtype of `dtype`'s precision (float64 for complex128): the dtype
    of norms and residuals."""
    return jnp.finfo(dtype).dtype


def double_dtype(mode: str):
    """The double precision vector dtype of `mode`'s kind (float64 or
    complex128): the outer vectors of `precision="mixed"`."""
    return jnp.complex128 if is_complex(vector_dtype(mode)) else jnp.float64


def check_choice(what: str, value: Any, choices: tuple) -> None:
    """`ValueError` naming the allowed values (for `precision` and `backend`)."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}.")


# -----------------------------------------------------------------------------
# The solve key, tokens and result shapes.
# -----------------------------------------------------------------------------


class SolveKey(NamedTuple):
    """Everything static about a solve (hashable; part of the cache key)."""

    config: str  # finalised AmgX JSON
    mode: str  # a key of MODES: "dDDI" | "dFFI" | "dZZI" | "dCCI" (| "dDFI")
    transposed: bool
    verbose: bool
    backend: str  # "auto" | "amgx" | "pyamg"
    # What a setup raises when its `ok` is OK_REFUSE (not part of any cache key).
    refusal: str = ""


# A setup's and a solve's `ok` codes (see the module docstring).
OK_SKIP, OK_RUN, OK_REFUSE = 0, 1, 2


def refuse_if(ok, refuse) -> jax.Array:
    """`ok` (bool or int32 scalar) as an int32 `ok` code, `OK_REFUSE` where the
    traced bool `refuse` is true (`None`: nothing to refuse)."""
    ok = jnp.asarray(ok).astype(jnp.int32)
    return ok if refuse is None else jnp.where(refuse, OK_REFUSE, ok)


def invalid_token():
    """A token that names no setup: the next solve sets up from its values."""
    return jnp.array([-1, -1], dtype=jnp.int32)


def solve_result_shapes(b) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The solve contract's outputs: `x` like `b`, `info = int32[2](status,
    iterations)`, the residual norm as a real scalar of `b`'s precision."""
    return (
        jax.ShapeDtypeStruct(b.shape, b.dtype),
        jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((), real_dtype(b.dtype)),
    )


def nonfinite_host_result(shape, dtype) -> tuple[np.ndarray, ...]:
    """A host solve's answer to non-finite input (the solver is not called):
    zeros, `Status.NONFINITE`, an infinite residual."""
    return (
        np.zeros(shape, dtype),
        np.array([Status.NONFINITE, 0], np.int32),
        np.array(np.inf, real_dtype(dtype)),
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


# -----------------------------------------------------------------------------
# The registry.
# -----------------------------------------------------------------------------


class Backend(Protocol):
    """What a backend provides (module-level functions or a class)."""

    def setup(self, pattern, values, ok, key: SolveKey, near_nullspace=None): ...

    def solve(
        self, pattern, values, token, b, x0, ok, key: SolveKey, near_nullspace=None
    ): ...


_registry: dict[tuple[str, type], Backend] = {}


def register(name: str, pattern_type: type, backend: Backend) -> None:
    """Make `backend` the `name` (`"amgx"` or `"pyamg"`) backend for patterns of
    `pattern_type` (and its subclasses)."""
    if name not in BACKENDS[1:]:
        raise ValueError(f"backend name must be one of {BACKENDS[1:]}, got {name!r}.")
    _registry[(name, pattern_type)] = backend


def lookup(name: str, pattern) -> Backend:
    """The `name` backend registered for `pattern`'s type (its nearest base)."""
    for cls in type(pattern).__mro__:
        backend = _registry.get((name, cls))
        if backend is not None:
            return backend
    raise TypeError(
        f"No {name!r} backend is registered for a {type(pattern).__name__}."
    )
