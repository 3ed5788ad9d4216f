# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`config="auto"` (the default of `AMGX`): every branch of the decision table
(docs/guide/configs.md, "Choosing automatically") on a matrix of its kind, the
value profile it reads (`CSROperator.profile`), the static-only decision under
`jit`, and solves through each chosen preset on the CPU (pyamg) checked against
scipy's direct solve."""

import json

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from helpers import SPD, anisotropic2d, elasticity2d, poisson2d, poisson3d

import lineax_amgx as lxa
from lineax_amgx import _auto, _config
from lineax_amgx._profile import MatrixProfile


def _fv3d(k, faces_scale=(1.0, 1.0, 1.0)):
    """7-point finite-volume diffusion of a cell field `k` (n^3), harmonic faces,
    Dirichlet boundary faces; `faces_scale` scales the x/y/z faces (anisotropy)."""
    n = k.shape[0]
    idx = np.arange(n**3).reshape(n, n, n)
    rows, cols, vals = [], [], []
    diag = np.zeros((n, n, n))
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        k0, k1 = k[tuple(lo)], k[tuple(hi)]
        t = faces_scale[axis] * 2 * k0 * k1 / (k0 + k1)
        i, j = idx[tuple(lo)].ravel(), idx[tuple(hi)].ravel()
        rows += [i, j]
        cols += [j, i]
        vals += [-t.ravel(), -t.ravel()]
        np.add.at(diag, tuple(lo), t)
        np.add.at(diag, tuple(hi), t)
        for end in (0, n - 1):  # boundary faces: the cell's own k
            sl = [slice(None)] * 3
            sl[axis] = slice(end, end + 1)
            diag[tuple(sl)] += faces_scale[axis] * k[tuple(sl)]
    rows.append(idx.ravel())
    cols.append(idx.ravel())
    vals.append(diag.ravel())
    a = sp.csr_array((np.concatenate(vals), (np.concatenate(rows),
                                             np.concatenate(cols))),
                     shape=(n**3, n**3))
    a.sum_duplicates()
    a.sort_indices()
    return a


def _checker(n, contrast=1e4, block=4):
    c = (np.arange(n) // block) % 2
    k = np.where((c[:, None, None] + c[None, :, None] + c[None, None, :]) % 2,
                 contrast, 1.0)
    return _fv3d(k)


def _sign_flipped(a):
    """S A S with S = diag(+-1) on a red-black ordering of the grid: the same
    spectrum (SPD), but positive off-diagonal entries (no M-matrix)."""
    n = round(a.shape[0] ** (1 / 3))
    i, j, k = np.unravel_index(np.arange(a.shape[0]), (n, n, n))
    s = sp.diags_array(np.where((i + j + k) % 2, -1.0, 1.0))
    out = sp.csr_array(s @ a @ s)
    out.sort_indices()
    return out


# (branch, matrix factory, tags, block size from_scipy keeps)
CASES = {
    "spd-isotropic": (lambda: poisson3d(10), SPD),
    "spd-contrast": (lambda: _checker(12), SPD),
    "spd-anisotropic": (lambda: _fv3d(np.ones((10, 10, 10)), (1.0, 1e-3, 1e-3)), SPD),
    "spd-not-m-matrix": (lambda: _sign_flipped(poisson3d(10)), SPD),
    "spd-other": (lambda: poisson2d(30), SPD),  # a 5-point stencil
    "nonsymmetric": (lambda: sp.csr_array(poisson3d(8)
                                          + sp.diags_array([0.3], offsets=[1],
                                                           shape=(512, 512))), ()),
    "block": (lambda: elasticity2d(8, block=True), SPD),
}
PRESET = {
    "spd-isotropic": "PCG_AGGREGATION_ISOTROPIC",
    "spd-contrast": "PCG_AGGREGATION",
    "spd-anisotropic": "PCG_AGGREGATION",
    "spd-not-m-matrix": "PCG_AGGREGATION",
    "spd-other": "PCG_AGGREGATION",
    "nonsymmetric": "FGMRES_AGGREGATION",
    "block": "PCG_AGGREGATION_BLOCK",
}


def _choice(op):
    spd = lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    return _auto.resolve(spd, spd, op)


@pytest.mark.parametrize("branch", sorted(CASES))
def test_each_branch_on_a_matrix_of_its_kind(branch, getkey):
    make, tags = CASES[branch]
    a = make()
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    choice = _choice(op)
    assert choice == _auto.Choice(PRESET[branch], branch), (choice, op.profile)
    # The solve runs through that preset (the key's config), on the CPU, and
    # matches scipy's direct solve.
    solver = lxa.AMGX(rtol=1e-10)
    assert solver == lxa.AMGX("auto", rtol=1e-10) == lxa.AMGX(None, rtol=1e-10)
    state = solver.init(op, {})
    expected = _config.preset(PRESET[branch]).finalise(
        state.tolerances, max_steps=None, verbose=False)
    assert state.key.config == expected
    b = np.asarray(jax.random.normal(getkey(), (a.shape[0],)))
    sol = lx.linear_solve(op, jnp.asarray(b), solver, state=state)
    ref = spla.spsolve(sp.csc_array(a), b)
    x = np.asarray(sol.value)
    assert np.linalg.norm(x - ref) <= 1e-7 * np.linalg.norm(ref)
    assert np.linalg.norm(b - a @ x) <= 1e-9 * np.linalg.norm(b)


def test_the_static_branch_under_jit_with_traced_values():
    a = poisson3d(10)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    assert _choice(op).branch == "spd-isotropic"
    solver = lxa.AMGX(rtol=1e-8)
    # The common style: new values inside jit. Traced values: no profile.
    state = jax.jit(lambda v: solver.init(op.with_values(v), {}))(op.values)
    expected = _config.preset("PCG_AGGREGATION").finalise(
        state.tolerances, max_steps=None, verbose=False)
    assert state.key.config == expected
    # The operator as an argument of jit keeps its profile (static metadata).
    state = jax.jit(lambda o: solver.init(o, {}))(op)
    assert json.loads(state.key.config)["solver"]["preconditioner"][
        "selector"] == "SIZE_8"


def test_choose_covers_the_table_without_a_matrix():
    easy = MatrixProfile(True, True, 0, 0)
    kw = dict(symmetric=True, definite=True, block_size=1, stencil_points=7)
    assert _auto.choose(**kw, profile=easy).branch == "spd-isotropic"
    assert _auto.choose(**kw, profile=None).branch == "spd-static"
    assert _auto.choose(**{**kw, "stencil_points": 27}, profile=easy).branch \
        == "spd-other"
    assert _auto.choose(**{**kw, "stencil_points": None}, profile=easy).branch \
        == "spd-other"
    # weak diagonal dominance is part of "isotropic"
    assert _auto.choose(**kw, profile=MatrixProfile(True, False, 0, 0)).branch \
        == "spd-other"
    assert _auto.choose(**{**kw, "definite": False}, profile=easy).preset \
        == "FGMRES_AGGREGATION"
    assert _auto.choose(**{**kw, "block_size": 3, "definite": False},
                        profile=None).preset == "FGMRES_AGGREGATION_BLOCK"
    # never classical AMG, whatever the operator
    for sym in (True, False):
        for block in (1, 2):
            for prof in (None, easy, MatrixProfile(False, False, 12, 12)):
                for pts in (None, 5, 7):
                    c = _auto.choose(symmetric=sym, definite=sym, block_size=block,
                                     stencil_points=pts, profile=prof)
                    assert not _config.preset(c.preset).uses_classical


def test_profile_is_computed_from_host_values_only():
    a = poisson3d(6)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    assert op.profile == MatrixProfile(True, True, 0, 0)
    assert op.pattern.stencil_points == 7
    # JAX values (concrete or not): no profile (no device-to-host copy)
    assert op.with_values(op.values).profile is None
    assert lxa.CSROperator(op.pattern, jnp.asarray(a.data)).profile is None
    # NumPy values through with_values / from_arrays: recomputed
    aniso = _fv3d(np.ones((6, 6, 6)), (1.0, 1e-3, 1e-3))
    assert op.with_values(aniso.data).profile.anisotropy_decades == 3
    op2 = lxa.CSROperator.from_arrays(a.indptr, a.indices, 2.5 * a.data, a.shape)
    # values of the same kind (here scaled): an equal profile, so a jitted
    # function taking the operator does not retrace
    assert op2.profile == op.profile
    assert jax.tree.structure(op2) == jax.tree.structure(
        lxa.CSROperator.from_arrays(a.indptr, a.indices, a.data, a.shape))
    # a NaN off-diagonal value: never "isotropic" (the solver reports the NaN)
    bad = a.data.copy()
    bad[1] = np.nan  # row 0: (0, 0) is entry 0, (0, 1) entry 1
    assert _choice(lxa.CSROperator.from_arrays(
        a.indptr, a.indices, bad, a.shape, tags=SPD)).branch != "spd-isotropic"
    # block patterns and matrices without a positive diagonal: none
    assert lxa.CSROperator.from_scipy(elasticity2d(4, block=True)).profile is None
    neg = lxa.CSROperator.from_scipy(-a)
    assert neg.profile is None
    assert lxa.CSROperator.from_scipy(anisotropic2d(12)).profile.m_matrix is False


def test_profile_figures_on_known_matrices():
    checker = lxa.CSROperator.from_scipy(_checker(12, contrast=1e4)).profile
    assert checker.contrast_decades == 4 and checker.anisotropy_decades == 0
    assert checker.m_matrix and checker.diagonally_dominant
    layers = lxa.CSROperator.from_scipy(_checker(12, contrast=1e6)).profile
    assert layers.contrast_decades == 6
    flipped = lxa.CSROperator.from_scipy(_sign_flipped(poisson3d(6))).profile
    assert not flipped.m_matrix and flipped.diagonally_dominant


def test_preconditioner_default_and_auto_refused():
    op = lxa.CSROperator.from_scipy(poisson3d(6), tags=SPD)
    assert lxa.AMGXPreconditioner(op).key.config == lxa.AMGXPreconditioner(
        op, "AMG_VCYCLE").key.config
    with pytest.raises(_config.ConfigError, match="AMG_VCYCLE"):
        lxa.AMGXPreconditioner(op, "auto")
    with pytest.raises(_config.ConfigError, match="AMG_VCYCLE"):
        lxa.AMGXPreconditioned(lx.CG(rtol=1e-6, atol=0.0), config="auto")


def test_isotropic_preset_translates_to_pyamg_like_the_default():
    """pyamg has one standard aggregation: SIZE_8 and SIZE_4 give the same plan
    (docs/guide/cpu-backend.md), and no warning. The one Jacobi sweep before and
    after, and on the coarsest level, do translate: the plans differ in the
    sweeps only."""
    import dataclasses
    import warnings

    from lineax_amgx._backends.pyamg import _translate

    tol = _config.Tolerances(scaled=True)
    plans = []
    for name in ("PCG_AGGREGATION", "PCG_AGGREGATION_ISOTROPIC"):
        final = _config.preset(name).finalise(tol, max_steps=None, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plans.append(_translate.translate(final))
    default, isotropic = plans
    assert (default.precond.presweeps, default.precond.postsweeps) == (2, 2)
    assert (isotropic.precond.presweeps, isotropic.precond.postsweeps) == (1, 1)
    # its coarsest level is smoothed twice in AmgX (NOSOLVER); pyamg's coarsest
    # solve stays exact there (<= 2000 rows), the sweeps only a fallback
    assert isotropic == dataclasses.replace(
        default, precond=dataclasses.replace(
            default.precond, presweeps=1, postsweeps=1, coarsest_sweeps=2)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("branch", sorted(CASES))
def test_each_branch_solves_on_amgx(branch):
    """The preset each branch picks sets up and converges in AmgX (on a GPU:
    `PCG_AGGREGATION_ISOTROPIC`'s SIZE_8 aggregation and 1+1 sweeps included)."""
    from helpers import gpu_array

    make, tags = CASES[branch]
    a = make()
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    assert _choice(op).preset == PRESET[branch]
    op = jax.device_put(op, jax.devices("cuda")[0])
    assert op.profile is not None or branch == "block"  # static metadata kept
    b = np.random.default_rng(0).standard_normal(a.shape[0])
    sol = lx.linear_solve(op, gpu_array(b), lxa.AMGX(rtol=1e-10, backend="amgx"))
    assert sol.result == lx.RESULTS.successful
    x = np.asarray(sol.value)
    assert np.linalg.norm(b - a @ x) <= 1e-9 * np.linalg.norm(b)
    ref = spla.spsolve(sp.csc_array(a), b)
    assert np.linalg.norm(x - ref) <= 1e-7 * np.linalg.norm(ref)


def test_structure_reuse_is_an_opt_in_that_translates_without_effect():
    """`structure_reuse_levels` is in no preset (docs/guide/configs.md, "Sequences of
    solves"): a user opts in with a config dict. Such a config validates, and on the
    CPU backend (pyamg rebuilds its hierarchy on every setup: nothing to reuse) it
    translates to the preset's own plan, with no warning, and a sequence of
    changed-value solves matches scipy."""
    import warnings

    from lineax_amgx._backends.pyamg import _translate

    for name in lxa.configs:
        assert "structure_reuse_levels" not in json.dumps(lxa.configs[name])
    cfg = lxa.configs["PCG_AGGREGATION_ISOTROPIC"]
    cfg["solver"]["preconditioner"]["structure_reuse_levels"] = -1
    tol = _config.Tolerances(scaled=True)
    plain = _config.preset("PCG_AGGREGATION_ISOTROPIC").finalise(
        tol, max_steps=None, verbose=False)
    reuse = _config.resolve(cfg).finalise(tol, max_steps=None, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _translate.translate(reuse) == _translate.translate(plain)
        a = poisson3d(10)
        rng = np.random.default_rng(3)
        b = rng.standard_normal(a.shape[0])
        solver = lxa.AMGX(cfg, rtol=1e-10, backend="pyamg")
        for _ in range(3):
            s = sp.diags_array(1.0 + 0.3 * rng.random(a.shape[0]))
            ak = sp.csr_array(s @ a @ s)
            op = lxa.CSROperator.from_scipy(ak, tags=SPD)
            x = np.asarray(lx.linear_solve(op, jnp.asarray(b), solver).value)
            ref = spla.spsolve(ak.tocsc(), b)
            assert np.linalg.norm(x - ref) / np.linalg.norm(ref) < 1e-8


def test_over_correction_is_in_the_measured_solver_presets_only():
    """The solver presets measured with it over-correct (`error_scaling` 3, the
    scale kept for 1000 cycles: docs/guide/configs.md, "Over-correction"); the
    others do not, and `AMG_VCYCLE`, `AMGXPreconditioner`'s default, stays the
    fixed symmetric cycle `lx.CG` needs."""
    over = {"PCG_AGGREGATION", "PCG_AGGREGATION_ISOTROPIC", "FGMRES_AGGREGATION",
            "PCG_AGGREGATION_BLOCK"}
    for name in lxa.configs:
        scopes = _config._walk_solvers(lxa.configs[name]["solver"])
        amg = [s for s in scopes if s.get("solver") == "AMG"]
        assert amg, name
        found = {(s.get("error_scaling", 0), s.get("reuse_scale", 0)) for s in amg}
        assert found == ({(3, 1000)} if name in over else {(0, 0)}), name
    for name in ("AMG_VCYCLE", "AMG_VCYCLE_COMPLEX"):
        ok, why = _config.preset(name).symmetric_cycle()
        assert ok, (name, why)
