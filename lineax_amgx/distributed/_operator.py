# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""[`lineax_amgx.distributed.DistributedCSROperator`][]: one rank's rows as a
Lineax operator, and its registrations with Lineax's operator queries.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Inexact

from .. import _protocol
from .._blocks import check_block_size
from .._checks import warn_if_downcast
from .._operator import as_tag_set, csr_diagonal, register_queries
from .._runtime_arrays import pattern_array, take
from ..matrix_free import as_csr_operator
from ._collectives import _extended, after as _after, allreduce_sum, global_norm
from ._comm import _comm, _raise_if_any, mpi
from ._layout import Layout, balanced_offsets
from ._pattern import DistributedPattern, _counts_displs
from ._sequencer import (
    turn as _turn,
)
from ._transpose import transposed_values
from ._vectors import _check_vector

_INT32_MAX = np.iinfo(np.int32).max


# -----------------------------------------------------------------------------
# The operator.
# -----------------------------------------------------------------------------


def _check_values(values, pattern: DistributedPattern):
    tracing = isinstance(values, jax.core.Tracer)
    if not tracing:
        warn_if_downcast(values)  # float64 NumPy values without x64
        values = jnp.asarray(values)
    comm = pattern.layout.comm
    err = None
    if values.shape != pattern.value_shape:
        err = (
            f"values has shape {values.shape}, expected {pattern.value_shape} for "
            f"{pattern}."
        )
    _raise_if_any(comm, err, tracing=tracing)
    err = None
    if jnp.issubdtype(values.dtype, jnp.complexfloating):
        err = (
            f"Complex values ({values.dtype}) are not supported by distributed "
            "operators (DistributedCSROperator): their MPI norms, halo exchanges "
            "and AmgX's distributed upload are real-only. Solve complex systems "
            "in one process with lineax_amgx.CSROperator, or distribute the "
            "equivalent real system [[Re A, -Im A], [Im A, Re A]]."
        )
    elif values.dtype not in (jnp.float32, jnp.float64):
        err = f"values must be float32 or float64, got {values.dtype}."
    _raise_if_any(comm, err, TypeError, tracing=tracing)
    return values


class DistributedCSROperator(lx.AbstractLinearOperator):
    """One rank's rows of a square sparse matrix distributed over MPI ranks, as a
    Lineax linear operator on the local parts of vectors.

    Use it to solve a system too large for one GPU, or to use several GPUs at
    once: start one process per GPU (`mpirun -n 4 python script.py`), give each
    rank a contiguous block of rows, and have every rank call
    `lx.linear_solve(op, b_local, solver=lineax_amgx.AMGX())`; each gets its part
    of the solution. On CUDA arrays AmgX solves the system with its distributed
    solver; on the CPU the system is gathered and solved with pyamg on one rank
    (for testing; see `docs/guide/distributed.md`).

    `mv(x_local)` is the local part of `A x` (the off-rank entries of `x` that the
    local rows need are exchanged through MPI, also inside `jit`); gradients flow
    to `values` and to the vectors. The operator's input and output are the local
    vectors, of length `n_local`.

    Build one with [`lineax_amgx.DistributedCSROperator.from_global_scipy`][]
    (scatter a matrix from one rank) or
    [`lineax_amgx.DistributedCSROperator.from_local_rows`][] (every rank brings
    its own rows). Both are collective.

    Block operators (`block_size = b > 1`: elasticity, several unknowns per
    node) keep their `b x b` blocks and are partitioned by block rows: AmgX's
    block modes on the GPU, pyamg's BSR smoothed aggregation on the CPU, as for
    a single-process block [`lineax_amgx.CSROperator`][]. Their vectors hold the
    `b` unknowns of every local block row, node by node.

    **Arguments:**

    - `pattern`: the [`lineax_amgx.DistributedPattern`][] (static).
    - `values`: the local values, shape `(nnz_local,)` (`(nnz_local, b, b)` for
        a block pattern; may be traced).
    - `tags`: Lineax tags, trusted, describing the *global* matrix (for example
        `lx.symmetric_tag`, `lx.positive_semidefinite_tag`).
    """

    pattern: DistributedPattern = eqx.field(static=True)
    values: Inexact[Array, " nnz"]
    tags: frozenset[object] = eqx.field(static=True)

    def __init__(self, pattern: DistributedPattern, values, tags: object = ()):
        if not isinstance(pattern, DistributedPattern):
            raise TypeError(
                f"pattern must be a DistributedPattern, got {type(pattern).__name__}."
            )
        self.pattern = pattern
        self.values = _check_values(values, pattern)
        self.tags = as_tag_set(tags)

    # -- constructors (collective) -------------------------------------------------

    @classmethod
    def from_local_rows(
        cls,
        indptr,
        global_indices,
        values,
        n_global: int,
        comm=None,
        *,
        tags: object = (),
        sum_duplicates: bool = False,
        block_size: int = 1,
    ) -> DistributedCSROperator:
        """Collective. Every rank passes its own contiguous block of rows, in rank
        order (rank 0 the first rows); the row offsets are agreed with an
        allgather of the local sizes.

        **Arguments:**

        - `indptr`: the local row pointer (length `n_local + 1`).
        - `global_indices`: global column indices of the local entries (int32 or
            int64), sorted and unique within each row unless `sum_duplicates`.
        - `values`: the local values (may be a JAX array; traced only without
            `sum_duplicates`), shape `(nnz_local, b, b)` for blocks.
        - `n_global`: the global number of rows (and columns), the same on every
            rank.
        - `comm`: the mpi4py communicator (default `MPI.COMM_WORLD`).
        - `tags`: Lineax tags of the global matrix.
        - `sum_duplicates`: sort the column indices of every row and sum duplicate
            entries on the host.
        - `block_size`: `b` for a block (BSR) operator: then `indptr`,
            `global_indices` and `n_global` count block rows and block columns
            (the operator has `n_global * b` scalar rows).
        """
        comm = _comm(comm)
        indptr = np.asarray(indptr)
        err = None
        if indptr.ndim != 1 or indptr.shape[0] < 1:
            err = "indptr must be a one-dimensional array of length n_local + 1."
        _raise_if_any(comm, err)
        layout = Layout.from_local_size(indptr.shape[0] - 1, comm, n_global=n_global)
        b = int(block_size)
        if sum_duplicates:
            import scipy.sparse as sp

            err = None
            try:
                # Copies: scipy canonicalises in place, never touch the inputs.
                arrays = (np.array(values), np.array(global_indices, np.int64),
                          np.array(indptr))
                shape = (layout.n_local * b, layout.n_global * b)
                m = (sp.csr_array(arrays, shape=shape) if b == 1 else
                     sp.bsr_array(arrays, shape=shape, blocksize=(b, b)))
                m.sum_duplicates()
                m.sort_indices()
            except Exception as e:  # noqa: BLE001 - reported on every rank
                err = f"could not canonicalise the local rows: {e}"
            _raise_if_any(comm, err)
            indptr, global_indices, values = m.indptr, m.indices, m.data
        pattern = DistributedPattern(indptr, global_indices, layout, b)
        return cls(pattern, values, tags)

    @classmethod
    def from_global_scipy(
        cls,
        matrix,
        comm=None,
        root: int = 0,
        *,
        tags: object = (),
        offsets=None,
        dtype=None,
        block_size: int | None = None,
    ) -> DistributedCSROperator:
        """Collective. Distribute a global scipy sparse matrix held by `root`: the
        root splits its rows contiguously (balanced: the first `n % size` ranks get
        one row more, unless `offsets` are given) and sends every rank its rows.

        **Arguments:**

        - `matrix`: a square scipy sparse matrix on `root`; `None` on the others.
        - `comm`: the mpi4py communicator (default `MPI.COMM_WORLD`).
        - `root`: the rank holding `matrix`.
        - `tags`: Lineax tags of the global matrix.
        - `offsets`: explicit row offsets (`size + 1` values, on every rank);
            default balanced. Block rows for a block operator.
        - `dtype`: cast the values (default: the matrix's floating dtype, else the
            default JAX float).
        - `block_size`: as in [`lineax_amgx.CSROperator.from_scipy`][]: a BSR
            matrix keeps its square blocks (`None`, the default), `b` blocks a
            scalar matrix into `b x b` blocks (every block holding a nonzero is
            stored whole), `1` makes a BSR matrix scalar. Rows are distributed
            by block rows. Read on `root`.
        """
        import scipy.sparse as sp

        MPI = mpi()
        comm = _comm(comm)
        rank, size = comm.Get_rank(), comm.Get_size()
        err = None
        header = None
        if rank == root:
            if not sp.issparse(matrix):
                err = (
                    "from_global_scipy expects a scipy sparse matrix on the root "
                    f"rank, got {type(matrix).__name__}."
                )
            elif matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                err = f"the matrix must be square, got shape {matrix.shape}."
            else:
                m, b, err = _canonical(matrix, block_size)
        if err is None and rank == root:
            data = m.data
            if np.issubdtype(data.dtype, np.complexfloating):
                # Kept complex, whatever `dtype` says (a cast would drop the
                # imaginary part): refused with a TypeError on every rank when
                # the operator is built (`_check_values`).
                pass
            elif dtype is not None:
                data = data.astype(dtype)
            elif not np.issubdtype(data.dtype, np.floating):
                data = data.astype(jnp.result_type(float))
            header = (int(m.shape[0]) // b, np.dtype(data.dtype).str, b)
        _raise_if_any(comm, err)
        with _turn(comm, kind="from_global.header"):
            n_global, dstr, b = comm.bcast(header, root=root)
        if offsets is None:
            layout = Layout(balanced_offsets(n_global, size), comm)
        else:
            layout = Layout.from_offsets(offsets, comm)
            _raise_if_any(
                comm,
                None if layout.n_global == n_global else (
                    f"offsets end at {layout.n_global} but the matrix has "
                    f"{n_global} {'block ' if b > 1 else ''}rows."
                ),
            )
        vdtype = np.dtype(dstr)
        # Row pointers, then column indices and values, with Scatterv (no pickle).
        o = layout.offsets
        if rank == root:
            ip = m.indptr.astype(np.int64)
            nnz_counts = [int(ip[o[r + 1]] - ip[o[r]]) for r in range(size)]
            ptr_send = np.concatenate(
                [ip[o[r]: o[r + 1] + 1] - ip[o[r]] for r in range(size)]
            )
        else:
            nnz_counts = None
        with _turn(comm, kind="from_global.scatter"):
            nnz_counts = comm.bcast(nnz_counts, root=root)
            ptr = np.empty(layout.n_local + 1, np.int64)
            comm.Scatterv(
                [ptr_send, _counts_displs([c + 1 for c in layout.counts]),
                 MPI.INT64_T] if rank == root else None,
                [ptr, MPI.INT64_T],
                root=root,
            )
            idx = np.empty(nnz_counts[rank], np.int64)
            vals = np.empty(nnz_counts[rank] * b * b, vdtype)
            cd = _counts_displs(nnz_counts)
            comm.Scatterv(
                [m.indices.astype(np.int64), cd, MPI.INT64_T] if rank == root
                else None,
                [idx, MPI.INT64_T],
                root=root,
            )
            comm.Scatterv(  # (a block's b * b values are consecutive)
                [np.ascontiguousarray(data).reshape(-1),
                 _counts_displs(np.multiply(nnz_counts, b * b))]
                if rank == root else None,
                vals,
                root=root,
            )
        if b > 1:
            vals = vals.reshape(-1, b, b)
        pattern = DistributedPattern(ptr, idx, layout, b)
        return cls(pattern, vals, tags)

    # -- Lineax operator interface ---------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self.pattern.layout

    @property
    def block_size(self) -> int:
        return self.pattern.block_size

    def mv(self, vector):
        p = self.pattern
        b = p.block_size
        _check_vector(p, vector, "The vector")
        vector = jnp.asarray(vector)
        dtype = jnp.result_type(vector.dtype, self.values.dtype)
        vector = vector.astype(dtype)
        if p.communicates:  # the same on every rank: the exchange is collective
            x_ext = _extended(p, vector)
        else:
            x_ext = vector
        # Runtime arrays, not constants (see `lineax_amgx._runtime_arrays`).
        cols = pattern_array(p, "local_columns")
        if b == 1:
            prod = self.values.astype(dtype) * take(x_ext, cols)
        else:
            prod = jnp.einsum(
                "kij,kj->ki", self.values.astype(dtype),
                take(x_ext.reshape(-1, b), cols),
                precision=jax.lax.Precision.HIGHEST,
            )
        out = jax.ops.segment_sum(
            prod, pattern_array(p, "row_ids"), num_segments=p.block_rows,
            indices_are_sorted=True,
        )
        return out.reshape(p.shape[0])

    def as_matrix(self):
        raise NotImplementedError(
            "A DistributedCSROperator has no local dense matrix: its rows couple "
            "with other ranks' entries. Use `op.to_scipy_local()` for this rank's "
            "rows or `op.gather_scipy()` for the global matrix (collective)."
        )

    def transpose(self):
        """`A^T`. Symmetric (tagged) operators return themselves. Otherwise
        collective the first time for a pattern: the transposed pattern is a
        redistribution of the entries between the ranks, built once and cached
        (every rank reaches it at the same point, as `jax.grad` through a solve
        does); the values travel the same way at run time (one `Alltoallv`)."""
        if lx.symmetric_tag in self.tags:
            return self
        if self.pattern.block_size > 1:
            # Its own refusal: a transposed block operator also transposes every
            # b x b block, which a redistribution of scalar entries would not.
            raise NotImplementedError(
                "distributed transpose of a non-symmetric block "
                f"DistributedCSROperator (block_size={self.pattern.block_size}) is "
                "not implemented yet. Tag the operator `lx.symmetric_tag` if the "
                "global matrix is symmetric; reverse-mode gradients of solves with "
                "non-symmetric distributed block operators are not available "
                "(forward-mode, jax.jvp, is)."
            )
        pattern_t, values_t = transposed_values(self.pattern, self.values)
        return DistributedCSROperator(
            pattern_t, values_t, lx.transpose_tags(self.tags)
        )

    def in_structure(self):
        return self._vector_structure()

    def out_structure(self):
        return self._vector_structure()

    def _vector_structure(self):
        # Through `eval_shape`, so that inside `shard_map` the structure carries
        # the same (manual-axes) sharding as the vectors there: Lineax compares
        # structures with it. Outside, this is the plain ShapeDtypeStruct.
        shape, dtype = (self.pattern.shape[0],), self.values.dtype
        return jax.eval_shape(lambda: jnp.zeros(shape, dtype))

    # -- helpers ---------------------------------------------------------------------

    def with_values(self, values) -> DistributedCSROperator:
        """The same pattern and tags with new local values."""
        return DistributedCSROperator(self.pattern, values, self.tags)

    def to_scipy_local(self):
        """This rank's rows, `(n_local, n_global)`, as a scipy CSR array (BSR
        for a block operator; scalar shape)."""
        return self.pattern.to_scipy(np.asarray(self.values))

    def gather_scipy(self, root: int | None = 0):
        """Collective. The global matrix as a scipy CSR array (BSR for a block
        operator) on `root` (on every rank with `root=None`), `None` elsewhere."""
        import scipy.sparse as sp

        comm = self.layout.comm
        local = self.to_scipy_local()
        with _turn(comm, kind="gather_scipy"):
            parts = (
                comm.allgather(local) if root is None else comm.gather(local, root)
            )
        if parts is None:
            return None
        out = sp.csr_array(sp.vstack(parts, format="csr"))
        b = self.pattern.block_size
        return out if b == 1 else sp.bsr_array(out, blocksize=(b, b))


def _canonical(matrix, block_size):
    """`(m, b, err)`: the root's matrix as canonical scipy CSR (`b = 1`) or BSR
    with square `b x b` blocks (copies: never the caller's arrays), as
    `CSROperator.from_scipy` reads `block_size`; or an error message."""
    import scipy.sparse as sp

    if block_size is not None:
        try:
            check_block_size(block_size)
        except (TypeError, ValueError) as e:
            return None, 1, str(e)
    if matrix.format == "bsr" and block_size is None:
        r, c = matrix.blocksize
        if r != c:
            return None, 1, f"BSR blocks must be square, got {matrix.blocksize}."
        b = int(r)
        m = sp.bsr_array(matrix, copy=True)
    elif block_size is not None and int(block_size) > 1:
        b = int(block_size)
        if matrix.shape[0] % b:
            return None, 1, (
                f"cannot block a matrix of shape {matrix.shape} into {b}x{b} "
                "blocks: the shape is not a multiple of the block size."
            )
        m = sp.bsr_array(sp.csr_array(matrix), blocksize=(b, b))
    else:
        b = 1
        m = sp.csr_array(matrix)
        m = m.copy() if m is matrix else m
    try:
        check_block_size(b)  # (a BSR matrix's own blocks)
    except ValueError as e:
        return None, 1, str(e)
    m.sum_duplicates()
    m.sort_indices()
    return m, b, None


def _register_queries():
    register_queries(
        DistributedCSROperator,
        {
            "is_symmetric": lambda op: lx.symmetric_tag in op.tags
            or lx.diagonal_tag in op.tags,
            "is_diagonal": lambda op: lx.diagonal_tag in op.tags,
            "is_tridiagonal": lambda op: lx.tridiagonal_tag in op.tags
            or lx.diagonal_tag in op.tags,
        },
    )
    lx.diagonal.register(DistributedCSROperator)(csr_diagonal)
    lx.conj.register(DistributedCSROperator)(
        lambda op: DistributedCSROperator(op.pattern, op.values.conj(), op.tags)
    )

    @lx.tridiagonal.register(DistributedCSROperator)
    def _(op):
        raise NotImplementedError(
            "lx.tridiagonal is not available for a DistributedCSROperator."
        )


_register_queries()


# -- The package's operator protocol (what the solvers ask of an operator) ------


@_protocol.norm.register
def _(operator: DistributedCSROperator, vector, after=None) -> Array:
    # The global norm (through MPI), computed after `after`: every MPI callback
    # is chained to the previous one, so that all ranks make their MPI calls in
    # the same order.
    return global_norm(_after(vector, after), operator.layout)


@_protocol.inner.register
def _(operator: DistributedCSROperator, u, v, after=None) -> Array:
    # `u^T v` summed over the ranks' rows (one allreduce, after `after`).
    return allreduce_sum(_after(u.T @ v, after), operator.layout)


@_protocol.accepts_near_nullspace.register
def _(operator: DistributedCSROperator) -> bool:
    return False  # (the distributed backends refuse options["near_nullspace"])


@_protocol.sequence.register
def _(operator: DistributedCSROperator, x, *deps):
    return _after(x, *deps)


@_protocol.agree_flags.register
def _(operator: DistributedCSROperator, flags, *deps) -> Array:
    # One verdict on every rank: the rank-local flags summed (after `deps`).
    return allreduce_sum(_after(flags, *deps), operator.layout)


# A distributed operator is its own CSR form (matrix-free operators are not
# distributed).
as_csr_operator.register(DistributedCSROperator)(
    lambda operator, *, symmetric=None: operator
)
