# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`jax.distributed` + `shard_map`: one JAX process per MPI rank, one device each.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ._collectives import _block_size_of, _layout_of
from ._comm import _comm, _raise_if_any
from ._layout import Layout
from ._pattern import DistributedPattern

_INT32_MAX = np.iinfo(np.int32).max


# -----------------------------------------------------------------------------
# jax.distributed + shard_map: one JAX process per MPI rank, one device each.
# -----------------------------------------------------------------------------
#
# Inside a `shard_map`ped, jitted function every process works on its own shard,
# and the package's host callbacks (halo exchange, reductions, setup, solve) talk
# MPI as everywhere else. `shard_map` needs one shard shape for all processes,
# while ranks own different numbers of rows and entries: local arrays travel
# padded to the largest rank (`pad_*`) and are cut back to this rank's size inside
# the mapped function (`unpad_*`, static per process: the programs differ only in
# these sizes and contain no XLA collective).


def check_jax_distributed(comm=None) -> None:
    """Check that JAX's processes are the communicator's ranks: as many processes
    as ranks, `jax.process_index() == rank`, one local device per process (the
    mesh axis of a `shard_map` over `jax.devices()` then walks the ranks in
    order). Raises `DistributedError` on every rank otherwise. Collective."""
    comm = _comm(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    err = None
    if jax.process_count() != size:
        err = (f"JAX has {jax.process_count()} processes but the communicator "
               f"{size} ranks: call jax.distributed.initialize(num_processes="
               f"{size}, process_id=rank) in every rank")
    elif jax.process_index() != rank:
        err = (f"jax.process_index() is {jax.process_index()} on MPI rank {rank}: "
               "pass process_id=comm.Get_rank() to jax.distributed.initialize")
    elif len(jax.local_devices()) != 1:
        err = (f"this process has {len(jax.local_devices())} JAX devices; use one "
               "device per process (e.g. CUDA_VISIBLE_DEVICES or "
               "jax.distributed.initialize(local_device_ids=[...]))")
    elif jax.default_backend() == "gpu":
        try:
            _check_shard_autotuning()
        except RuntimeError as e:
            err = str(e)
    _raise_if_any(comm, err)


def _padded_rows(layout: Layout) -> int:
    """The largest rank's vector length (`layout`: a Layout, or a block operator
    or pattern, whose vectors hold `b` entries per block row)."""
    return max(_layout_of(layout).counts) * _block_size_of(layout)


def _padded_nnz(pattern: DistributedPattern) -> int:
    return int(np.max(np.diff(pattern.nnz_offsets)))


def _pad(x, size: int):
    """`x` (NumPy or JAX; 1-D, or block values `(nnz, b, b)`) followed by zeros
    up to `size` entries."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])


def pad_vector(x_local, layout: Layout):
    """This rank's part of a vector, padded with zeros to the largest rank's row
    count: the uniform shard shape `shard_map` needs. Works on NumPy and JAX
    arrays (inside `shard_map` too). For a block operator pass the operator (or
    its pattern) as `layout`."""
    return _pad(x_local, _padded_rows(layout))


def unpad_vector(x_padded, layout: Layout):
    """The inverse of `pad_vector`: this rank's `n_local` (times `b`) entries."""
    return x_padded[: _layout_of(layout).n_local * _block_size_of(layout)]


def pad_values(values_local, pattern: DistributedPattern):
    """This rank's matrix values padded with zeros to the largest rank's number of
    entries (see `pad_vector`)."""
    return _pad(values_local, _padded_nnz(pattern))


def unpad_values(values_padded, pattern: DistributedPattern):
    """The inverse of `pad_values`: this rank's `nnz` values."""
    return values_padded[: pattern.nnz]




_AUTOTUNE_FLAG = "--xla_gpu_shard_autotuning=false"


def _check_shard_autotuning() -> None:
    """Under `jax.distributed` on GPUs, XLA shares the autotuning of a program
    between the processes, which assumes they compile the same program. A
    distributed operator's programs differ between ranks (each holds its own
    rows: shapes and constants), and the compilation then waits forever (2 x
    H200, jax 0.11). Refuse, at trace time, with the fix."""
    if jax.process_count() <= 1:
        return
    if _AUTOTUNE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    raise RuntimeError(
        "Distributed AmgX solves under jax.distributed on GPUs need XLA's sharded "
        f"autotuning off: set XLA_FLAGS={_AUTOTUNE_FLAG} (on every rank, before "
        "JAX starts). Each rank compiles its own program (its own rows), and XLA's "
        "shared autotuning would wait forever for the other ranks' kernels."
    )
