# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The AmgX (CUDA) backend for distributed patterns: AmgX's distributed API
through the native core's FFI handlers (default) or host callbacks.
"""

from __future__ import annotations

import functools as ft
import hashlib
import os
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._backends import _native
from .._backends.amgx import _ffi, _library
from .._backends.contract import (
    MODES,
    SolveKey,
    Status,
    host_setup,
    host_solve,
    nonfinite_host_result,
    solve_result_shapes,
)
from ._comm import (
    _raise_gathered,
    _raise_if_any,
    agree,
    check_mpi_library,
    communicator,
    local_rank,
    mpi,
    mpi_library,
)
from ._operator import DistributedCSROperator
from ._pattern import DistributedPattern, _no_near_nullspace
from ._sequencer import (
    new_site as _new_site,
    timeout as _timeout,
    turn as _turn,
)
from ._shard_map import _check_shard_autotuning

_INT32_MAX = np.iinfo(np.int32).max


# -----------------------------------------------------------------------------
# What the native (AmgX) path needs.
# -----------------------------------------------------------------------------


def native_distribution_args(op: DistributedCSROperator | DistributedPattern) -> dict:
    """Everything the native core needs to upload one rank's rows to AmgX's
    distributed API, as plain integers and NumPy arrays (host).

    **Returns:**

    A dict with

    - `comm_ptr` (int): `MPI._addressof(comm)`, the address of this process's
        `MPI_Comm` handle: what `AMGX_resources_create(&rsrc, cfg, comm_ptr,
        1, &device)` takes as its `void *comm`. Valid while the communicator lives.
    - `comm_handle` (int): `MPI._handleof(comm)`, the `MPI_Comm` value itself
        (an `int` in MPICH, a pointer in Open MPI).
    - `comm_key` (int): the process-local key of the communicator (never 0): the
        `comm` field of the native cache `Key`.
    - `rank`, `size` (int).
    - `offsets` (int64, `size + 1`): the partition offsets, for
        `AMGX_distribution_set_partition_data(dist, AMGX_DIST_PARTITION_OFFSETS,
        offsets)`.
    - `n_global`, `n_local`, `nnz_local` (int): block rows and blocks for a
        block operator.
    - `block_size` (int): `b` of the `b x b` blocks (1: scalar).
    - `indptr` (int32, `n_local + 1`): the local row pointer.
    - `global_indices` (int64, `nnz_local`): global column indices, for
        `AMGX_matrix_upload_distributed(A, n_global, n_local, nnz_local, b, b,
        indptr, global_indices, values, NULL, dist)` (64-bit column indices are
        AmgX's default; `AMGX_distribution_set_32bit_colindices` is not needed).
    - `fingerprint` (int): this rank's structure (with the offsets);
        `global_fingerprint` (int): the same on every rank.
    - `mpi_library` (str): the MPI family (see `check_mpi_library`).

    The values are the operator's `values` (the traced array: an FFI operand, not
    an attribute). Vectors are the local parts (`n_local * b`), bound to the matrix
    with `AMGX_vector_bind` before upload.
    """
    MPI = mpi()
    pattern = op.pattern if isinstance(op, DistributedCSROperator) else op
    if not isinstance(pattern, DistributedPattern):
        raise TypeError(
            f"Expected a DistributedCSROperator, got {type(op).__name__}."
        )
    lay = pattern.layout
    comm = lay.comm
    return dict(
        comm_ptr=int(MPI._addressof(comm)),
        comm_handle=int(MPI._handleof(comm)),
        comm_key=lay.comm_key,
        rank=lay.rank,
        size=lay.size,
        offsets=np.asarray(lay.offsets, dtype=np.int64),
        n_global=lay.n_global,
        n_local=lay.n_local,
        nnz_local=pattern.nnz,
        block_size=pattern.block_size,
        indptr=pattern.indptr,
        global_indices=pattern.global_indices,
        fingerprint=pattern.fingerprint,
        global_fingerprint=pattern.global_fingerprint,
        mpi_library=mpi_library(),
    )


_PATH_ENV = "LINEAX_AMGX_DISTRIBUTED_PATH"


def native_path() -> str:
    """How distributed solves of CUDA arrays reach AmgX's distributed API:
    `"ffi"` (the default: XLA FFI handlers on device memory) or `"host"` (host
    callbacks: values and vectors through the host; slower, kept as a fallback),
    from `LINEAX_AMGX_DISTRIBUTED_PATH`."""
    raw = os.environ.get(_PATH_ENV, "").strip().lower() or "ffi"
    if raw not in ("ffi", "host"):
        raise ValueError(f"{_PATH_ENV} must be 'ffi' or 'host', got {raw!r}.")
    return raw


class _GPUBackend:
    """The CUDA branch of the router for distributed patterns: AmgX's distributed
    API through FFI handlers (`ffi_setup` / `ffi_solve`), or through host callbacks
    (`amgx_setup` / `amgx_solve`) with `LINEAX_AMGX_DISTRIBUTED_PATH=host`."""

    @classmethod
    def setup(cls, pattern, values, ok, key, **kwargs):
        _no_near_nullspace(kwargs.get("near_nullspace"))
        fn = ffi_setup if native_path() == "ffi" else amgx_setup
        return fn(pattern, values, ok, key)

    @classmethod
    def solve(cls, pattern, values, token, b, x0, ok, key, **kwargs):
        _no_near_nullspace(kwargs.get("near_nullspace"))
        fn = ffi_solve if native_path() == "ffi" else amgx_solve
        return fn(pattern, values, token, b, x0, ok, key)


# The native path. Each setup and solve is one host callback whose MPI work is a
# sequencer turn, so the ranks run them in the same order. Inside it the ranks
# first agree what to do (`_native_acquire`: the worst of every rank's cache probe
# — all hit, all resetup, or all set up afresh), then call AmgX, whose own MPI
# traffic runs on a private `Dup` of the communicator. Values and vectors travel
# through the host (a host callback's operands): simple and ordered, at the cost
# of a device-host copy of the values per call and of the vectors per solve.

_amgx_comms: dict[int, Any] = {}  # comm_key -> the Dup given to AmgX (kept alive)
_ordinals: dict[int, int] = {}  # comm_key -> CUDA device ordinal used by AmgX


def _amgx_comm(comm_key: int):
    """Collective on first use (a `Dup`). AmgX keeps the address of the handle, so
    the communicator lives as long as the process."""
    c = _amgx_comms.get(comm_key)
    if c is None:
        comm = communicator(comm_key)
        with _turn(comm, kind="amgx.comm"):
            c = comm.Dup()
        _amgx_comms[comm_key] = c
    return c


def _device_ordinal(comm_key: int) -> int:
    """The CUDA device this rank's AmgX uses: `LINEAX_AMGX_DEVICE` if set, else
    device 0 when the process sees one GPU, else the node-local rank modulo the
    number of GPUs (one process per GPU). Collective on first use."""
    if comm_key in _ordinals:
        return _ordinals[comm_key]
    env = os.environ.get("LINEAX_AMGX_DEVICE", "").strip()
    if env:
        ordinal = int(env)
    else:
        n = max(len(_library.native().cuda_devices()), 1)
        ordinal = 0 if n == 1 else local_rank(communicator(comm_key)) % n
    _ordinals[comm_key] = ordinal
    return ordinal


def _elf_needed(path: str) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared library ([] if the
    file cannot be read as one)."""
    import mmap

    try:
        with open(path, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _elf_needed_from(m)  # mapped, not read: ~130 MB for AmgX
    except (OSError, ValueError):
        return []


def _elf_needed_from(data) -> list[str]:
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        for i in range(shnum)
    ]
    out = []
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.find(b"\0", str_off + val)
                out.append(bytes(data[str_off + val : end]).decode())
    return out


def _resolved_path(path: str) -> str:
    """The file behind a loaded library: `path` itself, or for a bare soname
    found on the loader path, the file this process mapped."""
    if os.path.sep in path:
        return path
    name = os.path.basename(path)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                mapped = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(mapped) == name:
                    return mapped
    except OSError:
        pass
    return path


_AMGX_WITHOUT_MPI = (
    "the loaded AmgX library links no MPI library (built without MPI): "
    "distributed solves need an MPI build of AmgX"
)


def _amgx_needed() -> list[str]:
    """The libraries the loaded AmgX links (ELF `DT_NEEDED`). Loads AmgX first: in
    a fresh rank the distributed check may be the first thing that needs it (a
    missing library then raises AmgXNotFoundError, clearly)."""
    return _elf_needed(_resolved_path(_library.load()))


def amgx_mpi_library() -> str | None:
    """The MPI family the loaded AmgX library links (`"Open MPI"` for
    `libmpi.so.40`, `"MPICH"` for `libmpi.so.12`, else the soname), or `None` when
    it links no MPI (a build without MPI: no distributed solves)."""
    for lib in _amgx_needed():
        if lib.startswith("libmpi.so.40") or "open-rte" in lib or "open-pal" in lib:
            return "Open MPI"
        if lib.startswith("libmpi.so.12") or lib.startswith("libmpich"):
            return "MPICH"
        if lib.startswith("libmpi"):
            return lib
    return None


_checked_mpi: set[int] = set()


def _check_native_mpi(comm_key: int) -> None:
    """Refuse (on every rank) an AmgX without MPI, or one built with another MPI
    than mpi4py's: its communicator would be a foreign handle."""
    if comm_key in _checked_mpi:
        return
    err = None
    try:
        family = amgx_mpi_library()
        if family is None:
            err = _AMGX_WITHOUT_MPI
        else:
            check_mpi_library(family)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        err = str(e)
    _raise_if_any(communicator(comm_key), err, RuntimeError)
    _checked_mpi.add(comm_key)




def _native_acquire(pattern: DistributedPattern, key: SolveKey, values, token,
                    *, setup_only: bool = False):
    """Collective (inside a turn). `(token, isolated)`: the token of the AmgX
    entry holding `values`: every rank probes its cache, the worst outcome wins on
    every rank (a hit only when all hit), and the ranks set up or resetup
    together. `isolated`: some rank's cache has capacity 0 (agreed): then a setup
    (`setup_only`) keeps nothing, and a solve's entry is removed after it."""

    MPI = mpi()
    comm_key = pattern.layout.comm_key
    comm = communicator(comm_key)
    _check_native_mpi(comm_key)
    native = _library.native()
    ordinal = _device_ordinal(comm_key)
    static = (comm_key, pattern.fingerprint, key.config, MODES[key.mode],
              int(key.transposed), pattern.block_size)
    # The values reach a callback as a CPU jax.Array, and making them a NumPy
    # array is a full host copy (148 ms for 117 MB on a CI host): only done when
    # the token does not name a resident entry (probe), or for a (re)setup.
    as_numpy = ft.cache(lambda: np.ascontiguousarray(values))
    no_values = np.empty(0, np.uint8)
    err, state, isolated = None, _native.PROBE_SETUP, False
    try:
        isolated = bool(native.dist_cache_info().get("isolated", False))
        tok = (int(token[0]), int(token[1]))
        state, _, _ = native.dist_probe(ordinal, *static, no_values, *tok)
        if state == _native.PROBE_RESETUP:  # not named by the token: compare
            state, _, _ = native.dist_probe(ordinal, *static, as_numpy(), *tok)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        err = str(e)
    what = _call_signature(pattern, key, "acquire")
    with _turn(comm, kind="amgx.agree"):  # the probes' errors and outcomes at once
        everyone = comm.allgather((int(state), err, what, isolated))
    _raise_gathered([e for _, e, _, _ in everyone], RuntimeError)
    if len({w for _, _, w, _ in everyone}) > 1:
        raise RuntimeError(_DIFFERENT_CALLS)
    action = max(st for st, _, _, _ in everyone)
    isolated = any(i for _, _, _, i in everyone)
    if isolated and setup_only:  # as the single-process cache: nothing kept
        return np.array([-1, -1], np.int32), True
    amgx_comm = _amgx_comm(comm_key)
    err, out = None, (-1, -1)
    try:
        out = native.dist_setup(
            action, ordinal, comm_key, int(MPI._addressof(amgx_comm)), *static[1:],
            pattern.layout.n_global,
            np.asarray(pattern.layout.offsets, dtype=np.int64), pattern.indptr,
            pattern.global_indices,
            as_numpy() if action != _native.PROBE_HIT else no_values,
        )
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        err = f"AmgX distributed setup failed: {e}"
    _raise_if_any(comm, err, RuntimeError)
    return np.array(out, np.int32), isolated


def amgx_setup(pattern: DistributedPattern, values, ok, key: SolveKey):
    """Collective. The AmgX setup of a distributed operator (the backend
    contract): a token naming this rank's part of the distributed AmgX entry."""
    comm_key = pattern.layout.comm_key
    site = _new_site()

    def host(values, ok):
        comm = communicator(comm_key)
        with _turn(comm, site, "amgx.setup"):
            if not agree(int(ok) != 0, comm):
                return np.array([-1, -1], np.int32)
            return _native_acquire(pattern, key, values, (-1, -1),
                                   setup_only=True)[0]

    return host_setup(host, values, ok)


def amgx_solve(pattern: DistributedPattern, values, token, b, x0, ok, key: SolveKey):
    """Collective. The AmgX solve of a distributed system (the backend
    contract): this rank's part of `x`, and the same `info` and residual norm (AmgX's
    global norm) on every rank."""
    comm_key = pattern.layout.comm_key
    site = _new_site()
    out_dtype = np.dtype(b.dtype)

    def host(values, token, b, ok, *maybe_x0):
        comm = communicator(comm_key)
        with _turn(comm, site, "amgx.solve"):
            if not agree(int(ok) != 0, comm):
                return nonfinite_host_result(b.shape, out_dtype)
            tok, isolated = _native_acquire(pattern, key, values, np.asarray(token))
            x = np.empty(b.shape, out_dtype)
            x0 = np.ascontiguousarray(maybe_x0[0], out_dtype) if maybe_x0 else None
            err, result = None, (Status.FAILED, 0, float("inf"))
            try:
                result = _library.native().dist_solve(
                    _device_ordinal(comm_key), int(tok[0]), int(tok[1]),
                    np.ascontiguousarray(b, out_dtype), x0, x,
                )
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                err = f"AmgX distributed solve failed: {e}"
            with _turn(comm, kind="amgx.solved"):
                failed = comm.allgather(err)
            if isolated or any(e is not None for e in failed):
                # A failure anywhere leaves AmgX's state unknown: every rank
                # drops its part of the entry, together (a collective destroy),
                # as isolated mode does after every solve.
                _library.native().dist_remove(
                    _device_ordinal(comm_key), int(tok[0]), int(tok[1]))
            _raise_gathered(failed, RuntimeError)
        status, steps, resid = result
        if key.verbose and comm.Get_rank() == 0:
            print(
                f"lineax_amgx (AmgX, {comm.Get_size()} ranks): status {status}, "
                f"{steps} iterations, residual {resid:.3e}"
            )
        return (
            x,
            np.array([status, steps], np.int32),
            np.array(resid, out_dtype),
        )

    return host_solve(host, values, token, b, x0, ok)


# The device-resident native path (the default): two XLA FFI handlers of the
# native core (`lineax_amgx_dist_setup` / `lineax_amgx_dist_solve`) read the values
# and vectors where XLA keeps them, on the GPU. The ranks' agreement (cache probe,
# finite inputs, errors, same call) is made in the handler, by small MPI
# allreduces over a private duplicate of the communicator; the values are compared
# with the resident ones on the device. Nothing travels through the host.

_mpi_handed = False
_dist_registered: dict[tuple[int, int], int] = {}  # (comm_key, fingerprint) -> refs


def _hand_mpi_to_native() -> None:
    """Once per process, at trace time and on this rank only (no MPI call): check
    that AmgX and mpi4py use one MPI, and give the native core the addresses of
    `MPI_Iallreduce`, `MPI_Test` and `MPI_Comm_dup` of that library with the
    handles of `MPI_INT64_T` and `MPI_MAX`."""
    global _mpi_handed
    if _mpi_handed:
        return
    import ctypes
    family = amgx_mpi_library()
    if family is None:
        raise RuntimeError(_AMGX_WITHOUT_MPI)
    check_mpi_library(family)
    MPI = mpi()
    # The file of AmgX's libmpi as this process mapped it (ctypes then gets the
    # same, already loaded library).
    libmpi = next(n for n in _amgx_needed() if n.startswith("libmpi"))
    lib = ctypes.CDLL(_resolved_path(libmpi))

    def address(name):
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value

    _library.native().dist_set_mpi(
        address("MPI_Iallreduce"), address("MPI_Test"), address("MPI_Comm_dup"),
        int(MPI._handleof(MPI.INT64_T)), int(MPI._handleof(MPI.MAX)),
        float(_timeout()),
    )
    _mpi_handed = True





def _release_dist_pattern(k: tuple[int, int]) -> None:
    _dist_registered[k] -= 1
    if _dist_registered[k] == 0:
        del _dist_registered[k]
        try:
            _library.native().dist_unregister_pattern(*k)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _ffi_prepare(pattern: DistributedPattern) -> bool:
    """Trace time, this rank only. False where the CUDA branch cannot run."""
    if not _ffi.prepare_native():
        return False
    _check_shard_autotuning()
    _hand_mpi_to_native()
    if getattr(pattern, "_dist_native_registered", False):
        return True
    lay = pattern.layout
    k = (lay.comm_key, pattern.fingerprint)
    _library.native().dist_register_pattern(
        lay.comm_key, int(mpi()._handleof(lay.comm)), pattern.fingerprint, lay.n_global,
        np.asarray(lay.offsets, dtype=np.int64),
        np.ascontiguousarray(pattern.indptr, dtype=np.int32),
        np.ascontiguousarray(pattern.global_indices, dtype=np.int64),
        pattern.block_size,
    )
    _dist_registered[k] = _dist_registered.get(k, 0) + 1
    pattern._dist_native_registered = True
    weakref.finalize(pattern, _release_dist_pattern, k)
    return True


_DIFFERENT_CALLS = (
    "the ranks reached different distributed AmgX calls (another operator, "
    "configuration or transposition on some rank): every rank must make the same "
    "distributed solves in the same order"
)


def _call_signature(pattern: DistributedPattern, key: SolveKey, kind: str) -> int:
    """The same on every rank for the same logical call (operator, configuration,
    direction, kind), in [0, 2**62): the ranks compare it, so that ranks that
    reach different calls fail clearly instead of letting AmgX mix them."""
    sig = hashlib.blake2b(
        repr((pattern.global_fingerprint, key.config, key.mode, key.transposed,
              kind)).encode(), digest_size=8).digest()
    return int.from_bytes(sig, "little") >> 2


def _ffi_attrs(pattern: DistributedPattern, key: SolveKey, kind: str) -> dict:
    return dict(
        comm_key=np.int64(pattern.layout.comm_key),
        fingerprint=np.int64(pattern.fingerprint),
        signature=np.int64(_call_signature(pattern, key, kind)),
        site=np.int64(_new_site()),
        config=key.config,
        mode=np.int32(MODES[key.mode]),
        transposed=np.int32(key.transposed),
        verbose=np.int32(key.verbose),
    )


def ffi_setup(pattern: DistributedPattern, values, ok, key: SolveKey):
    """Collective. `amgx_setup` through the device-resident FFI handler."""
    _ffi_prepare(pattern)
    call = jax.ffi.ffi_call(
        _native.FFI_TARGETS["dist_setup"], jax.ShapeDtypeStruct((2,), jnp.int32),
        vmap_method="sequential",
    )
    return call(values, ok, **_ffi_attrs(pattern, key, "setup"))


def ffi_solve(pattern: DistributedPattern, values, token, b, x0, ok, key: SolveKey):
    """Collective. `amgx_solve` through the device-resident FFI handler."""
    _ffi_prepare(pattern)
    call = jax.ffi.ffi_call(
        _native.FFI_TARGETS["dist_solve"], solve_result_shapes(b),
        vmap_method="sequential",
    )
    has_x0 = x0 is not None
    return call(
        values, token, b, x0 if has_x0 else b, ok, has_x0=np.int32(has_x0),
        **_ffi_attrs(pattern, key, "solve"),
    )


gpu_backend = _GPUBackend
