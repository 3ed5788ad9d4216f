# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Hard sparse problems for the benchmark suite (not part of the package).

Every generator takes a target number of unknowns and returns a `Problem`: a
scipy CSR (or BSR) matrix, a right-hand side (all ones, so that the relative
2-norm residual is what every method's criterion measures), a tag (`"spd"` or
`"nonsym"`) and a description. The structured-grid problems also carry their
stencil (offsets and coefficient arrays), from which `stencil_apply` builds a
matrix-free JAX apply by slicing. Assembly is vectorised NumPy: a 1M-unknown
stencil problem builds in about a second, 8M in a few. Only `fem2d` is slow
(`scipy.spatial.Delaunay` takes ~30 s at 1M points); the suite generates
problems ahead, in parallel, and caches them on disk.

    from problems import PROBLEMS, make
    p = make("aniso2d", 10**5)      # p.A, p.b, p.tag, p.description, p.stencil

Problems (Dirichlet boundaries everywhere; "FD" = finite differences):

- `poisson3d`: 7-point Laplacian on an n^3 grid (the baseline).
- `contrast3d-layers`: finite-volume 7-point diffusion, 20 random layers
  (along z) with log10 k uniform in [0, 6]; harmonic-mean face coefficients.
- `contrast3d-checker`: as above, a 3D checkerboard of 8^3 blocks, k in {1, 1e4}.
- `aniso2d`: rotated anisotropic diffusion, eps = 1e-3, theta = pi/8, 9-point FD
  stencil (mixed derivative by central differences; SPD, not an M-matrix).
- `aniso3d`: axis-aligned anisotropy diag(1, eps, eps), eps = 1e-3, 7-point.
  (3D is axis-aligned, not rotated.)
- `elasticity3d`: FD Navier-Cauchy operator -mu Lap u - (lambda + mu) grad div u,
  E = 1, nu = 0.3, three unknowns per node (node-major), 19-point node stencil;
  SPD; scalar CSR (`elasticity3d`) or BSR 3x3 (`elasticity3d-bsr`).
- `convdiff3d`: upwind convection-diffusion, eps = 1/Pe with Pe = 1e3, the
  recirculating wind (2y(1-x^2), -2x(1-y^2), 0) on [-1,1]^3;
  non-symmetric (an M-matrix).
- `fem2d`: P1 finite-element Laplacian on the Delaunay triangulation of uniform
  random points in the unit square; hull vertices are Dirichlet (eliminated).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

# A stencil term: (offset on the grid, coefficient: a scalar, an array of the grid's
# shape, or for block stencils a (b, b) block).
Term = tuple[tuple[int, ...], Any]


@dataclasses.dataclass
class Problem:
    name: str
    A: Any  # scipy csr_array or bsr_array, float64, sorted indices
    b: np.ndarray
    tag: str  # "spd" | "nonsym"
    description: str
    stencil: tuple[tuple[int, ...], list[Term]] | None = None  # (grid shape, terms)

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def block_size(self) -> int:
        return self.A.blocksize[0] if self.A.format == "bsr" else 1


# -----------------------------------------------------------------------------
# Stencil assembly
# -----------------------------------------------------------------------------


def _linear_offset(shape, offset) -> int:
    strides = np.cumprod((1,) + tuple(shape[::-1]))[:-1][::-1]
    return int(np.dot(strides, offset))


def _valid(shape, offset) -> np.ndarray:
    """Boolean (prod(shape),): rows whose neighbour at `offset` is on the grid."""
    ok = np.ones(shape, dtype=bool)
    for axis, (n, o) in enumerate(zip(shape, offset)):
        if o:
            i = np.arange(n)
            good = (i + o >= 0) & (i + o < n)
            ok &= good.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return ok.ravel()


def stencil_csr(shape, terms: list[Term], block: int = 1):
    """A (block) CSR matrix from a stencil on a structured grid (C order, last axis
    fastest). Neighbours off the grid are dropped (homogeneous Dirichlet); so are
    explicit zeros of scalar stencils. Column indices come out sorted."""
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape))
    terms = sorted(terms, key=lambda t: _linear_offset(shape, t[0]))
    k = len(terms)
    idx = np.int64 if size * k >= 2**31 else np.int32
    rows = np.arange(size, dtype=idx)
    cols = np.empty((size, k), dtype=idx)
    mask = np.empty((size, k), dtype=bool)
    if block == 1:
        vals = np.empty((size, k), dtype=np.float64)
    else:
        vals = np.empty((size, k, block, block), dtype=np.float64)
    for j, (offset, coef) in enumerate(terms):
        cols[:, j] = rows + _linear_offset(shape, offset)
        mask[:, j] = _valid(shape, offset)
        if block == 1:
            vals[:, j] = np.broadcast_to(np.asarray(coef, np.float64), shape).ravel()
            mask[:, j] &= vals[:, j] != 0
        else:
            vals[:, j] = np.asarray(coef, np.float64)
    counts = mask.sum(axis=1)
    indptr = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = cols[mask]
    data = vals[mask]
    if indptr[-1] < 2**31:
        indptr = indptr.astype(np.int32)
        indices = indices.astype(np.int32)
    if block == 1:
        return sp.csr_array((data, indices, indptr), shape=(size, size))
    return sp.bsr_array(
        (data, indices, indptr), shape=(size * block, size * block),
        blocksize=(block, block),
    )


def stencil_apply(shape, terms: list[Term]) -> tuple[Callable, list]:
    """A matrix-free JAX apply of a scalar stencil with offsets in {-1, 0, 1}:
    returns `(apply, coeffs)` with `apply(coeffs, x) -> A x` (x flat). The
    coefficient arrays are returned separately so that they can be passed as
    arguments of a jitted function instead of being baked in as constants."""
    import jax.numpy as jnp

    shape = tuple(int(s) for s in shape)
    offsets = [tuple(o) for o, _ in terms]
    coeffs = [c if np.ndim(c) == 0 else jnp.asarray(c) for _, c in terms]
    nd = len(shape)

    def apply(coeffs, x):
        xp = jnp.pad(x.reshape(shape), 1)
        y = jnp.zeros(shape, x.dtype)
        for o, c in zip(offsets, coeffs):
            sl = tuple(slice(1 + o[a], 1 + o[a] + shape[a]) for a in range(nd))
            y = y + c * xp[sl]
        return y.reshape(-1)

    return apply, coeffs


def _unit(nd, axis, sign=1):
    return tuple(sign if a == axis else 0 for a in range(nd))


def _fv_terms(shape, faces):
    """7-point finite-volume terms from face transmissibilities: `faces[a]` has the
    grid's shape with axis a one longer (faces between cells and the boundary
    faces at both ends)."""
    nd = len(shape)
    terms = []
    diag = np.zeros(shape)
    for a in range(nd):
        t = faces[a]
        lo = np.take(t, np.arange(shape[a]), axis=a)  # face below each cell
        hi = np.take(t, np.arange(1, shape[a] + 1), axis=a)  # face above
        diag = diag + lo + hi
        terms.append((_unit(nd, a, -1), -lo))
        terms.append((_unit(nd, a, +1), -hi))
    terms.append(((0,) * nd, diag))
    return terms


def _harmonic_faces(k):
    """Face transmissibilities of a cell field k: harmonic means inside, the cell's
    own k on the boundary faces."""
    faces = []
    for a in range(k.ndim):
        lo = np.take(k, [0], axis=a)
        hi = np.take(k, [k.shape[a] - 1], axis=a)
        k0 = np.take(k, np.arange(k.shape[a] - 1), axis=a)
        k1 = np.take(k, np.arange(1, k.shape[a]), axis=a)
        inner = 2 * k0 * k1 / (k0 + k1)
        faces.append(np.concatenate([lo, inner, hi], axis=a))
    return faces


def _grid3(n_unknowns):
    return max(3, round(n_unknowns ** (1 / 3)))


def _grid2(n_unknowns):
    return max(3, round(n_unknowns ** 0.5))


def _stencil_problem(name, shape, terms, tag, description):
    a = stencil_csr(shape, terms)
    return Problem(name, a, np.ones(a.shape[0]), tag, description, (shape, terms))


# -----------------------------------------------------------------------------
# Generators
# -----------------------------------------------------------------------------


def poisson3d(n_unknowns: int) -> Problem:
    n = _grid3(n_unknowns)
    terms = [((0, 0, 0), 6.0)]
    for a in range(3):
        terms += [(_unit(3, a, -1), -1.0), (_unit(3, a, 1), -1.0)]
    return _stencil_problem(
        "poisson3d", (n, n, n), terms, "spd", f"3D 7-point Laplacian, {n}^3 grid"
    )


def contrast3d_layers(n_unknowns: int, contrast: float = 1e6, layers: int = 20,
                      seed: int = 0) -> Problem:
    n = _grid3(n_unknowns)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.random(layers - 1))
    logk = rng.uniform(0, np.log10(contrast), layers)
    z = (np.arange(n) + 0.5) / n
    k = np.broadcast_to(10.0 ** logk[np.searchsorted(cuts, z)], (n, n, n))
    terms = _fv_terms((n, n, n), _harmonic_faces(np.ascontiguousarray(k)))
    return _stencil_problem(
        "contrast3d-layers", (n, n, n), terms, "spd",
        f"3D FV diffusion, {layers} random layers, log10 k ~ U(0, "
        f"{np.log10(contrast):g}), harmonic faces, {n}^3 grid",
    )


def contrast3d_checker(n_unknowns: int, contrast: float = 1e4,
                       blocks: int = 8) -> Problem:
    n = _grid3(n_unknowns)
    c = (np.arange(n) * blocks) // n
    parity = (c[:, None, None] + c[None, :, None] + c[None, None, :]) % 2
    k = np.where(parity == 1, contrast, 1.0)
    terms = _fv_terms((n, n, n), _harmonic_faces(k))
    return _stencil_problem(
        "contrast3d-checker", (n, n, n), terms, "spd",
        f"3D FV diffusion, {blocks}^3 checkerboard, k in {{1, {contrast:g}}}, "
        f"{n}^3 grid",
    )


def aniso2d(n_unknowns: int, eps: float = 1e-3, theta: float = np.pi / 8) -> Problem:
    n = _grid2(n_unknowns)
    c, s = np.cos(theta), np.sin(theta)
    d11 = c * c + eps * s * s
    d22 = s * s + eps * c * c
    d12 = (1 - eps) * c * s
    # -(d11 u_xx + 2 d12 u_xy + d22 u_yy); axis 0 = y, axis 1 = x.
    terms = [
        ((0, 0), 2 * d11 + 2 * d22),
        ((0, -1), -d11), ((0, 1), -d11),
        ((-1, 0), -d22), ((1, 0), -d22),
        ((1, 1), -d12 / 2), ((-1, -1), -d12 / 2),
        ((1, -1), d12 / 2), ((-1, 1), d12 / 2),
    ]
    return _stencil_problem(
        "aniso2d", (n, n), terms, "spd",
        f"2D rotated anisotropic diffusion, eps={eps:g}, theta=pi/8, 9-point, "
        f"{n}^2 grid",
    )


def aniso3d(n_unknowns: int, eps: float = 1e-3) -> Problem:
    n = _grid3(n_unknowns)
    k = (1.0, eps, eps)
    terms = [((0, 0, 0), 2 * sum(k))]
    for a in range(3):
        terms += [(_unit(3, a, -1), -k[a]), (_unit(3, a, 1), -k[a])]
    return _stencil_problem(
        "aniso3d", (n, n, n), terms, "spd",
        f"3D axis-aligned anisotropic diffusion diag(1, {eps:g}, {eps:g}), 7-point, "
        f"{n}^3 grid",
    )


def _elasticity_terms(E=1.0, nu=0.3):
    lam = E * nu / ((1 + nu) * (1 - 2 * nu))
    mu = E / (2 * (1 + nu))
    g = lam + mu
    eye = np.eye(3)
    terms = [((0, 0, 0), (6 * mu + 2 * g) * eye)]
    for a in range(3):
        blk = -mu * eye
        blk[a, a] -= g
        terms += [(_unit(3, a, -1), blk), (_unit(3, a, 1), blk.copy())]
    # Cross derivatives d2/dx_a dx_b (a != b): (u_{++} - u_{+-} - u_{-+} + u_{--}) / 4
    for a in range(3):
        for bb in range(a + 1, 3):
            for sa in (-1, 1):
                for sb in (-1, 1):
                    off = [0, 0, 0]
                    off[a], off[bb] = sa, sb
                    blk = np.zeros((3, 3))
                    blk[a, bb] = blk[bb, a] = -g * sa * sb / 4
                    terms.append((tuple(off), blk))
    return terms, lam, mu


def elasticity3d_bsr(n_unknowns: int, nu: float = 0.3) -> Problem:
    n = max(3, round((n_unknowns / 3) ** (1 / 3)))
    terms, lam, mu = _elasticity_terms(nu=nu)
    a = stencil_csr((n, n, n), terms, block=3)
    return Problem(
        "elasticity3d-bsr", a, np.ones(a.shape[0]), "spd",
        f"3D FD Navier-Cauchy elasticity (E=1, nu={nu}), 3x3 BSR, 19-point node "
        f"stencil, {n}^3 nodes",
    )


def elasticity3d(n_unknowns: int, nu: float = 0.3) -> Problem:
    p = elasticity3d_bsr(n_unknowns, nu)
    a = sp.csr_array(p.A.tocsr())
    a.eliminate_zeros()
    a.sort_indices()
    return dataclasses.replace(
        p, name="elasticity3d", A=a,
        description=p.description.replace("3x3 BSR", "scalar CSR"),
    )


def convdiff3d(n_unknowns: int, peclet: float = 1e3) -> Problem:
    n = _grid3(n_unknowns)
    h = 2.0 / (n + 1)
    eps = 1.0 / peclet
    # On [-1, 1]^3: axis 0 = z (no wind), axis 1 = y, axis 2 = x.
    x = -1 + h * (np.arange(n) + 1)
    wx = (2 * x[:, None] * (1 - x[None, :] ** 2))[None]  # shape (1, y, x)
    wy = (-2 * x[None, :] * (1 - x[:, None] ** 2))[None]
    w = [np.zeros((1, 1, 1)), wy, wx]
    terms = []
    diag = np.zeros((n, n, n))
    for a in range(3):
        wa = np.broadcast_to(w[a], (n, n, n))
        up, down = h * np.maximum(wa, 0), h * np.maximum(-wa, 0)
        terms.append((_unit(3, a, -1), -eps - up))
        terms.append((_unit(3, a, 1), -eps - down))
        diag = diag + 2 * eps + up + down
    terms.append(((0, 0, 0), diag))
    return _stencil_problem(
        "convdiff3d", (n, n, n), terms, "nonsym",
        f"3D upwind convection-diffusion, Pe={peclet:g}, recirculating wind, "
        f"{n}^3 grid",
    )


def fem2d(n_unknowns: int, seed: int = 0) -> Problem:
    from scipy.spatial import Delaunay

    rng = np.random.default_rng(seed)
    pts = rng.random((int(n_unknowns), 2))
    mesh = Delaunay(pts)
    tri = mesh.simplices
    p = pts[tri]  # (m, 3, 2)
    e = np.stack([p[:, 2] - p[:, 1], p[:, 0] - p[:, 2], p[:, 1] - p[:, 0]], axis=1)
    area2 = np.abs(e[:, 0, 0] * e[:, 1, 1] - e[:, 0, 1] * e[:, 1, 0])
    kloc = np.einsum("mid,mjd->mij", e, e) / (2 * area2)[:, None, None]
    rows = np.repeat(tri, 3, axis=1).ravel()
    cols = np.tile(tri, (1, 3)).ravel()
    k = sp.csr_array(sp.coo_array((kloc.ravel(), (rows, cols)),
                                  shape=(len(pts), len(pts))))
    boundary = np.zeros(len(pts), bool)
    boundary[mesh.convex_hull.ravel()] = True
    inner = np.flatnonzero(~boundary)
    a = sp.csr_array(k[inner][:, inner])
    a.sum_duplicates()
    a.sort_indices()
    return Problem(
        "fem2d", a, np.ones(a.shape[0]), "spd",
        f"2D P1 FEM Laplacian, Delaunay of {len(pts)} random points, "
        f"{len(tri)} triangles",
    )


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "poisson3d": poisson3d,
    "contrast3d-layers": contrast3d_layers,
    "contrast3d-checker": contrast3d_checker,
    "aniso2d": aniso2d,
    "aniso3d": aniso3d,
    "elasticity3d": elasticity3d,
    "elasticity3d-bsr": elasticity3d_bsr,
    "convdiff3d": convdiff3d,
    "fem2d": fem2d,
}


def make(name: str, n_unknowns: int) -> Problem:
    if name not in PROBLEMS:
        raise KeyError(f"Unknown problem {name!r}; known: {sorted(PROBLEMS)}.")
    return PROBLEMS[name](int(n_unknowns))


# -----------------------------------------------------------------------------
# Disk cache (the suite generates ahead, workers load)
# -----------------------------------------------------------------------------


def save(p: Problem, path: str) -> None:
    arrays: dict[str, Any] = dict(
        data=p.A.data, indices=p.A.indices, indptr=p.A.indptr,
        shape=np.array(p.A.shape), fmt=np.array(p.A.format), b=p.b,
        name=np.array(p.name), tag=np.array(p.tag),
        description=np.array(p.description),
    )
    if p.stencil is not None:
        shape, terms = p.stencil
        arrays["grid"] = np.array(shape)
        arrays["offsets"] = np.array([o for o, _ in terms])
        for j, (_, c) in enumerate(terms):
            arrays[f"coef{j}"] = np.asarray(c)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load(path: str) -> Problem:
    z = np.load(path)
    shape = tuple(int(s) for s in z["shape"])
    if str(z["fmt"]) == "bsr":
        data = z["data"]
        a = sp.bsr_array((data, z["indices"], z["indptr"]), shape=shape,
                         blocksize=data.shape[1:])
    else:
        a = sp.csr_array((z["data"], z["indices"], z["indptr"]), shape=shape)
    stencil = None
    if "grid" in z:
        offs = [tuple(int(v) for v in o) for o in z["offsets"]]
        terms = [(o, z[f"coef{j}"]) for j, o in enumerate(offs)]
        terms = [(o, float(c) if c.ndim == 0 else c) for o, c in terms]
        stencil = (tuple(int(s) for s in z["grid"]), terms)
    return Problem(str(z["name"]), a, z["b"], str(z["tag"]),
                   str(z["description"]), stencil)
