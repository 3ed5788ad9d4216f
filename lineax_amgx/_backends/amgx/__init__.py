# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The GPU backend: AmgX loaded at run time, reached through XLA FFI handlers."""
