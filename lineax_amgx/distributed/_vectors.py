# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Distributed vectors: `scatter_vector`, `gather_vector` and the vector checks.
"""

from __future__ import annotations

import jax
import numpy as np

from ._collectives import _block_size_of, _layout_of
from ._comm import DistributedError, _raise_if_any
from ._layout import Layout
from ._pattern import DistributedPattern, _counts_displs
from ._sequencer import (
    turn as _turn,
)

_INT32_MAX = np.iinfo(np.int32).max


# -----------------------------------------------------------------------------
# Vectors.
# -----------------------------------------------------------------------------


def scatter_vector(x_global, layout: Layout, root: int = 0) -> np.ndarray:
    """Collective. Split a global vector held by `root` into the local parts.

    **Arguments:**

    - `x_global`: the global vector (length `layout.n_global`) on `root`;
        ignored (pass `None`) on the other ranks.
    - `layout`: the [`lineax_amgx.Layout`][], or the operator (or pattern)
        whose vectors these are: pass the operator for a block operator
        (`b` unknowns per block row of the layout).
    - `root`: the rank holding `x_global`.

    **Returns:**

    This rank's part, a NumPy array of length `layout.n_local` (times `b`)
    (wrap it with `jnp.asarray` or `jax.device_put`).
    """
    layout, b = _layout_of(layout), _block_size_of(layout)
    comm = layout.comm
    n_global, n_local = layout.n_global * b, layout.n_local * b
    err = None
    if layout.rank == root:
        if x_global is None:
            err = "the root rank passed x_global=None."
        else:
            x_global = np.ascontiguousarray(np.asarray(x_global))
            if x_global.shape != (n_global,):
                err = (
                    f"x_global has shape {x_global.shape}; the layout has "
                    f"{n_global} rows." + _block_hint(b, x_global.size, layout)
                )
    _raise_if_any(comm, err)
    with _turn(comm, kind="scatter_vector"):
        dtype = comm.bcast(x_global.dtype if layout.rank == root else None, root)
        out = np.empty(n_local, dtype)
        send = (
            [x_global, _counts_displs(np.multiply(layout.counts, b))]
            if layout.rank == root else None
        )
        comm.Scatterv(send, out, root=root)
    return out


def gather_vector(x_local, layout: Layout, root: int | None = 0):
    """Collective. Assemble a distributed vector.

    **Arguments:**

    - `x_local`: this rank's part (length `layout.n_local`; NumPy or JAX, concrete).
    - `layout`: the [`lineax_amgx.Layout`][], or the operator (or pattern)
        whose vector this is (for a block operator: `b` unknowns per block row).
    - `root`: the rank receiving the global vector; `None` gives it to every rank.

    **Returns:**

    The global NumPy vector on `root` (every rank if `root=None`), `None` elsewhere.
    """
    layout, b = _layout_of(layout), _block_size_of(layout)
    comm = layout.comm
    n_global, n_local = layout.n_global * b, layout.n_local * b
    x = np.ascontiguousarray(np.asarray(x_local))
    err = None
    if x.shape != (n_local,):
        err = (
            f"x_local has shape {x.shape}; this rank owns {n_local} rows "
            f"(layout {layout.offsets})." + _block_hint(b, x.size, layout, True)
        )
    _raise_if_any(comm, err)
    with _turn(comm, kind="gather_vector.dtype"):
        dtypes = comm.allgather(x.dtype.str)
    if len(set(dtypes)) > 1:
        raise DistributedError(f"The local parts have different dtypes: {dtypes}.")
    counts = _counts_displs(np.multiply(layout.counts, b))
    with _turn(comm, kind="gather_vector"):
        if root is None:
            out = np.empty(n_global, x.dtype)
            comm.Allgatherv(x, [out, counts])
            return out
        out = np.empty(n_global, x.dtype) if layout.rank == root else None
        comm.Gatherv(x, None if out is None else [out, counts], root=root)
    return out


def _block_hint(b: int, size: int, layout: Layout, local: bool = False) -> str:
    """A hint for a block operator's vector given with its bare layout."""
    n = layout.n_local if local else layout.n_global
    if b == 1 and n and size % n == 0 and size > n:
        return (
            " For a block operator pass the operator itself instead of its layout "
            "(the layout counts block rows)."
        )
    return ""


def _check_vector(pattern: DistributedPattern, vector, what: str) -> None:
    """Collective (at trace time): a wrong local length on any rank raises on all."""
    n = pattern.shape[0]
    shape = tuple(getattr(vector, "shape", np.shape(vector)))
    err = None
    if shape != (n,):
        err = (
            f"{what} has shape {shape}; this rank owns {n} rows "
            f"({pattern.layout.row_start}:{pattern.layout.row_end} of "
            f"{pattern.layout.n_global})."
        )
    _raise_if_any(
        pattern.layout.comm, err, tracing=isinstance(vector, jax.core.Tracer)
    )
