# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`CSROperator`: a sparse (block) CSR matrix as a Lineax linear operator."""

from __future__ import annotations

import hashlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Inexact

from ._blocks import check_block_size
from ._checks import check_symmetric, warn_if_downcast
from ._pattern import SparsityPattern, check_index_range
from ._profile import MatrixProfile, profile
from ._runtime_arrays import pattern_array, runtime_array, take


def as_tag_set(tags: object) -> frozenset[object]:
    """Lineax's `tags` argument (one tag or a collection) as a frozenset."""
    if isinstance(tags, (list, tuple, set, frozenset)):
        return frozenset(tags)
    return frozenset([tags])


# The value dtypes of AmgX's modes dFFI, dDDI, dCCI and dZZI.
_VALUE_DTYPES = (jnp.float32, jnp.float64, jnp.complex64, jnp.complex128)


def _check_values(values, pattern: SparsityPattern):
    if not isinstance(values, jax.core.Tracer):
        warn_if_downcast(values)  # float64 NumPy values without x64
        values = jnp.asarray(values)
    if values.shape != pattern.value_shape:
        raise ValueError(
            f"values has shape {values.shape}, expected {pattern.value_shape} for "
            f"{pattern}."
        )
    dtype = values.dtype
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            "values must have a floating dtype (float32, float64, complex64 or "
            f"complex128), got {dtype}."
        )
    if dtype not in _VALUE_DTYPES:
        raise TypeError(
            "values must be float32, float64, complex64 or complex128, got "
            f"{dtype}; cast them first."
        )
    return values


class CSROperator(lx.AbstractLinearOperator):
    """A sparse matrix in (block) CSR format, as a Lineax linear operator.

    The structure is a static [`lineax_amgx.SparsityPattern`][] (host arrays,
    fingerprinted once); only `values` is traced, so it can be the output of a
    jitted, differentiated computation. `mv`, `transpose`, `as_matrix` and every
    Lineax query (`lx.is_symmetric`, `lx.diagonal`, ...) work on it, and gradients
    flow to `values`.

    Build one with [`lineax_amgx.CSROperator.from_scipy`][],
    [`lineax_amgx.CSROperator.from_bcoo`][],
    [`lineax_amgx.CSROperator.from_arrays`][] or
    [`lineax_amgx.CSROperator.from_dense`][], or directly from a pattern and values.

    **Arguments:**

    - `pattern`: the [`lineax_amgx.SparsityPattern`][].
    - `values`: array of shape `(nnz,)` (or `(nnz, b, b)` for block patterns):
        float32, float64, complex64 or complex128.
    - `tags`: Lineax tags such as `lx.symmetric_tag` or
        `lx.positive_semidefinite_tag`. They choose the default AmgX
        configuration (CG for symmetric positive definite). Symmetry is checked
        (`lx.symmetric_tag` and the semidefinite tags promise it): concrete
        values here (a `ValueError` naming the largest `|A[i, j] - A[j, i]|`
        above `sqrt(eps) max |A|`), traced values when a solver uses them.
        Definiteness is not checked. As in Lineax, for complex values
        `lx.symmetric_tag` means `A = Aᵀ` (complex symmetric, not Hermitian:
        the check compares `A[i, j]` with `A[j, i]`, not with its conjugate)
        and `lx.positive_semidefinite_tag` means Hermitian positive
        semidefinite (checked as `A[i, j] = conj(A[j, i])`).

    `transpose()` is the plain transpose `Aᵀ` (no conjugation) and `lx.conj(A)`
    conjugates the values, as Lineax defines them; `Aᴴ` is
    `lx.conj(A).transpose()`.

    `profile` (read-only) holds the value statistics `config="auto"` reads
    (a `MatrixProfile`: M-matrix sign pattern, diagonal dominance, contrast and
    anisotropy in decades), computed once when the values are a concrete NumPy
    array (`from_scipy`, `from_dense`, `from_arrays` or `with_values` with NumPy
    values); `None` for JAX arrays (traced or not), block patterns and complex
    values. See [Configurations](../guide/configs.md#choosing-automatically).
    """

    pattern: SparsityPattern = eqx.field(static=True)
    values: Inexact[Array, " nnz *block"]
    tags: frozenset[object] = eqx.field(static=True)
    profile: MatrixProfile | None = eqx.field(static=True, default=None)

    def __init__(self, pattern: SparsityPattern, values, tags: object = ()):
        if not isinstance(pattern, SparsityPattern):
            raise TypeError(
                f"pattern must be a SparsityPattern, got {type(pattern).__name__}."
            )
        check_block_size(pattern.block_size)
        self.pattern = pattern
        host = values if isinstance(values, np.ndarray) else None
        self.values = _check_values(values, pattern)
        # Value statistics for config="auto", from host values only (never a
        # device-to-host copy).
        self.profile = None if host is None else profile(pattern, host)
        self.tags = as_tag_set(tags)
        # Concrete values: a ValueError now if a symmetry tag is false (traced
        # values are checked by the solvers).
        check_symmetric(
            pattern, self.values, self.tags, claim="The CSROperator is tagged"
        )

    # -- constructors ------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        indptr,
        indices,
        values,
        shape: tuple[int, int],
        *,
        block_size: int = 1,
        tags: object = (),
        sum_duplicates: bool = False,
    ) -> CSROperator:
        """From CSR arrays. `indptr`/`indices` are host (NumPy-convertible) arrays;
        `values` may be a JAX array (traced too). Column indices must be sorted
        and unique within each row unless `sum_duplicates=True`, which sorts and
        sums them on the host (then `values` must be concrete)."""
        check_index_range(shape)
        if sum_duplicates:
            import scipy.sparse as sp

            # Copies: scipy canonicalises in place, and the caller's arrays are
            # theirs.
            indptr = np.array(indptr, copy=True)
            indices = np.array(indices, copy=True)
            vals = np.array(values, copy=True)
            if indptr.ndim == 1 and indptr.size:
                check_index_range(shape, int(indptr[-1]))
            if indices.size and (indices.min() < 0 or indices.max() >= shape[1]
                                 // block_size):
                raise ValueError(
                    f"Column indices out of range [0, {shape[1] // block_size}): "
                    f"found min {indices.min()}, max {indices.max()}."
                )
            if block_size == 1:
                m = sp.csr_array((vals, indices, indptr), shape=shape)
            else:
                m = sp.bsr_array(
                    (vals, indices, indptr),
                    shape=shape,
                    blocksize=(block_size, block_size),
                )
            m.sum_duplicates()
            m.sort_indices()
            indptr, indices, values = m.indptr, m.indices, m.data
        # Validated once: rows that scipy canonicalised are not checked again.
        check = "bounds" if sum_duplicates else True
        pattern = SparsityPattern(indptr, indices, shape, block_size, check=check)
        return cls(pattern, values, tags)

    @classmethod
    def from_scipy(
        cls, matrix, *, tags: object = (), block_size: int | None = None, dtype=None
    ) -> CSROperator:
        """From any scipy sparse matrix or array. A BSR input keeps its square
        blocks; `block_size=b` blocks a scalar matrix into `b x b` blocks (every
        block that holds a nonzero is stored whole). Duplicates are summed and
        indices sorted on the host. Explicitly stored zeros are kept."""
        import scipy.sparse as sp

        if not sp.issparse(matrix):
            raise TypeError(
                "from_scipy expects a scipy sparse matrix, got "
                f"{type(matrix).__name__}."
            )
        if matrix.ndim != 2:
            raise ValueError("from_scipy expects a 2-D matrix.")
        # Before any conversion allocates arrays of the declared size.
        check_index_range(matrix.shape, matrix.nnz)
        if matrix.format == "bsr" and block_size is None:
            r, c = matrix.blocksize
            if r != c:
                raise ValueError(
                    f"BSR blocks must be square for AmgX, got {matrix.blocksize}."
                )
            m = matrix.copy()
            m.sum_duplicates()
            m.sort_indices()
            b = r
        elif block_size is not None and block_size > 1:
            b = int(block_size)
            if matrix.shape[0] % b or matrix.shape[1] % b:
                raise ValueError(
                    f"Cannot block a matrix of shape {matrix.shape} into {b}x{b} "
                    "blocks: the shape is not a multiple of the block size."
                )
            m = sp.bsr_array(sp.csr_array(matrix), blocksize=(b, b))
            m.sum_duplicates()
            m.sort_indices()
        else:
            b = 1
            m = sp.csr_array(matrix)
            # A copy: canonicalising in place must not touch the caller's matrix
            # (`csr_array(csr)` shares its arrays).
            m = m.copy() if not m.has_canonical_format else m
            m.sum_duplicates()
            m.sort_indices()
        data = m.data
        if dtype is not None:
            data = data.astype(dtype)
        elif not np.issubdtype(data.dtype, np.inexact):
            data = data.astype(jnp.result_type(float))
        if b > 1:
            data = data.reshape(-1, b, b)
        # Canonicalised by scipy above (sorted, unique): checked once, for what
        # scipy does not guarantee (index range, indptr).
        pattern = SparsityPattern(m.indptr, m.indices, m.shape, b, check="bounds")
        return cls(pattern, data, tags)

    @classmethod
    def from_bcoo(cls, matrix, *, tags: object = ()) -> CSROperator:
        """From a `jax.experimental.sparse.BCOO` matrix with concrete indices.
        The values may be traced: their order is mapped to CSR on the host."""
        from jax.experimental import sparse as jsparse

        if not isinstance(matrix, jsparse.BCOO):
            raise TypeError(f"from_bcoo expects a BCOO matrix, got {type(matrix)}.")
        if matrix.n_batch or matrix.n_dense or matrix.ndim != 2:
            raise ValueError("from_bcoo supports 2-D BCOO without batch/dense dims.")
        check_index_range(matrix.shape, matrix.nse)
        idx = np.asarray(matrix.indices)
        rows, cols = idx[:, 0].astype(np.int64), idx[:, 1].astype(np.int64)
        n_rows, n_cols = matrix.shape
        # BCOO pads with out-of-range indices: drop them.
        keep = (rows < n_rows) & (cols < n_cols)
        key = rows * n_cols + cols
        key_kept = key[keep]
        uniq, inverse = np.unique(key_kept, return_inverse=True)
        urows, ucols = uniq // n_cols, uniq % n_cols
        indptr = np.concatenate(
            [[0], np.cumsum(np.bincount(urows, minlength=n_rows))]
        )
        # Sorted and unique by construction (np.unique), in range (filtered).
        pattern = SparsityPattern(indptr, ucols, matrix.shape, check=False)
        data = matrix.data
        if not jnp.issubdtype(data.dtype, jnp.inexact):
            data = data.astype(jnp.result_type(float))
        # The BCOO order -> CSR order maps, as runtime arrays (the values may be
        # traced), named by the BCOO's indices.
        digest = hashlib.sha1(np.ascontiguousarray(idx), usedforsecurity=False)
        name = ("from_bcoo", digest.hexdigest(), idx.shape, matrix.shape)
        kept = runtime_array(pattern, (*name, "kept"), np.flatnonzero(keep), np.int32)
        inv = runtime_array(pattern, (*name, "inverse"), inverse, np.int32)
        values = jnp.zeros(len(uniq), data.dtype).at[inv].add(take(data, kept))
        return cls(pattern, values, tags)

    @classmethod
    def from_dense(
        cls, matrix, *, tags: object = (), block_size: int = 1
    ) -> CSROperator:
        """From a concrete dense matrix: its nonzeros become the pattern. With
        `block_size=b`, every `b x b` block that holds a nonzero is stored."""
        if isinstance(matrix, jax.core.Tracer):
            raise ValueError(
                "from_dense needs a concrete matrix (its nonzeros define the static "
                "pattern). Inside jit, build the pattern outside and pass traced "
                "values to CSROperator(pattern, values)."
            )
        import scipy.sparse as sp

        m = np.asarray(matrix)
        if m.ndim != 2:
            raise ValueError(f"from_dense expects a 2-D matrix, got shape {m.shape}.")
        dtype = m.dtype if np.issubdtype(m.dtype, np.inexact) else None
        return cls.from_scipy(
            sp.csr_array(m),
            tags=tags,
            block_size=block_size if block_size > 1 else None,
            dtype=dtype,
        )

    # -- Lineax operator interface ----------------------------------------------

    @property
    def block_size(self) -> int:
        return self.pattern.block_size

    def mv(self, vector):
        p = self.pattern
        b = p.block_size
        # Runtime arrays, not constants: see `_runtime_arrays`.
        cols = pattern_array(p, "indices")
        if p.row_layout:  # each row summed by itself: no scatter, no atomics
            slots, valid = row_slots(p)
            cols = take(cols, slots)
            if b == 1:
                prod = take(self.values, slots) * take(vector, cols)
            else:
                xb = vector.reshape(p.block_cols, b)
                prod = jnp.einsum(
                    "rkij,rkj->rki",
                    take(self.values, slots),
                    take(xb, cols),
                    precision=jax.lax.Precision.HIGHEST,
                )
                valid = valid[..., None]
            # `where`, not a multiplication by the mask: 0 * inf would be NaN.
            return jnp.sum(jnp.where(valid, prod, 0), axis=1).reshape(p.shape[0])
        rows = pattern_array(p, "row_ids")
        if b == 1:
            prod = self.values * take(vector, cols)
        else:
            xb = vector.reshape(p.block_cols, b)
            prod = jnp.einsum(
                "kij,kj->ki",
                self.values,
                take(xb, cols),
                precision=jax.lax.Precision.HIGHEST,
            )
        out = jax.ops.segment_sum(
            prod, rows, num_segments=p.block_rows, indices_are_sorted=True
        )
        return out.reshape(p.shape[0])

    def as_matrix(self):
        p = self.pattern
        b = p.block_size
        rows = pattern_array(p, "row_ids")
        cols = pattern_array(p, "indices")
        if b == 1:
            dense = jnp.zeros(p.shape, self.values.dtype)
            return dense.at[rows, cols].add(self.values)
        dense = jnp.zeros((p.block_rows, p.block_cols, b, b), self.values.dtype)
        dense = dense.at[rows, cols].add(self.values)
        return dense.transpose(0, 2, 1, 3).reshape(p.shape)

    def transpose(self):
        if lx.symmetric_tag in self.tags:
            return self
        pat_t, vals = transposed_values(self.pattern, self.values)
        return CSROperator(pat_t, vals, lx.transpose_tags(self.tags))

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.pattern.shape[1],), self.values.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((self.pattern.shape[0],), self.values.dtype)

    # -- helpers -------------------------------------------------------------------

    def to_scipy(self):
        """A host scipy copy (requires concrete values)."""
        return self.pattern.to_scipy(np.asarray(self.values))

    def with_values(self, values) -> CSROperator:
        """The same pattern and tags with new values."""
        return CSROperator(self.pattern, values, self.tags)


# ---- Lineax's singledispatch queries -------------------------------------------


def row_slots(pattern: SparsityPattern) -> tuple[jax.Array, jax.Array]:
    """The stored entries by row, for `pattern.row_layout` patterns: `(slots,
    valid)`, both `(block_rows, max_row_length)`; `slots[i, k]` is the position of
    row `i`'s `k`-th stored entry (clamped to a valid position past the row's
    end, where `valid` is false). Computed on the device from `indptr` (a runtime
    array): a per-row reduction over them is one fused pass, with no scatter."""
    indptr = pattern_array(pattern, "indptr")
    start, length = indptr[:-1], indptr[1:] - indptr[:-1]
    # (Explicit ranks: users may run with jax_numpy_rank_promotion="raise".)
    k = jnp.arange(pattern.max_row_length, dtype=indptr.dtype)[None, :]
    slots = jnp.minimum(start[:, None] + k, pattern.nnz - 1)
    return slots, k < length[:, None]


def csr_diagonal(op) -> jax.Array:
    """The diagonal of a CSR-like operator (`pattern.diagonal_positions` and
    `values`; shared with `DistributedCSROperator`, whose local rows hold their
    diagonal)."""
    p = op.pattern
    pos = pattern_array(p, "diagonal_positions")  # -1 where not stored
    present = pos >= 0
    gathered = take(op.values, jnp.maximum(pos, 0))
    if p.block_size == 1:
        return jnp.where(present, gathered, 0)
    d = jnp.diagonal(gathered, axis1=1, axis2=2)  # (m, b)
    return jnp.where(present[:, None], d, 0).reshape(-1)


def transposed_values(pattern: SparsityPattern, values) -> tuple[SparsityPattern, Any]:
    """The transposed pattern (host, cached) and the values in its order (blocks
    transposed too), permuted by a runtime array."""
    pat_t, perm = pattern.transpose()
    values_t = take(values, pattern_array(pattern, "transpose_permutation", perm))
    if pattern.block_size > 1:
        values_t = jnp.swapaxes(values_t, -1, -2)
    return pat_t, values_t


# Lineax queries that CSR-like operators answer from their tags alone (shared with
# `DistributedCSROperator`).
TAG_QUERIES: dict[str, Any] = {
    "has_unit_diagonal": lambda op: lx.unit_diagonal_tag in op.tags,
    "is_lower_triangular": lambda op: lx.lower_triangular_tag in op.tags
    or lx.diagonal_tag in op.tags,
    "is_upper_triangular": lambda op: lx.upper_triangular_tag in op.tags
    or lx.diagonal_tag in op.tags,
    "is_positive_semidefinite": lambda op: lx.positive_semidefinite_tag in op.tags,
    "is_negative_semidefinite": lambda op: lx.negative_semidefinite_tag in op.tags,
}


def register_queries(cls, structural: dict[str, Any]) -> None:
    """Register `TAG_QUERIES`, the class's own `structural` queries, and the
    identity `linearise`/`materialise` for a CSR-like operator class."""
    for name, fn in {**TAG_QUERIES, **structural}.items():
        getattr(lx, name).register(cls)(fn)
    lx.linearise.register(cls)(lambda op: op)
    lx.materialise.register(cls)(lambda op: op)


def _register():
    register_queries(
        CSROperator,
        {
            "is_symmetric": lambda op: lx.symmetric_tag in op.tags
            or lx.is_diagonal(op),
            "is_diagonal": lambda op: lx.diagonal_tag in op.tags
            or (op.pattern.bandwidth == (0, 0) and op.pattern.block_size == 1),
            "is_tridiagonal": lambda op: lx.tridiagonal_tag in op.tags
            or lx.diagonal_tag in op.tags
            or (
                op.pattern.block_size == 1
                and op.pattern.bandwidth[0] <= 1
                and op.pattern.bandwidth[1] <= 1
            ),
        },
    )
    lx.diagonal.register(CSROperator)(csr_diagonal)
    lx.conj.register(CSROperator)(
        lambda op: CSROperator(op.pattern, op.values.conj(), op.tags)
    )

    @lx.tridiagonal.register(CSROperator)
    def _(op):
        if op.pattern.shape[0] != op.pattern.shape[1]:
            raise ValueError("tridiagonal requires a square operator.")
        m = op.as_matrix()
        return jnp.diagonal(m, -1), jnp.diagonal(m), jnp.diagonal(m, 1)


_register()
