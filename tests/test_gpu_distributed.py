"""Distributed AmgX solves on GPUs (the native path): one process per GPU.

Run on the device (AmgX built with the device's MPI):

    cd tests && mpirun --allow-run-as-root -n 2 \
        python -m pytest test_gpu_distributed.py -m "gpu and mpi" -q -p no:cacheprovider

(`LINEAX_AMGX_DISTRIBUTED_PATH=host` runs the same tests on the host-callback path.)

References: the single-GPU AmgX solve of the same global system on every rank
(float64, to 1e-8), and scipy. Every test is collective (see test_distributed.py).
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py or an MPI library is missing")

import _mpi_helpers  # noqa: E402
from helpers import poisson3d, random_nonsymmetric, rel_err  # noqa: E402

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as D  # noqa: E402
from lineax_amgx.distributed import _amgx as DA, _comm as DC  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)

collective = _mpi_helpers.collective(COMM)


def gpu():
    devices = jax.devices("cuda")
    return devices[DA._device_ordinal(DC._register(COMM)) % len(devices)]


def problem(kind="poisson", n=40, seed=3):
    A = poisson3d(n) if kind == "poisson" else random_nonsymmetric(
        n**3, np.random.default_rng(7))
    b = np.random.default_rng(seed).standard_normal(A.shape[0])
    tags = SPD if kind == "poisson" else ()
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None,
                                                      tags=tags)
    op = jax.device_put(op, gpu())
    bl = jax.device_put(jnp.asarray(D.scatter_vector(b if RANK == 0 else None,
                                                     op.layout)), gpu())
    return A, b, op, bl


def single_gpu(A, b, tags, rtol):
    op = jax.device_put(lxa.CSROperator.from_scipy(A, tags=tags), gpu())
    x = lx.linear_solve(op, jax.device_put(jnp.asarray(b), gpu()),
                        solver=lxa.AMGX(rtol=rtol)).value
    return np.asarray(x)


@collective
def test_poisson_equals_single_gpu():
    A, b, op, bl = problem("poisson", 40)
    solver = lxa.AMGX(rtol=1e-12)
    sol = lx.linear_solve(op, bl, solver=solver)
    x = D.gather_vector(np.asarray(sol.value), op.layout, root=None)
    ref = single_gpu(A, b, SPD, 1e-12)
    assert sol.result == lx.RESULTS.successful
    assert rel_err(x, ref) < 1e-8, rel_err(x, ref)
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-8
    d = D.cache_info()
    everyone = COMM.allgather((d["setups"], d["resetups"], d["solves"], d["size"]))
    assert len(set(everyone)) == 1, everyone  # the same counters on every rank
    assert everyone[0][0] == 1 and everyone[0][2] >= 1, everyone


@collective
def test_jit_reuses_the_setup_and_resetups_new_values():
    A, b, op, bl = problem("poisson", 30)
    f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX(rtol=1e-10)).value)
    x1 = D.gather_vector(np.asarray(f(op, bl)), op.layout, root=None)
    x2 = D.gather_vector(np.asarray(f(op.with_values(op.values * 2.0), bl)),
                         op.layout, root=None)
    d = D.cache_info()
    counts = COMM.allgather((d["setups"], d["resetups"]))
    ref = spla.spsolve(sp.csc_matrix(A), b)
    assert rel_err(x1, ref) < 1e-8 and rel_err(x2, ref / 2) < 1e-8
    assert len(set(counts)) == 1 and counts[0][1] >= 1, counts


@collective
def test_grad_wrt_b_matches_single_gpu():
    A, b, op, bl = problem("poisson", 24)
    solver = lxa.AMGX(rtol=1e-12)
    w = jax.device_put(jnp.asarray(D.scatter_vector(
        np.linspace(-1, 1, A.shape[0]) if RANK == 0 else None, op.layout)), gpu())

    def loss(v):
        x = lx.linear_solve(op, v, solver=solver).value
        return D.allreduce_sum(jnp.sum(w * x), op.layout)

    g = D.gather_vector(np.asarray(jax.grad(loss)(bl)), op.layout, root=None)
    ref = spla.spsolve(sp.csc_matrix(A).T, np.linspace(-1, 1, A.shape[0]))
    assert rel_err(g, ref) < 1e-8


@collective
def test_nonsymmetric_solve():
    A, b, op, bl = problem("nonsymmetric", 20)
    sol = lx.linear_solve(op, bl, solver=lxa.AMGX(rtol=1e-12))
    x = D.gather_vector(np.asarray(sol.value), op.layout, root=None)
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-8


@collective
def test_unchanged_values_are_a_hit_without_resetup():
    """Fresh `lx.linear_solve` calls with the same values: one setup, then hits
    (the values are compared with the resident ones, exactly)."""
    A, b, op, bl = problem("poisson", 22, seed=5)  # a pattern no other test has
    solver = lxa.AMGX(rtol=1e-10)
    names = ("setups", "resetups", "hits", "solves")
    before = D.cache_info()
    xs = [lx.linear_solve(op, bl * k, solver=solver).value for k in (1.0, 2.0, 3.0)]
    after = D.cache_info()
    everyone = COMM.allgather(tuple(after[k] - before[k] for k in names))
    ref = spla.spsolve(sp.csc_matrix(A), b)
    for k, x in zip((1.0, 2.0, 3.0), xs):
        xg = D.gather_vector(np.asarray(x), op.layout, root=None)
        assert rel_err(xg, k * ref) < 1e-8
    assert len(set(everyone)) == 1, everyone
    setups, resetups, hits, solves = everyone[0]
    assert (setups, resetups, solves) == (1, 0, 3) and hits >= 2, everyone


@collective
def test_nonfinite_input_on_one_rank():
    """NaN in one rank's right-hand side: no rank calls AmgX, every rank reports
    the failure; the next solve works."""
    A, b, op, bl = problem("poisson", 16, seed=6)
    solver = lxa.AMGX(rtol=1e-10)
    bad = bl.at[0].set(jnp.nan) if RANK == 0 else bl
    sol = lx.linear_solve(op, bad, solver=solver, throw=False)
    good = lx.linear_solve(op, bl, solver=solver).value
    assert sol.result != lx.RESULTS.successful
    x = D.gather_vector(np.asarray(good), op.layout, root=None)
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-8


@collective
def test_ranks_in_different_calls_fail_clearly():
    """Rank 0 solves with another AmgX configuration than the others: every rank
    raises, naming the problem (instead of AmgX mixing two setups); the ranks
    stay in step for the next solve."""
    A, b, op, bl = problem("poisson", 16, seed=7)
    steps = 100 if RANK == 0 else 200
    solver = lxa.AMGX(rtol=1e-8, max_steps=steps)
    with pytest.raises(Exception, match="different distributed AmgX calls"):
        jax.block_until_ready(lx.linear_solve(op, bl, solver=solver).value)
    x = lx.linear_solve(op, bl, solver=lxa.AMGX(rtol=1e-10)).value
    x = D.gather_vector(np.asarray(x), op.layout, root=None)
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-8
