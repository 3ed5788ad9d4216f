"""Failure paths through AmgX on the GPU (run on the device: `pytest -m gpu`).

The CPU-reachable cases are in test_bad_input.py; the catalogue is docs/guide/errors.md.
"""

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
from helpers import (
    anisotropic2d,
    convection_diffusion2d,
    gpu_array,
    poisson2d,
    rel_residual,
)

import lineax_amgx as lxa
from lineax_amgx._backends.amgx import _library

pytestmark = pytest.mark.gpu

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
R = lx.RESULTS
MiB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda():
    return jax.devices("cuda")[0]


def gpu_op(a, tags=SPD, dtype=np.float64):
    return jax.device_put(lxa.CSROperator.from_scipy(a, tags=tags, dtype=dtype), cuda())


def amgx_counts():
    info = lxa.cache_info("amgx")
    return {k: info[k] for k in ("setups", "resetups", "solves", "size")}


def assert_cache_sane():
    info = lxa.cache_info("amgx")
    assert 0 <= info["size"] <= info["capacity"], info
    assert len(info["entries"]) == info["size"], info


def assert_still_solves(a, op, b):
    """The next valid solves (eager and jit) in the same process work."""
    solver = lxa.AMGX(rtol=1e-10)
    x = lx.linear_solve(op, b, solver=solver).value
    assert rel_residual(a, x, np.asarray(b)) < 1e-9
    f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)
    assert rel_residual(a, f(op, b), np.asarray(b)) < 1e-9
    assert_cache_sane()


@pytest.fixture
def problem(rng):
    a = poisson2d(40)
    return a, gpu_op(a), gpu_array(rng.standard_normal(a.shape[0]))


# ---------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------


def test_amgx_backend_with_arrays_on_the_cpu(problem):
    """backend='amgx' with arrays on the host: a clear error, not XLA's "no FFI
    handler"; backend='auto' with the same arrays solves through pyamg."""
    a, op, b = problem
    cpu = jax.devices("cpu")[0]
    op_cpu, b_cpu = jax.device_put(op, cpu), jax.device_put(b, cpu)
    with pytest.raises(jax.errors.JaxRuntimeError, match="got arrays on a non-CUDA"):
        lx.linear_solve(op_cpu, b_cpu, solver=lxa.AMGX(backend="amgx")).value
    before = amgx_counts()
    x = lx.linear_solve(op_cpu, b_cpu, solver=lxa.AMGX(rtol=1e-10)).value
    assert x.devices() == {cpu}
    assert rel_residual(a, x, np.asarray(b)) < 1e-9
    assert amgx_counts() == before  # AmgX was not involved
    assert_still_solves(a, op, b)


def test_operator_and_rhs_on_different_devices(problem):
    a, op, b = problem
    b_cpu = jax.device_put(b, jax.devices("cpu")[0])
    with pytest.raises(ValueError, match="incompatible devices"):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX()).value)(op, b_cpu)
    assert_still_solves(a, op, b)


# ---------------------------------------------------------------------------
# Values: NaN / Inf, zero rows, singular matrices.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["values", "b", "y0"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_input_through_amgx(where, bad, problem):
    a, op, b = problem
    y0 = jnp.zeros_like(b)
    if where == "values":
        op_bad, b_bad = op.with_values(op.values.at[11].set(bad)), b
    elif where == "b":
        op_bad, b_bad = op, b.at[3].set(bad)
    else:
        op_bad, b_bad, y0 = op, b, y0.at[5].set(bad)
    options = {"y0": y0}
    solver = lxa.AMGX()
    before = amgx_counts()
    sol = lx.linear_solve(op_bad, b_bad, solver=solver, throw=False, options=options)
    assert sol.result == R.nonfinite_input
    if where == "values":
        # AmgX never saw the values: no setup, no solve.
        assert amgx_counts()["setups"] == before["setups"]
    f = eqx.filter_jit(
        lambda o, v, y: lx.linear_solve(o, v, solver=solver, throw=False,
                                        options={"y0": y})
    )
    assert f(op_bad, b_bad, y0).result == R.nonfinite_input
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        lx.linear_solve(op_bad, b_bad, solver=solver, options=options)
    assert_still_solves(a, op, b)


def test_zero_row_is_singular_amgx_not_called(problem):
    a, op, b = problem
    p = op.pattern
    # Untagged: a zeroed row makes the matrix non-symmetric.
    bad = lxa.CSROperator(p, op.values.at[p.indptr[20] : p.indptr[21]].set(0.0))
    before = amgx_counts()
    sol = lx.linear_solve(bad, b, solver=lxa.AMGX(), throw=False)
    assert sol.result == R.singular
    after = amgx_counts()
    assert (after["setups"], after["resetups"], after["solves"]) == (
        before["setups"], before["resetups"], before["solves"])
    with pytest.raises(eqx.EquinoxRuntimeError, match="not well-posed"):
        lx.linear_solve(bad, b, solver=lxa.AMGX()).value
    assert_still_solves(a, op, b)


def neumann2d(n):
    a = poisson2d(n)
    return sp.csr_array(a - sp.diags_array(np.asarray(a.sum(axis=1)).ravel()))


@pytest.mark.parametrize(
    "config", [None, "FGMRES_AGGREGATION", "PBICGSTAB_AGGREGATION", "AMG_AGGREGATION"]
)
def test_singular_matrix_through_amgx(config, rng):
    """Inconsistent singular system: never successful. Consistent one: successful
    only with a true residual within tolerance."""
    a = neumann2d(30)
    op = gpu_op(a)
    solver = lxa.AMGX(config, rtol=1e-8, max_steps=200)
    b = gpu_array(rng.standard_normal(a.shape[0]))
    sol = lx.linear_solve(op, b, solver=solver, throw=False)
    assert sol.result in (R.max_steps_reached, R.breakdown, R.singular), sol.result
    with pytest.raises(eqx.EquinoxRuntimeError):
        lx.linear_solve(op, b, solver=solver).value
    b_ok = a @ rng.standard_normal(a.shape[0])
    sol = lx.linear_solve(op, gpu_array(b_ok), solver=solver, throw=False)
    if sol.result == R.successful:
        assert rel_residual(a, sol.value, b_ok) <= 1e-8 * 1.01
    else:
        assert sol.result in (R.max_steps_reached, R.breakdown, R.singular)
    a_good = poisson2d(30)
    assert_still_solves(a_good, gpu_op(a_good), b)


# ---------------------------------------------------------------------------
# Non-convergence and divergence.
# ---------------------------------------------------------------------------


def test_not_converged_eager_and_jit(rng):
    a = anisotropic2d(100)
    op = gpu_op(a)
    b = gpu_array(rng.standard_normal(a.shape[0]))
    solver = lxa.AMGX(rtol=1e-12, max_steps=2)
    sol = lx.linear_solve(op, b, solver=solver, throw=False)
    assert sol.result == R.max_steps_reached
    assert int(sol.stats["num_steps"]) == 2
    f = eqx.filter_jit(lambda o, v: lx.linear_solve(o, v, solver=solver, throw=False))
    assert f(op, b).result == R.max_steps_reached
    with pytest.raises(eqx.EquinoxRuntimeError, match="maximum number of solver steps"):
        lx.linear_solve(op, b, solver=solver).value
    assert_still_solves(a, op, b)


@pytest.mark.parametrize("config", ["PCG_AGGREGATION", "AMG_AGGREGATION"])
def test_indefinite_matrix_flagged(config, problem):
    """A symmetric indefinite matrix tagged positive definite: CG breaks down or
    AMG cycles diverge; never reported as successful."""
    a, op, b = problem
    shifted = sp.csr_array(a - 6.0 * sp.eye_array(a.shape[0]))
    bad = gpu_op(shifted)
    sol = lx.linear_solve(bad, b, solver=lxa.AMGX(config, max_steps=200), throw=False)
    if sol.result == R.successful:
        # Krylov methods can converge on a nonsingular indefinite matrix (AmgX's CG
        # did on an H200): then the true residual must be within the solver's
        # guard (docs/guide/errors.md: at most 1000x the requested bound), and the
        # reported residual must be the true one.
        x = np.asarray(sol.value)
        bb = np.asarray(b)
        true = np.linalg.norm(bb - shifted @ x)
        assert true <= 1e3 * 1e-8 * np.linalg.norm(bb)
        # the GPU and the host compute it with different rounding: they agree to
        # 1e-6 relative, or to a few ulps of the terms when it is at rounding level
        noise = 1e-13 * (np.linalg.norm(shifted @ x) + np.linalg.norm(bb))
        assert abs(float(sol.stats["residual_norm"]) - true) <= 1e-6 * true + noise
    else:
        assert sol.result in (R.breakdown, R.singular, R.max_steps_reached), sol.result
    assert_still_solves(a, op, b)


@pytest.mark.parametrize("config", ["FGMRES_AGGREGATION", "AMG_VCYCLE"])
def test_stalled_coarsening_does_not_crash(config):
    """Upwind convection-diffusion on 99,856 unknowns: with SIZE_8 aggregation
    AmgX's coarsening stalled on a level far above `dense_lu_num_rows`, whose dense
    LU then overflowed 32-bit indices (illegal memory access, CUDA context lost:
    seen on an H200). The presets' aggregation (SIZE_4) must set up and solve it:
    FGMRES converges (or says it did not), and the preconditioner is finite."""
    a = convection_diffusion2d(316)
    b = np.random.default_rng(3).standard_normal(a.shape[0])
    op = gpu_op(a, tags=())
    if config == "AMG_VCYCLE":
        from lineax_amgx._preconditioner import AMGXPreconditioner

        P = AMGXPreconditioner(op)
        y = np.asarray(P.mv(gpu_array(b)))
        assert np.isfinite(y).all()
        sol = lx.linear_solve(op, gpu_array(b), lx.GMRES(rtol=1e-10, atol=1e-10,
                              restart=20, max_steps=400),
                              options={"preconditioner": P}, throw=False)
    else:
        sol = lx.linear_solve(op, gpu_array(b), solver=lxa.AMGX(config, rtol=1e-8),
                              throw=False)
    x = np.asarray(sol.value)
    print(f"\n{config}: {sol.result}, steps {int(sol.stats['num_steps'])}, "
          f"relres {rel_residual(a, x, b):.1e}")
    if sol.result == R.successful:
        assert rel_residual(a, x, b) < 1e-7
    else:
        assert sol.result == R.max_steps_reached, sol.result
    assert_still_solves(*_small_problem())


def _small_problem():
    a = poisson2d(30)
    b = gpu_array(np.random.default_rng(4).standard_normal(a.shape[0]))
    return a, gpu_op(a), b


# ---------------------------------------------------------------------------
# AmgX rejecting a setup.
# ---------------------------------------------------------------------------


def test_setup_failure_in_a_series_then_recovery(rng):
    """A config AmgX rejects at setup (classical AMG on CUDA 13 builds,
    NVIDIA/AMGX#380) in the middle of jitted solves: a Python exception with
    AmgX's message, the cache stays consistent, no GPU memory leaks over
    repeated failures, and the following solves succeed."""
    a = poisson2d(60)
    op = gpu_op(a)
    good_solver, bad_solver = lxa.AMGX(rtol=1e-10), lxa.AMGX("PCG_CLASSICAL")
    good = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=good_solver).value)
    bad = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=bad_solver).value)
    bs = [gpu_array(rng.standard_normal(a.shape[0])) for _ in range(4)]
    assert rel_residual(a, good(op, bs[0]), np.asarray(bs[0])) < 1e-9
    try:
        bad(op, bs[1]).block_until_ready()
    except Exception as e:
        assert "AmgX" in str(e), e
    else:
        pytest.skip("classical AMG sets up fine on this AmgX build")
    assert_cache_sane()
    free = lambda: _library.native().free_device_memory()[0]  # noqa: E731
    before = free()
    for _ in range(5):
        with pytest.raises(Exception, match="AmgX"):
            bad(op, bs[1]).block_until_ready()
    assert before - free() < 64 * MiB, (before - free()) / MiB
    assert_cache_sane()
    for b in bs[2:]:
        assert rel_residual(a, good(op, b), np.asarray(b)) < 1e-9
    assert_still_solves(a, op, bs[0])


# ---------------------------------------------------------------------------
# Structure errors are raised before AmgX is reached.
# ---------------------------------------------------------------------------


def test_structural_errors_before_amgx(problem):
    a, op, b = problem
    m = a.tolil()
    m[7, :] = 0
    m = sp.csr_array(m)
    m.eliminate_zeros()
    before = amgx_counts()
    with pytest.raises(ValueError, match="structurally singular: row 7"):
        lx.linear_solve(gpu_op(m), b, solver=lxa.AMGX()).value
    with pytest.raises(ValueError, match="structures do not match"):
        lx.linear_solve(op, b[:-1], solver=lxa.AMGX()).value
    assert amgx_counts() == before
    assert_still_solves(a, op, b)


# ---------------------------------------------------------------------------
# AmgX missing on a GPU machine; the soak benchmark.
# ---------------------------------------------------------------------------


def _run(script, env=None, timeout=300):
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


def test_lost_cuda_context_is_an_exception_and_a_clean_exit():
    """SIZE_8 aggregation on 99,856-unknown upwind convection-diffusion made AmgX
    2.5 (H200, CUDA 13) overflow its dense-LU indexing: an illegal memory access
    that ruins the CUDA context. That must surface as a Python exception naming
    the CUDA failure, later calls must refuse to run, and the process must exit
    with status 0 (no abort from AmgX's teardown). AmgX does not always lose the
    context on this problem (H200 runs of 2026-12-03: a plain AmgX error, the
    context intact); then the error must be clear and the next solve must work.
    If this AmgX does not fail on the problem, the solve must simply be right."""
    script = """
        import sys
        sys.path.insert(0, ".")
        import jax, numpy as np, lineax as lx
        jax.config.update("jax_enable_x64", True)
        import lineax_amgx as lxa
        from helpers import convection_diffusion2d
        a = convection_diffusion2d(316)
        b = np.random.default_rng(0).standard_normal(a.shape[0])
        op = jax.device_put(lxa.CSROperator.from_scipy(a), jax.devices("cuda")[0])
        cfg = lxa.configs["FGMRES_AGGREGATION"]
        cfg["solver"]["preconditioner"]["selector"] = "SIZE_8"
        try:
            x = np.asarray(lx.linear_solve(op, b, solver=lxa.AMGX(cfg)).value)
            print("SOLVED", np.linalg.norm(a @ x - b) / np.linalg.norm(b))
        except Exception as e:
            print("RAISED", type(e).__name__, "restart it" in str(e))
            try:
                x = np.asarray(lx.linear_solve(op, b, solver=lxa.AMGX()).value)
                print("AFTER solved", np.linalg.norm(a @ x - b) / np.linalg.norm(b))
            except Exception as e2:
                print("AFTER raised", "restart it" in str(e2))
        print("END")
    """
    proc = _run(script, timeout=240)
    out = proc.stdout
    print(out[-2000:], proc.stderr[-2000:])
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "END" in out
    if "SOLVED" in out:
        assert float(out.split("SOLVED")[1].split()[0]) < 1e-6
    elif "AFTER solved" in out:
        # An AmgX error that left the context intact: a clear error (not the
        # lost-context refusal), then a working solve.
        raised = out.split("RAISED")[1].split("\n")[0].split()
        assert raised[-1] == "False", out  # not the lost-context refusal
        assert float(out.split("AFTER solved")[1].split()[0]) < 1e-6
    else:
        # The context was lost: later calls are refused, the exit skips AmgX's
        # teardown and keeps status 0.
        assert "RAISED" in out
        assert "AFTER raised True" in out, out
        assert "exiting without AmgX's teardown" in proc.stderr


def test_gpu_solve_without_amgx_library(tmp_path):
    """LINEAX_AMGX_LIBRARY pointing to libm: loading fails with a clear error; a
    GPU solve raises AmgX's load error (through the FFI handler) instead of
    crashing, and the process exits with 0."""
    script = """
        import jax, jax.numpy as jnp, lineax as lx, pyamg
        jax.config.update("jax_enable_x64", True)
        import lineax_amgx as lxa
        from lineax_amgx._backends.amgx import _library
        try:
            print("LOADED", _library.load())
        except lxa.AmgXNotFoundError as e:
            print("NOT FOUND")
        a = pyamg.gallery.poisson((10, 10), format="csr")
        op = lxa.CSROperator.from_scipy(a, tags=lx.symmetric_tag)
        try:
            x = lx.linear_solve(op, jnp.ones(100), solver=lxa.AMGX()).value
            x.block_until_ready()
            print("SOLVED")
        except Exception as e:
            print("RAISED", type(e).__name__, str(e).replace("\\n", " ")[:2000])
    """
    env = {"LINEAX_AMGX_LIBRARY": "libm.so.6", "AMGX_DIR": str(tmp_path)}
    r = _run(script, env)
    assert r.returncode == 0, r.stderr[-3000:]
    if "LOADED" in r.stdout:
        pytest.skip("AmgX is on the loader path: it cannot be hidden here")
    assert "NOT FOUND" in r.stdout
    assert "RAISED" in r.stdout, r.stdout
    assert "AmgX is not" in r.stdout, r.stdout  # "... not loaded" / "... not available"


def test_soak_quick():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--quick"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"),
        cwd=os.path.dirname(os.path.abspath(__file__)),  # not the source tree
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert '"phase": "summary", "ok": true' in r.stdout
