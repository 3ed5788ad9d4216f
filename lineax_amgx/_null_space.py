# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Singular systems with a known null space: pure Neumann, periodic and
free-floating problems (`docs/guide/singular.md`).

Given a basis `N` of the null space of `A` (and, for a non-symmetric `A`, a basis
`N_l` of its left null space, the `y` with `Aᵀy = 0`), the solver returns

    x = P_r A⁺ P_l b,   P_r = I - Q Qᵀ,  P_l = I - Q_l Q_lᵀ

(`Q`, `Q_l` orthonormal bases of the two spaces): the minimum-norm least-squares
solution, `A⁺ b`. The bases are orthonormalised once per `init` (CholQR2: two
Cholesky-QR sweeps, `k x k` Gram matrices made of global dot products, so the same
code serves a distributed operator); `compute` projects `b` onto `range(A)`, runs
the multigrid solve on that consistent system, and projects the answer onto
`null(A)^⊥` (AMG iterates pick up null-space components; they do not change the
residual).

**Gradients.** Lineax differentiates a solve with a solve: its JVP solves again
with the same state (`b' - A'x` on the right) and its transpose solves with
`solver.transpose(state)`. Because the projections live in the state and are
applied inside `compute`, the tangent solve is `P_r A⁺ P_l (b' - A'x)`: the
derivative of the projected solve with the null space held fixed, which is what
`assume_full_rank() = True` (Lineax's JVP without pseudo-inverse terms) needs.
The transposed state swaps the two bases (`(P_r A⁺ P_l)ᵀ = P_l (Aᵀ)⁺ P_r`); for a
symmetric operator it is the same setup (no transposed setup). Transposed solves
never warn about inconsistency: a cotangent need not be orthogonal to anything.

**Inconsistency.** `‖Q_lᵀ b‖ / ‖b‖` is reported as
`stats["null_space_inconsistency"]`. When `‖Q_lᵀ b‖ > atol + rtol ‖b‖` — when the
unprojected system cannot meet the requested tolerance — the solve warns
([`lineax_amgx.NullSpaceWarning`][], through `jax.debug.callback`, so under `jit`
and `vmap` too), raises (`"raise"`, through `equinox.error_if`) or says nothing
(`"ignore"`).
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from . import _config, _protocol

__all__ = [
    "NullSpace",
    "NullSpaceWarning",
    "POLICIES",
    "constant_null_space",
    "request",
]

POLICIES = ("warn", "raise", "ignore")
_FIELDS = ("null_space", "left_null_space", "null_space_inconsistency")


class NullSpaceWarning(UserWarning):
    """A right-hand side given to a solve with a null space was inconsistent
    (not in the range of the operator) beyond the requested tolerance: it was
    projected onto the range, so the answer is the least-squares solution. See
    `stats["null_space_inconsistency"]`."""


def constant_null_space(n: int, block_size: int = 1, *, dtype=None) -> np.ndarray:
    """The constant vectors, normalised: the null space of a pure-Neumann or
    periodic diffusion operator (a graph Laplacian, the pressure Poisson
    equation).

    For a block operator (several unknowns per node, numbered node by node) give
    `block_size = b`: each component then gets its own constant vector (ones on
    unknowns `c, c + b, c + 2b, ...`), the null space of `b` uncoupled (or
    coupled only through zero-sum terms) diffusion equations. For elasticity
    use [`lineax_amgx.rigid_body_modes`][] instead.

    Use it as
    `lx.linear_solve(A, b, solver=lxa.AMGX(), options={"null_space": N})`
    (see [`lineax_amgx.AMGX`][]).

    **Arguments:**

    - `n`: the number of unknowns (rows of the operator).
    - `block_size`: unknowns per node; `n` must be a multiple of it.
    - `dtype`: the floating dtype of the result (default float64).

    **Returns:**

    A NumPy array of shape `(n, block_size)` with orthonormal columns.
    """
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}.")
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}.")
    n, b = int(n), int(block_size)
    if n % b or n == b:
        raise ValueError(
            f"n={n} must be a multiple of block_size={b} with at least two nodes."
        )
    dtype = np.dtype(np.float64 if dtype is None else dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}.")
    basis = np.zeros((n, b), dtype)
    for c in range(b):
        basis[c::b, c] = 1.0 / np.sqrt(n // b)
    return basis


# -- what the user asked for ----------------------------------------------------


class Request(eqx.Module):
    """The null-space settings of one solve, validated (bases not yet
    orthonormal): from the solver's fields, overridden key by key by `options`."""

    right: Array
    left: Array | None
    policy: str = eqx.field(static=True)

    def build(self, operator, dtype, *, after=None) -> NullSpace:
        """Orthonormal bases (`NullSpace`) in `dtype`, after `after` (the setup
        token: operators whose collectives run in one order chain them)."""
        right = _orthonormalise(operator, self.right.astype(dtype), "null_space",
                                after)
        left = right
        if self.left is not None:
            left = _orthonormalise(operator, self.left.astype(dtype),
                                   "left_null_space", right)
        return NullSpace(right, left, self.policy)

    def near_nullspace(self, operator, resolved, given, dtype):
        """`(near_nullspace, quiet)` for the backends: the user's
        `options["near_nullspace"]` (`given`) if any; else the null space itself
        (`quiet=True`: no warning where it is ignored), where pyamg's smoothed
        aggregation can use it. (Measured on 2-D free-floating elasticity, 101^2
        nodes, rtol 1e-8: with the rigid-body modes as `B` PCG took 13
        iterations, with the default `B` — one constant per component — 21.)"""
        if given is not None or not _protocol.accepts_near_nullspace(operator):
            return given, False
        if not _config.aggregation_preconditioned(resolved.cfg):
            return given, False
        return self.right.astype(dtype), True


def request(solver_fields: dict[str, Any], options: dict[str, Any], *,
            num_rows: int, symmetric: bool, dtype=None) -> Request | None:
    """The null-space settings of a solve (or `None`: a plain solve).

    `solver_fields` holds the solver's `null_space`, `left_null_space` and
    `null_space_inconsistency`; an option of the same name overrides each.
    Raises `ValueError`/`TypeError` for bad input, for a non-symmetric
    operator given no left null space, and for an operator of complex `dtype`
    (the projections and the inconsistency measure are real-only)."""
    get = {k: options.get(k, solver_fields.get(k)) for k in _FIELDS}
    policy = "warn" if get["null_space_inconsistency"] is None else (
        get["null_space_inconsistency"]
    )
    check_policy(policy)
    right, left = get["null_space"], get["left_null_space"]
    if right is None:
        if left is not None:
            raise ValueError(
                "left_null_space was given without null_space: give the null space "
                "too (options['null_space'] or AMGX(null_space=...))."
            )
        return None
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"A null space was given for a complex operator ({jnp.dtype(dtype)}), "
            "but null spaces are supported for real operators only (the "
            "projections, their Gram matrices and the inconsistency measure use "
            "real inner products). Solve without null_space, with a right-hand "
            "side in the range of the operator, and project the answer yourself "
            "(x - N (N^H x) for an orthonormal complex basis N); or solve the "
            "equivalent real system [[Re A, -Im A], [Im A, Re A]] with the null "
            "space [[Re N, -Im N], [Im N, Re N]]."
        )
    right = _basis(right, "null_space", num_rows)
    if left is not None:
        left = _basis(left, "left_null_space", num_rows)
    elif not symmetric:
        raise ValueError(
            "A null space was given for an operator that is not known to be "
            "symmetric, so its left null space (the y with A^T y = 0, which decides "
            "which right-hand sides are consistent) may differ from its null space: "
            "pass options['left_null_space'] (or AMGX(left_null_space=...)) too, or, "
            "if the operator is symmetric, tag it lx.symmetric_tag."
        )
    return Request(right, left, policy)


def check_policy(policy) -> None:
    if policy not in POLICIES:
        raise ValueError(
            f"null_space_inconsistency must be one of {POLICIES}, got {policy!r}."
        )


def check_field(basis, name: str) -> None:
    """A solver's `null_space` field: `None` or a real 1-D or 2-D array (its
    rows are checked against the operator in `init`)."""
    if basis is None:
        return
    dtype = getattr(basis, "dtype", None)
    ndim = getattr(basis, "ndim", None)
    if dtype is None or ndim is None:
        basis = np.asarray(basis)
        dtype, ndim = basis.dtype, basis.ndim
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real array of shape (n, k), got {dtype}.")
    if ndim not in (1, 2):
        raise ValueError(f"{name} must be an array of shape (n, k), got {ndim} dims.")


def _basis(basis, name: str, num_rows: int) -> Array:
    """`basis` as a 2-D JAX array `(n, k)`, `1 <= k < n` (a 1-D array is one
    vector). Trace-time checks of shape and dtype only."""
    if not isinstance(basis, jax.Array):
        basis = np.asarray(basis)
    dtype = basis.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(
            f"{name} must be a real array of shape (n, k), got dtype {dtype}."
        )
    shape = tuple(np.shape(basis))
    if basis.ndim == 1:
        basis = basis[:, None]
    if basis.ndim != 2 or basis.shape[0] != num_rows or not (
        1 <= basis.shape[1] < num_rows
    ):
        raise ValueError(
            f"{name} must have shape (n, k) with n = {num_rows} (the operator's "
            f"rows; a distributed operator's local rows) and 1 <= k < n, got shape "
            f"{shape}. Use lineax_amgx.constant_null_space(n) or "
            "lineax_amgx.rigid_body_modes(coords)."
        )
    return jnp.asarray(basis)


# -- the orthonormal bases held by a solver state -------------------------------


class NullSpace(eqx.Module):
    """Orthonormal bases of `null(A)` (`right`, shape `(n, k)`) and `null(Aᵀ)`
    (`left`, `(n, m)`; the same array for a symmetric operator), and what to do
    with an inconsistent right-hand side."""

    right: Float[Array, "n k"]
    left: Float[Array, "n m"]
    policy: str = eqx.field(static=True)

    def transpose(self) -> NullSpace:
        """The bases of `Aᵀ`; its solves (cotangents) never warn."""
        return NullSpace(self.left, self.right, "ignore")

    def project_rhs(self, operator, b, *, after=None):
        """`(P_l b, Q_lᵀ b)`: `b` projected onto `range(A)`, and what was removed."""
        return _project(operator, self.left, b, after)

    def project_solution(self, operator, x):
        """`P_r x`: `x` projected onto `null(A)^⊥` (the minimum-norm solution)."""
        return _project(operator, self.right, x, None)[0]

    def check(self, removed, bnorm_projected, tolerances, dtype, x):
        """The inconsistency `‖Q_lᵀ b‖ / ‖b‖` (from what `project_rhs` removed and
        `‖P_l b‖`), and `x` made to warn or raise (per the policy) when
        `‖Q_lᵀ b‖ > atol + rtol ‖b‖` (`tolerances.bound`)."""
        removed_norm = jnp.linalg.norm(removed)
        bnorm = jnp.sqrt(bnorm_projected**2 + removed_norm**2)
        ratio = jnp.where(bnorm > 0, removed_norm / jnp.where(bnorm > 0, bnorm, 1), 0)
        bad = removed_norm > tolerances.bound(bnorm, dtype)
        if self.policy == "warn":
            jax.debug.callback(_warn, ratio, bad)
        elif self.policy == "raise":
            x = eqx.error_if(x, bad, _INCONSISTENT + _HOW)
        return ratio, x


def _project(operator, basis, v, after):
    coefficients = _protocol.inner(operator, basis, v, after=after)
    return v - basis @ coefficients, coefficients


def _orthonormalise(operator, basis, name: str, after) -> Array:
    """CholQR2: `basis` made orthonormal by two Cholesky-QR sweeps (the first on
    the column-scaled Gram matrix, which also tells whether the columns are
    independent). Every Gram matrix is one `_protocol.inner` (a global reduction
    for a distributed operator)."""
    eps = float(jnp.finfo(basis.dtype).eps)
    gram = _protocol.inner(operator, basis, basis, after=after)
    norms = jnp.sqrt(jnp.diagonal(gram))
    safe = jnp.where(norms > 0, norms, 1)
    chol = jnp.linalg.cholesky(gram / jnp.outer(safe, safe))
    # Independent columns: a positive definite correlation matrix whose Cholesky
    # factor keeps every pivot above ~sqrt(eps) (an angle of 1e-7 rad in float64).
    ok = jnp.all(norms > 0) & jnp.all(jnp.isfinite(chol)) & (
        jnp.min(jnp.diagonal(chol)) > 10 * np.sqrt(eps)
    )
    q = jax.scipy.linalg.solve_triangular(chol, (basis / safe).T, lower=True).T
    gram = _protocol.inner(operator, q, q, after=gram)
    chol = jnp.linalg.cholesky(gram)
    q = jax.scipy.linalg.solve_triangular(chol, q.T, lower=True).T
    return eqx.error_if(
        q, ~ok,
        f"lineax_amgx: the columns of {name} are linearly dependent (or zero): a "
        "null-space basis needs independent columns.",
    )


_INCONSISTENT = (
    "lineax_amgx: the right-hand side is inconsistent with the null space: its "
    "component in the left null space, ||N_l^T b||, exceeds atol + rtol ||b||, so "
    "A x = b has no solution to the requested accuracy (the projected, "
    "least-squares solution is returned; stats['null_space_inconsistency'] holds "
    "||N_l^T b|| / ||b||)."
)
_HOW = (
    " Make b consistent (e.g. subtract its mean for a pure-Neumann problem), check "
    "the null space, or pass options['null_space_inconsistency'] = 'warn' or "
    "'ignore'."
)


def _warn(ratio, bad) -> None:
    # One message text (the ratio is in the stats): Python's default warning
    # filter then shows it once per process, not once per solve of a loop.
    del ratio
    if np.asarray(bad).any():
        warnings.warn(_INCONSISTENT + _HOW, NullSpaceWarning, stacklevel=2)
