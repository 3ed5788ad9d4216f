"""Differentiating and batching through AmgX on the GPU (run on the device:
`pytest -m gpu tests/test_gpu_autodiff.py`).

The CPU twins are `test_autodiff.py` and `test_optimistix.py`; here every array
lives on the GPU, so `AMGX` dispatches to AmgX, and the setup counters are the
native cache's (`lxa.cache_info("amgx")`, one entry per key by default).
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
import scipy.sparse as sp
from helpers import convection_diffusion2d, gpu_array, poisson2d, rel_err

import lineax_amgx as lxa

pytestmark = pytest.mark.gpu

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
RTOL = 1e-12


def gpu():
    return jax.devices("cuda")[0]


def gpu_op(a, tags=()):
    return jax.device_put(lxa.CSROperator.from_scipy(a, tags=tags), gpu())


def counts(*outputs):
    """The cache counters, once `outputs` are computed (dispatch is asynchronous:
    the host callbacks that count may still be running)."""
    jax.block_until_ready(outputs)
    info = lxa.cache_info("amgx")
    return {k: info[k] for k in ("setups", "resetups", "solves", "size")}


def random_spd(n: int, rng) -> sp.csr_array:
    r = sp.random(n, n, density=4.0 / n, random_state=rng, format="csr")
    s = r + r.T
    s = s - sp.diags_array(s.diagonal())
    rowsum = np.asarray(abs(s).sum(axis=1)).ravel()
    return sp.csr_array(s + sp.diags_array(rowsum + 1.0 + rng.random(n)))


PROBLEMS = {
    "poisson_tagged": (lambda rng: poisson2d(30), SPD),
    "random_sym_untagged": (lambda rng: random_spd(900, rng), ()),
    "convdiff_nonsym": (lambda rng: convection_diffusion2d(30, peclet=30.0), ()),
}


def dense(pattern, values):
    m = jnp.zeros(pattern.shape, values.dtype)
    return m.at[pattern.row_ids, pattern.indices].add(values)


def loss_fns(op, c, solver):
    p, tags = op.pattern, op.tags

    def amgx(values, b):
        x = lx.linear_solve(lxa.CSROperator(p, values, tags), b, solver=solver).value
        return jnp.vdot(c, x) + 0.5 * jnp.sum(x**2)

    def ref(values, b):
        x = jnp.linalg.solve(dense(p, values), b)
        return jnp.vdot(c, x) + 0.5 * jnp.sum(x**2)

    return amgx, ref


def value_direction(op, rng):
    """Random; symmetric for a symmetric-tagged operator (see test_autodiff)."""
    t = gpu_array(rng.standard_normal(op.pattern.value_shape))
    if lx.symmetric_tag in op.tags:
        _, perm = op.pattern.transpose()
        t = 0.5 * (t + t[perm])
    return t


def assert_close(x, ref, tol=1e-7):
    err = rel_err(x, ref)
    assert err < tol, err


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_grad_jvp_and_jvp_of_grad(name, rng):
    factory, tags = PROBLEMS[name]
    op = gpu_op(factory(rng), tags)
    n = op.pattern.shape[0]
    b = gpu_array(rng.standard_normal(n))
    c = gpu_array(rng.standard_normal(n))
    tv = value_direction(op, rng)
    tb = gpu_array(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))

    def all_(f):
        def fn(values, b):
            val, grads = jax.value_and_grad(f, argnums=(0, 1))(values, b)
            _, hvp = jax.jvp(jax.grad(f, argnums=(0, 1)), (values, b), (tv, tb))
            _, t = jax.jvp(f, (values, b), (tv, tb))
            return val, grads, hvp, t

        return jax.jit(fn)

    out = all_(f)(op.values, b)
    ref = all_(f_ref)(op.values, b)
    assert abs(float(out[0]) - float(ref[0])) < 1e-9 * abs(float(ref[0]))
    for x, r in zip(jax.tree.leaves(out[1:]), jax.tree.leaves(ref[1:])):
        assert_close(x, r)
    # eager grad too
    g = jax.grad(f, argnums=(0, 1))(op.values, b)
    assert_close(g[0], ref[1][0])
    assert_close(g[1], ref[1][1])


def test_symmetric_gradient_one_setup_two_solves(rng):
    factory, tags = PROBLEMS["poisson_tagged"]
    op = gpu_op(factory(rng), tags)
    n = op.pattern.shape[0]
    b = gpu_array(rng.standard_normal(n))
    c = gpu_array(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    g = jax.jit(jax.grad(f, argnums=(0, 1)))(op.values, b)
    assert counts(g) == {"setups": 1, "resetups": 0, "solves": 2, "size": 1}
    r = jax.grad(f_ref, argnums=(0, 1))(op.values, b)
    assert_close(g[0], r[0])
    assert_close(g[1], r[1])
    # second order on the same setup: 4 more solves, no setup
    lxa.reset_counters()
    tv = value_direction(op, rng)
    out = jax.jit(lambda v, b: jax.jvp(jax.grad(f), (v, b), (tv, b)))(op.values, b)
    c_ = counts(out)
    assert (c_["setups"], c_["resetups"], c_["solves"]) == (0, 0, 4), c_


def test_nonsymmetric_gradient_transposed_entry(rng):
    factory, tags = PROBLEMS["convdiff_nonsym"]
    op = gpu_op(factory(rng), tags)
    n = op.pattern.shape[0]
    b = gpu_array(rng.standard_normal(n))
    c = gpu_array(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    grad = jax.jit(jax.grad(f))
    g = grad(op.values, b)
    assert counts(g) == {"setups": 2, "resetups": 0, "solves": 2, "size": 2}
    entries = lxa.cache_info("amgx")["entries"]
    assert sorted(e["transposed"] for e in entries) == [False, True]
    assert_close(g, jax.grad(f_ref)(op.values, b), 1e-6)
    g = grad(op.values * 1.5, b)  # new values: one resetup per entry
    assert counts(g) == {"setups": 2, "resetups": 2, "solves": 4, "size": 2}
    assert_close(g, jax.grad(f_ref)(op.values * 1.5, b), 1e-6)


def test_vmap_over_8_rhs_one_setup(rng):
    factory, tags = PROBLEMS["poisson_tagged"]
    op = gpu_op(factory(rng), tags)
    n = op.pattern.shape[0]
    bs = gpu_array(rng.standard_normal((8, n)))
    solver = lxa.AMGX(rtol=RTOL)
    xs = jax.jit(jax.vmap(lambda b: lx.linear_solve(op, b, solver=solver).value))(bs)
    assert counts(xs) == {"setups": 1, "resetups": 0, "solves": 8, "size": 1}
    ref = jnp.linalg.solve(dense(op.pattern, op.values), bs.T).T
    for i in range(8):
        assert_close(xs[i], ref[i])


def test_vmap_of_grad_over_rhs_one_setup(rng):
    factory, tags = PROBLEMS["poisson_tagged"]
    op = gpu_op(factory(rng), tags)
    n = op.pattern.shape[0]
    bs = gpu_array(rng.standard_normal((8, n)))
    c = gpu_array(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    g = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(None, 0)))(op.values, bs)
    assert counts(g) == {"setups": 1, "resetups": 0, "solves": 16, "size": 1}
    r = jax.vmap(jax.grad(f_ref, argnums=(0, 1)), in_axes=(None, 0))(op.values, bs)
    assert_close(g[0], r[0])
    assert_close(g[1], r[1])


@pytest.mark.parametrize("entries_per_key", [1, 4])
def test_vmap_over_values_and_rhs(entries_per_key, rng):
    """A setup per batch member. The batched setups all run before the batched
    solves (`vmap_method="sequential"` loops each call), so with one resident
    setup per key (the AmgX default) each member is set up again by its solve
    (its token is stale): 2B (re)setups; with `entries_per_key >= B`, exactly B
    setups and no resetup."""
    lxa.set_cache_size(8, entries_per_key=entries_per_key)
    factory, tags = PROBLEMS["convdiff_nonsym"]
    op = gpu_op(factory(rng), tags)
    p = op.pattern
    batch = 4
    vals = op.values * (1.0 + 0.2 * gpu_array(rng.random((batch, p.nnz))))
    bs = gpu_array(rng.standard_normal((batch, p.shape[0])))
    solver = lxa.AMGX(rtol=RTOL)

    def solve(v, b):
        return lx.linear_solve(lxa.CSROperator(p, v), b, solver=solver).value

    xs = jax.jit(jax.vmap(solve))(vals, bs)
    c = counts(xs)
    print(f"entries_per_key={entries_per_key}: {c}")
    assert c["solves"] == batch, c
    if entries_per_key >= batch:
        assert (c["setups"], c["resetups"]) == (batch, 0), c
    else:
        assert batch <= c["setups"] + c["resetups"] <= 2 * batch, c
    for i in range(batch):
        assert_close(xs[i], jnp.linalg.solve(dense(p, vals[i]), bs[i]))


def test_warm_start_same_answer_and_gradient(rng):
    factory, tags = PROBLEMS["convdiff_nonsym"]
    op = gpu_op(factory(rng), tags)
    p = op.pattern
    n = p.shape[0]
    b = gpu_array(rng.standard_normal(n))
    c = gpu_array(rng.standard_normal(n))
    solver = lxa.AMGX(rtol=1e-10)
    x_ref = jnp.linalg.solve(dense(p, op.values), b)
    y0 = x_ref + 1e-7 * jnp.linalg.norm(x_ref) * gpu_array(rng.standard_normal(n))

    @jax.jit
    def solve(values, b, guess):
        o = lxa.CSROperator(p, values)
        sol = lx.linear_solve(o, b, solver=solver, options={"y0": guess})
        return sol.value, sol.stats["num_steps"]

    def loss(values, b, guess):
        x = solve(values, b, jax.lax.stop_gradient(guess))[0]
        return jnp.vdot(c, x) + 0.5 * jnp.sum(x**2)

    def loss_ref(values, b):
        x = jnp.linalg.solve(dense(p, values), b)
        return jnp.vdot(c, x) + 0.5 * jnp.sum(x**2)

    x_cold, s_cold = solve(op.values, b, jnp.zeros_like(b))
    x_warm, s_warm = solve(op.values, b, y0)
    # On this small problem AmgX's FGMRES may need a single iteration cold (it did
    # on an H200): then the warm start cannot do better. The iteration saving
    # itself is tested on a larger problem in test_gpu.py.
    assert int(s_warm) <= int(s_cold)
    if int(s_cold) > 1:
        assert int(s_warm) < int(s_cold)
    assert_close(x_cold, x_ref, 1e-8)
    assert_close(x_warm, x_ref, 1e-8)
    r = jax.grad(loss_ref, argnums=(0, 1))(op.values, b)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for guess in (jnp.zeros_like(b), y0):
        for g, gr in zip(grad(op.values, b, guess), r):
            assert_close(g, gr, 1e-6)


# ---------------------------------------------------------------------------
# Optimistix (matrix-free Jacobians, sparsified by AMGX.init).
# ---------------------------------------------------------------------------

N = 24
LAM = 5.0
SPD_TAGS = frozenset(SPD)


def bratu(u, args):
    lam, beta = args
    h = 1.0 / (N + 1)
    U = u.reshape(N, N)
    P = jnp.pad(U, 1)
    lap = (4 * U - P[:-2, 1:-1] - P[2:, 1:-1] - P[1:-1, :-2] - P[1:-1, 2:]) / h**2
    conv = beta * (P[1:-1, 2:] - P[1:-1, :-2]) / (2 * h)
    return (lap + conv - lam * jnp.exp(U)).ravel()


def root(lam, beta, solver, root_finder=optx.Newton, tags=SPD_TAGS, **kw):
    rf = root_finder(rtol=1e-10, atol=1e-10, linear_solver=solver)
    u0 = jax.device_put(jnp.zeros(N * N), gpu())
    return optx.root_find(bratu, rf, u0, (lam, beta), tags=tags, **kw)


def test_newton_and_chord(rng):
    ref = root(LAM, 0.0, lx.AutoLinearSolver(well_posed=True)).value
    assert float(jnp.max(jnp.abs(bratu(ref, (LAM, 0.0))))) < 1e-7

    sol = root(LAM, 0.0, lxa.AMGX(rtol=1e-12))
    steps = int(sol.stats["num_steps"])
    assert float(jnp.max(jnp.abs(sol.value - ref))) < 1e-8
    c = counts(sol.value)
    assert c["setups"] + c["resetups"] == steps and c["solves"] == steps, (c, steps)

    lxa.clear_cache()
    lxa.reset_counters()
    sol = root(LAM, 0.0, lxa.AMGX(rtol=1e-12), optx.Chord)
    k = int(sol.stats["num_steps"])
    assert k >= 5
    assert counts(sol.value) == {"setups": 1, "resetups": 0, "solves": k, "size": 1}
    assert float(jnp.max(jnp.abs(sol.value - ref))) < 1e-8


@pytest.mark.parametrize("beta", [0.0, 20.0], ids=["symmetric", "nonsymmetric"])
def test_implicit_adjoint_gradient(beta):
    tags = SPD_TAGS if beta == 0.0 else frozenset()
    w = gpu_array(np.random.default_rng(7).standard_normal(N * N))
    amgx = lxa.AMGX(rtol=1e-12)

    def functional(lam, solver):
        sol = root(lam, beta, solver, tags=tags, adjoint=optx.ImplicitAdjoint(solver))
        return jnp.vdot(w, sol.value) + jnp.sum(sol.value**2)

    g = jax.jit(jax.grad(functional), static_argnums=1)(LAM, amgx)
    jax.block_until_ready(g)
    entries = lxa.cache_info("amgx")["entries"]
    want = [False] if beta == 0.0 else [False, True]
    assert sorted(e["transposed"] for e in entries) == want, entries
    g_ref = jax.jit(jax.grad(functional), static_argnums=1)(
        LAM, lx.AutoLinearSolver(well_posed=True)
    )
    assert abs(float(g - g_ref)) < 1e-7 * abs(float(g_ref)), (g, g_ref)
    f = jax.jit(functional, static_argnums=1)
    eps = 1e-4
    fd = (f(LAM + eps, amgx) - f(LAM - eps, amgx)) / (2 * eps)
    assert abs(float(g - fd)) < 1e-6 * abs(float(fd)), (g, fd)
