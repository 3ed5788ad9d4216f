# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""Jacobian sparsity detection by index-set propagation through jaxprs."""

from ._api import (
    clear_detection_cache as clear_detection_cache,
    detect_closed_jaxpr as detect_closed_jaxpr,
    detect_sparsity as detect_sparsity,
    detection_count as detection_count,
    probe_closed_jaxpr as probe_closed_jaxpr,
    trace_closed_jaxpr as trace_closed_jaxpr,
)
from ._values import Unsupported as Unsupported
