"""Distributed operators over MPI (run under MPI, every rank runs every test):

    mpiexec -n 2 python -m pytest tests/test_distributed.py -m mpi -q \
        -p no:cacheprovider

Every test is wrapped by `collective`: the outcome of each rank is allgathered, so
a failure on one rank fails the test on all of them (and no rank waits forever
for one that has left). Collective calls come before the assertions.
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
import lineax_amgx.distributed as _distributed  # noqa: E402
from lineax_amgx._backends.contract import SolveKey, Status  # noqa: E402
from lineax_amgx.distributed import _amgx as DA  # noqa: E402

D = _distributed

pytestmark = pytest.mark.mpi

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


collective = _mpi_helpers.collective(COMM)


def raises_everywhere(exc, fn, match: str | None = None) -> str:
    """Call `fn` (collective) and check that it raised `exc` on this rank."""
    with pytest.raises(exc, match=match) as info:
        fn()
    return str(info.value)


def global_matrix(kind: str = "poisson", n: int = 6):
    """The same global matrix on every rank (built locally: no communication)."""
    if kind == "poisson":
        return poisson3d(n)
    return random_nonsymmetric(n**3, np.random.default_rng(7))


@pytest.fixture(autouse=True)
def fresh_cpu_cache():
    lxa.clear_cache()
    lxa.reset_counters()
    COMM.Barrier()
    yield
    COMM.Barrier()


# -- layout ----------------------------------------------------------------------


@collective
def test_layout_balanced():
    n = 10 * SIZE + 3
    lay = D.Layout.balanced(n)
    counts = lay.counts
    assert sum(counts) == n and len(counts) == SIZE
    assert max(counts) - min(counts) <= 1
    assert list(counts) == sorted(counts, reverse=True)  # the extra rows go first
    assert lay.offsets[0] == 0 and lay.offsets[-1] == n
    assert lay.n_local == counts[RANK]
    assert (lay.row_start, lay.row_end) == (lay.offsets[RANK], lay.offsets[RANK + 1])
    assert lay.rank == RANK and lay.size == SIZE and lay.comm_key > 0
    assert lay.comm is COMM
    np.testing.assert_array_equal(
        lay.owner(np.asarray(lay.offsets[:-1])), np.arange(SIZE)
    )
    assert hash(lay) == hash(D.Layout.balanced(n)) and lay == D.Layout.balanced(n)


@collective
def test_layout_from_local_size_uneven():
    n_local = 3 + 2 * RANK
    lay = D.Layout.from_local_size(n_local)
    expected = np.concatenate([[0], np.cumsum([3 + 2 * r for r in range(SIZE)])])
    assert lay.offsets == tuple(expected)
    assert lay.n_local == n_local
    lay2 = D.Layout.from_offsets(tuple(expected))
    assert lay2 == lay


@collective
def test_layout_errors():
    # non-decreasing offsets required
    bad = [0] + [5] * SIZE
    bad[-1] = 3  # unsorted
    msg = raises_everywhere(D.DistributedError, lambda: D.Layout.from_offsets(bad))
    assert "non-decreasing" in msg
    # wrong number of offsets
    raises_everywhere(
        D.DistributedError, lambda: D.Layout.from_offsets(list(range(SIZE + 2)))
    )
    # does not start at 0
    raises_everywhere(
        D.DistributedError,
        lambda: D.Layout.from_offsets([1 + i for i in range(SIZE + 1)]),
        match="start at 0",
    )
    if SIZE > 1:
        # ranks pass different offsets
        mine = [0] + [4 * (i + 1) + (RANK if i == 0 else 0) for i in range(SIZE)]
        raises_everywhere(
            D.DistributedError, lambda: D.Layout.from_offsets(mine), match="differ"
        )
        # ranks disagree on the global size
        raises_everywhere(
            D.DistributedError,
            lambda: D.Layout.from_local_size(4, n_global=4 * SIZE + RANK),
            match="disagree",
        )
        raises_everywhere(
            D.DistributedError, lambda: D.Layout.balanced(10 + RANK), match="disagree"
        )
    # local sizes that do not add up
    raises_everywhere(
        D.DistributedError,
        lambda: D.Layout.from_local_size(4, n_global=4 * SIZE + 1),
        match="add up",
    )


# -- construction -------------------------------------------------------------------


def _local_rows(A, lay):
    A = sp.csr_array(A)
    rows = A[lay.row_start : lay.row_end]
    rows.sort_indices()
    return rows.indptr, rows.indices.astype(np.int64), rows.data


@collective
def test_from_global_scipy_and_from_local_rows_agree():
    A = global_matrix()
    op1 = lxa.DistributedCSROperator.from_global_scipy(
        A if RANK == 0 else None, tags=SPD
    )
    lay = op1.layout
    ip, ix, vals = _local_rows(A, lay)
    op2 = lxa.DistributedCSROperator.from_local_rows(
        ip, ix, vals, A.shape[0], tags=SPD
    )
    assert op1.layout == op2.layout
    assert op1.pattern == op2.pattern
    assert op1.pattern.fingerprint == op2.pattern.fingerprint
    assert op1.pattern.global_fingerprint == op2.pattern.global_fingerprint
    np.testing.assert_array_equal(np.asarray(op1.values), np.asarray(op2.values))
    # balanced partition
    assert max(lay.counts) - min(lay.counts) <= 1
    # the local rows are the global rows
    local = op1.to_scipy_local()
    assert local.shape == (lay.n_local, A.shape[0])
    assert abs(local - A[lay.row_start : lay.row_end]).max() == 0
    # the gathered matrix is the global one
    G = op1.gather_scipy(root=None)
    assert abs(G - A).max() == 0
    # the halo plan only names off-rank columns, sorted
    halo = op1.pattern.halo
    assert np.all((halo < lay.row_start) | (halo >= lay.row_end))
    assert np.all(np.diff(halo) > 0)


@collective
def test_from_global_scipy_root_and_offsets():
    A = global_matrix()
    n = A.shape[0]
    root = SIZE - 1
    counts = [n // SIZE] * SIZE
    counts[0] += n - sum(counts)
    offsets = tuple(np.concatenate([[0], np.cumsum(counts)]))
    op = lxa.DistributedCSROperator.from_global_scipy(
        A if RANK == root else None, root=root, offsets=offsets
    )
    assert op.layout.offsets == offsets
    assert abs(op.gather_scipy(root=None) - A).max() == 0


@collective
def test_from_local_rows_sum_duplicates():
    A = global_matrix()
    lay = D.Layout.balanced(A.shape[0])
    ip, ix, vals = _local_rows(A, lay)
    # split every entry in two halves, unsorted within rows
    counts = np.diff(ip)
    ip2 = np.concatenate([[0], np.cumsum(2 * counts)])
    ix2 = np.concatenate(
        [np.concatenate([ix[a:b][::-1], ix[a:b]]) for a, b in zip(ip, ip[1:])]
    )
    v2 = np.concatenate(
        [np.concatenate([vals[a:b][::-1], vals[a:b]]) / 2 for a, b in zip(ip, ip[1:])]
    )
    op = lxa.DistributedCSROperator.from_local_rows(
        ip2, ix2, v2, A.shape[0], sum_duplicates=True
    )
    assert abs(op.gather_scipy(root=None) - A).max() < 1e-14
    # without sum_duplicates: a clear error on every rank
    raises_everywhere(
        D.DistributedError,
        lambda: lxa.DistributedCSROperator.from_local_rows(ip2, ix2, v2, A.shape[0]),
        match="sorted and unique",
    )


@collective
def test_construction_errors_on_one_rank():
    A = global_matrix()
    n = A.shape[0]
    lay = D.Layout.balanced(n)
    ip, ix, vals = _local_rows(A, lay)
    # an out-of-range column index on the last rank only
    ix_bad = ix.copy()
    if RANK == SIZE - 1:
        ix_bad[-1] = n + 5
    raises_everywhere(
        D.DistributedError,
        lambda: lxa.DistributedCSROperator.from_local_rows(ip, ix_bad, vals, n),
        match="out of range",
    )
    # values of the wrong length on rank 0 only
    vals_bad = vals if RANK else vals[:-1]
    raises_everywhere(
        D.DistributedError,
        lambda: lxa.DistributedCSROperator.from_local_rows(ip, ix, vals_bad, n),
        match="values has shape",
    )
    # a non-square matrix on the root
    raises_everywhere(
        D.DistributedError,
        lambda: lxa.DistributedCSROperator.from_global_scipy(
            sp.random(5, 4, format="csr") if RANK == 0 else None
        ),
        match="square",
    )


# -- vectors -------------------------------------------------------------------------


@collective
def test_scatter_gather_round_trip():
    n = 7 * SIZE + 2
    lay = D.Layout.balanced(n)
    x = np.arange(n, dtype=np.float64) * 1.5
    for root in range(SIZE):
        local = D.scatter_vector(x if RANK == root else None, lay, root=root)
        np.testing.assert_array_equal(local, x[lay.row_start : lay.row_end])
        back = D.gather_vector(local, lay, root=root)
        if RANK == root:
            np.testing.assert_array_equal(back, x)
        else:
            assert back is None
    everywhere = D.gather_vector(jnp.asarray(local, jnp.float32), lay, root=None)
    assert everywhere.dtype == np.float32
    np.testing.assert_array_equal(everywhere, x.astype(np.float32))


@collective
def test_vector_length_errors():
    n = 5 * SIZE
    lay = D.Layout.balanced(n)
    wrong = np.zeros(lay.n_local + (1 if RANK == SIZE - 1 else 0))
    msg = raises_everywhere(
        D.DistributedError, lambda: D.gather_vector(wrong, lay), match="owns"
    )
    assert f"rank(s) {SIZE - 1}" in msg
    raises_everywhere(
        D.DistributedError,
        lambda: D.scatter_vector(np.zeros(n + 1) if RANK == 0 else None, lay),
        match="rows",
    )
    op = lxa.DistributedCSROperator.from_global_scipy(
        global_matrix() if RANK == 0 else None
    )
    raises_everywhere(
        D.DistributedError,
        lambda: op.mv(jnp.zeros(op.layout.n_local + (RANK == 0))),
        match="The vector",
    )


# -- mv ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["poisson", "nonsymmetric"])
@collective
def test_mv_matches_scipy(kind):
    A = global_matrix(kind)
    n = A.shape[0]
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    lay = op.layout
    x = np.random.default_rng(0).standard_normal(n)
    xl = jnp.asarray(x[lay.row_start : lay.row_end])
    ref = (A @ x)[lay.row_start : lay.row_end]
    y_eager = op.mv(xl)
    y_jit = jax.jit(lambda o, v: o.mv(v))(op, xl)
    ys = jax.vmap(op.mv)(jnp.stack([xl, 2 * xl]))
    y_global = D.gather_vector(y_eager, lay, root=None)
    np.testing.assert_allclose(np.asarray(y_eager), ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.asarray(y_jit), ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.asarray(ys[1]), 2 * ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(y_global, A @ x, rtol=1e-13, atol=1e-13)


@collective
def test_mv_autodiff():
    """jvp and grad of a distributed mv (the halo exchange is transposed by
    sending the cotangents back); the loss is a global quantity on every rank."""
    A = global_matrix("nonsymmetric")
    n = A.shape[0]
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    lay = op.layout
    rng = np.random.default_rng(1)
    x, w, dx = rng.standard_normal((3, n))
    sl = slice(lay.row_start, lay.row_end)
    xl, wl, dxl = (jnp.asarray(v[sl]) for v in (x, w, dx))

    def loss(v):
        return D.global_dot(wl, op.mv(v), lay)

    val = loss(xl)
    g = jax.grad(loss)(xl)
    g_jit = jax.jit(jax.grad(loss))(xl)
    _, t = jax.jvp(op.mv, (xl,), (dxl,))
    # gradient w.r.t. the values: dL/dA_ij = w_i x_j
    g_vals = jax.grad(lambda o: D.global_dot(wl, o.mv(xl), lay))(op).values
    np.testing.assert_allclose(float(val), w @ (A @ x), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g), (A.T @ w)[sl], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g_jit), (A.T @ w)[sl], rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(t), (A @ dx)[sl], rtol=1e-12, atol=1e-12)
    local = op.to_scipy_local().tocoo()
    expected = w[sl][local.row] * x[local.col]
    np.testing.assert_allclose(np.asarray(g_vals), expected, rtol=1e-12, atol=1e-12)


@collective
def test_operator_queries_and_transpose():
    A = global_matrix()
    op = lxa.DistributedCSROperator.from_global_scipy(
        A if RANK == 0 else None, tags=SPD
    )
    lay = op.layout
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    assert not lx.is_diagonal(op)
    assert op.transpose() is op
    np.testing.assert_array_equal(
        np.asarray(lx.diagonal(op)), A.diagonal()[lay.row_start : lay.row_end]
    )
    assert op.in_structure().shape == (lay.n_local,)
    ns = lxa.DistributedCSROperator.from_global_scipy(
        global_matrix("nonsymmetric") if RANK == 0 else None
    )
    with pytest.raises(NotImplementedError, match="distributed transpose"):
        ns.transpose()
    with pytest.raises(NotImplementedError):
        op.as_matrix()


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
        info = lxa.cache_info(backend="pyamg") if _takes_backend() else (
            lxa.cache_info()
        )
        assert info["solves"] >= 2 and info["hits"] >= 1


def _takes_backend():
    import inspect

    return "backend" in inspect.signature(lxa.cache_info).parameters


@collective
def test_solve_nonsymmetric_and_warm_start():
    A = global_matrix("nonsymmetric", 8)
    n = A.shape[0]
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    lay = op.layout
    b = np.random.default_rng(4).standard_normal(n)
    bl = jnp.asarray(b[lay.row_start : lay.row_end])
    ref = spla.spsolve(sp.csc_matrix(A), b)
    solver = lxa.AMGX(rtol=1e-11)
    x1 = D.gather_vector(lx.linear_solve(op, bl, solver=solver).value, lay, None)
    y0 = jnp.asarray(ref[lay.row_start : lay.row_end])
    sol2 = lx.linear_solve(op, bl, solver=solver, options={"y0": y0})
    steps2 = int(sol2.stats["num_steps"])
    assert rel_err(x1, ref) < 1e-8
    assert steps2 <= 1


@collective
def test_solve_nonfinite_on_one_rank():
    A, b, op = _solve_problem(6)
    lay = op.layout
    bl = np.asarray(b[lay.row_start : lay.row_end]).copy()
    if RANK == SIZE - 1:
        bl[0] = np.nan
    sol = lx.linear_solve(op, jnp.asarray(bl), solver=lxa.AMGX(), throw=False)
    results = COMM.allgather(int(sol.result._value))
    assert sol.result != lx.RESULTS.successful
    assert len(set(results)) == 1  # the same verdict on every rank


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


# -- helpers --------------------------------------------------------------------------


@collective
def test_agree():
    assert D.agree(True, COMM)
    assert D.agree(RANK == 0, COMM) == (SIZE == 1)
    assert D.agree(RANK == 0, COMM, op="any")
    assert not D.agree(False, COMM, op="any")


@collective
def test_allreduce_sum_and_norms():
    lay = D.Layout.balanced(4 * SIZE)
    x = jnp.arange(lay.row_start, lay.row_end, dtype=jnp.float64)
    full = np.arange(4 * SIZE, dtype=np.float64)
    s = D.allreduce_sum(jnp.sum(x), lay)
    s_jit = jax.jit(lambda v: D.allreduce_sum(jnp.sum(v), lay))(x)
    nrm = D.global_norm(x, lay)
    vec = D.allreduce_sum(jnp.ones(3), lay)
    assert float(s) == full.sum() and float(s_jit) == full.sum()
    np.testing.assert_allclose(float(nrm), np.linalg.norm(full))
    np.testing.assert_array_equal(np.asarray(vec), np.full(3, SIZE))


@collective
def test_check_mpi_library():
    found = D.check_mpi_library(None)
    assert found in ("Open MPI", "MPICH") or found
    assert D.check_mpi_library(found) == found
    other = "Open MPI" if found == "MPICH" else "MPICH"
    with pytest.raises(RuntimeError, match="cannot cross MPI libraries"):
        D.check_mpi_library(other)


@collective
def test_native_distribution_args():
    A = global_matrix()
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    args = D.native_distribution_args(op)
    lay = op.layout
    assert args["comm_ptr"] == MPI._addressof(COMM)
    assert args["comm_handle"] == MPI._handleof(COMM)
    assert args["comm_key"] == lay.comm_key != 0
    assert args["offsets"].dtype == np.int64
    assert tuple(args["offsets"]) == lay.offsets
    assert args["indptr"].dtype == np.int32
    assert args["global_indices"].dtype == np.int64
    assert args["n_global"] == A.shape[0] and args["n_local"] == lay.n_local
    assert args["nnz_local"] == op.pattern.nnz == args["indptr"][-1]
    fps = COMM.allgather(args["global_fingerprint"])
    assert len(set(fps)) == 1


# ---------------------------------------------------------------------------
# The native (AmgX) distributed path's collective logic, with a fake AmgX: the
# GPU runs it against the real one (tests/test_gpu_distributed.py).
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

    def dist_clear_cache(self):
        self.comm.Barrier()  # collective, as destroying AmgX's entries is
        self.entries.clear()

    def dist_cache_info(self):
        return dict(hits=0, misses=0, setups=0, resetups=0, solves=0, evictions=0,
                    size=len(self.entries), entries=[])

    def dist_solve(self, ordinal, id, gen, b, x0, x):
        e = next(e for e in self.entries.values() if (e["id"], e["gen"]) == (id, gen))
        rows = np.repeat(np.arange(len(e["indptr"]) - 1), np.diff(e["indptr"]))
        local = sp.csr_matrix((e["values"], (rows, e["cols"])),
                              shape=(len(e["indptr"]) - 1, e["n"]))
        A = sp.vstack(self.comm.allgather(local)).tocsc()
        bg = np.concatenate(self.comm.allgather(np.asarray(b)))
        xg = spla.spsolve(A, bg)
        r0 = int(e["offsets"][RANK])
        x[...] = xg[r0 : r0 + len(b)]
        return 0, 1, float(np.linalg.norm(bg - A @ xg))


@pytest.fixture
def fake_amgx(monkeypatch):
    from lineax_amgx._backends.amgx import _library

    fake = FakeDistributedAmgX()
    monkeypatch.setattr(_library, "native", lambda: fake)
    monkeypatch.setattr(DA, "_checked_mpi", set())
    monkeypatch.setattr(DA, "_ordinals", {})
    monkeypatch.setattr(DA, "_amgx_comms", {})
    return fake


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


def _callback_inputs(fn, *args):
    """The input shapes of every host callback in `fn`'s jaxpr (nested ones too)."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "pure_callback":
                found.append([tuple(v.aval.shape) for v in e.invars])
            for p in e.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@collective
def test_callbacks_move_only_what_crosses_ranks():
    """The halo exchange hands the host only the entries other ranks need (and
    makes no callback when no rank needs any); `after` moves one element of each
    array, not the arrays."""
    op = lxa.DistributedCSROperator.from_global_scipy(
        global_matrix() if RANK == 0 else None)
    x = jnp.ones(op.layout.n_local)
    (halo,) = _callback_inputs(op.mv, x)
    assert halo == [(len(op.pattern.send_indices),)]
    # The reverse mode: the forward exchange, then its transpose, which hands the
    # host the halo's cotangents only.
    vjp = _callback_inputs(lambda v: jax.vjp(op.mv, v)[1](v), x)
    assert vjp == [[(len(op.pattern.send_indices),)], [(len(op.pattern.halo),)]]
    assert _callback_inputs(lambda a, b: D.after(a, b, (b, a)), x, x) == [
        [(1,), (1,), (1,), (1,)]]
    local = lxa.DistributedCSROperator.from_global_scipy(
        sp.eye(12, format="csr") * 3.0 if RANK == 0 else None)
    assert not local.pattern.communicates
    assert _callback_inputs(local.mv, jnp.ones(local.layout.n_local)) == []
    y = np.asarray(local.mv(jnp.ones(local.layout.n_local)))
    assert np.array_equal(y, np.full(local.layout.n_local, 3.0))


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