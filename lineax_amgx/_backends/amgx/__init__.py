# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The GPU backend: AmgX loaded at run time (`_library`), reached through the XLA
FFI handlers of the native core (`_ffi`)."""

from ..._pattern import SparsityPattern
from .. import contract
from . import _ffi

contract.register("amgx", SparsityPattern, _ffi)
