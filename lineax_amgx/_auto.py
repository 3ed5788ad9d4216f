# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`config="auto"`: the preset chosen from what is known about an operator when
the solver's `init` runs. The decision table, with the measurements behind each
branch, is in docs/guide/configs.md ("Choosing automatically"); `tests/test_auto.py`
covers every branch.

Static (known under `jit` whatever the values): the symmetry and definiteness
tags, the block size, the pattern (`SparsityPattern.stencil_points`). From the
values, only when they were concrete NumPy arrays when the operator was built:
its `MatrixProfile` (`CSROperator.profile`). Traced values have no profile, so
under `jit` only the static part decides. Classical AMG is never chosen (it
fails in setup on CUDA 13 builds of AmgX, NVIDIA/AMGX#380).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _config
from ._profile import MatrixProfile

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Choice:
    """The preset `auto` chose, and the row of the decision table that chose it."""

    preset: str
    branch: str


def choose(
    *,
    symmetric: bool,
    definite: bool,
    block_size: int,
    stencil_points: int | None,
    profile: MatrixProfile | None,
    complex_values: bool = False,
) -> Choice:
    """The decision table (docs/guide/configs.md). Each `branch` names a row."""
    if complex_values:
        # Complex operators: their own table (`_config._COMPLEX_DEFAULTS`);
        # `definite` means Hermitian there, and CG never goes to an operator
        # that is only complex symmetric.
        return Choice(
            _config.complex_preset(hermitian=definite, block_size=block_size),
            "complex",
        )
    spd = symmetric and definite
    if block_size > 1:
        # Block systems: block Jacobi on the b x b blocks, pairwise aggregation.
        return Choice(
            "PCG_AGGREGATION_BLOCK" if spd else "FGMRES_AGGREGATION_BLOCK", "block"
        )
    if not spd:
        # Non-symmetric: FGMRES around a DILU-smoothed SIZE_4 cycle. (SIZE_8
        # stalled on upwind convection-diffusion, whose large coarsest level
        # overflowed AmgX's dense LU.)
        return Choice("FGMRES_AGGREGATION", "nonsymmetric")
    if profile is None:
        # Values unknown (traced, or a matrix-free / distributed operator): the
        # pattern cannot tell easy Poisson from high contrast or anisotropy
        # (the same 7-point pattern), so the robust preset.
        return Choice("PCG_AGGREGATION", "spd-static")
    if (
        stencil_points == 7
        and profile.m_matrix
        and profile.diagonally_dominant
        and profile.contrast_decades == 0
        and profile.anisotropy_decades == 0
    ):
        # Constant-coefficient, isotropic 7-point diffusion: the cheaper cycle
        # measured faster on 3-D Poisson (it is slower or stalls on the others).
        return Choice("PCG_AGGREGATION_ISOTROPIC", "spd-isotropic")
    if not profile.m_matrix:
        return Choice("PCG_AGGREGATION", "spd-not-m-matrix")
    if profile.contrast_decades > 0:
        return Choice("PCG_AGGREGATION", "spd-contrast")
    if profile.anisotropy_decades > 0:
        return Choice("PCG_AGGREGATION", "spd-anisotropic")
    return Choice("PCG_AGGREGATION", "spd-other")


def resolve(operator_symmetric: bool, operator_definite: bool, csr) -> Choice:
    """`choose` for a CSR-like operator (`pattern`, and `profile` where it has
    one: a `CSROperator` built from NumPy values)."""
    p = csr.pattern
    profile = getattr(csr, "profile", None)
    return choose(
        symmetric=operator_symmetric,
        definite=operator_definite,
        block_size=p.block_size,
        stencil_points=p.stencil_points if profile is not None else None,
        profile=profile,
        complex_values=np.issubdtype(csr.values.dtype, np.complexfloating),
    )


def resolved(choice: Choice) -> _config.ResolvedConfig:
    return _config.preset(choice.preset)
