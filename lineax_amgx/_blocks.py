# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Block systems: block-size limits, rigid-body modes and the near-null space.

Vector-valued PDEs (linear elasticity, Stokes-like systems, several species per
node) give matrices made of small dense `b x b` blocks, one per pair of coupled
nodes. A [`lineax_amgx.CSROperator`][] with `block_size = b` keeps those blocks;
AmgX then aggregates nodes (not single unknowns) and smooths with the inverses
of the diagonal blocks, and pyamg (the CPU backend) does the same with a BSR
matrix. See `docs/guide/blocks.md`.

The *near-null space* of an operator is the set of vectors it (almost) maps to
zero with natural boundary conditions: the constants for a diffusion equation,
the rigid-body modes (translations and rotations) for elasticity. Smoothed
aggregation interpolates those exactly when told about them, which is what makes
it converge in a number of iterations independent of the mesh size. Pass them as
`lx.linear_solve(..., options={"near_nullspace": B})`; they are used by the CPU
(pyamg) backend only: AmgX has no input for them and ignores them with a
one-time [`lineax_amgx.NearNullspaceWarning`][].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._warnings import warn_once

__all__ = [
    "MAX_BLOCK_SIZE",
    "NearNullspaceWarning",
    "check_block_size",
    "check_near_nullspace",
    "rigid_body_modes",
]

# Square blocks of 1..MAX_BLOCK_SIZE unknowns: the CPU (pyamg) backend takes any
# of them. AmgX uploads any square `block_dimx == block_dimy` matrix, but its
# aggregation kernels exist for block sizes 1-5, 8 and 10 only, and with our
# aggregation presets AmgX 2.5 solves 1-5 (checked on an H200; 6 and 8 end in an
# illegal memory access, 7 in "LOW_DEG not implemented for this block size"):
# the native core refuses b > 5 with a clear error before AmgX sees it. Larger
# blocks: use `block_size=1` (scalar CSR).
MAX_BLOCK_SIZE = 8


def check_block_size(block_size: int, *, where: str = "block_size") -> int:
    """Validate a block size (`1 <= b <= MAX_BLOCK_SIZE`) and return it as `int`.

    **Arguments:**

    - `block_size`: the number of unknowns per block (`b` for `b x b` blocks).
    - `where`: what to call it in the error message.

    **Returns:**

    `int(block_size)`.

    **Raises:**

    `ValueError` with what to do instead when `b` is out of range.
    """
    b = int(block_size)
    if b < 1:
        raise ValueError(f"{where} must be >= 1, got {block_size}.")
    if b > MAX_BLOCK_SIZE:
        raise ValueError(
            f"{where}={b} is not supported: lineax-amgx handles square blocks of "
            f"1 to {MAX_BLOCK_SIZE} unknowns (fewer on the GPU, where AmgX's block "
            "aggregation stops: the GPU backend says how many; see "
            "docs/guide/blocks.md). Use the scalar form (block_size=1, e.g. "
            "`CSROperator.from_scipy(matrix.tocsr())`) or group the unknowns into "
            f"blocks of at most {MAX_BLOCK_SIZE}."
        )
    return b


def rigid_body_modes(coords, *, dtype=None) -> np.ndarray:
    """The rigid-body modes of linear elasticity at the given nodes: the
    near-null space to pass to smoothed aggregation for elasticity problems.

    Unknowns are ordered node by node (`u_x, u_y[, u_z]` of node 0, then of
    node 1, ...), which is the order of a block operator with
    `block_size = dim`. In 2-D the modes are the two translations and the
    rotation `(-y, x)`; in 3-D the three translations and the three rotations,
    as in pyamg's elasticity gallery. Rotations are taken about the centroid of
    the nodes (the span is the same as about the origin; the columns are better
    conditioned).

    Use it as
    `lx.linear_solve(A, b, solver=AMGX(), options={"near_nullspace": B})`:
    with the modes, the CPU (pyamg) backend's smoothed aggregation reproduces
    translations and rotations exactly on every level and needs far fewer
    iterations than with the default (one translation per component). Nodes
    with Dirichlet conditions are simply left out of `coords` (and out of the
    matrix): the modes of the remaining nodes are what the solver needs.

    A body with no displacement condition at all (free-floating) has these
    modes as its exact null space: pass them as `options={"null_space": B}`
    instead, and the solve returns the minimum-norm displacement (see
    [`lineax_amgx.AMGX`][] and the singular systems guide).

    **Arguments:**

    - `coords`: array of shape `(num_nodes, dim)`, `dim` 1, 2 or 3: the
        coordinates of the nodes, in the order of the operator's block rows.
    - `dtype`: the floating dtype of the result (default float64).

    **Returns:**

    A NumPy array of shape `(num_nodes * dim, k)` with `k = 1, 3, 6` for
    `dim = 1, 2, 3`.
    """
    x = np.asarray(coords)
    if x.ndim != 2 or x.shape[1] not in (1, 2, 3):
        raise ValueError(
            "coords must have shape (num_nodes, dim) with dim 1, 2 or 3, got "
            f"shape {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise TypeError(f"coords must be real numbers, got dtype {x.dtype}.")
    dtype = np.dtype(np.float64 if dtype is None else dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}.")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("coords must be finite.")
    n, dim = x.shape
    if n:
        x = x - x.mean(axis=0)
    if dim == 1:
        return np.ones((n, 1), dtype)
    k = 3 if dim == 2 else 6
    B = np.zeros((n, dim, k))
    for c in range(dim):  # translations
        B[:, c, c] = 1.0
    if dim == 2:
        B[:, 0, 2] = -x[:, 1]
        B[:, 1, 2] = x[:, 0]
    else:
        # rotation about z: (-y, x, 0); about x: (0, -z, y); about y: (z, 0, -x)
        B[:, 0, 3], B[:, 1, 3] = -x[:, 1], x[:, 0]
        B[:, 1, 4], B[:, 2, 4] = -x[:, 2], x[:, 1]
        B[:, 2, 5], B[:, 0, 5] = -x[:, 0], x[:, 2]
    return B.reshape(n * dim, k).astype(dtype)


def check_near_nullspace(
    near_nullspace, num_rows: int, dtype
) -> Float[Array, "n k"] | None:
    """Validate `options["near_nullspace"]` for an operator with `num_rows` rows
    and return it as a 2-D JAX array of `dtype` (or `None` when not given).

    A 1-D array is one vector. The columns need not be orthonormal (pyamg
    orthonormalises them per aggregate); there must be at least one and at most
    `num_rows`. The array is not differentiated (Lineax treats `options` as
    non-differentiable).
    """
    if near_nullspace is None:
        return None
    B = near_nullspace
    if not isinstance(B, jax.Array):
        B = np.asarray(B)
    complex_ok = jnp.issubdtype(dtype, jnp.complexfloating)
    if not (
        jnp.issubdtype(B.dtype, jnp.floating)
        or jnp.issubdtype(B.dtype, jnp.integer)
        or (complex_ok and jnp.issubdtype(B.dtype, jnp.complexfloating))
    ):
        kind = "a floating" if complex_ok else "a real floating"
        raise TypeError(
            f'options["near_nullspace"] must be {kind} array of shape '
            f"(n, k), got dtype {B.dtype}."
        )
    if B.ndim == 1:
        B = B[:, None]
    if B.ndim != 2 or B.shape[0] != num_rows or not 1 <= B.shape[1] <= num_rows:
        raise ValueError(
            'options["near_nullspace"] must have shape (n, k) with n = '
            f"{num_rows} (the operator's rows) and 1 <= k <= n, got shape "
            f"{tuple(np.shape(near_nullspace))}. For elasticity use "
            "`lineax_amgx.rigid_body_modes(coords)`."
        )
    return jnp.asarray(B, dtype=dtype)


class NearNullspaceWarning(UserWarning):
    """`options["near_nullspace"]` was given to a solve that runs on AmgX (the
    GPU backend), which has no near-null-space input: it is ignored there."""


NEAR_NULLSPACE_IGNORED = "near_nullspace ignored by AmgX"  # warn_once token


def warn_near_nullspace_ignored() -> None:
    """Warn once per process that AmgX ignores the near-null space."""
    warn_once(
        NEAR_NULLSPACE_IGNORED,
        'options["near_nullspace"] is used by the CPU (pyamg) backend only: AmgX '
        "has no near-null-space input, so GPU solves ignore it (its aggregation "
        "AMG uses one constant vector per block component). See docs/guide/blocks.md.",
        NearNullspaceWarning,
        stacklevel=5,
    )
