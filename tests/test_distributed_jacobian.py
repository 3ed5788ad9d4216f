"""Distributed matrix-free operators (`DistributedJacobianOperator`): a Bratu
problem, -lap(u) + c du/dx - lam exp(u) = f on a 2-D grid partitioned by grid
rows, whose Newton steps over MPI ranks equal the single-process ones (the same
residual on the whole grid, `lx.JacobianLinearOperator` sparsified by
`lineax_amgx`) and scipy's. Every rank runs every test:

    mpiexec -n 2 python -m pytest tests/test_distributed_jacobian.py \\
        -m "mpi and not gpu" -q -p no:cacheprovider

(and `-n 3`). On the device, two ranks sharing one GPU:

    cd tests && mpirun --allow-run-as-root -n 2 \\
        python -m pytest test_distributed_jacobian.py -m "gpu and mpi" -q \\
        -p no:cacheprovider
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
from _mpi_helpers import (  # noqa: E402, F401 (fresh_cpu_cache: an autouse fixture)
    COMM,
    RANK,
    SIZE,
    fresh_cpu_cache,
    raises_everywhere,
)
from helpers import rel_err  # noqa: E402

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as D  # noqa: E402
from lineax_amgx.distributed import _amgx as DA, _comm as DC  # noqa: E402

pytestmark = pytest.mark.mpi
collective = _mpi_helpers.collective(COMM)

NX, NY = 11, 13  # grid columns, grid rows (rows are split over the ranks)
H = 1.0 / (NX + 1)
SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def device(backend):
    """This rank's device: the CPU, or its GPU (ranks share GPUs round-robin)."""
    if not backend.gpu:
        return jax.devices("cpu")[0]
    devices = jax.devices("cuda")
    return devices[DA._device_ordinal(DC._register(COMM)) % len(devices)]


def stencil(U, below, above, args):
    """The Bratu residual of the grid rows `U` (m x NX) with the grid rows
    `below` and `above` them (zeros at the boundary)."""
    lam, c, f = args
    P = jnp.concatenate([below[None], U, above[None]])
    P = jnp.pad(P, ((0, 0), (1, 1)))
    C = P[1:-1, 1:-1]
    lap = (4 * C - P[:-2, 1:-1] - P[2:, 1:-1] - P[1:-1, :-2] - P[1:-1, 2:]) / H**2
    conv = c * (P[1:-1, 2:] - P[1:-1, :-2]) / (2 * H)
    return (lap + conv - lam * jnp.exp(C)).ravel() - f


def global_residual(u, args):
    zero = jnp.zeros(NX, u.dtype)
    return stencil(u.reshape(NY, NX), zero, zero, args)


def local_problem(lam=1.5, c=0.0, seed=0):
    """This rank's grid rows, its halo (the grid rows above and below, declared
    in a random order), the residual of its rows, and the global data."""
    rng = np.random.default_rng(seed)
    u = 0.3 * rng.standard_normal(NX * NY)
    f = rng.standard_normal(NX * NY)
    grid_rows = D.balanced_offsets(NY, SIZE)
    lo, hi = grid_rows[RANK], grid_rows[RANK + 1]
    layout = D.Layout.from_offsets([r * NX for r in grid_rows])
    has_below, has_above = lo > 0, hi < NY
    halo = np.concatenate([
        np.arange(hi * NX, (hi + 1) * NX) if has_above else [],
        np.arange((lo - 1) * NX, lo * NX) if has_below else [],
    ]).astype(np.int64)
    # Declared in a random order (the residual reads it back in its own).
    perm = np.random.default_rng(100 + RANK).permutation(halo.size)
    inv = np.argsort(perm)
    halo = halo[perm]

    def residual(x, x_halo, args):
        zero = jnp.zeros(NX, x.dtype)
        x_halo = x_halo[inv]
        above = x_halo[:NX] if has_above else zero
        below = x_halo[-NX:] if has_below else zero
        return stencil(x.reshape(hi - lo, NX), below, above, args)

    sl = slice(lo * NX, hi * NX)
    return residual, halo, layout, sl, u, f, (lam, c)


def single_process(u, f, params, rtol):
    """The Newton step on one process: the global Jacobian sparsified by
    lineax_amgx, solved by AMGX; and its matrix."""
    args = (*params, jnp.asarray(f))
    tags = SPD if params[1] == 0 else ()
    J = lx.JacobianLinearOperator(global_residual, jnp.asarray(u), args, tags=tags)
    A = lxa.sparsify(J).to_csr()
    F = global_residual(jnp.asarray(u), args)
    dx = lx.linear_solve(A, -F, solver=lxa.AMGX(rtol=rtol)).value
    return np.asarray(F), np.asarray(dx), A.to_scipy()


@pytest.mark.parametrize("c", [0.0, 4.0], ids=["symmetric", "convected"])
@collective
def test_bratu_newton_equals_single_process(backend, c):
    residual, halo, layout, sl, u, f, params = local_problem(c=c)
    dev = device(backend)
    rtol = 1e-13  # (the system is small: AmgX reaches it in float64 too)
    put = ft_put(dev)
    args = (*params, put(f[sl]))
    tags = SPD if c == 0 else ()
    J = D.DistributedJacobianOperator(residual, put(u[sl]), halo, args,
                                      layout=layout, tags=tags)
    solver = lxa.AMGX(rtol=rtol)

    @jax.jit
    def newton_step(x):
        F, A = J.at(x).residual_and_csr()
        return x - lx.linear_solve(A, F, solver=solver).value, F, A

    # Two Newton steps (the second from the first's iterate), and the Jacobian
    # operator solved directly (AMGX assembles it itself).
    x1, F0, A0 = newton_step(put(u[sl]))
    x2, F1, _ = newton_step(x1)
    direct = jax.jit(lambda x: lx.linear_solve(J.at(x), -J.at(x).residual(),
                                               solver=solver).value)(put(u[sl]))
    glob = [D.gather_vector(np.asarray(v), layout, root=None)
            for v in (x1, x2, F0, F1, direct)]
    A_global = A0.gather_scipy(root=None)
    colors = COMM.allgather(J.coloring.num_colors)

    x1g, x2g, F0g, F1g, directg = glob
    F_ref, dx_ref, A_ref = single_process(u, f, params, rtol)
    _, dx1_ref, _ = single_process(x1g, f, params, rtol)
    # The residual and the assembled Jacobian: the single process's, exactly.
    assert rel_err(F0g, F_ref) < 1e-13
    assert (A_global != A_ref).nnz == 0 or (
        abs(A_global - A_ref).max() <= 1e-13 * abs(A_ref).max())
    assert A_global.nnz == A_ref.nnz == 5 * NX * NY - 2 * NX - 2 * NY
    # The Newton steps: the single process's and scipy's.
    dx_scipy = spla.spsolve(sp.csc_matrix(A_ref), -F_ref)
    assert rel_err(x1g - u, dx_ref) < 1e-10, rel_err(x1g - u, dx_ref)
    assert rel_err(x1g - u, dx_scipy) < 1e-10
    assert rel_err(directg, dx_ref) < 1e-10
    assert rel_err(x2g - x1g, dx1_ref) < 1e-10
    # Newton converges: the residual falls.
    assert np.linalg.norm(F1g) < 0.1 * np.linalg.norm(F0g)
    # A 5-point stencil: at most 5 colors on each rank (distance-2 in the rows).
    assert max(colors) <= 5, colors


def ft_put(dev):
    return lambda a: jax.device_put(jnp.asarray(a), dev)


@collective
def test_newton_converges_under_jit_loop():
    """Newton to convergence inside one `jit` (a `lax.while_loop` with the
    global residual norm as its condition): the converged solution satisfies the
    global residual."""
    residual, halo, layout, sl, u, f, params = local_problem(lam=2.0, seed=4)
    args = (*params, jnp.asarray(f[sl]))
    J = D.DistributedJacobianOperator(residual, jnp.asarray(u[sl]), halo, args,
                                      layout=layout, tags=SPD)
    solver = lxa.AMGX(rtol=1e-12)

    @jax.jit
    def solve(x):
        def body(carry):
            x, _, k = carry
            F, A = J.at(x).residual_and_csr()
            dx = lx.linear_solve(A, -F, solver=solver).value
            # (after the solve: every rank makes its MPI calls in one order)
            return x + dx, D.global_norm(D.after(F, dx), layout), k + 1

        def cond(carry):
            return (carry[1] > 1e-9) & (carry[2] < 20)

        return jax.lax.while_loop(cond, body, (x, jnp.inf, 0))

    x, _, steps = solve(jnp.asarray(u[sl]))
    xg = D.gather_vector(np.asarray(x), layout, root=None)
    steps = COMM.allgather(int(steps))
    F = np.asarray(global_residual(jnp.asarray(xg), (*params, jnp.asarray(f))))
    assert np.linalg.norm(F) < 1e-8 * np.linalg.norm(f), np.linalg.norm(F)
    assert len(set(steps)) == 1 and steps[0] <= 8, steps


@collective
def test_mv_and_transpose_match_the_assembled_matrix():
    residual, halo, layout, sl, u, f, params = local_problem(c=3.0, seed=2)
    args = (*params, jnp.asarray(f[sl]))
    J = D.DistributedJacobianOperator(residual, jnp.asarray(u[sl]), halo, args,
                                      layout=layout)
    v = np.random.default_rng(9).standard_normal(NX * NY)
    Jv = J.mv(jnp.asarray(v[sl]))
    Jv_jit = jax.jit(lambda w: J.mv(w))(jnp.asarray(v[sl]))
    A = J.to_csr()
    Av = A.mv(jnp.asarray(v[sl]))
    diag = lx.diagonal(J)
    A_global = A.gather_scipy(root=None)
    np.testing.assert_allclose(np.asarray(Jv), np.asarray(Av), rtol=1e-12,
                               atol=1e-12 * float(np.abs(Av).max()))
    np.testing.assert_allclose(np.asarray(Jv_jit), np.asarray(Jv), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(Av), (A_global @ v)[sl], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(diag), A_global.diagonal()[sl],
                               rtol=1e-14)
    assert not lx.is_symmetric(J)
    # The local pattern: this rank's rows against [owned, halo] columns.
    n_local = sl.stop - sl.start
    assert J.local_pattern.shape == (n_local, n_local + halo.size)
    assert J.pattern.nnz == J.local_pattern.nnz


@collective
def test_bad_input_raises_on_every_rank():
    residual, halo, layout, sl, u, f, params = local_problem()
    args = (*params, jnp.asarray(f[sl]))
    x = jnp.asarray(u[sl])
    # A halo index owned by rank 0 (on rank 0 only: every rank raises).
    bad = np.concatenate([halo, [sl.start]]) if RANK == 0 else halo
    raises_everywhere(D.DistributedError, lambda: D.DistributedJacobianOperator(
        residual, x, bad, args, layout=layout), match="owned by this rank")
    raises_everywhere(D.DistributedError, lambda: D.DistributedJacobianOperator(
        residual, x, np.concatenate([halo, halo]), args, layout=layout),
        match="duplicate" if halo.size else None)
    # A residual of the wrong length.
    raises_everywhere(D.DistributedError, lambda: D.DistributedJacobianOperator(
        lambda x, h, a: residual(x, h, a)[1:], x, halo, args, layout=layout),
        match="expected an array of shape")
    # A rank without rows (the last one) cannot join an exchange between the
    # others: refused.
    if SIZE > 2:
        counts = [NX * NY // (SIZE - 1)] * (SIZE - 1)
        counts[0] += NX * NY - sum(counts)
        empty = D.Layout.from_offsets(np.concatenate([[0], np.cumsum(counts + [0])]))
        lo_e, hi_e = empty.row_start, empty.row_end
        halo_e = np.array([hi_e] if 0 < hi_e < NX * NY else [], dtype=np.int64)
        raises_everywhere(D.DistributedError, lambda: D.DistributedJacobianOperator(
            lambda x, h, a: x, jnp.asarray(u[lo_e:hi_e]), halo_e, None,
            layout=empty), match="without rows")
    # Built inside jit: refused with the fix.
    raises_everywhere(D.DistributedError, lambda: jax.jit(
        lambda x: D.DistributedJacobianOperator(residual, x, halo, args,
                                                layout=layout).x)(x),
        match="outside jit")


@collective
def test_detection_and_tracing_happen_once():
    """The structure is found once, at construction: Newton steps at new points
    (`at`, under `jit`) detect nothing and communicate only at run time, and the
    jitted step is traced once."""
    from lineax_amgx.matrix_free import _sparsify as MF, _sparsity

    _sparsity.clear_detection_cache()  # (another test may have detected the same)
    residual, halo, layout, sl, u, f, params = local_problem(seed=6)
    traces = []

    def counted(x, x_halo, args):
        traces.append(1)
        return residual(x, x_halo, args)

    args = (*params, jnp.asarray(f[sl]))
    before = MF.detection_count()
    J = D.DistributedJacobianOperator(counted, jnp.asarray(u[sl]), halo, args,
                                      layout=layout, tags=SPD)
    detected = MF.detection_count() - before
    solver = lxa.AMGX(rtol=1e-10)
    step = jax.jit(lambda x: x - lx.linear_solve(
        J.at(x), J.at(x).residual(), solver=solver).value)
    x1 = step(jnp.asarray(u[sl]))
    n_traces = len(traces)
    x2 = step(x1)
    x3 = step(x2)
    assert detected == 1
    assert MF.detection_count() - before == 1  # no detection in the steps
    assert len(traces) == n_traces  # no retrace at new points
    assert np.all(np.isfinite(np.asarray(x3)))


@collective
def test_the_guide_script_runs(capsys):
    """The guide's Bratu script (docs/guide/distributed.md), run on these ranks:
    rank 0 prints what the page says."""
    import os
    import sys

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "docs")
    sys.path.insert(0, docs)
    try:
        import _snippets
    finally:
        sys.path.remove(docs)
    page = os.path.join(docs, "guide", "distributed.md")
    blocks = [b for b in _snippets.extract(page)
              if b["needs"] and "bratu.py" in b["needs"]]
    assert len(blocks) == 1
    capsys.readouterr()
    exec(compile(blocks[0]["code"], "bratu.py", "exec"), {"__name__": "bratu"})
    out = capsys.readouterr().out
    expected = "5 colors; |F| < 1e-8 after 3 Newton steps\n" if RANK == 0 else ""
    assert out == expected, out


@collective
def test_one_sided_halo():
    """Each rank reads only its left neighbour's last unknown (r_i = x_i^3 + 2 x_i
    - x_{i-1} - b_i): rank 0 declares no halo but sends, the last rank receives
    but sends nothing. The Newton step equals the dense one."""
    n = 40
    layout = D.Layout.balanced(n)
    lo, hi = layout.row_start, layout.row_end
    halo = np.array([lo - 1] if lo > 0 else [], dtype=np.int64)
    rng = np.random.default_rng(12)
    u, b = rng.standard_normal(n), rng.standard_normal(n)

    def residual(x, x_halo, bl):
        left = jnp.concatenate([x_halo if lo > 0 else jnp.zeros(1), x[:-1]])
        return x**3 + 2 * x - left - bl

    def global_residual(x):
        return x**3 + 2 * x - jnp.concatenate([jnp.zeros(1), x[:-1]]) - b

    J = D.DistributedJacobianOperator(residual, jnp.asarray(u[lo:hi]), halo,
                                      jnp.asarray(b[lo:hi]), layout=layout)
    F, A = jax.jit(lambda x: J.at(x).residual_and_csr())(jnp.asarray(u[lo:hi]))
    dx = lx.linear_solve(A, -F, solver=lxa.AMGX(rtol=1e-13)).value
    dxg = D.gather_vector(np.asarray(dx), layout, root=None)
    A_global = A.gather_scipy(root=None).toarray()
    jac = np.asarray(jax.jacfwd(global_residual)(jnp.asarray(u)))
    ref = np.linalg.solve(jac, -np.asarray(global_residual(jnp.asarray(u))))
    np.testing.assert_allclose(A_global, jac, rtol=1e-14, atol=1e-14)
    assert rel_err(dxg, ref) < 1e-10, rel_err(dxg, ref)


@collective
def test_one_sided_exchange_of_a_csr_operator():
    """A lower-bidiagonal `DistributedCSROperator`: rank 0 reads no halo but
    sends, the last rank receives but sends nothing (and the reverse in the
    transpose). `mv`, under `jit` too, and its gradient match scipy (a rank whose
    exchange has an empty output used to be dropped by XLA and never joined)."""
    n = 12
    A = sp.diags([np.full(n, 2.0), np.arange(1.0, n)], [0, -1], format="csr")
    op = D.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None)
    lay = op.layout
    sl = slice(lay.row_start, lay.row_end)
    rng = np.random.default_rng(13)
    x, w = rng.standard_normal(n), rng.standard_normal(n)
    y = op.mv(jnp.asarray(x[sl]))
    y_jit = jax.jit(lambda v: op.mv(v))(jnp.asarray(x[sl]))
    g = jax.grad(lambda v: D.global_dot(jnp.asarray(w[sl]), op.mv(v), lay))(
        jnp.asarray(x[sl]))
    halos = COMM.allgather(op.pattern.halo.size)
    np.testing.assert_allclose(np.asarray(y), (A @ x)[sl], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(y_jit), (A @ x)[sl], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(g), (A.T @ w)[sl], rtol=1e-14)
    assert halos[0] == 0 and all(h == 1 for h in halos[1:]), halos
