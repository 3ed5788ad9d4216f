# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""Sparsity detection through every higher-order primitive form, on whatever JAX
is installed: each test asserts that the form really appears in the jaxpr, that
the pattern was traced (not probed), and compares it with the nonzeros of the
dense Jacobian (`jax.jacfwd`)."""

import types

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import jacobian_nonzeros  # noqa: E402
from jax.extend.core import primitives as jex_primitives  # noqa: E402

from lineax_amgx.matrix_free._sparsity import _interpret, detect_sparsity  # noqa: E402

N = 8
# A constant with exact zeros: the pattern depends on the interpreter reading
# the constants that each form closes over.
_C = jnp.array([1.3, 0.0, 2.1, -0.7, 0.0, 1.9, 0.4, 0.0])


def _primitives(jaxpr, found=None):
    """Names of every primitive in `jaxpr` and its sub-jaxprs."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if hasattr(sub, "eqns"):
                    _primitives(sub, found)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    _primitives(sub.jaxpr, found)
    return found


def _dense(p):
    return p.to_scipy(np.ones(p.nnz)).toarray() != 0


def _detect(fn, x, forms):
    names = _primitives(jax.make_jaxpr(fn)(x).jaxpr)
    assert names & set(forms), (forms, sorted(names))
    p = detect_sparsity(fn, x, memo=False)
    assert p.method == "traced"
    return _dense(p)


# -- call-like forms -------------------------------------------------------------


def _custom_jvp():
    @jax.custom_jvp
    def f(z):
        return jnp.sin(z) * _C

    f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * _C * t[0]))
    return f


def _vjp_primal(z):
    return z * _C + z[::-1]


def _custom_vjp():
    @jax.custom_vjp
    def f(z):
        return _vjp_primal(z)

    f.defvjp(lambda z: (f(z), None), lambda _, ct: (ct * _C + ct[::-1],))
    return f


def _closed_call(u):
    closed = jax.make_jaxpr(lambda z: z * _C + jnp.roll(z, 1))(u)
    prim = jex_primitives.closed_call_p
    # The bind signature differs between releases; `get_bind_params` adapts.
    bp = prim.get_bind_params({"call_jaxpr": closed})
    subfuns, params = bp if isinstance(bp, tuple) else ((), bp)
    return prim.bind(*subfuns, u, **params)[0]


CALLS = {
    "jit": (lambda u: jax.jit(lambda z: z * _C + z[::-1])(u), ("jit", "pjit")),
    "jit-nested": (
        lambda u: jax.jit(lambda z: jax.jit(lambda w: w[1:] * _C[1:])(z).sum()
                          * z)(u),
        ("jit", "pjit"),
    ),
    "closed_call": (_closed_call, ("closed_call", "eval_jaxpr", "core_call")),
    "remat": (
        lambda u: jax.checkpoint(lambda z: jnp.cos(z) * _C + z[2:].sum())(u),
        ("remat", "remat2", "checkpoint"),
    ),
    "custom_jvp": (lambda u: _custom_jvp()(u) + jax.nn.relu(u[::-1]),
                   ("custom_jvp_call",)),
    # (jacfwd cannot differentiate a custom_vjp: the reference is its primal)
    "custom_vjp": (lambda u: _custom_vjp()(u), ("custom_vjp_call",
                                                "custom_vjp_call_jaxpr"),
                   _vjp_primal),
    "optimization_barrier": (
        lambda u: jax.lax.optimization_barrier((u * _C, u[0]))[0] + u[::-1],
        ("optimization_barrier",),
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_call_forms_exact(name):
    fn, forms, *ref = CALLS[name]
    x = jnp.linspace(0.3, 1.7, N)
    want = jacobian_nonzeros(ref[0] if ref else fn, x)
    np.testing.assert_array_equal(_detect(fn, x, forms), want)


# -- cond / switch -----------------------------------------------------------------

BRANCHES = [
    lambda z: z * _C,
    lambda z: jnp.roll(z, 1) + z[0],
    lambda z: z[::-1] * 2.0,
]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_switch_known_index_takes_one_branch(index):
    def fn(u):
        return jax.lax.switch(index, BRANCHES, u)

    x = jnp.linspace(0.3, 1.7, N)
    got = _detect(fn, x, ("cond",))
    np.testing.assert_array_equal(got, jacobian_nonzeros(BRANCHES[index], x))
    np.testing.assert_array_equal(got, jacobian_nonzeros(fn, x))


@pytest.mark.parametrize("n_branches", [2, 3])
def test_cond_data_dependent_unites_branches(n_branches):
    branches = BRANCHES[:n_branches]

    def fn(u):
        i = (u[3] > 1.0).astype(jnp.int32) + (u[4] > 1.0).astype(jnp.int32)
        return jax.lax.switch(jnp.minimum(i, n_branches - 1), branches, u)

    x = jnp.linspace(0.3, 1.7, N)
    want = np.zeros((N, N), bool)
    for br in branches:
        want |= jacobian_nonzeros(br, x)
    np.testing.assert_array_equal(_detect(fn, x, ("cond",)), want)


def test_cond_with_pred_and_closed_over_constants():
    def fn(u):
        return jax.lax.cond(True, lambda z: z * _C, lambda z: z[::-1], u)

    x = jnp.linspace(0.3, 1.7, N)
    np.testing.assert_array_equal(_detect(fn, x, ("cond",)), jacobian_nonzeros(fn, x))


# -- while -------------------------------------------------------------------------


def test_while_known_trip_count_is_unrolled_exactly():
    def fn(u):
        def body(c):
            i, v = c
            return i + 1, v.at[i + 1].add(jnp.sin(v[i]) * _C[i])

        return jax.lax.while_loop(lambda c: c[0] < N - 1, body, (0, u))[1]

    x = jnp.linspace(0.3, 1.7, N)
    np.testing.assert_array_equal(_detect(fn, x, ("while",)), jacobian_nonzeros(fn, x))


def test_while_with_cond_and_body_constants():
    lim = jnp.array(3)

    def fn(u):
        def body(c):
            i, v = c
            return i + 1, v * _C + jnp.roll(v, 1)

        return jax.lax.while_loop(lambda c: c[0] < lim, body, (0, u))[1]

    x = jnp.linspace(0.3, 1.7, N)
    np.testing.assert_array_equal(_detect(fn, x, ("while",)), jacobian_nonzeros(fn, x))


def test_while_data_dependent_trip_count_is_the_closure():
    step = lambda v: v + 0.5 * jnp.roll(v, 1) * _C  # noqa: E731

    def fn(u):
        return jax.lax.while_loop(lambda v: v.sum() < 1e3, step, u)

    def power(k):
        def f(u):
            for _ in range(k):
                u = step(u)
            return u

        return f

    x = jnp.linspace(0.3, 1.7, N)
    # The trip count depends on the data: the pattern of any number of steps.
    want = np.zeros((N, N), bool)
    for k in range(N + 1):
        want |= jacobian_nonzeros(power(k), x)
    np.testing.assert_array_equal(_detect(fn, x, ("while",)), want)


# -- scan / fori_loop / map --------------------------------------------------------


def _scan_all_parts(reverse):
    def fn(u):
        w = u[:3] * 2.0

        def body(c, xs):
            x, k = xs  # x: (2,), k: ()
            # u[7]: a traced constant of the body; _C[1] == 0 drops c[1].
            c = c * _C[:2] + x * k + u[7]
            return c, (c[::-1] * 0.5, x)  # the second y forwards an x

        c, (ys, xs) = jax.lax.scan(body, u[:2], (u[2:].reshape(3, 2), w),
                                   reverse=reverse)
        return jnp.concatenate([ys.ravel(), xs.ravel(), c])

    return fn


SCANS = {
    "carry-xs-ys-consts": _scan_all_parts(False),
    "reverse": _scan_all_parts(True),
    "carry-only": lambda u: jax.lax.scan(
        lambda v, _: (v * _C + jnp.roll(v, 1), None), u, None, length=3)[0],
    "xs-only (lax.map)": lambda u: jax.lax.map(lambda z: jnp.sin(z) * 2.0,
                                               u.reshape(2, -1)).ravel(),
    "fori_loop": lambda u: jax.lax.fori_loop(
        0, N - 1, lambda i, y: y.at[i + 1].add(0.9 * jnp.sin(y[i])), u),
    "nested": lambda u: jax.lax.scan(
        lambda c, x: (jax.lax.fori_loop(0, 2, lambda i, v: v + jnp.roll(v, 1), c)
                      * x, None),
        u[:4], u[4:].reshape(2, 2).repeat(2, axis=1))[0],
}


@pytest.mark.parametrize("name", sorted(SCANS))
def test_scan_forms_exact(name):
    fn = SCANS[name]
    x = jnp.linspace(0.3, 1.7, N)
    got = _detect(fn, x, ("scan", "while"))
    np.testing.assert_array_equal(got, jacobian_nonzeros(fn, x))


def test_scan_over_budget_is_a_superset(monkeypatch):
    """Past the unrolling budget the scan rule takes the fixed point over the
    carry (every iteration sees every xs slice): a superset, and the closure of
    the step for a carry-only scan."""
    monkeypatch.setattr(_interpret, "_UNROLL_BUDGET", 1)
    step = lambda v: v * _C + 0.5 * jnp.roll(v, 1)  # noqa: E731

    def fn(u):
        return jax.lax.scan(lambda v, _: (step(v), None), u, None, length=3)[0]

    x = jnp.linspace(0.3, 1.7, N)
    got = _detect(fn, x, ("scan",))
    assert np.all(got >= jacobian_nonzeros(fn, x))
    want = np.zeros((N, N), bool)
    v = np.eye(N, dtype=bool)
    for _ in range(N + 1):
        want |= v
        v = (jacobian_nonzeros(step, x).astype(int) @ v.astype(int)) != 0
    np.testing.assert_array_equal(got, want)

    g = _scan_all_parts(False)
    assert np.all(_detect(g, x, ("scan",)) >= jacobian_nonzeros(g, x))


# -- the accessors never raise KeyError -------------------------------------------


def _fake_eqn(name, params, n_in=1, n_out=1):
    return types.SimpleNamespace(
        primitive=types.SimpleNamespace(name=name), params=params,
        invars=[None] * n_in, outvars=[None] * n_out,
    )


@pytest.mark.parametrize(
    "read,name",
    [
        (_interpret._scan_counts, "scan"),
        (_interpret._while_parts, "while"),
        (_interpret._cond_branches, "cond"),
        (_interpret._call_jaxpr, "jit"),
    ],
)
def test_unknown_param_forms_are_unsupported(read, name):
    """A param spelling the interpreter does not know is `Unsupported` (detection
    then probes), naming what it found, not a KeyError."""
    with pytest.raises(_interpret.Unsupported, match="renamed_param"):
        read(_fake_eqn(name, {"renamed_param": 1}))


def test_unknown_form_falls_back_to_probing(monkeypatch):
    def fn(u):
        return jax.lax.scan(lambda c, x: (c + x, c * x), 0.0, u * _C)[1]

    def unknown(eqn):
        raise _interpret.Unsupported("a scan form from the future")

    monkeypatch.setattr(_interpret, "_scan_counts", unknown)
    x = jnp.linspace(0.3, 1.7, N)
    p = detect_sparsity(fn, x, memo=False)
    assert p.method == "probed"
    np.testing.assert_array_equal(_dense(p), jacobian_nonzeros(fn, x))
