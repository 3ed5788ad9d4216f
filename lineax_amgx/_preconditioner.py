# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""AmgX's multigrid cycle as a preconditioner for Lineax's own Krylov solvers.

- [`lineax_amgx.AMGXPreconditioner`][]: a Lineax linear operator whose `mv` applies
  one AMG cycle (or a fixed number of cycles, or an inner AmgX solve) built once
  on a sparse matrix. Pass it as `options={"preconditioner": P}` to `lx.CG`,
  `lx.GMRES`, `lx.BiCGStab` or `lx.NormalCG`.
- [`lineax_amgx.AMGXPreconditioned`][]: a linear solver wrapping one of those
  Krylov solvers, which builds the preconditioner in its `init` (for Optimistix,
  whose solvers pass no `options`).

The setup (AmgX's hierarchy, or pyamg's on the CPU) runs once, when the
preconditioner is built; every application is a solve without setup, because the
setup token it carries names the resident setup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, Inexact, Int, PyTree

from . import _auto, _checks, _config
from ._backends import router
from ._backends.contract import (
    BACKENDS,
    PRECISIONS,
    SolveKey,
    Status,
    check_choice,
    is_complex,
    matrix_dtype as _matrix_dtype,
    mode_for,
    vector_dtype as _vector_dtype,
)
from ._checks import SYMMETRY_TAGS, tag_names
from ._operator import as_tag_set, transposed_values
from ._pattern import SparsityPattern
from ._solver import AMGX
from .matrix_free import as_csr_operator

_DEFAULT_CONFIG = "AMG_VCYCLE"


def _resolve_config(
    config, *, complex_values: bool = False, block_size: int = 1
) -> _config.ResolvedConfig:
    """`config` resolved, `None` as the default cycle (`AMG_VCYCLE`; for complex
    values `AMG_VCYCLE_COMPLEX`); `"auto"` refused (it chooses a solver preset
    for `AMGX`, not a cycle)."""
    if isinstance(config, str) and config.strip() == _auto.AUTO:
        raise _config.ConfigError(
            "config='auto' chooses a solver preset for lineax_amgx.AMGX; a "
            f"preconditioner applies a fixed cycle and defaults to "
            f"{_DEFAULT_CONFIG!r} (one symmetric aggregation V-cycle: SIZE_4, "
            "Jacobi 2+2, dense LU at the coarsest level). Pass None for it, or "
            "a preset name or config dict."
        )
    if config is None:
        config = _config.default_cycle(
            complex_values=complex_values, block_size=block_size
        )
    return _config.resolve(config)

# Outer AmgX solvers that are Krylov methods: used as a preconditioner they are an
# inner solve (a non-linear operator), not a fixed cycle.
_KRYLOV_SOLVERS = frozenset({
    "CG", "PCG", "PCGF", "GMRES", "FGMRES", "BICGSTAB", "PBICGSTAB", "IDR",
    "IDRMSYNC",
})

def _check_options(cycles, backend, precision):
    if cycles is not None:
        if isinstance(cycles, bool) or int(cycles) != cycles or cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1, got {cycles!r}.")
    check_choice("backend", backend, BACKENDS)
    check_choice("precision", precision, PRECISIONS)


def _preconditioner_key(
    resolved: _config.ResolvedConfig,
    *,
    cycles: int | None,
    mode: str,
    verbose: bool,
    backend: str,
) -> tuple[SolveKey, bool]:
    """The finalised config as a `SolveKey`, and whether it is a fixed cycle."""
    fixed = resolved.outer.get("solver") not in _KRYLOV_SOLVERS
    if fixed and cycles is None:
        cycles = 1
    # The config's own criterion (no rtol/atol: a preconditioner has none).
    final = resolved.finalised(None, max_steps=cycles, verbose=verbose)
    if fixed:
        # A fixed number of cycles whatever the residual, so that the
        # preconditioner is a fixed linear operator (P(c r) = c P(r) at any scale):
        # AmgX's ABSOLUTE test is `||r|| < tolerance`, never true for 0 (pyamg's
        # `<=` holds only for an exactly zero input, whose image is zero). The
        # residual stays monitored: AmgX refuses a residual history without it,
        # and without the history the native core's residual query would make
        # AmgX throw (and build a stack trace) on every application.
        solver = final["solver"]
        solver["convergence"] = "ABSOLUTE"
        solver["tolerance"] = 0.0
    key = SolveKey(
        config=json.dumps(final, sort_keys=True),
        mode=mode,
        transposed=False,
        verbose=bool(verbose),
        backend=backend,
    )
    return key, fixed


class AMGXPreconditioner(lx.AbstractLinearOperator):
    """An algebraic-multigrid cycle of NVIDIA AmgX (pyamg on the CPU), as a Lineax
    linear operator: the preconditioner `M ≈ A⁻¹` for Lineax's own Krylov solvers.

    Use it when you keep your own Krylov method — because the operator is
    matrix-free and cheaper to apply than to assemble, because the system is a
    nested solve, or in a Jacobian-free Newton–Krylov loop — and only want AmgX's
    multigrid to make it converge in a few iterations. The matrix it is built on
    may be the operator itself or a cheaper approximation of it (a Picard or
    lower-order matrix, a Jacobian from an earlier Newton step).

    ```python
    P = lxa.AMGXPreconditioner(A)                        # one setup, here
    sol = lx.linear_solve(A, b, lx.CG(rtol=1e-8, atol=1e-8),
                          options={"preconditioner": P})  # one cycle per iteration
    ```

    The setup runs once, when `P` is built; `P.mv(r)` is a solve without setup
    (on the GPU through AmgX's resident setup, on the CPU through pyamg's cached
    hierarchy). It works under `jax.jit` and `jax.vmap` (for example `vmap` over
    the right-hand sides of the outer solve: one setup, one cycle per member and
    iteration). No gradient flows through it: a preconditioner changes how fast a
    Krylov method converges, not its answer.

    **Tags.** With the default config (`"AMG_VCYCLE"`: one V-cycle of aggregation
    AMG with damped Jacobi smoothing, as many pre- as post-sweeps) the cycle of a
    symmetric positive definite matrix is a symmetric positive definite operator.
    It is then tagged `lx.symmetric_tag` and `lx.positive_semidefinite_tag`
    automatically when the matrix carries those tags, so that `lx.CG` accepts it.
    Pass `tags=` to tag it yourself (for a matrix you know to be SPD but did not
    tag); tags that the configured cycle cannot honour (a Gauss–Seidel or DILU
    smoother, unequal pre- and post-sweeps, a Krylov config) raise a `ValueError`.

    **`lx.CG` in float32.** Lineax's CG treats `|pᵀAp| <= 200 ε n |rᵀPr|` as a
    breakdown and returns NaN. In float32 that test fails from about 84,000
    unknowns whenever the preconditioner is close to `A⁻¹` (and often with no
    preconditioner at all): a Lineax limitation, measured on 99,856-unknown
    Poisson. [`lineax_amgx.AMGXPreconditioned`][] works around it (it hands `lx.CG`
    the cycle scaled by a power of two, which leaves CG's iterates unchanged);
    with `options={"preconditioner": P}` pass `P * c` yourself (a power of two
    `c >= 1e4 ε n`, re-tagged with `lx.TaggedLinearOperator`), use float64
    vectors (`precision="mixed"` keeps the cycle in float32), or use `lx.GMRES` /
    `lx.BiCGStab`.

    **Transpose.** For a symmetric cycle `P.transpose()` is `P`. Otherwise it is
    the same cycle built on the transposed matrix (its own setup, made when
    `transpose()` is called): a preconditioner for `Aᵀ`, which is what Lineax's
    transposed solves (reverse-mode autodiff) need, though not the exact adjoint
    of `P`.

    **Complex matrices.** A complex matrix gets a complex cycle (AmgX's complex
    modes; pyamg on the CPU) acting on complex vectors. As in Lineax,
    `lx.symmetric_tag` then means `Pᵀ = P` (given to the symmetric cycle of a
    complex symmetric matrix) and `lx.positive_semidefinite_tag` Hermitian
    positive semidefinite (given to the symmetric cycle of a matrix tagged so),
    independently of each other. `lx.conj(P)` applies the conjugate cycle
    (`conj(P conj(r))`: no new setup). Classical AMG is refused.

    **Arguments:**

    - `operator`: the matrix to build the cycle on: a
        [`lineax_amgx.CSROperator`][], or any square Lineax operator (a
        matrix-free one is sparsified: its sparsity traced, its values
        assembled by coloring).
    - `config`: an AmgX config (preset name, dict or JSON string). Default
        (`None`) `"AMG_VCYCLE"` (complex matrices: `"AMG_VCYCLE_COMPLEX"`, the
        cycle of the complex presets): `config="auto"` is
        `AMGX`'s and is refused here. An AMG (or smoother) config is applied as
        a fixed number of cycles from a zero initial guess, with no convergence
        test, so the preconditioner is a fixed linear operator. A Krylov config
        (`"PCG_..."`, `"FGMRES_..."`) is an inner solve to its own tolerance: the
        preconditioner then changes from one application to the next, which only
        flexible outer methods tolerate — prefer AMG configs with Lineax's
        solvers.
    - `cycles`: cycles per application for an AMG config (default 1); the
        maximum number of inner iterations for a Krylov config (default: the
        config's own `max_iters`).
    - `tags`: `None` (default) tags the preconditioner from the matrix's tags
        when the cycle is symmetric (see above); otherwise any of
        `lx.symmetric_tag`, `lx.positive_semidefinite_tag`,
        `lx.negative_semidefinite_tag`.
    - `structure`: the pytree of `jax.ShapeDtypeStruct`s the preconditioner acts
        on (its input and output structure). Default: `operator.in_structure()`.
        Give the outer operator's `in_structure()` when the preconditioner is
        built on a flat sparse matrix but the Krylov solve works on pytrees (for
        example a 2-D grid of unknowns): vectors are flattened in
        `jax.tree_util` leaf order, C order within each leaf.
    - `backend`: `"auto"` (AmgX for arrays on a CUDA device, pyamg for arrays on
        the CPU), `"amgx"` or `"pyamg"`. A complex matrix on a GPU needs
        `"pyamg"`: AmgX's complex modes are refused (see [`lineax_amgx.AMGX`][]).
    - `precision`: as for [`lineax_amgx.AMGX`][]: `None` follows the dtype;
        `"mixed"`: the cycle runs in float32 (hierarchy and vectors; AmgX's own
        float64-vector/float32-matrix mode `dDFI` is refused by CUDA 10.1+ builds)
        on float64 vectors, which are rounded on the way in and widened on the way
        out — an approximate inverse either way, and half the memory traffic;
        `"double"`, `"single"`.
    - `verbose`: print AmgX's own output.
    """

    values: Inexact[Array, " nnz"] | Inexact[Array, " nnz b b"]
    token: Int[Array, " 2"]
    pattern: SparsityPattern = eqx.field(static=True)
    key: SolveKey = eqx.field(static=True)
    tags: frozenset[object] = eqx.field(static=True)
    symmetric_cycle: bool = eqx.field(static=True)
    fixed: bool = eqx.field(static=True)
    structure_leaves: tuple[jax.ShapeDtypeStruct, ...] = eqx.field(static=True)
    structure_treedef: Any = eqx.field(static=True)
    # `lx.conj(P)`: the cycle applied as `conj(P conj(r))`.
    conjugated: bool = eqx.field(static=True)

    def __init__(
        self,
        operator: lx.AbstractLinearOperator,
        config: str | Mapping[str, Any] | None = None,
        *,
        cycles: int | None = None,
        tags: object = None,
        structure: PyTree[jax.ShapeDtypeStruct] | None = None,
        backend: Literal["auto", "amgx", "pyamg"] = "auto",
        precision: Literal["double", "single", "mixed"] | None = None,
        verbose: bool = False,
    ):
        _check_options(cycles, backend, precision)
        if not isinstance(operator, lx.AbstractLinearOperator):
            raise TypeError(
                "AMGXPreconditioner needs a Lineax operator (for example a "
                f"lineax_amgx.CSROperator), got {type(operator).__name__}."
            )
        csr = as_csr_operator(operator)
        p = csr.pattern
        if p.shape[0] != p.shape[1]:
            raise ValueError(
                f"AMGXPreconditioner needs a square matrix, got shape {p.shape}."
            )
        if p.shape[0] == 0:
            raise ValueError("AMGXPreconditioner got an empty (0 x 0) matrix.")
        complex_values = is_complex(csr.values.dtype)
        resolved = _resolve_config(
            config, complex_values=complex_values, block_size=p.block_size
        )
        if p.block_size > 1 and resolved.uses_classical:
            raise ValueError(
                "Classical AMG does not support block systems "
                f"(block_size={p.block_size}); use an aggregation config."
            )
        if complex_values:
            _config.check_complex(resolved, csr.values.dtype, "AMGXPreconditioner")
        symmetric_cycle, reason = resolved.symmetric_cycle()
        matrix_symmetric = lx.is_symmetric(operator) or lx.is_symmetric(csr)
        matrix_psd = lx.is_positive_semidefinite(operator) or (
            lx.is_positive_semidefinite(csr)
        )
        matrix_nsd = lx.is_negative_semidefinite(operator) or (
            lx.is_negative_semidefinite(csr)
        )
        if tags is None:
            tag_set: frozenset[object] = frozenset()
            if complex_values and symmetric_cycle:
                # Complex: `Pᵀ = P` and Hermitian definiteness are independent.
                tag_set = frozenset(
                    ([lx.symmetric_tag] if matrix_symmetric else [])
                    + ([lx.positive_semidefinite_tag] if matrix_psd else [])
                    + ([lx.negative_semidefinite_tag] if matrix_nsd else [])
                )
            elif symmetric_cycle and matrix_symmetric:
                tag_set = frozenset(
                    [lx.symmetric_tag]
                    + ([lx.positive_semidefinite_tag] if matrix_psd else [])
                    + ([lx.negative_semidefinite_tag] if matrix_nsd else [])
                )
        else:
            tag_set = as_tag_set(tags)
            unknown = tag_set - SYMMETRY_TAGS
            if unknown:
                raise ValueError(
                    f"AMGXPreconditioner does not take the tags {unknown}; only "
                    f"{tag_names(SYMMETRY_TAGS)} apply to a multigrid cycle."
                )
            if tag_set and not symmetric_cycle:
                raise ValueError(
                    f"AMGXPreconditioner cannot be tagged {tag_names(tag_set)}: "
                    f"{reason}, so the preconditioner is not a symmetric operator "
                    "(lx.CG needs a symmetric positive definite one). Use a "
                    "symmetric cycle — a BLOCK_JACOBI, JACOBI_L1 or CHEBYSHEV_POLY "
                    "smoother with presweeps == postsweeps, such as the preset "
                    "'AMG_VCYCLE' — or a solver that takes any preconditioner "
                    "(lx.GMRES, lx.BiCGStab)."
                )
            definite = {lx.positive_semidefinite_tag, lx.negative_semidefinite_tag}
            if tag_set & definite and not complex_values:
                # (Real: definite means symmetric definite. Complex: Hermitian,
                # which is not `Pᵀ = P`.)
                tag_set = tag_set | {lx.symmetric_tag}
        if structure is None:
            structure = operator.in_structure()
            if not _structure_equal(structure, operator.out_structure()):
                raise ValueError(
                    "AMGXPreconditioner needs an operator whose input and output "
                    "structures match."
                )
        leaves, treedef = jtu.tree_flatten(structure)
        leaves = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
        size = sum(int(np.prod(x.shape)) for x in leaves)
        if size != p.shape[0]:
            raise ValueError(
                f"The structure has {size} entries in all; the matrix has "
                f"{p.shape[0]} rows."
            )
        for x in leaves:
            if is_complex(x.dtype) and not complex_values:
                raise TypeError(
                    "AMGXPreconditioner built on a real matrix acts on real "
                    f"vectors, got {x.dtype}: build it on the complex matrix (or "
                    "a complex copy of it) for complex vectors."
                )
            if complex_values and not is_complex(x.dtype):
                raise TypeError(
                    "AMGXPreconditioner built on a complex matrix acts on complex "
                    f"vectors, got a structure of {x.dtype} (its output would lose "
                    "the imaginary part)."
                )
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                raise TypeError(
                    "AMGXPreconditioner acts on floating (or complex) vectors, got "
                    f"{x.dtype}."
                )
        mode = mode_for(precision, csr.values.dtype)
        key, fixed = _preconditioner_key(
            resolved, cycles=cycles, mode=mode, verbose=verbose, backend=backend
        )
        values = jax.lax.stop_gradient(csr.values).astype(_matrix_dtype(mode))
        # A symmetric cycle needs a symmetric matrix: the same check as AMGX's
        # (a ValueError now for concrete values; under jit the setup raises).
        asymmetric, refusal = _checks.asymmetry_verdict(
            p, csr.values, tag_set,
            claim="AMGXPreconditioner is tagged" if tags is not None
            else "The matrix of AMGXPreconditioner is tagged",
        )
        key = key._replace(refusal=refusal)
        self.values = values
        self.token = router.setup(p, values, key, refuse=asymmetric)
        self.pattern = p
        self.key = key
        self.tags = tag_set
        self.symmetric_cycle = bool(symmetric_cycle and lx.symmetric_tag in tag_set)
        self.fixed = fixed
        self.structure_leaves = leaves
        self.structure_treedef = treedef
        self.conjugated = False

    # -- applying the cycle --------------------------------------------------------

    def _flatten(self, vector) -> Array:
        leaves, treedef = jtu.tree_flatten(vector)
        if treedef != self.structure_treedef or len(leaves) != len(
            self.structure_leaves
        ):
            raise ValueError(
                "The vector's structure does not match the preconditioner's: got "
                f"{treedef}, expected {self.structure_treedef}."
            )
        for leaf, struct in zip(leaves, self.structure_leaves):
            if jnp.shape(leaf) != struct.shape:
                raise ValueError(
                    f"The vector has a leaf of shape {jnp.shape(leaf)}; the "
                    f"preconditioner expects {struct.shape}."
                )
        dtype = _vector_dtype(self.key.mode)
        flat = [jnp.ravel(jnp.asarray(leaf)).astype(dtype) for leaf in leaves]
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat)

    def _unflatten(self, x: Array):
        out = []
        start = 0
        for struct in self.structure_leaves:
            size = int(np.prod(struct.shape))
            leaf = x[start : start + size].reshape(struct.shape)
            out.append(leaf.astype(struct.dtype))
            start += size
        return jtu.tree_unflatten(self.structure_treedef, out)

    def _apply(self, r: Array) -> Array:
        if self.conjugated:
            r = jnp.conj(r)
        x, info, _ = router.solve(self.pattern, self.values, self.token, r, None,
                                     self.key)
        if self.conjugated:
            x = jnp.conj(x)
        # A fixed number of cycles reports "not converged" (or "success" when no
        # residual is monitored): both are fine. A non-finite input, or a cycle
        # that blew up, must never come back as a silent finite answer.
        status = info[0]
        bad = (status == Status.NONFINITE) | (
            status == Status.DIVERGED
        )
        return jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)

    def mv(self, vector):
        return self._unflatten(self._apply(self._flatten(vector)))

    def as_matrix(self) -> Array:
        """The dense matrix of the preconditioner, by applying it to every column of
        the identity (one cycle per column): for small problems and tests only."""
        n = self.pattern.shape[0]
        eye = jnp.eye(n, dtype=_vector_dtype(self.key.mode))
        cols = jax.vmap(self._apply)(eye)
        dtype = jnp.result_type(*[s.dtype for s in self.structure_leaves])
        return cols.T.astype(dtype)

    def transpose(self) -> AMGXPreconditioner:
        if self.symmetric_cycle:
            return self
        pattern_t, values_t = transposed_values(self.pattern, self.values)
        key_t = self.key._replace(transposed=not self.key.transposed)
        fields = dict(
            values=values_t,
            token=router.setup(pattern_t, values_t, key_t),
            pattern=pattern_t,
            key=key_t,
            tags=lx.transpose_tags(self.tags),
            symmetric_cycle=False,
            fixed=self.fixed,
            structure_leaves=self.structure_leaves,
            structure_treedef=self.structure_treedef,
            conjugated=self.conjugated,
        )
        return _assemble(fields)

    def in_structure(self):
        return jtu.tree_unflatten(self.structure_treedef, list(self.structure_leaves))

    def out_structure(self):
        return self.in_structure()


def _conj(op: AMGXPreconditioner) -> AMGXPreconditioner:
    """`lx.conj(P)`: the identity for a real cycle; for a complex one the same
    setup applied as `conj(P conj(r))` (the cycle of the conjugate matrix)."""
    if not is_complex(op.values.dtype):
        return op
    fields = {f: getattr(op, f) for f in op.__dataclass_fields__}
    fields["conjugated"] = not op.conjugated
    return _assemble(fields)


def _assemble(fields: dict[str, Any]) -> AMGXPreconditioner:
    """An `AMGXPreconditioner` from its fields (as Equinox's own unflattening
    does), for the transpose, whose setup differs from the public constructor's."""
    obj = object.__new__(AMGXPreconditioner)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def _structure_equal(a, b) -> bool:
    la, ta = jtu.tree_flatten(a)
    lb, tb = jtu.tree_flatten(b)
    return ta == tb and all(
        x.shape == y.shape and x.dtype == y.dtype for x, y in zip(la, lb)
    )


# ---- Lineax's singledispatch queries -------------------------------------------


def _register():
    P = AMGXPreconditioner
    # A multigrid cycle has no cheap entries: it is never diagonal, tridiagonal or
    # triangular, and its symmetry is what its tags say.
    lx.linearise.register(P)(lambda op: op)
    # Materialising would take one cycle per column: keep the operator (Lineax's
    # solvers only ever apply it).
    lx.materialise.register(P)(lambda op: op)

    @lx.diagonal.register(P)
    def _(op):
        raise NotImplementedError(
            "The diagonal of an AMGXPreconditioner is not available: a multigrid "
            "cycle has no cheap entries. For a small problem use "
            "jnp.diagonal(P.as_matrix()) (one cycle per column)."
        )

    @lx.tridiagonal.register(P)
    def _(op):
        raise NotImplementedError(
            "The tridiagonal of an AMGXPreconditioner is not available: a "
            "multigrid cycle has no cheap entries. For a small problem use "
            "P.as_matrix() (one cycle per column)."
        )

    lx.is_symmetric.register(P)(lambda op: lx.symmetric_tag in op.tags)
    lx.is_positive_semidefinite.register(P)(
        lambda op: lx.positive_semidefinite_tag in op.tags
    )
    lx.is_negative_semidefinite.register(P)(
        lambda op: lx.negative_semidefinite_tag in op.tags
    )
    for query in (
        lx.is_diagonal,
        lx.is_tridiagonal,
        lx.has_unit_diagonal,
        lx.is_lower_triangular,
        lx.is_upper_triangular,
    ):
        query.register(P)(lambda op: False)
    lx.conj.register(P)(_conj)


_register()


# ---- The solver wrapper (for Optimistix) -----------------------------------------


def _scaled_for_cg(P: AMGXPreconditioner, vector):
    """`P`, or `c P` for a power of two `c` where Lineax's CG needs it.

    `lx.CG` declares a breakdown, and returns NaN, when `|pᵀAp| <= 200 ε n |rᵀPr|`
    (its `rcond = 2 ε n`, times 100). For `p = P r` the ratio of the two sides is
    the Rayleigh quotient of `PA`, close to 1 for a good preconditioner: in float32
    from n ≈ 84,000 unknowns on (ε = 1.2e-7) every step is then a "breakdown"
    (measured: 99,856-unknown Poisson, first step). CG's iterates do not depend on
    the scale of the preconditioner (`p` scales by `c`, its step length by
    `1/c`), and a power of two scales exactly, so the cycle is scaled until a
    Rayleigh quotient down to 0.02 passes the test."""
    leaves = jtu.tree_leaves(vector)
    dtype = jnp.result_type(*leaves)
    n = sum(int(np.prod(jnp.shape(x))) for x in leaves)
    need = 1e4 * float(jnp.finfo(dtype).eps) * n
    if need <= 1:
        return P
    c = 2.0 ** int(np.ceil(np.log2(need)))
    tags = [
        tag
        for tag, query in (
            (lx.symmetric_tag, lx.is_symmetric),
            (lx.positive_semidefinite_tag, lx.is_positive_semidefinite),
        )
        if query(P)
    ]
    return lx.TaggedLinearOperator(P * c, frozenset(tags))


class _PreconditionedState(eqx.Module):
    inner: Any
    preconditioner: AMGXPreconditioner


class AMGXPreconditioned(lx.AbstractLinearSolver[_PreconditionedState]):
    """A Lineax Krylov solver preconditioned by an AmgX multigrid cycle, as one
    linear solver.

    Use it where you cannot pass `options={"preconditioner": ...}` yourself, above
    all in Optimistix (`optx.Newton(..., linear_solver=...)`, `optx.Chord`), whose
    solvers call `lx.linear_solve` without options:

    ```python
    solver = lxa.AMGXPreconditioned(lx.GMRES(rtol=1e-10, atol=1e-10, restart=30))
    newton = optx.Newton(rtol=1e-8, atol=1e-8, linear_solver=solver)
    ```

    `init(operator, options)` builds an [`lineax_amgx.AMGXPreconditioner`][] —
    one AmgX setup — and the inner solver's state; `compute` runs the inner solver
    with `options={"preconditioner": P}`. A Newton step is then one setup and one
    cycle per Krylov iteration, while the Jacobian itself stays matrix-free.

    **Arguments:**

    - `inner`: the Krylov solver: `lx.GMRES`, `lx.BiCGStab`, `lx.CG` (needs a
        symmetric positive definite cycle: see the tags of
        [`lineax_amgx.AMGXPreconditioner`][]) or `lx.NormalCG`.
    - `config`, `cycles`, `tags`, `backend`, `precision`, `verbose`: passed to
        [`lineax_amgx.AMGXPreconditioner`][].
    - `lagged_operator`: the matrix the cycle is built on. `None` (default): the
        operator being solved, sparsified if it is matrix-free (a Newton
        Jacobian: its sparsity is detected once per compile and its values
        assembled with one JVP per color). A Lineax operator (typically a
        [`lineax_amgx.CSROperator`][]): that fixed matrix, for every solve — a
        cheaper approximation such as a Picard or a lower-order matrix, or the
        Jacobian at the initial guess; its setup is made once and found again in
        the cache at every later `init`. A callable: called as
        `lagged_operator(operator)` in every `init`, returning the matrix to build
        the cycle on (for example from the `x` and `args` of a
        `lx.JacobianLinearOperator`).
    """

    inner: lx.AbstractLinearSolver
    config: str | None = eqx.field(static=True)
    # `config`, parsed and validated once (handed to every preconditioner built;
    # None: the preconditioner's default for the matrix's dtype).
    resolved: _config.ResolvedConfig | None = eqx.field(static=True, repr=False)
    lagged_operator: Any = None
    cycles: int | None = eqx.field(static=True, default=None)
    tags: Any = eqx.field(static=True, default=None)
    backend: Literal["auto", "amgx", "pyamg"] = eqx.field(static=True, default="auto")
    precision: Literal["double", "single", "mixed"] | None = eqx.field(
        static=True, default=None
    )
    verbose: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        inner: lx.AbstractLinearSolver,
        config: str | Mapping[str, Any] | None = None,
        *,
        lagged_operator: lx.AbstractLinearOperator
        | Callable[[lx.AbstractLinearOperator], lx.AbstractLinearOperator]
        | None = None,
        cycles: int | None = None,
        tags: object = None,
        backend: Literal["auto", "amgx", "pyamg"] = "auto",
        precision: Literal["double", "single", "mixed"] | None = None,
        verbose: bool = False,
    ):
        if not isinstance(inner, lx.AbstractLinearSolver):
            raise TypeError(
                "AMGXPreconditioned wraps a Lineax linear solver (lx.GMRES, "
                f"lx.BiCGStab, lx.CG, lx.NormalCG), got {type(inner).__name__}."
            )
        if isinstance(inner, (AMGX, AMGXPreconditioned)):
            raise TypeError(
                f"AMGXPreconditioned wraps one of Lineax's Krylov solvers, not "
                f"{type(inner).__name__} (which takes no preconditioner)."
            )
        if lagged_operator is not None and not (
            isinstance(lagged_operator, lx.AbstractLinearOperator)
            or callable(lagged_operator)
        ):
            raise TypeError(
                "lagged_operator must be None, a Lineax operator or a callable "
                f"returning one, got {type(lagged_operator).__name__}."
            )
        _check_options(cycles, backend, precision)
        if tags is not None:
            tags = as_tag_set(tags)
        self.inner = inner
        # None: the preconditioner's default cycle, chosen by the matrix's dtype.
        self.resolved = None if config is None else _resolve_config(config)
        self.config = None if config is None else self.resolved.text
        self.lagged_operator = lagged_operator
        self.cycles = None if cycles is None else int(cycles)
        self.tags = tags
        self.backend = backend
        self.precision = precision
        self.verbose = bool(verbose)

    def _matrix(self, operator: lx.AbstractLinearOperator):
        lagged = self.lagged_operator
        if lagged is None:
            return operator
        if isinstance(lagged, lx.AbstractLinearOperator):
            return lagged
        matrix = lagged(operator)
        if not isinstance(matrix, lx.AbstractLinearOperator):
            raise TypeError(
                "lagged_operator(operator) must return a Lineax operator (for "
                f"example a lineax_amgx.CSROperator), got {type(matrix).__name__}."
            )
        return matrix

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        if any(options.get(k) is not None for k in ("null_space", "left_null_space")):
            raise NotImplementedError(
                "AMGXPreconditioned does not take options['null_space']: its inner "
                "Lineax solver projects neither the right-hand side nor the answer, "
                "which a singular system (and its derivative) needs. Use "
                "lineax_amgx.AMGX(null_space=...) (or options['null_space'] with "
                "lineax_amgx.AMGX()): AmgX's Krylov method around the same "
                "multigrid, with the projections. See the singular systems guide."
            )
        if "preconditioner" in options:
            raise ValueError(
                "AMGXPreconditioned builds its own preconditioner: do not pass "
                "options['preconditioner'] (or call the inner solver directly with "
                "yours)."
            )
        preconditioner = AMGXPreconditioner(
            self._matrix(operator),
            self.resolved,
            cycles=self.cycles,
            tags=self.tags,
            structure=operator.in_structure(),
            backend=self.backend,
            precision=self.precision,
            verbose=self.verbose,
        )
        if isinstance(self.inner, lx.CG) and not lx.is_positive_semidefinite(
            preconditioner
        ):
            raise ValueError(
                "lx.CG needs a symmetric positive definite preconditioner, and this "
                "AmgX cycle is not tagged as one: build it on a matrix tagged "
                "lx.symmetric_tag and lx.positive_semidefinite_tag with a "
                "symmetric cycle (the default 'AMG_VCYCLE'), pass "
                "tags=lx.positive_semidefinite_tag if you know it is, or use "
                "lx.GMRES / lx.BiCGStab."
            )
        inner_state = self.inner.init(operator, options)
        return _PreconditionedState(inner_state, preconditioner)

    def compute(
        self, state: _PreconditionedState, vector, options: dict[str, Any]
    ):
        preconditioner = state.preconditioner
        if isinstance(self.inner, lx.CG):
            preconditioner = _scaled_for_cg(preconditioner, vector)
        options = dict(options, preconditioner=preconditioner)
        return self.inner.compute(state.inner, vector, options)

    def transpose(self, state: _PreconditionedState, options: dict[str, Any]):
        return _through_inner(
            self.inner.transpose, state, options, state.preconditioner.transpose
        )

    def conj(self, state: _PreconditionedState, options: dict[str, Any]):
        return _through_inner(
            self.inner.conj, state, options, lambda: _conj(state.preconditioner)
        )

    def assume_full_rank(self):
        return self.inner.assume_full_rank()


def _through_inner(method, state: _PreconditionedState, options, fallback):
    """The inner solver's `transpose` or `conj` with the preconditioner in the
    options; the preconditioner it hands back (or `fallback()`) in the new state."""
    options = dict(options, preconditioner=state.preconditioner)
    inner, options = method(state.inner, options)
    options = dict(options)
    p = options.pop("preconditioner", None)
    if not isinstance(p, AMGXPreconditioner):
        p = fallback()
    return _PreconditionedState(inner, p), options
