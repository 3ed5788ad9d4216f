"""The bad-input catalogue (docs/guide/errors.md), on the CPU: every case gives a
specific Python exception or a documented `lx.RESULTS` code, never a crash or a silently
wrong answer, and the next valid solve in the same process still works."""

import json
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from helpers import poisson2d, rel_residual
from jax.experimental import sparse as jsparse

import lineax_amgx as lxa
from lineax_amgx._backends import router as _dispatch
from lineax_amgx._backends.amgx import _library
from lineax_amgx._backends.contract import Status

# Bad inputs make pyamg and numpy warn (indefinite CG, overflow, ill-conditioned
# GMRES); the assertions are on results and exceptions.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
R = lx.RESULTS
N = 8  # 8 x 8 Poisson: 64 unknowns


@pytest.fixture(autouse=True)
def fresh_cache():
    lxa.set_cache_size(8)
    lxa.clear_cache()
    lxa.reset_counters()
    yield
    lxa.clear_cache()


@pytest.fixture
def problem(rng):
    a = poisson2d(N)
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    return a, lxa.CSROperator.from_scipy(a, tags=SPD), b


@eqx.filter_jit
def solve_nothrow(op, b, solver, y0=None):
    options = {} if y0 is None else {"y0": y0}
    return lx.linear_solve(op, b, solver=solver, throw=False, options=options)


def assert_still_solves(a, op, b):
    """The next valid solve in the same process works (eager and jit)."""
    solver = lxa.AMGX(rtol=1e-10)
    x = lx.linear_solve(op, b, solver=solver).value
    assert rel_residual(a, x, b) < 1e-9
    sol = solve_nothrow(op, b, solver)
    assert sol.result == R.successful
    assert rel_residual(a, sol.value, b) < 1e-9
    info = lxa.cache_info("pyamg")
    assert 0 < info["size"] <= info["capacity"]


# ---------------------------------------------------------------------------
# Values: NaN / Inf, zero rows, singular matrices (RESULTS codes).
# ---------------------------------------------------------------------------


@jax.jit
def solve_throw(op, b, y0):
    return lx.linear_solve(op, b, solver=lxa.AMGX(), options={"y0": y0}).value


@pytest.mark.parametrize(
    "where, bad",
    [("values", np.nan), ("values", np.inf), ("b", np.nan), ("b", -np.inf),
     ("y0", np.nan)],
)
def test_nonfinite_input(where, bad, problem):
    a, op, b = problem
    y0 = jnp.zeros_like(b)
    if where == "values":
        bad_op, bad_b = op.with_values(op.values.at[7].set(bad)), b
    elif where == "b":
        bad_op, bad_b = op, b.at[3].set(bad)
    else:
        bad_op, bad_b, y0 = op, b, y0.at[5].set(bad)
    options = {"y0": y0} if where == "y0" else {}
    solver = lxa.AMGX()
    setups = lxa.cache_info("pyamg")["setups"]
    # eager, throw=False: the code, and no setup made from garbage values
    sol = lx.linear_solve(bad_op, bad_b, solver=solver, throw=False, options=options)
    assert sol.result == R.nonfinite_input
    if where == "values":
        assert lxa.cache_info("pyamg")["setups"] == setups
    # jit, throw=False
    assert solve_nothrow(bad_op, bad_b, solver, y0).result == R.nonfinite_input
    # throw=True raises, eager and under jax.jit
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        lx.linear_solve(bad_op, bad_b, solver=solver, options=options)
    with pytest.raises(jax.errors.JaxRuntimeError, match="non-finite"):
        solve_throw(bad_op, bad_b, y0).block_until_ready()
    assert_still_solves(a, op, b)


def test_zero_row_is_singular(problem):
    """A row whose stored values are all zero: `RESULTS.singular` (the backend is
    not called), eager and jit; throw=True raises."""
    a, op, b = problem
    p = op.pattern
    values = op.values.at[p.indptr[10] : p.indptr[11]].set(0.0)
    bad = op.with_values(values)
    assert solve_nothrow(bad, b, lxa.AMGX()).result == R.singular
    sol = lx.linear_solve(bad, b, solver=lxa.AMGX("AMG_AGGREGATION"), throw=False)
    assert sol.result == R.singular
    with pytest.raises(eqx.EquinoxRuntimeError, match="not well-posed"):
        lx.linear_solve(bad, b, solver=lxa.AMGX())
    # NaN elsewhere as well: non-finite input takes precedence.
    both = bad.with_values(values.at[0].set(jnp.nan))
    assert solve_nothrow(both, b, lxa.AMGX()).result == R.nonfinite_input
    assert_still_solves(a, op, b)


def test_zero_row_in_a_block_is_singular(rng):
    a = poisson2d(N)
    op = lxa.CSROperator.from_scipy(a, tags=SPD, block_size=2)
    p = op.pattern
    start, stop = p.indptr[4], p.indptr[5]
    values = op.values.at[start:stop, 1, :].set(0.0)  # scalar row 9
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    sol = lx.linear_solve(op.with_values(values), b, solver=lxa.AMGX(), throw=False)
    assert sol.result == R.singular
    x = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10)).value
    assert rel_residual(a, x, b) < 1e-9


@pytest.mark.parametrize("kind", ["row", "column"])
def test_structurally_empty_row_or_column(kind, problem):
    """No stored entry in a row (column): a static property of the pattern, so a
    ValueError at trace time."""
    a, op, b = problem
    m = a.tolil()
    if kind == "row":
        m[17, :] = 0
    else:
        m[:, 17] = 0
    m = sp.csr_array(m)
    m.eliminate_zeros()
    bad = lxa.CSROperator.from_scipy(m, tags=SPD)
    with pytest.raises(ValueError, match=f"structurally singular: {kind} 17"):
        lx.linear_solve(bad, b, solver=lxa.AMGX())
    with pytest.raises(ValueError, match="structurally singular"):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX()).value)(bad, b)
    assert_still_solves(a, op, b)


def neumann2d(n):
    """The pure-Neumann Laplacian: symmetric positive semidefinite, singular (the
    constants are its null space)."""
    a = poisson2d(n)
    return sp.csr_array(a - sp.diags_array(np.asarray(a.sum(axis=1)).ravel()))


CONFIGS = [None, "FGMRES_AGGREGATION", "AMG_AGGREGATION", "PCG_CLASSICAL"]


@pytest.mark.parametrize("config", CONFIGS)
def test_singular_matrix_is_flagged(config, rng):
    """An inconsistent singular system has no solution: never `successful`."""
    a = neumann2d(N)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    b = jnp.asarray(rng.standard_normal(a.shape[0]))  # not in the range of A
    solver = lxa.AMGX(config, max_steps=100)
    sol = lx.linear_solve(op, b, solver=solver, throw=False)
    assert sol.result in (R.max_steps_reached, R.breakdown, R.singular), sol.result
    with pytest.raises(eqx.EquinoxRuntimeError):
        lx.linear_solve(op, b, solver=solver)
    assert_still_solves(poisson2d(N), lxa.CSROperator.from_scipy(poisson2d(N),
                                                                 tags=SPD), b)


@pytest.mark.parametrize("config", CONFIGS)
def test_consistent_singular_system_never_wrong(config, rng):
    """`b` in the range of a singular A: solutions exist (not unique). Whatever
    the status, `successful` must come with a true residual within tolerance."""
    a = neumann2d(N)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    b = a @ rng.standard_normal(a.shape[0])
    sol = lx.linear_solve(op, jnp.asarray(b), solver=lxa.AMGX(config, rtol=1e-8,
                                                              max_steps=200),
                          throw=False)
    if sol.result == R.successful:
        assert rel_residual(a, sol.value, b) <= 1e-8 * 1.01
    else:
        assert sol.result in (R.max_steps_reached, R.breakdown, R.singular)


@pytest.mark.parametrize("claimed_x", ["wrong", "nan", "right"])
def test_success_claim_checked_against_true_residual(claimed_x, problem, monkeypatch):
    """A backend that reports success with a wrong (or NaN) answer is reported as
    a breakdown; a right answer stays successful."""
    a, op, b = problem
    ref = spla.spsolve(a.tocsc(), np.asarray(b))
    x_claim = {"wrong": ref + 1e-3, "nan": ref * np.nan, "right": ref}[claimed_x]

    def fake_solve(pattern, values, token, b_scaled, x0, key, near_nullspace=None,
                   ok=None):
        scale = jnp.linalg.norm(b) / jnp.linalg.norm(b_scaled)
        x = jnp.asarray(x_claim) / scale
        return x, jnp.array([Status.SUCCESS, 3], jnp.int32), 0.5 / scale

    solver = lxa.AMGX(rtol=1e-8)
    state = solver.init(op, {})
    monkeypatch.setattr(_dispatch, "solve", fake_solve)
    x, result, stats = solver.compute(state, b, {})
    assert int(stats["num_steps"]) == 3
    if claimed_x == "right":
        assert result == R.successful
        assert rel_residual(a, x, b) < 1e-10
    else:
        assert result == R.breakdown
    monkeypatch.undo()
    assert_still_solves(a, op, b)


def test_max_steps_reached(problem):
    a, op, b = problem
    solver = lxa.AMGX(rtol=1e-14, max_steps=1)
    sol = lx.linear_solve(op, b, solver=solver, throw=False)
    assert sol.result == R.max_steps_reached
    assert int(sol.stats["num_steps"]) == 1
    assert solve_nothrow(op, b, solver).result == R.max_steps_reached
    with pytest.raises(eqx.EquinoxRuntimeError, match="maximum number of solver steps"):
        lx.linear_solve(op, b, solver=solver)
    assert_still_solves(a, op, b)


@pytest.mark.parametrize("config", ["PCG_AGGREGATION", "AMG_AGGREGATION"])
def test_indefinite_matrix_breakdown_or_divergence(config, problem):
    """A symmetric indefinite matrix wrongly tagged positive definite: CG breaks
    down, plain AMG cycles diverge. Both are `RESULTS.breakdown`."""
    a, op, b = problem
    indefinite = sp.csr_array(a - 6.0 * sp.eye_array(a.shape[0]))
    bad = lxa.CSROperator.from_scipy(indefinite, tags=SPD)
    sol = lx.linear_solve(bad, b, solver=lxa.AMGX(config), throw=False)
    assert sol.result == R.breakdown
    with pytest.raises(eqx.EquinoxRuntimeError, match="breakdown"):
        lx.linear_solve(bad, b, solver=lxa.AMGX(config))
    assert_still_solves(a, op, b)


# ---------------------------------------------------------------------------
# Shapes and dtypes (Python exceptions at trace time).
# ---------------------------------------------------------------------------


def test_non_square_operator(rng):
    op = lxa.CSROperator.from_dense(rng.standard_normal((6, 5)))
    b = jnp.asarray(rng.standard_normal(6))
    with pytest.raises(ValueError, match="needs a square operator, got shape"):
        lx.linear_solve(op, b, solver=lxa.AMGX())
    with pytest.raises(ValueError, match="needs a square operator"):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX()).value)(op, b)


def test_empty_operator():
    op = lxa.CSROperator.from_arrays(np.zeros(1, np.int32), np.zeros(0, np.int32),
                                     jnp.zeros(0), (0, 0))
    with pytest.raises(ValueError, match=r"empty \(0 x 0\) operator"):
        lx.linear_solve(op, jnp.zeros(0), solver=lxa.AMGX())


def test_mismatched_shapes(problem):
    a, op, b = problem
    with pytest.raises(ValueError, match="structures do not match"):
        lx.linear_solve(op, b[:-1], solver=lxa.AMGX())
    solver = lxa.AMGX()
    state = solver.init(op, {})
    with pytest.raises(ValueError, match="right-hand side has 63 entries"):
        solver.compute(state, b[:-1], {})
    with pytest.raises(ValueError, match=r"options\['y0'\] has 65 entries"):
        lx.linear_solve(op, b, solver=solver, options={"y0": jnp.zeros(65)})
    assert_still_solves(a, op, b)


def test_rhs_dtypes(problem):
    a, op, b = problem
    with pytest.raises(ValueError, match="structures do not match"):
        lx.linear_solve(op, b.astype(jnp.complex128), solver=lxa.AMGX())
    with pytest.raises(ValueError, match="structures do not match"):
        lx.linear_solve(op, b.astype(jnp.float32), solver=lxa.AMGX())
    # An integer right-hand side is promoted to the operator's dtype.
    b_int = jnp.arange(a.shape[0]) % 5 - 2
    x = lx.linear_solve(op, b_int, solver=lxa.AMGX(rtol=1e-10)).value
    assert x.dtype == jnp.float64
    assert rel_residual(a, x, np.asarray(b_int, np.float64)) < 1e-9


def test_value_dtypes(rng):
    a = poisson2d(N)
    args = (a.indptr, a.indices)
    with pytest.raises(TypeError, match="must have a floating dtype"):
        lxa.CSROperator.from_arrays(*args, a.data.astype(np.int64), a.shape)
    with pytest.raises(TypeError, match="must be float32, float64, complex64 or "
                       "complex128, got float16"):
        lxa.CSROperator.from_arrays(*args, a.data.astype(np.float16), a.shape)
    # Complex values are kept complex by every constructor (tests/test_complex.py).
    op = lxa.CSROperator.from_arrays(*args, a.data.astype(np.complex128), a.shape)
    assert op.values.dtype == jnp.complex128
    assert lxa.CSROperator.from_scipy(a.astype(np.complex64)).values.dtype == (
        jnp.complex64
    )
    for op in (
        lxa.CSROperator.from_dense(a.toarray() * (1 + 1j)),
        lxa.CSROperator.from_bcoo(jsparse.BCOO.fromdense(a.toarray() * (1 + 1j))),
    ):
        assert op.values.dtype == jnp.complex128
        np.testing.assert_array_equal(op.values.imag, op.values.real)
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        lxa.CSROperator.from_arrays(a.indptr, a.indices.astype(float), a.data, a.shape)
    # Integer scipy/dense input is documented to become floating point.
    op = lxa.CSROperator.from_scipy(sp.csr_array(a, dtype=np.int64))
    assert op.values.dtype == jnp.float64


# ---------------------------------------------------------------------------
# CSR structure.
# ---------------------------------------------------------------------------


def test_unsorted_and_duplicate_indices():
    a = poisson2d(N)
    unsorted = a.indices.copy()
    unsorted[[0, 1]] = unsorted[[1, 0]]
    with pytest.raises(ValueError, match="row 0 has unsorted column indices"):
        lxa.CSROperator.from_arrays(a.indptr, unsorted, a.data, a.shape)
    dup = a.indices.copy()
    dup[a.indptr[5] + 1] = dup[a.indptr[5]]
    with pytest.raises(ValueError, match="row 5 has duplicate column indices"):
        lxa.CSROperator.from_arrays(a.indptr, dup, a.data, a.shape)
    # sum_duplicates=True canonicalises (as scipy does), without touching the
    # caller's arrays.
    indptr, data = a.indptr.copy(), a.data.copy()
    snapshot = (indptr.copy(), dup.copy(), data.copy())
    op = lxa.CSROperator.from_arrays(indptr, dup, data, a.shape, sum_duplicates=True)
    ref = sp.csr_array((data, dup, indptr), shape=a.shape).toarray()
    np.testing.assert_allclose(np.asarray(op.as_matrix()), ref)
    for before, after in zip(snapshot, (indptr, dup, data)):
        np.testing.assert_array_equal(before, after)
        assert after.flags.writeable


def test_operators_do_not_freeze_or_alias_caller_arrays():
    a = poisson2d(N)
    indptr, indices = a.indptr.astype(np.int32), a.indices.astype(np.int32)
    op = lxa.CSROperator.from_arrays(indptr, indices, a.data, a.shape)
    lxa.CSROperator.from_scipy(a)
    assert indptr.flags.writeable and indices.flags.writeable
    assert a.indptr.flags.writeable and a.indices.flags.writeable
    indices[0] = 3  # the operator keeps its own copy
    assert op.pattern.indices[0] == a.indices[0] != 3


@pytest.mark.parametrize("bad", [-1, 64])
def test_indices_out_of_range(bad):
    a = poisson2d(N)
    indices = a.indices.copy()
    indices[-1] = bad
    for sum_duplicates in (False, True):
        with pytest.raises(ValueError, match=r"Column indices out of range \[0, 64\)"):
            lxa.CSROperator.from_arrays(a.indptr, indices, a.data, a.shape,
                                        sum_duplicates=sum_duplicates)


def test_malformed_indptr_and_values():
    a = poisson2d(N)
    with pytest.raises(ValueError, match="indptr has length 64, expected 65"):
        lxa.CSROperator.from_arrays(a.indptr[:-1], a.indices, a.data, a.shape)
    shifted = a.indptr + 1
    with pytest.raises(ValueError, match="indptr\\[0\\] must be 0"):
        lxa.CSROperator.from_arrays(shifted, a.indices, a.data, a.shape)
    decreasing = a.indptr.copy()
    decreasing[3] = decreasing[5]
    with pytest.raises(ValueError, match="non-decreasing"):
        lxa.CSROperator.from_arrays(decreasing, a.indices, a.data, a.shape)
    with pytest.raises(ValueError, match="indices has length"):
        lxa.CSROperator.from_arrays(a.indptr, a.indices[:-1], a.data, a.shape)
    with pytest.raises(ValueError, match=r"values has shape \(287,\), expected"):
        lxa.CSROperator.from_arrays(a.indptr, a.indices, a.data[:-1], a.shape)
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        lxa.SparsityPattern(np.zeros(1), np.zeros(0), (3, 3), block_size=2)


def test_sizes_beyond_int32_rejected_before_allocation():
    """Declared sizes are checked first: nothing of that size is allocated (these
    would need > 16 GiB otherwise)."""
    big = 2**31
    with pytest.raises(ValueError, match="exceeds the int32 index range"):
        lxa.SparsityPattern(np.zeros(1, np.int64), np.zeros(0, np.int64),
                            (big, big), check=False)
    with pytest.raises(ValueError, match="exceeds the int32 index range"):
        lxa.SparsityPattern(np.zeros(1, np.int64), np.zeros(0, np.int64), (big, big))
    with pytest.raises(ValueError, match="nnz=2147483648 exceeds the int32"):
        lxa.SparsityPattern(np.array([0, 1, big]), np.zeros(2, np.int64), (2, 2),
                            check=False)
    with pytest.raises(ValueError, match="nnz=2147483648 exceeds the int32"):
        lxa.SparsityPattern(np.array([0, 1, big]), np.zeros(2, np.int64), (2, 2))
    # Converters check the declared shape before converting (huge columns only: a
    # broken check would fail here rather than exhaust memory).
    coo = sp.coo_array((np.ones(2), (np.array([0, 1]), np.array([0, big - 1]))),
                       shape=(2, big))
    with pytest.raises(ValueError, match="exceeds the int32 index range"):
        lxa.CSROperator.from_scipy(coo)
    bcoo = jsparse.BCOO((jnp.ones(2), jnp.array([[0, 0], [1, 5]])), shape=(2, big))
    with pytest.raises(ValueError, match="exceeds the int32 index range"):
        lxa.CSROperator.from_bcoo(bcoo)
    with pytest.raises(ValueError, match="exceeds the int32 index range"):
        lxa.CSROperator.from_arrays(np.zeros(3, np.int32), np.zeros(0, np.int32),
                                    jnp.zeros(0), (2, big))


# ---------------------------------------------------------------------------
# Configurations and solver options (Python exceptions at construction / trace).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"config_version": 2, "solver": {"solver": "PCG", "max_iter": 5}},
         "Unknown AmgX config key 'max_iter' at 'solver.max_iter'. Did you mean "
         "'max_iters'?"),
        ({"config_version": 2, "solver": {"solver": "PCGG"}},
         "Unknown AmgX solver 'PCGG' at 'solver.solver'. Did you mean 'PCG'?"),
        ({"config_version": 2, "solver": {"solver": "PCG", "preconditioner":
                                          {"solver": "AMG", "algorithm": "CLASIC"}}},
         "Invalid value 'CLASIC' for 'solver.preconditioner.algorithm'"),
        ("PCG_AGGREGATON", "Unknown AmgX preset 'PCG_AGGREGATON'.*Did you mean "
         "'PCG_AGGREGATION'"),
        ('{"config_version": 2, "solver": {"solver": "PCG",', "not valid JSON"),
        ('{"config_version": 3, "solver": "PCG"}', "config_version 2"),
        ({"config_version": 2}, "needs an outer 'solver' entry"),
        (42, "must be a preset name, a JSON string or a dict"),
        ({"config_version": 2, "solver": {"solver": "PCG", "max_iters": "abc"}},
         "'solver.max_iters' must be an integer .* got 'abc'"),
        ({"config_version": 2, "solver": {"solver": "PCG", "tolerance": "1e-8"}},
         "'solver.tolerance' must be a number .* got '1e-8'"),
        ({"config_version": 2, "solver": {"solver": "PCG", "tolerance": -1e-8}},
         "'solver.tolerance' must be >= 0"),
        ("pcg_aggregation", "Unknown AmgX preset 'pcg_aggregation'.*Did you mean "
         "'PCG_AGGREGATION'"),
        ({"config_version": 2, "solver": {"solver": "pcg"}},
         "Unknown AmgX solver 'pcg' at 'solver.solver'. Did you mean 'PCG'?"),
        ({"config_version": 2, "communicator": "MPI_DIRECT", "solver": "PCG"},
         "'communicator' is a setting of AmgX's resources.*MPI_DIRECT' needs a "
         "CUDA-aware MPI"),
        ({"config_version": 2, "solver": {"solver": "PCG",
                                          "device_mem_pool_size": 1 << 20}},
         "'solver.device_mem_pool_size': 'device_mem_pool_size' is a setting of "
         "AmgX's resources"),
    ],
)
def test_bad_config(config, message):
    with pytest.raises(lxa.ConfigError, match=message):
        lxa.AMGX(config)
    assert issubclass(lxa.ConfigError, ValueError)


def test_dense_lu_coarse_solver_is_capped():
    """AmgX's dense LU overflows 32-bit indices on a coarsest level above 46,340
    rows (a stalled coarsening): every AMG scope gets a cap, an overflowing cap is
    refused, and other coarse solvers are left alone."""
    from lineax_amgx import _config

    for name in lxa.configs:
        final = json.loads(_config.finalise(
            _config.parse_config(name), tolerance_mode="native", max_steps=None,
            verbose=False))
        amg = [s for s in _config._walk_solvers(final["solver"])
               if s.get("solver") == "AMG"]
        assert amg, name
        for scope in amg:
            if scope.get("coarse_solver", "DENSE_LU_SOLVER") != "DENSE_LU_SOLVER":
                # (the complex preset: AmgX has no dense LU in complex modes)
                assert "dense_lu_max_rows" not in scope, name
                continue
            assert scope["dense_lu_max_rows"] == _config.DENSE_LU_MAX_ROWS, name
    own = {"config_version": 2, "solver": {"solver": "AMG", "dense_lu_max_rows": 900}}
    final = json.loads(_config.finalise(_config.parse_config(own),
                                        tolerance_mode="native", max_steps=None,
                                        verbose=False))
    assert final["solver"]["dense_lu_max_rows"] == 900
    other = {"config_version": 2,
             "solver": {"solver": "AMG", "coarse_solver": "BLOCK_JACOBI"}}
    final = json.loads(_config.finalise(_config.parse_config(other),
                                        tolerance_mode="native", max_steps=None,
                                        verbose=False))
    assert "dense_lu_max_rows" not in final["solver"]
    with pytest.raises(lxa.ConfigError, match="dense_lu_max_rows=50000 is too large"):
        lxa.AMGX({"config_version": 2, "solver": {
            "solver": "PCG", "preconditioner": {"solver": "AMG",
                                                "dense_lu_max_rows": 50000}}})


def test_config_the_cpu_backend_cannot_run(problem):
    a, op, b = problem
    solver = lxa.AMGX({"config_version": 2, "solver": {"solver": "KACZMARZ"}})
    # Raised when the CPU solve runs (from its host callback), not at trace time.
    with pytest.raises(RuntimeError,
                       match="ValueError: .*'KACZMARZ' cannot be used on the CPU"):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)(op, b)
    assert_still_solves(a, op, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rtol=-1.0), "rtol must be >= 0"),
        (dict(rtol=float("nan")), "rtol must be >= 0"),
        (dict(atol=-1e-3), "atol must be >= 0"),
        (dict(max_steps=0), "max_steps must be >= 1"),
        (dict(precision="half"), "precision must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_solver_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lxa.AMGX(**kwargs)


def test_bad_cache_size():
    with pytest.raises(ValueError, match="cache size must be >= 0"):
        lxa.set_cache_size(-1)
    with pytest.raises(ValueError, match="entries_per_key must be >= 1"):
        lxa.set_cache_size(4, entries_per_key=0)


def test_amgx_backend_without_cuda(problem):
    if _library.has_cuda_backend():
        pytest.skip("JAX has a CUDA backend here")
    a, op, b = problem
    solver = lxa.AMGX(backend="amgx")
    with pytest.raises(RuntimeError, match="backend='amgx'\\) needs a CUDA device"):
        lx.linear_solve(op, b, solver=solver)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)(op, b)
    assert_still_solves(a, op, b)


# ---------------------------------------------------------------------------
# No AmgX library; clean process exit (subprocesses, started together).
# ---------------------------------------------------------------------------

_LOAD_SCRIPT = """
    import ctypes.util, json, os, sys
    import jax, jax.numpy as jnp, lineax as lx, numpy as np, pyamg
    jax.config.update("jax_enable_x64", True)
    import lineax_amgx as lxa
    from lineax_amgx._backends.amgx import _library
    tmp = sys.argv[1]
    junk = os.path.join(tmp, "libamgxsh.so")
    with open(junk, "w") as f:
        f.write("not a shared library\\n")
    cases = {
        "missing": ("LINEAX_AMGX_LIBRARY", os.path.join(tmp, "no", "libamgxsh.so")),
        "not_a_library": ("LINEAX_AMGX_LIBRARY", junk),
        "wrong_library": ("LINEAX_AMGX_LIBRARY", ctypes.util.find_library("m")),
        "amgx_dir": ("AMGX_DIR", os.path.join(tmp, "empty")),
    }
    a = pyamg.gallery.poisson((10, 10), format="csr")
    op = lxa.CSROperator.from_scipy(a, tags=lx.symmetric_tag)
    b = np.arange(100.0)
    out = {}
    for name, (var, value) in cases.items():
        os.environ.pop("LINEAX_AMGX_LIBRARY", None)
        os.environ.pop("AMGX_DIR", None)
        os.environ[var] = value
        res = {}
        try:
            res["path"] = _library.load()
        except lxa.AmgXNotFoundError as e:
            res["error"] = str(e)
            res["is_runtime_error"] = isinstance(e, RuntimeError)
        info = lxa.info()
        res["info_error"] = info["amgx"].get("error")
        res["default_backend"] = info["default_backend"]
        x = lx.linear_solve(op, jnp.asarray(b), solver=lxa.AMGX(rtol=1e-10)).value
        res["residual"] = float(
            np.linalg.norm(b - a @ np.asarray(x)) / np.linalg.norm(b))
        out[name] = res
    print(json.dumps(out))
"""

_EXIT_SCRIPT = """
    import sys
    import jax, jax.numpy as jnp, lineax as lx, numpy as np, pyamg
    jax.config.update("jax_enable_x64", True)
    import lineax_amgx as lxa
    a = pyamg.gallery.poisson((20, 20), format="csr")
    op = lxa.CSROperator.from_scipy(a, tags=lx.symmetric_tag)
    b = np.ones(400)
    x = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX()).value)(
        op, jnp.asarray(b))
    assert np.linalg.norm(b - a @ np.asarray(x)) < 1e-6 * np.linalg.norm(b)
    if sys.argv[1] == "finalize":
        lxa.finalize()
        lxa.finalize()
        assert lxa.cache_info()["size"] == 0
    print("done")
"""


_LOST_CONTEXT_SCRIPT = """
    import ctypes.util, os, sys
    os.environ["LINEAX_AMGX_LIBRARY"] = ctypes.util.find_library("m")
    import lineax_amgx as lxa
    from lineax_amgx._backends.amgx import _library
    _library.try_load()  # dlopen succeeds (libm), the symbol check fails
    # As after a CUDA fault inside AmgX (tests/test_gpu_failures.py makes a real
    # one): the exit must skip AmgX's static destructors, keeping the status.
    _library.native()._poison_for_testing("the CUDA context is gone (test)")
    if sys.argv[1] == "0":
        # A program traced after the fault is refused at trace time, naming the
        # fault (on a GPU machine; pretended here), and the CPU backend still works.
        import jax, jax.numpy as jnp, lineax as lx, numpy as np, pyamg
        jax.config.update("jax_enable_x64", True)
        a = pyamg.gallery.poisson((10, 10), format="csr")
        op = lxa.CSROperator.from_scipy(a, tags=lx.symmetric_tag)
        b = jnp.asarray(np.arange(1.0, 101.0))
        _library.has_cuda_backend = lambda: True
        _library.register_ffi_targets = lambda: None
        try:
            lx.linear_solve(op, b, solver=lxa.AMGX())
            print("not refused")
        except RuntimeError as e:
            print("refused:", str(e).replace(chr(10), " "))
        x = lx.linear_solve(op, b, solver=lxa.AMGX(backend="pyamg")).value
        r = np.linalg.norm(b - a @ np.asarray(x)) / np.linalg.norm(b)
        print("pyamg residual", float(r))
    print("done")
    sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory):
    """Start every subprocess of this file at once; results by name."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LINEAX_AMGX_LIBRARY", "AMGX_DIR")}
    env.update(JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    tmp = str(tmp_path_factory.mktemp("amgx"))
    os.makedirs(os.path.join(tmp, "empty"))
    jobs = {
        "load": (_LOAD_SCRIPT, tmp),
        "exit": (_EXIT_SCRIPT, "keep"),
        "exit_finalize": (_EXIT_SCRIPT, "finalize"),
        "lost_context_0": (_LOST_CONTEXT_SCRIPT, "0"),
        "lost_context_3": (_LOST_CONTEXT_SCRIPT, "3"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), arg],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=os.path.dirname(os.path.abspath(__file__)),  # not the source tree
        )
        for name, (script, arg) in jobs.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "no such file"),
        ("not_a_library", "could not load the AmgX library"),
        ("wrong_library", "lacks the required symbol AMGX_"),
        ("amgx_dir", "(AMGX_DIR): no such file"),
    ],
)
def test_no_amgx_library(case, expect, subprocesses):
    """`LINEAX_AMGX_LIBRARY` / `AMGX_DIR` pointing to a missing file, a file that
    is not a library, a library without AmgX's symbols (libm), an empty
    directory: `AmgXNotFoundError` naming what is wrong and the variable to set;
    `info()` reports it; CPU solves are unaffected; the process exits with 0."""
    rc, stdout, stderr = subprocesses["load"]
    assert rc == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])[case]
    assert out["residual"] < 1e-9
    assert out["default_backend"] == "pyamg"
    if "path" in out:
        pytest.skip(f"a real AmgX was found on the loader path: {out['path']}")
    msg = out["error"]
    assert out["is_runtime_error"]
    assert expect in msg, msg
    var = "AMGX_DIR" if case == "amgx_dir" else "LINEAX_AMGX_LIBRARY"
    assert f"({var})" in msg and "Set LINEAX_AMGX_LIBRARY" in msg, msg
    assert out["info_error"] == msg


@pytest.mark.parametrize("name", ["exit", "exit_finalize"])
def test_process_exits_cleanly(name, subprocesses):
    """A process that solved exits with status 0, with and without finalize()."""
    rc, stdout, stderr = subprocesses[name]
    assert rc == 0, stderr[-3000:]
    assert stdout.strip().endswith("done")


@pytest.mark.parametrize("status", [0, 3])
def test_exit_after_a_lost_cuda_context_keeps_the_status(status, subprocesses):
    """After a CUDA fault inside AmgX the native core's exit hook leaves before
    AmgX's static destructors (which throw and abort on a broken context), says
    so on stderr, and keeps the program's exit status."""
    rc, stdout, stderr = subprocesses[f"lost_context_{status}"]
    assert rc == status, (rc, stderr[-3000:])
    assert stdout.strip().endswith("done")
    assert "exiting without AmgX's teardown (the CUDA context is gone (test))" in stderr
    assert f"exit status {status}" in stderr
    if status == 0:
        lines = stdout.splitlines()
        refused = [ln for ln in lines if ln.startswith("refused:")]
        assert refused and "AmgX cannot run: the CUDA context is gone (test)" in (
            refused[0]), stdout
        assert "backend='pyamg'" in refused[0]
        (res,) = [float(ln.split()[-1]) for ln in lines if ln.startswith("pyamg")]
        assert res < 1e-6
