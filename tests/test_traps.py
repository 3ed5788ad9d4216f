# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The traps that used to pass silently (issue 21): a dense operator stored as
n^2 entries, float64 values rounded to float32 without x64, and a symmetry tag
on a non-symmetric matrix (wrong gradients). Each is a warning or an error that
names the fix; the checks must not break jit, vmap, grad, jvp or the
preconditioner."""

import functools as ft
import os
import subprocess
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
from helpers import poisson2d, random_nonsymmetric, rel_err
from jax.experimental import sparse as jsparse

import lineax_amgx as lxa
from lineax_amgx import as_csr_operator

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
NOT_SYMMETRIC = "but its values are not symmetric"
# What a runtime error under jit is: the setup's refusal (a symmetry tag on
# non-symmetric values) is JAX's error around the native handler's message on the
# GPU, and around the host callback's ValueError on the CPU (some JAX paths
# re-raise that as a ValueError); a null space's checks are Equinox's.
RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError, ValueError)


def tridiagonal(n: int, rng) -> np.ndarray:
    """A dense, non-symmetric, diagonally dominant tridiagonal matrix."""
    lo, up = rng.uniform(-1, 0, n - 1), rng.uniform(-1, 0, n - 1)
    return np.diag(4 + rng.random(n)) + np.diag(lo, -1) + np.diag(up, 1)


# ---------------------------------------------------------------------------
# 1. Dense operators
# ---------------------------------------------------------------------------


def test_traced_matrix_operator_warns_once_per_shape_and_solves(rng):
    n = 121  # a shape no other test uses: the warning is once per shape
    m = tridiagonal(n, rng)
    b = rng.standard_normal(n)
    op = lx.MatrixLinearOperator(jnp.asarray(m))
    # lx.linear_solve traces its operator: the matrix is a tracer even here.
    with pytest.warns(lxa.DenseOperatorWarning) as record:
        sol = lx.linear_solve(op, jnp.asarray(b), solver=lxa.AMGX(rtol=1e-10))
    text = str(record[0].message)
    for part in ("traced lx.MatrixLinearOperator", "shape (121, 121)",
                 "n^2 = 14,641 entries", "n = 121", "from_dense(matrix)",
                 "with_values(values)", "sparsify", "lx.LU"):
        assert part in text, part
    assert record[0].filename == __file__  # points at the user's call
    assert issubclass(lxa.DenseOperatorWarning, UserWarning)
    assert "DenseOperatorWarning" in lxa.__all__
    assert rel_err(sol.value, np.linalg.solve(m, b)) < 1e-8
    assert sol.state.operator.pattern.nnz == n * n
    # Once per shape: the next solve (and a jitted one) is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxa.DenseOperatorWarning)
        lx.linear_solve(op, jnp.asarray(b), solver=lxa.AMGX())
        jax.jit(lambda M: as_csr_operator(lx.MatrixLinearOperator(M)).values)(m)


def test_dense_values_are_the_matrix_in_row_major_order(rng):
    m = jnp.asarray(tridiagonal(101, rng))
    with pytest.warns(lxa.DenseOperatorWarning, match="10,201 entries"):
        A = jax.jit(lambda M: as_csr_operator(lx.MatrixLinearOperator(M)))(m)
    assert A.pattern.method == "dense"
    np.testing.assert_array_equal(A.as_matrix(), m)


def test_small_dense_operators_do_not_warn(rng):
    m = jnp.asarray(tridiagonal(99, rng))  # 9,801 < 10,000 stored entries
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxa.DenseOperatorWarning)
        A = jax.jit(lambda M: as_csr_operator(lx.MatrixLinearOperator(M)))(m)
    assert A.pattern.nnz == 99 * 99


def test_dense_pattern_beyond_int32_is_an_error_before_allocating():
    # 46,341^2 > 2^31 - 1: traced abstractly (no 8.6 GB matrix exists).
    big = jax.ShapeDtypeStruct((46_341, 46_341), jnp.float32)
    with pytest.raises(ValueError, match=r"(?s)shape \(46341, 46341\) would become "
                       r"a dense CSR matrix.*2,147,488,281 stored entries.*"
                       r"32-bit.*from_dense"):
        jax.eval_shape(lambda M: as_csr_operator(lx.MatrixLinearOperator(M)).values,
                       big)


def test_composed_operator_with_dense_sparsity_warns(rng):
    n = 102
    m = jnp.asarray(tridiagonal(n, rng))
    b = rng.standard_normal(n)

    @jax.jit
    def solve(M, b):
        op = lx.MatrixLinearOperator(M) + lx.IdentityLinearOperator(
            jax.ShapeDtypeStruct((n,), M.dtype))
        return lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10)).value

    with pytest.warns(lxa.DenseOperatorWarning,
                      match=r"AddLinearOperator\) of shape \(102, 102\).*detected "
                      r"sparsity is every entry"):
        x = solve(m, jnp.asarray(b))
    assert rel_err(x, np.linalg.solve(np.asarray(m) + np.eye(n), b)) < 1e-8


def test_complex_matrix_operator_is_kept_complex_not_cast(rng):
    """A complex Lineax operator keeps its imaginary part (it was cast to float64,
    dropping it, before complex systems were supported): the traced dense path
    solves the complex system, and a concrete one stores the complex entries."""
    n = 12
    m = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    m = jnp.asarray(m + 4 * n * np.eye(n), dtype=jnp.complex128)
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    x = lx.linear_solve(lx.MatrixLinearOperator(m), jnp.asarray(b),
                        solver=lxa.AMGX(rtol=1e-12)).value
    assert x.dtype == jnp.complex128
    ref = np.linalg.solve(np.asarray(m), b)
    assert np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref) < 1e-9
    csr = as_csr_operator(lx.MatrixLinearOperator(m))
    assert csr.values.dtype == jnp.complex128
    np.testing.assert_array_equal(csr.as_matrix(), m)


def test_concrete_matrix_operator_stores_its_nonzeros(rng):
    """Outside any trace (as_csr_operator or AMGXPreconditioner called eagerly) a
    MatrixLinearOperator's exact zeros are dropped, as from_dense does; no
    warning."""
    n = 150
    m = tridiagonal(n, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxa.DenseOperatorWarning)
        A = as_csr_operator(lx.MatrixLinearOperator(jnp.asarray(m)))
        P = lxa.AMGXPreconditioner(lx.MatrixLinearOperator(jnp.asarray(m)))
    assert A.pattern.nnz == 3 * n - 2 == lxa.CSROperator.from_dense(m).pattern.nnz
    assert P.pattern == A.pattern
    np.testing.assert_array_equal(A.as_matrix(), m)


def test_the_fix_from_dense_then_with_values(rng):
    """The documented fix: the pattern from the concrete matrix once, traced
    values on it (no warning, 3n - 2 entries)."""
    n = 300
    m = tridiagonal(n, rng)
    b = rng.standard_normal(n)
    template = lxa.CSROperator.from_dense(m)
    p = template.pattern

    @jax.jit
    def solve(M, b):
        op = template.with_values(M[p.row_ids, p.indices])
        return lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10)).value

    with warnings.catch_warnings():
        warnings.simplefilter("error", lxa.DenseOperatorWarning)
        x = solve(jnp.asarray(m), jnp.asarray(b))
    assert p.nnz == 3 * n - 2
    assert rel_err(x, np.linalg.solve(m, b)) < 1e-8


# ---------------------------------------------------------------------------
# 2. float64 host values without x64
# ---------------------------------------------------------------------------


@pytest.fixture
def x64_off():
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", True)


X64_HINT = r'jax.config.update\("jax_enable_x64", True\)'


def test_float64_host_values_without_x64_warn_at_the_call(x64_off):
    a = poisson2d(8)  # float64
    c = sp.csr_array(a)
    builders = {
        "from_scipy": lambda: lxa.CSROperator.from_scipy(a),
        "from_dense": lambda: lxa.CSROperator.from_dense(a.toarray()),
        "from_arrays": lambda: lxa.CSROperator.from_arrays(
            c.indptr, c.indices, c.data, c.shape),
        "from_arrays(sum_duplicates)": lambda: lxa.CSROperator.from_arrays(
            c.indptr, c.indices, c.data, c.shape, sum_duplicates=True),
        "CSROperator": lambda: lxa.CSROperator(
            lxa.SparsityPattern(c.indptr, c.indices, c.shape), c.data),
    }
    for name, build in builders.items():
        with pytest.warns(UserWarning, match=X64_HINT) as record:
            op = build()
        assert op.values.dtype == jnp.float32, name
        (w,) = [r for r in record if "rounded to float32" in str(r.message)]
        assert "np.float32" in str(w.message), name
        assert w.filename == __file__, (name, w.filename)  # the user's line


def test_complex128_host_values_without_x64_warn(x64_off):
    a = sp.csr_array(poisson2d(8).astype(np.complex128) * (1 + 0.5j))
    with pytest.warns(UserWarning, match=X64_HINT) as record:
        op = lxa.CSROperator.from_scipy(a)
    assert op.values.dtype == jnp.complex64
    (w,) = [r for r in record
            if "complex128 matrix values are rounded to complex64" in str(r.message)]
    assert "np.complex64" in str(w.message)
    assert w.filename == __file__


def test_float32_or_x64_values_do_not_warn(x64_off):
    a = poisson2d(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lxa.CSROperator.from_scipy(a, dtype=np.float32).values.dtype == (
            jnp.float32)
        lxa.CSROperator.from_scipy(a.astype(np.float32))
        lxa.CSROperator.from_dense(a.toarray().astype(np.float32))
        lxa.CSROperator.from_bcoo(
            jsparse.BCOO.from_scipy_sparse(a.astype(np.float32)))
        lxa.CSROperator.from_scipy(a.astype(np.int64))  # integers: no precision


def test_float64_values_with_x64_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = lxa.CSROperator.from_scipy(poisson2d(8))
    assert op.values.dtype == jnp.float64


def test_float32_solve_of_float64_right_hand_side_is_jaxs_business(x64_off, rng):
    """A float64 NumPy `b` becomes float32 in jnp.asarray, as everywhere in JAX:
    no warning from us; the solve is float32-accurate."""
    a = poisson2d(12)
    op = lxa.CSROperator.from_scipy(a, tags=SPD, dtype=np.float32)
    b = rng.standard_normal(a.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        x = lx.linear_solve(op, jnp.asarray(b), solver=lxa.AMGX(rtol=1e-5)).value
    assert x.dtype == jnp.float32
    assert np.linalg.norm(b - a @ np.asarray(x, np.float64)) < 1e-4 * np.linalg.norm(b)


# ---------------------------------------------------------------------------
# 3. Symmetry tags on non-symmetric values
# ---------------------------------------------------------------------------


def nonsymmetric_poisson(n, rng) -> sp.csr_array:
    """Poisson plus a random non-symmetric perturbation on the same pattern:
    structurally symmetric, numerically not."""
    a = sp.csr_array(poisson2d(n))
    a.data = a.data * (1 + 0.3 * rng.random(a.nnz))
    return a


def test_concrete_values_raise_naming_tag_and_entry(rng):
    a = nonsymmetric_poisson(10, rng)
    for tags, name in ((lx.symmetric_tag, "lx.symmetric_tag"),
                       (lx.positive_semidefinite_tag, "lx.positive_semidefinite_tag"),
                       (lx.negative_semidefinite_tag, "lx.negative_semidefinite_tag")):
        with pytest.raises(ValueError, match=rf"The CSROperator is tagged {name}, "
                           rf"{NOT_SYMMETRIC}: the largest asymmetry is "
                           r"A\[\d+, \d+\] = .* against A\[\d+, \d+\] = .*"
                           r"the tolerance is 1.5e-08.*Remove the tag"):
            lxa.CSROperator.from_scipy(a, tags=tags)
    # The entry named is the largest asymmetry.
    d = abs(a - a.T).tocoo()
    k = int(np.argmax(d.data))
    i, j = int(d.row[k]), int(d.col[k])
    with pytest.raises(ValueError) as e:
        lxa.CSROperator.from_scipy(a, tags=SPD)
    assert (f"A[{i}, {j}] = {a[i, j]:.6g} against A[{j}, {i}] = {a[j, i]:.6g}"
            in str(e.value)) or (
        f"A[{j}, {i}] = {a[j, i]:.6g} against A[{i}, {j}] = {a[i, j]:.6g}"
        in str(e.value))
    # Untagged: fine, and so is with_values of symmetric values on a tagged one.
    lxa.CSROperator.from_scipy(a)
    sym = lxa.CSROperator.from_scipy(poisson2d(10), tags=SPD)
    sym.with_values(sym.values * 2)
    with pytest.raises(ValueError, match=NOT_SYMMETRIC):
        sym.with_values(jnp.asarray(a.data))
    with pytest.raises(ValueError, match=NOT_SYMMETRIC):
        lxa.CSROperator.from_dense(a.toarray(), tags=lx.symmetric_tag)


def test_missing_mirror_entry_and_explicit_zeros(rng):
    # An entry whose mirror is not stored: compared with zero.
    a = sp.csr_array(sp.eye(6) * 4 + sp.csr_array(([0.5], ([1], [4])), shape=(6, 6)))
    with pytest.raises(ValueError, match=r"A\[1, 4\] = 0.5 against A\[4, 1\] = 0 "
                       r"\(not stored\)"):
        lxa.CSROperator.from_scipy(a, tags=lx.symmetric_tag)
    # Structurally non-symmetric but numerically symmetric (a stored zero): fine.
    indptr = np.array([0, 1, 3, 4, 5, 6, 7])
    indices = np.array([0, 1, 4, 2, 3, 4, 5])
    values = np.array([4.0, 4.0, 0.0, 4.0, 4.0, 4.0, 4.0])
    op = lxa.CSROperator.from_arrays(indptr, indices, values, (6, 6),
                                     tags=lx.symmetric_tag)
    assert op.pattern.nnz == 7 and not op.pattern.is_structurally_symmetric
    with pytest.raises(ValueError, match=r"A\[1, 4\] = 0.25 against A\[4, 1\] = 0 "
                       r"\(not stored\)"):
        op.with_values(op.values.at[2].set(0.25))


def test_round_off_asymmetry_passes(rng):
    a = sp.csr_array(poisson2d(10))
    a.data = a.data * (1 + 1e-12 * rng.standard_normal(a.nnz))
    lxa.CSROperator.from_scipy(a, tags=SPD)
    f32 = sp.csr_array(poisson2d(10), dtype=np.float32)
    f32.data = f32.data * (1 + 1e-6 * rng.standard_normal(f32.nnz)).astype(np.float32)
    lxa.CSROperator.from_scipy(f32, tags=SPD)  # float32: sqrt(eps) = 3.5e-4
    f32.data[3] *= 1.01
    with pytest.raises(ValueError, match="the tolerance is 3.5e-04"):
        lxa.CSROperator.from_scipy(f32, tags=SPD)


def test_block_values_are_checked_blockwise(rng):
    nb, b = 8, 2
    s = sp.csr_array(sp.eye(nb) + sp.eye(nb, k=1) + sp.eye(nb, k=-1))
    data = rng.standard_normal((s.nnz, b, b))
    a = sp.bsr_array((data, s.indices, s.indptr), shape=(nb * b, nb * b))
    sym = sp.bsr_array((a + a.T + 10 * sp.eye(nb * b)).tobsr(blocksize=(b, b)))
    op = lxa.CSROperator.from_scipy(sym, tags=SPD)
    assert op.block_size == 2
    # Symmetric as a scalar matrix is what counts: blocks (i, j) and (j, i)^T.
    bad = np.array(op.values)
    bad[0, 0, 1] += 1.0  # block (0, 0), entry (0, 1): scalar A[0, 1]
    with pytest.raises(ValueError, match=r"A\[0, 1\] = .* against A\[1, 0\]"):
        op.with_values(bad)


def test_non_square_tagged_symmetric_is_refused():
    with pytest.raises(ValueError, match=r"tagged lx.symmetric_tag, but its shape "
                       r"\(3, 4\) is not square"):
        lxa.CSROperator.from_dense(np.ones((3, 4)), tags=lx.symmetric_tag)


def _grad_reference(a, b, w):
    """d(w . A^{-1} b) / d values: -(A^{-T} w)_i x_j for each stored (i, j)."""
    x = np.linalg.solve(a.toarray(), b)
    lam = np.linalg.solve(a.toarray().T, w)
    c = sp.csr_array(a)
    rows = np.repeat(np.arange(a.shape[0]), np.diff(c.indptr))
    return -lam[rows] * x[c.indices]


def test_traced_values_error_instead_of_wrong_gradients(rng):
    """The issue's case: non-symmetric values tagged symmetric gave gradients 25 %
    wrong with a 'successful' forward solve. Now the solve raises under jit
    (and under grad); untagged, the gradient is right."""
    a = nonsymmetric_poisson(10, rng)
    p = lxa.CSROperator.from_scipy(a).pattern
    values = jnp.asarray(sp.csr_array(a).data)
    b, w = rng.standard_normal(a.shape[0]), rng.standard_normal(a.shape[0])
    solver = lxa.AMGX(rtol=1e-12)

    def loss(v, tags):
        op = lxa.CSROperator(p, v, tags)
        return jnp.dot(w, lx.linear_solve(op, jnp.asarray(b), solver=solver).value)

    for tags in (lx.symmetric_tag, SPD):
        with pytest.raises(RUNTIME, match=rf"The operator given to AMGX is tagged "
                           rf".*lx.symmetric_tag, {NOT_SYMMETRIC}: some "
                           r"\|A\[i, j\] - A\[j, i\]\| exceeds 1.5e-08"):
            jax.grad(loss)(values, tags)
        with pytest.raises(RUNTIME, match=NOT_SYMMETRIC):
            jax.jit(loss, static_argnums=1)(values, tags).block_until_ready()
    g = jax.grad(loss)(values, ())
    assert rel_err(g, _grad_reference(a, b, w)) < 1e-7


def test_symmetric_values_pass_under_jit_grad_jvp(rng):
    a = sp.csr_array(poisson2d(10))
    a.data = a.data * (1 + 0.1 * rng.random(a.nnz))
    a = sp.csr_array(a + a.T)  # symmetric, positive definite
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    p = op.pattern
    b, w = rng.standard_normal(a.shape[0]), rng.standard_normal(a.shape[0])
    solver = lxa.AMGX(rtol=1e-12)

    def solve(v):
        return lx.linear_solve(lxa.CSROperator(p, v, SPD), jnp.asarray(b),
                               solver=solver).value

    x = jax.jit(solve)(op.values)
    assert rel_err(x, np.linalg.solve(a.toarray(), b)) < 1e-9
    g = jax.jit(jax.grad(lambda v: jnp.dot(w, solve(v))))(op.values)
    assert rel_err(g, _grad_reference(a, b, w)) < 1e-7
    # jvp along a symmetric direction: dx = -A^{-1} dA x
    dv = jnp.asarray(p.to_scipy(rng.standard_normal(p.nnz)).toarray())
    dv = (dv + dv.T)[p.row_ids, p.indices]
    _, dx = jax.jvp(solve, (op.values,), (dv,))
    dA = p.to_scipy(np.asarray(dv)).toarray()
    ref = -np.linalg.solve(a.toarray(), dA @ np.asarray(x))
    assert rel_err(dx, ref) < 1e-7


def test_vmap_over_values_checks_every_member(rng):
    a = poisson2d(10)
    op = lxa.CSROperator.from_scipy(a, tags=SPD)
    p = op.pattern
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    solver = lxa.AMGX(rtol=1e-11)

    def solve(v):
        return lx.linear_solve(lxa.CSROperator(p, v, SPD), b, solver=solver).value

    batch = jnp.stack([op.values, 2.0 * op.values])
    xs = jax.vmap(solve)(batch)
    ref = np.linalg.solve(a.toarray(), np.asarray(b))
    assert rel_err(xs[0], ref) < 1e-9 and rel_err(xs[1], ref / 2) < 1e-9
    k = int(np.flatnonzero(p.mirror != np.arange(p.nnz))[0])
    bad = batch.at[1, k].add(0.5)  # the second member is not symmetric
    with pytest.raises(RUNTIME, match=NOT_SYMMETRIC):
        jax.vmap(solve)(bad).block_until_ready()


def test_preconditioner_uses_the_same_check(rng):
    a = nonsymmetric_poisson(10, rng)
    untagged = lxa.CSROperator.from_scipy(a)
    with pytest.raises(ValueError, match=rf"AMGXPreconditioner is tagged "
                       rf"lx.positive_semidefinite_tag, lx.symmetric_tag, "
                       rf"{NOT_SYMMETRIC}: the largest asymmetry"):
        lxa.AMGXPreconditioner(untagged, tags=lx.positive_semidefinite_tag)
    lxa.AMGXPreconditioner(untagged)  # untagged: a non-symmetric cycle, fine
    # Traced, in AMGXPreconditioned's init (the matrix tagged symmetric):
    p = untagged.pattern
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    solver = lxa.AMGXPreconditioned(lx.GMRES(rtol=1e-10, atol=1e-10))

    @ft.partial(jax.jit, static_argnums=1)
    def solve(v, tags):
        return lx.linear_solve(lxa.CSROperator(p, v, tags), b, solver=solver).value

    with pytest.raises(RUNTIME, match=rf"The matrix of AMGXPreconditioner is "
                       rf"tagged lx.symmetric_tag, {NOT_SYMMETRIC}"):
        solve(untagged.values, lx.symmetric_tag).block_until_ready()
    x = solve(untagged.values, ())
    assert rel_err(x, np.linalg.solve(a.toarray(), np.asarray(b))) < 1e-8


def test_random_nonsymmetric_matrices_are_caught(rng):
    """Not only a perturbed Poisson: random sparse patterns, structurally
    non-symmetric."""
    for seed in range(5):
        a = random_nonsymmetric(60, np.random.default_rng(seed), density=0.08)
        with pytest.raises(ValueError, match=NOT_SYMMETRIC):
            lxa.CSROperator.from_scipy(a, tags=lx.symmetric_tag)
        s = sp.csr_array(a + a.T)
        lxa.CSROperator.from_scipy(s, tags=lx.symmetric_tag)  # symmetric: fine
        perm = s.tocsr()  # the mirror maps every stored entry to its transpose
        pat = lxa.CSROperator.from_scipy(perm).pattern
        np.testing.assert_array_equal(
            pat.row_ids[pat.mirror], pat.indices)
        np.testing.assert_array_equal(
            pat.indices[pat.mirror], pat.row_ids)


def test_distributed_operator_single_rank_still_solves(rng):
    """A DistributedCSROperator's symmetry tag is trusted (each rank holds only
    its rows); the check must not get in its way (one rank, under jit and grad)."""
    try:
        from mpi4py import MPI as mpi
    except (ImportError, RuntimeError, OSError) as e:  # pragma: no cover
        pytest.skip(f"mpi4py cannot load an MPI library: {e}")
    a = poisson2d(10)
    op = lxa.DistributedCSROperator.from_global_scipy(a, mpi.COMM_SELF, tags=SPD)
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    solver = lxa.AMGX(rtol=1e-12)
    x = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)(op, b)
    ref = np.linalg.solve(a.toarray(), np.asarray(b))
    assert rel_err(x, ref) < 1e-9
    g = jax.grad(lambda v: jnp.sum(lx.linear_solve(op, v, solver=solver).value))(b)
    assert rel_err(g, np.linalg.solve(a.toarray().T, np.ones(a.shape[0]))) < 1e-9


# ---------------------------------------------------------------------------
# The benchmark of the check's cost runs (tiny, on the CPU).
# ---------------------------------------------------------------------------


def test_check_benchmark_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "checks.py")
    out = subprocess.run(
        [sys.executable, script, "--n", "8", "--repeats", "3"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr
    assert "the check fires on a non-symmetric matrix: True" in out.stdout
    line = [s for s in out.stdout.splitlines() if s.startswith("check cost: ")]
    assert len(line) == 1 and " ms per solve (" in line[0]
    assert line[0].endswith(" % of the solve)")


# ---------------------------------------------------------------------------
# On the GPU (AmgX): the traced check runs on the device, before AmgX's setup.
# ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_symmetry_check_under_jit_and_grad(rng):
    gpu = jax.devices("cuda")[0]
    a = sp.csr_array(poisson2d(20))
    a.data = a.data * (1 + 0.1 * rng.random(a.nnz))
    a = sp.csr_array(a + a.T)  # symmetric positive definite
    op = jax.device_put(lxa.CSROperator.from_scipy(a, tags=SPD), gpu)
    p = op.pattern
    b, w = rng.standard_normal(a.shape[0]), rng.standard_normal(a.shape[0])
    bg, wg = jax.device_put(jnp.asarray(b), gpu), jax.device_put(jnp.asarray(w), gpu)
    solver = lxa.AMGX(rtol=1e-12)

    def loss(v, tags):
        x = lx.linear_solve(lxa.CSROperator(p, v, tags), bg, solver=solver).value
        return jnp.dot(wg, x)

    g = jax.jit(jax.grad(loss), static_argnums=1)(op.values, SPD)
    assert list(g.devices()) == [gpu]
    assert rel_err(g, _grad_reference(a, b, w)) < 1e-7
    k = int(np.flatnonzero(p.mirror != np.arange(p.nnz))[0])
    bad = op.values.at[k].add(0.5)
    before = lxa.cache_info("amgx")
    with pytest.raises(RUNTIME, match=rf"tagged .*lx.symmetric_tag, {NOT_SYMMETRIC}"):
        jax.jit(jax.grad(loss), static_argnums=1)(bad, SPD).block_until_ready()
    after = lxa.cache_info("amgx")  # the check stops the program before AmgX
    assert (after["setups"], after["resetups"]) == (
        before["setups"], before["resetups"])
    g = jax.grad(loss)(bad, ())  # untagged: right
    b_ref = p.to_scipy(np.asarray(bad))
    assert rel_err(g, _grad_reference(b_ref, b, w)) < 1e-7


def test_strict_numpy_modes_solve_and_multiply(rng):
    """Lineax's own tests run with `jax_numpy_rank_promotion="raise"` and strict
    dtype promotion; a user may too. The mat-vec (row layout and segment sum),
    the checks and the solve must not rely on implicit rank promotion."""
    a = sp.csr_array(poisson2d(8))
    blocks = sp.bsr_array(sp.kron(a, np.eye(2)) + 0.1 * sp.eye(128), blocksize=(2, 2))
    for m, tags in ((a, SPD), (blocks, ())):
        op = lxa.CSROperator.from_scipy(m, tags=tags)
        x = jnp.asarray(rng.standard_normal(m.shape[0]))
        with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
            y = jax.jit(lambda o, v: o.mv(v))(op, x)
            sol = lx.linear_solve(op, y, solver=lxa.AMGX(rtol=1e-10, atol=1e-12))
        assert rel_err(y, m @ np.asarray(x)) < 1e-13
        assert rel_err(sol.value, x) < 1e-8
