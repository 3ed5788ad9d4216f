"""Block systems (issue #10): block-CSR operators, block AMG on the CPU (pyamg)
and on the GPU (AmgX: `pytest -m gpu -s tests/test_blocks.py` on the device
prints the block vs scalar iteration counts), the near-null space
(`rigid_body_modes`), gradients w.r.t. block values.

The problems: pyamg's 2-D elasticity (2 x 2 blocks), trilinear 3-D elasticity
(3 x 3 blocks, assembled here by `elasticity3d`, which also serves
`benchmarks/blocks.py`) and coupled reaction-diffusion with 2..8 species; on the
GPU at 1e5 - 1e6 unknowns (block sizes 6..8 must be refused there with a clear
error: AmgX 2.5 crashes or has no kernel for them). Up to 2e5 unknowns the answer
is compared with scipy's `spsolve`; beyond, with the true residual.
"""

import itertools
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from _backend import cases, only
from helpers import rel_err

import lineax_amgx as lxa
from lineax_amgx import _operator
from lineax_amgx._backends import pyamg as _cpu, router as _dispatch

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::lineax_amgx.PyamgTranslationWarning",
        "ignore::lineax_amgx.NearNullspaceWarning",
        "ignore:.*Indefinite preconditioner:UserWarning",
        "ignore:Having less target vectors:UserWarning",
    ),
    pytest.mark.usefixtures("on_cpu"),
]

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)

# Parts of issue #10 that live in files owned by others (see the report):
# `options["near_nullspace"]` plumbing (_solver.py, the router, __init__.py) and
# the block-size limit (_operator.py).
HAS_NEAR_NULLSPACE = hasattr(lxa, "rigid_body_modes") and hasattr(_dispatch, "_gpu")
needs_near_nullspace = pytest.mark.skipif(
    not HAS_NEAR_NULLSPACE,
    reason="needs the near_nullspace plumbing diff (_solver/_dispatch/__init__)",
)
needs_block_limit = pytest.mark.skipif(
    not hasattr(_operator, "check_block_size"),
    reason="needs the block-size check diff in _operator.py",
)


# ---- problems ------------------------------------------------------------------------


def _q1_hex_stiffness(h: float, lam: float, mu: float) -> np.ndarray:
    """24 x 24 stiffness of a cube of side `h` (trilinear, 2x2x2 Gauss points).
    Unknowns node by node (x, y, z); nodes in `itertools.product((0, 1), repeat=3)`
    order."""
    corners = np.array(list(itertools.product((0, 1), repeat=3)), dtype=float)
    gauss = (1.0 + np.array([-1.0, 1.0]) / np.sqrt(3.0)) / 2.0
    voigt = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    D = lam * np.outer(voigt, voigt) + mu * np.diag([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    K = np.zeros((24, 24))
    for q in itertools.product(gauss, repeat=3):
        q = np.asarray(q)
        f = np.where(corners == 1, q, 1 - q)  # 1-D shape factors, (8, 3)
        df = np.where(corners == 1, 1.0, -1.0)
        grad = np.stack(
            [df[:, d] * np.prod(np.delete(f, d, axis=1), axis=1) / h for d in range(3)],
            axis=1,
        )
        B = np.zeros((6, 24))
        for a, (gx, gy, gz) in enumerate(grad):
            c = 3 * a
            B[0, c], B[1, c + 1], B[2, c + 2] = gx, gy, gz
            B[3, c + 1], B[3, c + 2] = gz, gy
            B[4, c], B[4, c + 2] = gz, gx
            B[5, c], B[5, c + 1] = gy, gx
        K += B.T @ D @ B * (h**3 / 8.0)
    return K


def elasticity3d(n: int, *, E: float = 1.0, nu: float = 0.3, clamp: str = "x0"):
    """Trilinear (Q1) linear elasticity on the unit cube cut into `n^3` cubes, as a
    `3 x 3` BSR array, assembled block by block with NumPy.

    `clamp="x0"`: the face `x = 0` is clamped (a cantilever; SPD); `"all"`: every
    boundary node; `"none"`: no boundary condition (singular: its null space is
    the six rigid-body modes). Returns `(A, coords)`, `coords` the positions of
    the nodes kept, in the order of the block rows."""
    lam = E * nu / ((1 + nu) * (1 - 2 * nu))
    mu = E / (2 * (1 + nu))
    h = 1.0 / n
    Ke = _q1_hex_stiffness(h, lam, mu).reshape(8, 3, 8, 3).transpose(0, 2, 1, 3)
    m = n + 1
    idx = np.arange(m**3).reshape(m, m, m)
    conn = np.stack(
        [
            idx[i : i + n, j : j + n, k : k + n].ravel()
            for i, j, k in itertools.product((0, 1), repeat=3)
        ],
        axis=1,
    )  # (n^3 elements, 8 nodes)
    grid = np.stack(np.meshgrid(*([np.arange(m) * h] * 3), indexing="ij"), -1)
    coords = grid.reshape(-1, 3)
    if clamp == "x0":
        keep = coords[:, 0] > h / 2
    elif clamp == "all":
        keep = np.all((coords > h / 2) & (coords < 1 - h / 2), axis=1)
    elif clamp == "none":
        keep = np.ones(m**3, bool)
    else:
        raise ValueError(f"clamp must be 'x0', 'all' or 'none', got {clamp!r}.")
    nk = int(keep.sum())
    new = np.full(m**3, -1, np.int64)
    new[keep] = np.arange(nk)
    rows = np.repeat(new[conn][:, :, None], 8, axis=2)  # (nel, 8, 8)
    cols = np.repeat(new[conn][:, None, :], 8, axis=1)
    kept = (rows >= 0) & (cols >= 0)
    key = (rows * nk + cols)[kept]
    blocks = np.broadcast_to(Ke, (len(conn), 8, 8, 3, 3))[kept]
    order = np.argsort(key, kind="stable")
    uniq, start = np.unique(key[order], return_index=True)
    data = np.add.reduceat(blocks[order], start, axis=0)
    brow = uniq // nk
    indptr = np.concatenate([[0], np.cumsum(np.bincount(brow, minlength=nk))])
    A = sp.bsr_array((data, uniq % nk, indptr), shape=(3 * nk, 3 * nk))
    return A, coords[keep]


def elasticity2d(n: int):
    """pyamg's 2-D Q1 elasticity on an `n x n` grid (2 x 2 BSR, E = 1e5; every
    boundary clamped) and its rigid-body modes."""
    import pyamg

    A, B = pyamg.gallery.linear_elasticity((n, n), format="bsr")
    return sp.bsr_array(A), B


def reaction_diffusion(n: int, b: int, rng, *, dim: int = 2):
    """`b` coupled species on an `n^dim` grid: `-div(K grad u) + R u = f` with a
    random SPD diffusion tensor `K` and reaction matrix `R` (`b x b`, the same at
    every node), 5/7-point differences, Dirichlet boundaries. SPD, with dense
    `b x b` blocks: `kron(L, K) + kron(I, R)`."""

    def spd(scale):
        q = rng.standard_normal((b, b))
        return q @ q.T / b + scale * np.eye(b)

    one = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n))
    eye = sp.eye_array(n)
    lap = one
    for _ in range(dim - 1):
        lap = sp.kron(lap, eye) + sp.kron(sp.eye_array(lap.shape[0]), one)
    K, R = spd(0.5), spd(0.1) / n**2
    a = sp.kron(lap, K) + sp.kron(sp.eye_array(lap.shape[0]), R)
    a = sp.bsr_array(sp.csr_array(a), blocksize=(b, b))
    a.sort_indices()
    return a


def random_block(nb: int, b: int, rng, *, symmetric: bool = False, density=0.15):
    """A random, block-diagonally dominant `nb*b x nb*b` BSR array with random
    (dense, non-symmetric unless `symmetric`) `b x b` blocks."""
    s = sp.random(nb, nb, density=density, random_state=rng, format="csr")
    s = s + sp.eye(nb) + sp.eye(nb, k=1)  # every diagonal block, some coupling
    s = sp.csr_array(s)
    s.sort_indices()
    data = rng.standard_normal((s.nnz, b, b))
    a = sp.bsr_array((data, s.indices, s.indptr), shape=(nb * b, nb * b))
    if symmetric:
        a = sp.bsr_array((a + a.T).tobsr(blocksize=(b, b)))
    dense_rowsum = np.asarray(abs(a).sum(axis=1)).ravel()
    a = a + sp.diags_array(dense_rowsum + 1.0 + rng.random(nb * b))
    a = sp.bsr_array(sp.csr_array(a), blocksize=(b, b))
    a.sort_indices()
    return a


def rel_residual(a, x, b) -> float:
    x = np.asarray(x, np.float64)
    return float(np.linalg.norm(b - a @ x) / np.linalg.norm(b))


def block_config(omega: float = 0.6) -> dict:
    """The block preset with a Jacobi weight for which `omega * rho(D^-1 A) < 2`
    also holds for trilinear 3-D elasticity (rho ~ 2.9 with 3 x 3 blocks)."""
    cfg = lxa.configs["PCG_AGGREGATION_BLOCK"]
    cfg["solver"]["preconditioner"]["smoother"]["relaxation_factor"] = omega
    return cfg


def _solve(op, b, *, config=None, options=None, rtol=1e-8):
    sol = lx.linear_solve(
        op,
        jnp.asarray(b),
        solver=lxa.AMGX(config, rtol=rtol),
        options=options,
        throw=False,
    )
    assert sol.result == lx.RESULTS.successful
    return np.asarray(sol.value), int(sol.stats["num_steps"])


def solve_on(backend, a, b, *, config=None, rtol=1e-10, options=None):
    """Solve on `backend` (jitted, SPD-tagged); returns `(x, iterations, seconds)`
    of the second call (the first compiles and sets up)."""
    op = backend.op(a, SPD)
    b = backend.put(b)
    f = jax.jit(
        lambda o, v: lx.linear_solve(
            o, v, solver=lxa.AMGX(config, rtol=rtol), options=options, throw=False
        )
    )
    sol = f(op, b)
    jax.block_until_ready(sol.value)
    t0 = time.perf_counter()
    sol = f(op, b)
    jax.block_until_ready(sol.value)
    seconds = time.perf_counter() - t0
    assert sol.result == lx.RESULTS.successful, sol.result
    assert sol.value.devices() == {backend.device}
    return np.asarray(sol.value), int(sol.stats["num_steps"]), seconds


def compare(backend, name, a, b, *, config=None, rtol=1e-10):
    """Block and scalar forms of `a`: both solve; returns both answers and prints
    the iteration counts."""
    x_blk, it_blk, t_blk = solve_on(backend, a, b, config=config, rtol=rtol)
    x_sc, it_sc, t_sc = solve_on(backend, sp.csr_array(a.tocsr()), b, config=config,
                                 rtol=rtol)
    print(
        f"\n{name}: n={a.shape[0]}, block {a.blocksize[0]}: {it_blk} iterations "
        f"({t_blk:.3f} s); scalar: {it_sc} iterations ({t_sc:.3f} s)"
    )
    return x_blk, it_blk, x_sc, it_sc


# The tolerance of the solves, and the bound on their relative residuals (on the
# GPU, as measured on the million-unknown problems).
RTOL = dict(cpu=1e-8, gpu=1e-10)
RESIDUAL = dict(cpu=1e-8, gpu=1.01e-10)
SPSOLVE_LIMIT = 2e5  # unknowns: above, the answer is checked by its residual only


# ---- constructors --------------------------------------------------------------------


@pytest.mark.parametrize("b", [2, 3, 4, 5, 8])
def test_from_scipy_bsr_keeps_blocks(b, rng):
    a = random_block(12, b, rng)
    op = lxa.CSROperator.from_scipy(a)
    assert op.block_size == b and op.pattern.block_size == b
    assert op.values.shape == (a.nnz // b**2, b, b)
    np.testing.assert_array_equal(op.pattern.indptr, a.indptr)
    np.testing.assert_array_equal(op.pattern.indices, a.indices)
    np.testing.assert_array_equal(np.asarray(op.as_matrix()), a.toarray())
    np.testing.assert_array_equal(op.to_scipy().toarray(), a.toarray())


@pytest.mark.parametrize("b", [2, 3, 4])
def test_scalar_matrix_blocked(b, rng):
    a = random_block(10, b, rng)
    scalar = sp.csr_array(a.tocsr())
    for op in (
        lxa.CSROperator.from_scipy(scalar, block_size=b),
        lxa.CSROperator.from_dense(scalar.toarray(), block_size=b),
    ):
        assert op.pattern.block_size == b
        np.testing.assert_array_equal(np.asarray(op.as_matrix()), a.toarray())
    op = lxa.CSROperator.from_arrays(
        a.indptr, a.indices, jnp.asarray(a.data), a.shape, block_size=b
    )
    assert op.pattern.block_size == b
    np.testing.assert_array_equal(np.asarray(op.as_matrix()), a.toarray())
    # A scalar pattern and a block pattern of one matrix are different operators
    # to the cache: different fingerprints.
    assert (
        lxa.CSROperator.from_scipy(scalar).pattern.fingerprint != op.pattern.fingerprint
    )


def test_blocking_errors(rng):
    a = sp.csr_array(sp.random(9, 9, density=0.3, random_state=rng) + sp.eye(9))
    with pytest.raises(ValueError, match="multiple of the block size"):
        lxa.CSROperator.from_scipy(a, block_size=2)
    with pytest.raises(ValueError, match="multiple"):
        lxa.CSROperator.from_dense(a.toarray(), block_size=4)
    rect = sp.bsr_array(sp.csr_array(sp.eye(12)), blocksize=(2, 3))
    with pytest.raises(ValueError, match="square"):
        lxa.CSROperator.from_scipy(rect)
    with pytest.raises(ValueError, match="shape"):
        # (nnz, 2, 3) values for a 2 x 2 block pattern
        lxa.CSROperator.from_arrays(
            np.array([0, 1]),
            np.array([0]),
            np.ones((1, 2, 3)),
            (2, 2),
            block_size=2,
        )


@needs_block_limit
def test_block_size_above_8_refused(rng):
    a = sp.csr_array(sp.eye(20) + sp.random(20, 20, density=0.1, random_state=rng))
    with pytest.raises(ValueError, match="1 to 8"):
        lxa.CSROperator.from_scipy(a, block_size=10)
    with pytest.raises(ValueError, match="1 to 8"):
        lxa.CSROperator.from_scipy(sp.bsr_array(a, blocksize=(10, 10)))
    with pytest.raises(ValueError, match="1 to 8"):
        lxa.CSROperator.from_dense(a.toarray(), block_size=10)


# ---- the operator: mv, transpose, queries --------------------------------------------


@pytest.mark.parametrize("b", [2, 3, 5])
def test_mv_transpose_queries_match_scipy(b, rng):
    a = random_block(15, b, rng)
    op = lxa.CSROperator.from_scipy(a)
    x = rng.standard_normal(a.shape[1])
    np.testing.assert_allclose(op.mv(jnp.asarray(x)), a @ x, rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(lambda o, v: o.mv(v))(op, jnp.asarray(x)), a @ x, rtol=1e-12
    )
    op_t = op.transpose()
    assert op_t.pattern.block_size == b
    np.testing.assert_allclose(op_t.mv(jnp.asarray(x)), a.T @ x, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(op_t.as_matrix()), a.toarray().T)
    np.testing.assert_array_equal(np.asarray(op.T.T.as_matrix()), a.toarray())
    np.testing.assert_array_equal(np.asarray(lx.diagonal(op)), a.diagonal())
    np.testing.assert_array_equal(
        np.asarray(lx.materialise(op).as_matrix()), a.toarray()
    )
    assert not lx.is_symmetric(op)
    assert not lx.is_diagonal(op)
    assert op.in_structure().shape == (a.shape[1],)
    assert op.out_structure().shape == (a.shape[0],)
    sym = lxa.CSROperator.from_scipy(random_block(8, b, rng, symmetric=True), tags=SPD)
    assert lx.is_symmetric(sym) and lx.is_positive_semidefinite(sym)
    assert sym.transpose() is sym


def test_grad_of_mv_wrt_block_values(rng):
    a = random_block(9, 3, rng)
    op = lxa.CSROperator.from_scipy(a)
    x = jnp.asarray(rng.standard_normal(a.shape[1]))
    w = jnp.asarray(rng.standard_normal(a.shape[0]))

    def loss(values):
        return jnp.dot(w, op.with_values(values).mv(x))

    g = np.asarray(jax.grad(loss)(op.values))
    # d(w . A x)/dA[r*b+i, c*b+j] = w[r*b+i] x[c*b+j], for every stored block (r, c)
    p = op.pattern
    ref = np.einsum(
        "ki,kj->kij",
        np.asarray(w).reshape(-1, 3)[p.row_ids],
        np.asarray(x).reshape(-1, 3)[p.indices],
    )
    np.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-14)
    # and the transpose's mv differentiates to the same blocks, transposed back
    g_t = jax.grad(lambda v: jnp.dot(x, op.with_values(v).T.mv(w)))(op.values)
    np.testing.assert_allclose(np.asarray(g_t), ref, rtol=1e-12, atol=1e-14)


# ---- solves --------------------------------------------------------------------------


def check_block_beats_scalar(backend, name, a, b, config=None):
    """Block and scalar forms of `a` both solve (to the backend's residual bound;
    up to 2e5 unknowns also against spsolve), the block form in fewer iterations."""
    x_blk, it_blk, x_sc, it_sc = compare(backend, name, a, b, config=config,
                                         rtol=RTOL[backend.name])
    assert rel_residual(a, x_blk, b) <= RESIDUAL[backend.name]
    assert rel_residual(a, x_sc, b) <= RESIDUAL[backend.name]
    assert it_blk < it_sc
    if a.shape[0] <= SPSOLVE_LIMIT:
        ref = spla.spsolve(a.tocsr().tocsc(), b)
        assert rel_err(x_blk, ref) < 1e-6
        assert rel_err(x_sc, ref) < 1e-6


@cases("n", cpu=[24], gpu=[316, 708])  # GPU: 199,712 and 1,002,528 unknowns
def test_elasticity2d_block_beats_scalar(n, rng, backend):
    a, _ = elasticity2d(n)
    b = rng.standard_normal(a.shape[0])
    check_block_beats_scalar(backend, "2-D elasticity", a, b)


def test_block_size_is_part_of_the_cache_key(rng, backend):
    """Block and scalar forms of one matrix: two entries, two fingerprints."""
    a, _ = elasticity2d(backend.pick(cpu=24, gpu=100))
    b = rng.standard_normal(a.shape[0])
    cfg = lxa.configs["PCG_AGGREGATION_BLOCK"]
    solve_on(backend, a, b, config=cfg)
    solve_on(backend, sp.csr_array(a.tocsr()), b, config=cfg)
    info = lxa.cache_info(backend.cache)
    assert info["size"] == 2
    assert info["setups"] == 2
    entries = info["entries"]
    assert sorted(e["block_size"] for e in entries) == [1, 2]
    assert len({e["fingerprint"] for e in entries}) == 2


@cases("n", cpu=[8], gpu=[20, 48])  # GPU: 26,460 and 345,744 unknowns
def test_elasticity3d_block_beats_scalar(n, rng, backend):
    a, _ = elasticity3d(n)
    assert a.blocksize == (3, 3)
    b = rng.standard_normal(a.shape[0])
    check_block_beats_scalar(backend, "3-D elasticity", a, b, config=block_config())


def test_default_block_preset_solves_3d_elasticity(rng, backend):
    # Trilinear 3-D elasticity has rho(D_b^-1 A) ~ 2.9: Jacobi smoothing with a
    # weight of 0.8 (omega * rho > 2) diverges and CG stops on an indefinite
    # preconditioner. The block presets (PCG_AGGREGATION_BLOCK by default) must
    # use a smaller weight.
    a, _ = elasticity3d(backend.pick(cpu=6, gpu=32))  # GPU: 104,544 unknowns
    b = rng.standard_normal(a.shape[0])
    x, it, seconds = solve_on(backend, a, b, rtol=RTOL[backend.name])
    print(f"\n3-D elasticity, default preset: {it} iterations ({seconds:.3f} s)")
    assert rel_residual(a, x, b) <= RESIDUAL[backend.name]


@only("gpu")
def test_block_answer_matches_cpu_backend(rng, backend):
    a, _ = elasticity3d(12)
    b = rng.standard_normal(a.shape[0])
    x_gpu, _, _ = solve_on(backend, a, b, config=block_config(), rtol=1e-11)
    with jax.default_device(jax.devices("cpu")[0]):
        op = lxa.CSROperator.from_scipy(a, tags=SPD)
        x_cpu = lx.linear_solve(
            op, jnp.asarray(b), solver=lxa.AMGX(block_config(), rtol=1e-11)
        ).value
    assert next(iter(x_cpu.devices())).platform == "cpu"
    assert rel_err(x_gpu, x_cpu) < 1e-6


# GPU: 90,000 b unknowns (the block sizes AmgX cannot take: the last test).
@cases("b", cpu=[4, 6, 8], gpu=[2, 3, 4, 5])
def test_coupled_species_block_sizes(b, rng, backend):
    """b x b blocks: coupled reaction-diffusion."""
    a = reaction_diffusion(backend.pick(cpu=12, gpu=300), b, rng)
    rhs = rng.standard_normal(a.shape[0])
    x, it, seconds = solve_on(backend, a, rhs, rtol=RTOL[backend.name])
    print(f"\nreaction-diffusion, {b} species: {it} iterations ({seconds:.3f} s)")
    assert rel_residual(a, x, rhs) <= RESIDUAL[backend.name]
    if a.shape[0] <= SPSOLVE_LIMIT:
        assert rel_err(x, spla.spsolve(a.tocsr().tocsc(), rhs)) < 1e-6


def test_nonsymmetric_block_system_fgmres(rng):
    a = random_block(60, 4, rng)
    b = rng.standard_normal(a.shape[0])
    x, steps = _solve(lxa.CSROperator.from_scipy(a), b)  # FGMRES_AGGREGATION_BLOCK
    assert rel_residual(a, x, b) <= 1e-8
    assert steps > 0


@only("gpu")
def test_nonsymmetric_block_system(rng, backend):
    # a block convection term: non-symmetric, FGMRES_AGGREGATION_BLOCK
    a = reaction_diffusion(200, 3, rng)
    n = a.shape[0] // 3
    conv = sp.kron(
        sp.diags_array([-1.0, 1.0], offsets=[-1, 0], shape=(n, n)),
        np.diag([0.3, 0.1, 0.2]),
    )
    a = sp.bsr_array(sp.csr_array(a + conv), blocksize=(3, 3))
    a.sort_indices()
    b = rng.standard_normal(a.shape[0])
    op = backend.op(a)
    sol = lx.linear_solve(op, backend.put(b), solver=lxa.AMGX(rtol=1e-10))
    assert rel_err(sol.value, spla.spsolve(a.tocsr().tocsc(), b)) < 1e-6
    # and its transpose (the backward pass of a non-symmetric solve)
    g = jax.grad(
        lambda v: jnp.sum(
            lx.linear_solve(op.with_values(v), backend.put(b), solver=lxa.AMGX()).value
        )
    )(op.values)
    assert g.shape == op.values.shape and bool(jnp.all(jnp.isfinite(g)))


def test_float32_block_solve(rng):
    a, _ = elasticity2d(12)
    b = rng.standard_normal(a.shape[0])
    op = lxa.CSROperator.from_scipy(a, tags=SPD, dtype=np.float32)
    sol = lx.linear_solve(op, jnp.asarray(b, jnp.float32), solver=lxa.AMGX())
    assert sol.value.dtype == jnp.float32
    assert rel_residual(a, sol.value, b) <= 1e-4


@pytest.mark.parametrize("config", ["PCG_CLASSICAL", "classical-dict"])
def test_classical_refused_for_blocks(config, rng):
    a, _ = elasticity2d(6)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    if config == "classical-dict":
        config = lxa.configs["PCG_AGGREGATION_BLOCK"]
        config["solver"]["preconditioner"]["algorithm"] = "CLASSICAL"
        config["solver"]["preconditioner"]["selector"] = "PMIS"
    with pytest.raises(ValueError, match="Classical AMG .* block systems"):
        lx.linear_solve(op, jnp.ones(a.shape[0]), solver=lxa.AMGX(config))
    # the same matrix as scalar CSR is fine
    scalar = lxa.CSROperator.from_scipy(sp.csr_array(a.tocsr()), tags=SPD)
    b = rng.standard_normal(a.shape[0])
    x, _ = _solve(scalar, b, config=lxa.configs["PCG_CLASSICAL"])
    assert rel_residual(a, x, b) <= 1e-8


# ---- gradients through the solve -----------------------------------------------------


def _dense_solve(pattern, values, b):
    """A float64 dense reference: assemble from the blocks, `jnp.linalg.solve`."""
    bs = pattern.block_size
    r = (pattern.row_ids[:, None, None] * bs + np.arange(bs)[:, None]).repeat(bs, 2)
    c = (pattern.indices[:, None, None] * bs + np.arange(bs)[None, :]).repeat(bs, 1)
    m = jnp.zeros(pattern.shape, values.dtype).at[r, c].add(values)
    return jnp.linalg.solve(m, b)


@pytest.mark.parametrize("kind", ["elasticity", "nonsymmetric"])
def test_grad_through_solve_wrt_block_values(kind, rng):
    if kind == "elasticity":
        a, _ = elasticity2d(6)
        a = a / 1e5
        tags = SPD
    else:
        a, tags = random_block(20, 3, rng), ()
    op = lxa.CSROperator.from_scipy(a, tags=tags)
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    w = jnp.asarray(rng.standard_normal(a.shape[0]))
    solver = lxa.AMGX(rtol=1e-12)

    def loss(values, b):
        x = lx.linear_solve(op.with_values(values), b, solver=solver).value
        return jnp.dot(w, x) + 0.5 * jnp.sum(x**2)

    def loss_ref(values, b):
        x = _dense_solve(op.pattern, values, b)
        return jnp.dot(w, x) + 0.5 * jnp.sum(x**2)

    gv, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(op.values, b)
    rv, rb = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(op.values, b)
    assert gv.shape == op.values.shape
    for g, r in ((gv, rv), (gb, rb)):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-8 * float(jnp.abs(r).max()))


@only("gpu")
def test_grad_wrt_block_values_on_gpu(rng, backend):
    a, _ = elasticity2d(10)
    a = a / 1e5
    op = backend.op(a, SPD)
    b = backend.put(rng.standard_normal(a.shape[0]))
    w = backend.put(rng.standard_normal(a.shape[0]))
    dense = jnp.asarray(a.toarray())

    def loss(values):
        x = lx.linear_solve(op.with_values(values), b, solver=lxa.AMGX(rtol=1e-12))
        return jnp.dot(w, x.value)

    g = np.asarray(jax.jit(jax.grad(loss))(op.values))
    # d(w . A^-1 b)/dA = -(A^-T w) (A^-1 b)^T, at the stored blocks
    lam = np.linalg.solve(np.asarray(dense).T, np.asarray(w))
    x = np.linalg.solve(np.asarray(dense), np.asarray(b))
    p = op.pattern
    ref = -np.einsum(
        "ki,kj->kij", lam.reshape(-1, 2)[p.row_ids], x.reshape(-1, 2)[p.indices]
    )
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())


# ---- rigid-body modes and the near-null space ----------------------------------------


@needs_near_nullspace
def test_rigid_body_modes_are_the_null_space_of_free_elasticity():
    a, coords = elasticity3d(4, clamp="none")
    B = lxa.rigid_body_modes(coords)
    assert B.shape == (a.shape[0], 6) and B.dtype == np.float64
    assert np.linalg.matrix_rank(B) == 6
    scale = np.abs(a).max() * np.abs(B).max()
    assert np.abs(a @ B).max() <= 1e-12 * scale
    # a clamped body has no rigid-body motion: A B is far from 0
    a_cl, coords_cl = elasticity3d(4)
    assert np.abs(a_cl @ lxa.rigid_body_modes(coords_cl)).max() > 1e-3 * scale


@needs_near_nullspace
def test_rigid_body_modes_2d_span_pyamg_gallery():
    n = 7
    _, B_pyamg = elasticity2d(n)
    # pyamg's interior nodes, in its order: x fastest, centred on the origin
    m = n + 1
    j, i = np.meshgrid(np.arange(1, m), np.arange(1, m), indexing="ij")
    coords = np.stack([i.ravel() - m / 2, j.ravel() - m / 2], axis=1)
    B = lxa.rigid_body_modes(coords)
    assert B.shape == B_pyamg.shape == (2 * (m - 1) ** 2, 3)
    np.testing.assert_allclose(B, B_pyamg, atol=1e-12)
    # 1-D: the constants; float32 on request
    assert np.array_equal(
        lxa.rigid_body_modes(np.arange(5.0)[:, None]), np.ones((5, 1))
    )
    assert lxa.rigid_body_modes(coords, dtype=np.float32).dtype == np.float32
    with pytest.raises(ValueError, match="num_nodes, dim"):
        lxa.rigid_body_modes(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="num_nodes, dim"):
        lxa.rigid_body_modes(np.zeros(4))


@needs_near_nullspace
@pytest.mark.parametrize("problem", ["2d", "3d"])
def test_near_nullspace_cuts_iterations(problem, rng):
    if problem == "2d":
        a, B = elasticity2d(24)
        cfg = None
    else:
        a, coords = elasticity3d(8)
        B = lxa.rigid_body_modes(coords)
        cfg = block_config()
    b = rng.standard_normal(a.shape[0])
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    _, it_default = _solve(op, b, config=cfg)
    x, it_rbm = _solve(op, b, config=cfg, options={"near_nullspace": B})
    scalar = lxa.CSROperator.from_scipy(sp.csr_array(a.tocsr()), tags=SPD)
    x_sc, it_sc_rbm = _solve(scalar, b, config=cfg, options={"near_nullspace": B})
    print(
        f"{problem} elasticity: block {it_default}, block + rigid-body modes "
        f"{it_rbm}, scalar + rigid-body modes {it_sc_rbm} iterations"
    )
    assert rel_residual(a, x, b) <= 1e-8
    assert rel_residual(a, x_sc, b) <= 1e-8
    assert it_rbm < it_default


@needs_near_nullspace
def test_near_nullspace_is_part_of_the_cache_comparison(rng):
    a, coords = elasticity3d(4)
    B = lxa.rigid_body_modes(coords)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    b = rng.standard_normal(a.shape[0])
    cfg = block_config()
    f = jax.jit(
        lambda o, v, nns: (
            lx.linear_solve(
                o, v, solver=lxa.AMGX(cfg, rtol=1e-10), options={"near_nullspace": nns}
            ).value
        )
    )
    x1 = f(op, jnp.asarray(b), jnp.asarray(B))
    x2 = f(op, jnp.asarray(b), jnp.asarray(B))  # same values, same B: no setup
    info = _cpu.cache_info()
    assert (info["setups"], info["resetups"]) == (1, 0)
    B2 = B.copy()
    B2[:, 3:] *= rng.uniform(0.5, 2.0, size=3)  # same span, different vectors
    x3 = f(op, jnp.asarray(b), jnp.asarray(B2))
    info = _cpu.cache_info()
    assert (info["setups"], info["resetups"]) == (1, 1)
    assert [e["near_nullspace"] for e in info["entries"]] == [6]
    # without a near-null space: its own entry
    lx.linear_solve(op, jnp.asarray(b), solver=lxa.AMGX(cfg, rtol=1e-10))
    assert _cpu.cache_info()["setups"] == 2
    for x in (x1, x2, x3):
        assert rel_residual(a, x, b) <= 1e-10


@needs_near_nullspace
def test_near_nullspace_vmap_and_grad(rng):
    a, B = elasticity2d(8)
    a = a / 1e5
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    solver = lxa.AMGX(rtol=1e-12)
    opts = {"near_nullspace": B}
    bs = jnp.asarray(rng.standard_normal((3, a.shape[0])))
    xs = jax.vmap(lambda v: lx.linear_solve(op, v, solver=solver, options=opts).value)(
        bs
    )
    for x, b in zip(xs, bs):
        assert rel_residual(a, x, np.asarray(b)) <= 1e-12
    w = jnp.asarray(rng.standard_normal(a.shape[0]))

    def loss(values):
        sol = lx.linear_solve(
            op.with_values(values), bs[0], solver=solver, options=opts
        )
        return jnp.dot(w, sol.value)

    g = jax.jit(jax.grad(loss))(op.values)
    ref = jax.jit(jax.grad(lambda v: jnp.dot(w, _dense_solve(op.pattern, v, bs[0]))))(
        op.values
    )
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-8 * float(jnp.abs(ref).max()))


@needs_near_nullspace
def test_near_nullspace_validation(rng):
    a, B = elasticity2d(6)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    b = jnp.ones(a.shape[0])
    with pytest.raises(ValueError, match="near_nullspace"):
        lx.linear_solve(op, b, solver=lxa.AMGX(), options={"near_nullspace": B[:-2]})
    with pytest.raises(TypeError, match="near_nullspace"):
        lx.linear_solve(
            op, b, solver=lxa.AMGX(), options={"near_nullspace": B.astype(complex)}
        )
    # one vector as a 1-D array is accepted
    x, _ = _solve(
        op, rng.standard_normal(a.shape[0]), options={"near_nullspace": B[:, 0]}
    )
    assert np.all(np.isfinite(x))


@needs_near_nullspace
def test_near_nullspace_ignored_by_amgx_with_a_warning():
    from lineax_amgx import _blocks, _warnings

    a, B = elasticity2d(6)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    state = lxa.AMGX(backend="pyamg").init(op, {})
    key = state.key._replace(backend="amgx")
    _warnings.forget(_blocks.NEAR_NULLSPACE_IGNORED)

    def setup(values, nns):
        return _dispatch.setup(op.pattern, values, key, nns)

    # Tracing is enough (this machine may have no GPU): the AmgX path drops B.
    with pytest.warns(lxa.NearNullspaceWarning, match="pyamg"):
        jaxpr = str(jax.make_jaxpr(setup)(op.values, jnp.asarray(B)))
    # (Its other branch, for non-CUDA platforms, only raises a clear error.)
    assert "lineax_amgx_setup" in jaxpr
    # the pyamg path uses it
    jaxpr = str(
        jax.make_jaxpr(lambda v, n: _dispatch.setup(op.pattern, v, state.key, n))(
            op.values, jnp.asarray(B)
        )
    )
    assert "pure_callback" in jaxpr and "lineax_amgx_setup" not in jaxpr


@only("gpu")
def test_near_nullspace_is_ignored_on_the_gpu(rng, backend):
    from lineax_amgx import _blocks, _warnings

    a, B = elasticity2d(100)
    b = rng.standard_normal(a.shape[0])
    _warnings.forget(_blocks.NEAR_NULLSPACE_IGNORED)
    x0, it0, _ = solve_on(backend, a, b)
    with pytest.warns(lxa.NearNullspaceWarning):
        x1, it1, _ = solve_on(backend, a, b, options={"near_nullspace": B})
    assert it1 == it0
    assert rel_err(x1, x0) < 1e-12


# ---- matrix-free operators with a block size -----------------------------------------


@pytest.mark.skipif(not hasattr(lxa, "sparsify"), reason="sparsify not built yet")
def test_sparsify_with_block_size(rng):
    a = random_block(10, 2, rng)
    dense = jnp.asarray(a.toarray())
    x0 = jnp.asarray(rng.standard_normal(a.shape[0]))

    def residual(u, args):
        return dense @ u + 0.1 * jnp.sin(u)

    jac_op = lx.JacobianLinearOperator(residual, x0, None)
    op = lxa.sparsify(jac_op, block_size=2)
    csr = op if isinstance(op, lxa.CSROperator) else _as_csr(op)
    assert csr.pattern.block_size == 2
    jac = np.asarray(jax.jacfwd(lambda u: residual(u, None))(x0))
    nb = a.shape[0] // 2
    blocks = jac.reshape(nb, 2, nb, 2).transpose(0, 2, 1, 3)
    p = csr.pattern
    np.testing.assert_allclose(
        np.asarray(csr.values), blocks[p.row_ids, p.indices], rtol=1e-12, atol=1e-14
    )
    # every nonzero block is in the pattern
    nonzero = np.argwhere(np.abs(blocks).sum(axis=(2, 3)) > 0)
    stored = set(zip(p.row_ids.tolist(), p.indices.tolist()))
    assert {tuple(ij) for ij in nonzero.tolist()} <= stored
    b = rng.standard_normal(a.shape[0])
    x, _ = _solve(op, b)
    assert np.linalg.norm(jac @ x - b) <= 1e-8 * np.linalg.norm(b)


def _as_csr(op):
    return lxa.as_csr_operator(op)


@cases("b", gpu=[6, 7, 8])
def test_block_sizes_amgx_cannot_take_are_refused(b, rng, backend):
    # AmgX 2.5: 6 and 8 crash with an illegal memory access (the CUDA context is
    # lost), 7 has no aggregation kernel. The core refuses them with a clear error
    # before AmgX sees them, and the process stays usable. (Last in this file: a
    # core without that check crashes the process here.)
    a = reaction_diffusion(20, b, rng)
    op = backend.op(a, SPD)
    with pytest.raises(Exception, match="block sizes 1 to 5"):
        x = lx.linear_solve(op, backend.put(np.ones(a.shape[0])), solver=lxa.AMGX())
        jax.block_until_ready(x.value)
    # the CPU backend takes them
    with jax.default_device(jax.devices("cpu")[0]):
        op_cpu = lxa.CSROperator.from_scipy(a, tags=SPD)
        rhs = rng.standard_normal(a.shape[0])
        x = lx.linear_solve(op_cpu, jnp.asarray(rhs), solver=lxa.AMGX()).value
    assert rel_residual(a, x, rhs) <= 1e-8
    # and the GPU still works
    small = reaction_diffusion(20, 3, rng)
    x_small, _, _ = solve_on(backend, small, np.ones(small.shape[0]))
    assert rel_residual(small, x_small, np.ones(small.shape[0])) <= 1.01e-10
