"""Cache controls that hold across ranks: `lineax_amgx.cache_info()` /
`clear_cache()` cover the distributed setups (collectively), isolated mode (cache
size 0) applies to distributed solves, and a failed distributed solve evicts its
setup on every rank. On the CPU (pyamg, gathered on rank 0) with 2 and 3 ranks,
the native AmgX path's collective logic with a fake AmgX:

    cd tests && mpiexec -n 3 python -m pytest test_distributed_cache.py \\
        -m "mpi and not gpu" -q -p no:cacheprovider

On the device (2 ranks sharing one GPU, AmgX's distributed solver):

    cd tests && mpirun --allow-run-as-root -n 2 python -m pytest \\
        test_distributed_cache.py -m "gpu and mpi" -q -p no:cacheprovider

Every test is collective.
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
from helpers import rel_err  # noqa: E402
from test_distributed_solve import (  # noqa: E402
    DA,
    FakeDistributedAmgX,
    install_fake_amgx,
    problem,
)

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as D  # noqa: E402
from lineax_amgx._backends.contract import SolveKey  # noqa: E402
from lineax_amgx.distributed import _comm as DC  # noqa: E402

pytestmark = pytest.mark.mpi
collective = _mpi_helpers.collective(COMM)


def world_info(info):
    """The distributed part of `lxa.cache_info()` for `COMM`'s operators."""
    (mine,) = [c for c in info["distributed"]["communicators"]
               if c["comm_key"] == DC._register(COMM)]
    return mine


def solve(op, b, **kw):
    lay = op.layout
    bl = jnp.asarray(D.scatter_vector(b if RANK == 0 else None, lay))
    x = lx.linear_solve(op, bl, solver=lxa.AMGX(rtol=1e-10), **kw).value
    return D.gather_vector(np.asarray(x), lay, root=None)


# -- the CPU path (setups held by rank 0's pyamg cache) ------------------------------


@collective
def test_public_controls_cover_distributed_setups():
    A = global_matrix("nonsymmetric", 6)
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    b = np.random.default_rng(2).standard_normal(A.shape[0])
    ref = spla.spsolve(sp.csc_matrix(A), b)
    assert rel_err(solve(op, b), ref) < 1e-8
    info = world_info(lxa.cache_info())
    # The same view on every rank: rank 0 holds the CPU setup for all of them.
    assert COMM.allgather(info["pyamg_entries"]) == [info["pyamg_entries"]] * SIZE
    assert len(info["pyamg_entries"]) == 1 and info["ranks"] == SIZE
    lxa.clear_cache()  # collective now
    info = world_info(lxa.cache_info())
    assert info["pyamg_entries"] == [] and lxa.cache_info("pyamg")["size"] == 0
    assert rel_err(solve(op, b), ref) < 1e-8  # set up afresh
    # The distributed package's own control clears the same setups.
    D.clear_cache(COMM)
    assert world_info(lxa.cache_info())["pyamg_entries"] == []


@collective
def test_isolated_mode_keeps_no_distributed_setup():
    A = global_matrix("poisson", 6)
    op = lxa.DistributedCSROperator.from_global_scipy(
        A if RANK == 0 else None, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag))
    b = np.random.default_rng(3).standard_normal(A.shape[0])
    ref = spla.spsolve(sp.csc_matrix(A), b)
    lxa.set_cache_size(0)
    try:
        before = COMM.bcast(lxa.cache_info("pyamg")["setups"], root=0)
        for k in (1.0, 2.0):
            assert rel_err(solve(op.with_values(op.values * k), b), ref / k) < 1e-8
        info = lxa.cache_info()
        assert world_info(info)["pyamg_entries"] == []
        assert info["distributed"]["size"] == 0
        setups = COMM.bcast(lxa.cache_info("pyamg")["setups"], root=0)
        assert setups - before == 2  # one build per solve, none kept
    finally:
        lxa.set_cache_size(8, entries_per_key=4)


@collective
def test_failed_solve_evicts_the_setup_on_every_rank(monkeypatch):
    from lineax_amgx._backends.pyamg import _cache as pyamg_cache

    A = global_matrix("nonsymmetric", 6)
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    b = np.random.default_rng(4).standard_normal(A.shape[0])
    ref = spla.spsolve(sp.csc_matrix(A), b)
    assert rel_err(solve(op, b), ref) < 1e-8
    assert len(world_info(lxa.cache_info())["pyamg_entries"]) == 1

    def broken(self, *args, **kwargs):
        raise FloatingPointError("injected pyamg failure")

    monkeypatch.setattr(pyamg_cache._Prepared, "solve", broken)
    raises_everywhere(Exception, lambda: solve(op, b), "injected pyamg failure")
    # Evicted: no rank sees the setup any more.
    assert world_info(lxa.cache_info())["pyamg_entries"] == []
    monkeypatch.undo()
    assert rel_err(solve(op, b), ref) < 1e-8
    assert len(world_info(lxa.cache_info())["pyamg_entries"]) == 1


@collective
def test_a_control_on_some_ranks_only_fails_clearly(monkeypatch):
    """Rank 0 clears the cache, the others do not: rank 0 raises (naming the
    collective control) instead of hanging, and the others fail at their next
    operation on that communicator. (On a duplicate communicator: a timeout
    leaves it out of step for good, see `_cache`.)"""
    if SIZE < 2:
        pytest.skip("needs two ranks")
    monkeypatch.setenv("LINEAX_AMGX_MPI_TIMEOUT", "1")
    comm = COMM.Dup()
    lxa.DistributedCSROperator.from_global_scipy(
        global_matrix() if comm.Get_rank() == 0 else None, comm=comm)
    if RANK == 0:
        with pytest.raises(D.DistributedTimeoutError,
                           match=r"clear_cache\(\) is collective"):
            D.clear_cache(comm)
    else:
        with pytest.raises(D.DistributedTimeoutError):
            D.agree(True, comm)  # meanwhile, a different operation
    with pytest.raises(D.DistributedTimeoutError, match="out of step"):
        D.agree(True, comm)
    # Gone from the public controls' scope once freed (the others still work).
    comm.Free()
    lxa.clear_cache()
    assert lxa.cache_info()["distributed"] is not None


# -- the native AmgX path's collective logic, with a fake AmgX -----------------------


class FakeAmgXWithControls(FakeDistributedAmgX):
    """The fake AmgX of test_distributed_solve with isolated mode, a solve that
    fails on one rank, and `dist_remove` (collective, as AmgX's destroy is)."""

    def __init__(self):
        super().__init__()
        self.isolated = False
        self.fail_on = None
        self.removed = []

    def dist_cache_info(self):
        return dict(super().dist_cache_info(), isolated=self.isolated)

    def dist_solve(self, ordinal, id, gen, b, x0, x):
        out = super().dist_solve(ordinal, id, gen, b, x0, x)  # (collective)
        if self.fail_on == RANK:
            raise RuntimeError("AMGX_solver_solve: injected failure")
        return out

    def dist_remove(self, ordinal, id, gen, destroy=True):
        self.comm.Barrier()  # collective, as destroying AmgX's objects is
        self.removed.append((id, gen))
        for k, e in list(self.entries.items()):
            if (e["id"], e["gen"]) == (id, gen):
                del self.entries[k]


@pytest.fixture
def fake_amgx(monkeypatch):
    return install_fake_amgx(monkeypatch, FakeAmgXWithControls())


def _native_case(fake):
    A = global_matrix("nonsymmetric")
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    b = np.random.default_rng(5).standard_normal(A.shape[0])
    bl = jnp.asarray(D.scatter_vector(b if RANK == 0 else None, op.layout))
    key = SolveKey(config='{"solver": "fake"}', mode="dDDI", transposed=False,
                   verbose=False, backend="amgx")
    return A, op, b, bl, key


@collective
def test_native_failed_solve_evicts_on_every_rank(fake_amgx):
    A, op, b, bl, key = _native_case(fake_amgx)
    ok = jnp.int32(1)
    tok = DA.amgx_setup(op.pattern, op.values, ok, key)
    assert len(fake_amgx.entries) == 1
    fake_amgx.fail_on = SIZE - 1  # one rank's AmgX fails
    raises_everywhere(Exception, lambda: jax.block_until_ready(
        DA.amgx_solve(op.pattern, op.values, tok, bl, None, ok, key)),
        "injected failure")
    assert fake_amgx.entries == {} and len(fake_amgx.removed) == 1
    fake_amgx.fail_on = None
    x, info, _ = DA.amgx_solve(op.pattern, op.values, tok, bl, None, ok, key)
    assert fake_amgx.actions[-1] == 2  # the token names nothing: set up afresh
    xg = D.gather_vector(x, op.layout, root=None)
    assert rel_err(xg, spla.spsolve(sp.csc_matrix(A), b)) < 1e-10


@collective
def test_native_isolated_mode_is_agreed(fake_amgx):
    """Isolated mode on one rank only: every rank keeps nothing (a collective
    destroy must happen on every rank or none)."""
    A, op, b, bl, key = _native_case(fake_amgx)
    fake_amgx.isolated = RANK == SIZE - 1
    ok = jnp.int32(1)
    tok = DA.amgx_setup(op.pattern, op.values, ok, key)
    assert np.asarray(tok).tolist() == [-1, -1] and fake_amgx.actions == []
    x, _, _ = DA.amgx_solve(op.pattern, op.values, tok, bl, None, ok, key)
    assert fake_amgx.actions == [2] and fake_amgx.entries == {}
    assert len(fake_amgx.removed) == 1
    xg = D.gather_vector(x, op.layout, root=None)
    assert rel_err(xg, spla.spsolve(sp.csc_matrix(A), b)) < 1e-10


# -- on GPUs (AmgX's distributed API through the FFI handlers) ------------------------


@only("gpu")
@collective
def test_gpu_public_controls_and_isolated_mode(backend):
    A, b, op, bl = problem(backend, "nonsymmetric", 16, seed=9)
    ref = spla.spsolve(sp.csc_matrix(A), b)
    solver = lxa.AMGX(rtol=1e-10)

    def x_of(o):
        x = lx.linear_solve(o, bl, solver=solver).value
        return D.gather_vector(np.asarray(x), o.layout, root=None)

    assert rel_err(x_of(op), ref) < 1e-8
    info = world_info(lxa.cache_info())
    assert info["amgx_sizes"] == [1] * SIZE, info
    lxa.clear_cache()  # collective: destroys the distributed AmgX setups
    assert world_info(lxa.cache_info())["amgx_sizes"] == [0] * SIZE
    assert D.cache_info()["size"] == 0
    assert rel_err(x_of(op), ref) < 1e-8
    lxa.set_cache_size(0)
    try:
        before = D.cache_info()
        for k in (1.5, 2.0):  # (1.0 would reuse the entry made before)
            x = x_of(op.with_values(op.values * k))
            assert rel_err(x, ref / k) < 1e-8
        after = D.cache_info()
        assert after["isolated"] and after["size"] == 0, after
        # The entry made before isolated mode is reset up by the first solve
        # (capacity changes are local, so they destroy no distributed setup),
        # then removed; the second solve sets up from scratch: two (re)setups.
        made = (after["setups"] + after["resetups"]) - (
            before["setups"] + before["resetups"])
        assert made == 2, (before, after)
        assert world_info(lxa.cache_info())["amgx_sizes"] == [0] * SIZE
    finally:
        lxa.set_cache_size(8)
