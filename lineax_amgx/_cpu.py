# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The CPU backend: the same AmgX configurations, solved on the host with pyamg.

[`lineax_amgx.AMGX`][] dispatches here when its arrays live on the CPU (or with
`backend="pyamg"`). The two entry points, `setup` and `solve`, follow the
contract in `_dispatch.py`; both run as `jax.pure_callback`s with
`vmap_method="sequential"`, so `vmap` over right-hand sides gives one setup and
one solve per member, and `vmap` over values one setup per member.

The AmgX configuration is translated to its nearest pyamg equivalent (the table
is in `docs/cpu-backend.md`): the outer Krylov method, classical or aggregation
AMG, the smoother, sweeps, cycle, coarsening limits, the coarse solver, the
iteration limit and the convergence criterion (honoured exactly: the stopping
test is made on the true residual `||b - A x||`). A key with no pyamg equivalent
warns once per `(key, value)` ([`lineax_amgx._cpu.PyamgTranslationWarning`][]);
one whose omission would change the answer raises a `ValueError` (reaching the
caller inside JAX's callback error). Both happen when a CPU solve first runs,
never at trace time: a GPU solve traces this branch too (`_run_plan`).

Block operators (`block_size = b > 1`) reach pyamg as BSR matrices: smoothed
aggregation then aggregates block rows (nodes), its default near-null space is
one constant vector per block component, and the smoothers are block Jacobi /
block Gauss-Seidel on the `b x b` diagonal blocks. A user-given near-null space
(`options["near_nullspace"]`, e.g. `lineax_amgx.rigid_body_modes`) replaces
that default as pyamg's `B`.

AMG hierarchies live in a small, thread-safe LRU cache keyed by
`(pattern fingerprint, block size, mode, config, transposed, near-null-space
width)`. An entry keeps copies of the values (and near-null space) it was set up
with; incoming ones are compared exactly (`np.array_equal`, never a hash), so
unchanged values never set up twice. A setup returns a token `(entry id,
generation)`; a solve that presents a token naming a resident setup does no
comparison and no setup.
"""

from __future__ import annotations

import functools as ft
import itertools
import json
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Array, Int, Int32, Shaped

from ._dispatch import (
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_NOT_CONVERGED,
    STATUS_SUCCESS,
    SolveKey,
    host_setup,
    host_solve,
    nonfinite_host_result,
)
from ._pattern import SparsityPattern

# Shapes of the arrays that cross the backend boundary.
_Values = Shaped[Array, "nnz *block"]
_Vector = Shaped[Array, " n"]
_Flag = Int[Array, ""]
_Token = Int32[Array, "2"]
_Scalar = Shaped[Array, ""]

__all__ = [
    "setup", "solve", "cache_info", "clear_cache", "reset_counters", "set_cache_size",
]


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

# Keys that only affect output, bookkeeping, GPU resources or coloring (which
# pyamg's sequential smoothers do not need): they cannot change the answer and
# are ignored without a warning. Listed in docs/cpu-backend.md.
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
    "halo_coloring", "num_colors", "use_opt_kernels", "use_bsrxmv", "num_streams",
    "high_priority_stream", "device_alloc_scaling_factor",
    "device_alloc_scaling_threshold", "device_consolidation_pool_size",
    "device_mem_pool_max_alloc_size", "device_mem_pool_size",
    "device_mem_pool_size_limit", "communicator", "amg_host_levels_rows",
    "structure_reuse_levels", "reuse_scale", "serialize_threads",
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

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, value: Any, message: str) -> None:
    token = (key, json.dumps(value, sort_keys=True, default=str))
    with _warned_lock:
        if token in _warned:
            return
        _warned.add(token)
    warnings.warn(
        f"AmgX config {key}={value!r}: {message} (pyamg CPU backend; see "
        "docs/cpu-backend.md).",
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
    if coarse_name != "DENSE_LU_SOLVER":
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
def _plan(config: str) -> _Plan:
    """Translate a finalised AmgX config (JSON) into a pyamg plan. Warnings (once
    per key and value) and errors are raised here; it is called when the CPU
    branch runs (`_run_plan`), not when it is traced."""
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


# -----------------------------------------------------------------------------
# Building and applying a solver on the host.
# -----------------------------------------------------------------------------


def _compute_dtype(mode: str):
    # dFFI: everything in float32. dDDI and dDFI: float64 vectors and arithmetic
    # (for dDFI the matrix values arrive rounded to float32).
    return np.float32 if mode == "dFFI" else np.float64


def _norm(r: np.ndarray, kind: str) -> float:
    if kind == "L1":
        return float(np.linalg.norm(r, 1))
    if kind == "L1_SCALED":
        return float(np.linalg.norm(r, 1)) / max(r.size, 1)
    if kind == "LMAX":
        return float(np.linalg.norm(r, np.inf)) if r.size else 0.0
    return float(np.linalg.norm(r))


def _l2_bound(target: float, kind: str, n: int) -> float:
    """An L2 target that implies `norm_kind(r) <= target`."""
    if kind == "L1":
        return target / math.sqrt(max(n, 1))
    if kind == "L1_SCALED":
        return target * math.sqrt(max(n, 1))
    return target


def _coarse_solver(A):
    import pyamg

    return pyamg.multilevel.coarse_grid_solver(
        "pinv" if A.shape[0] <= 2000 else "splu"
    )


def _is_symmetric(A) -> bool:
    d = A - A.T
    d = d.tocsr() if hasattr(d, "tocsr") else d
    return d.count_nonzero() == 0 if hasattr(d, "count_nonzero") else False


def _build_amg(plan: _AMGPlan, A, block: int, near_nullspace=None):
    import pyamg

    is_block = block > 1
    pre = plan.presmoother.pyamg(plan.presweeps, is_block)
    post = plan.postsmoother.pyamg(plan.postsweeps, is_block)
    common = dict(
        presmoother=pre,
        postsmoother=post,
        max_levels=max(plan.max_levels, 1),
        # pyamg counts block rows here, as AmgX's min_coarse_rows does.
        max_coarse=max(plan.min_coarse_rows, 1),
        coarse_solver="pinv",
    )
    if plan.algorithm == "rs":
        A = A.tocsr()
        ml = pyamg.ruge_stuben_solver(
            A,
            strength=("classical", {"theta": plan.strength_threshold}),
            CF=(plan.cf[0], dict(plan.cf[1])),
            interpolation=plan.interpolation,
            **common,
        )
    else:
        ml = pyamg.smoothed_aggregation_solver(
            A,
            B=near_nullspace,
            symmetry="hermitian" if _is_symmetric(A) else "nonsymmetric",
            smooth=plan.smooth_prolongation,
            improve_candidates=None,
            **common,
        )
    ml.coarse_solver = _coarse_solver(ml.levels[-1].A)
    cycles = plan.cycles
    cycle = plan.cycle
    n = A.shape[0]

    def apply(r):
        return ml.solve(r, maxiter=cycles, cycle=cycle, tol=1e-300)

    return apply, ml, n


def _build_relax(plan: _RelaxPlan, A, block: int):
    from pyamg.multilevel import MultilevelSolver
    from pyamg.relaxation import smoothing

    spec = plan.smoother.pyamg(plan.sweeps, block > 1)
    if spec is None:
        return (lambda r: r.copy()), None, A.shape[0]
    name, opts = spec
    lvl = MultilevelSolver.Level()
    lvl.A = A
    if name == "block_jacobi" or name == "block_gauss_seidel":
        opts = {**opts, "blocksize": block}
    relax = getattr(smoothing, f"setup_{name}")(lvl, **opts)

    def apply(r):
        x = np.zeros_like(r)
        relax(A, x, r)
        return x

    return apply, None, A.shape[0]


def _build_direct(A):
    import scipy.sparse.linalg as spla

    lu = spla.splu(A.tocsc())
    return (lambda r: lu.solve(r)), None, A.shape[0]


class _Prepared:
    """A matrix and its preconditioner, ready to solve (one cache slot)."""

    def __init__(
        self,
        plan: _Plan,
        pattern: SparsityPattern,
        values,
        mode: str,
        near_nullspace=None,
    ):
        import scipy.sparse.linalg as spla

        dtype = _compute_dtype(mode)
        A = pattern.to_scipy(np.asarray(values, dtype=dtype))
        if pattern.block_size == 1:
            A = A.tocsr()
        self.A = A
        self.plan = plan
        self.dtype = dtype
        self.hierarchy = None
        block = pattern.block_size
        p = plan.precond
        if isinstance(p, _AMGPlan):
            B = (
                None
                if near_nullspace is None
                else np.asarray(near_nullspace, dtype=dtype)
            )
            apply, self.hierarchy, n = _build_amg(p, A, block, B)
        elif isinstance(p, _RelaxPlan):
            apply, _, n = _build_relax(p, A, block)
        elif isinstance(p, _DirectPlan):
            apply, _, n = _build_direct(A)
        else:
            apply, n = None, A.shape[0]
        self.apply = apply
        self.M = (
            None
            if apply is None
            else spla.LinearOperator((n, n), matvec=apply, dtype=dtype)
        )

    def __repr__(self):
        return f"_Prepared({self.plan.method}, hierarchy={self.hierarchy!r})"

    def solve(self, b: np.ndarray, x0: np.ndarray | None):
        """Returns `(x, status, iterations, ||b - A x||_2)`."""
        plan, A = self.plan, self.A
        dtype = self.dtype
        b = np.asarray(b, dtype=dtype)
        n = b.shape[0]
        x = np.zeros(n, dtype) if x0 is None else np.array(x0, dtype=dtype)
        r = b - A @ x
        r0 = _norm(r, plan.norm)
        conv = plan.convergence
        if conv == "ABSOLUTE":
            target = plan.tolerance
        elif conv == "COMBINED_REL_INI_ABS":
            target = max(plan.tolerance, plan.alt_rel_tolerance * r0)
        else:
            # RELATIVE_INI(_CORE): relative to the initial residual. RELATIVE_MAX
            # (_CORE) is relative to the largest residual seen, which is at least
            # the initial one: this test is equally strict or stricter.
            target = plan.tolerance * r0
        rn = r0
        used = 0
        status = STATUS_NOT_CONVERGED
        if rn <= target:
            status = STATUS_SUCCESS
        elif plan.method == "stationary":
            status, used, x = self._stationary(b, x, r, target, plan)
        else:
            status, used, x = self._krylov(b, x, target, plan)
        resid = float(np.linalg.norm(b - A @ x)) if np.all(np.isfinite(x)) else np.inf
        if not np.all(np.isfinite(x)):
            status = STATUS_DIVERGED
            x = np.zeros_like(x)
        return x, status, used, resid

    def _stationary(self, b, x, r, target, plan):
        A = self.A
        for it in range(plan.max_iters):
            x = x + self.apply(r)
            r = b - A @ x
            rn = _norm(r, plan.norm)
            if not math.isfinite(rn):
                return STATUS_DIVERGED, it + 1, x
            if rn <= target:
                return STATUS_SUCCESS, it + 1, x
        return STATUS_NOT_CONVERGED, plan.max_iters, x

    def _krylov(self, b, x, target, plan):
        from pyamg import krylov

        A, M = self.A, self.M
        n = b.shape[0]
        fn = getattr(krylov, plan.method)
        normb = float(np.linalg.norm(b)) or 1.0
        # pyamg stops when ||r_k||_2 < tol * ||b||_2 (its recursive residual):
        # pass tol = target / ||b|| and check the true residual afterwards.
        tol = _l2_bound(target, plan.norm, n) / normb
        used = 0
        retries = 0
        while used < plan.max_iters:
            budget = plan.max_iters - used
            res: list[float] = []
            kwargs: dict[str, Any] = dict(x0=x, tol=tol, M=M, residuals=res)
            if plan.method == "fgmres":
                kwargs.update(restart=min(plan.restart, budget, n), maxiter=1)
            else:
                kwargs.update(maxiter=budget)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x, flag = fn(A, b, **kwargs)
            x = np.asarray(x, dtype=self.dtype)
            steps = max(len(res) - 1, 0)
            used += steps
            if not np.all(np.isfinite(x)):
                return STATUS_DIVERGED, used, x
            rn = _norm(b - A @ x, plan.norm)
            if rn <= target:
                return STATUS_SUCCESS, used, x
            if flag < 0:
                # breakdown: indefinite matrix or preconditioner, stagnation
                return STATUS_FAILED, used, x
            if flag == 0 or steps == 0:
                # pyamg's (recursive) residual met the test, the true one did
                # not: tighten pyamg's tolerance by the observed gap and go on.
                retries += 1
                if retries > 4 or steps == 0 and retries > 2:
                    return STATUS_FAILED, used, x
                tol = tol * 0.5 * _l2_bound(target, plan.norm, n) / max(
                    float(np.linalg.norm(b - A @ x)), 1e-300
                )
        return STATUS_NOT_CONVERGED, used, x


# -----------------------------------------------------------------------------
# The hierarchy cache.
# -----------------------------------------------------------------------------

# Setups kept per cache entry (several value sets of one operator, e.g. `vmap`
# over values or two operators used alternately); the oldest is dropped first.
_SLOTS_PER_ENTRY = 4
_ID_LIMIT = 2**31 - 1


@dataclass
class _Slot:
    values: np.ndarray
    prepared: _Prepared
    near_nullspace: np.ndarray | None = None

    def matches(self, values, near_nullspace) -> bool:
        if not np.array_equal(self.values, values):
            return False
        if near_nullspace is None or self.near_nullspace is None:
            return near_nullspace is None and self.near_nullspace is None
        return np.array_equal(self.near_nullspace, near_nullspace)


@dataclass
class _Entry:
    id: int
    key: tuple
    slots: OrderedDict = field(default_factory=OrderedDict)  # generation -> _Slot
    generation: int = 0
    setups: int = 0
    resetups: int = 0
    solves: int = 0
    hits: int = 0


_COUNTERS = (
    "hits", "misses", "setups", "resetups", "solves", "evictions", "compares",
    "token_hits",
)


class _Cache:
    def __init__(self, capacity: int):
        self.lock = threading.RLock()
        self.capacity = capacity
        self.slots = _SLOTS_PER_ENTRY
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.by_id: dict[int, _Entry] = {}
        self.ids = itertools.count(1)
        self.counters = dict.fromkeys(_COUNTERS, 0)

    def _new_id(self) -> int:
        return next(self.ids) % _ID_LIMIT or next(self.ids)

    def _evict(self):
        while len(self.entries) > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.by_id.pop(old.id, None)
            self.counters["evictions"] += 1

    def resize(self, capacity: int, slots: int | None):
        with self.lock:
            self.capacity = capacity
            if slots is not None:
                self.slots = slots
                for entry in self.entries.values():
                    while len(entry.slots) > slots:
                        entry.slots.popitem(last=False)
            self._evict()

    def clear(self):
        with self.lock:
            self.entries.clear()
            self.by_id.clear()

    def reset_counters(self):
        with self.lock:
            self.counters = dict.fromkeys(_COUNTERS, 0)

    def acquire(
        self, ckey, plan, pattern, values, mode, token=None, near_nullspace=None
    ):
        """The `(entry id, generation, prepared)` for these values (and
        near-null space): from the token, from an exact comparison, or from a
        (re)setup."""
        nns = near_nullspace
        with self.lock:
            c = self.counters
            if token is not None:
                entry = self.by_id.get(int(token[0]))
                gen = int(token[1])
                if entry is not None and entry.key == ckey and gen in entry.slots:
                    c["token_hits"] += 1
                    c["hits"] += 1
                    entry.hits += 1
                    entry.slots.move_to_end(gen)
                    self.entries.move_to_end(ckey)
                    return entry.id, gen, entry.slots[gen].prepared
            if self.capacity == 0:
                # Isolated mode: build for this call only, keep nothing.
                c["misses"] += 1
                c["setups"] += 1
                return -1, -1, _Prepared(plan, pattern, values, mode, nns)
            entry = self.entries.get(ckey)
            if entry is not None:
                self.entries.move_to_end(ckey)
                for gen in reversed(entry.slots):
                    c["compares"] += 1
                    if entry.slots[gen].matches(values, nns):
                        c["hits"] += 1
                        entry.hits += 1
                        entry.slots.move_to_end(gen)
                        return entry.id, gen, entry.slots[gen].prepared
                prepared = _Prepared(plan, pattern, values, mode, nns)
                c["resetups"] += 1
                entry.resetups += 1
            else:
                prepared = _Prepared(plan, pattern, values, mode, nns)
                c["misses"] += 1
                c["setups"] += 1
                entry = _Entry(self._new_id(), ckey)
                entry.setups += 1
                self.entries[ckey] = entry
                self.by_id[entry.id] = entry
                self._evict()
            entry.generation = (entry.generation + 1) % _ID_LIMIT
            entry.slots[entry.generation] = _Slot(
                np.array(values, copy=True),
                prepared,
                None if nns is None else np.array(nns, copy=True),
            )
            while len(entry.slots) > self.slots:
                entry.slots.popitem(last=False)
            return entry.id, entry.generation, prepared

    def count_solve(self, entry_id: int):
        with self.lock:
            self.counters["solves"] += 1
            entry = self.by_id.get(entry_id)
            if entry is not None:
                entry.solves += 1

    def info(self) -> dict[str, Any]:
        with self.lock:
            entries = []
            for e in self.entries.values():
                fingerprint, block, mode, _, transposed, width = e.key
                entries.append(
                    dict(
                        id=e.id, fingerprint=fingerprint, block_size=block,
                        mode=mode, transposed=transposed, near_nullspace=width,
                        generation=e.generation,
                        resident_setups=len(e.slots), setups=e.setups,
                        resetups=e.resetups, solves=e.solves, hits=e.hits,
                    )
                )
            return dict(
                backend="pyamg", capacity=self.capacity,
                isolated=self.capacity == 0, size=len(self.entries),
                entries_per_key=self.slots,
                **self.counters, entries=entries,
            )


_cache = _Cache(8)


def cache_info() -> dict[str, Any]:
    """Counters of the CPU (pyamg) hierarchy cache.

    **Returns:**

    A dict with `backend="pyamg"`, `capacity`, `isolated` (capacity 0),
    `entries_per_key`, `size` (resident entries) and the counters `hits` (setups
    avoided), `misses` (keys not resident), `setups` (full setups of a new entry,
    or every build in isolated mode), `resetups` (rebuilds of a resident entry for
    new values), `solves`, `evictions`, `compares` (exact value comparisons made)
    and `token_hits` (solves whose token named a resident setup: no comparison at
    all); `entries` lists each resident entry with its block size, the number
    of near-null-space vectors it was set up with (`near_nullspace`, 0 for
    pyamg's default) and its own `setups`, `resetups`, `solves` and `hits`.
    """
    return _cache.info()


def clear_cache() -> None:
    """Drop every cached hierarchy. The counters are kept (see `reset_counters`)."""
    _cache.clear()


def reset_counters() -> None:
    """Zero the total counters (resident entries keep theirs)."""
    _cache.reset_counters()


def set_cache_size(n: int, entries_per_key: int | None = None) -> None:
    """Set how many entries (operator keys) the CPU cache keeps; the least
    recently used are evicted. `0` is isolated mode: every solve builds its own
    hierarchy and nothing is kept.

    **Arguments:**

    - `n`: the capacity, a non-negative integer (default 8; the package applies
        the environment variable `LINEAX_AMGX_CACHE_SIZE` on import).
    - `entries_per_key`: how many setups (value sets) of one key stay resident,
        so that operators used alternately, or `vmap` over values, do not rebuild
        (default 4; `None` keeps the current setting).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"The cache size must be >= 0, got {n}.")
    if entries_per_key is not None and int(entries_per_key) < 1:
        raise ValueError(f"entries_per_key must be >= 1, got {entries_per_key}.")
    _cache.resize(n, None if entries_per_key is None else int(entries_per_key))


# -----------------------------------------------------------------------------
# The backend entry points (the `_dispatch` contract).
# -----------------------------------------------------------------------------


def _cache_key(pattern: SparsityPattern, key: SolveKey, near_nullspace) -> tuple:
    width = 0 if near_nullspace is None else int(near_nullspace.shape[-1])
    return (pattern.fingerprint, pattern.block_size, key.mode, key.config,
            key.transposed, width)


def _check_near_nullspace(pattern: SparsityPattern, near_nullspace):
    """The near-null space's shape (an input error on any platform: trace time)."""
    if near_nullspace is None:
        return
    if near_nullspace.ndim != 2 or near_nullspace.shape[0] != pattern.shape[0]:
        raise ValueError(
            f"The near-null space has shape {near_nullspace.shape}; expected "
            f"({pattern.shape[0]}, k)."
        )


def _warn_unused_near_nullspace(plan: _Plan):
    p = plan.precond
    if isinstance(p, _AMGPlan) and p.algorithm == "sa":
        return
    with _warned_lock:
        if ("near_nullspace", "") in _warned:
            return
        _warned.add(("near_nullspace", ""))
    warnings.warn(
        'options["near_nullspace"] is used only by aggregation AMG; this '
        "configuration (no smoothed-aggregation preconditioner) ignores it "
        "(pyamg CPU backend; see docs/blocks.md).",
        PyamgTranslationWarning,
        stacklevel=4,
    )


def _run_plan(config: str, near_nullspace: bool) -> _Plan:
    """The pyamg plan, made when the CPU branch *runs* (inside the host
    callback), never when it is traced: with `backend="auto"`,
    `lax.platform_dependent` traces the CPU branch on a GPU too, where a
    translation warning would be about a backend that does not run, and a config
    pyamg cannot translate would fail a solve that AmgX can do. Warnings are
    emitted, and config errors raised (a `ValueError`, which reaches the caller
    inside JAX's callback error), at the first solve that runs them."""
    plan = _plan(config)
    if near_nullspace:
        _warn_unused_near_nullspace(plan)
    return plan


def setup(
    pattern: SparsityPattern,
    values: _Values,
    ok: _Flag,
    key: SolveKey,
    near_nullspace: Shaped[Array, "n k"] | None = None,
) -> _Token:
    """Set up (or reuse) the pyamg solver for these values.

    **Arguments:**

    - `pattern`: the static sparsity pattern.
    - `values`: the matrix values, shape `pattern.value_shape`.
    - `ok`: int32 scalar, 0 when `values` holds NaN or Inf (no setup is made).
    - `key`: the static [`lineax_amgx._dispatch.SolveKey`][].
    - `near_nullspace`: `None` or an `(n, k)` array: the near-null space that
        smoothed aggregation interpolates exactly (pyamg's `B`; by default one
        constant vector per block component). Part of the cache comparison.

    **Returns:**

    The token `int32[2] = (entry id, generation)` naming the resident setup, or
    `(-1, -1)` when nothing was kept (non-finite values, isolated mode).
    """
    _check_near_nullspace(pattern, near_nullspace)
    ckey = _cache_key(pattern, key, near_nullspace)

    def host(values, ok, *maybe_nns):
        plan = _run_plan(key.config, bool(maybe_nns))
        if int(ok) == 0 or _cache.capacity == 0:
            return np.array([-1, -1], np.int32)
        nns = np.asarray(maybe_nns[0]) if maybe_nns else None
        entry_id, gen, prepared = _cache.acquire(
            ckey, plan, pattern, np.asarray(values), key.mode, near_nullspace=nns
        )
        if key.verbose:
            print(f"lineax_amgx (pyamg): setup {prepared.hierarchy or prepared}")
        return np.array([entry_id, gen], np.int32)

    return host_setup(host, values, ok, near_nullspace)


def solve(
    pattern: SparsityPattern,
    values: _Values,
    token: _Token,
    b: _Vector,
    x0: _Vector | None,
    ok: _Flag,
    key: SolveKey,
    near_nullspace: Shaped[Array, "n k"] | None = None,
) -> tuple[_Vector, _Token, _Scalar]:
    """Solve `A x = b` on the host with pyamg.

    When `token` names a resident setup of this operator, no comparison or setup
    runs; otherwise the values are compared with the resident ones (exactly) and
    a setup or resetup runs if they differ (a stale token is slow, never wrong).

    **Arguments:**

    - `pattern`, `values`, `key`: as for `setup`.
    - `token`: from `setup` (or `(-1, -1)`).
    - `b`: the right-hand side.
    - `x0`: the initial guess, or `None` for zeros.
    - `ok`: int32 scalar, 0 when `values`, `b` or `x0` holds NaN or Inf: pyamg is
        skipped, `x` is zeros, the status `STATUS_NONFINITE`, the residual `inf`.
    - `near_nullspace`: as for `setup` (used when the token is stale).

    **Returns:**

    `(x, info, residual)`: `x` like `b`; `info = int32[2](status, iterations)`
    with the statuses of `_dispatch`; `residual = ||b - A x||_2` recomputed on the
    host, a scalar of `b`'s dtype.
    """
    _check_near_nullspace(pattern, near_nullspace)
    ckey = _cache_key(pattern, key, near_nullspace)
    out_dtype = np.dtype(b.dtype)
    has_x0 = x0 is not None

    def host(values, token, b, ok, *rest):
        plan = _run_plan(key.config, near_nullspace is not None)
        x0_host = rest[0] if has_x0 else None
        nns = np.asarray(rest[-1]) if near_nullspace is not None else None
        if int(ok) == 0:
            return nonfinite_host_result(b.shape, out_dtype)
        entry_id, _, prepared = _cache.acquire(
            ckey, plan, pattern, np.asarray(values), key.mode, token=token,
            near_nullspace=nns,
        )
        x, status, steps, resid = prepared.solve(np.asarray(b), x0_host)
        _cache.count_solve(entry_id)
        if key.verbose:
            print(
                f"lineax_amgx (pyamg): status {status}, {steps} iterations, "
                f"residual {resid:.3e}"
            )
        return (
            np.asarray(x, out_dtype),
            np.array([status, steps], np.int32),
            np.array(resid, out_dtype),
        )

    return host_solve(host, values, token, b, x0, ok, near_nullspace)
