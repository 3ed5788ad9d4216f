# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""AmgX configurations: presets, parsing, validation and the overrides we apply."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools as ft
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# Every parameter AmgX registers (read off AmgX's sources, `registerParameter`).
_AMGX_PARAMETERS = frozenset({
    'GS_L1_variant', 'affinity_iterations', 'affinity_vectors', 'aggregate_size',
    'aggregation_edge_weight_component', 'aggregation_passes',
    'aggressive_interpolator', 'aggressive_levels', 'aggressive_selector',
    'algorithm', 'alt_rel_tolerance', 'amg_consolidation_flag',
    'amg_host_levels_rows', 'block_convert', 'block_format', 'boundary_coloring',
    'cf_smoothing_mode', 'cheby_max_lambda', 'cheby_min_lambda',
    'chebyshev_lambda_estimate_mode', 'chebyshev_polynomial_order',
    'coarseAgenerator', 'coarseAgenerator_coarse', 'coarse_smoother',
    'coarse_solver', 'coarsen_threshold', 'coarsest_sweeps', 'coloring_custom_arg',
    'coloring_level', 'coloring_try_remove_last_colors', 'communicator',
    'complex_conversion', 'convergence', 'convergence_analysis',
    'cusparse_spgemm_alg', 'cusparse_spgemm_fraction', 'cycle', 'cycle_iters',
    'dense_lu_max_rows', 'dense_lu_num_rows', 'determinism_flag',
    'device_alloc_scaling_factor', 'device_alloc_scaling_threshold',
    'device_consolidation_pool_size', 'device_mem_pool_max_alloc_size',
    'device_mem_pool_size', 'device_mem_pool_size_limit',
    'eig_convergence_check_freq', 'eig_damping_factor', 'eig_eigenvector',
    'eig_eigenvector_solver', 'eig_max_iters', 'eig_shift', 'eig_solver',
    'eig_subspace_size', 'eig_tolerance', 'eig_wanted_count', 'eig_which',
    'energymin_interpolator', 'energymin_selector', 'error_scaling',
    'exact_coarse_solve', 'exception_handling', 'filter_weights',
    'filter_weights_alpha', 'fine_level_consolidation', 'fine_levels',
    'fine_smoother', 'finest_sweeps', 'full_ghost_level', 'geometric_dim',
    'ghost_offdiag_limit', 'gmres_krylov_dim', 'gmres_n_restart', 'halo_coloring',
    'handshaking_phases', 'high_priority_stream', 'ilu_sparsity_level',
    'initial_color', 'insert_diag_while_reordering', 'intensive_smoothing',
    'interp_max_elements', 'interp_truncation_factor', 'interpolator',
    'jacobi_iters', 'kaczmarz_coloring_needed', 'kpz_mu', 'kpz_order',
    'late_rejection', 'matrix_coloring_scheme',
    'matrix_consolidation_lower_threshold', 'matrix_consolidation_upper_threshold',
    'matrix_halo_exchange', 'matrix_writer', 'max_coarse_iters', 'max_iters',
    'max_levels', 'max_matching_iterations', 'max_num_hash', 'max_row_sum',
    'max_unassigned_percentage', 'max_uncolored_percentage', 'merge_singletons',
    'min_coarse_rows', 'min_fine_rows', 'min_rows_latency_hiding',
    'modified_handshake', 'monitor_residual', 'norm', 'notay_weights', 'num_colors',
    'num_streams', 'obtain_timings', 'postsweeps', 'preconditioner', 'presweeps',
    'print_aggregation_info', 'print_coloring_info', 'print_config',
    'print_grid_stats', 'print_solve_stats', 'print_vis_data', 'rel_div_tolerance',
    'relaxation_factor', 'reorder_cols_by_color', 'reuse_scale', 'rhs_from_a',
    'scaling', 'scaling_smoother_steps', 'selector', 'separation_exterior',
    'separation_interior', 'serial_matching', 'serialize_threads', 'smoother',
    'smoother_amg_list', 'solver', 'solver_verbose', 'spmm_gmem_size',
    'spmm_max_attempts', 'spmm_no_sort', 'spmm_verbose', 'store_res_history',
    'strength', 'strength_threshold', 'structure_reuse_levels', 'subspace_dim_s',
    'symmetric_GS', 'tolerance', 'use_bsrxmv', 'use_cuda_ipc_consolidation',
    'use_cusparse_spgemm', 'use_opt_kernels', 'use_scalar_norm',
    'use_sum_stopping_criteria', 'verbosity_level', 'weakness_bound',
    'weight_formula',})
# Parameters AmgX registers as integers (`registerParameter<int>` or `<size_t>`) and
# as reals (`<double>`), read off AmgX's sources: a value of another type fails
# in AmgX's parser, naming no key, so it is refused here.
_INT_PARAMETERS = frozenset({
    'GS_L1_variant', 'affinity_iterations', 'affinity_vectors', 'aggregate_size',
    'aggregation_edge_weight_component', 'aggregation_passes', 'aggressive_levels',
    'amg_consolidation_flag', 'amg_host_levels_rows', 'block_convert',
    'cf_smoothing_mode', 'chebyshev_lambda_estimate_mode',
    'chebyshev_polynomial_order', 'coarsest_sweeps', 'coloring_level',
    'coloring_try_remove_last_colors', 'complex_conversion', 'convergence_analysis',
    'cycle_iters', 'dense_lu_max_rows', 'dense_lu_num_rows', 'determinism_flag',
    'device_alloc_scaling_factor', 'device_alloc_scaling_threshold',
    'device_consolidation_pool_size', 'device_mem_pool_max_alloc_size',
    'device_mem_pool_size', 'device_mem_pool_size_limit', 'eig_convergence_check_freq',
    'eig_eigenvector', 'eig_max_iters', 'eig_subspace_size', 'eig_wanted_count',
    'error_scaling', 'exact_coarse_solve', 'exception_handling', 'filter_weights',
    'fine_level_consolidation', 'fine_levels', 'finest_sweeps', 'full_ghost_level',
    'geometric_dim', 'ghost_offdiag_limit', 'gmres_krylov_dim', 'gmres_n_restart',
    'handshaking_phases', 'high_priority_stream', 'ilu_sparsity_level',
    'initial_color', 'insert_diag_while_reordering', 'intensive_smoothing',
    'interp_max_elements', 'jacobi_iters', 'kaczmarz_coloring_needed', 'kpz_mu',
    'kpz_order', 'late_rejection', 'matrix_consolidation_lower_threshold',
    'matrix_consolidation_upper_threshold', 'matrix_halo_exchange', 'max_coarse_iters',
    'max_iters', 'max_levels', 'max_matching_iterations', 'max_num_hash',
    'merge_singletons', 'min_coarse_rows', 'min_fine_rows', 'min_rows_latency_hiding',
    'modified_handshake', 'monitor_residual', 'notay_weights', 'num_colors',
    'num_streams', 'obtain_timings', 'postsweeps', 'presweeps',
    'print_aggregation_info', 'print_coloring_info', 'print_config',
    'print_grid_stats', 'print_solve_stats', 'print_vis_data', 'reorder_cols_by_color',
    'reuse_scale', 'rhs_from_a', 'scaling_smoother_steps', 'serial_matching',
    'serialize_threads', 'solver_verbose', 'spmm_gmem_size', 'spmm_max_attempts',
    'spmm_no_sort', 'spmm_verbose', 'store_res_history', 'structure_reuse_levels',
    'subspace_dim_s', 'symmetric_GS', 'use_bsrxmv', 'use_cuda_ipc_consolidation',
    'use_cusparse_spgemm', 'use_opt_kernels', 'use_scalar_norm',
    'use_sum_stopping_criteria', 'verbosity_level', 'weakness_bound', 'weight_formula',
})
_REAL_PARAMETERS = frozenset({
    'alt_rel_tolerance', 'cheby_max_lambda', 'cheby_min_lambda', 'coarsen_threshold',
    'cusparse_spgemm_fraction', 'eig_damping_factor', 'eig_shift', 'eig_tolerance',
    'filter_weights_alpha', 'interp_truncation_factor', 'max_row_sum',
    'max_unassigned_percentage', 'max_uncolored_percentage', 'rel_div_tolerance',
    'relaxation_factor', 'strength_threshold', 'tolerance',
})
# Real parameters that must not be negative (a negative tolerance would make
# AmgX run to its iteration limit).
# (Not rel_div_tolerance: -1 turns AmgX's divergence check off.)
_NONNEGATIVE = frozenset({"tolerance", "alt_rel_tolerance"})
# Keys that are structural rather than parameters.
_STRUCTURAL_KEYS = frozenset({"config_version", "scope"})
# Parameters whose value is a solver: a name or a nested (scoped) solver dict.
_SOLVER_KEYS = frozenset({
    "solver", "preconditioner", "smoother", "coarse_solver", "fine_smoother",
    "coarse_smoother", "eig_solver", "eig_eigenvector_solver",
})
_SOLVER_NAMES = frozenset({
    "AMG", "ARNOLDI", "BICGSTAB", "BLOCK_JACOBI", "CF_JACOBI", "CG", "CHEBYSHEV",
    "CHEBYSHEV_POLY", "DENSE_LU_SOLVER", "FGMRES", "FIXCOLOR_GS", "GMRES", "GS", "IDR",
    "IDRMSYNC", "JACOBI_L1", "KACZMARZ", "KPZ_POLYNOMIAL", "MULTICOLOR_DILU",
    "MULTICOLOR_GS", "MULTICOLOR_ILU", "NOSOLVER", "PBICGSTAB", "PCG", "PCGF",
    "POLYNOMIAL",
})
# String-valued parameters with a closed set of choices.
_CHOICES: dict[str, frozenset[str]] = {
    "algorithm": frozenset({"AGGREGATION", "CLASSICAL", "ENERGYMIN"}),
    "cycle": frozenset({"V", "W", "F", "CG", "CGF"}),
    "convergence": frozenset({
        "ABSOLUTE", "RELATIVE_INI", "RELATIVE_INI_CORE", "RELATIVE_MAX",
        "RELATIVE_MAX_CORE", "COMBINED_REL_INI_ABS",
    }),
    "norm": frozenset({"L1", "L1_SCALED", "L2", "LMAX"}),
    "selector": frozenset({
        "SIZE_2", "SIZE_4", "SIZE_8", "MULTI_PAIRWISE", "PMIS", "HMIS",
        "AGGRESSIVE_PMIS", "AGGRESSIVE_HMIS", "CR", "DUMMY", "GEO",
        "PARALLEL_GREEDY_SELECTOR",
    }),
}
# Parameters AmgX reads from its *resources* (`AMGX_resources_create`), never from
# a solver's config (AmgX's resources.cu and distributed_manager.cu). lineax-amgx
# creates one resources object per device and communicator, shared by every
# solver, so in a solver config these keys would be silently ignored: refused.
_RESOURCE_KEYS = frozenset({
    "communicator", "device_mem_pool_size", "device_mem_pool_size_limit",
    "device_consolidation_pool_size", "device_mem_pool_max_alloc_size",
    "device_alloc_scaling_factor", "device_alloc_scaling_threshold", "num_streams",
    "high_priority_stream", "serialize_threads",
})
# Smoothers that keep a V-cycle symmetric when presweeps == postsweeps.
_SYMMETRIC_SMOOTHERS = frozenset({
    "BLOCK_JACOBI", "JACOBI_L1", "CHEBYSHEV", "CHEBYSHEV_POLY", "POLYNOMIAL",
})


def _amg(**overrides: Any) -> dict[str, Any]:
    amg: dict[str, Any] = {
        "scope": "amg",
        "solver": "AMG",
        "algorithm": "AGGREGATION",
        # SIZE_4, not SIZE_8: measured on an H200 at 1M unknowns (docs/benchmarks.md,
        # docs/development/gpu-validation.md) SIZE_8 was 7% faster on 3-D Poisson
        # but 2x slower on high-contrast diffusion, and on rotated anisotropic
        # diffusion its coarsening stalled (setup 0.37 s, no convergence in 1000
        # iterations; SIZE_4: 0.57 s in all). A stall leaves a large coarsest level
        # to the dense LU solver: on upwind convection-diffusion (99,856 unknowns)
        # that level overflowed AmgX's 32-bit dense indexing and lost the CUDA
        # context.
        "selector": "SIZE_4",
        "cycle": "V",
        "max_iters": 1,
        "max_levels": 25,
        "min_coarse_rows": 32,
        "coarse_solver": "DENSE_LU_SOLVER",
        "dense_lu_num_rows": 256,
        "presweeps": 2,
        "postsweeps": 2,
        "smoother": {
            "scope": "jacobi",
            "solver": "BLOCK_JACOBI",
            "relaxation_factor": 0.8,
            "monitor_residual": 0,
            "print_solve_stats": 0,
        },
        "monitor_residual": 0,
        "store_res_history": 0,
        "print_grid_stats": 0,
        "print_solve_stats": 0,
    }
    amg.update(overrides)
    if amg["coarse_solver"] != "DENSE_LU_SOLVER":
        del amg["dense_lu_num_rows"]  # (the dense LU's cap: no dense LU here)
    return amg


def _krylov(name: str, precond: dict[str, Any], **extra: Any) -> dict[str, Any]:
    solver = {
        "scope": "main",
        "solver": name,
        "preconditioner": precond,
        "max_iters": 1000,
        "convergence": "RELATIVE_INI_CORE",
        "tolerance": 1e-8,
        "norm": "L2",
        "use_scalar_norm": 1,
        "monitor_residual": 1,
    }
    solver.update(extra)
    return {"config_version": 2, "solver": solver}


# Over-correction of the coarse-grid correction. AmgX's aggregation prolongs a
# coarse correction piecewise constant (unsmoothed aggregation), which corrects
# smooth errors by too little. `error_scaling: 3` scales each level's correction
# by the A-norm optimum <r, e> / <e, A e> (computed, after 2 smoothing steps of
# the prolonged correction, by a level's first cycle: src/aggregation/
# aggregation_amg_level.cu); `reuse_scale: 1000` keeps that scale for the next
# 1000 cycles, so the extra work (a mat-vec, two reductions with a host sync per
# level) is paid once, and the cycle is a fixed symmetric operator (one positive
# scalar per level) after the first. Measured on an H200 (benchmarks/tune.py,
# docs/results/tune.jsonl; setup + solve, 1M unknowns, rtol 1e-8 unless said):
# 3-D Poisson at rtol 1e-6 (cached setup) 0.022 s (22 iterations) against 0.033 s
# (32); pure-Neumann Poisson 18 iterations against 61 (benchmarks/null_space.py:
# the singular path's 1.5x bound needs it); fem2d 0.130 s against 0.183,
# rotated 2-D anisotropy 0.403 against 0.557, elasticity (scalar) 0.195 against
# 0.206, (3x3 blocks) 0.322 against 0.354, convection-diffusion (FGMRES) 0.229
# against 0.241, layered contrast 0.112 against 0.116; checkerboard contrast
# equal (0.355); axis-aligned 3-D anisotropy 0.194 against 0.181 (the one loss).
# Without `reuse_scale` the scale is recomputed every cycle: the cycle then costs
# twice as much (2.07 ms against 1.00 ms), a net loss. Not in AMG_VCYCLE
# (AMGXPreconditioner): its first cycle differs from the later ones, and
# `lx.CG` needs one fixed operator. The scale is kept across solves too (until
# the 1000 cycles are used up or the next setup), so repeated solves of one
# system can differ in their last digits (within the tolerance); set
# `error_scaling: 0` for bitwise repeatable solves.
_OVER_CORRECTION = {"error_scaling": 3, "reuse_scale": 1000}

_DILU = {"scope": "dilu", "solver": "MULTICOLOR_DILU", "monitor_residual": 0}
_BLOCK_JACOBI = {
    "scope": "jacobi",
    "solver": "BLOCK_JACOBI",
    "relaxation_factor": 0.6,
    "monitor_residual": 0,
    "print_solve_stats": 0,
}

# The AMG cycle of the complex presets (see "GMRES_AGGREGATION_COMPLEX" below):
# smoothing on the coarsest level, as AmgX's complex modes have no dense LU.
_COMPLEX_AMG = _amg(selector="SIZE_8", coarse_solver="NOSOLVER", coarsest_sweeps=4)

_PRESETS: dict[str, dict[str, Any]] = {
    # Symmetric positive definite: CG with a symmetric aggregation V-cycle
    # (Jacobi smoothing, equal pre/post sweeps), the default for SPD-tagged operators.
    "PCG_AGGREGATION": _krylov("PCG", _amg(**_OVER_CORRECTION)),
    # What config="auto" picks for constant-coefficient, isotropic 7-point
    # diffusion (lineax_amgx/_auto.py): SIZE_8 aggregates, one Jacobi sweep
    # before and after, 2 Jacobi sweeps on the coarsest level (about 40 rows)
    # instead of a dense LU, and the over-correction. Measured on an H200
    # (benchmarks/tune.py, 3-D Poisson, rtol 1e-6, docs/results/tune.jsonl),
    # with the setup cached: 0.0224 s (42 iterations) at 1M against 0.0245 s (23)
    # for PCG_AGGREGATION, 0.120 s (62) at 8M against 0.120 s (33); setup + solve
    # 0.103 s and 0.263 s against 0.118 s and 0.271 s, the fastest measured at
    # both sizes (matrix-free lx.CG: 0.0164 s and 0.158 s); one V-cycle 0.58 ms
    # inside AmgX against 1.09 ms. Not the default otherwise: without the
    # over-correction SIZE_8 was 2x slower on high contrast, and on rotated
    # anisotropy its coarsening stalled (see `_amg`).
    "PCG_AGGREGATION_ISOTROPIC": _krylov(
        "PCG",
        _amg(selector="SIZE_8", presweeps=1, postsweeps=1,
             coarse_solver="NOSOLVER", coarsest_sweeps=2, **_OVER_CORRECTION),
    ),
    # Non-symmetric: flexible GMRES around an aggregation cycle smoothed by DILU.
    "FGMRES_AGGREGATION": _krylov(
        "FGMRES",
        _amg(smoother=_DILU, presweeps=0, postsweeps=3, **_OVER_CORRECTION),
        gmres_n_restart=30,
    ),
    "PBICGSTAB_AGGREGATION": _krylov(
        "PBICGSTAB", _amg(smoother=_DILU, presweeps=0, postsweeps=3)
    ),
    "GMRES_AGGREGATION": _krylov(
        "GMRES", _amg(presweeps=1, postsweeps=1), gmres_n_restart=30
    ),
    # Classical (Ruge-Stueben style) AMG. Fails in setup on CUDA 13 builds of AmgX
    # (NVIDIA/AMGX#380): that failure surfaces as a clear error.
    "PCG_CLASSICAL": _krylov(
        "PCG",
        _amg(algorithm="CLASSICAL", selector="PMIS", interpolator="D2",
             strength_threshold=0.25, max_row_sum=0.9),
    ),
    # AMG as the solver itself (no Krylov wrapper): V-cycles until converged.
    "AMG_AGGREGATION": {
        "config_version": 2,
        "solver": {**_amg(), "scope": "main", "max_iters": 200,
                   "convergence": "RELATIVE_INI_CORE", "tolerance": 1e-8,
                   "norm": "L2", "use_scalar_norm": 1, "monitor_residual": 1},
    },
    # Block systems (elasticity, several unknowns per node): block Jacobi smoothing
    # works on the b x b blocks; pairwise aggregation of block rows. Weighted
    # Jacobi smooths only while omega * rho(D^-1 A) < 2: trilinear 3-D elasticity
    # has rho(D_b^-1 A) ~ 2.9 (bilinear 2-D ~ 2.3), so the weight is 0.6, not 0.8.
    "PCG_AGGREGATION_BLOCK": _krylov(
        "PCG", _amg(selector="SIZE_2", smoother=_BLOCK_JACOBI, **_OVER_CORRECTION)
    ),
    "FGMRES_AGGREGATION_BLOCK": _krylov(
        "FGMRES",
        _amg(selector="SIZE_2", presweeps=1, postsweeps=1, smoother=_BLOCK_JACOBI),
        gmres_n_restart=30,
    ),
    # Complex systems (AmgX's dZZI / dCCI modes). AmgX 2.5 registers only a few
    # classes for its complex modes (core.cu, `registerClasses<T, true>`): the
    # solvers AMG, GMRES, BLOCK_JACOBI and NOSOLVER (no FGMRES, PCG, BiCGStab or
    # dense LU), aggregation AMG with the SIZE_8 selector, V-cycles. So: GMRES
    # around an aggregation V-cycle with damped Jacobi smoothing, and smoothing
    # instead of a dense LU on the coarsest level (`coarse_solver: NOSOLVER`:
    # `coarsest_sweeps` Jacobi sweeps there). benchmarks/complex_probe.py measures
    # what AmgX accepts and what converges; `_COMPLEX_DEFAULTS` picks from it.
    "GMRES_AGGREGATION_COMPLEX": _krylov(
        "GMRES",
        copy.deepcopy(_COMPLEX_AMG),
        # A long restart: Helmholtz-like systems stagnate with short ones
        # (measured with pyamg, 40k unknowns, k = 20, absorption ε = 0.01:
        # 1431 iterations at restart 30, 80 at restart 100; docs/guide/complex.md).
        gmres_n_restart=100,
    ),
    # One symmetric V-cycle: for AMGXPreconditioner.
    "AMG_VCYCLE": {
        "config_version": 2,
        "solver": {**_amg(), "scope": "main", "max_iters": 1, "monitor_residual": 0},
    },
    # The same for complex matrices, with the complex presets' cycle.
    "AMG_VCYCLE_COMPLEX": {
        "config_version": 2,
        "solver": {**copy.deepcopy(_COMPLEX_AMG), "scope": "main", "max_iters": 1,
                   "monitor_residual": 0},
    },
}



class _Presets(Mapping):
    """Read-only mapping of preset name -> AmgX config dict (each lookup returns a
    fresh copy, so editing it never changes the preset)."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(_PRESETS[name])

    def __iter__(self):
        return iter(_PRESETS)

    def __len__(self):
        return len(_PRESETS)

    def __repr__(self):
        return f"lineax_amgx.configs({sorted(_PRESETS)})"


configs: Mapping[str, dict[str, Any]] = _Presets()


class ConfigError(ValueError):
    """An AmgX configuration that is malformed or names unknown keys or values."""


def _suggest(word: str, choices) -> str:
    by_case = {c.upper(): c for c in choices if isinstance(c, str)}
    if word.upper() in by_case:  # the same name in another case
        return f" Did you mean {by_case[word.upper()]!r}?"
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _validate_scope(d: Mapping[str, Any], where: str) -> None:
    for key, value in d.items():
        path = f"{where}.{key}" if where else key
        if key in _STRUCTURAL_KEYS:
            continue
        if key not in _AMGX_PARAMETERS:
            raise ConfigError(
                f"Unknown AmgX config key {key!r} at {path!r}."
                + _suggest(key, _AMGX_PARAMETERS | _STRUCTURAL_KEYS)
            )
        if key in _RESOURCE_KEYS:
            hint = (
                " AmgX's halo exchange here uses its host-staged 'MPI' communicator;"
                " 'MPI_DIRECT' needs a CUDA-aware MPI and is not supported (see the"
                " multi-GPU guide)." if key == "communicator" else ""
            )
            raise ConfigError(
                f"{path!r}: {key!r} is a setting of AmgX's resources, which "
                "lineax-amgx creates once per device (and communicator) and shares "
                "between solvers; AmgX ignores it in a solver config, so it is "
                "refused rather than silently dropped. Remove it." + hint
            )
        if key in _SOLVER_KEYS:
            if isinstance(value, Mapping):
                if "solver" not in value:
                    raise ConfigError(
                        f"The nested solver at {path!r} needs a 'solver' entry."
                    )
                _validate_scope(value, path)
            elif isinstance(value, str):
                if value not in _SOLVER_NAMES:
                    raise ConfigError(
                        f"Unknown AmgX solver {value!r} at {path!r}."
                        + _suggest(value, _SOLVER_NAMES)
                    )
            else:
                raise ConfigError(
                    f"{path!r} must be a solver name or a nested dict, got {value!r}."
                )
        elif key in _CHOICES:
            if not isinstance(value, str) or value not in _CHOICES[key]:
                raise ConfigError(
                    f"Invalid value {value!r} for {path!r}; expected one of "
                    f"{sorted(_CHOICES[key])}."
                    + (_suggest(value, _CHOICES[key]) if isinstance(value, str) else "")
                )
        elif isinstance(value, Mapping):
            raise ConfigError(f"{path!r} does not take a nested dict.")
        elif key in _INT_PARAMETERS and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise ConfigError(
                f"{path!r} must be an integer (AmgX registers it as one), got "
                f"{value!r}."
            )
        elif key in _REAL_PARAMETERS and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            raise ConfigError(
                f"{path!r} must be a number (AmgX registers it as a real), got "
                f"{value!r}."
            )
        if key in _NONNEGATIVE and value < 0:
            raise ConfigError(
                f"{path!r} must be >= 0, got {value!r} (a negative tolerance is "
                "never met: AmgX would run to its iteration limit)."
            )


def parse_config(config: str | Mapping[str, Any]) -> dict[str, Any]:
    """Turn a preset name, a JSON string or a dict into a validated AmgX config dict
    (`config_version` 2, the outer solver under `"solver"`)."""
    if isinstance(config, str):
        text = config.strip()
        if text in _PRESETS:
            return copy.deepcopy(_PRESETS[text])
        if not text.startswith(("{", "[")):
            raise ConfigError(
                f"Unknown AmgX preset {config!r}. Presets: {sorted(_PRESETS)}."
                + _suggest(text, _PRESETS)
            )
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"The AmgX config is not valid JSON: {e}") from None
    elif isinstance(config, Mapping):
        cfg = json.loads(json.dumps(config))  # a deep, JSON-clean copy
    else:
        raise ConfigError(
            "config must be a preset name, a JSON string or a dict, got "
            f"{type(config).__name__}."
        )
    if not isinstance(cfg, dict):
        raise ConfigError("The AmgX config must be a JSON object.")
    version = cfg.get("config_version", 2)
    if version != 2:
        raise ConfigError(
            f"Only AmgX config_version 2 is supported, got {version!r}."
        )
    cfg["config_version"] = 2
    if "solver" not in cfg:
        raise ConfigError("The AmgX config needs an outer 'solver' entry.")
    if isinstance(cfg["solver"], str):
        # A flat config: the top level is the solver's scope (AmgX allows this).
        top = {k: cfg.pop(k) for k in list(cfg) if k not in ("config_version",
               "exception_handling", "determinism_flag")}
        cfg["solver"] = top
    _validate_scope(cfg, "")
    for scope in _walk_solvers(cfg["solver"]):
        if scope.get("solver") == "AMG":
            _dense_lu_cap(scope)  # refuses a dense_lu_max_rows that overflows
    return cfg


def outer_solver(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    return cfg["solver"]


def _walk_solvers(scope: Mapping[str, Any]):
    yield scope
    for key in _SOLVER_KEYS - {"solver"}:
        v = scope.get(key)
        if isinstance(v, Mapping):
            yield from _walk_solvers(v)


def uses_classical(cfg: Mapping[str, Any]) -> bool:
    return any(s.get("algorithm") == "CLASSICAL" for s in _walk_solvers(cfg["solver"]))


def aggregation_preconditioned(cfg: Mapping[str, Any]) -> bool:
    """Whether the outer solver is, or is preconditioned by, an aggregation AMG:
    the cycle that a near-null space (pyamg's `B`) guides. (AmgX's `CG` and
    `BICGSTAB` ignore their preconditioner.)"""
    outer = cfg["solver"]
    scope = outer
    if outer.get("solver") != "AMG":
        scope = None
        if outer.get("solver") not in ("CG", "BICGSTAB"):
            scope = outer.get("preconditioner")
    return (
        isinstance(scope, Mapping)
        and scope.get("solver") == "AMG"
        and scope.get("algorithm", "CLASSICAL") in ("AGGREGATION", "ENERGYMIN")
    )


def has_explicit_tolerance(cfg: Mapping[str, Any]) -> bool:
    return "tolerance" in cfg["solver"]


# The default presets of complex operators, by kind: `"hermitian"` for an operator
# tagged positive (or negative) semidefinite, which for complex values means
# Hermitian (semi)definite in Lineax; `"general"` for anything else, including a
# complex symmetric operator (`A = Aᵀ` is not Hermitian: CG does not apply to it,
# so only the "hermitian" rows may name a CG preset; tests/test_complex.py checks
# it). Until benchmarks/complex_probe.py shows which AmgX solvers converge in the
# complex modes, every row is the one preset built from what AmgX registers for
# them (GMRES + aggregation + Jacobi). Changing a default is an edit of this table.
_COMPLEX_DEFAULTS: dict[tuple[str, bool], str] = {
    # (kind, block operator) -> preset
    ("hermitian", False): "GMRES_AGGREGATION_COMPLEX",
    ("hermitian", True): "GMRES_AGGREGATION_COMPLEX",
    ("general", False): "GMRES_AGGREGATION_COMPLEX",
    ("general", True): "GMRES_AGGREGATION_COMPLEX",
    # AMGXPreconditioner's default cycle (a fixed, symmetric V-cycle).
    ("cycle", False): "AMG_VCYCLE_COMPLEX",
    ("cycle", True): "AMG_VCYCLE_COMPLEX",
}


def default_cycle(*, complex_values: bool, block_size: int = 1) -> str:
    """AMGXPreconditioner's default config (one V-cycle)."""
    if complex_values:
        return _COMPLEX_DEFAULTS[("cycle", block_size > 1)]
    return "AMG_VCYCLE"


def complex_preset(*, hermitian: bool, block_size: int) -> str:
    """The default preset of a complex operator (`config="auto"`; see
    `_auto.choose`). `hermitian`: tagged positive (or negative) semidefinite,
    which for complex values means Hermitian, whatever `lx.symmetric_tag` says."""
    kind = "hermitian" if hermitian else "general"
    return _COMPLEX_DEFAULTS[(kind, block_size > 1)]


def check_complex(resolved: ResolvedConfig, dtype, where: str = "AMGX") -> None:
    """Refuse configs that cannot solve complex systems (`dtype` complex):
    classical AMG (pyamg's Ruge-Stueben interpolation takes real matrices only;
    a config must mean the same on both backends)."""
    if resolved.uses_classical:
        raise ValueError(
            f"{where}: classical AMG (config {resolved.text!r}) is not supported "
            f"for complex systems ({jnp.dtype(dtype).name}): pyamg's classical AMG "
            "takes real matrices only, and a config must run on the CPU and the "
            "GPU alike. Use an aggregation config such as "
            "'GMRES_AGGREGATION_COMPLEX' (the default for complex operators)."
        )


_PRINT_KEYS = (
    "print_solve_stats", "print_grid_stats", "print_config", "print_vis_data",
    "obtain_timings",
)


def finalise(
    cfg: Mapping[str, Any],
    *,
    tolerance_mode: str,
    max_steps: int | None,
    verbose: bool,
) -> str:
    """Apply the overrides every solve needs and return canonical JSON (see
    `ResolvedConfig.finalise`). `tolerance_mode` is `"scaled"` or `"native"`."""
    return json.dumps(
        _finalised(cfg, scaled=tolerance_mode == "scaled", max_steps=max_steps,
                   verbose=verbose),
        sort_keys=True,
    )


def _finalised(
    cfg: Mapping[str, Any],
    *,
    scaled: bool,
    max_steps: int | None,
    verbose: bool,
    singular: bool = False,
) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(cfg))
    solver = cfg["solver"]
    if singular:
        _for_singular(solver)
    if scaled:
        # The AmgX half of the tolerance mapping (the other half, the scaling of
        # `b`, is `Tolerances.scale`): convergence means `||r / s||_2 <= 1`.
        solver["convergence"] = "ABSOLUTE"
        solver["tolerance"] = 1.0
    if max_steps is not None:
        solver["max_iters"] = int(max_steps)
    solver["monitor_residual"] = 1
    solver["store_res_history"] = 1
    if scaled:
        solver["norm"] = "L2"  # rtol/atol are defined on ||r||_2
    else:
        solver.setdefault("norm", "L2")
    solver["use_scalar_norm"] = 1
    # AmgX's `exception_handling=1` makes it print and exit() the process on an
    # error; 0 (its default) returns error codes, which the native core turns into
    # Python exceptions. So it is always 0 here.
    cfg["exception_handling"] = 0
    for scope in _walk_solvers(solver):
        for key in _PRINT_KEYS:
            scope[key] = 0
        if scope.get("solver") == "AMG" and (cap := _dense_lu_cap(scope)):
            scope["dense_lu_max_rows"] = cap
    if verbose:
        solver["print_solve_stats"] = 1
        solver["obtain_timings"] = 1
        # The hierarchy, level by level (rows, nonzeros, memory): where a cycle's
        # time goes (the small coarse levels are launch-bound on a GPU).
        for scope in _walk_solvers(solver):
            if scope.get("solver") == "AMG":
                scope["print_grid_stats"] = 1
    return cfg


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """How a solver's `rtol` / `atol` become AmgX settings: the whole mapping.

    `scaled=True`: the solver solves `A (x/s) = b/s` with `s = atol + rtol ||b||_2`
    (`scale`) and AmgX stops at `||r/s||_2 <= 1` (ABSOLUTE at tolerance 1, set by
    `ResolvedConfig.finalise`): `||b - A x||_2 <= atol + rtol ||b||_2`, as in
    Lineax, whatever the initial guess. `scaled=False`: the config's own
    criterion, unchanged (no `rtol`/`atol` given and the config sets its own
    `tolerance`)."""

    scaled: bool
    rtol: float | None = None
    atol: float | None = None

    def values(self, dtype) -> tuple[float, float]:
        """`(rtol, atol)` with their defaults: `rtol` 1e-8 (float64, complex128)
        or 1e-5 (float32, complex64), `atol` 0."""
        rtol = self.rtol
        if rtol is None:
            # By precision: complex128 as float64, complex64 as float32.
            rtol = 1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-5
        return rtol, (0.0 if self.atol is None else self.atol)

    def bound(self, bnorm, dtype):
        """`atol + rtol ||b||`, or 1 where that is 0 (a zero right-hand side)."""
        rtol, atol = self.values(dtype)
        s = atol + rtol * bnorm
        return jnp.where(s > 0, s, jnp.ones_like(s))

    def scale(self, bnorm, dtype):
        """The scale `s` of the solved system (1 when not `scaled`)."""
        if not self.scaled:
            return jnp.ones((), dtype)
        return self.bound(bnorm, dtype)


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """An AmgX config parsed and validated once (at a solver's construction).

    Compared and hashed by `text` (a preset name, or the canonical JSON), so that
    it can be a static field; `cfg` is the parsed dict (not to be mutated)."""

    text: str
    cfg: dict[str, Any] = dataclasses.field(compare=False, hash=False, repr=False)

    @property
    def is_preset(self) -> bool:
        return self.text in _PRESETS

    @property
    def outer(self) -> Mapping[str, Any]:
        return self.cfg["solver"]

    @property
    def uses_classical(self) -> bool:
        return uses_classical(self.cfg)

    def symmetric_cycle(self) -> tuple[bool, str]:
        return is_symmetric_cycle(self.cfg)

    def tolerances(self, rtol: float | None, atol: float | None) -> Tolerances:
        """The tolerance mapping for a solver's `rtol` / `atol`: the config's own
        criterion when neither is given and a user config sets its `tolerance`,
        else the scaled system (see `Tolerances`)."""
        native = (
            rtol is None
            and atol is None
            and not self.is_preset
            and has_explicit_tolerance(self.cfg)
        )
        return Tolerances(scaled=not native, rtol=rtol, atol=atol)

    def finalised(
        self,
        tolerances: Tolerances | None,
        *,
        max_steps: int | None,
        verbose: bool,
        singular: bool = False,
    ) -> dict[str, Any]:
        """The config with the overrides every solve needs, as a fresh dict:

        - `tolerances.scaled`: ABSOLUTE convergence at tolerance 1 (the solver
          scales the system); otherwise (or `None`) the config's own criterion.
        - residual monitoring on (it gives `stats["residual_norm"]`), AmgX's
          exception handling off (errors become error codes), printing off
          unless `verbose`, `max_steps` as `max_iters`.
        - `singular`: a coarse solver that works on a singular matrix (a solve
          with a known null space; see `_for_singular`).
        """
        scaled = tolerances is not None and tolerances.scaled
        return _finalised(self.cfg, scaled=scaled, max_steps=max_steps,
                          verbose=verbose, singular=singular)

    def finalise(
        self,
        tolerances: Tolerances | None,
        *,
        max_steps: int | None,
        verbose: bool,
        singular: bool = False,
    ) -> str:
        """`finalised`, as canonical JSON (the `SolveKey.config`)."""
        return json.dumps(
            self.finalised(tolerances, max_steps=max_steps, verbose=verbose,
                           singular=singular),
            sort_keys=True,
        )


def resolve(config: str | Mapping[str, Any] | ResolvedConfig) -> ResolvedConfig:
    """Parse and validate `config` (a preset name, a JSON string or a dict) once
    (a `ResolvedConfig` is returned as it is)."""
    if isinstance(config, ResolvedConfig):
        return config
    if isinstance(config, str) and config.strip() in _PRESETS:
        return preset(config.strip())
    cfg = parse_config(config)
    return ResolvedConfig(json.dumps(cfg, sort_keys=True), cfg)


@ft.cache
def preset(name: str) -> ResolvedConfig:
    """The resolved preset `name` (parsed once per process)."""
    return ResolvedConfig(name, parse_config(name))


# AmgX's dense-LU coarse solver factors the level its hierarchy ends on. When
# `max_levels` stops the hierarchy early that level can be large: its dense copy is
# indexed with 32-bit ints, so above 46,340 rows AmgX 2.5 writes out of bounds (an
# illegal memory access that ruins the CUDA context), and well before that n^2
# values do not fit. `dense_lu_max_rows` makes AmgX smooth such a level instead; a
# coarsest level of normal size (<= dense_lu_num_rows) is unaffected. AmgX does not
# apply the cap when coarsening *stalls* (an aggregation pass that finds no
# aggregates ends the hierarchy on that level): presets avoid the selectors seen to
# stall (see `_amg`), and docs/guide/errors.md describes the failure.
DENSE_LU_MAX_ROWS = 4096
_DENSE_LU_OVERFLOW_ROWS = 46340  # 46341^2 > 2^31 - 1


def _dense_lu_cap(scope: Mapping[str, Any]) -> int | None:
    """The `dense_lu_max_rows` to set in an AMG scope: `DENSE_LU_MAX_ROWS` when its
    coarse solver is dense LU and no cap is given, else None. Raises `ConfigError`
    for a cap that overflows."""
    coarse = scope.get("coarse_solver", "DENSE_LU_SOLVER")  # AmgX's default
    name = coarse.get("solver") if isinstance(coarse, Mapping) else coarse
    if name != "DENSE_LU_SOLVER":
        return None
    cap = int(scope.get("dense_lu_max_rows", 0))
    if cap > _DENSE_LU_OVERFLOW_ROWS:
        raise ConfigError(
            f"dense_lu_max_rows={cap} is too large: AmgX's dense LU coarse solver "
            f"overflows 32-bit indices above {_DENSE_LU_OVERFLOW_ROWS} rows (an "
            "illegal memory access that ruins the CUDA context). Use at most "
            f"{_DENSE_LU_OVERFLOW_ROWS}, or leave it unset (lineax-amgx then uses "
            f"{DENSE_LU_MAX_ROWS})."
        )
    return DENSE_LU_MAX_ROWS if cap <= 0 else None


# Singular systems (a solve given a null space): the coarsest level of an AMG
# hierarchy of a singular matrix is singular too. AmgX's dense LU then fails
# ("Dense LU factorization failed due to a singular matrix": an exactly zero
# pivot, as integer-valued stencils give) or, with a pivot at round-off level,
# returns a correction whose null-space part is huge. The singular path smooths
# the coarsest level instead (`coarse_solver: NOSOLVER`: AmgX then applies the
# level's smoother `coarsest_sweeps` times, as NVIDIA's own
# FGMRES_AGGREGATION_JACOBI config does); without the dense LU, AmgX coarsens
# down to `min_coarse_rows` (32 in the presets). Jacobi sweeps from a zero guess
# are a symmetric operator, so PCG's cycle stays symmetric. Emulated with pyamg
# (unsmoothed pairwise aggregation of 4, Jacobi 0.8, 2 + 2 sweeps, coarsening to
# <= 32 rows: AmgX's PCG_AGGREGATION as near as pyamg gets), 3-D pure-Neumann
# Poisson at 40^3, 64^3 and 100^3: 2 or 10 coarsest sweeps and an exact
# pseudo-inverse gave the same PCG iteration count within one (100^3, rtol 1e-6:
# 33, against 23 for the Dirichlet problem); 4 is used. On the H200 (AmgX 2.5,
# 100^3, rtol 1e-8, benchmarks/null_space.py): 4, 16 or 64 sweeps, or coarsening
# stopped at 256 or 2 rows, gave 57-62 iterations (35 for Dirichlet): the
# coarsest level is not where the Neumann problem's extra iterations come from.
SINGULAR_COARSEST_SWEEPS = 4


def _for_singular(solver: dict[str, Any]) -> None:
    """Make a finalised outer solver (in place) work on a singular matrix: every
    AMG scope's dense-LU coarse solve becomes `SINGULAR_COARSEST_SWEEPS` sweeps
    of its smoother (unless the scope sets `coarsest_sweeps`); an outer dense LU
    is refused (it cannot factor a singular matrix)."""
    if solver.get("solver") == "DENSE_LU_SOLVER":
        raise ConfigError(
            "A dense LU solve (solver DENSE_LU_SOLVER) cannot solve a singular "
            "system: with a null space use an iterative config such as "
            "'PCG_AGGREGATION' (the default)."
        )
    for scope in _walk_solvers(solver):
        if scope.get("solver") != "AMG":
            continue
        coarse = scope.get("coarse_solver", "DENSE_LU_SOLVER")  # AmgX's default
        name = coarse.get("solver") if isinstance(coarse, Mapping) else coarse
        if name == "DENSE_LU_SOLVER":
            scope["coarse_solver"] = "NOSOLVER"
            scope.setdefault("coarsest_sweeps", SINGULAR_COARSEST_SWEEPS)
            scope.pop("dense_lu_num_rows", None)
            scope.pop("dense_lu_max_rows", None)


def is_symmetric_cycle(cfg: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the outer solver, used as a preconditioner, is a symmetric operator
    (so that CG may use it). Returns (ok, reason-if-not)."""
    for scope in _walk_solvers(cfg["solver"]):
        if scope.get("solver") == "AMG":
            pre = scope.get("presweeps", 1)
            post = scope.get("postsweeps", 1)
            if pre != post:
                return False, (
                    f"the AMG cycle has presweeps={pre} != postsweeps={post}"
                )
            if scope.get("cycle", "V") in ("CG", "CGF"):
                return False, (
                    f"the AMG cycle {scope['cycle']!r} (Krylov-accelerated) is "
                    "not a fixed operator"
                )
            if scope.get("error_scaling", 0) in (2, 3):
                return False, (
                    f"error_scaling={scope['error_scaling']} rescales each "
                    "coarse-grid correction from its input, so the cycle is not "
                    "a fixed operator"
                )
            sm = scope.get("smoother", "BLOCK_JACOBI")
            name = sm.get("solver") if isinstance(sm, Mapping) else sm
            if name not in _SYMMETRIC_SMOOTHERS:
                return False, f"the smoother {name!r} is not symmetric"
        elif scope.get("solver") not in ("AMG",) and scope is cfg["solver"]:
            if scope.get("solver") not in _SYMMETRIC_SMOOTHERS | {"AMG"}:
                return False, (
                    f"the outer solver {scope.get('solver')!r} is not a fixed "
                    "symmetric operator"
                )
    return True, ""

