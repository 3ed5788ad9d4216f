# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Distributed matrix-free operators:
[`lineax_amgx.distributed.DistributedJacobianOperator`][].

Each rank writes its residual rows as a function of its own unknowns and of a
*declared halo* (the off-rank unknowns its rows read). The sparsity of the local
rows against the columns `[owned, halo]` is found by tracing the function's
jaxpr (as `lineax_amgx.sparsify` does for one process), the columns are colored
on this rank alone (a coloring valid for the local rows suffices: every rank
assembles its own rows) and the values are recovered with one JVP per color,
after one halo exchange. The result is a
[`lineax_amgx.distributed.DistributedCSROperator`][] whose columns are global
indices, solved by the distributed AMGX like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._operator import TAG_QUERIES, as_tag_set
from .._pattern import SparsityPattern
from .._runtime_arrays import pattern_array, take
from ..matrix_free import as_csr_operator
from ..matrix_free._coloring import Coloring, color_columns
from ..matrix_free._sparsity import detect_closed_jaxpr
from ._collectives import _extended
from ._comm import DistributedError, _comm, _raise_if_any
from ._layout import Layout
from ._operator import DistributedCSROperator
from ._pattern import DistributedPattern

__all__ = ["DistributedJacobianOperator"]


# -----------------------------------------------------------------------------
# The structure: found once per residual, collectively.
# -----------------------------------------------------------------------------


def _halo_error(halo: np.ndarray, layout: Layout) -> str | None:
    if halo.ndim != 1:
        return ("halo must be a one-dimensional array of global indices, got "
                f"shape {halo.shape}.")
    if halo.size == 0:
        return None
    if not np.issubdtype(halo.dtype, np.integer):
        return f"halo must hold integer global indices, got dtype {halo.dtype}."
    lo, hi = int(halo.min()), int(halo.max())
    if lo < 0 or hi >= layout.n_global:
        return (
            f"halo indices out of range [0, {layout.n_global}): found min {lo}, "
            f"max {hi}."
        )
    own = (halo >= layout.row_start) & (halo < layout.row_end)
    if np.any(own):
        return (
            f"halo index {int(halo[np.argmax(own)])} is owned by this rank (rows "
            f"{layout.row_start}:{layout.row_end}); the halo lists other ranks' "
            "unknowns only (the owned ones are the first argument)."
        )
    if np.unique(halo).size != halo.size:
        return "halo holds duplicate global indices."
    if layout.n_local == 0:
        return "a rank without rows cannot declare a halo (it has no rows to read it)."
    return None


def _exchange_pattern(halo_sorted: np.ndarray, layout: Layout) -> DistributedPattern:
    """Collective. The exchange plan of the declared halo, as a
    `DistributedPattern` (whose halo plan is what `_extended` needs): every local row
    holds its own diagonal and row 0 also the halo columns. It is never solved."""
    n, start = layout.n_local, layout.row_start
    diag = np.arange(start, start + n, dtype=np.int64)
    if n == 0:
        indptr, indices = np.zeros(1, np.int64), np.zeros(0, np.int64)
    else:
        first = np.sort(np.concatenate([[start], halo_sorted]))
        indices = np.concatenate([first, diag[1:]])
        indptr = np.concatenate([[0], first.size + np.arange(n, dtype=np.int64)])
    # (One call site on every rank: the ranks' MPI operations are matched by
    # where they are called from.)
    return DistributedPattern(indptr, indices, layout)


class _Structure:
    """The static part of a distributed Jacobian: the residual function, the
    halo and its exchange plan, the local pattern against `[owned, halo]`, its
    coloring, the global pattern and the decompression indices. Compared by
    identity (built once, collectively; hashed the same way on every rank)."""

    __slots__ = ("fn", "layout", "halo", "exchange", "halo_order", "local_pattern",
                 "coloring", "pattern", "seed_code", "decompress", "n_halo",
                 "__weakref__", "__dict__")

    def extended(self, x):
        """`[x, x_halo]`, the declared halo in the user's order (one exchange,
        collective whenever any rank declares a halo: a rank that reads none may
        still have to send)."""
        n = x.shape[0]
        z = _extended(self.exchange, x)  # [x, halo in sorted order]
        if self.n_halo == 0:
            return z
        order = pattern_array(self.exchange, "halo_order", self.halo_order + n)
        return jnp.concatenate([z[:n], take(z, order)])

    def residual(self, x, args):
        n = x.shape[0]
        z = self.extended(x)
        return self.fn(z[:n], z[n:], args)

    def residual_and_values(self, x, args):
        """The residual rows and the Jacobian's values in the order of `pattern`:
        one exchange, one linearisation, one JVP per color (vmapped)."""
        n = x.shape[0]
        z = self.extended(x)
        F, lin = jax.linearize(lambda z: self.fn(z[:n], z[n:], args), z)
        K = self.coloring.num_colors
        if K == 0 or self.pattern.nnz == 0:
            return F, jnp.zeros((self.pattern.nnz,), F.dtype)
        # Runtime arrays, not constants (see `lineax_amgx._runtime_arrays`).
        code = pattern_array(self.pattern, "jacobian_seed", self.seed_code)
        comp = jax.vmap(lambda k: lin((code == k).astype(z.dtype)))(
            jnp.arange(K, dtype=jnp.int32))
        ci, ri = self.decompress
        values = take(comp, pattern_array(self.pattern, "jacobian_colors", ci),
                      pattern_array(self.pattern, "jacobian_rows", ri))
        return F, values


def _split_args(args):
    """Inexact leaves of `args` (abstract during detection: the pattern holds
    for all their values) and the rest (constants: integer index arrays shape
    the pattern)."""
    leaves, treedef = jax.tree.flatten(args)
    inexact = [i for i, a in enumerate(leaves)
               if eqx.is_array_like(a) and jnp.issubdtype(jnp.result_type(a),
                                                          jnp.inexact)]
    return leaves, treedef, inexact


def _detect(fn, x, xh, args) -> SparsityPattern:
    """The sparsity of `fn(x, xh, args)`'s rows against `[x, xh]` (traced;
    probed at `(x, xh)` where tracing is not possible)."""
    leaves, treedef, inexact = _split_args(args)

    def g(xl, h, *floats):
        full = list(leaves)
        for i, f in zip(inexact, floats):
            full[i] = f
        return fn(xl, h, jax.tree.unflatten(treedef, full))

    floats = [jnp.asarray(leaves[i]) for i in inexact]
    points = [x, xh, *floats]
    abstract = [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)) for p in points]
    closed = jax.make_jaxpr(g)(*abstract)
    full = detect_closed_jaxpr(closed, points)
    # Keep the columns of [x, xh] (the float arguments' columns are dropped).
    n_cols = x.shape[0] + xh.shape[0]
    keep = full.indices < n_cols
    rows = full.row_ids[keep]
    counts = np.bincount(rows, minlength=full.shape[0])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return SparsityPattern(indptr, full.indices[keep], (full.shape[0], n_cols),
                           method=full.method, check=False)


def _build(fn, x, halo, args, layout: Layout) -> _Structure:
    """Collective: check, exchange once, detect, color, build the global pattern."""
    comm = layout.comm
    halo = np.asarray(halo)
    if halo.size == 0:
        halo = np.zeros(0, np.int64)
    _raise_if_any(comm, _halo_error(halo, layout))
    halo = halo.astype(np.int64)
    halo_sorted = np.sort(halo)
    exchange = _exchange_pattern(halo_sorted, layout)
    if exchange.communicates and min(layout.counts) == 0:  # (the same everywhere)
        raise DistributedError(
            f"A rank without rows (row counts {list(layout.counts)}) cannot take part "
            "in a halo exchange (its exchange would have no data, which XLA drops); "
            "give every rank at least one row."
        )
    s = _Structure()
    s.fn, s.layout, s.halo, s.exchange = fn, layout, halo, exchange
    s.n_halo = int(halo.size)
    s.halo_order = np.searchsorted(halo_sorted, halo).astype(np.int32)
    for a in (s.halo, s.halo_order):
        a.setflags(write=False)
    # The output's shape and dtype, checked on every rank before tracing for
    # sparsity (a wrong shape would give a wrong pattern, not an error).
    err = None
    try:
        out = jax.eval_shape(fn, x, jax.ShapeDtypeStruct((s.n_halo,), x.dtype), args)
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != x.shape:
            err = (
                f"the residual function returned {out}, expected an array of shape "
                f"{x.shape} (this rank's residual rows, one per owned unknown)."
            )
        elif not jnp.issubdtype(out.dtype, jnp.floating):
            err = f"the residual function returned dtype {out.dtype}; expected floats."
    except Exception as e:  # noqa: BLE001 - reported on every rank
        err = ("the residual function failed on (x, x_halo, args): "
               f"{type(e).__name__}: {e}")
    _raise_if_any(comm, err)
    xh = np.asarray(s.extended(x))[x.shape[0]:]  # collective: the probing point
    local = None
    err = None
    try:
        local = _detect(fn, x, jnp.asarray(xh), args)
    except Exception as e:  # noqa: BLE001 - reported on every rank
        err = f"sparsity detection failed: {type(e).__name__}: {e}"
    _raise_if_any(comm, err)
    coloring: Coloring = color_columns(local, symmetric=False)
    # Global column ids, sorted within each row (DistributedPattern's order).
    n = layout.n_local
    cols = local.indices.astype(np.int64)
    rows = local.row_ids.astype(np.int64)
    gid = np.where(cols < n, layout.row_start + cols, halo[np.maximum(cols - n, 0)]
                   if halo.size else 0)
    order = np.lexsort((gid, rows))
    s.local_pattern, s.coloring = local, coloring
    s.pattern = DistributedPattern(local.indptr, gid[order], layout)
    colors = coloring.colors.astype(np.int64)
    s.seed_code = colors.astype(np.int32)
    s.decompress = (colors[cols][order].astype(np.int32),
                    rows[order].astype(np.int32))
    return s


# -----------------------------------------------------------------------------
# The operator.
# -----------------------------------------------------------------------------


class DistributedJacobianOperator(lx.AbstractLinearOperator):
    """The Jacobian of a distributed residual, matrix-free: one rank's rows of
    `dF/dx` at a point, without a hand-assembled matrix.

    Each rank writes its residual rows as `fn(x_local, x_halo, args)`: `x_local`
    is this rank's unknowns (rows `layout.row_start:layout.row_end` of the global
    vector), `x_halo` the values of the other ranks' unknowns that its rows read,
    in the order of `halo` (their global indices, declared by the rank). Building
    the operator is **collective** (outside `jit`): the halo's exchange plan is
    agreed, the sparsity of the local rows against `[x_local, x_halo]` is found
    by tracing `fn` (exact for stencils; the pattern holds for every `x` and every
    value of `args`' floating-point leaves), and the local columns are colored.
    Then, also inside `jit`,
    [`lineax_amgx.distributed.DistributedJacobianOperator.to_csr`][] assembles a
    [`lineax_amgx.distributed.DistributedCSROperator`][] with one halo exchange and
    one JVP per color, and `lx.linear_solve(op, b, solver=lineax_amgx.AMGX())`
    does so by itself.
    [`lineax_amgx.distributed.DistributedJacobianOperator.at`][] moves to a new point
    without communicating (the Newton loop).

    ```python
    J = lxd.DistributedJacobianOperator(residual, x0, halo, args)  # collective

    @jax.jit
    def newton_step(x):
        Jx = J.at(x)
        F, A = Jx.residual_and_csr()  # one exchange, num_colors JVPs
        return x + lx.linear_solve(A, -F, solver=lxa.AMGX(rtol=1e-10)).value
    ```

    **Arguments:**

    - `fn`: `(x_local, x_halo, args) -> r_local`, this rank's residual rows, one
        per owned unknown (1-D arrays). Pass varying data (coefficients, right-hand
        sides) through `args`, not by closure: `fn` is static.
    - `x`: this rank's unknowns at the linearisation point (1-D, floating).
    - `halo`: global indices (other ranks' rows) whose values `fn` reads, in the
        order `x_halo` holds them; empty where the rank reads none.
    - `args`: any other arguments of `fn` (a pytree). Integer leaves are treated
        as constants during sparsity detection (index arrays may shape the
        pattern) and must stay the same afterwards.
    - `layout`: the [`lineax_amgx.distributed.Layout`][] of the unknowns
        (default: agreed from the local sizes, in rank order, over `comm`).
    - `comm`: the communicator when `layout` is not given.
    - `tags`: Lineax tags of the global Jacobian (`lx.symmetric_tag`, ...),
        trusted.
    """

    structure: _Structure = eqx.field(static=True)
    x: jax.Array
    args: Any
    tags: frozenset[object] = eqx.field(static=True)

    def __init__(self, fn: Callable, x, halo=(), args: Any = None, *,
                 layout: Layout | None = None, comm=None, tags: object = (),
                 _structure: _Structure | None = None):
        structure = _structure
        if structure is None:
            comm = _comm(comm) if layout is None else layout.comm
            x = jnp.asarray(x)
            err = None
            if isinstance(x, jax.core.Tracer):
                err = ("DistributedJacobianOperator is built collectively outside "
                       "jit (x is traced); inside jit, move an operator built "
                       "outside to the new point with `op.at(x)`.")
            elif x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.floating):
                err = (f"x must be a one-dimensional floating-point array of this "
                       f"rank's unknowns, got shape {x.shape} and dtype {x.dtype}.")
            _raise_if_any(comm, err)
            if layout is None:
                layout = Layout.from_local_size(x.shape[0], comm)
            elif not isinstance(layout, Layout):
                raise TypeError(
                    f"layout must be a Layout, got {type(layout).__name__}.")
            _raise_if_any(comm, None if x.shape[0] == layout.n_local else (
                f"x has {x.shape[0]} entries; the layout gives this rank "
                f"{layout.n_local} rows."))
            structure = _build(fn, x, halo, args, layout)
        self.structure = structure
        self.x = x
        self.args = args
        self.tags = as_tag_set(tags)

    # -- the point and the assembly --------------------------------------------------

    def at(self, x, args: Any = None) -> DistributedJacobianOperator:
        """The same structure at a new point (no communication: usable inside
        `jit`). `args=None` keeps the current arguments."""
        x = jnp.asarray(x)
        if x.shape != self.x.shape:
            raise ValueError(f"x has shape {x.shape}; this operator's unknowns have "
                             f"shape {self.x.shape}.")
        return DistributedJacobianOperator(
            self.structure.fn, x, args=self.args if args is None else args,
            tags=self.tags, _structure=self.structure)

    def residual(self) -> jax.Array:
        """`fn(x, x_halo, args)` at the point: this rank's residual rows (one halo
        exchange)."""
        return self.structure.residual(self.x, self.args)

    def to_csr(self) -> DistributedCSROperator:
        """Assemble the [`lineax_amgx.distributed.DistributedCSROperator`][] (one
        halo exchange, one JVP per color of this rank's columns)."""
        return self.residual_and_csr()[1]

    def residual_and_csr(self) -> tuple[jax.Array, DistributedCSROperator]:
        """The residual rows and the assembled Jacobian, from one halo exchange
        and one linearisation: what a Newton step needs."""
        F, values = self.structure.residual_and_values(self.x, self.args)
        if not jnp.issubdtype(values.dtype, jnp.inexact):
            values = values.astype(self.x.dtype)
        return F, DistributedCSROperator(self.structure.pattern, values, self.tags)

    # -- structure ---------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self.structure.layout

    @property
    def pattern(self) -> DistributedPattern:
        """The global structure of this rank's rows (global column indices)."""
        return self.structure.pattern

    @property
    def local_pattern(self) -> SparsityPattern:
        """The detected pattern of this rank's rows against `[x_local, x_halo]`."""
        return self.structure.local_pattern

    @property
    def coloring(self) -> Coloring:
        """The coloring of this rank's columns `[x_local, x_halo]`."""
        return self.structure.coloring

    @property
    def halo(self) -> np.ndarray:
        return self.structure.halo

    # -- Lineax operator interface --------------------------------------------------

    def mv(self, vector):
        # A JVP of the residual (the exchange's tangent is the exchange of the
        # tangent).
        return jax.jvp(lambda x: self.structure.residual(x, self.args),
                       (self.x,), (jnp.asarray(vector, self.x.dtype),))[1]

    def as_matrix(self):
        raise NotImplementedError(
            "A DistributedJacobianOperator has no local dense matrix: its rows "
            "couple with other ranks' unknowns. Use `op.to_csr()`.")

    def transpose(self):
        if lx.symmetric_tag in self.tags:
            return self
        return self.to_csr().transpose()

    def in_structure(self):
        return self._vector_structure()

    def out_structure(self):
        return self._vector_structure()

    def _vector_structure(self):
        # Through `eval_shape`, as for DistributedCSROperator (inside `shard_map`
        # the structure carries the vectors' sharding).
        shape, dtype = self.x.shape, self.x.dtype
        return jax.eval_shape(lambda: jnp.zeros(shape, dtype))


def _register():
    J = DistributedJacobianOperator
    for name, query in {
        **TAG_QUERIES,
        "is_symmetric": lambda op: lx.symmetric_tag in op.tags,
        "is_diagonal": lambda op: lx.diagonal_tag in op.tags,
        "is_tridiagonal": lambda op: lx.tridiagonal_tag in op.tags,
    }.items():
        getattr(lx, name).register(J)(query)
    lx.linearise.register(J)(lambda op: op)
    lx.materialise.register(J)(lambda op: op.to_csr())
    lx.conj.register(J)(lambda op: op)  # real values only
    lx.diagonal.register(J)(lambda op: lx.diagonal(op.to_csr()))

    @lx.tridiagonal.register(J)
    def _(op):
        raise NotImplementedError(
            "lx.tridiagonal is not available for a DistributedJacobianOperator.")

    # The solvers' conversion: assemble (one exchange, one JVP per color).
    as_csr_operator.register(J)(lambda operator, *, symmetric=None: operator.to_csr())


_register()
