# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Recover a conductivity field by gradient descent through AMGX solves.

The forward model is steady diffusion on the unit square,

    -div(k ∇u) = f,   u = 0 on the boundary,

discretised with cell-centred finite volumes on an `n x n` grid (5-point
stencil, harmonic-mean face conductances). The unknown is the log-conductivity
`m = log k`, one value per cell. The sparsity pattern is fixed and built once on
the host; the CSR *values* are a differentiable `jnp` function of `m`, so
`jax.grad` flows through `lx.linear_solve(..., solver=lxa.AMGX())` (Lineax's
adjoint: one extra solve with the transpose, which for this symmetric-tagged
matrix reuses the forward setup) into the assembly and back to `m`.

Several sources `f_s` are solved at once with `jax.vmap` over the right-hand
side: one AMG setup per evaluation, a loop of solves. The misfit to observed
fields `u_obs` (made with a known `m_true`) plus a smoothness penalty is
minimised by plain gradient descent with a backtracking line search.

    python examples/inverse_diffusion.py             # 32 x 32, CPU (pyamg)
    python examples/inverse_diffusion.py --n 256     # larger; GPU if present
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

import lineax_amgx as lxa

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
DENSE_MAX = 64  # dense reference solves up to 64 x 64 cells (4096 unknowns)


class FiniteVolume:
    """The 5-point finite-volume pattern on an `n x n` cell grid, and the map from
    face conductances to CSR values (host index arrays, built once)."""

    def __init__(self, n: int):
        self.n = n
        idx = np.arange(n * n).reshape(n, n)
        # Interior faces: between horizontally and vertically adjacent cells.
        a = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
        b = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
        # Boundary faces: the cell next to each of the 4n boundary faces.
        c = np.concatenate([idx[0], idx[-1], idx[:, 0], idx[:, -1]])
        self.a, self.b, self.c = a, b, c
        nf, nb = a.size, c.size
        # Each face adds its conductance T to the diagonals of its cells and -T
        # to the two off-diagonal entries: (row, col, face, sign) contributions.
        rows = np.concatenate([a, b, a, b, c])
        cols = np.concatenate([a, b, b, a, c])
        face = np.concatenate([np.arange(nf)] * 4 + [nf + np.arange(nb)])
        sign = np.concatenate([np.ones(2 * nf), -np.ones(2 * nf), np.ones(nb)])
        keys = rows.astype(np.int64) * (n * n) + cols
        uniq, position = np.unique(keys, return_inverse=True)  # CSR order
        urows = uniq // (n * n)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(urows, minlength=n * n))])
        self.pattern = lxa.SparsityPattern(indptr, uniq % (n * n), (n * n, n * n))
        self.face, self.sign, self.position = face, sign, position

    def values(self, m):
        """CSR values of the finite-volume matrix for log-conductivity `m`."""
        k = jnp.exp(m.ravel())
        ka, kb = k[self.a], k[self.b]
        t_inner = 2 * ka * kb / (ka + kb)  # harmonic mean across the face
        t_bound = 2 * k[self.c]  # half a cell to the Dirichlet boundary
        t = jnp.concatenate([t_inner, t_bound])
        contrib = self.sign * t[self.face]
        return jax.ops.segment_sum(contrib, self.position, self.pattern.nnz)

    def operator(self, m):
        return lxa.CSROperator(self.pattern, self.values(m), tags=SPD)


def grid(n):
    x = (np.arange(n) + 0.5) / n
    return np.meshgrid(x, x, indexing="ij")


def true_log_conductivity(n):
    X, Y = grid(n)
    blob = np.exp(-((X - 0.35) ** 2 + (Y - 0.6) ** 2) / 0.03)
    hole = np.exp(-((X - 0.7) ** 2 + (Y - 0.3) ** 2) / 0.02)
    return jnp.asarray((0.8 * blob - 0.6 * hole).ravel())


def sources(n):
    """Four source terms (times the cell area h²): the right-hand sides."""
    X, Y = grid(n)
    fs = [
        np.ones_like(X),
        np.sin(np.pi * X) * np.cos(np.pi * Y) + 1.0,
        np.exp(-((X - 0.25) ** 2 + (Y - 0.25) ** 2) / 0.05),
        np.exp(-((X - 0.75) ** 2 + (Y - 0.75) ** 2) / 0.05),
    ]
    return jnp.asarray(np.stack([f.ravel() for f in fs]) / n**2)


def make_problem(n, beta, solver):
    fv = FiniteVolume(n)
    rhs = sources(n)

    def solve_all(m):
        op = fv.operator(m)
        # vmap over the right-hand sides: one setup, a loop of solves.
        return jax.vmap(lambda f: lx.linear_solve(op, f, solver=solver).value)(rhs)

    def solve_all_dense(m):
        # The reference: a dense float64 solve of the same matrix.
        p = fv.pattern
        a = jnp.zeros(p.shape).at[p.row_ids, p.indices].add(fv.values(m))
        return jnp.linalg.solve(a, rhs.T).T

    m_true = true_log_conductivity(n)
    # The observations (by a dense solve where affordable: an independent one).
    u_obs = (solve_all_dense if n <= DENSE_MAX else solve_all)(m_true)
    scale = float(jnp.sum(u_obs**2))

    def objective(m, solve):
        misfit = 0.5 * jnp.sum((solve(m) - u_obs) ** 2) / scale
        M = m.reshape(n, n)
        smooth = jnp.sum(jnp.diff(M, axis=0) ** 2) + jnp.sum(jnp.diff(M, axis=1) ** 2)
        return misfit + 0.5 * beta * smooth, misfit

    return fv, m_true, objective, solve_all, solve_all_dense


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="cells per side")
    parser.add_argument("--iters", type=int, default=60, help="descent steps")
    parser.add_argument("--beta", type=float, default=1e-6, help="smoothing weight")
    parser.add_argument(
        "--figure", metavar="PNG", help="save the fields and the objective here"
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    n = args.n
    print(f"inverse diffusion: {n} x {n} cells, 4 sources, device {jax.devices()[0]}")

    solver = lxa.AMGX(rtol=1e-12)
    fv, m_true, objective, solve_all, solve_all_dense = make_problem(
        n, args.beta, solver
    )
    value = jax.jit(lambda m: objective(m, solve_all))
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda m: objective(m, solve_all), has_aux=True)
    )

    m = jnp.zeros(n * n)  # start from a homogeneous medium, k = 1

    # 1. The gradient, against finite differences and a dense-solve gradient.
    lxa.reset_counters()
    (j0, _), g = value_and_grad(m)
    jax.block_until_ready(g)  # the counters are updated by the computation
    info = lxa.cache_info()
    print(
        f"one objective + gradient: {info['setups'] + info['resetups']} setup(s), "
        f"{info['solves']} solves (4 forward + 4 adjoint, symmetric: no transpose)"
    )
    rng = np.random.default_rng(0)
    d = jnp.asarray(rng.standard_normal(n * n))
    eps = 1e-4
    fd = (value(m + eps * d)[0] - value(m - eps * d)[0]) / (2 * eps)
    directional = float(jnp.vdot(g, d))
    rel = abs(directional - float(fd)) / abs(float(fd))
    print(
        f"directional derivative: AMGX gradient {directional:.10e}, "
        f"finite differences {float(fd):.10e}, relative difference {rel:.1e}"
    )
    assert rel < 1e-5, rel
    if n <= DENSE_MAX:
        g_dense = jax.jit(jax.grad(lambda m: objective(m, solve_all_dense)[0]))(m)
        rel_dense = float(jnp.linalg.norm(g - g_dense) / jnp.linalg.norm(g_dense))
        print(f"gradient vs dense-solve gradient: relative difference {rel_dense:.1e}")
        assert rel_dense < 1e-7, rel_dense

    # 2. Gradient descent with a backtracking (Armijo) line search.
    step = 1.0 / float(jnp.linalg.norm(g))
    history = [float(j0)]
    err0 = float(jnp.linalg.norm(m - m_true))
    t0 = time.perf_counter()
    for it in range(args.iters):
        (j, _), g = value_and_grad(m)
        gg = float(jnp.vdot(g, g))
        while True:
            m_new = m - step * g
            j_new = float(value(m_new)[0])
            if j_new <= float(j) - 1e-4 * step * gg or step < 1e-12:
                break
            step *= 0.5
        m = m_new
        history.append(j_new)
        step *= 2.0  # try a longer step next time
        if it % 10 == 0 or it == args.iters - 1:
            err = float(jnp.linalg.norm(m - m_true)) / err0
            print(
                f"  iter {it:3d}: objective {j_new:.4e}, "
                f"|m - m_true| / |m0 - m_true| = {err:.3f}"
            )
    print(
        f"descent: {args.iters} steps in {time.perf_counter() - t0:.2f} s; objective "
        f"{history[0]:.3e} -> {history[-1]:.3e}"
    )
    assert all(b <= a for a, b in zip(history, history[1:])), "not monotone"
    assert history[-1] < 0.1 * history[0], history[-1]
    if args.figure:
        save_figure(args.figure, n, m_true, m, history)
    return m


def save_figure(path: str, n: int, m_true, m, history: list[float]) -> None:
    """True and recovered log-conductivity, and the objective per descent step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    lo, hi = float(jnp.min(m_true)), float(jnp.max(m_true))
    for ax, field, title in ((axes[0], m_true, "true m = log k"),
                             (axes[1], m, "recovered m")):
        im = ax.imshow(jnp.asarray(field).reshape(n, n), origin="lower",
                       extent=(0, 1, 0, 1), vmin=lo, vmax=hi, cmap="viridis")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.85)
    axes[2].semilogy(history, color="tab:green")
    axes[2].set_xlabel("descent step")
    axes[2].set_ylabel("objective")
    axes[2].set_title("misfit + smoothing")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    t_start, c_start = time.perf_counter(), time.process_time()
    main()
    print(
        f"total time {time.perf_counter() - t_start:.1f} s "
        f"(CPU time {time.process_time() - c_start:.1f} s)"
    )
