"""Reverse mode through non-symmetric distributed solves: the transposed
distributed pattern (a redistribution of the entries between the ranks, built
once per pattern) and the transposed values (one exchange at run time). Every
rank runs every test (collective); on the CPU with 2 and 3 ranks:

    cd tests && mpiexec -n 3 python -m pytest test_distributed_transpose.py \\
        -m "mpi and not gpu" -q -p no:cacheprovider

On the device (2 ranks sharing one GPU, AmgX's distributed solver):

    cd tests && mpirun --allow-run-as-root -n 2 python -m pytest \\
        test_distributed_transpose.py -m "gpu and mpi" -q -p no:cacheprovider

References: scipy (the transpose, `spsolve` of `A` and `A^T`), and the
single-process dense gradients `dL/db = A^-T w`, `dL/dA_ij = -(A^-T w)_i x_j`.
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
from _backend import cases  # noqa: E402
from _mpi_helpers import (  # noqa: E402, F401 (fresh_cpu_cache: an autouse fixture)
    COMM,
    RANK,
    SIZE,
    fresh_cpu_cache,
)
from helpers import random_nonsymmetric, rel_err  # noqa: E402
from test_distributed_solve import device  # noqa: E402

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as D  # noqa: E402
from lineax_amgx.distributed import _transpose as DT  # noqa: E402

pytestmark = pytest.mark.mpi
collective = _mpi_helpers.collective(COMM)


def nonsymmetric(n, seed=7, offsets=None):
    """A random non-symmetric matrix (structurally non-symmetric too), the
    operator of it and a random right-hand side, both distributed."""
    A = random_nonsymmetric(n, np.random.default_rng(seed), density=0.08)
    op = lxa.DistributedCSROperator.from_global_scipy(A if RANK == 0 else None,
                                                      offsets=offsets)
    return sp.csr_array(A), op


@collective
def test_transposed_pattern_is_scipys_transpose():
    A, op = nonsymmetric(90)
    assert (A != A.T).nnz > 0  # structurally non-symmetric
    op_t = op.transpose()
    At = op_t.gather_scipy(root=None)
    assert At.shape == A.shape
    assert abs(At - A.T).max() == 0
    # Built once: the same objects again, and the transpose's transpose is the
    # pattern itself (no second exchange).
    assert op.transpose().pattern is op_t.pattern
    assert DT.transpose_pattern(op_t.pattern)[0] is op.pattern
    np.testing.assert_array_equal(np.asarray(op_t.transpose().values),
                                  np.asarray(op.values))
    # mv of the transpose against scipy, eagerly and under jit
    x = np.random.default_rng(1).standard_normal(90)
    sl = slice(op.layout.row_start, op.layout.row_end)
    y = jax.jit(lambda o, v: o.transpose().mv(v))(op, jnp.asarray(x[sl]))
    np.testing.assert_allclose(np.asarray(y), (A.T @ x)[sl], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(op_t.mv(jnp.asarray(x[sl]))),
                               (A.T @ x)[sl], rtol=1e-12)


@collective
def test_transpose_with_uneven_rows_and_an_empty_block():
    """Uneven offsets: one rank owns many more rows, and (with 3 ranks) the entries
    of one rank's columns all come from other ranks."""
    n = 40
    cuts = np.linspace(0, n, SIZE + 1).astype(int)
    cuts[1] = 3  # rank 0: three rows
    A, op = nonsymmetric(n, seed=2, offsets=tuple(int(c) for c in cuts))
    At = op.transpose().gather_scipy(root=None)
    assert abs(At - A.T).max() == 0


@collective
def test_transposed_values_differentiate():
    """`w . (A^T x)` is linear in the values: its gradient is `x_i w_j` at entry
    `(i, j)` (the reverse exchange carries it back to the owner)."""
    A, op = nonsymmetric(60, seed=4)
    lay = op.layout
    sl = slice(lay.row_start, lay.row_end)
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal(60), rng.standard_normal(60)

    def f(values):
        y = op.with_values(values).transpose().mv(jnp.asarray(x[sl]))
        return D.global_dot(jnp.asarray(w[sl]), y, lay)

    g = jax.jit(jax.grad(f))(op.values)
    local = op.to_scipy_local().tocoo()
    expected = x[local.row + lay.row_start] * w[local.col]
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-12, atol=1e-14)


@cases("jit", cpu=(False, True), gpu=(True,))
@collective
def test_grad_nonsymmetric_matches_scipy(backend, jit):
    """`jax.grad` w.r.t. the values and `b` through a non-symmetric solve (the
    backward pass solves with the transposed distributed operator: its own
    pattern, setup and cache entry)."""
    n = backend.pick(cpu=216, gpu=4096)
    A, op = nonsymmetric(n, seed=backend.pick(cpu=7, gpu=8))
    op = jax.device_put(op, device(backend))
    lay = op.layout
    sl = slice(lay.row_start, lay.row_end)
    rng = np.random.default_rng(13)
    b, w = rng.standard_normal(n), rng.standard_normal(n)
    bl = jax.device_put(jnp.asarray(b[sl]), device(backend))
    wl = jax.device_put(jnp.asarray(w[sl]), device(backend))
    solver = lxa.AMGX(rtol=1e-12)

    def loss(values, bl):
        x = lx.linear_solve(op.with_values(values), bl, solver=solver).value
        return D.global_dot(wl, x, lay)

    grad = jax.grad(loss, argnums=(0, 1))
    gv, gb = (jax.jit(grad) if jit else grad)(op.values, bl)
    x = spla.spsolve(sp.csc_matrix(A), b)
    lam = spla.spsolve(sp.csc_matrix(A.T), w)
    local = op.to_scipy_local().tocoo()
    ref_v = -lam[local.row + lay.row_start] * x[local.col]
    assert rel_err(np.asarray(gb), lam[sl]) < 1e-8, rel_err(np.asarray(gb), lam[sl])
    assert rel_err(np.asarray(gv), ref_v) < 1e-8, rel_err(np.asarray(gv), ref_v)
    # A finite difference along a random direction of the values: a different
    # method than the adjoint.
    dv = jnp.asarray(np.random.default_rng(RANK + 1).standard_normal(gv.shape))
    dv = jax.device_put(dv, device(backend))
    eps = 1e-5
    fd = (loss(op.values + eps * dv, bl) - loss(op.values - eps * dv, bl)) / (2 * eps)
    ad = D.global_dot(gv, dv, lay)
    assert abs(float(fd) - float(ad)) <= 1e-5 * max(1.0, abs(float(ad))), (fd, ad)
    if backend.gpu:
        # The backward solve has its own distributed entry (transposed), the
        # same on every rank.
        entries = lxa.cache_info()["distributed"]["communicators"]
        flags = sorted(e["transposed"] for c in entries for e in c["amgx_entries"])
        assert COMM.allgather(flags) == [flags] * SIZE
        assert True in flags and False in flags, flags
