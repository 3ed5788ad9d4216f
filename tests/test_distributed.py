"""Distributed operators over MPI: layouts, construction, vectors, the
distributed mv and collectives (run under MPI, every rank runs every test):

    mpiexec -n 2 python -m pytest tests/test_distributed.py -m "mpi and not gpu" \
        -q -p no:cacheprovider

Solving with distributed operators, on the CPU and on GPUs:
`test_distributed_solve.py`.

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

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py or an MPI library is missing")

import _mpi_helpers  # noqa: E402
from _mpi_helpers import (  # noqa: E402, F401 (fresh_cpu_cache: an autouse fixture)
    COMM,
    RANK,
    SIZE,
    fresh_cpu_cache,
    global_matrix,
    raises_everywhere,
)

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as _distributed  # noqa: E402

D = _distributed

pytestmark = pytest.mark.mpi

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
collective = _mpi_helpers.collective(COMM)


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
