"""The setup caches, on the CPU (pyamg's hierarchy cache) and on the GPU (the
native AmgX cache: `pytest -m gpu tests/test_cache.py` on the device): reuse,
resetup, tokens, capacity and eviction, isolated mode, threads, GPU memory.
Counters are read from `lxa.cache_info`."""

import os
import subprocess
import sys
import textwrap
import threading

import helpers as h
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from _backend import only
from helpers import SPD

import lineax_amgx as lxa
from lineax_amgx._backends import pyamg as _cpu

pytestmark = [
    pytest.mark.filterwarnings("ignore::lineax_amgx.PyamgTranslationWarning"),
    pytest.mark.usefixtures("on_cpu"),
]

KEYS = ("setups", "resetups", "solves", "size", "evictions")


def _counts():
    info = _cpu.cache_info()
    return {k: info[k] for k in ("setups", "resetups", "solves", "compares",
                                 "token_hits", "misses", "hits")}


def _rhs(rng, n):
    return jnp.asarray(rng.standard_normal(n))


def _poisson_op(n=16, *, tags=SPD):
    a = h.poisson2d(n)
    return a, lxa.CSROperator.from_scipy(a, tags=tags)


# ---- the CPU's hierarchy cache: several setups per key, value comparisons, tokens


def test_reuse_same_values_then_resetup(rng):
    a, op = _poisson_op()
    b = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)
    x1 = lx.linear_solve(op, b, solver=solver).value
    x2 = lx.linear_solve(op, b, solver=solver).value
    c = _counts()
    assert (c["setups"], c["resetups"], c["solves"]) == (1, 0, 2)
    assert c["compares"] == 1  # the second setup compared values: equal, no setup
    np.testing.assert_array_equal(x1, x2)

    op2 = op.with_values(op.values * 1.5)
    x3 = lx.linear_solve(op2, b, solver=solver).value
    c = _counts()
    assert (c["setups"], c["resetups"]) == (1, 1)
    assert h.rel_err(x3, h.reference(a * 1.5, b)) < 1e-6
    # the first values are still resident (several setups per entry): no setup
    lx.linear_solve(op, b, solver=solver)
    assert _counts()["resetups"] == 1
    info = _cpu.cache_info()
    assert info["size"] == 1 and info["entries"][0]["resetups"] == 1


def test_reused_state_skips_comparison(rng):
    a, op = _poisson_op()
    solver = lxa.AMGX(rtol=1e-10)
    state = solver.init(op, {})
    before = _counts()
    assert before["setups"] == 1
    for _ in range(3):
        b = _rhs(rng, a.shape[0])
        sol = lx.linear_solve(op, b, solver=solver, state=state)
        assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6
    c = _counts()
    assert c["setups"] == 1 and c["resetups"] == 0
    assert c["compares"] == before["compares"]  # the token named the setup
    assert c["token_hits"] - before["token_hits"] == 3


def test_stale_token_is_slow_not_wrong(rng):
    a, op = _poisson_op()
    solver = lxa.AMGX(rtol=1e-10)
    state = solver.init(op, {})
    _cpu.clear_cache()  # the token now names nothing
    b = _rhs(rng, a.shape[0])
    sol = lx.linear_solve(op, b, solver=solver, state=state)
    assert h.rel_err(sol.value, h.reference(a, b)) < 1e-6
    assert _counts()["setups"] == 2


def test_isolated_mode_and_eviction(rng):
    a, op = _poisson_op()
    b = _rhs(rng, a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)
    _cpu.set_cache_size(0)
    for _ in range(2):
        lx.linear_solve(op, b, solver=solver)
    info = _cpu.cache_info()
    assert info["isolated"] and info["size"] == 0 and info["setups"] == 2
    _cpu.set_cache_size(1)
    lx.linear_solve(op, b, solver=solver)
    lx.linear_solve(op, b, solver=lxa.AMGX("FGMRES_AGGREGATION", rtol=1e-10))
    info = _cpu.cache_info()
    assert info["size"] == 1 and info["evictions"] == 1
    with pytest.raises(ValueError, match=">= 0"):
        _cpu.set_cache_size(-1)


def test_concurrent_solves_from_threads(rng):
    a, op = _poisson_op()
    solver = lxa.AMGX(rtol=1e-10)
    f = jax.jit(lambda v, b: lx.linear_solve(op.with_values(v), b, solver=solver).value)
    bs = [_rhs(rng, a.shape[0]) for _ in range(8)]
    f(op.values, bs[0]).block_until_ready()  # compile once
    _cpu.reset_counters()
    out = [None] * len(bs)

    def work(i):
        out[i] = np.asarray(f(op.values, bs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, b in zip(out, bs):
        assert h.rel_err(x, h.reference(a, b)) < 1e-6
    c = _counts()
    assert c["solves"] == 8 and c["setups"] == 0 and c["resetups"] == 0


# ---- both caches -------------------------------------------------------------------


def test_new_values_resetup_same_values_no_resetup(rng, backend):
    a = h.poisson2d(80)
    op = backend.op(a, SPD)
    b = backend.put(rng.standard_normal(a.shape[0]))
    solver = lxa.AMGX(rtol=1e-10)
    f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)
    x1 = f(op, b)
    op2 = op.with_values(op.values * 2.0)
    x2 = f(op2, b)
    c = backend.counts(x1, x2, keys=KEYS)
    assert (c["setups"], c["resetups"]) == (1, 1), c
    assert h.rel_err(x2, np.asarray(x1) / 2) < 1e-8

    lxa.clear_cache()
    lxa.reset_counters()
    state = solver.init(op, {})
    lx.linear_solve(op, b, solver=solver, state=state).value.block_until_ready()
    lx.linear_solve(op, b * 2, solver=solver, state=state).value.block_until_ready()
    c = backend.counts(keys=KEYS)
    assert (c["setups"], c["resetups"], c["solves"]) == (1, 0, 2), c

    lxa.clear_cache()
    lxa.reset_counters()
    f(op, b).block_until_ready()
    f(op, b * 3).block_until_ready()
    c = backend.counts(keys=KEYS)
    assert (c["setups"], c["resetups"], c["solves"]) == (1, 0, 2), c
    assert lxa.cache_info(backend.cache)["hits"] >= 1


def test_capacity_one_alternating_patterns(rng, backend):
    lxa.set_cache_size(1)
    a1, a2 = h.poisson2d(40), h.convection_diffusion2d(40)
    op1, op2 = backend.op(a1, SPD), backend.op(a2)
    b = backend.put(rng.standard_normal(a1.shape[0]))
    solver = lxa.AMGX(rtol=1e-10)
    for _ in range(2):
        for a, op in ((a1, op1), (a2, op2)):
            x = lx.linear_solve(op, b, solver=solver).value
            assert h.rel_residual(a, x, np.asarray(b)) < 1e-9
    c = backend.counts(keys=KEYS)
    assert c["size"] == 1 and c["evictions"] >= 3, c


def test_isolated_mode_keeps_nothing(rng, backend):
    lxa.set_cache_size(0)
    a = h.poisson2d(40)
    op = backend.op(a, SPD)
    b = backend.put(rng.standard_normal(a.shape[0]))
    x = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10)).value
    assert h.rel_residual(a, x, np.asarray(b)) < 1e-9
    assert lxa.cache_info(backend.cache)["size"] == 0


def test_same_indptr_different_indices_no_wrong_reuse(rng, backend):
    n = 2000
    main = sp.diags([4.0] * n)

    def band(k):
        return sp.diags([-1.0] * (n - k), k) + sp.diags([-1.0] * (n - k), -k)

    a1 = sp.csr_array(main + band(1))
    a2 = sp.csr_array(main + band(2))
    a2 = sp.csr_array(a2)
    assert a1.nnz != a2.nnz or not np.array_equal(a1.indices, a2.indices)
    b = backend.put(rng.standard_normal(n))
    solver = lxa.AMGX(rtol=1e-11)
    for a in (a1, a2, a1):
        x = lx.linear_solve(backend.op(a, SPD), b, solver=solver).value
        assert h.rel_err(x, spla.spsolve(a.tocsc(), np.asarray(b))) < 1e-8


def test_threads_solve_concurrently(rng, backend):
    import concurrent.futures as cf

    a = h.poisson2d(60)
    op = backend.op(a, SPD)
    solver = lxa.AMGX(rtol=1e-10)
    f = jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)
    bs = [rng.standard_normal(a.shape[0]) for _ in range(8)]

    def work(i):
        x = f(op.with_values(op.values * (1 + i % 2)), backend.put(bs[i]))
        return h.rel_residual(a * (1 + i % 2), x, bs[i])

    with cf.ThreadPoolExecutor(4) as ex:
        res = list(ex.map(work, range(8)))
    assert max(res) < 1e-9


# ---- the GPU's memory and devices --------------------------------------------------


@only("gpu")
def test_memory_returns_after_clear_and_finalize(backend):
    """GPU memory held by cached setups is freed by clear_cache() and finalize().

    The first solve in a process also loads CUDA modules (cuBLAS, cuSPARSE, AmgX's
    kernels) into the context; that one-time cost stays until the process exits
    and is printed, not asserted. The assertions compare with the memory after a
    warm-up solve that was cleared and finalized.
    """
    script = textwrap.dedent("""
        import os
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        # JAX's own buffers go straight to cudaMalloc/cudaFree (no pool that keeps
        # memory), so free memory reflects what AmgX and the cache hold.
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = "platform"
        import jax, jax.numpy as jnp, lineax as lx, numpy as np
        jax.config.update("jax_enable_x64", True)
        import lineax_amgx as lxa, pyamg
        from lineax_amgx._backends.amgx import _library
        MiB = 2**20
        free = lambda: _library.native().free_device_memory()[0]
        jnp.ones(1).block_until_ready()
        free0 = free()
        tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
        a = pyamg.gallery.poisson((300, 300), format="csr")
        op = lxa.CSROperator.from_scipy(a, tags=tags)
        b = jnp.ones(a.shape[0])
        # Warm-up on the same problem: loads every CUDA module the workload uses.
        solve = lambda o: lx.linear_solve(o, b, solver=lxa.AMGX()).value
        solve(op).block_until_ready()
        lxa.finalize()
        free_w = free()
        for k in range(3):
            x = solve(op.with_values(op.values * (k + 1)))
        x.block_until_ready()
        del x
        free_used = free()
        lxa.clear_cache()
        free1 = free()
        lxa.finalize()
        free2 = free()
        print(f"one-time CUDA module load: {(free0 - free_w) / MiB:.0f} MiB; "
              f"held while cached: {(free_w - free_used) / MiB:.0f} MiB; "
              f"after clear_cache: {(free_w - free1) / MiB:.0f} MiB; "
              f"after finalize: {(free_w - free2) / MiB:.0f} MiB")
        assert free_w - free1 < 64 * MiB, (free_w, free1)
        assert free_w - free2 < 64 * MiB, (free_w, free2)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@only("gpu")
def test_two_devices_one_at_a_time(rng, backend):
    """AmgX 2.5 keeps one cuBLAS and one cuSPARSE handle per process, bound to the
    device of their first use: with setups resident on two GPUs, the first solve
    on the second failed with CUBLAS_STATUS_INTERNAL_ERROR (2 x H200). The core
    therefore uses one device at a time: a setup on another GPU frees the old
    GPU's setups first, and every answer is right."""
    if len(jax.devices("cuda")) < 2:
        pytest.skip("needs 2 GPUs")
    a = h.poisson2d(50)
    b = rng.standard_normal(a.shape[0])
    solver = lxa.AMGX(rtol=1e-10)
    lxa.clear_cache()
    switches = lxa.cache_info("amgx")["device_switches"]
    d0, d1 = jax.devices("cuda")[:2]
    for dev in (d0, d1, d0, d0):
        op = jax.device_put(lxa.CSROperator.from_scipy(a, tags=SPD), dev)
        bd = jax.device_put(jnp.asarray(b), dev)
        x = lx.linear_solve(op, bd, solver=solver).value
        assert x.devices() == {dev}
        assert h.rel_residual(a, x, b) < 1e-9
        info = lxa.cache_info("amgx")
        assert {e["device"] for e in info["entries"]} == {dev.local_hardware_id}
    assert info["device_switches"] - switches == 2
