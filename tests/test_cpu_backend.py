"""The CPU backend (pyamg): AmgX configs, results, transforms and the cache.

`conftest.py` turns on x64 and puts this folder on `sys.path`.
"""

import json
import threading
import warnings

import _cpu_helpers as h
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import lineax_amgx as lxa
from lineax_amgx import _warnings
from lineax_amgx._backends import pyamg as _cpu
from lineax_amgx._backends.pyamg import _translate

pytestmark = pytest.mark.filterwarnings(
    "ignore::lineax_amgx.PyamgTranslationWarning"
)


@pytest.fixture(autouse=True)
def _on_cpu():
    # The backend follows where the data lives: keep every array on the CPU, so
    # `AMGX()` (backend="auto") runs pyamg even on a machine with a GPU.
    with jax.default_device(h.cpu_device()):
        yield


@pytest.fixture
def fresh_cache():
    _cpu.set_cache_size(8)
    _cpu.clear_cache()
    _cpu.reset_counters()
    yield
    _cpu.set_cache_size(8)


def _counts():
    info = _cpu.cache_info()
    return {k: info[k] for k in ("setups", "resetups", "solves", "compares",
                                 "token_hits", "misses", "hits")}


def _rhs(rng, n, dtype=np.float64):
    return jnp.asarray(rng.standard_normal(n).astype(dtype))


# ---- gallery problems against scipy's direct solve --------------------------


PROBLEMS = {
    "poisson2d": (lambda: h.poisson2d(40), h.SPD),
    "poisson3d": (lambda: h.poisson3d(12), h.SPD),
    "anisotropic2d": (lambda: h.anisotropic2d(40), h.SPD),
    "elasticity2d": (lambda: h.elasticity2d(14), h.SPD),
    "convection_diffusion2d": (lambda: h.convection_diffusion2d(40), ()),
}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gallery_matches_spsolve(name, rng):
    make, tags = PROBLEMS[name]
    a = make()
    b = _rhs(rng, a.shape[0])
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10))
    ref = h.reference(a, b)
    assert sol.value.dtype == jnp.float64
    assert h.rel_err(sol.value, ref) < 1e-6
    steps = int(sol.stats["num_steps"])
    assert 0 < steps < 300
    # the reported residual is the true one, and meets the tolerance
    resid = h.true_residual(a, sol.value, b)
    assert resid <= 1e-10 * float(jnp.linalg.norm(b)) * (1 + 1e-6)
    np.testing.assert_allclose(float(sol.stats["residual_norm"]), resid, rtol=1e-3)


def test_block_elasticity_bsr(rng):
    a = h.elasticity2d(14, block=True)
    op = lxa.CSROperator.from_scipy(a, tags=h.SPD)
    assert op.pattern.block_size == 2
    b = _rhs(rng, a.shape[0])
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10))
    assert h.rel_err(sol.value, h.reference(a.tocsr(), b)) < 1e-6


def test_poisson_256_iteration_count(rng):
    a = h.poisson2d(256)
    b = _rhs(rng, a.shape[0])
    op = lxa.CSROperator.from_scipy(a, tags=h.SPD)
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-8))
    steps = int(sol.stats["num_steps"])
    assert 0 < steps < 50
    assert h.true_residual(a, sol.value, b) <= 1e-8 * float(jnp.linalg.norm(b))


def test_classical_config(rng):
    a = h.poisson2d(32)
    b = _rhs(rng, a.shape[0])
    op = lxa.CSROperator.from_scipy(a, tags=h.SPD)
    sol = lx.linear_solve(op, b, solver=lxa.AMGX("PCG_CLASSICAL", rtol=1e-10))
    assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6
    assert _translate.translate(_key_config("PCG_CLASSICAL")).precond.algorithm == "rs"


def _key_config(name, **kw):
    from lineax_amgx import _config

    return _config.finalise(
        _config.parse_config(name), tolerance_mode="scaled", max_steps=None,
        verbose=False, **kw,
    )


# ---- transformations ----------------------------------------------------------------


def _poisson_op(n=16, *, tags=h.SPD):
    a = h.poisson2d(n)
    return a, lxa.CSROperator.from_scipy(a, tags=tags)


def test_jit_matches_eager(rng):
    a, op = _poisson_op()
    b = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)

    def f(values, b):
        return lx.linear_solve(op.with_values(values), b, solver=solver).value

    eager = f(op.values, b)
    jitted = jax.jit(f)(op.values, b)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12, atol=1e-14)
    assert h.rel_err(jitted, h.reference(a, b)) < 1e-6


def test_vmap_over_rhs_one_setup(rng, fresh_cache):
    a, op = _poisson_op()
    bs = jnp.asarray(rng.standard_normal((8, a.shape[0])))
    solver = lxa.AMGX(rtol=1e-10)

    def f(b):
        return lx.linear_solve(op, b, solver=solver).value

    xs = jax.jit(jax.vmap(f))(bs)
    c = _counts()
    assert c["setups"] + c["resetups"] == 1
    assert c["solves"] == 8
    assert c["compares"] == 0  # every solve presented the setup's token
    for i in range(8):
        np.testing.assert_allclose(xs[i], f(bs[i]), rtol=1e-12, atol=1e-14)
        assert h.rel_err(xs[i], h.reference(a, bs[i])) < 1e-6


def test_vmap_over_values(rng, fresh_cache):
    a, op = _poisson_op()
    scales = jnp.asarray([1.0, 2.0, 3.5])
    b = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)

    def f(s):
        return lx.linear_solve(op.with_values(op.values * s), b, solver=solver).value

    xs = jax.vmap(f)(scales)
    c = _counts()
    assert c["setups"] + c["resetups"] == 3  # one per member, none repeated
    for i, s in enumerate(np.asarray(scales)):
        assert h.rel_err(xs[i], h.reference(a * s, b)) < 1e-6


@pytest.mark.parametrize("symmetric", [True, False])
def test_grad_matches_dense(symmetric, rng, fresh_cache):
    if symmetric:
        a = h.poisson2d(8)
        a = a + 0.1 * np.eye(a.shape[0])  # SPD, not just the stencil
        tags = h.SPD
    else:
        a = h.convection_diffusion2d(8, peclet=20.0)
        tags = ()
    a = h.sp.csr_array(a)
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    pattern = op.pattern
    b = _rhs(rng, a.shape[0])
    w = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-12)
    dense = h.dense_solve_fn(pattern)

    def loss(values, b):
        x = lx.linear_solve(lxa.CSROperator(pattern, values, tags), b, solver=solver)
        return jnp.sum(w * x.value) + 0.5 * jnp.sum(x.value**2)

    def loss_ref(values, b):
        x = dense(values, b)
        return jnp.sum(w * x) + 0.5 * jnp.sum(x**2)

    gv, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(op.values, b)
    rv, rb = jax.grad(loss_ref, argnums=(0, 1))(op.values, b)
    assert h.rel_err(gb, rb) < 1e-7
    assert h.rel_err(gv, rv) < 1e-7
    transposed = [e["transposed"] for e in _cpu.cache_info()["entries"]]
    # symmetric: the backward pass reuses the forward entry; otherwise it has its own
    assert transposed.count(True) == (0 if symmetric else 1)


# ---- the hierarchy cache -----------------------------------------------------------


def test_reuse_same_values_then_resetup(rng, fresh_cache):
    a, op = _poisson_op()
    b = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)
    x1 = lx.linear_solve(op, b, solver=solver).value
    x2 = lx.linear_solve(op, b, solver=solver).value
    c = _counts()
    assert (c["setups"], c["resetups"], c["solves"]) == (1, 0, 2)
    assert c["compares"] == 1  # the second setup compared values: equal, no setup
    np.testing.assert_array_equal(x1, x2)

    op2 = op.with_values(op.values * 1.5)
    x3 = lx.linear_solve(op2, b, solver=solver).value
    c = _counts()
    assert (c["setups"], c["resetups"]) == (1, 1)
    assert h.rel_err(x3, h.reference(a * 1.5, b)) < 1e-6
    # the first values are still resident (several setups per entry): no setup
    lx.linear_solve(op, b, solver=solver)
    assert _counts()["resetups"] == 1
    info = _cpu.cache_info()
    assert info["size"] == 1 and info["entries"][0]["resetups"] == 1


def test_reused_state_skips_comparison(rng, fresh_cache):
    a, op = _poisson_op()
    solver = lxa.AMGX(rtol=1e-10)
    state = solver.init(op, {})
    before = _counts()
    assert before["setups"] == 1
    for _ in range(3):
        b = _rhs(rng, a.shape[0])
        sol = lx.linear_solve(op, b, solver=solver, state=state)
        assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6
    c = _counts()
    assert c["setups"] == 1 and c["resetups"] == 0
    assert c["compares"] == before["compares"]  # the token named the setup
    assert c["token_hits"] - before["token_hits"] == 3


def test_stale_token_is_slow_not_wrong(rng, fresh_cache):
    a, op = _poisson_op()
    solver = lxa.AMGX(rtol=1e-10)
    state = solver.init(op, {})
    _cpu.clear_cache()  # the token now names nothing
    b = _rhs(rng, a.shape[0])
    sol = lx.linear_solve(op, b, solver=solver, state=state)
    assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6
    assert _counts()["setups"] == 2


def test_isolated_mode_and_eviction(rng, fresh_cache):
    a, op = _poisson_op()
    b = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)
    _cpu.set_cache_size(0)
    for _ in range(2):
        lx.linear_solve(op, b, solver=solver)
    info = _cpu.cache_info()
    assert info["isolated"] and info["size"] == 0 and info["setups"] == 2
    _cpu.set_cache_size(1)
    lx.linear_solve(op, b, solver=solver)
    lx.linear_solve(op, b, solver=lxa.AMGX("FGMRES_AGGREGATION", rtol=1e-10))
    info = _cpu.cache_info()
    assert info["size"] == 1 and info["evictions"] == 1
    with pytest.raises(ValueError, match=">= 0"):
        _cpu.set_cache_size(-1)


def test_concurrent_solves_from_threads(rng, fresh_cache):
    a, op = _poisson_op()
    solver = lxa.AMGX(rtol=1e-10)
    f = jax.jit(lambda v, b: lx.linear_solve(op.with_values(v), b, solver=solver).value)
    bs = [_rhs(rng, a.shape[0]) for _ in range(8)]
    f(op.values, bs[0]).block_until_ready()  # compile once
    _cpu.reset_counters()
    out = [None] * len(bs)

    def work(i):
        out[i] = np.asarray(f(op.values, bs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, b in zip(out, bs):
        assert h.rel_err(x, h.reference(a, b)) < 1e-6
    c = _counts()
    assert c["solves"] == 8 and c["setups"] == 0 and c["resetups"] == 0


# ---- configurations ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(lxa.configs))
def test_every_preset_solves_poisson(name, rng):
    a, op = _poisson_op(24)
    b = _rhs(rng, a.shape[0])
    # AMG_VCYCLE is one V-cycle (a preconditioner preset): give it room to iterate.
    solver = lxa.AMGX(name, rtol=1e-9, max_steps=500)
    sol = lx.linear_solve(op, b, solver=solver)
    assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6
    assert h.true_residual(a, sol.value, b) <= 1e-9 * float(jnp.linalg.norm(b))


def test_vcycle_preset_reports_max_steps(rng):
    a, op = _poisson_op(24)
    b = _rhs(rng, a.shape[0])
    sol = lx.linear_solve(
        op, b, solver=lxa.AMGX("AMG_VCYCLE", rtol=1e-9), throw=False
    )
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 1


def _user_config(**amg):
    return {
        "config_version": 2,
        "solver": {
            "solver": "PBICGSTAB",
            "max_iters": 200,
            "convergence": "RELATIVE_INI_CORE",
            "tolerance": 1e-10,
            "preconditioner": {
                "solver": "AMG",
                "algorithm": "CLASSICAL",
                "selector": "PMIS",
                "cycle": "W",
                "presweeps": 1,
                "postsweeps": 2,
                "max_iters": 1,
                "smoother": {"solver": "MULTICOLOR_GS", "symmetric_GS": 1},
                **amg,
            },
        },
    }


@pytest.mark.parametrize("as_json", [False, True])
def test_user_config_dict_and_json(as_json, rng):
    a = h.convection_diffusion2d(24)
    op = lxa.CSROperator.from_scipy(a)
    b = _rhs(rng, a.shape[0])
    cfg = _user_config()
    cfg = json.dumps(cfg) if as_json else cfg
    # no rtol/atol: the config's own criterion (relative to the initial residual)
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(cfg))
    assert h.true_residual(a, sol.value, b) <= 1e-10 * float(jnp.linalg.norm(b))
    assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6


def test_native_relative_criterion_uses_initial_residual(rng):
    a, op = _poisson_op(24)
    b = _rhs(rng, a.shape[0])
    x0 = jnp.asarray(h.reference(a, b)) + 1e-3 * _rhs(rng, a.shape[0])
    r0 = h.true_residual(a, x0, b)
    cfg = _user_config()
    cfg["solver"]["tolerance"] = 1e-4
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(cfg), options={"y0": x0})
    resid = h.true_residual(a, sol.value, b)
    assert resid <= 1e-4 * r0
    assert resid > 1e-10 * float(jnp.linalg.norm(b))  # relative to r0, not to ||b||
    # ABSOLUTE
    cfg["solver"].update(convergence="ABSOLUTE", tolerance=1e-7)
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(cfg))
    assert h.true_residual(a, sol.value, b) <= 1e-7


@pytest.mark.parametrize("norm", ["L1", "LMAX", "L1_SCALED"])
def test_native_norms(norm, rng):
    a = h.convection_diffusion2d(16)
    op = lxa.CSROperator.from_scipy(a)
    b = _rhs(rng, a.shape[0])
    cfg = _user_config()
    cfg["solver"].update(convergence="ABSOLUTE", tolerance=1e-6, norm=norm)
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(cfg))
    r = np.asarray(b) - a @ np.asarray(sol.value)
    value = {"L1": np.abs(r).sum(), "LMAX": np.abs(r).max(),
             "L1_SCALED": np.abs(r).mean()}[norm]
    assert value <= 1e-6


def test_unsupported_key_warns_once(rng):
    a, op = _poisson_op(12)
    b = _rhs(rng, a.shape[0])
    cfg = _user_config(interp_max_elements=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lx.linear_solve(op, b, solver=lxa.AMGX(cfg, rtol=1e-8))
        cfg["solver"]["max_iters"] = 150  # another config, same key and value
        lx.linear_solve(op, b, solver=lxa.AMGX(cfg, rtol=1e-8))
    hits = [
        w for w in caught
        if issubclass(w.category, _cpu.PyamgTranslationWarning)
        and "interp_max_elements" in str(w.message)
    ]
    assert len(hits) == 1
    assert "no pyamg equivalent" in str(hits[0].message)


def test_dilu_smoother_warns():
    cfg = _key_config("FGMRES_AGGREGATION").replace('"postsweeps": 3',
                                                   '"postsweeps": 4')
    _warnings.forget(("smoother", '"MULTICOLOR_DILU"'))
    with pytest.warns(_cpu.PyamgTranslationWarning, match="MULTICOLOR_DILU"):
        plan = _translate.translate(cfg)
    assert plan.method == "fgmres" and plan.precond.presmoother.kind == "gauss_seidel"


def test_unsupported_solver_raises(rng):
    a, op = _poisson_op(12)
    b = _rhs(rng, a.shape[0])
    cfg = {"config_version": 2, "solver": {"solver": "ARNOLDI", "max_iters": 10}}
    with pytest.raises(ValueError, match="ARNOLDI.*eigensolver"):
        lx.linear_solve(op, b, solver=lxa.AMGX(cfg, rtol=1e-8))
    cfg = _user_config()
    cfg["solver"]["preconditioner"] = {"solver": "PCG", "max_iters": 2}
    with pytest.raises(ValueError, match="Krylov method"):
        lx.linear_solve(op, b, solver=lxa.AMGX(cfg, rtol=1e-8))


@pytest.mark.parametrize(
    "outer,smoother",
    [("CG", "BLOCK_JACOBI"), ("FGMRES", "CHEBYSHEV_POLY"), ("GMRES", "JACOBI_L1"),
     ("BICGSTAB", "GS"), ("AMG", "MULTICOLOR_GS"), ("BLOCK_JACOBI", None)],
)
def test_config_variants(outer, smoother, rng):
    a, op = _poisson_op(16)
    b = _rhs(rng, a.shape[0])
    scope = {"solver": outer, "max_iters": 5000, "gmres_n_restart": 10}
    if smoother is not None:
        amg = {"solver": "AMG", "algorithm": "AGGREGATION", "cycle": "F",
               "max_levels": 3, "min_coarse_rows": 8,
               "smoother": {"solver": smoother, "relaxation_factor": 0.7}}
        if outer == "AMG":
            scope.update({k: v for k, v in amg.items() if k != "solver"})
        else:
            scope["preconditioner"] = amg
    else:
        scope["relaxation_factor"] = 0.9
        a = a + 3.0 * h.sp.eye_array(a.shape[0])  # make Jacobi converge fast
        op = lxa.CSROperator.from_scipy(h.sp.csr_array(a), tags=h.SPD)
    cfg = {"config_version": 2, "solver": scope}
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(cfg, rtol=1e-10))
    assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6


# ---- tolerances, warm starts, precisions, failures --------------------------------


@pytest.mark.parametrize("rtol,atol", [(1e-6, 0.0), (0.0, 1e-5), (1e-4, 1e-3)])
def test_rtol_atol_semantics(rtol, atol, rng):
    a = h.convection_diffusion2d(24)
    op = lxa.CSROperator.from_scipy(a)
    b = _rhs(rng, a.shape[0]) * 10.0
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=rtol, atol=atol))
    bound = atol + rtol * float(jnp.linalg.norm(b))
    resid = h.true_residual(a, sol.value, b)
    assert resid <= bound * (1 + 1e-9)
    np.testing.assert_allclose(float(sol.stats["residual_norm"]), resid, rtol=1e-3)


def test_warm_start_needs_fewer_iterations(rng):
    a, op = _poisson_op(48)
    b = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)
    cold = lx.linear_solve(op, b, solver=solver)
    near = jnp.asarray(h.reference(a, b)) * (1 + 1e-6 * _rhs(rng, a.shape[0]))
    warm = lx.linear_solve(op, b, solver=solver, options={"y0": near})
    assert int(warm.stats["num_steps"]) < int(cold.stats["num_steps"])
    assert h.rel_err(warm.value, h.reference(a, b)) < 1e-6


def test_single_precision_dffi(rng):
    a = h.poisson2d(24)
    op = lxa.CSROperator.from_scipy(a, tags=h.SPD, dtype=np.float32)
    b = _rhs(rng, a.shape[0], np.float32)
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-5))
    assert sol.value.dtype == jnp.float32
    assert sol.stats["residual_norm"].dtype == jnp.float32
    assert h.rel_err(sol.value, h.reference(a, b)) < 1e-3


def test_mixed_precision_ddfi(rng):
    a = h.poisson2d(24)
    op = lxa.CSROperator.from_scipy(a, tags=h.SPD)
    b = _rhs(rng, a.shape[0])
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10, precision="mixed"))
    assert sol.value.dtype == jnp.float64
    # float64 vectors against the float32-rounded matrix
    a32 = h.sp.csr_array(a.astype(np.float32))
    assert h.rel_err(sol.value, h.reference(a32, b)) < 1e-8


def test_not_converged_and_nonfinite(rng):
    a, op = _poisson_op(24)
    b = _rhs(rng, a.shape[0])
    sol = lx.linear_solve(
        op, b, solver=lxa.AMGX(rtol=1e-12, max_steps=2), throw=False
    )
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 2
    bad = b.at[3].set(jnp.nan)
    sol = lx.linear_solve(op, bad, solver=lxa.AMGX(rtol=1e-8), throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    assert int(sol.stats["num_steps"]) == 0
