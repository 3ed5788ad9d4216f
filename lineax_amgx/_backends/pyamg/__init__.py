# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The CPU backend: AmgX configurations translated to pyamg, solved on the host.

Modules: `_translate` (AmgX config -> pyamg plan), `_build` (a plan and a matrix
-> a ready solver), `_cache` (the hierarchy cache), `_backend` (the entry points
of the backend contract, as host callbacks).
"""

from ..._pattern import SparsityPattern
from .. import contract
from . import _backend
from ._backend import Host as Host, setup as setup, solve as solve
from ._cache import (
    cache_info as cache_info,
    clear_cache as clear_cache,
    reset_counters as reset_counters,
    set_cache_size as set_cache_size,
)
from ._translate import (
    PyamgTranslationWarning as PyamgTranslationWarning,
    translate as translate,
)

contract.register("pyamg", SparsityPattern, _backend)
