"""AMGXPreconditioner / AMGXPreconditioned on the CPU (pyamg backend).

Every solve is checked against a direct scipy (or dense float64) solution; the
iteration counts with and without the preconditioner are printed per problem
(`pytest -s`) and compared by a factor.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from helpers import (
    anisotropic2d,
    convection_diffusion2d,
    poisson2d,
    rel_err,
    rel_residual,
)

import lineax_amgx as lxa
from lineax_amgx._preconditioner import AMGXPreconditioned, AMGXPreconditioner

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
N = 40  # grid side: 1600 unknowns

PROBLEMS = {
    "poisson2d": (lambda: poisson2d(N), SPD),
    "anisotropic2d": (lambda: anisotropic2d(N), SPD),
    "convdiff2d": (lambda: convection_diffusion2d(N), ()),
}
# Minimum ratio (unpreconditioned work / preconditioned work), in operator
# applications; the measured ratios are printed. (CG needs an SPD problem; GMRES
# on the anisotropic problem is left out only to keep the file fast: each pair
# of solves is two compilations.)
FACTOR = {
    ("poisson2d", "CG"): 8,
    ("poisson2d", "GMRES"): 8,
    ("poisson2d", "BiCGStab"): 6,
    ("anisotropic2d", "CG"): 4,
    ("anisotropic2d", "BiCGStab"): 4,
    ("convdiff2d", "GMRES"): 3,
    ("convdiff2d", "BiCGStab"): 4,
}
RESTART = 10


def _solvers():
    return {
        "CG": lx.CG(rtol=1e-10, atol=1e-10, max_steps=5000),
        "GMRES": lx.GMRES(rtol=1e-10, atol=1e-10, restart=RESTART, max_steps=2000),
        "BiCGStab": lx.BiCGStab(rtol=1e-10, atol=1e-10, max_steps=5000),
    }


def _work(name, sol) -> int:
    """Operator applications: lx.GMRES counts restart cycles as its steps."""
    steps = int(sol.stats["num_steps"])
    return steps * RESTART if name == "GMRES" else steps


def counts():
    info = lxa.cache_info("pyamg")
    return {k: info[k] for k in ("setups", "resetups", "solves", "compares", "size")}


@pytest.fixture(autouse=True)
def fresh_cache():
    lxa.set_cache_size(8)
    lxa.clear_cache()
    lxa.reset_counters()
    yield
    lxa.clear_cache()


@pytest.fixture(scope="module")
def problems():
    rng = np.random.default_rng(11)
    out = {}
    for name, (make, tags) in PROBLEMS.items():
        a = make()
        b = rng.standard_normal(a.shape[0])
        out[name] = (a, tags, b, spla.spsolve(a.tocsc(), b))
    return out


@eqx.filter_jit
def _solve(solver, operator, b, preconditioner):
    options = {} if preconditioner is None else {"preconditioner": preconditioner}
    return lx.linear_solve(operator, b, solver, options=options, throw=False)


# ---------------------------------------------------------------------------
# Convergence with Lineax's Krylov solvers.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_krylov_solvers_converge_much_faster(name, problems):
    a, tags, b, ref = problems[name]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    P = AMGXPreconditioner(op)
    assert counts()["setups"] == 1
    assert lx.is_positive_semidefinite(P) == bool(tags)
    lines = []
    for sname, solver in _solvers().items():
        if (name, sname) not in FACTOR:
            continue
        plain = _solve(solver, op, jnp.asarray(b), None)
        lxa.reset_counters()
        pre = _solve(solver, op, jnp.asarray(b), P)
        c = counts()
        assert pre.result == lx.RESULTS.successful, (name, sname)
        assert rel_err(pre.value, ref) < 1e-8, (name, sname)
        assert rel_residual(a, pre.value, b) < 1e-9
        # one setup per operator (made when P was built), only solves after it
        assert (c["setups"], c["resetups"], c["compares"]) == (0, 0, 0), c
        assert c["solves"] >= int(pre.stats["num_steps"]) > 0
        w_plain, w_pre = _work(sname, plain), _work(sname, pre)
        lines.append(
            f"{name:14s} {sname:9s} unpreconditioned {w_plain:5d} "
            f"(result {plain.result}), AMG-preconditioned {w_pre:4d}, "
            f"ratio {w_plain / w_pre:.1f}; {c['solves']} cycles"
        )
        assert w_plain >= FACTOR[name, sname] * w_pre, lines[-1]
        if plain.result == lx.RESULTS.successful:
            assert rel_err(plain.value, ref) < 1e-7
    print("\n" + "\n".join(lines))


def test_cg_applies_one_cycle_per_iteration(problems):
    a, tags, b, ref = problems["poisson2d"]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    P = AMGXPreconditioner(op)
    lxa.reset_counters()
    sol = _solve(_solvers()["CG"], op, jnp.asarray(b), P)
    steps = int(sol.stats["num_steps"])
    # lx.CG applies the preconditioner once to r0 and once per iteration
    assert counts()["solves"] == steps + 1
    assert counts()["setups"] == 0
    assert rel_err(sol.value, ref) < 1e-8


# ---------------------------------------------------------------------------
# The operator itself: a fixed, linear, symmetric (when it should be) cycle.
# ---------------------------------------------------------------------------


def test_symmetric_cycle_is_spd_and_its_own_transpose():
    a = poisson2d(12)
    P = AMGXPreconditioner(lxa.CSROperator.from_scipy(a, tags=SPD))
    assert lx.is_symmetric(P) and lx.is_positive_semidefinite(P)
    assert P.transpose() is P
    M = np.asarray(P.as_matrix())
    assert np.abs(M - M.T).max() <= 1e-12 * np.abs(M).max()
    eig = np.linalg.eigvalsh((M + M.T) / 2)
    assert eig.min() > 0
    # a good preconditioner: M A is well conditioned (A alone: ~60)
    ev = np.linalg.eigvals(M @ a.toarray()).real
    assert ev.max() / ev.min() < 3.0, ev
    assert np.linalg.cond(a.toarray()) > 50


def test_cycle_is_linear_and_exact_cycle_count(rng):
    a = poisson2d(20)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    P1 = AMGXPreconditioner(op)
    P2 = AMGXPreconditioner(op, cycles=2)
    r = jnp.asarray(rng.standard_normal(a.shape[0]))
    s = jnp.asarray(rng.standard_normal(a.shape[0]))
    x = P1.mv(r)
    # linear, at any scale: no convergence test cuts the cycle short
    assert rel_err(P1.mv(1.7 * r - 0.3 * s), 1.7 * x - 0.3 * P1.mv(s)) < 1e-12
    assert rel_err(P1.mv(1e-30 * r) * 1e30, x) < 1e-12
    assert rel_err(P1.mv(1e30 * r) * 1e-30, x) < 1e-12
    # two cycles are two steps of the stationary iteration x <- x + M (r - A x).
    # (P2 is its own setup, and pyamg estimates the spectral radius that smooths
    # its prolongation from a random start: the hierarchies differ by ~1e-5.)
    x2 = x + P1.mv(r - op.mv(x))
    assert rel_err(P2.mv(r), x2) < 1e-3
    assert rel_err(P2.mv(r), x) > 1e-2
    # and a cycle reduces the error of A x = r
    ref = spla.spsolve(a.tocsc(), np.asarray(r))
    assert rel_err(x2, ref) < rel_err(x, ref) < 0.5
    assert float(jnp.abs(P1.mv(jnp.zeros_like(r))).max()) == 0.0


def test_nonfinite_input_gives_nan(rng):
    a = convection_diffusion2d(10)
    P = AMGXPreconditioner(lxa.CSROperator.from_scipy(a))
    r = rng.standard_normal(a.shape[0])
    for bad in (np.nan, np.inf):
        rb = r.copy()
        rb[7] = bad
        out = np.asarray(P.mv(jnp.asarray(rb)))
        assert np.all(np.isnan(out)), bad
    assert np.all(np.isfinite(np.asarray(P.mv(jnp.asarray(r)))))


def test_nonsymmetric_transpose_preconditions_the_transpose(rng):
    a = convection_diffusion2d(30)
    op = lxa.CSROperator.from_scipy(a)
    P = AMGXPreconditioner(op)
    assert not lx.is_symmetric(P) and not lx.is_positive_semidefinite(P)
    lxa.reset_counters()
    Pt = P.transpose()
    assert Pt is not P and Pt.key.transposed and not P.key.transposed
    assert counts()["setups"] == 1  # its own setup (its own cache entry)
    b = rng.standard_normal(a.shape[0])
    ref = spla.spsolve(sp.csc_array(a.T), b)
    solver = lx.BiCGStab(rtol=1e-10, atol=1e-10, max_steps=500)
    lxa.reset_counters()
    sol = _solve(solver, op.transpose(), jnp.asarray(b), Pt)
    assert rel_err(sol.value, ref) < 1e-8
    assert int(sol.stats["num_steps"]) <= 12
    c = counts()
    assert (c["setups"], c["resetups"]) == (0, 0), c
    # transposing back finds the original setup: no new one
    lxa.reset_counters()
    Ptt = Pt.transpose()
    assert counts()["setups"] == 0 and counts()["resetups"] == 0
    assert rel_err(Ptt.mv(jnp.asarray(b)), P.mv(jnp.asarray(b))) < 1e-12


def test_lineax_queries():
    a = poisson2d(8)
    P = AMGXPreconditioner(lxa.CSROperator.from_scipy(a, tags=SPD))
    assert lx.linearise(P) is P
    assert lx.materialise(P) is P
    assert lx.conj(P) is P
    for query in (lx.is_diagonal, lx.is_tridiagonal, lx.has_unit_diagonal,
                  lx.is_lower_triangular, lx.is_upper_triangular,
                  lx.is_negative_semidefinite):
        assert query(P) is False
    with pytest.raises(NotImplementedError, match="diagonal"):
        lx.diagonal(P)
    with pytest.raises(NotImplementedError, match="tridiagonal"):
        lx.tridiagonal(P)
    assert P.in_structure() == jax.ShapeDtypeStruct((64,), jnp.float64)
    assert P.out_structure() == P.in_structure()


# ---------------------------------------------------------------------------
# Tags: the PSD refusal.
# ---------------------------------------------------------------------------


def _config_with(**amg):
    cfg = lxa.configs["AMG_VCYCLE"]
    cfg["solver"].update(amg)
    return cfg


@pytest.mark.parametrize(
    "config, why",
    [
        (_config_with(smoother={"scope": "gs", "solver": "MULTICOLOR_GS"}),
         "smoother 'MULTICOLOR_GS' is not symmetric"),
        (_config_with(presweeps=1, postsweeps=2), "presweeps=1 != postsweeps=2"),
        ("FGMRES_AGGREGATION", "not a fixed symmetric operator"),
    ],
)
def test_psd_tag_refused_for_nonsymmetric_cycles(config, why):
    op = lxa.CSROperator.from_scipy(poisson2d(10), tags=SPD)
    with pytest.raises(ValueError, match="cannot be tagged") as e:
        AMGXPreconditioner(op, config, tags=lx.positive_semidefinite_tag)
    assert why in str(e.value)
    # untagged it is built, but not tagged, so lx.CG refuses it ...
    P = AMGXPreconditioner(op, config)
    assert not lx.is_positive_semidefinite(P) and not lx.is_symmetric(P)
    b = jnp.asarray(np.random.default_rng(0).standard_normal(100))
    with pytest.raises(ValueError, match="positive definite"):
        lx.linear_solve(op, b, lx.CG(rtol=1e-8, atol=1e-8),
                        options={"preconditioner": P})
    # ... and the wrapper says why before solving
    with pytest.raises(ValueError, match="lx.CG needs a symmetric positive"):
        lx.linear_solve(op, b, AMGXPreconditioned(lx.CG(rtol=1e-8, atol=1e-8), config))


def test_tags_given_by_the_user(rng):
    a = poisson2d(16)
    untagged = lxa.CSROperator.from_scipy(a)
    assert not lx.is_positive_semidefinite(AMGXPreconditioner(untagged))
    P = AMGXPreconditioner(untagged, tags=lx.positive_semidefinite_tag)
    assert lx.is_positive_semidefinite(P) and lx.is_symmetric(P)
    b = rng.standard_normal(a.shape[0])
    sol = _solve(lx.CG(rtol=1e-10, atol=1e-10, max_steps=500),
                 lxa.CSROperator.from_scipy(a, tags=SPD), jnp.asarray(b), P)
    assert rel_err(sol.value, spla.spsolve(a.tocsc(), b)) < 1e-8
    with pytest.raises(ValueError, match="only"):
        AMGXPreconditioner(untagged, tags=lx.diagonal_tag)
    upper = lxa.CSROperator.from_scipy(sp.csr_array(sp.triu(a)) + 0 * sp.eye(256))
    with pytest.raises(ValueError, match=r"AMGXPreconditioner is tagged "
                       r"lx.symmetric_tag, but its values are not symmetric: "
                       r"the largest asymmetry is A\[\d+, \d+\] = -1 against "
                       r"A\[\d+, \d+\] = 0 \(not stored\)"):
        AMGXPreconditioner(upper, tags=lx.symmetric_tag)


def test_bad_arguments():
    op = lxa.CSROperator.from_scipy(poisson2d(6), tags=SPD)
    with pytest.raises(ValueError, match="cycles"):
        AMGXPreconditioner(op, cycles=0)
    with pytest.raises(ValueError, match="backend"):
        AMGXPreconditioner(op, backend="cuda")
    with pytest.raises(ValueError, match="precision"):
        AMGXPreconditioner(op, precision="half")
    with pytest.raises(lxa.ConfigError, match="preset"):
        AMGXPreconditioner(op, "AMG_VCYCEL")
    with pytest.raises(ValueError, match="square"):
        AMGXPreconditioner(lxa.CSROperator.from_scipy(sp.random(6, 4, 0.5, format="csr",
                                                                random_state=1)))
    with pytest.raises(ValueError, match="36 rows"):
        AMGXPreconditioner(op, structure=jax.ShapeDtypeStruct((5, 5), jnp.float64))
    with pytest.raises(TypeError, match="Lineax operator"):
        AMGXPreconditioner(np.eye(3))
    with pytest.raises(TypeError, match="Krylov"):
        AMGXPreconditioned(lxa.AMGX())
    with pytest.raises(TypeError, match="lagged_operator"):
        AMGXPreconditioned(lx.GMRES(rtol=1e-8, atol=1e-8), lagged_operator=3)
    P = AMGXPreconditioner(op)
    with pytest.raises(ValueError, match="expects"):
        P.mv(jnp.ones(35))


# ---------------------------------------------------------------------------
# jit, vmap, pytrees, float32, gradients.
# ---------------------------------------------------------------------------


def test_built_and_applied_under_jit(problems):
    a, tags, b, ref = problems["anisotropic2d"]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    solver = lx.CG(rtol=1e-10, atol=1e-10, max_steps=2000)

    @jax.jit
    def f(op, b):
        P = AMGXPreconditioner(op)
        return lx.linear_solve(op, b, solver, options={"preconditioner": P})

    sol = f(op, jnp.asarray(b))
    assert rel_err(sol.value, ref) < 1e-8
    c = counts()
    assert (c["setups"], c["resetups"]) == (1, 0), c
    # a second call with new values: a resetup, the answer follows the values
    lxa.reset_counters()
    sol2 = f(op.with_values(op.values * 2.0), jnp.asarray(b))
    assert rel_err(sol2.value, ref / 2) < 1e-8
    assert counts()["resetups"] == 1


def test_vmap_over_right_hand_sides(problems, rng):
    a, tags, _, _ = problems["convdiff2d"]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    P = AMGXPreconditioner(op)
    bs = rng.standard_normal((3, a.shape[0]))
    solver = lx.BiCGStab(rtol=1e-10, atol=1e-10, max_steps=500)
    lxa.reset_counters()
    xs = jax.jit(jax.vmap(
        lambda b: lx.linear_solve(op, b, solver, options={"preconditioner": P}).value
    ))(jnp.asarray(bs))
    c = counts()
    assert (c["setups"], c["resetups"], c["compares"]) == (0, 0, 0), c
    assert c["solves"] > 0 and c["solves"] % 3 == 0
    lu = spla.splu(a.tocsc())
    for i in range(3):
        assert rel_err(xs[i], lu.solve(bs[i])) < 1e-8
    # vmap of the operator itself: one cycle per member
    rs = jnp.asarray(rng.standard_normal((4, a.shape[0])))
    stacked = jax.vmap(P.mv)(rs)
    for i in range(4):
        assert rel_err(stacked[i], P.mv(rs[i])) < 1e-13


def test_pytree_structure(rng):
    n = 24
    a = poisson2d(n)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    grid = jax.ShapeDtypeStruct((n, n), jnp.float64)

    def stencil(u):  # the same 5-point Laplacian, matrix-free on the grid
        U = jnp.pad(u, 1)
        return 4 * u - U[:-2, 1:-1] - U[2:, 1:-1] - U[1:-1, :-2] - U[1:-1, 2:]

    A = lx.FunctionLinearOperator(stencil, grid, tags=SPD)
    P = AMGXPreconditioner(op, structure=grid)
    assert P.in_structure() == grid
    b = rng.standard_normal((n, n))
    sol = lx.linear_solve(A, jnp.asarray(b), lx.CG(rtol=1e-10, atol=1e-10),
                          options={"preconditioner": P})
    ref = spla.spsolve(a.tocsc(), b.reshape(-1)).reshape(n, n)
    assert rel_err(sol.value, ref) < 1e-8
    assert int(sol.stats["num_steps"]) < 20


def test_float32(rng):
    a = poisson2d(32)
    op = lxa.CSROperator.from_scipy(a, tags=SPD, dtype=np.float32)
    P = AMGXPreconditioner(op)
    assert P.key.mode == "dFFI"
    b = rng.standard_normal(a.shape[0]).astype(np.float32)
    sol = lx.linear_solve(op, jnp.asarray(b), lx.CG(rtol=1e-5, atol=1e-5),
                          options={"preconditioner": P})
    assert sol.value.dtype == jnp.float32
    assert rel_residual(a, sol.value, b) < 1e-4
    assert int(sol.stats["num_steps"]) < 15


def test_float32_cg_above_lineax_breakdown_threshold(rng):
    """Lineax's CG calls `|pᵀAp| <= 200 ε n |rᵀPr|` a breakdown (NaN): in float32
    at 99,856 unknowns a good preconditioner always trips it. AMGXPreconditioned
    hands CG the cycle scaled by a power of two, which CG's iterates ignore."""
    a = poisson2d(316)
    op = lxa.CSROperator.from_scipy(a, tags=SPD, dtype=np.float32)
    b = jnp.asarray(rng.standard_normal(a.shape[0]).astype(np.float32))
    cg = lx.CG(rtol=1e-5, atol=1e-5, max_steps=200)
    sol = lx.linear_solve(op, b, AMGXPreconditioned(cg), throw=False)
    assert sol.result == lx.RESULTS.successful
    assert sol.value.dtype == jnp.float32
    assert rel_residual(a, sol.value, b) < 1e-4
    assert int(sol.stats["num_steps"]) < 30
    # The same cycle unscaled, through options: the Lineax limitation itself
    # (if Lineax drops its test, this solve simply succeeds).
    P = AMGXPreconditioner(op)
    raw = lx.linear_solve(op, b, cg, options={"preconditioner": P}, throw=False)
    if raw.result == lx.RESULTS.successful:
        assert rel_residual(a, raw.value, b) < 1e-4
    else:
        assert not np.isfinite(np.asarray(raw.value)).all()


def test_mixed_precision_preconditioner_of_a_float64_solve(problems):
    a, tags, b, ref = problems["poisson2d"]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    P = AMGXPreconditioner(op, precision="mixed")
    assert P.key.mode == "dFFI" and P.values.dtype == jnp.float32
    assert P.in_structure().dtype == jnp.float64
    sol = _solve(lx.CG(rtol=1e-10, atol=1e-10, max_steps=500), op, jnp.asarray(b), P)
    assert rel_err(sol.value, ref) < 1e-8


def test_gradients_through_preconditioned_solves(rng):
    a = convection_diffusion2d(14)
    dense = a.toarray()
    op = lxa.CSROperator.from_scipy(a)
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    solver = lx.BiCGStab(rtol=1e-12, atol=1e-12, max_steps=200)

    def loss(values, b):
        o = op.with_values(values)
        P = AMGXPreconditioner(o)  # no gradient flows through the preconditioner
        return jnp.sum(lx.linear_solve(o, b, solver, options={"preconditioner": P})
                       .value ** 2)

    g_vals, g_b = jax.grad(loss, argnums=(0, 1))(op.values, b)
    x = np.linalg.solve(dense, np.asarray(b))
    lam = np.linalg.solve(dense.T, 2 * x)
    assert rel_err(g_b, lam) < 1e-8
    assert rel_err(g_vals, -lam[op.pattern.row_ids] * x[op.pattern.indices]) < 1e-8
    # the same through the wrapper (its transpose delegates to lx.BiCGStab's)
    wrapped = AMGXPreconditioned(solver)
    g_b2 = jax.grad(lambda b: jnp.sum(lx.linear_solve(op, b, wrapped).value ** 2))(b)
    assert rel_err(g_b2, lam) < 1e-8


def test_krylov_config_is_an_inner_solve(problems):
    a, tags, b, ref = problems["convdiff2d"]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    P = AMGXPreconditioner(op, "FGMRES_AGGREGATION")
    assert not P.fixed
    r = jnp.asarray(b)
    # an inner solve to the config's tolerance (1e-8 relative)
    assert rel_err(P.mv(r), ref) < 1e-6
    lxa.reset_counters()
    P.mv(2 * r).block_until_ready()
    c = counts()
    assert (c["setups"], c["resetups"], c["solves"]) == (0, 0, 1), c


# ---------------------------------------------------------------------------
# AMGXPreconditioned: the solver wrapper, and Optimistix.
# ---------------------------------------------------------------------------


def test_wrapper_in_linear_solve(problems):
    a, tags, b, ref = problems["convdiff2d"]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    inner = lx.BiCGStab(rtol=1e-10, atol=1e-10, max_steps=2000)
    solver = AMGXPreconditioned(inner)
    f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver))
    sol = f(op, jnp.asarray(b))
    assert rel_err(sol.value, ref) < 1e-8
    assert int(sol.stats["num_steps"]) <= 10
    assert counts()["setups"] == 1
    # a second solve with the same operator: init finds the setup, no new one
    lxa.reset_counters()
    sol = f(op, jnp.asarray(2 * b))
    assert rel_err(sol.value, 2 * ref) < 1e-8
    c = counts()
    assert (c["setups"], c["resetups"]) == (0, 0), c
    assert solver.assume_full_rank() == inner.assume_full_rank()
    with pytest.raises(ValueError, match="builds its own preconditioner"):
        lx.linear_solve(op, jnp.asarray(b), solver,
                        options={"preconditioner": lx.IdentityLinearOperator(
                            op.in_structure())})


def test_wrapper_with_cg_on_spd(problems):
    a, tags, b, ref = problems["poisson2d"]
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    solver = AMGXPreconditioned(lx.CG(rtol=1e-10, atol=1e-10, max_steps=500))
    sol = lx.linear_solve(op, jnp.asarray(b), solver)
    assert rel_err(sol.value, ref) < 1e-8
    assert int(sol.stats["num_steps"]) < 25


# The 2D Bratu problem -Δu = λ exp(u) on the unit square, u = 0 on the boundary,
# 5-point differences (scaled by h²): F(u) = L u - h² λ exp(u).
BRATU_N = 32


def _bratu(u, args):
    n = BRATU_N
    h = 1.0 / (n + 1)
    U = jnp.pad(u.reshape(n, n), 1)
    lap = (4 * U[1:-1, 1:-1] - U[:-2, 1:-1] - U[2:, 1:-1] - U[1:-1, :-2]
           - U[1:-1, 2:])
    return (lap - h * h * args * jnp.exp(U[1:-1, 1:-1])).reshape(-1)


def test_optimistix_newton_bratu(rng):
    n = BRATU_N
    lam = 1.0
    laplacian = lxa.CSROperator.from_scipy(poisson2d(n), tags=SPD)
    y0 = jnp.asarray(0.1 * rng.random(n * n))
    newton = lambda ls: optx.Newton(rtol=1e-8, atol=1e-8, linear_solver=ls)  # noqa: E731
    ref = optx.root_find(_bratu, newton(lx.AutoLinearSolver(well_posed=True)), y0,
                         args=lam, max_steps=30)
    # the Jacobian L - h² λ diag(exp u) stays matrix-free; the cycle is built on
    # the lagged (frozen) Laplacian: one setup for the whole Newton solve
    solver = AMGXPreconditioned(
        lx.GMRES(rtol=1e-10, atol=1e-10, restart=20, max_steps=100),
        lagged_operator=laplacian,
    )
    lxa.reset_counters()
    sol = optx.root_find(_bratu, newton(solver), y0, args=lam, max_steps=30)
    c = counts()
    assert (c["setups"], c["resetups"]) == (1, 0), c
    assert rel_err(sol.value, ref.value) < 1e-8
    assert float(jnp.abs(_bratu(sol.value, lam)).max()) < 1e-10
    assert float(ref.value.max()) > 0.05  # a non-trivial solution
    # each Newton step: one GMRES restart cycle (the cycles are cheap)
    assert c["solves"] <= 25 * (int(sol.stats["num_steps"]) + 1), c


def test_lagged_operator_callable_on_a_jacobian_operator(rng):
    n = 20
    h = 1.0 / (n + 1)
    lap = poisson2d(n)
    pattern_op = lxa.CSROperator.from_scipy(lap, tags=SPD)
    diag_pos = pattern_op.pattern.diagonal_positions

    def exact_jacobian(operator):  # L - h² exp(u): assembled from the Jacobian's x
        u = operator.x
        return pattern_op.with_values(
            pattern_op.values.at[diag_pos].add(-h * h * jnp.exp(u))
        )

    u = jnp.asarray(rng.random(n * n))
    J = lx.JacobianLinearOperator(
        lambda y, args: _bratu_n(y, n, args), u, args=1.0
    )
    b = rng.standard_normal(n * n)
    solver = AMGXPreconditioned(
        lx.BiCGStab(rtol=1e-10, atol=1e-10, max_steps=100),
        lagged_operator=exact_jacobian,
    )
    sol = lx.linear_solve(J, jnp.asarray(b), solver)
    dense = lap.toarray() - h * h * np.diag(np.exp(np.asarray(u)))
    assert rel_err(sol.value, np.linalg.solve(dense, b)) < 1e-8
    assert int(sol.stats["num_steps"]) < 15
    with pytest.raises(TypeError, match="must return a Lineax operator"):
        lx.linear_solve(J, jnp.asarray(b),
                        AMGXPreconditioned(lx.GMRES(rtol=1e-8, atol=1e-8),
                                           lagged_operator=lambda op: np.eye(3)))


def _bratu_n(u, n, lam):
    h = 1.0 / (n + 1)
    U = jnp.pad(u.reshape(n, n), 1)
    lap = (4 * U[1:-1, 1:-1] - U[:-2, 1:-1] - U[2:, 1:-1] - U[1:-1, :-2]
           - U[1:-1, 2:])
    return (lap - h * h * lam * jnp.exp(U[1:-1, 1:-1])).reshape(-1)


def test_matrix_free_operator_is_sparsified(rng):
    pytest.importorskip("lineax_amgx.matrix_free._sparsify")
    n = 16
    lap = poisson2d(n)
    u = jnp.asarray(rng.random(n * n))
    J = lx.JacobianLinearOperator(lambda y, args: _bratu_n(y, n, args), u, args=1.0)
    P = AMGXPreconditioner(J, tags=())
    b = rng.standard_normal(n * n)
    h = 1.0 / (n + 1)
    dense = lap.toarray() - h * h * np.diag(np.exp(np.asarray(u)))
    sol = lx.linear_solve(J, jnp.asarray(b), lx.BiCGStab(rtol=1e-10, atol=1e-10),
                          options={"preconditioner": P})
    assert rel_err(sol.value, np.linalg.solve(dense, b)) < 1e-8
    assert int(sol.stats["num_steps"]) <= 8


def test_public_names():
    assert lxa.AMGXPreconditioner is AMGXPreconditioner
    assert lxa.AMGXPreconditioned is AMGXPreconditioned
