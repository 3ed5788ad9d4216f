# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""`sparsify` and `as_csr_operator`: matrix-free operators to CSR, one JVP per color."""

from __future__ import annotations

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._checks import warn_dense
from .._operator import CSROperator
from .._pattern import SparsityPattern
from .._runtime_arrays import pattern_array, take
from ._coloring import Coloring, color_columns, star_recovery
from ._sparsity import detect_closed_jaxpr, detection_count as detection_count

__all__ = ["SparsifiedOperator", "sparsify", "as_csr_operator", "detection_count"]


# -- flattening helpers --------------------------------------------------------------


def _size(struct) -> int:
    return int(sum(int(np.prod(leaf.shape, dtype=np.int64))
                   for leaf in jax.tree.leaves(struct)))


def _flatten(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros(0)
    return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])


def _unflatten(struct, flat):
    leaves, treedef = jax.tree.flatten(struct)
    out, off = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape, dtype=np.int64))
        out.append(flat[off:off + size].reshape(leaf.shape).astype(leaf.dtype))
        off += size
    return jax.tree.unflatten(treedef, out)


def _abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


# -- detection per operator type ---------------------------------------------------


def _strip_tags(operator):
    while isinstance(operator, lx.TaggedLinearOperator):
        operator = operator.operator
    return operator


@ft.lru_cache(maxsize=8)
def _dense_pattern(m: int, n: int) -> SparsityPattern:
    """Every entry of an `m x n` matrix, in row-major order (so that a dense
    matrix's values are its `ravel`): built and fingerprinted once per shape."""
    indptr = np.arange(m + 1, dtype=np.int64) * n
    indices = np.tile(np.arange(n, dtype=np.int32), m)
    return SparsityPattern(indptr, indices, (m, n), method="dense", check=False)


def _matrix_pattern(matrix) -> SparsityPattern:
    m, n = matrix.shape
    if isinstance(matrix, jax.core.Tracer):
        # Unknown sparsity at trace time: every entry (a warning, or an error
        # where n^2 entries cannot be indexed in 32 bits, before allocating).
        warn_dense(
            (m, n), "A traced lx.MatrixLinearOperator",
            "the sparsity of a traced matrix is not known at trace time",
        )
        return _dense_pattern(m, n)
    # A concrete matrix: its nonzeros (exact zeros are not stored, as from_dense).
    nz = np.asarray(matrix) != 0
    rows, cols = np.nonzero(nz)
    indptr = np.concatenate([[0], np.cumsum(nz.sum(axis=1))])
    return SparsityPattern(indptr, cols, (m, n), method="given", check=False)


def _detect_operator(operator) -> SparsityPattern:
    op = _strip_tags(operator)
    if isinstance(op, lx.MatrixLinearOperator):
        return _matrix_pattern(op.matrix)
    if isinstance(op, lx.JacobianLinearOperator):
        # The global pattern of d fn / dx: valid at every x, so one detection
        # serves every Newton iterate.
        def fn(x):
            return op.fn(x, op.args)

        closed = jax.make_jaxpr(fn)(_abstract(op.x))
        return detect_closed_jaxpr(closed, jax.tree.leaves(op.x))
    if isinstance(op, lx.FunctionLinearOperator):
        closed = jax.make_jaxpr(op.fn)(op.in_structure())
        return detect_closed_jaxpr(closed)
    closed = jax.make_jaxpr(op.mv)(op.in_structure())
    return detect_closed_jaxpr(closed)


def _block_pattern(p: SparsityPattern, b: int) -> SparsityPattern:
    if b == 1:
        return p
    if p.block_size == b:
        return p
    if p.block_size != 1:
        raise ValueError(f"Cannot re-block a block_size={p.block_size} pattern.")
    m, n = p.shape
    if m % b or n % b:
        raise ValueError(f"Shape {p.shape} is not a multiple of block_size={b}.")
    nb = n // b
    key = np.unique((p.row_ids.astype(np.int64) // b) * nb + p.indices // b)
    br = key // nb
    bc = key - br * nb
    indptr = np.concatenate([[0], np.cumsum(np.bincount(br, minlength=m // b))])
    return SparsityPattern(indptr, bc, (m, n), b, method=p.method, check=False)


@ft.lru_cache(maxsize=128)
def _cached_coloring(pattern: SparsityPattern, symmetric: bool) -> Coloring:
    return color_columns(pattern, symmetric=symmetric)


@ft.lru_cache(maxsize=128)
def _decompression(pattern: SparsityPattern, coloring: Coloring):
    """Static gather indices: values[e] = compressed[ci[e], ri[e]] (scalar case),
    or per block entry (p, q): compressed[colors*b + q, row*b + p]."""
    b = pattern.block_size
    rows = pattern.row_ids.astype(np.int64)
    cols = pattern.indices.astype(np.int64)
    colors = coloring.colors.astype(np.int64)
    if coloring.symmetric:
        direct = star_recovery(pattern, colors)
        if direct is None:
            raise ValueError("Invalid star coloring for this pattern.")
        ci = np.where(direct, colors[cols], colors[rows])
        ri = np.where(direct, rows, cols)
        return ci, ri
    if b == 1:
        return colors[cols], rows
    p = np.arange(b)
    ci = colors[cols][:, None, None] * b + p[None, None, :]  # q varies last
    ri = rows[:, None, None] * b + p[None, :, None]
    ci, ri = np.broadcast_arrays(ci, ri)
    return np.ascontiguousarray(ci), np.ascontiguousarray(ri)


def _coloring_name(what: str, coloring: Coloring) -> str:
    """The name of a runtime array derived from a pattern and `coloring` (the
    coloring's content hash makes it unique per coloring)."""
    kind = "star" if coloring.symmetric else "d2"
    return f"{what}:{kind}:{hash(coloring):x}"


def _operator_tags(operator) -> frozenset:
    tags = set()
    for query, tag in (
        (lx.is_symmetric, lx.symmetric_tag),
        (lx.is_positive_semidefinite, lx.positive_semidefinite_tag),
        (lx.is_negative_semidefinite, lx.negative_semidefinite_tag),
        (lx.is_diagonal, lx.diagonal_tag),
        (lx.is_lower_triangular, lx.lower_triangular_tag),
        (lx.is_upper_triangular, lx.upper_triangular_tag),
        (lx.has_unit_diagonal, lx.unit_diagonal_tag),
    ):
        try:
            if query(operator):
                tags.add(tag)
        except NotImplementedError:
            pass
    return frozenset(tags)


# -- the operator -----------------------------------------------------------------


class SparsifiedOperator(lx.AbstractLinearOperator):
    """A Lineax operator together with its sparsity pattern and column coloring.

    Made by [`lineax_amgx.sparsify`][]: the wrapped operator is left untouched,
    `mv` delegates to it, and [`lineax_amgx.SparsifiedOperator.to_csr`][]
    assembles a [`lineax_amgx.CSROperator`][] with one JVP per color (vmapped over
    the colors). Pattern and coloring are static fields, known at trace time.
    """

    operator: lx.AbstractLinearOperator
    pattern: SparsityPattern = eqx.field(static=True)
    coloring: Coloring = eqx.field(static=True)

    def mv(self, vector):
        return self.operator.mv(vector)

    def as_matrix(self):
        return self.operator.as_matrix()

    def transpose(self):
        pt, _ = self.pattern.transpose()
        sym = self.coloring.symmetric
        coloring = self.coloring if sym else _cached_coloring(pt, False)
        return SparsifiedOperator(self.operator.transpose(), pt, coloring)

    def in_structure(self):
        return self.operator.in_structure()

    def out_structure(self):
        return self.operator.out_structure()

    def compressed_jvps(self) -> jax.Array:
        return _compressed_jvps(self)

    def _compressed_jvps(self) -> jax.Array:
        """The compressed Jacobian: row `k` is the operator applied to the seed of
        color `k` (for blocks: color `k // b`, component `k % b`), flattened."""
        in_struct = self.operator.in_structure()
        b = self.pattern.block_size
        leaves = jax.tree.leaves(in_struct)
        dtype = jnp.result_type(*[leaf.dtype for leaf in leaves]) if leaves else float
        n = _size(in_struct)
        col = np.arange(n)
        code = self.coloring.colors.astype(np.int64)[col // b] * b + col % b
        # A runtime array, not a constant (see `lineax_amgx._runtime_arrays`).
        code = pattern_array(self.pattern, _coloring_name("seed", self.coloring), code)
        num = self.coloring.num_colors * b

        def one(k):
            seed = (code == k).astype(dtype)
            return _flatten(self.operator.mv(_unflatten(in_struct, seed)))

        if num == 0:
            return jnp.zeros((0, _size(self.operator.out_structure())), dtype)
        return jax.vmap(one)(jnp.arange(num, dtype=jnp.int32))

    def to_csr(self) -> CSROperator:
        """Assemble the [`lineax_amgx.CSROperator`][] (traced JAX code)."""
        comp = self.compressed_jvps()
        p, c = self.pattern, self.coloring
        ci, ri = _decompression(p, c)
        if ci.size:
            values = take(
                comp,
                pattern_array(p, _coloring_name("decompress_colors", c), ci),
                pattern_array(p, _coloring_name("decompress_rows", c), ri),
            )
        else:
            values = jnp.zeros(p.value_shape, comp.dtype)
        # Integer and boolean values become floats; complex values stay complex
        # (a cast would drop the imaginary part).
        if not jnp.issubdtype(values.dtype, jnp.inexact):
            values = values.astype(jnp.float64 if jax.config.jax_enable_x64
                                   else jnp.float32)
        return CSROperator(self.pattern, values, _operator_tags(self.operator))


@eqx.filter_jit
def _compressed_jvps(op: SparsifiedOperator):
    return op._compressed_jvps()


def sparsify(
    operator: lx.AbstractLinearOperator,
    *,
    pattern: SparsityPattern | None = None,
    symmetric: bool | None = None,
    block_size: int = 1,
) -> SparsifiedOperator:
    """Attach a sparsity pattern and a column coloring to a Lineax operator.

    Use it on matrix-free operators (`lx.FunctionLinearOperator`,
    `lx.JacobianLinearOperator`, composed operators, ...) that will be solved more
    than once: the (host-side) detection and coloring happen here, once, and
    every later assembly is `num_colors` JVPs. The user's operator is not
    modified; a new [`lineax_amgx.SparsifiedOperator`][] wraps it.

    **Arguments:**

    - `operator`: any Lineax operator. Inputs and outputs may be pytrees; they
        are flattened leaf by leaf, each leaf in ravel order.
    - `pattern`: a known [`lineax_amgx.SparsityPattern`][] (skips detection).
    - `symmetric`: allow a star coloring with symmetric decompression. Defaults
        to `lx.is_symmetric(operator)`.
    - `block_size`: `b > 1` groups `b` consecutive unknowns into a node: the
        pattern becomes a block pattern (every touched `b x b` block stored
        whole) and CSR values have shape `(nnzb, b, b)`.

    **Returns:**

    A [`lineax_amgx.SparsifiedOperator`][].
    """
    if isinstance(operator, SparsifiedOperator):
        if pattern is None and block_size in (1, operator.pattern.block_size):
            return operator
        operator = operator.operator
    if pattern is None:
        pattern = _detect_operator(operator)
        m, n = pattern.shape
        if pattern.method != "dense" and pattern.nnz == m * n:
            kind = type(_strip_tags(operator)).__name__
            warn_dense((m, n), f"An operator ({kind})",
                       "its detected sparsity is every entry")
    if not isinstance(pattern, SparsityPattern):
        raise TypeError(f"pattern must be a SparsityPattern, got {type(pattern)}.")
    m, n = _size(operator.out_structure()), _size(operator.in_structure())
    if pattern.shape != (m, n):
        raise ValueError(
            f"pattern has shape {pattern.shape} but the operator maps {n} inputs "
            f"to {m} outputs."
        )
    pattern = _block_pattern(pattern, int(block_size))
    if symmetric is None:
        try:
            symmetric = bool(lx.is_symmetric(operator))
        except NotImplementedError:
            symmetric = False
    symmetric = bool(symmetric) and pattern.block_size == 1
    coloring = _cached_coloring(pattern, symmetric)
    return SparsifiedOperator(operator, pattern, coloring)


@ft.singledispatch
def as_csr_operator(
    operator: lx.AbstractLinearOperator, *, symmetric: bool | None = None
) -> CSROperator:
    """Any Lineax operator as a [`lineax_amgx.CSROperator`][] (what the
    [`lineax_amgx.AMGX`][] solver calls in `init`): the one hook through which
    every operator kind reaches the solvers (a single-dispatch function: an
    operator kind registers its own conversion, as the distributed package does
    for `DistributedCSROperator`, which is kept as it is).

    A `CSROperator` is returned as is; a [`lineax_amgx.SparsifiedOperator`][] is
    assembled; a `lx.TaggedLinearOperator` keeps its tags; a concrete
    `lx.MatrixLinearOperator` is converted through its nonzeros (a traced one gets
    a dense pattern); anything else is sparsified automatically (patterns are
    memoised per jaxpr, so a Newton loop detects once per compile).

    **Arguments:**

    - `operator`: the operator.
    - `symmetric`: passed to [`lineax_amgx.sparsify`][].

    **Returns:**

    A [`lineax_amgx.CSROperator`][] carrying the operator's tags.
    """
    return sparsify(operator, symmetric=symmetric).to_csr()


@as_csr_operator.register
def _(operator: CSROperator, *, symmetric: bool | None = None) -> CSROperator:
    return operator


@as_csr_operator.register
def _(operator: SparsifiedOperator, *, symmetric: bool | None = None):
    return operator.to_csr()


@as_csr_operator.register
def _(operator: lx.TaggedLinearOperator, *, symmetric: bool | None = None):
    inner = as_csr_operator(operator.operator, symmetric=symmetric)
    tags = frozenset(inner.tags) | _operator_tags(operator)
    return type(inner)(inner.pattern, inner.values, tags)


@as_csr_operator.register
def _(operator: lx.MatrixLinearOperator, *, symmetric: bool | None = None):
    pattern = _matrix_pattern(operator.matrix)
    if pattern.method == "dense":
        values = jnp.ravel(operator.matrix)  # CSR order of a dense pattern
    else:
        values = take(
            operator.matrix,
            pattern_array(pattern, "row_ids"),
            pattern_array(pattern, "indices"),
        )
    if not jnp.issubdtype(values.dtype, jnp.inexact):  # (complex is kept)
        values = values.astype(float)
    return CSROperator(pattern, values, _operator_tags(operator))


# -- Lineax's singledispatch functions ----------------------------------------------


def _rewrap(op: SparsifiedOperator, inner) -> SparsifiedOperator:
    return SparsifiedOperator(inner, op.pattern, op.coloring)


def _register():
    lx.linearise.register(SparsifiedOperator)(
        lambda op: _rewrap(op, lx.linearise(op.operator))
    )
    lx.materialise.register(SparsifiedOperator)(
        lambda op: _rewrap(op, lx.materialise(op.operator))
    )
    lx.conj.register(SparsifiedOperator)(
        lambda op: _rewrap(op, lx.conj(op.operator))
    )
    lx.diagonal.register(SparsifiedOperator)(lambda op: lx.diagonal(op.to_csr()))
    lx.tridiagonal.register(SparsifiedOperator)(
        lambda op: lx.tridiagonal(op.to_csr())
    )
    for name in (
        "is_symmetric",
        "is_diagonal",
        "is_tridiagonal",
        "has_unit_diagonal",
        "is_lower_triangular",
        "is_upper_triangular",
        "is_positive_semidefinite",
        "is_negative_semidefinite",
    ):
        query = getattr(lx, name)
        query.register(SparsifiedOperator)(
            lambda op, _q=query: _q(op.operator)
        )


_register()
