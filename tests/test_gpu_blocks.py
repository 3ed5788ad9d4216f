"""Block systems on AmgX (run on the device: `pytest -m gpu -s` prints the
block vs scalar iteration counts).

The problems are those of `tests/test_blocks.py` at 1e5 - 1e6 unknowns: pyamg's
2-D elasticity (2 x 2 blocks), trilinear 3-D elasticity (3 x 3 blocks, assembled
there) and coupled reaction-diffusion with 2..5 species (6..8 must be refused
with a clear error: AmgX 2.5 crashes or has no kernel for them). Up to 2e5
unknowns the answer is compared with scipy's `spsolve`; beyond, with the true
residual.
"""

import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from helpers import gpu_array, rel_err, rel_residual
from test_blocks import block_config, elasticity2d, elasticity3d, reaction_diffusion

import lineax_amgx as lxa

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::lineax_amgx.NearNullspaceWarning"),
]

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def gpu_op(a, tags=SPD, dtype=np.float64):
    op = lxa.CSROperator.from_scipy(a, tags=tags, dtype=dtype)
    return jax.device_put(op, jax.devices("cuda")[0])


def solve(a, b, *, config=None, rtol=1e-10, options=None):
    """Solve on the GPU (jitted); returns `(x, iterations, seconds)` of the second
    call (the first compiles and sets up)."""
    op = gpu_op(a)
    b = gpu_array(b)
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
    assert sol.value.devices() == {jax.devices("cuda")[0]}
    return np.asarray(sol.value), int(sol.stats["num_steps"]), seconds


def compare(name, a, b, *, config=None, rtol=1e-10):
    """Block and scalar forms of `a`: both solve; returns both answers and prints
    the iteration counts."""
    x_blk, it_blk, t_blk = solve(a, b, config=config, rtol=rtol)
    x_sc, it_sc, t_sc = solve(sp.csr_array(a.tocsr()), b, config=config, rtol=rtol)
    print(
        f"\n{name}: n={a.shape[0]}, block {a.blocksize[0]}: {it_blk} iterations "
        f"({t_blk:.3f} s); scalar: {it_sc} iterations ({t_sc:.3f} s)"
    )
    return x_blk, it_blk, x_sc, it_sc


def test_elasticity2d_200k_matches_spsolve(rng):
    a, _ = elasticity2d(316)  # 2 * 316^2 = 199712 unknowns
    b = rng.standard_normal(a.shape[0])
    x_blk, it_blk, x_sc, it_sc = compare("2-D elasticity", a, b)
    ref = spla.spsolve(a.tocsr().tocsc(), b)
    assert rel_err(x_blk, ref) < 1e-6
    assert rel_err(x_sc, ref) < 1e-6
    assert it_blk < it_sc


def test_elasticity2d_million_residual(rng):
    a, _ = elasticity2d(708)  # 1002528 unknowns
    b = rng.standard_normal(a.shape[0])
    x_blk, it_blk, x_sc, it_sc = compare("2-D elasticity", a, b)
    assert rel_residual(a, x_blk, b) <= 1.01e-10
    assert rel_residual(a, x_sc, b) <= 1.01e-10
    assert it_blk < it_sc


def test_elasticity3d_matches_spsolve(rng):
    a, _ = elasticity3d(20)  # 3 * 20 * 21^2 = 26460 unknowns
    b = rng.standard_normal(a.shape[0])
    x_blk, it_blk, x_sc, it_sc = compare("3-D elasticity", a, b, config=block_config())
    ref = spla.spsolve(a.tocsr().tocsc(), b)
    assert rel_err(x_blk, ref) < 1e-6
    assert rel_err(x_sc, ref) < 1e-6
    assert it_blk < it_sc


def test_elasticity3d_large_residual(rng):
    a, _ = elasticity3d(48)  # 3 * 48 * 49^2 = 345744 unknowns
    b = rng.standard_normal(a.shape[0])
    x_blk, it_blk, x_sc, it_sc = compare("3-D elasticity", a, b, config=block_config())
    assert rel_residual(a, x_blk, b) <= 1.01e-10
    assert rel_residual(a, x_sc, b) <= 1.01e-10
    assert it_blk < it_sc


def test_default_block_preset_3d_elasticity(rng):
    # With the default preset (PCG_AGGREGATION_BLOCK): its Jacobi weight must
    # satisfy omega * rho(D_b^-1 A) < 2 (rho ~ 2.9 here).
    a, _ = elasticity3d(32)  # 104544 unknowns
    b = rng.standard_normal(a.shape[0])
    x, it, seconds = solve(a, b)
    print(f"\n3-D elasticity, default preset: {it} iterations ({seconds:.3f} s)")
    assert rel_residual(a, x, b) <= 1.01e-10


def test_block_answer_matches_cpu_backend(rng):
    a, _ = elasticity3d(12)
    b = rng.standard_normal(a.shape[0])
    x_gpu, _, _ = solve(a, b, config=block_config(), rtol=1e-11)
    with jax.default_device(jax.devices("cpu")[0]):
        op = lxa.CSROperator.from_scipy(a, tags=SPD)
        x_cpu = lx.linear_solve(
            op, jnp.asarray(b), solver=lxa.AMGX(block_config(), rtol=1e-11)
        ).value
    assert next(iter(x_cpu.devices())).platform == "cpu"
    assert rel_err(x_gpu, x_cpu) < 1e-6


@pytest.mark.parametrize("b", [2, 3, 4, 5])
def test_every_block_size(b, rng):
    """AmgX with b x b blocks: coupled reaction-diffusion, 300^2 nodes."""
    a = reaction_diffusion(300, b, rng)  # 90000 * b unknowns
    rhs = rng.standard_normal(a.shape[0])
    x, it, seconds = solve(a, rhs)
    print(f"\nreaction-diffusion, {b} species: {it} iterations ({seconds:.3f} s)")
    assert rel_residual(a, x, rhs) <= 1.01e-10
    if b <= 2:  # 2e5 unknowns at most: spsolve is cheap
        assert rel_err(x, spla.spsolve(a.tocsr().tocsc(), rhs)) < 1e-6


def test_nonsymmetric_block_system(rng):
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
    op = gpu_op(a, tags=())
    sol = lx.linear_solve(op, gpu_array(b), solver=lxa.AMGX(rtol=1e-10))
    assert rel_err(sol.value, spla.spsolve(a.tocsr().tocsc(), b)) < 1e-6
    # and its transpose (the backward pass of a non-symmetric solve)
    g = jax.grad(
        lambda v: jnp.sum(
            lx.linear_solve(op.with_values(v), gpu_array(b), solver=lxa.AMGX()).value
        )
    )(op.values)
    assert g.shape == op.values.shape and bool(jnp.all(jnp.isfinite(g)))


def test_block_size_is_part_of_the_native_cache_key(rng):
    a, _ = elasticity2d(100)
    b = rng.standard_normal(a.shape[0])
    cfg = lxa.configs["PCG_AGGREGATION_BLOCK"]
    solve(a, b, config=cfg)
    solve(sp.csr_array(a.tocsr()), b, config=cfg)
    info = lxa.cache_info("amgx")
    assert info["size"] == 2
    assert info["setups"] == 2


def test_near_nullspace_is_ignored_on_the_gpu(rng):
    from lineax_amgx import _blocks, _warnings

    a, B = elasticity2d(100)
    b = rng.standard_normal(a.shape[0])
    _warnings.forget(_blocks.NEAR_NULLSPACE_IGNORED)
    x0, it0, _ = solve(a, b)
    with pytest.warns(lxa.NearNullspaceWarning):
        x1, it1, _ = solve(a, b, options={"near_nullspace": B})
    assert it1 == it0
    assert rel_err(x1, x0) < 1e-12


def test_grad_wrt_block_values_on_gpu(rng):
    a, _ = elasticity2d(10)
    a = a / 1e5
    op = gpu_op(a)
    b = gpu_array(rng.standard_normal(a.shape[0]))
    w = gpu_array(rng.standard_normal(a.shape[0]))
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


@pytest.mark.parametrize("b", [6, 7, 8])
def test_block_sizes_amgx_cannot_take_are_refused(b, rng):
    # AmgX 2.5: 6 and 8 crash with an illegal memory access (the CUDA context is
    # lost), 7 has no aggregation kernel. The core refuses them with a clear error
    # before AmgX sees them, and the process stays usable. (Last in this file: a
    # core without that check crashes the process here.)
    a = reaction_diffusion(20, b, rng)
    op = gpu_op(a)
    with pytest.raises(Exception, match="block sizes 1 to 5"):
        x = lx.linear_solve(op, gpu_array(np.ones(a.shape[0])), solver=lxa.AMGX())
        jax.block_until_ready(x.value)
    # the CPU backend takes them
    with jax.default_device(jax.devices("cpu")[0]):
        op_cpu = lxa.CSROperator.from_scipy(a, tags=SPD)
        rhs = rng.standard_normal(a.shape[0])
        x = lx.linear_solve(op_cpu, jnp.asarray(rhs), solver=lxa.AMGX()).value
    assert rel_residual(a, x, rhs) <= 1e-8
    # and the GPU still works
    small = reaction_diffusion(20, 3, rng)
    x_small, _, _ = solve(small, np.ones(small.shape[0]))
    assert rel_residual(small, x_small, np.ones(small.shape[0])) <= 1.01e-10
