"""Distributed solves inside `shard_map` under `jax.distributed` (one JAX process
per MPI rank, one device each; run under MPI):

    mpiexec -n 2 python -m pytest tests/test_jax_distributed.py -m mpi -q \\
        -p no:cacheprovider

JAX's distributed runtime is initialised when this module is imported (before any
computation), so this file runs on its own. On the CPU the solves go through the
pyamg backend; on GPUs through AmgX (FFI handlers; they need
`XLA_FLAGS=--xla_gpu_shard_autotuning=false`, which this module sets).
"""

import os
import socket

import jax
import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py or an MPI library is missing")
COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cuda_device_count() -> int:
    """GPUs this process sees, asked of the CUDA driver directly (JAX's backend
    must not start before `jax.distributed.initialize`); 0 without a driver."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    n = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return 0
    return n.value


if SIZE < 2:  # a plain pytest run collects this file: leave JAX alone there
    pytest.skip("run under mpiexec -n 2 (or more)", allow_module_level=True)
# Each rank compiles its own program (its own rows): XLA's autotuning shared
# between the processes would wait forever for the others' kernels on GPUs.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_gpu_shard_autotuning=false").strip()
_port = COMM.bcast(_free_port() if RANK == 0 else None, root=0)
_kwargs = {}
_gpus = _cuda_device_count()
if _gpus:
    # Each rank takes one GPU: its node-local rank modulo the GPUs it sees, so
    # several ranks can share one GPU (the one-GPU test machine). Left to JAX,
    # Open MPI's detection asks for device `node-local rank`, which a rank beyond
    # the GPU count does not have: the GPU client's creation then waits for it
    # until "Getting local topologies failed ... GetKeyValue() timed out".
    _local = COMM.Split_type(MPI.COMM_TYPE_SHARED)
    _kwargs["local_device_ids"] = [_local.Get_rank() % _gpus]
    if _local.Get_size() > _gpus:
        # Ranks sharing a GPU must not each take 75 % of its memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _local.Free()
jax.distributed.initialize(coordinator_address=f"localhost:{_port}",
                           num_processes=SIZE, process_id=RANK, **_kwargs)

import _mpi_helpers  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
from helpers import poisson3d, rel_err  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import lineax_amgx as lxa  # noqa: E402
import lineax_amgx.distributed as D  # noqa: E402

try:
    from jax import shard_map as _shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map as _shard_map


def shard_map(f, **kwargs):
    """`shard_map` without JAX's replication (varying-axes) check: a global
    reduction made by the package's MPI callbacks is the same on every rank, but
    JAX cannot know it (only its own `psum` is known to be), so differentiating a
    loss built on one is refused under the check."""
    import inspect

    params = inspect.signature(_shard_map).parameters
    flag = "check_vma" if "check_vma" in params else "check_rep"
    return _shard_map(f, **kwargs, **{flag: False})

P = PartitionSpec
pytestmark = pytest.mark.mpi
SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)
collective = _mpi_helpers.collective(COMM)


def _uneven_problem():
    """3-D Poisson split unevenly (the last rank has fewer rows), so that the
    shards must be padded."""
    A = poisson3d(7)
    n = A.shape[0]
    counts = [n // SIZE + 3] * (SIZE - 1)
    counts.append(n - sum(counts))
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts)]))
    op = lxa.DistributedCSROperator.from_global_scipy(
        A if RANK == 0 else None, offsets=offsets, tags=SPD)
    b = np.random.default_rng(2).standard_normal(n)
    return A, b, op


def _global(mesh, local):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("rows")),
                                                  local)


def _local(x):
    (shard,) = x.addressable_shards
    return np.asarray(shard.data)


@collective
def test_solve_and_gradient_inside_shard_map():
    D.check_jax_distributed(COMM)
    A, b, op = _uneven_problem()
    pattern, layout = op.pattern, op.layout
    assert len(set(COMM.allgather(layout.n_local))) > 1  # padding is exercised
    mesh = jax.make_mesh((SIZE,), ("rows",))
    values = _global(mesh, D.pad_values(np.asarray(op.values), pattern))
    b_local = D.scatter_vector(b if RANK == 0 else None, layout)
    bg = _global(mesh, D.pad_vector(b_local, layout))
    w = np.linspace(-1.0, 1.0, A.shape[0])
    wg = _global(mesh, D.pad_vector(
        D.scatter_vector(w if RANK == 0 else None, layout), layout))
    solver = lxa.AMGX(rtol=1e-11)

    def solve_local(values, b):
        o = lxa.DistributedCSROperator(pattern, D.unpad_values(values, pattern),
                                       tags=SPD)
        return lx.linear_solve(o, D.unpad_vector(b, layout), solver=solver).value

    def f(values, b, w):
        # The solve and its gradient (w.r.t. b of sum(w * x), i.e. A^-T w) as one
        # chain: the cotangent waits for x (`D.after`), so every rank runs the
        # two distributed solves in the same order. (On GPUs XLA fixes the order
        # of independent operations per rank, and the ranks' programs differ.)
        def solve_b(bl):
            return solve_local(values, D.pad_vector(bl, layout))

        x, vjp = jax.vjp(solve_b, D.unpad_vector(b, layout))
        (g,) = vjp(D.after(D.unpad_vector(w, layout), x))
        return D.pad_vector(x, layout), D.pad_vector(g, layout)

    mapped = jax.jit(shard_map(f, mesh=mesh, in_specs=(P("rows"),) * 3,
                               out_specs=(P("rows"), P("rows"))))
    x, g = mapped(values, bg, wg)
    x = D.gather_vector(D.unpad_vector(_local(x), layout), layout, root=None)
    g = D.gather_vector(D.unpad_vector(_local(g), layout), layout, root=None)
    lu = spla.splu(sp.csc_matrix(A))
    assert rel_err(x, lu.solve(b)) < 1e-8, rel_err(x, lu.solve(b))
    assert rel_err(g, lu.solve(w)) < 1e-8  # A is symmetric: A^-T w = A^-1 w


@collective
def test_pad_helpers_round_trip():
    A, b, op = _uneven_problem()
    layout, pattern = op.layout, op.pattern
    x = np.arange(layout.n_local, dtype=float) + 1
    xp = D.pad_vector(x, layout)
    assert xp.shape == (max(layout.counts),)
    assert np.array_equal(D.unpad_vector(xp, layout), x)
    assert not xp[layout.n_local:].any()
    v = np.asarray(op.values)
    vp = D.pad_values(jnp.asarray(v), pattern)
    assert vp.shape == (int(np.max(np.diff(pattern.nnz_offsets))),)
    assert np.array_equal(np.asarray(D.unpad_values(vp, pattern)), v)


@collective
def test_check_jax_distributed_refuses_a_mismatched_communicator():
    half = COMM.Split(RANK % 2, RANK)
    try:
        if half.Get_size() != SIZE:
            with pytest.raises(D.DistributedError, match="JAX has"):
                D.check_jax_distributed(half)
    finally:
        half.Free()


@collective
def test_matrix_free_newton_step_inside_shard_map():
    """A `DistributedJacobianOperator` (1-D Bratu, -u'' - 2 exp(u) = f, split
    unevenly) built outside, its Newton step inside a jitted `shard_map`: equal
    to the dense Newton step (`jax.jacfwd` of the global residual, NumPy solve)."""
    n = 50
    h = 1.0 / (n + 1)
    counts = [n // SIZE + 3] * (SIZE - 1)
    counts.append(n - sum(counts))
    layout = D.Layout.from_local_size(counts[RANK])
    lo, hi = layout.row_start, layout.row_end
    halo = np.array([i for i in (lo - 1, hi) if 0 <= i < n and not lo <= i < hi])
    rng = np.random.default_rng(8)
    u, f = 0.3 * rng.standard_normal(n), rng.standard_normal(n)

    def residual(x, x_halo, args):
        lam, fl = args
        left = x_halo[:1] if lo > 0 else jnp.zeros(1)
        right = x_halo[-1:] if hi < n else jnp.zeros(1)
        p = jnp.concatenate([left, x, right])
        return (2 * p[1:-1] - p[:-2] - p[2:]) / h**2 - lam * jnp.exp(x) - fl

    def global_residual(x):
        p = jnp.pad(x, 1)
        return (2 * p[1:-1] - p[:-2] - p[2:]) / h**2 - 2.0 * jnp.exp(x) - f

    J = D.DistributedJacobianOperator(residual, jnp.asarray(u[lo:hi]), halo,
                                      (2.0, jnp.asarray(f[lo:hi])), layout=layout,
                                      tags=SPD)
    mesh = jax.make_mesh((SIZE,), ("rows",))
    ug = _global(mesh, D.pad_vector(u[lo:hi], layout))
    fg = _global(mesh, D.pad_vector(f[lo:hi], layout))
    solver = lxa.AMGX(rtol=1e-13)

    def step(u, f):
        Ju = J.at(D.unpad_vector(u, layout), (2.0, D.unpad_vector(f, layout)))
        F, A = Ju.residual_and_csr()
        return D.pad_vector(-lx.linear_solve(A, F, solver=solver).value, layout)

    dx = jax.jit(shard_map(step, mesh=mesh, in_specs=(P("rows"),) * 2,
                           out_specs=P("rows")))(ug, fg)
    dx = D.gather_vector(D.unpad_vector(_local(dx), layout), layout, root=None)
    jac = np.asarray(jax.jacfwd(global_residual)(jnp.asarray(u)))
    ref = np.linalg.solve(jac, -np.asarray(global_residual(jnp.asarray(u))))
    assert len(set(COMM.allgather(layout.n_local))) > 1  # padding is exercised
    tol = 1e-9 if jax.default_backend() == "gpu" else 1e-10
    assert rel_err(dx, ref) < tol, rel_err(dx, ref)
