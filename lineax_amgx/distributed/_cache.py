# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Cache controls of the distributed AmgX entries (collective).
"""

from __future__ import annotations

import numpy as np

from .._backends.amgx import _library
from ._comm import _comm, _raise_if_any
from ._sequencer import (
    turn as _turn,
)

_INT32_MAX = np.iinfo(np.int32).max


def cache_info() -> dict:
    """This rank's distributed AmgX entries (GPU): counters (`hits`, `misses`,
    `setups`, `resetups`, `solves`, `evictions`), `size` and `entries`. The ranks'
    caches change only inside collective calls, so every rank reports the same
    counters. Empty when AmgX is not loaded (no distributed GPU solve ran)."""
    return dict(_library.native().dist_cache_info())


def clear_cache(comm=None) -> None:
    """Collective: destroy the distributed AmgX entries of every rank of `comm`
    (and free their GPU memory). `lineax_amgx.clear_cache()` frees the
    single-process setups only: destroying a distributed entry is itself
    collective (AmgX's MPI), so it needs every rank, at the same point. Call it
    on every rank of the communicator the operators were built on."""
    comm = _comm(comm)
    with _turn(comm, kind="amgx.clear"):
        err = None
        try:
            # Without AmgX loaded there is nothing to destroy: a no-op.
            _library.native().dist_clear_cache()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank
            err = f"clearing the distributed AmgX cache failed: {e}"
        _raise_if_any(comm, err, RuntimeError)
