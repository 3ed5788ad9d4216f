# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The 2-D Bratu problem with Optimistix's Newton method and AMGX.

    -Δu = λ exp(u)  on the unit square,  u = 0 on the boundary,

discretised with 5-point finite differences on an `n x n` interior grid. The
residual is plain JAX code: no matrix is written anywhere. Every Newton step,
Optimistix linearises the residual (`jax.linearize`) and hands `AMGX` a
`FunctionLinearOperator`; `AMGX.init` finds its sparsity pattern (traced once per
compile), colors the columns and assembles the CSR values with one JVP per
color, then sets AmgX up (GPU) or pyamg (CPU) for that Jacobian.

Optimistix keeps the per-step linear-solve statistics to itself. To report the
total number of linear iterations, the solver is wrapped in `CountIterations`,
a Lineax solver that delegates everything to `AMGX` and adds each solve's
`num_steps` to a host-side tally through `jax.debug.callback` (an effect: it runs
inside Optimistix's jitted while loop, once per solve). The number of solves and
setups comes from the setup cache's counters, `lxa.cache_info()`.

    python examples/newton_bratu.py            # 64 x 64, CPU (pyamg): checks
                                               # against a dense-LU Newton
    python examples/newton_bratu.py --n 1024   # 1024 x 1024 on the GPU (AmgX)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx

import lineax_amgx as lxa


class Tally:
    """Host-side counters of linear solves and their iterations."""

    def __init__(self):
        self.solves = 0
        self.iterations = 0
        self.per_solve: list[int] = []

    def add(self, steps) -> None:
        # Under vmap the callback receives a batch: count every member.
        for s in jnp.atleast_1d(steps).tolist():
            self.solves += 1
            self.iterations += int(s)
            self.per_solve.append(int(s))


class CountIterations(lx.AbstractLinearSolver):
    """A Lineax solver that delegates to `solver` and records every solve's
    `num_steps` in `tally` (on the host)."""

    solver: lx.AbstractLinearSolver
    tally: Tally = eqx.field(static=True)

    def init(self, operator, options: dict[str, Any]):
        return self.solver.init(operator, options)

    def compute(self, state, vector, options: dict[str, Any]):
        x, result, stats = self.solver.compute(state, vector, options)
        jax.debug.callback(self.tally.add, stats["num_steps"])
        return x, result, stats

    def transpose(self, state, options: dict[str, Any]):
        return self.solver.transpose(state, options)

    def conj(self, state, options: dict[str, Any]):
        return self.solver.conj(state, options)

    def assume_full_rank(self) -> bool:
        return self.solver.assume_full_rank()


def bratu_residual(n: int):
    """`F(u, λ) = h² (-Δ_h u - λ exp(u))` on the `n x n` interior grid (flattened).

    Scaled by `h²`, so that `F` is O(1) whatever `n`: Optimistix's Newton stops
    on `max |F| < atol`, and unscaled (`|Δ_h| ~ 4/h²`, 4e6 at n = 1024) the
    rounding error of evaluating `F` alone exceeds `atol = 1e-10`."""
    h = 1.0 / (n + 1)

    def residual(u, lam):
        U = u.reshape(n, n)
        P = jnp.pad(U, 1)  # zero Dirichlet boundary
        lap = 4 * U - P[:-2, 1:-1] - P[2:, 1:-1] - P[1:-1, :-2] - P[1:-1, 2:]
        return (lap - h**2 * lam * jnp.exp(U)).ravel()

    return residual


def newton(n: int, lam: float, linear_solver, rtol: float = 1e-10):
    residual = bratu_residual(n)
    # Below the fold (λ* ≈ 6.81) Newton from u = 0 stays on the lower branch,
    # where the Jacobian -Δ_h - λ diag(exp(u)) is symmetric positive definite:
    # the tags select AmgX's CG with an aggregation-AMG preconditioner.
    tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
    solver = optx.Newton(rtol=rtol, atol=rtol, linear_solver=linear_solver)
    u0 = jnp.zeros(n * n)
    sol = optx.root_find(residual, solver, u0, lam, tags=tags, max_steps=50)
    return sol.value, int(sol.stats["num_steps"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="interior grid points/side")
    parser.add_argument("--lam", type=float, default=5.0, help="λ (< 6.8)")
    parser.add_argument(
        "--check",
        choices=("auto", "yes", "no"),
        default="auto",
        help="compare with Newton + lx.AutoLinearSolver (dense LU); auto: n <= 96",
    )
    parser.add_argument(
        "--figure", metavar="PNG", help="save the solution and iteration counts here"
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    n, lam = args.n, args.lam
    print(
        f"Bratu λ={lam}, {n} x {n} grid ({n * n} unknowns), device: {jax.devices()[0]}"
    )

    tally = Tally()
    solver = CountIterations(lxa.AMGX(rtol=1e-12), tally)
    lxa.reset_counters()
    t0 = time.perf_counter()
    u, steps = newton(n, lam, solver)
    u.block_until_ready()
    jax.effects_barrier()  # every debug.callback of the tally has run
    elapsed = time.perf_counter() - t0
    info = lxa.cache_info()
    residual = bratu_residual(n)
    res = float(jnp.max(jnp.abs(residual(u, lam))))
    print(
        f"Newton + AMGX: {steps} Newton steps, {tally.solves} linear solves, "
        f"{tally.iterations} linear iterations in total "
        f"({tally.iterations / max(tally.solves, 1):.1f} per solve)"
    )
    print(
        f"  setup cache: {info['setups']} setups + {info['resetups']} resetups, "
        f"{info['solves']} solves (one (re)setup per Newton step)"
    )
    print(
        f"  max u = {float(jnp.max(u)):.6f}, max |F(u)| = {res:.2e}, "
        f"time {elapsed:.2f} s (including compilation)"
    )

    if args.check == "yes" or (args.check == "auto" and n <= 96):
        t0 = time.perf_counter()
        u_ref, steps_ref = newton(n, lam, lx.AutoLinearSolver(well_posed=True))
        u_ref.block_until_ready()
        t_ref = time.perf_counter() - t0
        diff = float(jnp.max(jnp.abs(u - u_ref)))
        print(f"Newton + dense LU: {steps_ref} Newton steps, time {t_ref:.2f} s")
        print(f"  max |u_AMGX - u_LU| = {diff:.2e}")
        assert diff < 1e-8, diff
    if args.figure:
        save_figure(args.figure, u, n, lam, tally.per_solve)
    return u


def save_figure(path: str, u, n: int, lam: float, per_solve: list[int]) -> None:
    """The solution field and the linear iterations of every Newton step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.6))
    im = ax0.imshow(jnp.asarray(u).reshape(n, n), origin="lower",
                    extent=(0, 1, 0, 1), cmap="viridis")
    fig.colorbar(im, ax=ax0, shrink=0.85)
    ax0.set_title(f"u, Bratu λ = {lam}, {n} x {n}")
    ax1.bar(range(1, len(per_solve) + 1), per_solve, color="tab:green")
    ax1.set_xlabel("Newton step (linear solve)")
    ax1.set_ylabel("AMGX iterations")
    ax1.set_title("linear iterations per Newton step")
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
