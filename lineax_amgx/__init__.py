# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""NVIDIA AmgX as a Lineax linear solver.

```python
import lineax as lx, lineax_amgx as lxa
A = lxa.CSROperator.from_scipy(K, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag))
x = lx.linear_solve(A, b, solver=lxa.AMGX()).value
```
"""

import importlib.metadata

from . import distributed as distributed
from ._backends.amgx._library import AmgXNotFoundError as AmgXNotFoundError
from ._backends.pyamg import PyamgTranslationWarning as PyamgTranslationWarning
from ._blocks import (
    NearNullspaceWarning as NearNullspaceWarning,
    rigid_body_modes as rigid_body_modes,
)
from ._cache import (
    cache_info as cache_info,
    clear_cache as clear_cache,
    finalize as finalize,
    reset_counters as reset_counters,
    set_cache_size as set_cache_size,
)
from ._config import ConfigError as ConfigError, configs as configs
from ._info import info as info
from ._operator import CSROperator as CSROperator
from ._pattern import SparsityPattern as SparsityPattern
from ._preconditioner import (
    AMGXPreconditioned as AMGXPreconditioned,
    AMGXPreconditioner as AMGXPreconditioner,
)
from ._solver import AMGX as AMGX
from .distributed import (
    DistributedCSROperator as DistributedCSROperator,
    DistributedError as DistributedError,
    DistributedOrderError as DistributedOrderError,
    DistributedPattern as DistributedPattern,
    DistributedTimeoutError as DistributedTimeoutError,
    Layout as Layout,
)
from .matrix_free._coloring import Coloring as Coloring, color_columns as color_columns
from .matrix_free._sparsify import (
    SparsifiedOperator as SparsifiedOperator,
    as_csr_operator as as_csr_operator,
    sparsify as sparsify,
)
from .matrix_free._sparsity import detect_sparsity as detect_sparsity

__all__ = [
    "AMGX",
    "AMGXPreconditioned",
    "AMGXPreconditioner",
    "AmgXNotFoundError",
    "CSROperator",
    "Coloring",
    "ConfigError",
    "DistributedCSROperator",
    "DistributedError",
    "DistributedOrderError",
    "DistributedPattern",
    "DistributedTimeoutError",
    "Layout",
    "NearNullspaceWarning",
    "PyamgTranslationWarning",
    "SparsifiedOperator",
    "SparsityPattern",
    "as_csr_operator",
    "cache_info",
    "clear_cache",
    "color_columns",
    "configs",
    "detect_sparsity",
    "distributed",
    "finalize",
    "info",
    "reset_counters",
    "rigid_body_modes",
    "set_cache_size",
    "sparsify",
]

try:
    __version__ = importlib.metadata.version("lineax-amgx")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

from ._cache import _apply_environment

_apply_environment()
del _apply_environment
