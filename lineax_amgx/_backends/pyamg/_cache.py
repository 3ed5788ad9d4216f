# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The hierarchy cache: a thread-safe LRU of `_Prepared` solvers, keyed by
`(pattern fingerprint, block size, mode, config, transposed, near-null-space
width)`, several value sets per key, compared exactly (never hashed).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._build import _Prepared

# -----------------------------------------------------------------------------
# The hierarchy cache.
# -----------------------------------------------------------------------------

# Setups kept per cache entry (several value sets of one operator, e.g. `vmap`
# over values or two operators used alternately); the oldest is dropped first.
_SLOTS_PER_ENTRY = 4
_ID_LIMIT = 2**31 - 1


@dataclass
class _Slot:
    values: np.ndarray
    prepared: _Prepared
    near_nullspace: np.ndarray | None = None

    def matches(self, values, near_nullspace) -> bool:
        if not np.array_equal(self.values, values):
            return False
        if near_nullspace is None or self.near_nullspace is None:
            return near_nullspace is None and self.near_nullspace is None
        return np.array_equal(self.near_nullspace, near_nullspace)


@dataclass
class _Entry:
    id: int
    key: tuple
    slots: OrderedDict = field(default_factory=OrderedDict)  # generation -> _Slot
    generation: int = 0
    setups: int = 0
    resetups: int = 0
    solves: int = 0
    hits: int = 0


_COUNTERS = (
    "hits", "misses", "setups", "resetups", "solves", "evictions", "compares",
    "token_hits",
)


class _Cache:
    def __init__(self, capacity: int):
        self.lock = threading.RLock()
        self.capacity = capacity
        self.slots = _SLOTS_PER_ENTRY
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.by_id: dict[int, _Entry] = {}
        self.ids = itertools.count(1)
        self.counters = dict.fromkeys(_COUNTERS, 0)

    def _new_id(self) -> int:
        return next(self.ids) % _ID_LIMIT or next(self.ids)

    def _evict(self):
        while len(self.entries) > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.by_id.pop(old.id, None)
            self.counters["evictions"] += 1

    def resize(self, capacity: int, slots: int | None):
        with self.lock:
            self.capacity = capacity
            if slots is not None:
                self.slots = slots
                for entry in self.entries.values():
                    while len(entry.slots) > slots:
                        entry.slots.popitem(last=False)
            self._evict()

    def clear(self):
        with self.lock:
            self.entries.clear()
            self.by_id.clear()

    def evict(self, ckey) -> bool:
        """Drop the entry of `ckey` (a failed solve: its state is unknown);
        whether there was one. Counted as an eviction."""
        with self.lock:
            entry = self.entries.pop(ckey, None)
            if entry is None:
                return False
            self.by_id.pop(entry.id, None)
            self.counters["evictions"] += 1
            return True

    def reset_counters(self):
        with self.lock:
            self.counters = dict.fromkeys(_COUNTERS, 0)

    def acquire(
        self, ckey, plan, pattern, values, mode, token=None, near_nullspace=None
    ):
        """The `(entry id, generation, prepared)` for these values (and
        near-null space): from the token, from an exact comparison, or from a
        (re)setup."""
        nns = near_nullspace
        with self.lock:
            c = self.counters
            if token is not None:
                entry = self.by_id.get(int(token[0]))
                gen = int(token[1])
                if entry is not None and entry.key == ckey and gen in entry.slots:
                    c["token_hits"] += 1
                    c["hits"] += 1
                    entry.hits += 1
                    entry.slots.move_to_end(gen)
                    self.entries.move_to_end(ckey)
                    return entry.id, gen, entry.slots[gen].prepared
            if self.capacity == 0:
                # Isolated mode: build for this call only, keep nothing.
                c["misses"] += 1
                c["setups"] += 1
                return -1, -1, _Prepared(plan, pattern, values, mode, nns)
            entry = self.entries.get(ckey)
            if entry is not None:
                self.entries.move_to_end(ckey)
                for gen in reversed(entry.slots):
                    c["compares"] += 1
                    if entry.slots[gen].matches(values, nns):
                        c["hits"] += 1
                        entry.hits += 1
                        entry.slots.move_to_end(gen)
                        return entry.id, gen, entry.slots[gen].prepared
                prepared = _Prepared(plan, pattern, values, mode, nns)
                c["resetups"] += 1
                entry.resetups += 1
            else:
                prepared = _Prepared(plan, pattern, values, mode, nns)
                c["misses"] += 1
                c["setups"] += 1
                entry = _Entry(self._new_id(), ckey)
                entry.setups += 1
                self.entries[ckey] = entry
                self.by_id[entry.id] = entry
                self._evict()
            entry.generation = (entry.generation + 1) % _ID_LIMIT
            entry.slots[entry.generation] = _Slot(
                np.array(values, copy=True),
                prepared,
                None if nns is None else np.array(nns, copy=True),
            )
            while len(entry.slots) > self.slots:
                entry.slots.popitem(last=False)
            return entry.id, entry.generation, prepared

    def holds(self, ckey, token) -> bool:
        """Whether `token` names a resident setup of the key `ckey`."""
        with self.lock:
            entry = self.by_id.get(int(token[0]))
            return (
                entry is not None and entry.key == ckey
                and int(token[1]) in entry.slots
            )

    def count_solve(self, entry_id: int):
        with self.lock:
            self.counters["solves"] += 1
            entry = self.by_id.get(entry_id)
            if entry is not None:
                entry.solves += 1

    def info(self) -> dict[str, Any]:
        with self.lock:
            entries = []
            for e in self.entries.values():
                fingerprint, block, mode, _, transposed, width = e.key
                entries.append(
                    dict(
                        id=e.id, fingerprint=fingerprint, block_size=block,
                        mode=mode, transposed=transposed, near_nullspace=width,
                        generation=e.generation,
                        resident_setups=len(e.slots), setups=e.setups,
                        resetups=e.resetups, solves=e.solves, hits=e.hits,
                    )
                )
            return dict(
                backend="pyamg", capacity=self.capacity,
                isolated=self.capacity == 0, size=len(self.entries),
                entries_per_key=self.slots,
                **self.counters, entries=entries,
            )


_cache = _Cache(8)


def cache_info() -> dict[str, Any]:
    """Counters of the CPU (pyamg) hierarchy cache.

    **Returns:**

    A dict with `backend="pyamg"`, `capacity`, `isolated` (capacity 0),
    `entries_per_key`, `size` (resident entries) and the counters `hits` (setups
    avoided), `misses` (keys not resident), `setups` (full setups of a new entry,
    or every build in isolated mode), `resetups` (rebuilds of a resident entry for
    new values), `solves`, `evictions`, `compares` (exact value comparisons made)
    and `token_hits` (solves whose token named a resident setup: no comparison at
    all); `entries` lists each resident entry with its block size, the number
    of near-null-space vectors it was set up with (`near_nullspace`, 0 for
    pyamg's default) and its own `setups`, `resetups`, `solves` and `hits`.
    """
    return _cache.info()


def clear_cache() -> None:
    """Drop every cached hierarchy. The counters are kept (see `reset_counters`)."""
    _cache.clear()


def reset_counters() -> None:
    """Zero the total counters (resident entries keep theirs)."""
    _cache.reset_counters()


def set_cache_size(n: int, entries_per_key: int | None = None) -> None:
    """Set how many entries (operator keys) the CPU cache keeps; the least
    recently used are evicted. `0` is isolated mode: every solve builds its own
    hierarchy and nothing is kept.

    **Arguments:**

    - `n`: the capacity, a non-negative integer (default 8; the package applies
        the environment variable `LINEAX_AMGX_CACHE_SIZE` on import).
    - `entries_per_key`: how many setups (value sets) of one key stay resident,
        so that operators used alternately, or `vmap` over values, do not rebuild
        (default 4; `None` keeps the current setting).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"The cache size must be >= 0, got {n}.")
    if entries_per_key is not None and int(entries_per_key) < 1:
        raise ValueError(f"entries_per_key must be >= 1, got {entries_per_key}.")
    _cache.resize(n, None if entries_per_key is None else int(entries_per_key))
