# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Native core of lineax-amgx (AmgX loaded at run time).

Type stub of the nanobind module built from `csrc/` (bindings.cc). Checked against
the built module by `tools/stubtest_native.py` (mypy's stubtest; see `.ci/run`).
The constants come from `csrc/codes.h`, where they are defined once.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

# ---- Codes shared with Python (csrc/codes.h) ----

# A solve's status: AmgX's (0-3) and ours (4: an input held NaN or Inf, AmgX was
# not called).
STATUS_SUCCESS: int
STATUS_FAILED: int
STATUS_DIVERGED: int
STATUS_NOT_CONVERGED: int
STATUS_NONFINITE: int

# AmgX modes: name -> AmgX mode id, and the bytes of a matrix value / a vector
# element in each.
MODES: dict[str, int]
MODE_MATRIX_BYTES: dict[str, int]
MODE_VECTOR_BYTES: dict[str, int]

# Block sizes 1 to MAX_GPU_BLOCK_SIZE reach AmgX; larger ones are refused.
MAX_GPU_BLOCK_SIZE: int

# A distributed cache probe's outcome (and the action the ranks agree on, the
# maximum): a hit, a resetup of the entry with the key, a full setup.
PROBE_HIT: int
PROBE_RESETUP: int
PROBE_SETUP: int

# The XLA FFI targets, by kind ("setup", "solve", "dist_setup", "dist_solve").
FFI_TARGETS: dict[str, str]

# The XLA FFI target of runtime arrays (registered for "cpu" and "CUDA").
RUNTIME_ARRAY_TARGET: str

# The counters of cache_info() and of its entries, in order.
COUNTER_NAMES: tuple[str, ...]

# The values set_resetup_mode() takes.
RESETUP_MODES: tuple[str, ...]

# ---- FFI handlers and patterns ----

def registrations() -> dict[str, Any]:
    """The FFI handlers as capsules, by target name (for
    `jax.ffi.register_ffi_target`)."""

# ---- Runtime arrays (csrc/runtime_arrays.h) ----

def runtime_array_handlers() -> dict[str, Any]:
    """The runtime-array FFI handlers as capsules, by platform ("cpu", "CUDA")."""

def register_runtime_array(key: int, array: npt.NDArray[Any]) -> int:
    """Register a C-contiguous host array under `key` (its address, not a copy:
    keep it alive and unchanged until `unregister_runtime_array(key, token)`
    returns). Returns the registration's token."""

def unregister_runtime_array(key: int, token: int) -> None:
    """Remove a registration (after every read of it is done); the last one of a
    key frees the key's device copies."""

def release_runtime_array_copies() -> None:
    """Free every device copy (the host registrations stay)."""

def runtime_array_info() -> dict[str, int]:
    """`arrays`, `registrations`, `host_bytes`, `device_copies`, `device_bytes`,
    `uploads`."""

def register_pattern(
    fingerprint: int,
    indptr: npt.NDArray[np.int32],
    indices: npt.NDArray[np.int32],
    block_rows: int,
    block_cols: int,
    block_size: int,
) -> None:
    """Give the core the host CSR structure of a pattern (once per fingerprint)."""

def unregister_pattern(fingerprint: int) -> None: ...
def num_patterns() -> int: ...

# ---- Loading and state ----

def load(path: str) -> None:
    """Load libamgxsh.so from `path` (RuntimeError with the reason on failure)."""

def is_loaded() -> bool: ...
def is_initialized() -> bool: ...
def poisoned() -> str:
    """Why the process can no longer use AmgX (a broken CUDA context), or ""."""

def _poison_for_testing(why: str) -> None: ...
def library_info() -> dict[str, Any]: ...
def cuda_devices() -> list[str]: ...
def free_device_memory() -> tuple[int, int]:
    """(free, total) bytes of device 0."""

# ---- The single-process cache ----

def cache_info() -> dict[str, Any]: ...
def reset_counters() -> None: ...
def clear_cache() -> None: ...
def set_cache_size(capacity: int, entries_per_key: int = 1) -> None: ...
def set_resetup_mode(mode: str) -> None: ...
def finalize() -> None: ...

# ---- Distributed (MPI) entries; collective where the core's comments say so ----

def dist_probe(
    ordinal: int,
    comm_key: int,
    fingerprint: int,
    config: str,
    mode: int,
    transposed: int,
    block_size: int,
    values: npt.NDArray[Any],
    id: int,
    gen: int,
) -> tuple[int, int, int]:
    """(PROBE_* outcome, entry id, generation)."""

def dist_setup(
    action: int,
    ordinal: int,
    comm_key: int,
    comm_ptr: int,
    fingerprint: int,
    config: str,
    mode: int,
    transposed: int,
    block_size: int,
    n_global: int,
    offsets: npt.NDArray[np.int64],
    indptr: npt.NDArray[np.int32],
    global_indices: npt.NDArray[np.int64],
    values: npt.NDArray[Any],
) -> tuple[int, int]:
    """Collective. (entry id, generation) after the agreed `action`."""

def dist_solve(
    ordinal: int,
    id: int,
    gen: int,
    b: npt.NDArray[Any],
    x0: npt.NDArray[Any] | None,
    x: npt.NDArray[Any],
) -> tuple[int, int, float]:
    """Collective. Writes `x`; returns (status, iterations, residual)."""

def dist_set_mpi(
    iallreduce: int,
    test: int,
    comm_dup: int,
    int64_type: int,
    max_op: int,
    timeout: float,
) -> None: ...
def dist_register_pattern(
    comm_key: int,
    comm_handle: int,
    fingerprint: int,
    n_global: int,
    offsets: npt.NDArray[np.int64],
    indptr: npt.NDArray[np.int32],
    global_indices: npt.NDArray[np.int64],
    block_size: int,
) -> None: ...
def dist_unregister_pattern(comm_key: int, fingerprint: int) -> None: ...
def dist_cache_info() -> dict[str, Any]: ...
def dist_clear_cache() -> None: ...
