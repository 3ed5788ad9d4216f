"""Solving with distributed operators over MPI, on the CPU (gathered on rank 0,
solved with pyamg) and on GPUs (AmgX's distributed API through the native core,
one process per GPU); the native path's collective logic with a fake AmgX on the
CPU. Every rank runs every test:

    mpiexec -n 2 python -m pytest tests/test_distributed_solve.py \\
        -m "mpi and not gpu" -q -p no:cacheprovider

On the device (AmgX built with the device's MPI; several ranks may share one GPU,
docs/guide/distributed.md):

    cd tests && mpirun --allow-run-as-root -n 2 \\
        python -m pytest test_distributed_solve.py -m "gpu and mpi" -q \\
        -p no:cacheprovider

(`LINEAX_AMGX_DISTRIBUTED_PATH=host` runs the GPU tests on the host-callback
path.) GPU references: the single-GPU AmgX solve of the same global system on
every rank (float64, to 1e-8), and scipy. The distributed AmgX counters only
grow within a process: `test_poisson_equals_single_gpu` must be the first GPU
test here.

Every test is collective, as in `test_distributed.py`.
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
from _backend import only  # noqa: E402
from _mpi_helpers import (  # noqa: E402, F401 (fresh_cpu_cache: an autouse fixture)
    COMM,
    RANK,
    SIZE,
    fresh_cpu_cache,
    global_matrix,
    raises_everywhere,
)
from helpers import poisson3d, random_nonsymmetric, rel_err  # noqa: E402

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as D  # noqa: E402
from lineax_amgx._backends.contract import SolveKey, Status  # noqa: E402
from lineax_amgx.distributed import _amgx as DA, _comm as DC  # noqa: E402

pytestmark = pytest.mark.mpi

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
collective = _mpi_helpers.collective(COMM)


def device(backend):
    """This rank's device: the CPU, or its GPU (ranks share GPUs round-robin)."""
    if not backend.gpu:
        return jax.devices("cpu")[0]
    devices = jax.devices("cuda")
    return devices[DA._device_ordinal(DC._register(COMM)) % len(devices)]


def problem(backend, kind="poisson", n=40, seed=3):
    """`(A, b, op, this rank's rows of b)`, on `backend`'s device."""
    A = poisson3d(n) if kind == "poisson" else random_nonsymmetric(
        n**3, np.random.default_rng(7))
    b = np.random.default_rng(seed).standard_normal(A.shape[0])
    tags = SPD if kind == "poisson" else ()
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None,
                                                      tags=tags)
    op = jax.device_put(op, device(backend))
    bl = jax.device_put(jnp.asarray(D.scatter_vector(b if RANK == 0 else None,
                                                     op.layout)), device(backend))
    return A, b, op, bl


# -- solves (CPU backend: gathered on rank 0, solved with pyamg) --------------------


def _solve_problem(n=16):
    A = poisson3d(n)
    rng = np.random.default_rng(3)
    b = rng.standard_normal(A.shape[0])
    op = lxa.DistributedCSROperator.from_global_scipy(
        A if RANK == 0 else None, tags=SPD
    )
    return A, b, op


@collective
def test_solve_matches_spsolve():
    A, b, op = _solve_problem(16)
    lay = op.layout
    bl = jnp.asarray(D.scatter_vector(b if RANK == 0 else None, lay))
    solver = lxa.AMGX(rtol=1e-12)
    sol = lx.linear_solve(op, bl, solver=solver)
    x = D.gather_vector(sol.value, lay, root=None)
    sol_jit = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)(op, bl)
    x_jit = D.gather_vector(sol_jit, lay, root=None)
    steps = COMM.allgather(int(sol.stats["num_steps"]))
    ref = spla.spsolve(sp.csc_matrix(A), b)
    assert sol.result == lx.RESULTS.successful
    assert rel_err(x, ref) < 1e-8, rel_err(x, ref)
    assert rel_err(x_jit, ref) < 1e-8
    assert len(set(steps)) == 1  # every rank reports the same iteration count
    if RANK == 0:
        info = lxa.cache_info("pyamg")
        assert info["solves"] >= 2 and info["hits"] >= 1


@collective
def test_grad_wrt_b_matches_single_process():
    A, b, op = _solve_problem(8)
    lay = op.layout
    sl = slice(lay.row_start, lay.row_end)
    w = np.random.default_rng(5).standard_normal(A.shape[0])
    solver = lxa.AMGX(rtol=1e-12)

    def loss(bl):
        x = lx.linear_solve(op, bl, solver=solver).value
        return D.global_dot(jnp.asarray(w[sl]), x, lay)

    g = jax.grad(loss)(jnp.asarray(b[sl]))
    g_jit = jax.jit(jax.grad(loss))(jnp.asarray(b[sl]))
    g_global = D.gather_vector(g, lay, root=None)
    # single process, on every rank: the same solver on the global CSROperator
    csr = lxa.CSROperator.from_scipy(A, tags=SPD)
    g_single = jax.grad(
        lambda bb: jnp.dot(jnp.asarray(w), lx.linear_solve(csr, bb, solver=solver)
                           .value)
    )(jnp.asarray(b))
    ref = spla.spsolve(sp.csc_matrix(A.T), w)  # a different method
    assert rel_err(g_global, ref) < 1e-8
    assert rel_err(g_global, np.asarray(g_single)) < 1e-8
    np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g), rtol=1e-10,
                               atol=1e-12)


@collective
def test_grad_wrt_values_symmetric():
    A, b, op = _solve_problem(6)
    lay = op.layout
    sl = slice(lay.row_start, lay.row_end)
    w = np.random.default_rng(6).standard_normal(A.shape[0])
    solver = lxa.AMGX(rtol=1e-12)
    bl, wl = jnp.asarray(b[sl]), jnp.asarray(w[sl])

    def loss(values):
        x = lx.linear_solve(op.with_values(values), bl, solver=solver).value
        return D.global_dot(wl, x, lay)

    g = jax.grad(loss)(op.values)
    x = spla.spsolve(sp.csc_matrix(A), b)
    y = spla.spsolve(sp.csc_matrix(A.T), w)
    local = op.to_scipy_local().tocoo()
    expected = -y[sl][local.row] * x[local.col]  # dL/dA_ij = -y_i x_j
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-7, atol=1e-10)
    # Under jit the adjoint solve and the exchange of x for dA x are independent:
    # XLA may run them in either order on each rank.
    g_jit = jax.jit(jax.grad(loss))(op.values)
    np.testing.assert_allclose(np.asarray(g_jit), expected, rtol=1e-7, atol=1e-10)


@collective
def test_independent_operations_in_one_jit():
    """No `after`: XLA may run the exchange, the reductions and the solve in any
    order, on each rank its own; the ranks must still pair the same calls."""
    A, b, op = _solve_problem(6)
    lay = op.layout
    sl = slice(lay.row_start, lay.row_end)
    rng = np.random.default_rng(11)
    x, r = rng.standard_normal(A.shape[0]), rng.standard_normal(A.shape[0])
    solver = lxa.AMGX(rtol=1e-10)

    @jax.jit
    def f(x, r, bl):
        y = op.mv(x)
        s = D.global_norm(r, lay)
        z = lx.linear_solve(op, bl, solver=solver).value
        t = D.global_dot(r, x, lay)
        return y, s, z, t

    ref_z = spla.spsolve(sp.csc_matrix(A), b)
    for _ in range(4):
        y, s, z, t = f(jnp.asarray(x[sl]), jnp.asarray(r[sl]), jnp.asarray(b[sl]))
        np.testing.assert_allclose(np.asarray(y), (A @ x)[sl], rtol=1e-12)
        np.testing.assert_allclose(float(s), np.linalg.norm(r), rtol=1e-12)
        np.testing.assert_allclose(float(t), r @ x, rtol=1e-12)
        assert rel_err(np.asarray(z), ref_z[sl]) < 1e-8


@collective
def test_different_operations_on_the_ranks_time_out(monkeypatch):
    if SIZE < 2:
        pytest.skip("needs two ranks")
    monkeypatch.setenv("LINEAX_AMGX_MPI_TIMEOUT", "1")
    comm = COMM.Dup()  # the timeout leaves its sequencer out of step for good
    with pytest.raises(D.DistributedTimeoutError, match="same MPI operation"):
        if RANK == 0:
            D.agree(True, comm)
        else:
            D.local_rank(comm)
    with pytest.raises(D.DistributedTimeoutError, match="out of step"):
        D.agree(True, comm)


# -- solves on GPUs (AmgX's distributed API), and on both ------------------------------


def single_gpu(backend, A, b, tags, rtol):
    op = jax.device_put(lxa.CSROperator.from_scipy(A, tags=tags), device(backend))
    x = lx.linear_solve(op, jax.device_put(jnp.asarray(b), device(backend)),
                        solver=lxa.AMGX(rtol=rtol)).value
    return np.asarray(x)


@only("gpu")
@collective
def test_poisson_equals_single_gpu(backend):
    A, b, op, bl = problem(backend, "poisson", 40)
    solver = lxa.AMGX(rtol=1e-12)
    d0 = D.cache_info()  # (counters accumulate over the process's tests)
    sol = lx.linear_solve(op, bl, solver=solver)
    x = D.gather_vector(np.asarray(sol.value), op.layout, root=None)
    ref = single_gpu(backend, A, b, SPD, 1e-12)
    assert sol.result == lx.RESULTS.successful
    assert rel_err(x, ref) < 1e-8, rel_err(x, ref)
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-8
    d = D.cache_info()
    everyone = COMM.allgather((d["setups"] - d0["setups"], d["resetups"],
                               d["solves"] - d0["solves"], d["size"]))
    assert len(set(everyone)) == 1, everyone  # the same counters on every rank
    assert everyone[0][0] == 1 and everyone[0][2] >= 1, everyone


@only("gpu")
@collective
def test_jit_reuses_the_setup_and_resetups_new_values(backend):
    A, b, op, bl = problem(backend, "poisson", 30)
    f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=lxa.AMGX(rtol=1e-10)).value)
    x1 = D.gather_vector(np.asarray(f(op, bl)), op.layout, root=None)
    x2 = D.gather_vector(np.asarray(f(op.with_values(op.values * 2.0), bl)),
                         op.layout, root=None)
    d = D.cache_info()
    counts = COMM.allgather((d["setups"], d["resetups"]))
    ref = spla.spsolve(sp.csc_matrix(A), b)
    assert rel_err(x1, ref) < 1e-8 and rel_err(x2, ref / 2) < 1e-8
    assert len(set(counts)) == 1 and counts[0][1] >= 1, counts


@only("gpu")
@collective
def test_grad_wrt_b_matches_single_gpu(backend):
    A, b, op, bl = problem(backend, "poisson", 24)
    solver = lxa.AMGX(rtol=1e-12)
    w = jax.device_put(jnp.asarray(D.scatter_vector(
        np.linspace(-1, 1, A.shape[0]) if RANK == 0 else None, op.layout)),
        device(backend))

    def loss(v):
        x = lx.linear_solve(op, v, solver=solver).value
        return D.allreduce_sum(jnp.sum(w * x), op.layout)

    g = D.gather_vector(np.asarray(jax.grad(loss)(bl)), op.layout, root=None)
    ref = spla.spsolve(sp.csc_matrix(A).T, np.linspace(-1, 1, A.shape[0]))
    assert rel_err(g, ref) < 1e-8


@collective
def test_solve_nonsymmetric_and_warm_start(backend):
    """A non-symmetric system; on the CPU, a warm start from the answer takes at
    most one step."""
    A, b, op, bl = problem(backend, "nonsymmetric", backend.pick(cpu=8, gpu=20),
                           seed=backend.pick(cpu=4, gpu=3))
    lay = op.layout
    ref = spla.spsolve(sp.csc_matrix(A), b)
    solver = lxa.AMGX(rtol=backend.pick(cpu=1e-11, gpu=1e-12))
    x1 = D.gather_vector(np.asarray(lx.linear_solve(op, bl, solver=solver).value),
                         lay, root=None)
    if not backend.gpu:  # (not measured on GPUs)
        y0 = jax.device_put(jnp.asarray(ref[lay.row_start : lay.row_end]),
                            device(backend))
        sol2 = lx.linear_solve(op, bl, solver=solver, options={"y0": y0})
        assert int(sol2.stats["num_steps"]) <= 1
    assert rel_err(x1, ref) < 1e-8


@only("gpu")
@collective
def test_unchanged_values_are_a_hit_without_resetup(backend):
    """Fresh `lx.linear_solve` calls with the same values: one setup, then hits
    (the values are compared with the resident ones, exactly)."""
    # (a pattern no other test has)
    A, b, op, bl = problem(backend, "poisson", 22, seed=5)
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
def test_solve_nonfinite_on_one_rank(backend):
    """NaN in one rank's right-hand side: no rank calls the solver, every rank
    reports the same failure; the next solve works."""
    A, b, op, bl = problem(backend, "poisson", backend.pick(cpu=6, gpu=16),
                           seed=backend.pick(cpu=3, gpu=6))
    solver = lxa.AMGX(rtol=1e-10)
    bad = bl.at[0].set(jnp.nan) if RANK == backend.pick(cpu=SIZE - 1, gpu=0) else bl
    sol = lx.linear_solve(op, bad, solver=solver, throw=False)
    good = lx.linear_solve(op, bl, solver=solver).value
    results = COMM.allgather(int(sol.result._value))
    x = D.gather_vector(np.asarray(good), op.layout, root=None)
    assert sol.result != lx.RESULTS.successful
    assert len(set(results)) == 1  # the same verdict on every rank
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-8


@only("gpu")
@collective
def test_ranks_in_different_calls_fail_clearly(backend):
    """Rank 0 solves with another AmgX configuration than the others: every rank
    raises, naming the problem (instead of AmgX mixing two setups); the ranks
    stay in step for the next solve."""
    A, b, op, bl = problem(backend, "poisson", 16, seed=7)
    steps = 100 if RANK == 0 else 200
    solver = lxa.AMGX(rtol=1e-8, max_steps=steps)
    with pytest.raises(Exception, match="different distributed AmgX calls"):
        jax.block_until_ready(lx.linear_solve(op, bl, solver=solver).value)
    x = lx.linear_solve(op, bl, solver=lxa.AMGX(rtol=1e-10)).value
    x = D.gather_vector(np.asarray(x), op.layout, root=None)
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-8


# ---------------------------------------------------------------------------
# The native (AmgX) distributed path's collective logic, with a fake AmgX: the
# GPU runs it against the real one (above).
# ---------------------------------------------------------------------------


class FakeDistributedAmgX:
    """Stands in for the native core's `dist_*` functions with the same contract:
    a cache of one entry per key, `dist_probe` (0 hit, 1 resetup, 2 setup),
    `dist_setup(action, ...)` collective, `dist_solve` collective (here: the
    global system gathered on every rank and solved with scipy)."""

    def __init__(self):
        import mpi4py.MPI as M

        self.comm = COMM.Dup()
        self.entries = {}  # key -> dict(id, gen, values, pattern...)
        self.actions = []
        self.next_id = 1
        self.path = M.__file__

    def cuda_devices(self):
        return ["fake GPU"]

    def is_loaded(self):
        return True

    def library_info(self):
        return {"path": self.path}

    def _key(self, comm_key, fingerprint, config, mode, transposed, block_size):
        return (comm_key, fingerprint, config, mode, transposed, block_size)

    def dist_probe(self, ordinal, comm_key, fingerprint, config, mode, transposed,
                   block_size, values, id, gen):
        from lineax_amgx._backends import _native as codes

        e = self.entries.get(self._key(comm_key, fingerprint, config, mode, transposed,
                                       block_size))
        if e is None:
            return codes.PROBE_SETUP, -1, -1
        same = (e["id"], e["gen"]) == (id, gen) or np.array_equal(e["values"], values)
        return (codes.PROBE_HIT if same else codes.PROBE_RESETUP), e["id"], e["gen"]

    def dist_setup(self, action, ordinal, comm_key, comm_ptr, fingerprint, config, mode,
                   transposed, block_size, n_global, offsets, indptr, global_indices,
                   values):
        from lineax_amgx._backends import _native as codes

        assert comm_ptr != MPI._addressof(COMM)  # AmgX gets its own Dup
        self.comm.Barrier()  # collective, as AmgX's setup is
        self.actions.append(action)
        key = self._key(comm_key, fingerprint, config, mode, transposed, block_size)
        e = self.entries.get(key)
        if action == codes.PROBE_HIT:
            return e["id"], e["gen"]
        if action == codes.PROBE_RESETUP:
            e["values"] = np.array(values)
            e["gen"] += 1
            return e["id"], e["gen"]
        e = dict(id=self.next_id, gen=0, values=np.array(values), indptr=indptr,
                 cols=global_indices, offsets=offsets, n=n_global)
        self.next_id += 1
        self.entries[key] = e
        return e["id"], e["gen"]

    def dist_clear_cache(self, comm_key=-1):
        self.comm.Barrier()  # collective, as destroying AmgX's entries is
        self.entries.clear()

    def dist_cache_info(self):
        return dict(hits=0, misses=0, setups=0, resetups=0, solves=0, evictions=0,
                    size=len(self.entries), entries=[])

    @staticmethod
    def local_rows(e):
        """This rank's rows of an entry as scipy CSR, and the block size."""
        rows = np.repeat(np.arange(len(e["indptr"]) - 1), np.diff(e["indptr"]))
        local = sp.csr_matrix((e["values"], (rows, e["cols"])),
                              shape=(len(e["indptr"]) - 1, e["n"]))
        return local, 1

    def dist_solve(self, ordinal, id, gen, b, x0, x):
        e = next(e for e in self.entries.values() if (e["id"], e["gen"]) == (id, gen))
        local, bs = self.local_rows(e)
        A = sp.vstack(self.comm.allgather(local)).tocsc()
        bg = np.concatenate(self.comm.allgather(np.asarray(b)))
        xg = spla.spsolve(A, bg)
        r0 = int(e["offsets"][RANK]) * bs
        x[...] = xg[r0 : r0 + len(b)]
        return 0, 1, float(np.linalg.norm(bg - A @ xg))


def install_fake_amgx(monkeypatch, fake):
    """`fake` in place of the native core, with the distributed AmgX module's
    per-process state (MPI check, ordinals, AmgX communicators) fresh."""
    from lineax_amgx._backends.amgx import _library

    monkeypatch.setattr(_library, "native", lambda: fake)
    monkeypatch.setattr(DA, "_checked_mpi", set())
    monkeypatch.setattr(DA, "_ordinals", {})
    monkeypatch.setattr(DA, "_amgx_comms", {})
    return fake


@pytest.fixture
def fake_amgx(monkeypatch):
    return install_fake_amgx(monkeypatch, FakeDistributedAmgX())


@collective
def test_native_path_agrees_on_setup_hit_and_resetup(fake_amgx):
    A = global_matrix("nonsymmetric")
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    pattern, lay = op.pattern, op.layout
    rng = np.random.default_rng(11)
    b = rng.standard_normal(A.shape[0])
    bl = jnp.asarray(D.scatter_vector(b if RANK == 0 else None, lay))
    key = SolveKey(config='{"solver": "fake"}', mode="dDDI", transposed=False,
                   verbose=False, backend="amgx")
    ok = jnp.int32(1)
    tok = DA.amgx_setup(pattern, op.values, ok, key)
    assert fake_amgx.actions == [2]  # nobody had it: set up together
    x, info, _ = DA.amgx_solve(pattern, op.values, tok, bl, None, ok, key)
    assert fake_amgx.actions == [2, 0]  # the token names the setup: a hit
    assert int(info[0]) == 0
    xg = D.gather_vector(x, lay, root=None)
    assert rel_err(xg, spla.spsolve(sp.csc_matrix(A), b)) < 1e-10
    # New values on the last rank only, and a token that no longer names them
    # there: that rank must resetup, so every rank does (a collective resetup).
    scale = 2.0 if RANK == SIZE - 1 else 1.0
    values = op.values * scale
    bad = tok if RANK != SIZE - 1 else jnp.array([-5, -5], jnp.int32)
    x, info, _ = DA.amgx_solve(pattern, values, bad, bl, None, ok, key)
    assert fake_amgx.actions == [2, 0, 1]
    A2 = sp.vstack(COMM.allgather(
        sp.csr_matrix(A)[lay.row_start : lay.row_end] * scale)).tocsc()
    xg = D.gather_vector(x, lay, root=None)
    assert rel_err(xg, spla.spsolve(A2, b)) < 1e-10
    # Non-finite values on one rank: nobody calls AmgX, everybody gets NONFINITE.
    x, info, _ = DA.amgx_solve(pattern, values, tok, bl, None,
                              jnp.int32(0 if RANK == 0 else 1), key)
    assert fake_amgx.actions == [2, 0, 1]
    assert int(info[0]) == Status.NONFINITE


@collective
def test_native_path_refuses_ranks_in_different_calls(fake_amgx):
    """Rank 0 sets up with another configuration: every rank raises, and nobody
    reaches AmgX (which would mix the two)."""
    op = lxa.DistributedCSROperator.from_global_scipy(
        global_matrix() if RANK == 0 else None)
    key = SolveKey(config=f'{{"solver": "fake{int(RANK == 0)}"}}', mode="dDDI",
                   transposed=False, verbose=False, backend="amgx")
    raises_everywhere(Exception, lambda: jax.block_until_ready(
        DA.amgx_setup(op.pattern, op.values, jnp.int32(1), key)),
        "different distributed AmgX calls")
    assert fake_amgx.actions == []


@collective
def test_distributed_clear_cache_is_collective(fake_amgx):
    A = global_matrix()
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    key = SolveKey(config='{"solver": "fake"}', mode="dDDI", transposed=False,
                   verbose=False, backend="amgx")
    DA.amgx_setup(op.pattern, op.values, jnp.int32(1), key)
    assert D.cache_info()["size"] == 1
    D.clear_cache(COMM)
    assert D.cache_info()["size"] == 0
    DA.amgx_setup(op.pattern, op.values, jnp.int32(1), key)
    assert fake_amgx.actions == [2, 2]  # set up afresh, together


@collective
def test_native_path_checks_amgx_mpi(fake_amgx, monkeypatch):
    family = D.amgx_mpi_library()  # the fake "AmgX" is mpi4py's own module
    assert family == D.mpi_library()
    key = lxa.DistributedCSROperator.from_global_scipy(
        global_matrix() if RANK == 0 else None).layout.comm_key
    DA._check_native_mpi(key)
    other = "Open MPI" if family == "MPICH" else "MPICH"
    monkeypatch.setattr(DA, "_checked_mpi", set())
    monkeypatch.setattr(DA, "amgx_mpi_library", lambda: other)
    raises_everywhere(RuntimeError, lambda: DA._check_native_mpi(key),
                      "cannot cross MPI libraries")
    monkeypatch.setattr(DA, "amgx_mpi_library", lambda: None)
    raises_everywhere(RuntimeError, lambda: DA._check_native_mpi(key),
                      "links no MPI library")


def test_native_path_selection(monkeypatch):
    monkeypatch.delenv(DA._PATH_ENV, raising=False)
    assert DA.native_path() == "ffi"
    monkeypatch.setenv(DA._PATH_ENV, "host")
    assert DA.native_path() == "host"
    monkeypatch.setenv(DA._PATH_ENV, "gpu")
    with pytest.raises(ValueError, match="LINEAX_AMGX_DISTRIBUTED_PATH"):
        DA.native_path()


def _ffi_eqn(fn, *args):
    (eqn,) = [e for e in jax.make_jaxpr(fn)(*args).eqns
              if e.primitive.name == "ffi_call"]
    return eqn.params["target_name"], dict(eqn.params["attributes"])


@collective
def test_ffi_path_traces_with_a_signature_every_rank_shares(monkeypatch):
    """The CUDA branch (traced on every machine): one FFI call, named by the
    local structure, and a signature that is the same on every rank for the same
    logical call (the handlers compare it), different for another call."""
    monkeypatch.delenv(DA._PATH_ENV, raising=False)
    A = global_matrix("nonsymmetric")
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    key = SolveKey(config="{}", mode="dDDI", transposed=False, verbose=False,
                   backend="amgx")
    ok, b = jnp.int32(1), jnp.ones(op.layout.n_local)
    tok = jnp.zeros(2, jnp.int32)
    name, setup = _ffi_eqn(
        lambda v, o: DA.gpu_backend.setup(op.pattern, v, o, key), op.values, ok)
    assert name == "lineax_amgx_dist_setup"
    assert setup["fingerprint"] == op.pattern.fingerprint
    assert setup["comm_key"] == op.layout.comm_key
    name, solve = _ffi_eqn(lambda v, t, x, o: DA.gpu_backend.solve(
        op.pattern, v, t, x, None, o, key), op.values, tok, b, ok)
    assert name == "lineax_amgx_dist_solve" and solve["has_x0"] == 0
    _, solve_t = _ffi_eqn(lambda v, t, x, o: DA.gpu_backend.solve(
        op.pattern, v, t, x, x, o, key._replace(transposed=True)),
        op.values, tok, b, ok)
    assert solve_t["has_x0"] == 1
    sigs = COMM.allgather((int(setup["signature"]), int(solve["signature"]),
                           int(solve_t["signature"])))
    fps = COMM.allgather(int(setup["fingerprint"]))
    assert len(set(sigs)) == 1  # the same on every rank ...
    assert len(set(fps)) == SIZE  # ... though each rank's structure differs
    assert len(set(sigs[0])) == 3  # setup, solve, transposed solve: all differ
    assert all(0 < s < 2**62 for s in sigs[0])
