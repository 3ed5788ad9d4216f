# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Warnings given once per process (one mechanism for the whole package)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable

_lock = threading.Lock()
_warned: set[Hashable] = set()


def warn_once(
    token: Hashable, message: str, category: type[Warning], stacklevel: int = 2
) -> None:
    """Warn with `message` unless a warning with this `token` was given before in
    this process (`stacklevel` counts from the caller of `warn_once`)."""
    with _lock:
        if token in _warned:
            return
        _warned.add(token)
    warnings.warn(message, category, stacklevel=stacklevel + 1)


def forget(token: Hashable) -> None:
    """Let the warning with `token` be given again (for tests)."""
    with _lock:
        _warned.discard(token)
