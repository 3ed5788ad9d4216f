# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Backends: AmgX on CUDA devices (`amgx/`), pyamg on the host (`pyamg/`)."""
