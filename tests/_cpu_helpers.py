"""Problems and references for the CPU (pyamg) backend tests."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def poisson2d(n: int) -> sp.csr_array:
    import pyamg

    return sp.csr_array(pyamg.gallery.poisson((n, n), format="csr"))


def poisson3d(n: int) -> sp.csr_array:
    import pyamg

    return sp.csr_array(pyamg.gallery.poisson((n, n, n), format="csr"))


def anisotropic2d(n: int) -> sp.csr_array:
    import pyamg

    stencil = pyamg.gallery.diffusion_stencil_2d(
        epsilon=1e-3, theta=np.pi / 8, type="FD"
    )
    return sp.csr_array(pyamg.gallery.stencil_grid(stencil, (n, n), format="csr"))


def elasticity2d(n: int, *, block: bool = False):
    """pyamg's 2-D linear elasticity (2 unknowns per node): scalar CSR, or the
    2 x 2 BSR matrix with `block=True`."""
    import pyamg

    a, _ = pyamg.gallery.linear_elasticity((n, n), format="bsr")
    a = sp.bsr_array(a)
    return a if block else sp.csr_array(a.tocsr())


def convection_diffusion2d(n: int, peclet: float = 100.0) -> sp.csr_array:
    """5-point diffusion plus first-order upwind convection with velocity
    `peclet * (1, 0.5)` on the unit square (cell Peclet number ~ peclet * h):
    non-symmetric, an M-matrix."""
    h = 1.0 / (n + 1)
    eye = sp.eye_array(n)
    d2 = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n))
    d1 = sp.diags_array([-1.0, 1.0], offsets=[-1, 0], shape=(n, n))
    lap = (sp.kron(eye, d2) + sp.kron(d2, eye)) / h**2
    conv = peclet * (sp.kron(eye, d1) + 0.5 * sp.kron(d1, eye)) / h
    return sp.csr_array((lap + conv) * h**2)


def reference(a, b) -> np.ndarray:
    """Float64 direct solve."""
    a64 = sp.csc_array(a, dtype=np.float64)
    return spla.spsolve(a64, np.asarray(b, dtype=np.float64))


def rel_err(x, ref) -> float:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def true_residual(a, x, b) -> float:
    x = np.asarray(x, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(b - sp.csr_array(a, dtype=np.float64) @ x))


def dense_solve_fn(pattern):
    """`(values, b) -> x` by a dense float64 solve: the reference for gradients."""

    def fn(values, b):
        m = jnp.zeros(pattern.shape, values.dtype)
        m = m.at[pattern.row_ids, pattern.indices].add(values)
        return jnp.linalg.solve(m, b)

    return fn


def cpu_device():
    return jax.devices("cpu")[0]
