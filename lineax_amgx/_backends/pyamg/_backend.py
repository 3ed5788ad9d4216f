# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The CPU backend: the same AmgX configurations, solved on the host with pyamg.

[`lineax_amgx.AMGX`][] dispatches here when its arrays live on the CPU (or with
`backend="pyamg"`). The two entry points, `setup` and `solve`, follow the
contract in `_backends/contract.py`; both run as `jax.pure_callback`s with
`vmap_method="sequential"`, so `vmap` over right-hand sides gives one setup and
one solve per member, and `vmap` over values one setup per member.

The AmgX configuration is translated to its nearest pyamg equivalent (the table
is in `docs/guide/cpu-backend.md`): the outer Krylov method, classical or aggregation
AMG, the smoother, sweeps, cycle, coarsening limits, the coarse solver, the
iteration limit and the convergence criterion (honoured exactly: the stopping
test is made on the true residual `||b - A x||`). A key with no pyamg equivalent
warns once per `(key, value)` ([`lineax_amgx.PyamgTranslationWarning`][]);
one whose omission would change the answer raises a `ValueError`.

Block operators (`block_size = b > 1`) reach pyamg as BSR matrices: smoothed
aggregation then aggregates block rows (nodes), its default near-null space is
one constant vector per block component, and the smoothers are block Jacobi /
block Gauss-Seidel on the `b x b` diagonal blocks. A user-given near-null space
(`options["near_nullspace"]`, e.g. `lineax_amgx.rigid_body_modes`) replaces
that default as pyamg's `B`.

AMG hierarchies live in a small, thread-safe LRU cache keyed by
`(pattern fingerprint, block size, mode, config, transposed, near-null-space
width)`. An entry keeps copies of the values (and near-null space) it was set up
with; incoming ones are compared exactly (`np.array_equal`, never a hash), so
unchanged values never set up twice. A setup returns a token `(entry id,
generation)`; a solve that presents a token naming a resident setup does no
comparison and no setup.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Array, Int, Int32, Shaped

from ..._pattern import SparsityPattern
from ..._warnings import warn_once
from ..contract import (
    OK_REFUSE,
    OK_SKIP,
    SolveKey,
    host_setup,
    host_solve,
    nonfinite_host_result,
    real_dtype,
)
from ._cache import _cache
from ._translate import (
    PyamgTranslationWarning,
    _AMGPlan,
    _Plan,
    translate,
)

# Shapes of the arrays that cross the backend boundary.
_Values = Shaped[Array, "nnz *block"]
_Vector = Shaped[Array, " n"]
_Flag = Int[Array, ""]
_Token = Int32[Array, "2"]
_Scalar = Shaped[Array, ""]

__all__ = ["setup", "solve", "Host"]


# -----------------------------------------------------------------------------
# The host side, for any caller that already holds host arrays (the local
# callbacks below, and the distributed backend that gathers a system on one rank).
# -----------------------------------------------------------------------------


def _width(near_nullspace) -> int:
    return 0 if near_nullspace is None else int(near_nullspace.shape[-1])


class Host:
    """One pyamg problem on the host: a pattern and a solve key, translated once.

    Build it at trace time; call `setup` / `holds` / `solve` inside host
    callbacks with NumPy arrays. The configuration is translated (translation
    warnings, config errors) at the first `setup`/`solve`, i.e. when the CPU
    branch *runs*: with `backend="auto"`, `lax.platform_dependent` traces the CPU
    branch on a GPU too, where a warning would be about a backend that does not
    run, and a config pyamg cannot translate would fail a solve AmgX can do. A
    config error raised there reaches the caller inside JAX's callback error.
    Backed by the package's hierarchy cache.

    **Arguments:**

    - `pattern`: the (global) sparsity pattern.
    - `key`: the static `SolveKey`.
    - `near_nullspace_width`: the number of near-null-space vectors the calls
        will pass (0: none; part of the cache key).
    """

    def __init__(
        self, pattern: SparsityPattern, key: SolveKey, near_nullspace_width: int = 0
    ):
        self.pattern = pattern
        self.key = key
        self._with_near_nullspace = bool(near_nullspace_width)
        self.cache_key = (pattern.fingerprint, pattern.block_size, key.mode,
                          key.config, key.transposed, int(near_nullspace_width))

    @property
    def plan(self) -> _Plan:
        """The pyamg plan (translated once per config; see the class docstring)."""
        plan = translate(self.key.config)
        if self._with_near_nullspace:
            _warn_unused_near_nullspace(plan)
        return plan

    def setup(self, values: np.ndarray, near_nullspace=None) -> np.ndarray:
        """The token `int32[2]` of the resident setup for these values (`(-1, -1)`
        in isolated mode: nothing is kept)."""
        if _cache.capacity == 0:
            return np.array([-1, -1], np.int32)
        entry_id, gen, prepared = _cache.acquire(
            self.cache_key, self.plan, self.pattern, values, self.key.mode,
            near_nullspace=near_nullspace,
        )
        if self.key.verbose:
            print(f"lineax_amgx (pyamg): setup {prepared.hierarchy or prepared}")
        return np.array([entry_id, gen], np.int32)

    def holds(self, token) -> bool:
        """Whether `token` names a resident setup of this problem (then `solve`
        needs no values)."""
        return _cache.holds(self.cache_key, token)

    def evict(self) -> bool:
        """Drop this problem's resident setups (after a failed solve); whether
        there were any."""
        return _cache.evict(self.cache_key)

    def resident(self) -> bool:
        """Whether a setup of this problem is in the cache."""
        return self.cache_key in _cache.entries

    def solve(self, values, token, b, x0=None, near_nullspace=None):
        """`(x, status, iterations, ||b - A x||_2)`: from the setup `token` names,
        else from an exact comparison of `values` with the resident ones, else
        after a (re)setup."""
        entry_id, _, prepared = _cache.acquire(
            self.cache_key, self.plan, self.pattern, values, self.key.mode,
            token=token, near_nullspace=near_nullspace,
        )
        x, status, steps, resid = prepared.solve(np.asarray(b), x0)
        _cache.count_solve(entry_id)
        return x, status, steps, resid


# -----------------------------------------------------------------------------
# The backend entry points (the backend contract).
# -----------------------------------------------------------------------------


def _check_near_nullspace(pattern: SparsityPattern, near_nullspace):
    """The near-null space's shape: an input error on any platform (trace time)."""
    if near_nullspace is None:
        return
    if near_nullspace.ndim != 2 or near_nullspace.shape[0] != pattern.shape[0]:
        raise ValueError(
            f"The near-null space has shape {near_nullspace.shape}; expected "
            f"({pattern.shape[0]}, k)."
        )


def _warn_unused_near_nullspace(plan: _Plan):
    p = plan.precond
    if isinstance(p, _AMGPlan) and p.algorithm == "sa":
        return
    warn_once(
        ("near_nullspace", ""),
        'options["near_nullspace"] is used only by aggregation AMG; this '
        "configuration (no smoothed-aggregation preconditioner) ignores it "
        "(pyamg CPU backend; see docs/guide/blocks.md).",
        PyamgTranslationWarning,
        stacklevel=4,
    )


def setup(
    pattern: SparsityPattern,
    values: _Values,
    ok: _Flag,
    key: SolveKey,
    near_nullspace: Shaped[Array, "n k"] | None = None,
) -> _Token:
    """Set up (or reuse) the pyamg solver for these values.

    **Arguments:**

    - `pattern`: the static sparsity pattern.
    - `values`: the matrix values, shape `pattern.value_shape`.
    - `ok`: int32 scalar: `OK_SKIP` when `values` holds NaN or Inf (no setup
        is made), `OK_REFUSE` to raise `key.refusal` (see the contract).
    - `key`: the static [`SolveKey`][].
    - `near_nullspace`: `None` or an `(n, k)` array: the near-null space that
        smoothed aggregation interpolates exactly (pyamg's `B`; by default one
        constant vector per block component). Part of the cache comparison.

    **Returns:**

    The token `int32[2] = (entry id, generation)` naming the resident setup, or
    `(-1, -1)` when nothing was kept (non-finite values, isolated mode).
    """
    problem = Host(pattern, key, _width(near_nullspace))  # translated at run time
    _check_near_nullspace(pattern, near_nullspace)

    def host(values, ok, *maybe_nns):
        if int(ok) == OK_REFUSE:
            raise ValueError(key.refusal)
        if int(ok) == OK_SKIP:
            return np.array([-1, -1], np.int32)
        nns = np.asarray(maybe_nns[0]) if maybe_nns else None
        return problem.setup(np.asarray(values), nns)

    return host_setup(host, values, ok, near_nullspace)


def solve(
    pattern: SparsityPattern,
    values: _Values,
    token: _Token,
    b: _Vector,
    x0: _Vector | None,
    ok: _Flag,
    key: SolveKey,
    near_nullspace: Shaped[Array, "n k"] | None = None,
) -> tuple[_Vector, _Token, _Scalar]:
    """Solve `A x = b` on the host with pyamg.

    When `token` names a resident setup of this operator, no comparison or setup
    runs; otherwise the values are compared with the resident ones (exactly) and
    a setup or resetup runs if they differ (a stale token is slow, never wrong).

    **Arguments:**

    - `pattern`, `values`, `key`: as for `setup`.
    - `token`: from `setup` (or `(-1, -1)`).
    - `b`: the right-hand side.
    - `x0`: the initial guess, or `None` for zeros.
    - `ok`: int32 scalar, 0 when `values`, `b` or `x0` holds NaN or Inf: pyamg is
        skipped, `x` is zeros, the status `Status.NONFINITE`, the residual `inf`.
    - `near_nullspace`: as for `setup` (used when the token is stale).

    **Returns:**

    `(x, info, residual)`: `x` like `b`; `info = int32[2](status, iterations)`
    with a `Status`; `residual = ||b - A x||_2` recomputed on the
    host, a real scalar of `b`'s precision.
    """
    problem = Host(pattern, key, _width(near_nullspace))  # translated at run time
    _check_near_nullspace(pattern, near_nullspace)
    out_dtype = np.dtype(b.dtype)
    has_x0 = x0 is not None

    def host(values, token, b, ok, *rest):
        x0_host = rest[0] if has_x0 else None
        nns = np.asarray(rest[-1]) if near_nullspace is not None else None
        if int(ok) == 0:
            return nonfinite_host_result(b.shape, out_dtype)
        x, status, steps, resid = problem.solve(
            np.asarray(values), token, b, x0_host, nns
        )
        if key.verbose:
            print(
                f"lineax_amgx (pyamg): status {status}, {steps} iterations, "
                f"residual {resid:.3e}"
            )
        return (
            np.asarray(x, out_dtype),
            np.array([status, steps], np.int32),
            np.array(resid, real_dtype(out_dtype)),
        )

    return host_solve(host, values, token, b, x0, ok, near_nullspace)
