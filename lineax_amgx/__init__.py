# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""NVIDIA AmgX as a Lineax linear solver.

```python
import lineax as lx, lineax_amgx as lxa
A = lxa.CSROperator.from_scipy(K, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag))
x = lx.linear_solve(A, b, solver=lxa.AMGX()).value
```
"""

import importlib.metadata

from ._cache import (
    cache_info as cache_info,
)
from ._cache import (
    clear_cache as clear_cache,
)
from ._cache import (
    finalize as finalize,
)
from ._cache import (
    reset_counters as reset_counters,
)
from ._cache import (
    set_cache_size as set_cache_size,
)
from ._config import ConfigError as ConfigError
from ._config import configs as configs
from ._info import info as info
from ._library import AmgXNotFoundError as AmgXNotFoundError
from ._operator import CSROperator as CSROperator
from ._pattern import SparsityPattern as SparsityPattern
from ._preconditioner import (
    AMGXPreconditioned as AMGXPreconditioned,
    AMGXPreconditioner as AMGXPreconditioner,
)
from ._solver import AMGX as AMGX

try:
    from ._coloring import Coloring as Coloring
    from ._coloring import color_columns as color_columns
    from ._sparsify import sparsify as sparsify
    from ._sparsity import detect_sparsity as detect_sparsity
except ImportError:  # pragma: no cover - while the matrix-free modules are built
    pass

try:
    __version__ = importlib.metadata.version("lineax-amgx")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

from ._cache import _apply_environment

_apply_environment()
del _apply_environment
