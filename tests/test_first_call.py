"""The first call (issue 20): compiled programs carry no O(n) constants.

An operator's static structure (column indices, row ids, the transposition
permutation, coloring and decompression tables, halo plans) reaches compiled
programs as runtime arrays (`lineax_amgx._runtime_arrays`), never as HLO constants,
so compile time does not grow with the matrix. For every kind of program that
touches an operator, the lowered text and the compiled text of a 250k-unknown
problem must hold no array constant of more than 1,000 elements; the same program
at a small size must give the right answer. Also here: the detector's negative
control, cache sharing between equal patterns, vmap/grad, the lifetime of the
registrations, and construction validating once.
"""

from __future__ import annotations

import gc
import re

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
    large,
    lowered_constants,
    poisson3d,
    rel_err,
)

import lineax_amgx as lxa
from lineax_amgx import _pattern, _runtime_arrays
from lineax_amgx._backends import _native

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
LARGE = 63  # 63^3 = 250,047 unknowns
SMALL = 7

def check_no_large_constants(fn, *args, cuda: bool, monkeypatch) -> None:
    if cuda:
        # For the CUDA lowering below (without a GPU): Equinox's runtime checks
        # are host callbacks, which cannot be lowered for CUDA without one; made
        # NaNs instead, before the first trace (which the lowerings share).
        monkeypatch.setattr("equinox._errors.EQX_ON_ERROR", "nan")
    lowered = fn.lower(*args)
    assert large(lowered_constants(lowered.as_text())) == []
    assert large(compiled_constants(lowered.compile().as_text())) == []
    if cuda:
        # The CUDA branch (AmgX through the FFI).
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "lineax_amgx_setup" in text or "lineax_amgx_solve" in text
        assert large(lowered_constants(text)) == []


def test_detector_negative_control():
    rng = np.random.default_rng(0)
    big = rng.standard_normal(5000)
    small = rng.standard_normal(500)
    f = jax.jit(lambda x: x * big)
    low = f.lower(jnp.ones(5000))
    found = large(lowered_constants(low.as_text()))
    assert [c[0] for c in found] == [5000]
    assert [c[0] for c in large(compiled_constants(low.compile().as_text()))] == [5000]
    g = jax.jit(lambda x: x * small).lower(jnp.ones(500))
    assert large(lowered_constants(g.as_text())) == []
    # The literal forms, one by one.
    def count(text):
        return lowered_constants(text)[0][0]

    assert count("stablehlo.constant dense<[1, 2, 3]> : tensor<3xi32>") == 3
    assert count("%c = stablehlo.constant dense<0.0> : tensor<2x2000xf64>") == 4000
    assert count("dense_resource<blob1> : tensor<1500xf32>") == 1500
    assert count('dense<"0x0102030405"> : tensor<5xi8>') == 5
    assert count('dense<"0x' + "00" * 3000 + '">') == 3000
    hlo = "  %constant.7 = s32[2000,1]{1,0} constant({...}), metadata={}"
    assert compiled_constants(hlo)[0][0] == 2000
    assert compiled_constants("%c = (s32[3], f32[2000]) constant((...))")[0][0] == 2003


# -----------------------------------------------------------------------------
# The programs: each case builds, at grid size n, a jitted function, its
# arguments and a check of its output (run at a small size).
# -----------------------------------------------------------------------------


_nonsymmetric = convected_poisson3d


def _spd_values(a: sp.csr_array, rng) -> np.ndarray:
    """Values of another SPD matrix with `a`'s pattern (its diagonal shifted)."""
    m = sp.csr_array(a + sp.diags(rng.random(a.shape[0])))
    m.sort_indices()
    assert np.array_equal(m.indices, a.indices)
    return m.data


def _reference_solve(a, values, b) -> np.ndarray:
    m = a.copy()
    m.data = np.asarray(values).reshape(m.data.shape)
    return spla.spsolve(sp.csc_matrix(m), np.asarray(b))


def _dense_loss(a):
    """`sum(w * A(v)^-1 b)` through a dense LU: the reference for gradients."""
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))

    def loss(v, b, w):
        dense = jnp.zeros(a.shape, v.dtype).at[rows, a.indices].set(v)
        x = lx.linear_solve(lx.MatrixLinearOperator(dense), b, solver=lx.LU()).value
        return jnp.sum(w * x)

    return loss


def _case_solve(n, rng, *, symmetric: bool):
    a = poisson3d(n) if symmetric else _nonsymmetric(n)
    op = lxa.CSROperator.from_scipy(a, tags=SPD if symmetric else ())
    solver = lxa.AMGX(rtol=1e-10)
    # Closed over: the style of our docs and tests.
    fn = jax.jit(
        lambda v, b: lx.linear_solve(op.with_values(v), b, solver=solver).value
    )
    v = _spd_values(a, rng) if symmetric else a.data * (1 + 0.2 * rng.random(a.nnz))
    args = (jnp.asarray(v), jnp.asarray(rng.standard_normal(a.shape[0])))

    def check(out):
        assert rel_err(out, _reference_solve(a, *args)) < 1e-7

    return fn, args, check


def _case_grad(n, rng, *, symmetric: bool):
    a = poisson3d(n) if symmetric else _nonsymmetric(n)
    op = lxa.CSROperator.from_scipy(a, tags=SPD if symmetric else ())
    solver = lxa.AMGX(rtol=1e-12)

    def loss(v, b, w):
        x = lx.linear_solve(op.with_values(v), b, solver=solver).value
        return jnp.sum(w * x)

    fn = jax.jit(jax.grad(loss))
    v = _spd_values(a, rng) if symmetric else a.data * (1 + 0.2 * rng.random(a.nnz))
    b, w = rng.standard_normal((2, a.shape[0]))
    args = (jnp.asarray(v), jnp.asarray(b), jnp.asarray(w))

    def check(out):
        ref = jax.grad(_dense_loss(a))(*args)
        assert rel_err(out, ref) < 1e-6

    return fn, args, check


def case_spd(n, rng):
    return _case_solve(n, rng, symmetric=True)


def case_spd_operator_argument(n, rng):
    a = poisson3d(n)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    solver = lxa.AMGX(rtol=1e-10)
    fn = jax.jit(lambda o, b: lx.linear_solve(o, b, solver=solver).value)
    b = jnp.asarray(rng.standard_normal(a.shape[0]))

    def check(out):
        assert rel_err(out, _reference_solve(a, a.data, b)) < 1e-7

    return fn, (op, b), check


def case_spd_grad(n, rng):
    return _case_grad(n, rng, symmetric=True)


def case_nonsymmetric(n, rng):
    return _case_solve(n, rng, symmetric=False)


def case_nonsymmetric_grad(n, rng):
    return _case_grad(n, rng, symmetric=False)


def case_queries(n, rng):
    """mv, the transpose's mv (a permutation) and the diagonal."""
    a = _nonsymmetric(n)
    op = lxa.CSROperator.from_scipy(a)

    def fn(v, x):
        o = op.with_values(v)
        return o.mv(x), o.transpose().mv(x), lx.diagonal(o)

    v = a.data * (1 + 0.2 * rng.random(a.nnz))
    args = (jnp.asarray(v), jnp.asarray(rng.standard_normal(a.shape[0])))

    def check(out):
        m = a.copy()
        m.data = v
        x = np.asarray(args[1])
        for got, ref in zip(out, (m @ x, m.T @ x, m.diagonal())):
            assert rel_err(got, ref) < 1e-12

    return jax.jit(fn), args, check


def case_bsr(n, rng):
    # 3 x 3 blocks: 44^3 nodes (255,552 unknowns) at the large size.
    nodes = 44 if n == LARGE else 5
    block = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
    a = sp.bsr_array(sp.kron(poisson3d(nodes), block), blocksize=(3, 3))
    a.sort_indices()
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    assert op.block_size == 3
    solver = lxa.AMGX(rtol=1e-10)
    fn = jax.jit(
        lambda v, b: lx.linear_solve(op.with_values(v), b, solver=solver).value
    )
    args = (op.values * 1.5, jnp.asarray(rng.standard_normal(a.shape[0])))

    def check(out):
        ref = spla.spsolve(sp.csc_matrix(1.5 * a.toarray()), np.asarray(args[1]))
        assert rel_err(out, ref) < 1e-7

    return fn, args, check


def _grid_residual(n):
    """-Laplace(u) + u^3 on an n^3 grid (7-point stencil, zero boundary)."""

    def residual(u, args):
        g = jnp.pad(u.reshape(n, n, n), 1)
        c = g[1:-1, 1:-1, 1:-1]
        lap = (
            6 * c
            - g[:-2, 1:-1, 1:-1] - g[2:, 1:-1, 1:-1]
            - g[1:-1, :-2, 1:-1] - g[1:-1, 2:, 1:-1]
            - g[1:-1, 1:-1, :-2] - g[1:-1, 1:-1, 2:]
        )
        return (lap + c**3).reshape(-1)

    return residual


def case_matrix_free(n, rng):
    """A sparsified `JacobianLinearOperator` (star coloring, decompression)."""
    residual = _grid_residual(n)
    u0 = jnp.asarray(rng.standard_normal(n**3))
    pattern = lxa.sparsify(lx.JacobianLinearOperator(residual, u0, tags=SPD)).pattern
    solver = lxa.AMGX(rtol=1e-10)

    def fn(u, b):
        op = lxa.sparsify(lx.JacobianLinearOperator(residual, u, tags=SPD),
                          pattern=pattern)
        return lx.linear_solve(op, b, solver=solver).value

    args = (u0, jnp.asarray(rng.standard_normal(n**3)))

    def check(out):
        jac = sp.csc_matrix(poisson3d(n) + sp.diags(3 * np.asarray(u0) ** 2))
        assert rel_err(out, spla.spsolve(jac, np.asarray(args[1]))) < 1e-7

    return jax.jit(fn), args, check


def case_preconditioner(n, rng):
    """`AMGXPreconditioner` inside `lx.CG` (CG's own loop applies it)."""
    a = poisson3d(n)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    cg = lx.CG(rtol=1e-10, atol=1e-10, max_steps=500)

    def fn(v, b):
        o = op.with_values(v)
        pre = lxa.AMGXPreconditioner(o)
        return lx.linear_solve(o, b, solver=cg, options={"preconditioner": pre}).value

    args = (jnp.asarray(_spd_values(a, rng)),
            jnp.asarray(rng.standard_normal(a.shape[0])))

    def check(out):
        assert rel_err(out, _reference_solve(a, *args)) < 1e-7

    return jax.jit(fn), args, check


def case_distributed(n, rng):
    """A single-rank `DistributedCSROperator` (its local columns and row ids)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:  # pragma: no cover
        pytest.skip(f"mpi4py cannot load an MPI library: {e}")
    a = poisson3d(n)
    op = lxa.DistributedCSROperator.from_global_scipy(a, MPI.COMM_SELF, tags=SPD)
    solver = lxa.AMGX(rtol=1e-10)
    fn = jax.jit(
        lambda v, b: lx.linear_solve(op.with_values(v), b, solver=solver).value
    )
    args = (jnp.asarray(_spd_values(a, rng)),
            jnp.asarray(rng.standard_normal(a.shape[0])))

    def check(out):
        assert rel_err(out, _reference_solve(a, *args)) < 1e-7

    return fn, args, check


# Which cases are also lowered for CUDA here: those whose host callbacks all sit
# in the CPU branch (MPI collectives of a distributed operator are host callbacks
# outside it, which cannot be lowered for CUDA without a GPU).
CASES = {
    "spd": (case_spd, True),
    "spd-operator-argument": (case_spd_operator_argument, True),
    "spd-grad": (case_spd_grad, True),
    "nonsymmetric": (case_nonsymmetric, True),
    "nonsymmetric-grad": (case_nonsymmetric_grad, True),
    "queries": (case_queries, False),
    "bsr": (case_bsr, True),
    "matrix-free": (case_matrix_free, True),
    "preconditioner": (case_preconditioner, True),
    "distributed": (case_distributed, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_no_large_constants(name, rng, monkeypatch):
    make, cuda = CASES[name]
    fn, args, _ = make(LARGE, rng)
    check_no_large_constants(fn, *args, cuda=cuda, monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", list(CASES))
def test_programs_are_right(name, rng):
    make, _ = CASES[name]
    fn, args, check = make(SMALL, rng)
    check(fn(*args))


# -----------------------------------------------------------------------------
# Caching, transformations and lifetime.
# -----------------------------------------------------------------------------


def _runtime_keys(jaxpr) -> list[int]:
    return [int(k) for k in re.findall(r"key=(\d+)", str(jaxpr))]


def test_equal_patterns_share_one_program(rng):
    a = poisson3d(6)
    op1 = lxa.CSROperator.from_scipy(a, tags=SPD)
    op2 = lxa.CSROperator.from_arrays(a.indptr.copy(), a.indices.copy(), a.data * 2,
                                      a.shape, tags=SPD)
    assert op1.pattern is not op2.pattern and op1.pattern == op2.pattern
    x = jnp.asarray(rng.standard_normal(a.shape[0]))
    mv = jax.jit(lambda o, v: o.mv(v))
    np.testing.assert_allclose(mv(op1, x), a @ np.asarray(x), rtol=1e-13)
    np.testing.assert_allclose(mv(op2, x), 2 * (a @ np.asarray(x)), rtol=1e-13)
    assert mv._cache_size() == 1
    # Closed over: the jaxprs (which carry keys, not arrays) are equal.
    j1 = jax.make_jaxpr(lambda v: op1.mv(v))(x)
    j2 = jax.make_jaxpr(lambda v: op2.mv(v))(x)
    assert str(j1) == str(j2) and len(_runtime_keys(j1)) == 2


def test_vmap_and_grad_do_not_touch_the_structure(rng):
    a = _nonsymmetric(4)
    op = lxa.CSROperator.from_scipy(a)
    x = jnp.asarray(rng.standard_normal(a.shape[0]))
    batch = jnp.asarray(a.data * (1 + rng.random((3, a.nnz))))

    def f(v):
        return op.with_values(v).transpose().mv(x)

    out = jax.jit(jax.vmap(f))(batch)
    for k in range(3):
        m = a.copy()
        m.data = np.asarray(batch[k])
        np.testing.assert_allclose(out[k], m.T @ np.asarray(x), rtol=1e-12)
    # The structure is neither batched nor differentiated: its arrays keep
    # their own shapes inside vmap and have no tangents.
    jaxpr = str(jax.make_jaxpr(jax.vmap(jax.grad(lambda v: jnp.sum(f(v)))))(batch))
    shapes = re.findall(r"i32\[(\d*)\] = lineax_amgx_runtime_array", jaxpr)
    assert shapes and set(shapes) == {str(a.nnz)}
    g = jax.grad(lambda v: jnp.sum(f(v) ** 2))(batch[0])
    m = a.copy()
    m.data = np.asarray(batch[0])
    y = m.T @ np.asarray(x)
    # d/dA_ij sum((A^T x)^2) = 2 y_j x_i for the entry in row i, column j.
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    np.testing.assert_allclose(g, 2 * y[a.indices] * np.asarray(x)[rows], rtol=1e-12)


def _transpose_sum(a):
    op = lxa.CSROperator.from_scipy(a)
    return jax.jit(lambda v: op.mv(v) + op.transpose().mv(v))


def test_registrations_live_as_long_as_the_pattern(rng):
    a = _nonsymmetric(5)
    x = jnp.asarray(rng.standard_normal(a.shape[0]))
    jax.clear_caches()  # earlier tests' programs (and the patterns they hold)
    gc.collect()
    before = _native.runtime_array_info()["arrays"]
    f = _transpose_sum(a)  # the only holder of its operator (in its closure)
    np.testing.assert_allclose(f(x), (a + a.T) @ np.asarray(x), rtol=1e-12)
    keys = _runtime_keys(jax.make_jaxpr(f)(x))
    # Indices and row ids of the pattern and of its transpose, and the
    # transposition permutation.
    assert len(set(keys)) == 5
    assert _native.runtime_array_info()["arrays"] == before + 5
    assert lxa.cache_info()["runtime_arrays"]["arrays"] == before + 5
    # clear_cache frees device copies only: compiled programs keep working.
    lxa.clear_cache()
    np.testing.assert_allclose(f(x), (a + a.T) @ np.asarray(x), rtol=1e-12)
    # The pattern dies (with everything that holds it): its arrays go.
    del f
    jax.clear_caches()
    gc.collect()
    assert _native.runtime_array_info()["arrays"] == before
    assert all(k not in _runtime_arrays._live for k in keys)


class _Owner:
    pass


def test_an_unregistered_array_is_a_clear_error(monkeypatch):
    # A program whose array never reached the native core (its lowering skipped
    # the registration): the handler says so instead of reading anything.
    monkeypatch.setattr(_runtime_arrays, "ensure_native", lambda entry: None)
    owner = _Owner()
    f = jax.jit(lambda: _runtime_arrays.runtime_array(
        owner, ("test_first_call", "unregistered"), np.arange(10)) * 2)
    with pytest.raises(Exception, match="is not registered"):
        f().block_until_ready()


def test_programs_keep_arrays_of_patterns_made_while_tracing(rng):
    # A dense pattern made inside the trace (a traced MatrixLinearOperator) dies
    # with the trace; the compiled program keeps its arrays.
    m = rng.standard_normal((30, 30)) * (rng.random((30, 30)) < 0.2) + 5 * np.eye(30)
    x = rng.standard_normal(30)
    f = jax.jit(lambda mat, v: lxa.as_csr_operator(lx.MatrixLinearOperator(mat)).mv(v))
    gc.collect()
    np.testing.assert_allclose(f(jnp.asarray(m), jnp.asarray(x)), m @ x, rtol=1e-12)
    gc.collect()
    np.testing.assert_allclose(f(jnp.asarray(m), jnp.asarray(2 * x)), 2 * m @ x,
                               rtol=1e-12)


def test_from_bcoo_maps_the_order(rng):
    """`from_bcoo` with a shuffled order and duplicates: its order maps (runtime
    arrays) give the CSR values, eagerly and under `jax.grad` with respect to
    the BCOO values."""
    from jax.experimental import sparse as jsparse

    a = sp.coo_array(_nonsymmetric(4))
    order = rng.permutation(a.nnz)
    dup = rng.choice(a.nnz, a.nnz // 5, replace=False)  # entries split in two
    idx = np.stack([np.r_[a.row[order], a.row[dup]],
                    np.r_[a.col[order], a.col[dup]]], axis=1)
    data = np.r_[a.data[order], 0.5 * a.data[dup]]
    data[np.argsort(order)[dup]] *= 0.5
    x = rng.standard_normal(a.shape[0])

    def f(values):
        op = lxa.CSROperator.from_bcoo(jsparse.BCOO((values, idx), shape=a.shape))
        return op.mv(jnp.asarray(x))

    np.testing.assert_allclose(f(jnp.asarray(data)), a @ x, rtol=1e-12)
    w = rng.standard_normal(a.shape[0])
    g = jax.grad(lambda v: jnp.sum(w * f(v)))(jnp.asarray(data))
    # d/d data_k of w . (A x) = w[row_k] x[col_k], for every stored copy k.
    np.testing.assert_allclose(g, w[idx[:, 0]] * x[idx[:, 1]], rtol=1e-12)


def test_eager_use(rng):
    a = _nonsymmetric(3)
    op = lxa.CSROperator.from_scipy(a)
    x = rng.standard_normal(a.shape[0])
    np.testing.assert_allclose(op.mv(jnp.asarray(x)), a @ x, rtol=1e-12)
    np.testing.assert_allclose(op.transpose().mv(jnp.asarray(x)), a.T @ x, rtol=1e-12)
    np.testing.assert_allclose(lx.diagonal(op), a.diagonal(), rtol=1e-12)


# -----------------------------------------------------------------------------
# Construction validates once.
# -----------------------------------------------------------------------------


def test_from_scipy_does_not_check_rows_again(monkeypatch, rng):
    def refuse(*args):
        raise AssertionError("rows checked twice")

    monkeypatch.setattr(_pattern, "_first_unsorted", refuse)
    a = sp.random(40, 40, density=0.2, random_state=1, format="coo")
    a = sp.coo_array((np.r_[a.data, 1.0], (np.r_[a.row, 3], np.r_[a.col, 5])),
                     shape=a.shape)  # a duplicate, and rows out of order
    op = lxa.CSROperator.from_scipy(a)
    ref = sp.csr_array(a)
    ref.sum_duplicates()
    np.testing.assert_array_equal(op.pattern.indices, ref.indices)
    np.testing.assert_array_equal(op.values, ref.data)
    with pytest.raises(AssertionError, match="twice"):
        lxa.SparsityPattern(ref.indptr, ref.indices, ref.shape)


@pytest.mark.parametrize("trial", range(20))
def test_row_order_check_finds_the_first_bad_entry(trial):
    rng = np.random.default_rng(trial)
    rows, cols = 30, 25
    counts = rng.integers(0, 6, rows)
    indptr = np.r_[0, np.cumsum(counts)]
    indices = np.concatenate(
        [np.sort(rng.choice(cols, c, replace=False)) for c in counts]
    ).astype(np.int32)
    if indices.size > 2 and trial % 4:
        k = int(rng.integers(1, indices.size))
        indices[k] = indices[k - 1] if trial % 4 == 1 else rng.integers(0, cols)
    # Reference: the first entry not greater than its left neighbour in its row.
    want = -1
    for r in range(rows):
        for k in range(indptr[r] + 1, indptr[r + 1]):
            if indices[k] <= indices[k - 1]:
                want = k
                break
        if want >= 0:
            break
    assert _pattern._first_unsorted(indptr, indices) == want
    if want < 0:
        lxa.SparsityPattern(indptr, indices, (rows, cols))
    else:
        row = int(np.searchsorted(indptr, want, side="right") - 1)
        with pytest.raises(ValueError, match=f"row {row} has"):
            lxa.SparsityPattern(indptr, indices, (rows, cols))
