# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Translating a finalised AmgX configuration into a plan for pyamg (the table
is in `docs/guide/cpu-backend.md`). A key with no pyamg equivalent warns once per
`(key, value)` ([`lineax_amgx.PyamgTranslationWarning`][]); one whose omission
would change the answer raises a `ValueError`.
"""

from __future__ import annotations

import functools as ft
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..._warnings import warn_once


class PyamgTranslationWarning(UserWarning):
    """An AmgX configuration key or value that the pyamg backend cannot honour
    exactly; the warning says what is used instead."""


# -----------------------------------------------------------------------------
# Translating an AmgX config into a plan for pyamg.
# -----------------------------------------------------------------------------

# AmgX defaults (AmgX's `registerParameter` calls) for the keys we translate.
_DEFAULT_MAX_ITERS = 100
_DEFAULT_TOLERANCE = 1e-12
_DEFAULT_RELAXATION = 0.9
_DEFAULT_SWEEPS = 1

# Keys that only affect output, bookkeeping, GPU kernels or coloring (which
# pyamg's sequential smoothers do not need): they cannot change the answer and
# are ignored without a warning. Listed in docs/guide/cpu-backend.md. (AmgX's
# resource settings, `communicator`, memory pools, streams, never get here:
# `_config` refuses them in any config, `_config._RESOURCE_KEYS`.)
_NO_EFFECT_KEYS = frozenset({
    "scope", "config_version", "exception_handling", "determinism_flag",
    "monitor_residual", "store_res_history", "print_solve_stats",
    "print_grid_stats", "print_config", "print_vis_data", "obtain_timings",
    "solver_verbose", "verbosity_level", "print_aggregation_info",
    "print_coloring_info", "convergence_analysis", "matrix_writer",
    "use_scalar_norm", "dense_lu_num_rows", "dense_lu_max_rows",
    "matrix_coloring_scheme", "coloring_level", "max_uncolored_percentage",
    "coloring_try_remove_last_colors", "coloring_custom_arg", "initial_color",
    "reorder_cols_by_color", "insert_diag_while_reordering", "boundary_coloring",
    "halo_coloring", "num_colors", "use_opt_kernels", "use_bsrxmv",
    "amg_host_levels_rows", "structure_reuse_levels", "reuse_scale",
    "spmm_gmem_size", "spmm_max_attempts", "spmm_no_sort", "spmm_verbose",
    "use_cusparse_spgemm", "cusparse_spgemm_alg", "cusparse_spgemm_fraction",
    "min_rows_latency_hiding", "matrix_halo_exchange", "fine_level_consolidation",
    "amg_consolidation_flag", "use_cuda_ipc_consolidation",
    "matrix_consolidation_lower_threshold", "matrix_consolidation_upper_threshold",
    "full_ghost_level", "ghost_offdiag_limit", "separation_interior",
    "separation_exterior", "rhs_from_a", "block_format", "block_convert",
    "kaczmarz_coloring_needed",
})

# Keys translated for each kind of scope.
_OUTER_KEYS = frozenset({
    "solver", "preconditioner", "max_iters", "tolerance", "convergence", "norm",
    "alt_rel_tolerance", "gmres_n_restart", "gmres_krylov_dim",
})
_AMG_KEYS = frozenset({
    "solver", "algorithm", "selector", "cycle", "max_levels", "min_coarse_rows",
    "coarse_solver", "presweeps", "postsweeps", "smoother", "strength_threshold",
    "interpolator", "max_iters", "coarsest_sweeps",
    # AmgX's over-correction of unsmoothed aggregation (rescaled coarse-grid
    # corrections, the presets' `error_scaling: 3`): pyamg's smoothed
    # prolongation already corrects smooth errors in full, so it is accepted and
    # has no separate equivalent (its `reuse_scale` is in _NO_EFFECT_KEYS).
    "error_scaling", "scaling_smoother_steps",
})
_SMOOTHER_KEYS = frozenset({
    "solver", "relaxation_factor", "symmetric_GS", "max_iters",
    "chebyshev_polynomial_order", "kpz_order",
})

_KRYLOV = {
    # AmgX name: (pyamg method, uses the preconditioner)
    "CG": ("cg", False),
    "PCG": ("cg", True),
    "PCGF": ("cg", True),
    # pyamg's gmres preconditions from the left (its residual is M r); fgmres
    # preconditions from the right like AmgX, which with a fixed preconditioner is
    # exactly right-preconditioned GMRES.
    "GMRES": ("fgmres", True),
    "FGMRES": ("fgmres", True),
    "BICGSTAB": ("bicgstab", False),
    "PBICGSTAB": ("bicgstab", True),
    "IDR": ("bicgstab", True),
    "IDRMSYNC": ("bicgstab", True),
}
_SMOOTHERS = frozenset({
    "BLOCK_JACOBI", "JACOBI_L1", "CF_JACOBI", "GS", "MULTICOLOR_GS", "FIXCOLOR_GS",
    "MULTICOLOR_DILU", "MULTICOLOR_ILU", "CHEBYSHEV_POLY", "CHEBYSHEV", "POLYNOMIAL",
    "KPZ_POLYNOMIAL",
})
_UNSUPPORTED_SOLVERS = {
    "ARNOLDI": "it is an eigensolver, not a linear solver",
    "KACZMARZ": "pyamg has no Kaczmarz smoother usable in its cycles",
    "NOSOLVER": "it does not solve anything",
}

def _warn_once(key: str, value: Any, message: str) -> None:
    """Warn once per process per `(key, value)` of the AmgX config."""
    warn_once(
        (key, json.dumps(value, sort_keys=True, default=str)),
        f"AmgX config {key}={value!r}: {message} (pyamg CPU backend; see "
        "docs/guide/cpu-backend.md).",
        PyamgTranslationWarning,
        stacklevel=4,
    )


def _unknown_keys(scope: Mapping[str, Any], known: frozenset[str], where: str):
    for k, v in scope.items():
        if k in known or k in _NO_EFFECT_KEYS:
            continue
        if isinstance(v, Mapping):
            v = v.get("solver")
        _warn_once(
            k, v, f"no pyamg equivalent in the {where} scope; ignored"
        )


def _as_scope(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    return {"solver": value}


@dataclass(frozen=True)
class _SmootherPlan:
    """A relaxation method (pyamg name chosen per block size at build time)."""

    kind: str  # "jacobi" | "gauss_seidel" | "sor" | "chebyshev" | "none"
    options: tuple[tuple[str, Any], ...] = ()

    def pyamg(self, iterations: int, block: bool):
        if self.kind == "none" or iterations <= 0:
            return None
        opts = dict(self.options)
        opts["iterations"] = int(iterations)
        if self.kind == "jacobi":
            return ("block_jacobi" if block else "jacobi", {**opts, "withrho": False})
        if self.kind == "gauss_seidel":
            return ("block_gauss_seidel" if block else "gauss_seidel", opts)
        return (self.kind, opts)


@dataclass(frozen=True)
class _AMGPlan:
    algorithm: str  # "sa" | "rs"
    cycle: str
    cycles: int  # cycles per application
    presmoother: _SmootherPlan
    postsmoother: _SmootherPlan
    presweeps: int
    postsweeps: int
    max_levels: int
    min_coarse_rows: int
    strength_threshold: float | None
    cf: tuple[str, tuple[tuple[str, Any], ...]]
    interpolation: str
    smooth_prolongation: str  # "jacobi" | "energy"
    # 0: the coarsest level is solved exactly; else AmgX's `coarse_solver:
    # NOSOLVER` with `coarsest_sweeps` (see `_build._coarse_solver`).
    coarsest_sweeps: int = 0


@dataclass(frozen=True)
class _RelaxPlan:
    smoother: _SmootherPlan
    sweeps: int


@dataclass(frozen=True)
class _DirectPlan:
    pass


@dataclass(frozen=True)
class _Plan:
    method: str  # "cg" | "gmres" | "fgmres" | "bicgstab" | "stationary"
    precond: _AMGPlan | _RelaxPlan | _DirectPlan | None
    max_iters: int
    tolerance: float
    convergence: str
    alt_rel_tolerance: float
    norm: str
    restart: int


def _smoother_plan(value: Any) -> _SmootherPlan:
    scope = _as_scope(value)
    name = scope.get("solver")
    _unknown_keys(scope, _SMOOTHER_KEYS, f"smoother {name!r}")
    omega = float(scope.get("relaxation_factor", _DEFAULT_RELAXATION))
    sweep = "symmetric" if int(scope.get("symmetric_GS", 0)) else "forward"
    if name in ("BLOCK_JACOBI", "JACOBI_L1", "CF_JACOBI"):
        if name == "CF_JACOBI":
            _warn_once("smoother", name, "C/F-ordered Jacobi is plain (damped) Jacobi")
        return _SmootherPlan("jacobi", (("omega", omega),))
    if name in ("GS", "MULTICOLOR_GS", "FIXCOLOR_GS"):
        if "relaxation_factor" in scope and omega != 1.0:
            return _SmootherPlan("sor", (("omega", omega), ("sweep", sweep)))
        return _SmootherPlan("gauss_seidel", (("sweep", sweep),))
    if name in ("MULTICOLOR_DILU", "MULTICOLOR_ILU"):
        _warn_once(
            "smoother", name,
            "pyamg has no (D)ILU smoother; using symmetric Gauss-Seidel",
        )
        return _SmootherPlan("gauss_seidel", (("sweep", "symmetric"),))
    if name in ("CHEBYSHEV_POLY", "CHEBYSHEV", "POLYNOMIAL", "KPZ_POLYNOMIAL"):
        if name == "KPZ_POLYNOMIAL":
            _warn_once("smoother", name, "using pyamg's Chebyshev smoother")
        degree = int(
            scope.get("chebyshev_polynomial_order", scope.get("kpz_order", 3))
        )
        return _SmootherPlan("chebyshev", (("degree", max(degree, 1)),))
    if name == "NOSOLVER":
        return _SmootherPlan("none")
    raise ValueError(
        f"The AmgX smoother {name!r} has no pyamg equivalent on the CPU backend; "
        "use BLOCK_JACOBI, JACOBI_L1, MULTICOLOR_GS, GS, MULTICOLOR_DILU, "
        "CHEBYSHEV_POLY or POLYNOMIAL."
    )


def _amg_plan(scope: Mapping[str, Any], *, outer: bool) -> _AMGPlan:
    _unknown_keys(scope, _AMG_KEYS | (_OUTER_KEYS if outer else frozenset()), "AMG")
    algorithm = scope.get("algorithm", "CLASSICAL")
    selector = scope.get("selector")
    cf: tuple[str, tuple[tuple[str, Any], ...]] = ("RS", (("second_pass", False),))
    smooth_prolongation = "jacobi"
    if algorithm == "AGGREGATION":
        algo = "sa"
        if selector not in (None, "SIZE_2", "SIZE_4", "SIZE_8"):
            _warn_once(
                "selector", selector,
                "aggregation uses pyamg's standard aggregation",
            )
        if "interpolator" in scope:
            _warn_once(
                "interpolator", scope["interpolator"],
                "aggregation AMG uses smoothed-aggregation prolongation",
            )
    elif algorithm in ("CLASSICAL", "ENERGYMIN"):
        if algorithm == "ENERGYMIN":
            algo = "sa"
            smooth_prolongation = "energy"
            _warn_once(
                "algorithm", algorithm,
                "using pyamg's smoothed aggregation with energy-minimising "
                "prolongation",
            )
        else:
            algo = "rs"
        sel = selector or "PMIS"
        if sel == "PMIS":
            cf = ("PMIS", ())
        elif sel == "HMIS":
            cf = ("RS", (("second_pass", False),))
        elif sel == "CR":
            cf = ("CR", ())
        elif sel in ("AGGRESSIVE_PMIS", "AGGRESSIVE_HMIS"):
            cf = ("PMIS", ()) if sel == "AGGRESSIVE_PMIS" else cf
            _warn_once(
                "selector", sel,
                "pyamg has no aggressive coarsening; using the plain splitting",
            )
        elif algo == "rs":
            _warn_once("selector", sel, "using Ruge-Stueben (RS) splitting")
    else:  # pragma: no cover - validated by _config
        raise ValueError(f"Unknown AMG algorithm {algorithm!r}.")
    interpolation = "classical"
    if algo == "rs":
        interp = scope.get("interpolator", "D2")
        if interp == "D1":
            interpolation = "direct"
        elif interp != "D2":
            _warn_once(
                "interpolator", interp, "using pyamg's classical interpolation"
            )
    cycle = scope.get("cycle", "V")
    if cycle in ("CG", "CGF"):
        _warn_once("cycle", cycle, "pyamg has no K-cycle; using a W-cycle")
        cycle = "W"
    coarse = scope.get("coarse_solver", "DENSE_LU_SOLVER")
    coarse_name = coarse.get("solver") if isinstance(coarse, Mapping) else coarse
    coarsest_sweeps = 0
    if coarse_name == "NOSOLVER":
        # AmgX: no coarse solver, the coarsest level gets `coarsest_sweeps`
        # (AmgX's default 2) sweeps of the level's smoother from a zero guess.
        # pyamg: a pseudo-inverse of a small level, those sweeps on a large one.
        coarsest_sweeps = max(int(scope.get("coarsest_sweeps", 2)), 0)
    elif coarse_name != "DENSE_LU_SOLVER":
        _warn_once(
            "coarse_solver", coarse_name,
            "the coarsest level is solved exactly (pinv or sparse LU)",
        )
    smoother = _smoother_plan(scope.get("smoother", "BLOCK_JACOBI"))
    threshold = scope.get("strength_threshold")
    if algo == "rs":
        threshold = float(0.25 if threshold is None else threshold)
    elif threshold is not None:
        # AmgX's SIZE_n selectors do not use a threshold; neither do we.
        threshold = None
    max_iters = 1 if outer else int(scope.get("max_iters", 1))
    return _AMGPlan(
        algorithm=algo,
        cycle=cycle,
        cycles=max(max_iters, 1),
        presmoother=smoother,
        postsmoother=smoother,
        presweeps=int(scope.get("presweeps", _DEFAULT_SWEEPS)),
        postsweeps=int(scope.get("postsweeps", _DEFAULT_SWEEPS)),
        max_levels=int(scope.get("max_levels", 100)),
        min_coarse_rows=int(scope.get("min_coarse_rows", 2)),
        strength_threshold=threshold,
        cf=cf,
        interpolation=interpolation,
        smooth_prolongation=smooth_prolongation,
        coarsest_sweeps=coarsest_sweeps,
    )


def _precond_plan(value: Any, *, outer: bool):
    scope = _as_scope(value)
    name = scope.get("solver")
    if name == "AMG":
        return _amg_plan(scope, outer=outer)
    if name == "NOSOLVER":
        return None
    if name == "DENSE_LU_SOLVER":
        _unknown_keys(scope, _OUTER_KEYS if outer else frozenset({"solver"}), "LU")
        return _DirectPlan()
    if name in _SMOOTHERS:
        if outer:
            # the smoother is the outer (stationary) iteration: one sweep a step.
            smoother = _smoother_plan(
                {k: v for k, v in scope.items() if k not in _OUTER_KEYS - {"solver"}}
            )
            return _RelaxPlan(smoother, 1)
        return _RelaxPlan(_smoother_plan(scope), int(scope.get("max_iters", 1)))
    if name in _KRYLOV:
        raise ValueError(
            f"A Krylov method ({name!r}) as a preconditioner is not supported by "
            "the pyamg CPU backend; use AMG or a smoother as the preconditioner."
        )
    reason = _UNSUPPORTED_SOLVERS.get(name, "pyamg has no equivalent")
    raise ValueError(
        f"The AmgX solver {name!r} cannot be used on the CPU backend: {reason}."
    )


@ft.lru_cache(maxsize=64)
def translate(config: str) -> _Plan:
    """Translate a finalised AmgX config (JSON) into a pyamg plan. Warnings (once
    per key and value) and errors are raised here, at trace time."""
    cfg = json.loads(config)
    outer = _as_scope(cfg["solver"])
    top_extra = {k: v for k, v in cfg.items() if k != "solver"}
    _unknown_keys(top_extra, frozenset(), "top-level")
    name = outer.get("solver")
    if name in _KRYLOV:
        method, uses_precond = _KRYLOV[name]
        if name in ("IDR", "IDRMSYNC"):
            _warn_once("solver", name, "pyamg has no IDR(s); using BiCGStab")
        _unknown_keys(outer, _OUTER_KEYS, f"solver {name!r}")
        precond = None
        if uses_precond and "preconditioner" in outer:
            precond = _precond_plan(outer["preconditioner"], outer=False)
        elif "preconditioner" in outer:
            p = outer["preconditioner"]
            pname = p.get("solver") if isinstance(p, Mapping) else p
            if pname != "NOSOLVER":
                _warn_once(
                    "preconditioner", pname,
                    f"AmgX's {name} is unpreconditioned (use P{name} for a "
                    "preconditioned method); the preconditioner is ignored, as "
                    "AmgX does",
                )
    else:
        method = "stationary"
        precond = _precond_plan(outer, outer=True)
        if precond is None:
            raise ValueError(
                f"The AmgX solver {name!r} cannot be the outer solver."
            )
    norm = outer.get("norm", "L2")
    restart = outer.get("gmres_n_restart", outer.get("gmres_krylov_dim", 20))
    return _Plan(
        method=method,
        precond=precond,
        max_iters=int(outer.get("max_iters", _DEFAULT_MAX_ITERS)),
        tolerance=float(outer.get("tolerance", _DEFAULT_TOLERANCE)),
        convergence=outer.get("convergence", "ABSOLUTE"),
        alt_rel_tolerance=float(outer.get("alt_rel_tolerance", 1e-12)),
        norm=norm,
        restart=max(int(restart), 1),
    )
