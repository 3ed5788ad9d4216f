# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The GPU backend: AmgX loaded at run time (`_library`), reached through the XLA
FFI handlers of the native core (`_ffi`). The native core also serves the runtime
arrays of every backend (`_runtime_arrays`: the lowering of
`lineax_amgx._runtime_arrays`)."""

from ..._pattern import SparsityPattern
from .. import contract
from . import _ffi, _runtime_arrays  # noqa: F401 - the lowering of runtime arrays

contract.register("amgx", SparsityPattern, _ffi)
