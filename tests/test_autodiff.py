"""Differentiating and batching through `AMGX`, on the CPU (pyamg) and on the GPU
(AmgX: `pytest -m gpu tests/test_autodiff.py` on the device).

Every derivative is compared with the same derivative of a float64 dense
`jnp.linalg.solve` of the same matrix; one gradient also with finite differences.
Setup costs are read from the backend's cache (`lxa.cache_info("pyamg")` or
`"amgx"`: one entry per key on the GPU, four on the CPU). The problems have
200-300 unknowns on the CPU and ~900 on the GPU. (Optimistix on both backends:
`test_optimistix.py`.)
"""

import functools as ft

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
from _backend import cases, only
from helpers import convection_diffusion2d, poisson2d, random_nonsymmetric, rel_err

import lineax_amgx as lxa

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
RTOL = 1e-12  # solver tolerance: the comparisons below are at 1e-7


pytestmark = pytest.mark.usefixtures("on_cpu")


def counts(*outputs):
    """The cache counters, once `outputs` are computed (dispatch is asynchronous:
    the host callbacks that count may still be running)."""
    jax.block_until_ready(outputs)
    info = lxa.cache_info("pyamg")
    return {k: info[k] for k in ("setups", "resetups", "solves", "size")}


def random_spd(n: int, rng) -> sp.csr_array:
    """A random sparse symmetric, strictly diagonally dominant matrix."""
    r = sp.random(n, n, density=4.0 / n, random_state=rng, format="csr")
    s = r + r.T
    s = s - sp.diags_array(s.diagonal())
    rowsum = np.asarray(abs(s).sum(axis=1)).ravel()
    return sp.csr_array(s + sp.diags_array(rowsum + 1.0 + rng.random(n)))


# name -> (matrix factory (rng, size), tags, size per backend).
PROBLEMS = {
    "poisson_tagged": (lambda rng, n: poisson2d(n), SPD, dict(cpu=15, gpu=30)),
    "random_sym_untagged": (lambda rng, n: random_spd(n, rng), (),
                            dict(cpu=250, gpu=900)),
    "convdiff_nonsym": (lambda rng, n: convection_diffusion2d(n, peclet=30.0), (),
                        dict(cpu=15, gpu=30)),
    "random_nonsym": (lambda rng, n: random_nonsymmetric(n, rng), (), dict(cpu=300)),
}


def make(name, rng, backend=None):
    """`(scipy matrix, operator)`: on `backend`'s device, or (None) the default."""
    factory, tags, sizes = PROBLEMS[name]
    a = factory(rng, sizes["cpu" if backend is None else backend.name])
    if backend is None:
        return a, lxa.CSROperator.from_scipy(a, tags=tags)
    return a, backend.op(a, tags)


def dense(pattern, values):
    m = jnp.zeros(pattern.shape, values.dtype)
    return m.at[pattern.row_ids, pattern.indices].add(values)


def loss_fns(op, c, solver):
    """`(values, b) -> c.x + |x|^2/2` for `A(values) x = b`: through AMGX, and
    through a dense float64 solve (the reference)."""
    p, tags = op.pattern, op.tags

    def amgx(values, b):
        x = lx.linear_solve(lxa.CSROperator(p, values, tags), b, solver=solver).value
        return jnp.vdot(c, x) + 0.5 * jnp.sum(x**2)

    def ref(values, b):
        x = jnp.linalg.solve(dense(p, values), b)
        return jnp.vdot(c, x) + 0.5 * jnp.sum(x**2)

    return amgx, ref


def value_direction(op, rng, put=jnp.asarray):
    """A random tangent for the values. For a symmetric-tagged operator it is
    symmetric: the tag promises symmetry for every perturbation, so derivatives
    that involve the transpose (second order) are only meaningful along
    symmetric directions."""
    t = put(rng.standard_normal(op.pattern.value_shape))
    if lx.symmetric_tag in op.tags:
        _, perm = op.pattern.transpose()
        t = 0.5 * (t + t[perm])
    return t


def _jit(flag):
    return jax.jit if flag else (lambda f: f)


def assert_close(x, ref, tol=1e-7):
    err = rel_err(x, ref)
    assert err < tol, err


# ---------------------------------------------------------------------------
# grad, jvp, jvp-of-grad against the dense reference.
# ---------------------------------------------------------------------------


def derivatives(op, c, solver, second_order):
    """`(values, b, tv, tb) ->` the loss, its gradient w.r.t. `(values, b)`, the
    JVP of the solution, and (`second_order`) the JVP of the gradient, a
    Hessian-vector product, and the JVP of the loss; through AMGX and through the
    dense reference."""
    p, tags = op.pattern, op.tags
    f, f_ref = loss_fns(op, c, solver)

    def make_all(f, solve):
        def all_(values, b, tv, tb):
            val, grads = jax.value_and_grad(f, argnums=(0, 1))(values, b)
            _, tx = jax.jvp(solve, (values, b), (tv, tb))
            if not second_order:
                return val, grads, tx
            _, hvp = jax.jvp(jax.grad(f, argnums=(0, 1)), (values, b), (tv, tb))
            _, t = jax.jvp(f, (values, b), (tv, tb))
            return val, grads, tx, hvp, t

        return all_

    def solve(values, b):
        return lx.linear_solve(lxa.CSROperator(p, values, tags), b, solver=solver).value

    def solve_ref(values, b):
        return jnp.linalg.solve(dense(p, values), b)

    return make_all(f, solve), jax.jit(make_all(f_ref, solve_ref))


def check_derivatives(op, rng, jit, put=jnp.asarray):
    """Compares `derivatives` with the reference; returns `(b, c, reference
    gradient)`."""
    n = op.pattern.shape[0]
    b = put(rng.standard_normal(n))
    c = put(rng.standard_normal(n))
    tv = value_direction(op, rng, put)
    tb = put(rng.standard_normal(n))
    # Eager mode runs every operation on its own (slow): first order only there.
    fn, ref = derivatives(op, c, lxa.AMGX(rtol=RTOL), second_order=jit)
    out = _jit(jit)(fn)(op.values, b, tv, tb)
    out_ref = ref(op.values, b, tv, tb)
    val, (g_vals, g_b), tx = out[:3]
    r_val, (r_vals, r_b), r_tx = out_ref[:3]
    assert abs(float(val) - float(r_val)) < 1e-9 * abs(float(r_val))
    assert_close(g_b, r_b)  # grad w.r.t. b
    assert_close(g_vals, r_vals)  # grad w.r.t. the values
    assert_close(tx, r_tx)  # jvp of the solution w.r.t. (values, b)
    if jit:
        (h_vals, h_b), (rh_vals, rh_b) = out[3], out_ref[3]
        assert_close(h_b, rh_b)  # jvp of grad (second order)
        assert_close(h_vals, rh_vals)
        assert_close(out[4], out_ref[4])  # jvp of the loss
    return b, c, (r_vals, r_b)


@pytest.mark.parametrize(
    "name", ["poisson_tagged", "random_sym_untagged", "convdiff_nonsym"]
)
def test_derivatives_jit(name, rng, backend):
    """Under jit: the loss, its gradient, the JVP of the solution, the JVP of the
    gradient and of the loss; then the gradient again, eagerly."""
    _, op = make(name, rng, backend)
    b, c, (r_vals, r_b) = check_derivatives(op, rng, jit=True, put=backend.put)
    f, _ = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    g_vals, g_b = jax.grad(f, argnums=(0, 1))(op.values, b)
    assert_close(g_vals, r_vals)
    assert_close(g_b, r_b)


@pytest.mark.parametrize(
    "name", ["poisson_tagged", "random_sym_untagged", "random_nonsym"]
)
def test_derivatives_eager(name, rng):
    _, op = make(name, rng)
    check_derivatives(op, rng, jit=False)


def test_grad_matches_finite_differences(rng):
    """The gradient w.r.t. the values of a non-symmetric operator, against central
    differences of the AMGX solve itself (no dense solve involved)."""
    _, op = make("convdiff_nonsym", rng)
    n = op.pattern.shape[0]
    b = jnp.asarray(rng.standard_normal(n))
    c = jnp.asarray(rng.standard_normal(n))
    f, _ = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    g = jax.jit(jax.grad(f))(op.values, b)
    f = jax.jit(f)
    d = jnp.asarray(rng.standard_normal(op.pattern.nnz))
    d = d / jnp.linalg.norm(d) * jnp.linalg.norm(op.values)
    eps = 1e-5
    fd = (f(op.values + eps * d, b) - f(op.values - eps * d, b)) / (2 * eps)
    directional = jnp.vdot(g, d)
    assert abs(float(directional - fd)) < 1e-6 * abs(float(fd)), (directional, fd)


def test_block_operator_grad(rng):
    """Block (2 x 2 BSR) values: the transpose also transposes each block."""
    import pyamg

    a, _ = pyamg.gallery.linear_elasticity((10, 10), format="bsr")
    a = sp.bsr_array(a)
    # Non-symmetric blocks: perturb every block with a random (block) matrix.
    op = lxa.CSROperator.from_scipy(a)
    vals = op.values * (1.0 + 0.1 * jnp.asarray(rng.random(op.values.shape)))
    op = op.with_values(vals)
    n = op.pattern.shape[0]
    b = jnp.asarray(rng.standard_normal(n))
    solver = lxa.AMGX("FGMRES_AGGREGATION_BLOCK", rtol=RTOL)
    p = op.pattern

    def dense_block(values):
        m = jnp.zeros((p.block_rows, p.block_cols, 2, 2), values.dtype)
        m = m.at[p.row_ids, p.indices].add(values)
        return m.transpose(0, 2, 1, 3).reshape(p.shape)

    def f(values):
        x = lx.linear_solve(lxa.CSROperator(p, values), b, solver=solver).value
        return jnp.sum(jnp.sin(x))

    def f_ref(values):
        return jnp.sum(jnp.sin(jnp.linalg.solve(dense_block(values), b)))

    assert_close(jax.grad(f)(vals), jax.grad(f_ref)(vals), 1e-6)


# ---------------------------------------------------------------------------
# Setup costs of the derivatives.
# ---------------------------------------------------------------------------


@cases("mode", cpu=["eager", "jit"], gpu=["jit"])
def test_symmetric_gradient_one_setup_two_solves(mode, rng, backend):
    """A symmetric-tagged operator: the adjoint solve reuses the forward setup
    (no transposed matrix, no second entry); so does second order."""
    _, op = make("poisson_tagged", rng, backend)
    n = op.pattern.shape[0]
    b = backend.put(rng.standard_normal(n))
    c = backend.put(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    jit = mode == "jit"
    g = _jit(jit)(jax.grad(f, argnums=(0, 1)))(op.values, b)
    assert backend.counts(g) == {"setups": 1, "resetups": 0, "solves": 2, "size": 1}
    (entry,) = lxa.cache_info(backend.cache)["entries"]
    assert not entry["transposed"]
    r = jax.grad(f_ref, argnums=(0, 1))(op.values, b)
    assert_close(g[0], r[0])
    assert_close(g[1], r[1])
    # jvp of grad: forward, its tangent, the adjoint and its tangent (4 solves),
    # on the resident setup (same values: found by comparison, no setup).
    lxa.reset_counters()
    tv = value_direction(op, rng, backend.put)
    out = _jit(jit)(lambda v, b: jax.jvp(jax.grad(f), (v, b), (tv, b)))(op.values, b)
    assert backend.counts(out) == {"setups": 0, "resetups": 0, "solves": 4, "size": 1}


def test_nonsymmetric_gradient_transposed_pattern_once(rng, monkeypatch):
    """Untagged operators: the adjoint solve uses a second cache entry (the
    transposed matrix, set up once), and the transposed pattern is computed once,
    on the host, and then reused for new values and new traces."""
    from lineax_amgx._pattern import SparsityPattern

    built = []
    original = SparsityPattern.__dict__["_transpose"].func

    def counting(self):
        built.append(self.fingerprint)
        return original(self)

    prop = ft.cached_property(counting)
    prop.__set_name__(SparsityPattern, "_transpose")
    monkeypatch.setattr(SparsityPattern, "_transpose", prop)

    # A size no other test uses: no trace cached by an earlier test applies.
    op = lxa.CSROperator.from_scipy(convection_diffusion2d(13, peclet=20.0))
    p = op.pattern
    n = p.shape[0]
    b = jnp.asarray(rng.standard_normal(n))
    c = jnp.asarray(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    grad = jax.jit(jax.grad(f))
    g = grad(op.values, b)
    assert counts(g) == {"setups": 2, "resetups": 0, "solves": 2, "size": 2}
    assert_close(g, jax.grad(f_ref)(op.values, b))
    entries = lxa.cache_info("pyamg")["entries"]
    assert sorted(e["transposed"] for e in entries) == [False, True]
    assert built == [p.fingerprint]
    (fp_t,) = [e["fingerprint"] for e in entries if e["transposed"]]
    assert fp_t == p.transpose()[0].fingerprint

    # New values, same pattern: each entry resets up once; nothing is recomputed.
    g = grad(op.values * 1.5, b)
    assert counts(g) == {"setups": 2, "resetups": 2, "solves": 4, "size": 2}
    assert_close(g, jax.grad(f_ref)(op.values * 1.5, b))
    jax.block_until_ready(jax.jit(jax.grad(f, argnums=1))(op.values, b))  # new trace
    assert built == [p.fingerprint]


@only("gpu")
def test_nonsymmetric_gradient_transposed_entry(rng, backend):
    """As above on AmgX (the pattern counting aside): a second entry for the
    transposed matrix, set up once; new values reset up each entry once."""
    _, op = make("convdiff_nonsym", rng, backend)
    n = op.pattern.shape[0]
    b = backend.put(rng.standard_normal(n))
    c = backend.put(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    grad = jax.jit(jax.grad(f))
    g = grad(op.values, b)
    assert backend.counts(g) == {"setups": 2, "resetups": 0, "solves": 2, "size": 2}
    entries = lxa.cache_info(backend.cache)["entries"]
    assert sorted(e["transposed"] for e in entries) == [False, True]
    assert_close(g, jax.grad(f_ref)(op.values, b), 1e-6)
    g = grad(op.values * 1.5, b)  # new values: one resetup per entry
    assert backend.counts(g) == {"setups": 2, "resetups": 2, "solves": 4, "size": 2}
    assert_close(g, jax.grad(f_ref)(op.values * 1.5, b), 1e-6)


# ---------------------------------------------------------------------------
# vmap.
# ---------------------------------------------------------------------------


@cases("name", cpu=["poisson_tagged", "convdiff_nonsym"], gpu=["poisson_tagged"])
def test_vmap_over_b_one_setup(name, rng, backend):
    _, op = make(name, rng, backend)
    n = op.pattern.shape[0]
    bs = backend.put(rng.standard_normal((8, n)))
    solver = lxa.AMGX(rtol=RTOL)
    xs = jax.jit(jax.vmap(lambda b: lx.linear_solve(op, b, solver=solver).value))(bs)
    assert backend.counts(xs) == {"setups": 1, "resetups": 0, "solves": 8, "size": 1}
    ref = jnp.linalg.solve(dense(op.pattern, op.values), bs.T).T
    for i in range(8):
        assert_close(xs[i], ref[i])


@pytest.mark.parametrize("entries_per_key", [1, 4])
def test_vmap_over_values_and_b(entries_per_key, rng, backend):
    """A setup per batch member; the member's solve finds it by its token. The
    batched setups all run before the batched solves (`vmap_method="sequential"`
    loops each call), so with one resident setup per key (the AmgX default) each
    member may be set up again by its solve (its token is stale): up to 2B
    (re)setups; with `entries_per_key >= B` (the CPU default is 4), exactly B.
    AmgX counts each of them a setup (an entry each); the CPU cache keeps the
    value sets of a key in one entry, so the first is a setup and the others
    resetups. (vmap over the values alone: `test_grad_of_vmap_over_values`.)"""
    lxa.set_cache_size(8, entries_per_key=entries_per_key)
    _, op = make("convdiff_nonsym", rng, backend)
    p = op.pattern
    batch = 4
    vals = op.values * (1.0 + 0.2 * backend.put(rng.random((batch, p.nnz))))
    bs = backend.put(rng.standard_normal((batch, p.shape[0])))
    solver = lxa.AMGX(rtol=RTOL)

    def solve(v, b):
        return lx.linear_solve(lxa.CSROperator(p, v), b, solver=solver).value

    xs = jax.jit(jax.vmap(solve))(vals, bs)
    c = backend.counts(xs)
    print(f"entries_per_key={entries_per_key}: {c}")
    assert c["solves"] == batch, c
    if entries_per_key >= batch:
        expected = backend.pick(cpu=(1, batch - 1), gpu=(batch, 0))
        assert (c["setups"], c["resetups"]) == expected, c
    else:
        assert batch <= c["setups"] + c["resetups"] <= 2 * batch, c
    for i in range(batch):
        assert_close(xs[i], jnp.linalg.solve(dense(p, vals[i]), bs[i]))


def test_vmap_of_grad_over_b_one_setup(rng, backend):
    """Batched gradients (per-sample losses): one setup, two solves per sample."""
    _, op = make("poisson_tagged", rng, backend)
    n = op.pattern.shape[0]
    bs = backend.put(rng.standard_normal((8, n)))
    c = backend.put(rng.standard_normal(n))
    f, f_ref = loss_fns(op, c, lxa.AMGX(rtol=RTOL))
    g = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(None, 0)))(op.values, bs)
    assert backend.counts(g) == {"setups": 1, "resetups": 0, "solves": 16, "size": 1}
    r = jax.vmap(jax.grad(f_ref, argnums=(0, 1)), in_axes=(None, 0))(op.values, bs)
    assert_close(g[0], r[0])
    assert_close(g[1], r[1])


def test_grad_of_vmap_over_values(rng):
    """Reverse mode through a batch of operators: one setup per member, reused by
    the member's adjoint solve."""
    _, op = make("poisson_tagged", rng)
    p = op.pattern
    batch = 3
    vals = op.values * (1.0 + jnp.asarray(rng.random((batch, 1))))
    b = jnp.asarray(rng.standard_normal(p.shape[0]))
    solver = lxa.AMGX(rtol=RTOL)

    def f(vals, solve):
        return jnp.sum(jnp.cos(jax.vmap(solve)(vals)))

    def solve(v):
        return lx.linear_solve(lxa.CSROperator(p, v, SPD), b, solver=solver).value

    def solve_ref(v):
        return jnp.linalg.solve(dense(p, v), b)

    g = jax.jit(jax.grad(f), static_argnums=1)(vals, solve)
    c = counts(g)
    assert c["setups"] + c["resetups"] == batch and c["solves"] == 2 * batch, c
    assert_close(g, jax.grad(f)(vals, solve_ref))


# ---------------------------------------------------------------------------
# Warm starts.
# ---------------------------------------------------------------------------


def test_warm_start_same_answer_and_gradient(rng, backend):
    """`options["y0"]` saves iterations; the stopping test does not depend on the
    guess, so the answer and its gradient are unchanged. (Options are not
    differentiable: a guess computed from differentiated inputs must be wrapped
    in `jax.lax.stop_gradient`.)"""
    a, op = make("convdiff_nonsym", rng, backend)
    p = op.pattern
    n = p.shape[0]
    b = backend.put(rng.standard_normal(n))
    c = backend.put(rng.standard_normal(n))
    solver = lxa.AMGX(rtol=1e-10)
    x_ref = jnp.linalg.solve(dense(p, op.values), b)
    # A guess close to the answer (as from a previous Newton or time step).
    y0 = x_ref + 1e-7 * jnp.linalg.norm(x_ref) * backend.put(rng.standard_normal(n))
    zeros = jnp.zeros_like(b)  # the cold start, as a guess

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

    x_cold, steps_cold = solve(op.values, b, zeros)
    x_warm, steps_warm = solve(op.values, b, y0)
    # On the GPU's problem AmgX's FGMRES may need a single iteration cold (it did
    # on an H200): then the warm start cannot do better. (The iteration saving on
    # a larger GPU problem: test_solve.py.) pyamg's cold solve takes several.
    assert 0 < int(steps_warm) <= int(steps_cold)
    if int(steps_cold) > 1:
        assert int(steps_warm) < int(steps_cold)
    assert_close(x_cold, x_ref, 1e-8)
    assert_close(x_warm, x_ref, 1e-8)
    resid = np.asarray(b) - a @ np.asarray(x_warm)
    assert np.linalg.norm(resid) <= 1.01e-10 * float(jnp.linalg.norm(b))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    r = jax.grad(loss_ref, argnums=(0, 1))(op.values, b)
    for guess in (zeros, y0):
        for g, gr in zip(grad(op.values, b, guess), r):
            assert_close(g, gr, 1e-6)
