"""Runtime arrays on the GPU (issue 20; run on the device: `pytest -m gpu`).

The CUDA handler of `lineax_amgx_runtime_array` uploads a registered host array
once per device and copies it on the device at every call; `clear_cache()` frees
the device copies (programs upload again), and so does the pattern's death. The
compiled GPU programs of a solve and of a gradient hold no large constants.
"""

import gc

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from helpers import (
    compiled_constants,
    convected_poisson3d,
    gpu_array,
    large,
    lowered_constants,
    poisson3d,
    rel_err,
)

import lineax_amgx as lxa
from lineax_amgx._backends import _native

pytestmark = pytest.mark.gpu

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


_nonsymmetric = convected_poisson3d


def _gpu_op(a, tags=()):
    return jax.device_put(lxa.CSROperator.from_scipy(a, tags=tags),
                          jax.devices("cuda")[0])


def _queries(op):
    # mv, the transpose's mv (the transposition permutation, the transposed
    # pattern's indices and row ids) and the diagonal: 6 runtime arrays.
    return jax.jit(lambda o, x: (o.mv(x), o.transpose().mv(x), lx.diagonal(o)))


def test_uploaded_once_then_copied_on_the_device(rng):
    a = _nonsymmetric(20)
    op = _gpu_op(a)
    x = gpu_array(rng.standard_normal(a.shape[0]))
    f = _queries(op)
    start = _native.runtime_array_info()
    assert start["device_copies"] == 0  # (the fixture cleared the cache)
    out = jax.block_until_ready(f(op, x))
    for got, ref in zip(out, (a @ np.asarray(x), a.T @ np.asarray(x), a.diagonal())):
        assert got.devices() == {jax.devices("cuda")[0]}
        assert rel_err(got, ref) < 1e-12
    info = _native.runtime_array_info()
    assert info["device_copies"] == 6
    assert info["uploads"] == start["uploads"] + 6
    # Later calls copy on the device: no new uploads.
    jax.block_until_ready(f(op, 2 * x))
    assert _native.runtime_array_info()["uploads"] == start["uploads"] + 6
    # clear_cache frees the device copies; the program uploads them again.
    lxa.clear_cache()
    assert _native.runtime_array_info()["device_copies"] == 0
    out = jax.block_until_ready(f(op, x))
    assert rel_err(out[1], a.T @ np.asarray(x)) < 1e-12
    info = _native.runtime_array_info()
    assert info["device_copies"] == 6
    assert info["uploads"] == start["uploads"] + 12
    assert lxa.cache_info()["runtime_arrays"]["device_bytes"] == info["device_bytes"]


def _run_and_forget(a, x):
    op = _gpu_op(a)
    out = jax.block_until_ready(op.mv(x) + jax.jit(lambda o, v: o.mv(v))(op, x))
    return np.asarray(out)


def test_the_patterns_death_frees_its_device_copies(rng):
    a = _nonsymmetric(15)
    x = gpu_array(rng.standard_normal(a.shape[0]))
    jax.clear_caches()
    gc.collect()
    before = _native.runtime_array_info()
    out = _run_and_forget(a, x)
    np.testing.assert_allclose(out, 2 * (a @ np.asarray(x)), rtol=1e-12)
    assert _native.runtime_array_info()["device_copies"] == 2  # indices, row ids
    jax.clear_caches()
    gc.collect()
    after = _native.runtime_array_info()
    assert after["device_copies"] == 0
    assert after["arrays"] == before["arrays"]


def test_gpu_programs_hold_no_large_constants(rng):
    # 250,047 unknowns: a solve and the gradient of a non-symmetric one (the
    # transpose path), compiled for the GPU; each run once and checked.
    n = 63
    spd = poisson3d(n)
    op = _gpu_op(spd, SPD)
    b = gpu_array(rng.standard_normal(spd.shape[0]))
    solver = lxa.AMGX(rtol=1e-8)
    solve = jax.jit(lambda v, c: lx.linear_solve(op.with_values(v), c,
                                                 solver=solver).value)
    lowered = solve.lower(op.values, b)
    assert large(lowered_constants(lowered.as_text())) == []
    compiled = lowered.compile()
    assert large(compiled_constants(compiled.as_text())) == []
    x = np.asarray(compiled(op.values, b))
    bn = np.asarray(b)
    # A residual, not a direct solve: SuperLU's fill-in on a 250k 3-D problem
    # takes minutes.
    assert np.linalg.norm(spd @ x - bn) / np.linalg.norm(bn) < 1e-7

    a = _nonsymmetric(n)
    opn = _gpu_op(a)

    def loss(v, c, w):
        return jnp.sum(w * lx.linear_solve(opn.with_values(v), c,
                                           solver=solver).value)

    w = gpu_array(rng.standard_normal(a.shape[0]))
    grad = jax.jit(jax.grad(loss))
    lowered = grad.lower(opn.values, b, w)
    assert large(lowered_constants(lowered.as_text())) == []
    compiled = lowered.compile()
    assert large(compiled_constants(compiled.as_text())) == []
    g = np.asarray(compiled(opn.values, b, w))
    # d loss / d A_ij = -lambda_i x_j with A x = b, A^T lambda = w.
    # References by a Krylov solve to 1e-12 (this matrix is diagonally dominant),
    # residuals checked: a direct solve of a 250k 3-D problem takes minutes.
    csr = sp.csr_matrix(a)
    xs, _ = spla.bicgstab(csr, np.asarray(b), rtol=1e-12, atol=0.0, maxiter=5000)
    lam, _ = spla.bicgstab(csr.T.tocsr(), np.asarray(w), rtol=1e-12, atol=0.0,
                           maxiter=5000)
    assert np.linalg.norm(csr @ xs - np.asarray(b)) < 1e-11 * np.linalg.norm(b)
    assert np.linalg.norm(csr.T @ lam - np.asarray(w)) < 1e-11 * np.linalg.norm(w)
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    assert rel_err(g, -lam[rows] * xs[a.indices]) < 1e-5
