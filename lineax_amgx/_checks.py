# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Checks of the traps a user can fall into without an error anywhere else.

- A dense Lineax operator (a traced `lx.MatrixLinearOperator`, or any operator
  whose sparsity is every entry) becomes an `n x n` CSR matrix: it works, slowly.
  `DenseOperatorWarning`, once per shape; an error where `n^2` exceeds AmgX's
  32-bit indices.
- float64 host values given to a `CSROperator` while JAX's 64-bit mode is off
  are rounded to float32: a `UserWarning` at the user's call site.
- An operator tagged symmetric (or positive/negative semidefinite) whose values
  are not symmetric: the forward solve may even succeed, but the backward pass
  reuses the forward setup as if `A^T = A`, so gradients are wrong. One helper,
  `asymmetry_verdict`, for the `CSROperator` constructors (concrete values:
  `ValueError`), `AMGX.init` and `AMGXPreconditioner` (traced values: a verdict
  the backend's setup turns into an error before it sets anything up). For
  complex values the tags mean what they mean in Lineax: `lx.symmetric_tag` is
  `A = A^T` (complex symmetric, compared without conjugation) and the
  semidefinite tags are Hermitian, `A = A^H` (compared with the conjugate
  mirror, so a diagonal entry must be real).
"""

from __future__ import annotations

import functools as ft
import os
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from ._pattern import SparsityPattern, check_index_range
from ._runtime_arrays import pattern_array
from ._warnings import warn_once

__all__ = [
    "DenseOperatorWarning",
    "SYMMETRY_TAGS",
    "asymmetry_verdict",
    "check_symmetric",
    "claimed_symmetry",
    "symmetry_tolerance",
    "symmetry_verdict",
    "tag_names",
    "warn_dense",
    "warn_if_downcast",
]


# -- where a warning points ----------------------------------------------------------


def _dir(module) -> str:
    return os.path.dirname(os.path.abspath(module.__file__)) + os.sep


# Frames in these are not the user's: this package, what calls our `__init__`s
# and single-dispatch hooks (Equinox, Lineax, JAX's tracing, functools).
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, _dir(eqx), _dir(lx),
             _dir(jax))
_STDLIB = _dir(ft)


def _is_internal(filename: str) -> bool:
    if filename.startswith(_INTERNAL):
        return True
    return filename.startswith(_STDLIB) and "-packages" not in filename


def _user_level(frame) -> int:
    """How many frames outward from `frame` the first one outside this package
    and the libraries that call it lies (0: `frame` itself): where a warning
    should point, the user's call."""
    level = 0
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


# -- dense operators ---------------------------------------------------------------


class DenseOperatorWarning(UserWarning):
    """A dense operator was converted to a sparse matrix that stores every entry.

    [`lineax_amgx.AMGX`][] solves sparse matrices. Given an `lx.MatrixLinearOperator`
    whose matrix is traced (under `jax.jit`, `jax.grad`, or inside `lx.linear_solve`,
    which traces its operator), the sparsity of the matrix is unknown at trace time,
    so every one of its `n^2` entries is stored and the AMG hierarchy is built on a
    dense graph: correct, but slow and memory hungry (measured on the CPU: 4,900
    unknowns, 24 million stored entries, a repeated solve 8.8 s against 0.01 s
    for the sparse matrix). The same happens for any operator whose detected
    sparsity is every entry.

    The fix: build the sparse matrix outside `jit`, once, with
    [`lineax_amgx.CSROperator.from_dense`][] on the concrete matrix, and pass new
    values with [`lineax_amgx.CSROperator.with_values`][] on that known pattern
    (or write the operator matrix-free and let [`lineax_amgx.sparsify`][] find its
    sparsity). A matrix that really is dense wants a dense solver (`lx.LU`,
    `lx.Cholesky`).

    Given once per shape and process, from 10,000 stored entries (`n >= 100`;
    smaller dense matrices are cheap). A dense pattern beyond AmgX's 32-bit
    indices (`n^2 > 2^31 - 1`) is a `ValueError` instead.
    """


# Dense patterns with fewer stored entries than this (n < 100) are cheap: no warning.
DENSE_WARNING_ENTRIES = 10_000


def warn_dense(shape: tuple[int, int], what: str, why: str) -> None:
    """Warn (once per `shape` and `what`) that `what` (`"A traced
    lx.MatrixLinearOperator"`) of `shape` becomes a dense CSR matrix, because
    `why`; raise a `ValueError` where its `n^2` entries cannot be indexed in 32
    bits (called before anything of that size is allocated)."""
    m, n = (int(s) for s in shape)
    entries = m * n
    fix = (
        "Build the sparse matrix once, outside jit, with "
        "lineax_amgx.CSROperator.from_dense(matrix) on the concrete matrix (only "
        "its nonzeros are stored) and pass new values through "
        "CSROperator.with_values(values) on that known pattern; or write the "
        "operator matrix-free (lx.FunctionLinearOperator, "
        "lx.JacobianLinearOperator) and lineax_amgx.sparsify it. A matrix that "
        "really is dense wants a dense solver (lx.LU, lx.Cholesky)."
    )
    try:
        check_index_range(shape, entries)
    except ValueError as e:
        raise ValueError(
            f"{what} of shape {shape} would become a dense CSR matrix ({why}) of "
            f"{entries:,} stored entries, beyond AmgX's 32-bit indices ({e}) "
            + fix
        ) from None
    if entries < DENSE_WARNING_ENTRIES:
        return
    warn_once(
        ("dense-operator", what, (m, n)),
        f"{what} of shape {shape} becomes a dense CSR matrix ({why}): all "
        f"n^2 = {entries:,} entries are stored (n = {n:,}), and AMG on a dense "
        "matrix is slow and memory hungry. " + fix,
        DenseOperatorWarning,
        stacklevel=2 + _user_level(sys._getframe(1)),
    )


# -- float64 host values without x64 ------------------------------------------------


def warn_if_downcast(values) -> None:
    """Warn where float64 (complex128) host (NumPy) values are about to become
    float32 (complex64) because JAX's 64-bit mode is off. JAX arrays are left
    alone (without x64 none is float64), and so are Python floats (JAX's default
    dtype is the user's choice). Python's warning registry shows it once per call
    site."""
    if jax.config.jax_enable_x64:
        return
    if not isinstance(values, np.ndarray):
        return
    if values.dtype == np.float64:
        wide, narrow = "float64", "float32"
    elif values.dtype == np.complex128:
        wide, narrow = "complex128", "complex64"
    else:
        return
    warnings.warn(
        f"{wide} matrix values are rounded to {narrow} (and solved in {narrow}) "
        "because JAX's 64-bit mode is off. Enable it at the start of the program, "
        f'jax.config.update("jax_enable_x64", True), to solve in {wide}; or pass '
        f"{narrow} values explicitly (values.astype(np.{narrow}), "
        f"CSROperator.from_scipy(matrix, dtype=np.{narrow})) to keep {narrow} and "
        "silence this warning.",
        UserWarning,
        stacklevel=2 + _user_level(sys._getframe(1)),
    )


# -- symmetry -------------------------------------------------------------------------

# The tags that promise a symmetric matrix (Lineax's semidefinite tags pick
# Cholesky/CG, which assume symmetry).
SYMMETRY_TAGS = frozenset({
    lx.symmetric_tag, lx.positive_semidefinite_tag, lx.negative_semidefinite_tag,
})
_TAG_NAMES = {
    lx.symmetric_tag: "lx.symmetric_tag",
    lx.positive_semidefinite_tag: "lx.positive_semidefinite_tag",
    lx.negative_semidefinite_tag: "lx.negative_semidefinite_tag",
}


def tag_names(tags) -> str:
    """Tags as the user writes them (`lx.symmetric_tag, ...`)."""
    return ", ".join(sorted(_TAG_NAMES.get(t, repr(t)) for t in tags))


def claimed_symmetry(*operators) -> frozenset:
    """The symmetry tags (`SYMMETRY_TAGS`) that any of `operators` claims through
    Lineax's queries (`lx.is_symmetric`, ...). A diagonal pattern answers
    `is_symmetric` from its structure: that is no claim, and passes any check."""
    out = set()
    for op in operators:
        for tag, query in (
            (lx.symmetric_tag, lx.is_symmetric),
            (lx.positive_semidefinite_tag, lx.is_positive_semidefinite),
            (lx.negative_semidefinite_tag, lx.is_negative_semidefinite),
        ):
            try:
                if query(op):
                    out.add(tag)
            except NotImplementedError:
                pass
    return frozenset(out)


def symmetry_tolerance(dtype) -> float:
    """`|a_ij - a_ji| <= symmetry_tolerance(dtype) * max |a|` passes: sqrt(eps),
    1.5e-8 in float64 and 3.5e-4 in float32. Assembly round-off (a few eps) and a
    float32-born matrix in float64 pass; any modelling asymmetry (a convection
    term, a one-sided boundary row) is far above it."""
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))


@ft.singledispatch
def _checked_mirror(pattern, tags, claim: str, hermitian: bool = False
                    ) -> np.ndarray | None:
    """The mirror permutation of a pattern whose symmetry is to be checked on this
    process; `None` where there is nothing to check, or it cannot be checked here
    (a `DistributedPattern`: each rank holds only its rows; the tag is trusted)."""
    return None


@_checked_mirror.register
def _(pattern: SparsityPattern, tags, claim: str, hermitian: bool = False
      ) -> np.ndarray | None:
    if pattern.shape[0] != pattern.shape[1]:
        raise ValueError(
            f"{claim} {tag_names(tags)}, but its shape {pattern.shape} is not square."
        )
    if pattern.nnz == 0:
        return None
    if not hermitian and pattern.block_size == 1 and pattern.bandwidth == (0, 0):
        return None  # diagonal: symmetric whatever the values (Hermitian if real)
    return pattern.mirror


def _asymmetry(values, mirror, hermitian=False):
    """`(largest |a_ij - a_ji|, its entry position, max |a|)` (`hermitian`:
    `|a_ij - conj(a_ji)|`); an entry whose mirror is not stored is compared with
    zero. One gather and one pass."""
    has = mirror >= 0
    partner = values[jnp.where(has, mirror, 0)]
    if hermitian:
        partner = jnp.conj(partner)
    if values.ndim == 3:
        partner = jnp.swapaxes(partner, -1, -2)
        has = has[:, None, None]
    diff = jnp.abs(values - jnp.where(has, partner, 0))
    if values.ndim == 3:
        diff = jnp.max(diff, axis=(1, 2))
    return jnp.max(diff), jnp.argmax(diff), jnp.max(jnp.abs(values))


_asymmetry_jit = jax.jit(_asymmetry, static_argnames="hermitian")


def _kinds(tags, dtype) -> list[tuple[frozenset, bool]]:
    """The checks `tags` (symmetry tags only) ask of values of `dtype`:
    `(tags, hermitian)` pairs. Real values: one plain check for all of them.
    Complex values, as in Lineax: `lx.symmetric_tag` promises `A = A^T`, the
    semidefinite tags `A = A^H`."""
    if not tags:
        return []
    if not jnp.issubdtype(dtype, jnp.complexfloating):
        return [(tags, False)]
    out = []
    plain = tags & {lx.symmetric_tag}
    if plain:
        out.append((plain, False))
    if tags - plain:
        out.append((tags - plain, True))
    return out


_CONSEQUENCE = (
    "A symmetric operator's backward solve reuses the forward setup as if "
    "A^T = A (gradients through lx.linear_solve would be wrong), and CG and "
    "symmetric AMG cycles assume symmetry. Remove the tag (a non-symmetric "
    "operator is solved with FGMRES and differentiated through its transpose), "
    "or fix the assembly."
)


_HERMITIAN_CONSEQUENCE = (
    "For complex values Lineax's semidefinite tags promise a Hermitian matrix "
    "(A = A^H, a real diagonal): CG and Hermitian preconditioners assume it. "
    "Remove the tag, or fix the assembly; a complex symmetric matrix "
    "(A = A^T, not Hermitian) takes lx.symmetric_tag alone."
)


def _message(claim: str, tags, tol: float, hermitian: bool = False) -> str:
    if hermitian:
        return (
            f"{claim} {tag_names(tags)}, but its complex values are not "
            f"Hermitian: some |A[i, j] - conj(A[j, i])| exceeds {tol:.1e} * "
            "max |A|. " + _HERMITIAN_CONSEQUENCE
        )
    return (
        f"{claim} {tag_names(tags)}, but its values are not symmetric: some "
        f"|A[i, j] - A[j, i]| exceeds {tol:.1e} * max |A|. " + _CONSEQUENCE
    )


def asymmetry_verdict(pattern, values, tags, *, claim: str):
    """Whether `values` on `pattern` break a symmetry tag in `tags`:
    `(refuse, message)`.

    Concrete `values`: checked now (`check_symmetric`: a `ValueError` naming the
    tag and the largest asymmetry); `(None, "")`. Traced `values` (under `jit`,
    `vmap`, `grad`): `refuse` is a traced bool scalar (one gather through the
    pattern's mirror and one pass over the values, on their device) and
    `message` the error the backend's setup raises when it is true: the solver
    folds `refuse` into the setup's `ok` code (`contract.OK_REFUSE`), which the
    setup reads anyway, so the check costs no host synchronisation of its own
    and the error comes before AmgX's (or pyamg's) setup. `(None, "")` where
    there is nothing to check. `claim` starts the message (`"The operator is
    tagged"`). The structural part (the mirror permutation) is computed once per
    pattern. Complex values with both a symmetric and a semidefinite tag are
    checked both ways; the message then names both promises."""
    tags = frozenset(tags) & SYMMETRY_TAGS
    if not tags:
        return None, ""
    if not isinstance(values, jax.core.Tracer):
        check_symmetric(pattern, values, tags, claim=claim)
        return None, ""
    refuse, messages = None, []
    for kind, hermitian in _kinds(tags, values.dtype):
        mirror = _checked_mirror(pattern, kind, claim, hermitian)
        if mirror is None:
            continue
        tol = symmetry_tolerance(values.dtype)
        # The mirror reaches the compiled program at run time, not as a constant.
        diff, _, top = _asymmetry(
            values, pattern_array(pattern, "mirror", mirror), hermitian
        )
        bad = diff > tol * top
        refuse = bad if refuse is None else refuse | bad
        messages.append(_message(claim, kind, tol, hermitian))
    return refuse, " Or: ".join(messages)


def check_symmetric(pattern, values, tags, *, claim: str) -> None:
    """`asymmetry_verdict` for concrete values only (traced values pass: the
    solvers check them), with nothing to attach the check to: the `CSROperator`
    constructors call it."""
    tags = frozenset(tags) & SYMMETRY_TAGS
    if not tags or isinstance(values, jax.core.Tracer):
        return
    for kind, hermitian in _kinds(tags, values.dtype):
        _check_concrete(pattern, values, kind, claim, hermitian)


def _check_concrete(pattern, values, tags, claim: str, hermitian: bool) -> None:
    mirror = _checked_mirror(pattern, tags, claim, hermitian)
    if mirror is None:
        return
    tol = symmetry_tolerance(values.dtype)
    diff, k, top = (
        np.asarray(r) for r in _asymmetry_jit(values, mirror, hermitian=hermitian)
    )
    if not diff > tol * top:  # NaN/Inf: the solver's non-finite check reports it
        return
    k = int(k)
    b = pattern.block_size
    i, j = int(pattern.row_ids[k]), int(pattern.indices[k])
    v = np.asarray(values[k]).reshape(b, b)
    m = int(mirror[k])
    w = np.zeros((b, b), v.dtype) if m < 0 else np.asarray(values[m]).reshape(b, b).T
    p, q = np.unravel_index(
        int(np.argmax(np.abs(v - (np.conj(w) if hermitian else w)))), (b, b)
    )
    r, c = i * b + p, j * b + q
    stored = "" if m >= 0 else " (not stored)"
    if hermitian:
        raise ValueError(
            f"{claim} {tag_names(tags)}, but its complex values are not Hermitian: "
            f"the largest |A[i, j] - conj(A[j, i])| is at A[{r}, {c}] = "
            f"{v[p, q]:.6g} against A[{c}, {r}] = {w[p, q]:.6g}{stored}, a "
            f"difference of {float(diff):.3g} ({float(diff) / float(top):.2g} of "
            f"max |A| = {float(top):.3g}; the tolerance is {tol:.1e}). "
            + _HERMITIAN_CONSEQUENCE
        )
    raise ValueError(
        f"{claim} {tag_names(tags)}, but its values are not symmetric: the largest "
        f"asymmetry is A[{r}, {c}] = {v[p, q]:.6g} against A[{c}, {r}] = "
        f"{w[p, q]:.6g}{stored}, a difference of {float(diff):.3g} "
        f"({float(diff) / float(top):.2g} of max |A| = {float(top):.3g}; "
        f"the tolerance is {tol:.1e}). " + _CONSEQUENCE
    )


def symmetry_verdict(csr, *operators, claim: str):
    """`asymmetry_verdict` of `csr`'s values (a CSR-like operator with `pattern`
    and `values`) against the symmetry tags that `csr` or any of `operators`
    claims: what a solver's `init` folds into its setup."""
    tags = claimed_symmetry(csr, *operators)
    return asymmetry_verdict(csr.pattern, csr.values, tags, claim=claim)
