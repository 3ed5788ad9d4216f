"""Optimistix with `AMGX`: Newton, Chord and implicit differentiation of a root.

The problem is the 2-D Bratu equation `-Δu = λ exp(u)` on the unit square with
zero Dirichlet data (5-point finite differences, `n x n` interior grid), written
matrix-free: Optimistix hands `AMGX` the Jacobian as a `FunctionLinearOperator`
(Newton, from `jax.linearize`) or a `JacobianLinearOperator` (Chord, implicit
adjoint), and `AMGX.init` sparsifies it (traced pattern, coloring, one JVP per
color). References: the same Newton iteration with a dense LU
(`lx.AutoLinearSolver(well_posed=True)`), and finite differences. On the CPU
(pyamg) and on the GPU (AmgX: `pytest -m gpu tests/test_optimistix.py`), with
a 16 x 16 and a 24 x 24 grid.
"""

import math

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import lineax_amgx as lxa
from lineax_amgx.matrix_free import _sparsify

LAM = 5.0  # below the fold (~6.81): the lower branch, an SPD Jacobian
SPD = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
TOL = 1e-10  # Newton's rtol and atol
AMGX = lxa.AMGX(rtol=1e-12)
DENSE = lx.AutoLinearSolver(well_posed=True)

# The interior grid per backend: 256 unknowns on the CPU, 576 on the GPU.
GRID = dict(cpu=16, gpu=24)


def bratu(u, args):
    """Residual of `-Δu - λ exp(u) (+ β ∂u/∂x, central differences)`; `args` is
    `(λ, β)`. With `β = 0` its Jacobian is symmetric. `u` holds the `n x n`
    interior grid."""
    lam, beta = args
    n = math.isqrt(u.size)
    h = 1.0 / (n + 1)
    U = u.reshape(n, n)
    P = jnp.pad(U, 1)
    lap = (4 * U - P[:-2, 1:-1] - P[2:, 1:-1] - P[1:-1, :-2] - P[1:-1, 2:]) / h**2
    conv = beta * (P[1:-1, 2:] - P[1:-1, :-2]) / (2 * h)
    return (lap + conv - lam * jnp.exp(U)).ravel()


def root(backend, lam, beta, solver, root_finder=optx.Newton, tags=SPD, **kw):
    rf = root_finder(rtol=TOL, atol=TOL, linear_solver=solver)
    n = GRID[backend.name]
    u0 = backend.put(np.zeros(n * n))
    return optx.root_find(bratu, rf, u0, (lam, beta), tags=tags, **kw)


_REFERENCES = {}


@pytest.fixture
def reference(backend):
    """The Bratu root by Newton with dense LU (and a check that it is a root), on
    the backend's device; computed once per backend."""
    if backend.name not in _REFERENCES:
        u = root(backend, LAM, 0.0, DENSE).value
        assert float(jnp.max(jnp.abs(bratu(u, (LAM, 0.0))))) < 1e-7
        assert 0.3 < float(jnp.max(u)) < 1.0  # the lower branch
        _REFERENCES[backend.name] = u
    return _REFERENCES[backend.name]


def test_newton_matches_dense_newton(reference, backend):
    det0 = _sparsify.detection_count()
    sol = root(backend, LAM, 0.0, AMGX)
    steps = int(sol.stats["num_steps"])
    u = sol.value
    assert float(jnp.max(jnp.abs(u - reference))) < 1e-8
    assert float(jnp.max(jnp.abs(bratu(u, (LAM, 0.0))))) < 1e-7
    # Every Newton step has a new Jacobian: one (re)setup and one solve per step.
    c = backend.counts(u)
    assert 3 <= steps <= 10, steps
    assert c["setups"] == 1 and c["setups"] + c["resetups"] == steps, (c, steps)
    assert c["solves"] == steps and c["size"] == 1, c
    # The pattern of the linearised residual is detected once per compile, not
    # once per Newton step (memoised per jaxpr).
    assert _sparsify.detection_count() - det0 <= 1


def test_chord_reuses_one_setup(reference, backend):
    """Chord keeps the solver state of its first Jacobian: every iteration is a
    solve on that setup (its token), never a new setup."""
    sol = root(backend, LAM, 0.0, AMGX, optx.Chord)
    k = int(sol.stats["num_steps"])
    assert k >= 5, k  # a real sequence of chord iterations
    c = backend.counts(sol.value)
    assert c == {"setups": 1, "resetups": 0, "solves": k, "size": 1}, c
    assert float(jnp.max(jnp.abs(sol.value - reference))) < 1e-8


@pytest.mark.parametrize("beta", [0.0, 20.0], ids=["symmetric", "nonsymmetric"])
def test_implicit_adjoint_gradient_wrt_lambda(beta, backend):
    """d/dλ of a functional of the root by the implicit function theorem (the
    adjoint solves with the transposed Jacobian), against central differences of
    the root itself and against the same adjoint with a dense solver."""
    tags = SPD if beta == 0.0 else frozenset()
    n = GRID[backend.name]
    w = backend.put(np.random.default_rng(7).standard_normal(n * n))

    def functional(lam, solver):
        sol = root(backend, lam, beta, solver, tags=tags,
                   adjoint=optx.ImplicitAdjoint(solver))
        return jnp.vdot(w, sol.value) + jnp.sum(sol.value**2)

    value_and_grad = jax.jit(jax.value_and_grad(functional), static_argnums=1)
    val, g = value_and_grad(LAM, AMGX)
    c = backend.counts(val, g)
    entries = lxa.cache_info(backend.cache)["entries"]
    if beta == 0.0:
        # Symmetric Jacobian: the adjoint solve reuses the forward state.
        assert [e["transposed"] for e in entries] == [False], entries
    else:
        assert sorted(e["transposed"] for e in entries) == [False, True], entries
    assert c["solves"] >= 2

    val_ref, g_ref = value_and_grad(LAM, DENSE)
    assert abs(float(val - val_ref)) < 1e-9 * abs(float(val_ref))
    assert abs(float(g - g_ref)) < 1e-7 * abs(float(g_ref)), (g, g_ref)

    f = jax.jit(functional, static_argnums=1)
    eps = 1e-4
    fd = (f(LAM + eps, AMGX) - f(LAM - eps, AMGX)) / (2 * eps)
    assert abs(float(g - fd)) < 1e-6 * abs(float(fd)), (g, fd)

    # Forward mode through the same implicit rule (solves with the Jacobian).
    def along_lam(lam):
        return jax.jvp(lambda x: functional(x, AMGX), (lam,), (1.0,))[1]

    t = jax.jit(along_lam)(LAM)
    assert abs(float(t - g)) < 1e-7 * abs(float(g)), (t, g)
