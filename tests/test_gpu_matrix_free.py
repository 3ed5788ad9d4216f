"""Matrix-free operators through AmgX on the GPU (run on the device)."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import lineax_amgx as lxa

pytestmark = pytest.mark.gpu


def laplacian_residual(n):
    h2 = 1.0 / (n + 1) ** 2

    def residual(u, args):
        u = u.reshape(n, n)
        p = jnp.pad(u, 1)
        lap = (4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) / h2
        return (lap + args * u**3).reshape(-1)

    return residual


def test_jacobian_operator_no_pattern_given(rng):
    n = 200
    residual = laplacian_residual(n)
    dev = jax.devices("cuda")[0]
    u = jax.device_put(jnp.asarray(rng.standard_normal(n * n)), dev)
    b = jax.device_put(jnp.asarray(rng.standard_normal(n * n)), dev)
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
    assert lxa.cache_info("amgx")["setups"] == 1
    # The assembled matrix equals jacfwd on a small problem.
    small = laplacian_residual(12)
    us = jnp.asarray(rng.standard_normal(144))
    csr = lxa.as_csr_operator(lx.JacobianLinearOperator(small, us, 1.0))
    dense = jax.jacfwd(lambda v: small(v, 1.0))(us)
    np.testing.assert_allclose(np.asarray(csr.as_matrix()), np.asarray(dense),
                               rtol=1e-12, atol=1e-9)
