# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`AMGX`: a Lineax linear solver backed by NVIDIA AmgX (pyamg on the CPU)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Int

from . import _auto, _blocks, _checks, _config, _null_space, _protocol
from ._backends import router
from ._backends.contract import (
    BACKENDS,
    PRECISIONS,
    SolveKey,
    Status,
    check_choice,
    double_dtype,
    invalid_token,
    is_complex,
    matrix_dtype as _matrix_dtype,
    mode_for,
    vector_dtype as _vector_dtype,
)
from ._operator import CSROperator, row_slots
from ._pattern import SparsityPattern
from ._runtime_arrays import pattern_array, take
from .matrix_free import as_csr_operator

# A solve reported as converged whose true residual `||b - A x||_2` exceeds this
# many times the requested bound `atol + rtol ||b||_2` is reported as a breakdown
# instead (a recursive residual that drifted from the true one, e.g. on a
# singular matrix). Generous, so that float32 round-off never trips it.
_RESIDUAL_SLACK = 1e3


class _AMGXState(eqx.Module):
    operator: lx.AbstractLinearOperator  # the CSR form (`as_csr_operator`)
    token: Int[Array, " 2"]
    # Value checks made once per setup (not per solve): a scalar row of zeros
    # (singular), and whether every value is finite.
    zero_row: Array
    values_finite: Array
    key: SolveKey = eqx.field(static=True)
    symmetric: bool = eqx.field(static=True)
    tolerances: _config.Tolerances = eqx.field(static=True)
    near_nullspace: Float[Array, "n k"] | None = None
    # A solve with a known null space: the orthonormal bases (docs/guide/singular.md).
    null_space: _null_space.NullSpace | None = None
    # `near_nullspace` is the null space, added by the solver (no warning on AmgX).
    quiet_near_nullspace: bool = eqx.field(static=True, default=False)


class AMGX(lx.AbstractLinearSolver[_AMGXState]):
    """Solve sparse linear systems with NVIDIA AmgX: algebraic multigrid and
    Krylov methods on the GPU; the same configuration runs through pyamg when the
    arrays live on the CPU.

    Use it for large sparse systems (discretised PDEs, graph Laplacians, Newton
    steps of such problems) where a direct solve is too expensive and plain Krylov
    methods need too many iterations. Accepts a [`lineax_amgx.CSROperator`][] or
    any Lineax operator (matrix-free operators are sparsified: their sparsity is
    traced, columns colored, values assembled with one JVP per color).

    `init` is AmgX's setup, `compute` its solve: reusing a state (or calling
    `lx.linear_solve` again with unchanged values) skips the setup, and the
    backward pass of a symmetric operator reuses the forward setup.

    **Arguments:**

    - `config`: `"auto"` (the default; `None` means the same), a preset name
        from `lineax_amgx.configs`, an AmgX config dict or a JSON string (AmgX's
        `config_version` 2 format). `"auto"` picks a preset in `init` from the
        operator: symmetric positive (or negative) definite operators get
        `"PCG_AGGREGATION"` (CG with an aggregation-AMG V-cycle), or
        `"PCG_AGGREGATION_ISOTROPIC"` when the operator's values were known when
        it was built and show constant-coefficient isotropic 7-point diffusion;
        anything else gets `"FGMRES_AGGREGATION"` (block systems: the `*_BLOCK`
        variants). Never classical AMG. The table and the measurements behind it:
        [Configurations](../guide/configs.md#choosing-automatically).
        Complex operators get `"GMRES_AGGREGATION_COMPLEX"` (aggregation AMG
        with Jacobi smoothing inside GMRES; never CG for an operator that is
        only complex symmetric); classical AMG is refused for them.
    - `rtol`, `atol`: stop when `||b - Ax||_2 <= atol + rtol * ||b||_2`, as in
        Lineax, whatever the initial guess (so a warm start `options["y0"]` saves
        iterations). Implemented by solving the scaled system
        `A (x/s) = b/s`, `s = atol + rtol ||b||`, with AmgX's `ABSOLUTE` criterion
        at tolerance 1. They override the config's own tolerance. If both are
        `None` and the config sets its own `tolerance`, AmgX's own criterion is
        used unchanged; otherwise `rtol` defaults to `1e-8` (float64) or `1e-5`
        (float32) and `atol` to 0.
    - `max_steps`: maximum outer iterations (overrides the config's `max_iters`;
        default: the config's, 1000 for presets).
    - `precision`: `None` follows the dtype (float64: AmgX mode `dDDI`, float32:
        `dFFI`, complex128: `dZZI`, complex64: `dCCI`); `"double"`/`"single"`
        force one. `"mixed"` runs AmgX entirely in single precision (float32 or
        complex64: half the memory traffic of the hierarchy and Krylov vectors)
        inside a double precision iterative refinement, so float64 (complex128)
        operators still get double precision accuracy (`rtol`/`atol` hold in
        double precision); `num_steps` counts the inner iterations. AmgX's own
        mixed mode (`dDFI`) is not used: its cuSPARSE path does not support it on
        CUDA >= 10.1.
    - `verbose`: print AmgX's own output (solve statistics, timings).
    - `backend`: `"auto"` (AmgX for arrays on a CUDA device, pyamg for arrays on
        the CPU: the choice follows where the data lives), `"amgx"` or `"pyamg"`.
        Complex operators need `"pyamg"` on a GPU (it copies the arrays to the
        host): AmgX's complex modes do not solve (AmgX 2.5), so a complex solve
        that would reach AmgX raises a `TypeError` before AmgX is called.

    **Options** (`lx.linear_solve(..., options={...})`):

    - `"y0"`: an initial guess (warm start).
    - `"near_nullspace"`: an `(n, k)` array whose columns the operator (nearly)
        annihilates with natural boundary conditions, e.g. the rigid-body modes
        of elasticity from [`lineax_amgx.rigid_body_modes`][]. The CPU (pyamg)
        backend's smoothed aggregation interpolates them exactly (pyamg's `B`),
        which can cut iterations several-fold; AmgX has no such input and
        ignores it on the GPU (with a one-time
        [`lineax_amgx.NearNullspaceWarning`][]). Not differentiated.
    - `"null_space"`, `"left_null_space"`, `"null_space_inconsistency"`: as the
        arguments of the same names, for this solve (each overrides the solver's).

    **Singular systems** (pure Neumann, periodic, free-floating bodies; see the
    [singular systems guide](../guide/singular.md)):

    - `null_space`: an `(n, k)` array whose columns span the null space of the
        operator (`A N = 0` exactly), e.g.
        [`lineax_amgx.constant_null_space`][] or
        [`lineax_amgx.rigid_body_modes`][]; need not be orthonormal. The solve
        then returns the minimum-norm least-squares solution `A⁺ b`: `b` is
        projected onto the range of `A`, AMG solves that consistent system (its
        coarsest level is smoothed, not factored: a dense LU fails on a singular
        matrix), and the answer is projected orthogonally to the null space.
        Gradients are those of that projected solve with the null space held
        fixed. `rtol`/`atol` apply to the projected system. On the CPU the null
        space also guides pyamg's coarsening when no `"near_nullspace"` is
        given.
    - `left_null_space`: the null space of `Aᵀ` (which right-hand sides are
        consistent). Needed when the operator is not tagged symmetric (for a
        symmetric one it is `null_space`).
    - `null_space_inconsistency`: what to do when `‖N_lᵀ b‖ > atol + rtol ‖b‖`
        (`N_l` the orthonormalised left null space): `"warn"` (default: a
        [`lineax_amgx.NullSpaceWarning`][]), `"raise"` (an error at run time,
        whatever `throw`) or `"ignore"`. The ratio `‖N_lᵀ b‖ / ‖b‖` is always
        in `stats["null_space_inconsistency"]`.

    The null space is a solver field as well as an option because Optimistix
    calls `lx.linear_solve` without options: `optx.Newton(...,
    linear_solver=lxa.AMGX(null_space=N))`.
    """

    config: str = eqx.field(static=True, default=_auto.AUTO)
    rtol: float | None = eqx.field(static=True, default=None)
    atol: float | None = eqx.field(static=True, default=None)
    max_steps: int | None = eqx.field(static=True, default=None)
    precision: Literal["double", "single", "mixed"] | None = eqx.field(
        static=True, default=None
    )
    verbose: bool = eqx.field(static=True, default=False)
    backend: Literal["auto", "amgx", "pyamg"] = eqx.field(static=True, default="auto")
    null_space: Any = None
    left_null_space: Any = None
    null_space_inconsistency: Literal["warn", "raise", "ignore"] = eqx.field(
        static=True, default="warn"
    )
    # `config`, parsed and validated once (None: "auto", chosen in `init`).
    resolved: _config.ResolvedConfig | None = eqx.field(
        static=True, default=None, repr=False
    )

    def __init__(
        self,
        config: str | Mapping[str, Any] | None = _auto.AUTO,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int | None = None,
        precision: Literal["double", "single", "mixed"] | None = None,
        verbose: bool = False,
        backend: Literal["auto", "amgx", "pyamg"] = "auto",
        null_space: Any = None,
        left_null_space: Any = None,
        null_space_inconsistency: Literal["warn", "raise", "ignore"] = "warn",
    ):
        # Parsed and validated now (clear errors at construction), once.
        auto = config is None or (
            isinstance(config, str) and config.strip() == _auto.AUTO
        )
        self.resolved = None if auto else _config.resolve(config)
        self.config = _auto.AUTO if auto else self.resolved.text
        self.rtol = None if rtol is None else float(rtol)
        self.atol = None if atol is None else float(atol)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.precision = precision
        self.verbose = bool(verbose)
        self.backend = backend
        self.null_space = null_space
        self.left_null_space = left_null_space
        self.null_space_inconsistency = null_space_inconsistency

    def __check_init__(self):
        if self.rtol is not None and not self.rtol >= 0:
            raise ValueError(f"rtol must be >= 0, got {self.rtol}.")
        if self.atol is not None and not self.atol >= 0:
            raise ValueError(f"atol must be >= 0, got {self.atol}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}.")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("backend", self.backend, BACKENDS)
        _null_space.check_policy(self.null_space_inconsistency)
        for name in ("null_space", "left_null_space"):
            _null_space.check_field(getattr(self, name), name)

    # -- helpers -----------------------------------------------------------------

    def _resolve(self, operator, csr: CSROperator) -> _config.ResolvedConfig:
        if self.resolved is not None:
            return self.resolved
        symmetric = lx.is_symmetric(operator) or lx.is_symmetric(csr)
        definite = (
            lx.is_positive_semidefinite(operator)
            or lx.is_negative_semidefinite(operator)
            or lx.is_positive_semidefinite(csr)
            or lx.is_negative_semidefinite(csr)
        )
        return _config.preset(_auto.resolve(symmetric, definite, csr).preset)

    # -- Lineax interface ------------------------------------------------------------

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        router.check_available(self.backend)
        csr = as_csr_operator(operator)
        p = csr.pattern
        _protocol.check_structure(p)
        # A symmetry tag on non-symmetric values: concrete ones raise now;
        # traced ones give a verdict that makes the setup raise before it sets
        # anything up (folded into its `ok` code: no synchronisation of its own).
        asymmetric, refusal = _checks.symmetry_verdict(
            csr, operator, claim="The operator given to AMGX is tagged"
        )
        resolved = self._resolve(operator, csr)
        if p.block_size > 1 and resolved.uses_classical:
            raise ValueError(
                f"Classical AMG (config {resolved.text!r}) does not support block "
                "systems "
                f"(block_size={p.block_size}); use an aggregation config such as "
                "'PCG_AGGREGATION_BLOCK'."
            )
        if is_complex(csr.values.dtype):
            _config.check_complex(resolved, csr.values.dtype)
        symmetric = lx.is_symmetric(operator) or lx.is_symmetric(csr)
        ns = _null_space.request(
            {k: getattr(self, k) for k in ("null_space", "left_null_space",
                                           "null_space_inconsistency")},
            options, num_rows=p.shape[0], symmetric=symmetric,
            dtype=csr.values.dtype,
        )
        mode = mode_for(self.precision, csr.values.dtype)
        tolerances = resolved.tolerances(self.rtol, self.atol)
        key = SolveKey(
            config=resolved.finalise(
                tolerances, max_steps=self.max_steps, verbose=self.verbose,
                singular=ns is not None,
            ),
            mode=mode,
            transposed=False,
            verbose=self.verbose,
            backend=self.backend,
            refusal=refusal,
        )
        values = csr.values.astype(_matrix_dtype(mode))
        # A row of zeros: the backend skips the setup (and returns an invalid
        # token); `compute` reports `RESULTS.singular` without calling it.
        zero_row, finite = _value_checks(p, csr.values)
        nns = _blocks.check_near_nullspace(
            options.get("near_nullspace"), p.shape[0], _vector_dtype(mode)
        )
        quiet = False
        if ns is not None:
            nns, quiet = ns.near_nullspace(csr, resolved, nns, _vector_dtype(mode))
        token = router.setup(p, values, key, nns, ok=finite & ~zero_row,
                             refuse=asymmetric, quiet_near_nullspace=quiet)
        if ns is not None:  # orthonormal bases, once per setup
            ns = ns.build(csr, self._vector_dtype(mode), after=token)
        return _AMGXState(
            csr, token, zero_row, finite, key, symmetric, tolerances, nns, ns, quiet
        )

    def _vector_dtype(self, mode: str):
        """The dtype of the solver's own vectors (float64 or complex128 around a
        mixed solve)."""
        return double_dtype(mode) if self.precision == "mixed" else _vector_dtype(mode)

    def compute(self, state: _AMGXState, vector, options: dict[str, Any]):
        csr, key = state.operator, state.key
        n = csr.pattern.shape[0]
        b, unravel = jfu.ravel_pytree(vector)
        if b.shape != (n,):
            raise ValueError(
                f"The right-hand side has {b.size} entries; the operator has {n} rows."
            )
        vec_dtype = self._vector_dtype(key.mode)
        out_dtype = b.dtype
        b = b.astype(vec_dtype)
        ns = state.null_space
        if ns is not None:  # b projected onto range(A)
            b, removed = ns.project_rhs(csr, b, after=state.token)
        y0 = options.get("y0")
        x0 = None
        if y0 is not None:
            x0, _ = jfu.ravel_pytree(y0)
            if x0.shape != (n,):
                raise ValueError(
                    f"options['y0'] has {x0.size} entries; the operator has {n} "
                    "columns."
                )
            x0 = x0.astype(vec_dtype)
        zero_row = state.zero_row
        finite = state.values_finite & jnp.all(jnp.isfinite(b))
        if x0 is not None:
            finite = finite & jnp.all(jnp.isfinite(x0))
        # `ok == 0` makes the backend skip AmgX (a zero row, or NaN/Inf input).
        ok = finite & ~zero_row
        # The norm of b, after the setup (operators whose operations must run in
        # one order, such as MPI calls on every rank, chain them).
        bnorm = _protocol.norm(csr, b, after=state.token)
        if self.precision == "mixed":
            x, status, steps, resid = self._refine(state, b, x0, ok, bnorm)
        else:
            x, status, steps, resid = self._solve_once(
                state, b, x0, out_dtype, ok, bnorm
            )
        if ns is not None:  # the minimum-norm solution
            x = ns.project_solution(csr, x)
        success = status == Status.SUCCESS
        if state.tolerances.scaled and (self.precision != "mixed" or ns is not None):
            # Never report success for an answer whose true residual is far from
            # the requested one (AmgX's residual is its Krylov method's recursive
            # one). `_refine` checks the true residual itself (of an unprojected
            # answer: a projected one is checked here).
            bound = state.tolerances.bound(bnorm, out_dtype)
            mode = "dDDI" if self.precision == "mixed" else key.mode
            true_resid = _norm(csr, b - _matvec(csr, mode, x))
            success = success & (true_resid <= _RESIDUAL_SLACK * bound)
            # Report the true residual (the backend's is its Krylov method's).
            resid = jnp.where(jnp.isfinite(true_resid), true_resid, resid)
        # One verdict for the whole operator: the checks combined (over the ranks
        # of a distributed operator, after the solve's own MPI calls).
        flags = jnp.stack([~finite, zero_row]).astype(jnp.int32)
        flags = _protocol.agree_flags(csr, flags, x, success)
        finite, zero_row = flags[0] == 0, flags[1] > 0
        stats = {}
        if ns is not None:  # warns or raises (per its policy) when inconsistent
            stats["null_space_inconsistency"], x = ns.check(
                removed, bnorm, state.tolerances, out_dtype, x
            )
        # The solution is ready only when this solve's last ordered call is done:
        # whoever waits for `x` (the next solve, `gather_vector`) cannot start MPI
        # calls while this solve still has one pending (with few threads the two
        # would wait for each other across ranks).
        x = _protocol.sequence(csr, x, flags)
        x = x.astype(out_dtype)
        R = lx.RESULTS
        result = R.where(
            success,
            R.successful,
            R.where(
                status == Status.NOT_CONVERGED,
                R.max_steps_reached,
                R.where(
                    status == Status.NONFINITE,
                    # Non-finite from finite inputs: the iteration blew up.
                    R.where(finite, R.singular, R.nonfinite_input),
                    R.breakdown,
                ),
            ),
        )
        result = R.where(zero_row, R.singular, result)
        stats = {"num_steps": steps, "residual_norm": resid, **stats}
        return unravel(x), result, stats

    def _solve_once(self, state: _AMGXState, b, x0, out_dtype, ok, bnorm):
        """One backend solve of the scaled system (see the class docstring)."""
        csr, key = state.operator, state.key
        s = state.tolerances.scale(bnorm, out_dtype)
        sv = s.astype(b.dtype)  # (complex vectors: a complex scale, explicitly)
        values = csr.values.astype(_matrix_dtype(key.mode))
        x, info, resid = router.solve(
            csr.pattern, values, state.token, b / sv,
            None if x0 is None else x0 / sv, key, state.near_nullspace, ok=ok,
            **_quiet(state),
        )
        return x * sv, info[0], info[1], resid * s.astype(resid.dtype)

    def _refine(self, state: _AMGXState, b, x0, ok, bnorm):
        """`precision="mixed"`: single precision AmgX solves (matrix, hierarchy and
        Krylov vectors in float32 or complex64) inside double precision iterative
        refinement (float64 or complex128), so the answer meets the double
        precision tolerance. (AmgX's own mixed mode, dDFI, is not supported by its
        cuSPARSE path on CUDA >= 10.1.)"""
        csr, key = state.operator, state.key
        wide, narrow = double_dtype(key.mode), _vector_dtype(key.mode)
        matrix = csr.with_values(csr.values.astype(wide))
        rtol, atol = state.tolerances.values(wide)
        target = atol + rtol * bnorm
        values = csr.values.astype(_matrix_dtype(key.mode))
        x = jnp.zeros_like(b) if x0 is None else x0
        x = _protocol.sequence(csr, x, bnorm)  # after the norm (MPI call order)
        r = b - matrix.mv(x)
        rnorm = _norm(csr, r)
        max_refinements = 30

        def cond(carry):
            _, _, rnorm, status, k, _ = carry
            return (rnorm > target) & (status == Status.SUCCESS) & (
                k < max_refinements
            )

        def body(carry):
            x, r, _, _, k, steps = carry
            # Inner float32 solve to a relative accuracy float32 can deliver.
            scale = _norm(csr, r) * _INNER_RTOL
            scale = jnp.where(scale > 0, scale, 1.0).astype(r.dtype)
            d, info, _ = router.solve(
                csr.pattern, values, state.token, (r / scale).astype(narrow),
                None, key, state.near_nullspace, ok=ok & jnp.all(jnp.isfinite(r)),
                **_quiet(state),
            )
            inner = info[0]
            # An inner "not converged" still improves x; only hard failures stop.
            inner = jnp.where(inner == Status.NOT_CONVERGED,
                              Status.SUCCESS, inner)
            x = x + d.astype(wide) * scale
            r = b - matrix.mv(x)
            return x, r, _norm(csr, r), inner, k + 1, steps + info[1]

        init = (x, r, rnorm, jnp.int32(Status.SUCCESS), jnp.int32(0),
                jnp.int32(0))
        x, r, rnorm, status, k, steps = jax.lax.while_loop(cond, body, init)
        status = jnp.where(
            (status == Status.SUCCESS) & (rnorm > target),
            Status.NOT_CONVERGED, status,
        )
        status = jnp.where(jnp.isfinite(rnorm), status, Status.NONFINITE)
        return x, status, steps, rnorm

    def transpose(self, state: _AMGXState, options: dict[str, Any]):
        # `y0` guesses the primal unknown, not the adjoint one (lx.CG drops it too).
        options = {k: v for k, v in options.items() if k != "y0"}
        # With a null space: the bases swapped (P_l (A^T)^+ P_r), never warning.
        ns_t = None if state.null_space is None else state.null_space.transpose()
        if state.symmetric:  # the same setup
            if ns_t is not None:
                state = eqx.tree_at(lambda s: s.null_space, state, ns_t)
            return state, options
        op_t = state.operator.transpose()
        key_t = state.key._replace(transposed=not state.key.transposed)
        # No setup here: the first solve with the transpose sets it up (its own
        # cache entry), so a forward-only computation never pays for it.
        zero_row, finite = _value_checks(op_t.pattern, op_t.values)
        nns_t = state.near_nullspace
        if state.quiet_near_nullspace:  # the solver's own: the transpose's
            nns_t = ns_t.right.astype(nns_t.dtype)
        state_t = _AMGXState(
            op_t, invalid_token(), zero_row, finite, key_t, False,
            state.tolerances, nns_t, ns_t, state.quiet_near_nullspace,
        )
        return state_t, options

    def conj(self, state: _AMGXState, options: dict[str, Any]):
        if not is_complex(state.operator.values.dtype):
            return state, options  # real values: conjugation is the identity
        # The conjugate matrix: the same tags (conj keeps A = Aᵀ and Hermitian
        # definiteness), the same value checks, its own setup at its first solve.
        options = dict(options)
        if options.get("y0") is not None:
            options["y0"] = jtu.tree_map(jnp.conj, options["y0"])
        nns = state.near_nullspace
        state_c = _AMGXState(
            lx.conj(state.operator), invalid_token(), state.zero_row,
            state.values_finite, state.key, state.symmetric, state.tolerances,
            None if nns is None else jnp.conj(nns),
        )
        return state_c, options

    def assume_full_rank(self):
        return True


_INNER_RTOL = 1e-4


def _value_checks(pattern, values) -> tuple[jax.Array, jax.Array]:
    """`(zero_row, finite)`: whether some scalar row holds only zeros while every
    value is finite (a singular matrix: `RESULTS.singular`), and whether every
    value is finite. One pass over the values."""
    a = jnp.abs(jax.lax.stop_gradient(values))
    if pattern.block_size > 1:
        a = jnp.max(a, axis=2)  # (nnz, b): the largest entry of each scalar row
    finite = jnp.all(jnp.isfinite(a))
    # One fused pass, no scatter (see `row_slots`); a distributed pattern's
    # rows reduce by segment.
    if isinstance(pattern, SparsityPattern) and pattern.row_layout:
        slots, valid = row_slots(pattern)
        if pattern.block_size > 1:
            valid = valid[..., None]
        row_max = jnp.max(jnp.where(valid, take(a, slots), 0), axis=1)
        return jnp.any(row_max == 0) & finite, finite
    row_max = jax.ops.segment_max(
        a,
        pattern_array(pattern, "row_ids"),  # a runtime array, not a constant
        num_segments=pattern.block_rows,
        indices_are_sorted=True,
    )
    return jnp.any(row_max == 0) & finite, finite


def _quiet(state: _AMGXState) -> dict[str, bool]:
    """The router's keyword for a near-null space the solver added itself."""
    return {"quiet_near_nullspace": True} if state.quiet_near_nullspace else {}


def _norm(csr, v) -> jax.Array:
    """The 2-norm of a vector of the operator's space (global when distributed)."""
    return _protocol.norm(csr, v)


def _matvec(csr, mode: str, x) -> jax.Array:
    """`A x` with the matrix the backend solved with (float32 values in `dFFI`)."""
    values = jax.lax.stop_gradient(csr.values).astype(_matrix_dtype(mode))
    op = csr.with_values(values)
    return op.mv(jax.lax.stop_gradient(x).astype(values.dtype)).astype(x.dtype)
