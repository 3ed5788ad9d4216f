"""The bad-input catalogue (docs/guide/errors.md), on the CPU and on the GPU
(through AmgX: `pytest -m gpu tests/test_bad_input.py` on the device): every case
gives a specific Python exception or a documented `lx.RESULTS` code, never a
crash or a silently wrong answer, and the next valid solve in the same process
still works. (A missing AmgX library, clean exits and a lost CUDA context:
`test_process.py`.)"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from _backend import cases, only
from helpers import anisotropic2d, convection_diffusion2d, poisson2d, rel_residual
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
    pytest.mark.usefixtures("on_cpu"),
]

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
R = lx.RESULTS
N = 8  # 8 x 8 Poisson: 64 unknowns (on the GPU: 40 x 40)
MiB = 2**20


@pytest.fixture
def problem(rng):
    a = poisson2d(N)
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    return a, lxa.CSROperator.from_scipy(a, tags=SPD), b


def backend_problem(rng, backend):
    """`problem` on `backend`: Poisson on an 8 x 8 (CPU) or 40 x 40 (GPU) grid."""
    a = poisson2d(backend.pick(cpu=N, gpu=40))
    b = backend.put(rng.standard_normal(a.shape[0]))
    return a, backend.op(a, SPD), b


def counts(backend):
    info = lxa.cache_info(backend.cache)
    return {k: info[k] for k in ("setups", "resetups", "solves", "size")}


@eqx.filter_jit
def solve_nothrow(op, b, solver, y0=None):
    options = {} if y0 is None else {"y0": y0}
    return lx.linear_solve(op, b, solver=solver, throw=False, options=options)


def assert_cache_sane(backend):
    info = lxa.cache_info(backend.cache)
    assert 0 <= info["size"] <= info["capacity"], info
    assert len(info["entries"]) == info["size"], info


def assert_still_solves(a, op, b, backend=None):
    """The next valid solve in the same process works (eager and jit), and the
    cache is consistent."""
    solver = lxa.AMGX(rtol=1e-10)
    x = lx.linear_solve(op, b, solver=solver).value
    assert rel_residual(a, x, b) < 1e-9
    sol = solve_nothrow(op, b, solver)
    assert sol.result == R.successful
    assert rel_residual(a, sol.value, b) < 1e-9
    info = lxa.cache_info("pyamg" if backend is None else backend.cache)
    assert 0 < info["size"] <= info["capacity"], info
    assert len(info["entries"]) == info["size"], info


# ---------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------


@only("gpu")
def test_amgx_backend_with_arrays_on_the_cpu(rng, backend):
    """backend='amgx' with arrays on the host: a clear error, not XLA's "no FFI
    handler"; backend='auto' with the same arrays solves through pyamg."""
    a, op, b = backend_problem(rng, backend)
    cpu = jax.devices("cpu")[0]
    op_cpu, b_cpu = jax.device_put(op, cpu), jax.device_put(b, cpu)
    with pytest.raises(jax.errors.JaxRuntimeError, match="got arrays on a non-CUDA"):
        lx.linear_solve(op_cpu, b_cpu, solver=lxa.AMGX(backend="amgx")).value
    before = counts(backend)
    x = lx.linear_solve(op_cpu, b_cpu, solver=lxa.AMGX(rtol=1e-10)).value
    assert x.devices() == {cpu}
    assert rel_residual(a, x, np.asarray(b)) < 1e-9
    assert counts(backend) == before  # AmgX was not involved
    assert_still_solves(a, op, b, backend)


@only("gpu")
def test_operator_and_rhs_on_different_devices(rng, backend):
    a, op, b = backend_problem(rng, backend)
    b_cpu = jax.device_put(b, jax.devices("cpu")[0])
    with pytest.raises(ValueError, match="incompatible devices"):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX()).value)(op, b_cpu)
    assert_still_solves(a, op, b, backend)


# ---------------------------------------------------------------------------
# Values: NaN / Inf, zero rows, singular matrices (RESULTS codes).
# ---------------------------------------------------------------------------


@jax.jit
def solve_throw(op, b, y0):
    return lx.linear_solve(op, b, solver=lxa.AMGX(), options={"y0": y0}).value


@cases(
    "where, bad",
    cpu=[("values", np.nan), ("values", np.inf), ("b", np.nan), ("b", -np.inf),
         ("y0", np.nan)],
    gpu=[(w, v) for v in (np.nan, np.inf) for w in ("values", "b", "y0")],
)
def test_nonfinite_input(where, bad, rng, backend):
    a, op, b = backend_problem(rng, backend)
    y0 = jnp.zeros_like(b)
    if where == "values":
        at = backend.pick(cpu=7, gpu=11)
        bad_op, bad_b = op.with_values(op.values.at[at].set(bad)), b
    elif where == "b":
        bad_op, bad_b = op, b.at[3].set(bad)
    else:
        bad_op, bad_b, y0 = op, b, y0.at[5].set(bad)
    options = {"y0": y0}
    solver = lxa.AMGX()
    setups = counts(backend)["setups"]
    # eager, throw=False: the code, and no setup made from garbage values (AmgX
    # never sees them)
    sol = lx.linear_solve(bad_op, bad_b, solver=solver, throw=False, options=options)
    assert sol.result == R.nonfinite_input
    if where == "values":
        assert counts(backend)["setups"] == setups
    # jit, throw=False
    assert solve_nothrow(bad_op, bad_b, solver, y0).result == R.nonfinite_input
    # throw=True raises, eager and under jax.jit
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        lx.linear_solve(bad_op, bad_b, solver=solver, options=options)
    with pytest.raises(jax.errors.JaxRuntimeError, match="non-finite"):
        solve_throw(bad_op, bad_b, y0).block_until_ready()
    assert_still_solves(a, op, b, backend)


def test_zero_row_is_singular(rng, backend):
    """A row whose stored values are all zero: `RESULTS.singular` (the backend is
    not called), eager and jit; throw=True raises."""
    a, op, b = backend_problem(rng, backend)
    p = op.pattern
    row = backend.pick(cpu=10, gpu=20)
    values = op.values.at[p.indptr[row] : p.indptr[row + 1]].set(0.0)
    bad = lxa.CSROperator(p, values)  # untagged: no longer symmetric
    before = counts(backend)
    sol = lx.linear_solve(bad, b, solver=lxa.AMGX(), throw=False)
    assert sol.result == R.singular
    after = counts(backend)
    assert (after["setups"], after["resetups"], after["solves"]) == (
        before["setups"], before["resetups"], before["solves"])
    assert solve_nothrow(bad, b, lxa.AMGX()).result == R.singular
    sol = lx.linear_solve(bad, b, solver=lxa.AMGX("AMG_AGGREGATION"), throw=False)
    assert sol.result == R.singular
    with pytest.raises(eqx.EquinoxRuntimeError, match="not well-posed"):
        lx.linear_solve(bad, b, solver=lxa.AMGX()).value
    # NaN elsewhere as well: non-finite input takes precedence.
    both = bad.with_values(values.at[0].set(jnp.nan))
    assert solve_nothrow(both, b, lxa.AMGX()).result == R.nonfinite_input
    assert_still_solves(a, op, b, backend)


def test_zero_row_in_a_block_is_singular(rng):
    a = poisson2d(N)
    op = lxa.CSROperator.from_scipy(a, tags=SPD, block_size=2)
    p = op.pattern
    start, stop = p.indptr[4], p.indptr[5]
    values = op.values.at[start:stop, 1, :].set(0.0)  # scalar row 9
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    bad = lxa.CSROperator(p, values)  # untagged: no longer symmetric
    sol = lx.linear_solve(bad, b, solver=lxa.AMGX(), throw=False)
    assert sol.result == R.singular
    x = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10)).value
    assert rel_residual(a, x, b) < 1e-9


@cases("kind", cpu=["row", "column"], gpu=["row"])
def test_structurally_empty_row_or_column(kind, rng, backend):
    """No stored entry in a row (column): a static property of the pattern, so a
    ValueError at trace time, before any backend is reached (as for mismatched
    shapes)."""
    a, op, b = backend_problem(rng, backend)
    at = backend.pick(cpu=17, gpu=7)
    m = a.tolil()
    if kind == "row":
        m[at, :] = 0
    else:
        m[:, at] = 0
    m = sp.csr_array(m)
    m.eliminate_zeros()
    bad = backend.op(m)  # untagged: no longer symmetric
    before = counts(backend)
    with pytest.raises(ValueError, match=f"structurally singular: {kind} {at}"):
        lx.linear_solve(bad, b, solver=lxa.AMGX()).value
    with pytest.raises(ValueError, match="structurally singular"):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX()).value)(bad, b)
    with pytest.raises(ValueError, match="structures do not match"):
        lx.linear_solve(op, b[:-1], solver=lxa.AMGX()).value
    assert counts(backend) == before
    assert_still_solves(a, op, b, backend)


def neumann2d(n):
    """The pure-Neumann Laplacian: symmetric positive semidefinite, singular (the
    constants are its null space)."""
    a = poisson2d(n)
    return sp.csr_array(a - sp.diags_array(np.asarray(a.sum(axis=1)).ravel()))


# (Classical AMG fails to set up on CUDA 13 builds of AmgX, NVIDIA/AMGX#380: the GPU
# takes BiCGStab instead.)
CONFIGS = dict(cpu=[None, "FGMRES_AGGREGATION", "AMG_AGGREGATION", "PCG_CLASSICAL"],
               gpu=[None, "FGMRES_AGGREGATION", "PBICGSTAB_AGGREGATION",
                    "AMG_AGGREGATION"])


@cases("config", **CONFIGS)
def test_singular_matrix_is_flagged(config, rng, backend):
    """An inconsistent singular system has no solution: never `successful`."""
    a = neumann2d(backend.pick(cpu=N, gpu=30))
    op = backend.op(a, SPD)
    b = backend.put(rng.standard_normal(a.shape[0]))  # not in the range of A
    solver = backend.pick(cpu=lxa.AMGX(config, max_steps=100),
                          gpu=lxa.AMGX(config, rtol=1e-8, max_steps=200))
    sol = lx.linear_solve(op, b, solver=solver, throw=False)
    assert sol.result in (R.max_steps_reached, R.breakdown, R.singular), sol.result
    with pytest.raises(eqx.EquinoxRuntimeError):
        lx.linear_solve(op, b, solver=solver).value
    good = poisson2d(backend.pick(cpu=N, gpu=30))
    assert_still_solves(good, backend.op(good, SPD), b, backend)


@cases("config", **CONFIGS)
def test_consistent_singular_system_never_wrong(config, rng, backend):
    """`b` in the range of a singular A: solutions exist (not unique). Whatever
    the status, `successful` must come with a true residual within tolerance."""
    a = neumann2d(backend.pick(cpu=N, gpu=30))
    op = backend.op(a, SPD)
    b = a @ rng.standard_normal(a.shape[0])
    sol = lx.linear_solve(op, backend.put(b), solver=lxa.AMGX(config, rtol=1e-8,
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


def test_max_steps_reached(rng, backend):
    a = backend.pick(cpu=lambda: poisson2d(N), gpu=lambda: anisotropic2d(100))()
    op = backend.op(a, SPD)
    b = backend.put(rng.standard_normal(a.shape[0]))
    max_steps = backend.pick(cpu=1, gpu=2)
    solver = lxa.AMGX(rtol=backend.pick(cpu=1e-14, gpu=1e-12), max_steps=max_steps)
    sol = lx.linear_solve(op, b, solver=solver, throw=False)
    assert sol.result == R.max_steps_reached
    assert int(sol.stats["num_steps"]) == max_steps
    assert solve_nothrow(op, b, solver).result == R.max_steps_reached
    with pytest.raises(eqx.EquinoxRuntimeError, match="maximum number of solver steps"):
        lx.linear_solve(op, b, solver=solver).value
    assert_still_solves(a, op, b, backend)


@pytest.mark.parametrize("config", ["PCG_AGGREGATION", "AMG_AGGREGATION"])
def test_indefinite_matrix_breakdown_or_divergence(config, rng, backend):
    """A symmetric indefinite matrix wrongly tagged positive definite: never
    reported as successful with a wrong answer. On the CPU, CG breaks down and
    plain AMG cycles diverge: `RESULTS.breakdown`. On the GPU, Krylov methods can
    converge on a nonsingular indefinite matrix (AmgX's CG did on an H200): then
    the true residual must be within the solver's guard (docs/guide/errors.md: at
    most 1000x the requested bound), and the reported residual the true one."""
    a, op, b = backend_problem(rng, backend)
    indefinite = sp.csr_array(a - 6.0 * sp.eye_array(a.shape[0]))
    bad = backend.op(indefinite, SPD)
    solver = lxa.AMGX(config, max_steps=backend.pick(cpu=None, gpu=200))
    sol = lx.linear_solve(bad, b, solver=solver, throw=False)
    if not backend.gpu:
        assert sol.result == R.breakdown
        with pytest.raises(eqx.EquinoxRuntimeError, match="breakdown"):
            lx.linear_solve(bad, b, solver=solver)
    elif sol.result == R.successful:
        x = np.asarray(sol.value)
        bb = np.asarray(b)
        true = np.linalg.norm(bb - indefinite @ x)
        assert true <= 1e3 * 1e-8 * np.linalg.norm(bb)
        # the GPU and the host compute it with different rounding: they agree to
        # 1e-6 relative, or to a few ulps of the terms when it is at rounding level
        noise = 1e-13 * (np.linalg.norm(indefinite @ x) + np.linalg.norm(bb))
        assert abs(float(sol.stats["residual_norm"]) - true) <= 1e-6 * true + noise
    else:
        assert sol.result in (R.breakdown, R.singular, R.max_steps_reached), sol.result
    assert_still_solves(a, op, b, backend)


@cases("config", gpu=["FGMRES_AGGREGATION", "AMG_VCYCLE"])
def test_stalled_coarsening_does_not_crash(config, backend):
    """Upwind convection-diffusion on 99,856 unknowns: with SIZE_8 aggregation
    AmgX's coarsening stalled on a level far above `dense_lu_num_rows`, whose dense
    LU then overflowed 32-bit indices (illegal memory access, CUDA context lost:
    seen on an H200). The presets' aggregation (SIZE_4) must set up and solve it:
    FGMRES converges (or says it did not), and the preconditioner is finite."""
    a = convection_diffusion2d(316)
    b = np.random.default_rng(3).standard_normal(a.shape[0])
    op = backend.op(a)
    if config == "AMG_VCYCLE":
        from lineax_amgx._preconditioner import AMGXPreconditioner

        P = AMGXPreconditioner(op)
        y = np.asarray(P.mv(backend.put(b)))
        assert np.isfinite(y).all()
        sol = lx.linear_solve(op, backend.put(b), lx.GMRES(rtol=1e-10, atol=1e-10,
                              restart=20, max_steps=400),
                              options={"preconditioner": P}, throw=False)
    else:
        sol = lx.linear_solve(op, backend.put(b), solver=lxa.AMGX(config, rtol=1e-8),
                              throw=False)
    x = np.asarray(sol.value)
    print(f"\n{config}: {sol.result}, steps {int(sol.stats['num_steps'])}, "
          f"relres {rel_residual(a, x, b):.1e}")
    if sol.result == R.successful:
        assert rel_residual(a, x, b) < 1e-7
    else:
        assert sol.result == R.max_steps_reached, sol.result
    assert_still_solves(*_small_problem(backend), backend)


def _small_problem(backend):
    a = poisson2d(30)
    b = backend.put(np.random.default_rng(4).standard_normal(a.shape[0]))
    return a, backend.op(a, SPD), b


@only("gpu")
def test_setup_failure_in_a_series_then_recovery(rng, backend):
    """A config AmgX rejects at setup (classical AMG on CUDA 13 builds,
    NVIDIA/AMGX#380) in the middle of jitted solves: a Python exception with
    AmgX's message, the cache stays consistent, no GPU memory leaks over
    repeated failures, and the following solves succeed."""
    a = poisson2d(60)
    op = backend.op(a, SPD)
    good_solver, bad_solver = lxa.AMGX(rtol=1e-10), lxa.AMGX("PCG_CLASSICAL")
    good = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=good_solver).value)
    bad = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=bad_solver).value)
    bs = [backend.put(rng.standard_normal(a.shape[0])) for _ in range(4)]
    assert rel_residual(a, good(op, bs[0]), np.asarray(bs[0])) < 1e-9
    try:
        bad(op, bs[1]).block_until_ready()
    except Exception as e:
        assert "AmgX" in str(e), e
    else:
        pytest.skip("classical AMG sets up fine on this AmgX build")
    assert_cache_sane(backend)
    free = lambda: _library.native().free_device_memory()[0]  # noqa: E731
    before = free()
    for _ in range(5):
        with pytest.raises(Exception, match="AmgX"):
            bad(op, bs[1]).block_until_ready()
    assert before - free() < 64 * MiB, (before - free()) / MiB
    assert_cache_sane(backend)
    for b in bs[2:]:
        assert rel_residual(a, good(op, b), np.asarray(b)) < 1e-9
    assert_still_solves(a, op, bs[0], backend)


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
