# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _backend import cases  # noqa: E402

import lineax_amgx as lxa  # noqa: E402
from lineax_amgx._operator import CSROperator  # noqa: E402
from lineax_amgx.matrix_free._sparsify import (  # noqa: E402
    SparsifiedOperator,
    as_csr_operator,
    detection_count,
    sparsify,
)

N = 6


def residual(u, args=None):
    v = u.reshape(N, N)
    vp = jnp.pad(v, 1)
    return (vp[2:, 1:-1] + vp[:-2, 1:-1] + vp[1:-1, 2:] + vp[1:-1, :-2] - 4 * v
            + v**3 + 0.3 * jnp.roll(v, 1, axis=1) ** 2).ravel()


def residual_2d(v, args=None):
    vp = jnp.pad(v, 1)
    return vp[2:, 1:-1] + vp[:-2, 1:-1] ** 2 + jnp.sin(vp[1:-1, 2:]) - 4 * v * v[0, 0]


def _u():
    return jnp.asarray(np.random.default_rng(0).random(N * N)) + 0.5


def _dense_csr(A: CSROperator):
    return np.asarray(A.pattern.to_scipy(np.asarray(A.values)).toarray())


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_values_match_jacfwd(block_size):
    u = _u()
    J = np.asarray(jax.jacfwd(residual)(u))
    op = sparsify(lx.JacobianLinearOperator(residual, u), block_size=block_size)
    A = op.to_csr()
    assert A.pattern.block_size == block_size
    assert A.values.shape == A.pattern.value_shape
    np.testing.assert_allclose(_dense_csr(A), J, rtol=0, atol=1e-12)
    assert op.coloring.num_colors <= 9


def test_pytree_2d_input():
    v = _u().reshape(N, N)
    J = np.asarray(jax.jacfwd(residual_2d)(v)).reshape(N * N, N * N)
    op = sparsify(lx.JacobianLinearOperator(residual_2d, v))
    A = op.to_csr()
    np.testing.assert_allclose(_dense_csr(A), J, rtol=0, atol=1e-12)
    assert A.pattern.nnz == int((J != 0).sum())


def test_jacobian_and_linearize_operators_eager_and_jit():
    u = _u()
    J = np.asarray(jax.jacfwd(residual)(u))
    jac_op = lx.JacobianLinearOperator(residual, u)
    lin = jax.linearize(residual, u)[1]
    fn_op = lx.FunctionLinearOperator(lin, jax.ShapeDtypeStruct(u.shape, u.dtype))
    for op in (jac_op, fn_op):
        A = as_csr_operator(op)
        np.testing.assert_allclose(_dense_csr(A), J, rtol=0, atol=1e-12)
        B = eqx.filter_jit(as_csr_operator)(op)
        np.testing.assert_allclose(_dense_csr(B), J, rtol=0, atol=1e-12)
        assert B.pattern == A.pattern


def test_memo_detects_once_per_structure():
    u = _u()
    before = detection_count()
    for k in range(3):  # a Newton-like loop with new iterates
        as_csr_operator(lx.JacobianLinearOperator(residual, u + 0.1 * k))
    assert detection_count() - before <= 1

    @eqx.filter_jit
    def newton_step(u):
        A = as_csr_operator(lx.JacobianLinearOperator(residual, u))
        return A.values

    before = detection_count()
    for k in range(3):
        newton_step(u + k)
    assert detection_count() - before <= 1


def test_memo_distinguishes_structural_zeros_of_constants():
    def make(c):
        return lx.FunctionLinearOperator(
            lambda x: c * x + 0.5 * jnp.roll(x * c, 1),
            jax.ShapeDtypeStruct((5,), jnp.float64),
        )

    c1 = jnp.array([1.0, 0.0, 2.0, 0.0, 3.0])
    c2 = jnp.array([1.0, 1.0, 2.0, 0.0, 3.0])
    c3 = jnp.array([5.0, 0.0, 7.0, 0.0, 1.0])  # same zeros as c1
    A1, A2 = as_csr_operator(make(c1)), as_csr_operator(make(c2))
    assert A2.pattern.nnz > A1.pattern.nnz
    for c, A in ((c1, A1), (c2, A2)):
        J = np.asarray(jax.jacfwd(lambda x: c * x + 0.5 * jnp.roll(x * c, 1))(
            jnp.ones(5)))
        np.testing.assert_allclose(_dense_csr(A), J, atol=1e-12)
    before = detection_count()
    A3 = as_csr_operator(make(c3))
    assert detection_count() == before  # same structural zeros: memo hit
    assert A3.pattern == A1.pattern


def test_tags_and_special_operators():
    u = _u()
    # Symmetric: a semidefinite tag promises symmetry, which is checked.
    M = jnp.diag(jnp.arange(1.0, 6.0)) + jnp.eye(5, k=1) + jnp.eye(5, k=-1)
    op = lx.TaggedLinearOperator(lx.MatrixLinearOperator(M),
                                 lx.positive_semidefinite_tag)
    A = as_csr_operator(op)
    assert lx.positive_semidefinite_tag in A.tags and A.pattern.nnz == 13
    np.testing.assert_allclose(_dense_csr(A), np.asarray(M))
    Ad = eqx.filter_jit(as_csr_operator)(lx.MatrixLinearOperator(M))
    assert Ad.pattern.method == "dense"
    sym = lx.JacobianLinearOperator(lambda x, a: 2 * x - jnp.roll(x, 1)
                                    - jnp.roll(x, -1), u, tags=lx.symmetric_tag)
    A = as_csr_operator(sym)
    assert lx.symmetric_tag in A.tags
    s = sparsify(sym)
    assert lx.is_symmetric(s)
    np.testing.assert_allclose(_dense_csr(A),
                               np.asarray(jax.jacfwd(lambda x: sym.mv(x))(u)))
    C = CSROperator(A.pattern, A.values)
    assert as_csr_operator(C) is C


def test_operator_protocol_and_no_mutation():
    u = _u()
    base = lx.JacobianLinearOperator(residual, u)
    op = sparsify(base)
    assert isinstance(op, SparsifiedOperator) and op.operator is base
    assert not hasattr(base, "pattern")
    v = jnp.asarray(np.random.default_rng(1).random(N * N))
    np.testing.assert_allclose(op.mv(v), base.mv(v))
    J = np.asarray(jax.jacfwd(residual)(u))
    np.testing.assert_allclose(lx.diagonal(op), np.diag(J), atol=1e-12)
    T = op.T
    assert isinstance(T, SparsifiedOperator)
    np.testing.assert_allclose(_dense_csr(T.to_csr()), J.T, atol=1e-12)
    for f in (lx.linearise, lx.materialise, lx.conj):
        assert isinstance(f(op), SparsifiedOperator)
    for q in (lx.is_symmetric, lx.is_diagonal, lx.is_tridiagonal,
              lx.has_unit_diagonal, lx.is_lower_triangular,
              lx.is_upper_triangular, lx.is_positive_semidefinite,
              lx.is_negative_semidefinite):
        assert q(op) is False
    d, m, up = lx.tridiagonal(sparsify(lx.MatrixLinearOperator(jnp.eye(4) * 2)))
    np.testing.assert_allclose(m, 2 * np.ones(4))
    # static metadata survives jit
    out = eqx.filter_jit(lambda o: o.to_csr().values)(op)
    np.testing.assert_allclose(out, op.to_csr().values)


def test_star_coloring_symmetric_decompression():
    n = 30

    def f(x, args=None):
        return 3 * x - jnp.roll(x, 1) - jnp.roll(x, -1) + 0.2 * (
            x * jnp.roll(x, 7) + x * jnp.roll(x, -7))

    u = jnp.linspace(0.2, 1.0, n)
    op = sparsify(lx.JacobianLinearOperator(f, u), symmetric=True)
    J = np.asarray(jax.jacfwd(f)(u))
    # force a star coloring and check symmetric decompression
    from lineax_amgx.matrix_free._coloring import Coloring, _greedy_star, star_recovery
    p = op.pattern
    rows = p.row_ids.astype(np.int64)
    cols = p.indices.astype(np.int64)
    off = rows != cols
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows[off], minlength=n))])
    colors = _greedy_star(np.arange(n), ptr.astype(np.int64), cols[off], n)
    assert star_recovery(p, colors) is not None
    star = SparsifiedOperator(op.operator, p, Coloring(colors, symmetric=True))
    sym = 0.5 * (J + J.T)
    if np.allclose(J, J.T):
        np.testing.assert_allclose(_dense_csr(star.to_csr()), sym, atol=1e-12)


# ---- solving with a matrix-free operator (AMGX.init sparsifies it) ------------------


def laplacian_residual(n):
    h2 = 1.0 / (n + 1) ** 2

    def residual(u, args):
        u = u.reshape(n, n)
        p = jnp.pad(u, 1)
        lap = (4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) / h2
        return (lap + args * u**3).reshape(-1)

    return residual


@cases("n", cpu=[50], gpu=[200])  # (on the GPU: `pytest -m gpu tests/test_sparsify.py`)
def test_jacobian_operator_no_pattern_given(n, rng, backend):
    """A JacobianLinearOperator with no pattern: AMGX.init detects it (one setup)
    and the solve meets its tolerance; the assembled matrix equals jacfwd."""
    residual = laplacian_residual(n)
    u = backend.put(rng.standard_normal(n * n))
    b = backend.put(rng.standard_normal(n * n))
    op = lx.JacobianLinearOperator(residual, u, 1.0)
    lxa.clear_cache()
    lxa.reset_counters()
    x = jax.jit(
        lambda u, b: lx.linear_solve(
            lx.JacobianLinearOperator(residual, u, 1.0), b, solver=lxa.AMGX(rtol=1e-10)
        ).value
    )(u, b)
    r = b - op.mv(x)
    assert float(jnp.linalg.norm(r) / jnp.linalg.norm(b)) < 1e-9
    assert lxa.cache_info(backend.cache)["setups"] == 1
    # The assembled matrix equals jacfwd on a small problem.
    small = laplacian_residual(12)
    us = jnp.asarray(rng.standard_normal(144))
    csr = lxa.as_csr_operator(lx.JacobianLinearOperator(small, us, 1.0))
    dense = jax.jacfwd(lambda v: small(v, 1.0))(us)
    np.testing.assert_allclose(np.asarray(csr.as_matrix()), np.asarray(dense),
                               rtol=1e-12, atol=1e-9)
