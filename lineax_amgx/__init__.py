# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""NVIDIA AmgX as a Lineax linear solver.

```python
import lineax as lx, lineax_amgx as lxa
A = lxa.CSROperator.from_scipy(K, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag))
x = lx.linear_solve(A, b, solver=lxa.AMGX()).value
```
"""

import importlib.metadata
import os as _os


def _native_missing(error: ImportError) -> ImportError:
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.exists(_os.path.join(here, "..", "pyproject.toml")):
        # `import lineax_amgx` found the repository's source folder (the current
        # directory comes first on sys.path), which holds no compiled core.
        return ImportError(
            f"lineax_amgx was imported from its source tree ({here}), which has no "
            "compiled core (lineax_amgx._backends._native): the source folder "
            "shadows the installed package. Run from another directory (after "
            "`pip install .`)."
        )
    return ImportError(
        "lineax_amgx's compiled core (lineax_amgx._backends._native) is missing or "
        f"broken ({error}); reinstall with `pip install .` (a C++17 compiler is all it "
        "needs)."
    )


try:  # the compiled core first: every layer reads its codes (csrc/codes.h)
    from ._backends import _native  # noqa: F401
except ImportError as _e:
    raise _native_missing(_e) from _e

from . import distributed as distributed  # noqa: E402
from ._backends.amgx._library import AmgXNotFoundError as AmgXNotFoundError  # noqa: E402
from ._backends.pyamg import PyamgTranslationWarning as PyamgTranslationWarning  # noqa: E402
from ._blocks import (  # noqa: E402
    NearNullspaceWarning as NearNullspaceWarning,
    rigid_body_modes as rigid_body_modes,
)
from ._cache import (  # noqa: E402
    cache_info as cache_info,
    clear_cache as clear_cache,
    finalize as finalize,
    reset_counters as reset_counters,
    set_cache_size as set_cache_size,
)
from ._checks import DenseOperatorWarning as DenseOperatorWarning  # noqa: E402
from ._config import ConfigError as ConfigError, configs as configs  # noqa: E402
from ._info import info as info  # noqa: E402
from ._null_space import (  # noqa: E402
    NullSpaceWarning as NullSpaceWarning,
    constant_null_space as constant_null_space,
)
from ._operator import CSROperator as CSROperator  # noqa: E402
from ._pattern import SparsityPattern as SparsityPattern  # noqa: E402
from ._preconditioner import (  # noqa: E402
    AMGXPreconditioned as AMGXPreconditioned,
    AMGXPreconditioner as AMGXPreconditioner,
)
from ._solver import AMGX as AMGX  # noqa: E402
from .distributed import (  # noqa: E402
    DistributedCSROperator as DistributedCSROperator,
    DistributedError as DistributedError,
    DistributedOrderError as DistributedOrderError,
    DistributedPattern as DistributedPattern,
    DistributedTimeoutError as DistributedTimeoutError,
    Layout as Layout,
)
from .matrix_free._coloring import Coloring as Coloring, color_columns as color_columns  # noqa: E402
from .matrix_free._sparsify import (  # noqa: E402
    SparsifiedOperator as SparsifiedOperator,
    as_csr_operator as as_csr_operator,
    sparsify as sparsify,
)
from .matrix_free._sparsity import detect_sparsity as detect_sparsity  # noqa: E402

__all__ = [
    "AMGX",
    "AMGXPreconditioned",
    "AMGXPreconditioner",
    "AmgXNotFoundError",
    "CSROperator",
    "Coloring",
    "ConfigError",
    "DenseOperatorWarning",
    "DistributedCSROperator",
    "DistributedError",
    "DistributedOrderError",
    "DistributedPattern",
    "DistributedTimeoutError",
    "Layout",
    "NearNullspaceWarning",
    "NullSpaceWarning",
    "PyamgTranslationWarning",
    "SparsifiedOperator",
    "SparsityPattern",
    "as_csr_operator",
    "cache_info",
    "clear_cache",
    "color_columns",
    "configs",
    "constant_null_space",
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

from ._cache import _apply_environment  # noqa: E402

_apply_environment()
del _apply_environment
