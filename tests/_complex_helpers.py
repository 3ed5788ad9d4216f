"""Complex test problems (tests/test_complex.py) and complex-aware references."""

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla


def helmholtz2d(m: int, k: float, eps: float) -> sp.csr_array:
    """`-Δu - k²(1 - iε) u` on the unit square, 5-point finite differences on an
    `m x m` interior grid, Dirichlet boundaries: complex symmetric (`A = Aᵀ`), not
    Hermitian; `ε > 0` is the absorption (indefinite for `k² > 2π²` when `ε = 0`)."""
    h = 1.0 / (m + 1)
    eye = sp.eye(m)
    d2 = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(m, m)) / h**2
    lap = sp.kron(eye, d2) + sp.kron(d2, eye)
    return sp.csr_array(lap - k**2 * (1 - 1j * eps) * sp.eye(m * m))


def fem_helmholtz2d(m: int, k: float, rng, sigma: float = 0.5) -> sp.csr_array:
    """A complex symmetric finite-element matrix: linear triangles on a jittered
    `(m+1) x (m+1)`-cell mesh of the unit square, `K - k² (1 + i σ(x)) M` with an
    absorption `σ` that grows towards the boundary (a sponge layer) and varies from
    element to element; Dirichlet boundaries (the `m²` interior nodes remain)."""
    n1 = m + 2  # nodes per side
    h = 1.0 / (m + 1)
    xs, ys = np.meshgrid(np.linspace(0, 1, n1), np.linspace(0, 1, n1), indexing="ij")
    pts = np.stack([xs.ravel(), ys.ravel()], 1)
    interior = ((xs > 0) & (xs < 1) & (ys > 0) & (ys < 1)).ravel()
    pts[interior] += 0.2 * h * rng.uniform(-1, 1, (int(interior.sum()), 2))
    idx = np.arange(n1 * n1).reshape(n1, n1)
    a, b = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel()
    c, d = idx[:-1, 1:].ravel(), idx[1:, 1:].ravel()
    tri = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    p = pts[tri]  # (t, 3, 2)
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    # Gradients of the barycentric coordinates: rows of inv([e1 e2])^T.
    jac = np.stack([e1, e2], 2)  # (t, 2, 2), columns e1, e2
    ginv = np.linalg.inv(jac)  # rows: grad of lambda_1, lambda_2
    grads = np.concatenate([-ginv.sum(1, keepdims=True), ginv], 1)  # (t, 3, 2)
    ke = area[:, None, None] * np.einsum("tik,tjk->tij", grads, grads)
    me = area[:, None, None] / 12.0 * (np.ones((3, 3)) + np.eye(3))
    centre = p.mean(1)
    dist = np.minimum(centre, 1 - centre).min(1)  # distance to the boundary
    s = sigma * (1 + 4 * np.clip(0.15 - dist, 0, None) / 0.15)
    s = s * (1 + 0.2 * rng.uniform(-1, 1, s.shape))
    ae = ke - (k**2 * (1 + 1j * s))[:, None, None] * me
    rows = np.repeat(tri, 3, axis=1).ravel()
    cols = np.tile(tri, (1, 3)).ravel()
    full = sp.csr_array((ae.ravel(), (rows, cols)), shape=(n1 * n1, n1 * n1))
    keep = np.flatnonzero(interior)
    out = full[keep][:, keep]
    out.sum_duplicates()
    return sp.csr_array(out)


def magnetic_laplacian2d(m: int, rng, shift: float = 0.5) -> sp.csr_array:
    """A Hermitian positive definite matrix: the graph Laplacian of an `m x m` grid
    with a random phase `e^{iθ}` on each edge (a magnetic Laplacian), plus
    `shift` on the diagonal."""
    n = m * m
    idx = np.arange(n).reshape(m, m)
    i = np.concatenate([idx[:-1, :].ravel(), idx[:, :-1].ravel()])
    j = np.concatenate([idx[1:, :].ravel(), idx[:, 1:].ravel()])
    w = np.exp(1j * rng.uniform(-np.pi, np.pi, i.size))
    upper = sp.csr_array((w, (i, j)), shape=(n, n))
    deg = np.bincount(np.concatenate([i, j]), minlength=n).astype(float)
    return sp.csr_array(sp.diags(deg + shift) - upper - upper.conj().T)


def nonsymmetric_complex(m: int, rng) -> sp.csr_array:
    """A complex matrix that is neither symmetric nor Hermitian: upwind
    convection-diffusion with a random complex shift on the diagonal."""
    h = 1.0 / (m + 1)
    eye = sp.eye(m)
    d2 = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(m, m)) / h**2
    d1 = sp.diags([-1.0, 1.0], [-1, 0], shape=(m, m)) / h
    a = sp.kron(eye, d2) + sp.kron(d2, eye) + 30.0 * sp.kron(eye, d1)
    shift = (1 + 1j * rng.uniform(0.5, 1.5, m * m)) * 50.0
    return sp.csr_array((a + sp.diags(shift)) * h**2)


def complex_vector(rng, n: int) -> np.ndarray:
    return rng.standard_normal(n) + 1j * rng.standard_normal(n)


def reference(a, b) -> np.ndarray:
    """`spsolve` in complex128 (the reference of the acceptance tests)."""
    return spla.spsolve(sp.csc_array(a, dtype=np.complex128), np.asarray(b, complex))


def rel_err(x, ref) -> float:
    x = np.asarray(x, np.complex128)
    ref = np.asarray(ref, np.complex128)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def rel_residual(a, x, b) -> float:
    x = np.asarray(x, np.complex128)
    b = np.asarray(b, np.complex128)
    return float(np.linalg.norm(b - a @ x) / np.linalg.norm(b))
