# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The CPU backend: AmgX configurations translated to pyamg, solved on the host."""
