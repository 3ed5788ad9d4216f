# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Deprecated: use the public [`lineax_amgx.distributed`][] package.

`from lineax_amgx import _distributed` keeps working for one release: attribute
access is forwarded to `lineax_amgx.distributed`, with a `DeprecationWarning` on
import.
"""

import warnings

from . import distributed as _distributed

warnings.warn(
    "lineax_amgx._distributed is deprecated and will be removed in the next "
    "release: import lineax_amgx.distributed instead (the same names).",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    return getattr(_distributed, name)


def __dir__():
    return list(_distributed.__all__)
