"""Strong and weak scaling of distributed solves (one process per GPU).

Strong scaling: a fixed 3-D Poisson problem (7-point, `--n`^3 rows) on 1, 2, 4 ...
ranks. Weak scaling: a fixed number of rows per rank (`--n`^3 each; the grid grows
along z). Every rank builds its own rows directly (no scatter from one rank), so
the set-up cost does not grow with the rank count.

Run one rank count under MPI:

    mpiexec -n 4 python benchmarks/scaling.py --mode strong --n 128

or let the script launch itself for several counts (one JSON line per count):

    python benchmarks/scaling.py --mode weak --n 64 --ranks 1,2,4,8

On the GPU machine each rank takes the GPU of its node-local rank; arrays stay on
the CPU (pyamg backend) with `--cpu` or when JAX sees no GPU. Printed per count
(rank 0): `setup_s` (first solve: AmgX setup + solve, compile excluded),
`solve_s` (median of repeated solves that reuse the setup), both the maximum over
ranks; `amgx_solve_s` (timings the backend reports in `cache_info()`, if any),
`iterations`, `residual`, `ranks`, `rows`, `rows_per_rank`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np


def poisson3d_local_rows(nx: int, ny: int, nz: int, start: int, end: int):
    """Rows `start:end` of the 7-point Laplacian (2 on each axis' diagonal) on an
    `nx * ny * nz` grid, x fastest: CSR arrays with global int64 columns."""
    rows = np.arange(start, end, dtype=np.int64)
    i = rows % nx
    j = (rows // nx) % ny
    k = rows // (nx * ny)
    cols, vals = [rows], [np.full(rows.size, 6.0)]
    for ok, off in (
        (k > 0, -nx * ny), (j > 0, -nx), (i > 0, -1),
        (i < nx - 1, 1), (j < ny - 1, nx), (k < nz - 1, nx * ny),
    ):
        cols.append(np.where(ok, rows + off, -1))
        vals.append(np.where(ok, -1.0, 0.0))
    cols = np.stack(cols, axis=1)
    vals = np.stack(vals, axis=1)
    order = np.argsort(cols, axis=1)
    cols = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    keep = cols >= 0
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return indptr, cols[keep], vals[keep]


def _amgx_solve_seconds(comm) -> float | None:
    """AmgX's own time in its last distributed solve (the slowest rank), from the
    native core's distributed cache; None on the CPU backend."""
    import lineax_amgx.distributed as lxd

    try:
        entries = lxd.cache_info()["entries"]
        mine = max((e["last_solve_seconds"] for e in entries), default=None)
    except Exception:  # noqa: BLE001 - no native core / no GPU: not reported
        mine = None
    every = comm.allgather(mine)
    return None if any(t is None for t in every) else max(every)


def _clear_native_distributed_cache(comm) -> None:
    """Collective: drop the AmgX distributed entries (a cold setup next)."""
    import lineax_amgx.distributed as lxd

    lxd.clear_cache(comm)


def _launch(args) -> int:
    mpiexec = shutil.which("mpiexec") or shutil.which("mpirun")
    if mpiexec is None:
        print("mpiexec not found: install an MPI (e.g. `pip install mpich`).")
        return 1
    rest = [a for a in sys.argv[1:]]
    i = rest.index("--ranks")
    del rest[i : i + 2]
    rc = 0
    for k in (int(r) for r in args.ranks.split(",")):
        cmd = [mpiexec, "-n", str(k), sys.executable, os.path.abspath(__file__), *rest]
        rc |= subprocess.call(cmd)
    return rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["strong", "weak"], default="strong")
    p.add_argument("--n", type=int, default=32,
                   help="strong: grid n^3 in all; weak: n^3 rows per rank")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rtol", type=float, default=1e-8)
    p.add_argument("--config", default=None, help="AmgX preset or JSON")
    p.add_argument("--cpu", action="store_true", help="keep arrays on the CPU")
    p.add_argument("--ranks", default=None,
                   help="comma-separated rank counts: launch mpiexec for each")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args()
    if args.ranks:
        return _launch(args)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import lineax as lx
    from mpi4py import MPI

    import lineax_amgx as lxa
    import lineax_amgx.distributed as D

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    n = args.n
    nx = ny = n
    nz = n if args.mode == "strong" else n * size
    n_global = nx * ny * nz
    layout = D.Layout.balanced(n_global, comm)
    indptr, cols, vals = poisson3d_local_rows(
        nx, ny, nz, layout.row_start, layout.row_end
    )
    devices = [] if args.cpu else [
        d for d in jax.devices() if d.platform in ("gpu", "cuda")
    ]
    device = (
        devices[D.local_rank(comm) % len(devices)] if devices
        else jax.devices("cpu")[0]
    )
    values = jax.device_put(jnp.asarray(vals), device)
    op = lxa.DistributedCSROperator.from_local_rows(
        indptr, cols, values, n_global, comm,
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    b = jax.device_put(jnp.ones(layout.n_local), device)
    solver = lxa.AMGX(args.config, rtol=args.rtol)
    solve = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver, throw=False))

    def timed(fn):
        comm.Barrier()
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        return out, comm.allreduce(dt, op=MPI.MAX)

    jax.block_until_ready(solve.lower(op, b).compile())  # compile: not timed
    lxa.clear_cache()
    if devices:
        _clear_native_distributed_cache(comm)
    sol, setup_s = timed(lambda: solve(op, b))
    times = [timed(lambda: solve(op, b))[1] for _ in range(args.repeats)]
    result = dict(
        benchmark="scaling",
        mode=args.mode,
        ranks=size,
        rows=n_global,
        rows_per_rank=n_global // size,
        grid=[nx, ny, nz],
        backend=device.platform,
        device=getattr(device, "device_kind", device.platform),
        mpi=D.mpi_library(),
        setup_s=setup_s,
        solve_s=statistics.median(times),
        solve_times_s=times,
        iterations=int(sol.stats["num_steps"]),
        residual=float(sol.stats["residual_norm"]),
        successful=bool(sol.result == lx.RESULTS.successful),
        # AmgX's own time in the last solve (slowest rank; the native path
        # only, null on the CPU backend), beside the wall time above.
        amgx_solve_s=_amgx_solve_seconds(comm),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
