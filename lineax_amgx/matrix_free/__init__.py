# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Matrix-free operators: sparsity detection, column coloring, compressed assembly.

The public names are re-exported by `lineax_amgx` (`sparsify`, `detect_sparsity`,
`color_columns`, ...); the modules here are private.
"""

from ._sparsify import as_csr_operator as as_csr_operator
