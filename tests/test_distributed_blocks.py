"""Block (BSR) distributed operators (issue 23): elasticity across MPI ranks, rows
distributed by block rows; pyamg's BSR smoothed aggregation on the CPU (the
system gathered on rank 0) and AmgX's block modes on GPUs. Every rank runs every
test (each is collective), with 2 and 3 ranks in CI:

    cd tests && mpiexec -n 3 python -m pytest test_distributed_blocks.py \\
        -m "mpi and not gpu" -q -p no:cacheprovider

On the device (two ranks sharing the one GPU, as test_distributed_solve.py):

    cd tests && mpirun --allow-run-as-root -n 2 python -m pytest \\
        test_distributed_blocks.py -m "gpu and mpi" -q -p no:cacheprovider

References come from another method: scipy's `spsolve` of the global matrix,
the single-process (single-GPU) block `CSROperator` solve, and for gradients the
adjoint formula evaluated with scipy and central finite differences.
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
    raises_everywhere,
)
from helpers import rel_err  # noqa: E402
from test_blocks import elasticity2d, elasticity3d  # noqa: E402
from test_distributed_solve import (  # noqa: E402
    FakeDistributedAmgX,
    device,
    install_fake_amgx,
)

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as D  # noqa: E402
from lineax_amgx._backends.contract import SolveKey  # noqa: E402
from lineax_amgx.distributed import _amgx as DA  # noqa: E402

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.filterwarnings(
        "ignore::lineax_amgx.PyamgTranslationWarning",
        "ignore:.*Indefinite preconditioner:UserWarning",
        "ignore:Having less target vectors:UserWarning",
    ),
]

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
collective = _mpi_helpers.collective(COMM)


# -- problems (the same global matrix on every rank, built locally) -----------------


def random_spd_like(A, seed: int = 0):
    """Random values on the block pattern of `A` (a BSR array), made SPD: the
    symmetric part plus a diagonal that makes it strictly diagonally dominant."""
    b = A.blocksize[0]
    rng = np.random.default_rng(seed)
    R = sp.bsr_array((rng.standard_normal(A.data.shape), A.indices, A.indptr),
                     shape=A.shape)
    S = sp.csr_array((R + R.T) / 2)
    S = S + sp.diags_array(np.abs(S).sum(axis=1) + 1.0 + rng.random(S.shape[0]))
    return sp.bsr_array(sp.csr_array(S), blocksize=(b, b))


def random_nonsymmetric_like(A, seed: int = 0):
    """Random non-symmetric, diagonally dominant values on `A`'s block pattern."""
    b = A.blocksize[0]
    rng = np.random.default_rng(seed)
    R = sp.csr_array(sp.bsr_array(
        (rng.standard_normal(A.data.shape), A.indices, A.indptr), shape=A.shape))
    R = R + sp.diags_array(np.abs(R).sum(axis=1) + 1.0 + rng.random(R.shape[0]))
    return sp.bsr_array(R, blocksize=(b, b))


def matrix(kind: str, n: int):
    """The global BSR matrix of a problem: `elastic2d` (pyamg's 2-D elasticity,
    2 x 2 blocks), `elastic3d` (trilinear 3-D elasticity clamped at x = 0, 3 x 3),
    `random3d` (random SPD values on the 3-D elasticity pattern)."""
    if kind == "elastic2d":
        return elasticity2d(n)[0]
    A = elasticity3d(n)[0]
    return A if kind == "elastic3d" else random_spd_like(A, seed=n)


def distribute(A, *, tags=SPD, dev=None, **kwargs):
    op = lxa.DistributedCSROperator.from_global_scipy(
        A if RANK == 0 else None, tags=tags, **kwargs)
    return op if dev is None else jax.device_put(op, dev)


def local(v_global, op, dev=None):
    """This rank's part of a global vector that every rank holds."""
    b = op.block_size
    lay = op.layout
    out = jnp.asarray(v_global[lay.row_start * b: lay.row_end * b])
    return out if dev is None else jax.device_put(out, dev)


# -- structure ----------------------------------------------------------------------


@collective
def test_block_pattern_and_mv():
    A = matrix("elastic3d", 3)
    op = distribute(A)
    p, b = op.pattern, 3
    lay = op.layout
    assert op.block_size == b and p.block_size == b
    assert p.shape == (lay.n_local * b, lay.n_global * b)
    assert op.in_structure().shape == (lay.n_local * b,)
    assert p.global_shape == A.shape
    assert p.value_shape == (p.nnz, b, b) and op.values.shape == p.value_shape
    assert p.global_shape == A.shape
    assert lay.n_global == A.shape[0] // b  # the layout counts block rows
    x = np.random.default_rng(1).standard_normal(A.shape[0])
    y = D.gather_vector(op.mv(local(x, op)), op, root=None)
    assert rel_err(y, A @ x) < 1e-13
    y_jit = D.gather_vector(jax.jit(lambda o, v: o.mv(v))(op, local(x, op)), op,
                            root=None)
    assert rel_err(y_jit, A @ x) < 1e-13
    assert abs(op.gather_scipy(root=None) - A).max() == 0
    assert rel_err(D.gather_vector(lx.diagonal(op), op, root=None), A.diagonal()) == 0
    # The global pattern the CPU backend solves with keeps the blocks.
    g = p.global_pattern(0)
    if RANK == 0:
        assert g.block_size == b and g.shape == A.shape
        np.testing.assert_array_equal(g.indices, A.indices)


@collective
def test_block_vectors_scatter_and_gather_through_the_operator():
    A = matrix("elastic2d", 6)
    op = distribute(A)
    v = np.arange(A.shape[0], dtype=float)
    part = D.scatter_vector(v if RANK == 0 else None, op)
    np.testing.assert_array_equal(part, np.asarray(local(v, op)))
    np.testing.assert_array_equal(D.gather_vector(part, op, root=None), v)
    # The bare layout counts block rows: a clear error with the fix.
    msg = raises_everywhere(D.DistributedError, lambda: D.scatter_vector(
        v if RANK == 0 else None, op.layout))
    assert "pass the operator itself" in msg, msg
    # shard_map's padding: vectors and block values.
    padded = D.pad_vector(part, op)
    assert padded.shape == (max(op.layout.counts) * 2,)
    np.testing.assert_array_equal(D.unpad_vector(padded, op), part)
    pv = D.pad_values(op.values, op.pattern)
    assert pv.shape[1:] == (2, 2)
    np.testing.assert_array_equal(D.unpad_values(pv, op.pattern), op.values)


@collective
def test_from_local_rows_with_blocks():
    A = matrix("random3d", 3)
    b = 3
    n_blocks = A.shape[0] // b
    offsets = D.balanced_offsets(n_blocks, SIZE)
    lo, hi = offsets[RANK], offsets[RANK + 1]
    ip = A.indptr
    indptr = ip[lo: hi + 1] - ip[lo]
    cols = A.indices[ip[lo]: ip[hi]]
    vals = A.data[ip[lo]: ip[hi]]
    op = lxa.DistributedCSROperator.from_local_rows(
        indptr, cols, vals, n_blocks, tags=SPD, block_size=b)
    assert op.layout.offsets == offsets and op.values.shape == (len(cols), b, b)
    # The same rows with every block split in two (summed back on the host).
    rng = np.random.default_rng(RANK)
    split = rng.random(vals.shape)
    dup = lxa.DistributedCSROperator.from_local_rows(
        indptr * 2, np.repeat(cols, 2),
        np.stack([vals * split, vals * (1 - split)], 1).reshape(-1, b, b),
        n_blocks, tags=SPD, block_size=b, sum_duplicates=True)
    assert dup.pattern == op.pattern
    np.testing.assert_allclose(np.asarray(dup.values), vals, rtol=1e-14, atol=1e-14)
    x = np.random.default_rng(2).standard_normal(A.shape[0])
    y = D.gather_vector(op.mv(local(x, op)), op, root=None)
    assert rel_err(y, A @ x) < 1e-13
    # Values of the wrong (scalar) shape: an error on every rank.
    raises_everywhere(ValueError, lambda: lxa.DistributedCSROperator(
        op.pattern, vals.reshape(-1)), match="expected")


@collective
def test_block_input_errors():
    A = matrix("elastic2d", 4)
    # Too large a block size, and a shape that is no multiple of it.
    raises_everywhere(Exception, lambda: distribute(A, block_size=9),
                      match="block_size=9 is not supported")
    odd = sp.random(9, 9, density=0.5, random_state=0, format="csr") + sp.eye(9)
    raises_everywhere(Exception, lambda: distribute(odd, block_size=2),
                      match="not a multiple of the block size")
    # A BSR matrix made scalar with block_size=1.
    op = distribute(A, block_size=1)
    assert op.block_size == 1 and op.pattern.shape[1] == A.shape[0]


# -- solves (CPU: gathered on rank 0, pyamg's BSR smoothed aggregation) ----------------


@pytest.mark.parametrize("kind, n", [("elastic2d", 12), ("elastic3d", 4),
                                     ("random3d", 4)])
@collective
def test_block_solve_matches_spsolve(kind, n):
    A = matrix(kind, n)
    b = np.random.default_rng(3).standard_normal(A.shape[0])
    op = distribute(A)
    solver = lxa.AMGX(rtol=1e-12)
    sol = lx.linear_solve(op, local(b, op), solver=solver)
    x = D.gather_vector(sol.value, op, root=None)
    x_jit = D.gather_vector(jax.jit(
        lambda o, v: lx.linear_solve(o, v, solver=solver).value)(op, local(b, op)),
        op, root=None)
    ref = spla.spsolve(sp.csc_matrix(A), b)
    assert sol.result == lx.RESULTS.successful
    assert rel_err(x, ref) < 1e-8, rel_err(x, ref)
    assert rel_err(x_jit, ref) < 1e-8
    steps = COMM.allgather(int(sol.stats["num_steps"]))
    assert len(set(steps)) == 1, steps
    if RANK == 0:  # pyamg saw the block matrix (its cache entry keeps b)
        entries = lxa.cache_info("pyamg")["entries"]
        assert entries and all(e["block_size"] == A.blocksize[0] for e in entries)


@collective
def test_block_grad_wrt_b_and_values():
    A = matrix("random3d", 3)
    bsz = 3
    b = np.random.default_rng(4).standard_normal(A.shape[0])
    w = np.random.default_rng(5).standard_normal(A.shape[0])
    op = distribute(A)
    lay = op.layout
    solver = lxa.AMGX(rtol=1e-13)
    wl = local(w, op)

    def loss(values, bl):
        x = lx.linear_solve(op.with_values(values), bl, solver=solver).value
        return D.global_dot(wl, x, op)

    gv, gb = jax.grad(loss, argnums=(0, 1))(op.values, local(b, op))
    gv_jit, gb_jit = jax.jit(jax.grad(loss, argnums=(0, 1)))(op.values, local(b, op))
    # The adjoint formula with scipy: dL/db = A^-T w, dL/dA_ij = -lam_i x_j.
    x = spla.spsolve(sp.csc_matrix(A), b)
    lam = spla.spsolve(sp.csc_matrix(A.T), w)
    rows = op.pattern.row_ids + lay.row_start
    cols = op.pattern.global_indices
    L = lam.reshape(-1, bsz)[rows]  # (nnz, b)
    X = x.reshape(-1, bsz)[cols]
    gv_ref = -L[:, :, None] * X[:, None, :]
    assert rel_err(D.gather_vector(gb, op, root=None), lam) < 1e-8
    assert rel_err(np.asarray(gv), gv_ref) < 1e-8, rel_err(np.asarray(gv), gv_ref)
    np.testing.assert_allclose(np.asarray(gv_jit), np.asarray(gv), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(gb_jit), np.asarray(gb), rtol=1e-9,
                               atol=1e-12)
    # Central finite differences along a random symmetric direction of the
    # values (a symmetric perturbation keeps the tagged operator symmetric).
    dA = random_spd_like(A, seed=11) * 1e-2
    dA = sp.bsr_array(sp.csr_array(dA), blocksize=(bsz, bsz))
    assert np.array_equal(dA.indices, A.indices)  # the same block pattern
    ip = dA.indptr
    nnz_lo = ip[lay.row_start]
    d = jnp.asarray(dA.data[nnz_lo: nnz_lo + op.pattern.nnz])
    h = 1e-4
    fd = (loss(op.values + h * d, local(b, op)) - loss(op.values - h * d,
                                                         local(b, op))) / (2 * h)
    directional = float(D.allreduce_sum(jnp.sum(gv * d), op))
    assert abs(float(fd) - directional) < 1e-6 * abs(directional), (fd, directional)


@collective
def test_nonsymmetric_block_solve_jvp_and_clear_vjp_refusal():
    A = random_nonsymmetric_like(elasticity2d(8)[0], seed=2)
    b = np.random.default_rng(6).standard_normal(A.shape[0])
    op = distribute(A, tags=())
    solver = lxa.AMGX(rtol=1e-12)
    x = D.gather_vector(lx.linear_solve(op, local(b, op), solver=solver).value, op,
                        root=None)
    ref = spla.spsolve(sp.csc_matrix(A), b)
    assert rel_err(x, ref) < 1e-8, rel_err(x, ref)
    # Forward mode needs no transpose: d x = A^-1 (db - dA x).
    db = np.random.default_rng(7).standard_normal(A.shape[0])
    dv = jnp.asarray(np.random.default_rng(8 + RANK).standard_normal(op.values.shape))
    _, dx = jax.jvp(
        lambda v, bl: lx.linear_solve(op.with_values(v), bl, solver=solver).value,
        (op.values, local(b, op)), (dv, local(db, op)))
    dA = D.DistributedCSROperator(op.pattern, dv).gather_scipy(root=None)
    dx_ref = spla.spsolve(sp.csc_matrix(A), db - dA @ ref)
    assert rel_err(D.gather_vector(dx, op, root=None), dx_ref) < 1e-7
    # Reverse mode needs the distributed block transpose: refused, clearly.
    raises_everywhere(NotImplementedError, lambda: jax.grad(
        lambda bl: jnp.sum(lx.linear_solve(op, bl, solver=solver).value))(
            local(b, op)), match="non-symmetric block")


# -- the native (AmgX) path's Python side, with a fake AmgX on the CPU ---------------


class FakeBlockAmgX(FakeDistributedAmgX):
    """test_distributed_solve's fake distributed AmgX, solving block entries: what
    the native core receives (block size, block-row offsets, `(nnz, b, b)`
    values, vectors of `n_local * b`) is what it solves."""

    def __init__(self):
        super().__init__()
        self.block_sizes = []

    def dist_setup(self, *args):
        self.block_sizes.append(args[8])  # (action, ..., transposed, block_size, ...)
        return super().dist_setup(*args)

    @staticmethod
    def local_rows(e):
        v = e["values"]
        bs = v.shape[-1]
        n_local = len(e["indptr"]) - 1
        local = sp.bsr_array((v, e["cols"], e["indptr"]),
                             shape=(n_local * bs, e["n"] * bs)).tocsr()
        return local, bs


@pytest.fixture
def fake_block_amgx(monkeypatch):
    return install_fake_amgx(monkeypatch, FakeBlockAmgX())


@collective
def test_native_path_uploads_blocks(fake_block_amgx):
    A = matrix("random3d", 3)
    op = distribute(A)
    b = np.random.default_rng(9).standard_normal(A.shape[0])
    key = SolveKey(config='{"solver": "fake"}', mode="dDDI", transposed=False,
                   verbose=False, backend="amgx")
    ok = jnp.int32(1)
    tok = DA.amgx_setup(op.pattern, op.values, ok, key)
    x, info, _ = DA.amgx_solve(op.pattern, op.values, tok, local(b, op), None, ok, key)
    # A setup, then the solve's hit (the token names the entry): both as blocks.
    assert fake_block_amgx.actions == [2, 0] and int(info[0]) == 0
    assert fake_block_amgx.block_sizes == [3, 3]
    (entry,) = fake_block_amgx.entries.values()
    assert entry["values"].shape == (op.pattern.nnz, 3, 3)
    assert entry["n"] == A.shape[0] // 3  # block rows
    assert rel_err(D.gather_vector(x, op, root=None),
                   spla.spsolve(sp.csc_matrix(A), b)) < 1e-10
    args = D.native_distribution_args(op)
    assert args["block_size"] == 3 and args["n_local"] == op.layout.n_local


# -- GPUs: AmgX's distributed block modes (2 ranks may share one GPU) ----------------


@only("gpu")
@pytest.mark.parametrize("kind, n", [("elastic2d", 120), ("elastic3d", 20),
                                     ("random3d", 16)])
@collective
def test_gpu_block_solve_equals_single_gpu(backend, kind, n):
    # 28,800 / 26,460 / 13,872 unknowns. Elasticity's condition number (~1e5)
    # bounds how close two float64 answers can be: the residual is checked to
    # 1e-10 and the answers against each other to 1e-6 (a wrong block or halo
    # order is off by O(1)).
    A = matrix(kind, n)
    dev = device(backend)
    b = np.random.default_rng(3).standard_normal(A.shape[0])
    op = distribute(A, dev=dev)
    solver = lxa.AMGX(rtol=1e-12)
    before = D.cache_info()
    sol = lx.linear_solve(op, local(b, op, dev), solver=solver)
    x = D.gather_vector(np.asarray(sol.value), op, root=None)
    single = jax.device_put(lxa.CSROperator.from_scipy(A, tags=SPD), dev)
    x1 = np.asarray(lx.linear_solve(single, jax.device_put(jnp.asarray(b), dev),
                                    solver=solver).value)
    assert sol.result == lx.RESULTS.successful
    assert np.linalg.norm(A @ x - b) <= 1e-10 * np.linalg.norm(b)
    assert rel_err(x, x1) < 1e-6, rel_err(x, x1)
    assert rel_err(x, spla.spsolve(sp.csc_matrix(A), b)) < 1e-6
    steps = COMM.allgather(int(sol.stats["num_steps"]))
    assert len(set(steps)) == 1, steps
    d = D.cache_info()
    grown = COMM.allgather((d["setups"] - before["setups"], d["solves"]
                            - before["solves"]))
    assert len(set(grown)) == 1 and grown[0][0] == 1 and grown[0][1] >= 1, grown
    mine = [e for e in d["entries"] if e["block_size"] == A.blocksize[0]]
    assert mine and mine[0]["n_local"] == op.layout.n_local, d["entries"]


@only("gpu")
@collective
def test_gpu_block_grad_and_resetup(backend):
    A = matrix("random3d", 12)
    dev = device(backend)
    b = np.random.default_rng(4).standard_normal(A.shape[0])
    w = np.random.default_rng(5).standard_normal(A.shape[0])
    op = distribute(A, dev=dev)
    solver = lxa.AMGX(rtol=1e-12)
    wl = local(w, op, dev)

    @jax.jit
    def loss(values, bl):
        x = lx.linear_solve(op.with_values(values), bl, solver=solver).value
        return D.global_dot(wl, x, op)

    gb = jax.grad(loss, argnums=1)(op.values, local(b, op, dev))
    lam = spla.spsolve(sp.csc_matrix(A.T), w)
    assert rel_err(D.gather_vector(np.asarray(gb), op, root=None), lam) < 1e-8
    # New values (2 A): a resetup of the resident block entry, the same on all.
    before = D.cache_info()["resetups"]
    f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)
    x2 = D.gather_vector(np.asarray(f(op.with_values(op.values * 2.0),
                                      local(b, op, dev))), op, root=None)
    assert rel_err(x2, spla.spsolve(sp.csc_matrix(A), b) / 2) < 1e-8
    grown = COMM.allgather(D.cache_info()["resetups"] - before)
    assert len(set(grown)) == 1 and grown[0] >= 1, grown


@only("gpu")
@collective
def test_gpu_refuses_blocks_amgx_cannot_take(backend):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 6))
    lap = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(40, 40))
    A = sp.bsr_array(sp.kron(lap, q @ q.T + 6 * np.eye(6)), blocksize=(6, 6))
    op = distribute(A, dev=device(backend))
    b = local(rng.standard_normal(A.shape[0]), op, device(backend))
    raises_everywhere(Exception, lambda: jax.block_until_ready(
        lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10)).value),
        match="6x6 block systems")
