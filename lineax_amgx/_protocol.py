# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The operator protocol: what the solvers ask of an operator (and its pattern)
beyond Lineax's own queries.

Single-dispatch functions, the way Lineax extends its operators
(`lx.is_symmetric`, `lx.diagonal`, ...): the defaults here serve single-process
operators; an operator kind with other needs registers its own implementations
(the distributed package does, for `DistributedCSROperator` and
`DistributedPattern`). The solvers call these and never ask what kind of operator
they hold.

- `check_structure(pattern)`: trace-time structural checks (square, non-empty,
  no empty row or column).
- `norm(operator, vector, after=None)`: the 2-norm of a vector of the operator's
  space (a global norm for a distributed operator, computed after `after`).
- `inner(operator, u, v, after=None)`: `uᵀ v` for vectors (or `(n, k)` bases) of
  the operator's space (global sums for a distributed operator, after `after`).
- `accepts_near_nullspace(operator)`: whether its backends take
  `options["near_nullspace"]` (the distributed ones do not).
- `sequence(operator, x, *deps)`: `x`, made to wait for `deps` when the
  operator's operations must run in one order (MPI calls: the same order on
  every rank); `x` itself otherwise.
- `agree_flags(operator, flags, *deps)`: rank-local int32 flags combined into one
  verdict (summed over the ranks, after `deps`); `flags` itself otherwise.
"""

from __future__ import annotations

import functools as ft

import jax
import jax.numpy as jnp

from ._pattern import SparsityPattern


@ft.singledispatch
def check_structure(pattern) -> None:
    """Trace-time checks of the static structure that every AmgX solve needs."""
    raise TypeError(f"No structure checks for a {type(pattern).__name__}.")


@check_structure.register
def _(p: SparsityPattern) -> None:
    if p.shape[0] != p.shape[1]:
        raise ValueError(
            f"AMGX needs a square operator, got shape {p.shape}. For least "
            "squares use lx.NormalCG or lx.LSMR."
        )
    if p.shape[0] == 0:
        raise ValueError("AMGX got an empty (0 x 0) operator.")
    for what, empty in (("row", p.empty_rows), ("column", p.empty_cols)):
        if empty.size:
            unit = "block " if p.block_size > 1 else ""
            raise ValueError(
                f"The operator is structurally singular: {unit}{what} "
                f"{int(empty[0])} stores no entries ({empty.size} empty "
                f"{unit}{what}s in all). Check the assembly (e.g. a missing "
                "boundary condition), or use a least-squares solver such as "
                "lx.LSMR."
            )


@ft.singledispatch
def norm(operator, vector, after=None) -> jax.Array:
    """The 2-norm of `vector`, a vector of `operator`'s space."""
    del operator, after
    return jnp.linalg.norm(vector)


@ft.singledispatch
def inner(operator, u, v, after=None) -> jax.Array:
    """`uᵀ v`: `u` an `(n, k)` basis (or an `(n,)` vector), `v` an `(n,)` vector
    or an `(n, m)` basis, both of `operator`'s space."""
    del operator, after
    return u.T @ v


@ft.singledispatch
def accepts_near_nullspace(operator) -> bool:
    """Whether the operator's backends take a near-null space (pyamg's `B`)."""
    del operator
    return True


@ft.singledispatch
def sequence(operator, x, *deps):
    """`x`, ordered after `deps` where the operator needs one order."""
    del operator, deps
    return x


@ft.singledispatch
def agree_flags(operator, flags, *deps) -> jax.Array:
    """Rank-local flags, combined over the ranks of a distributed operator."""
    del operator, deps
    return flags
