# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The native module without a GPU: the codes it exports (csrc/codes.h) against
AmgX's documented values and against what its own functions report, and the
Python side reading them instead of repeating them. (Its type stub is checked by
`python -m mypy.stubtest lineax_amgx._backends._native` in CI.)"""

import numpy as np
import pytest

from lineax_amgx._backends import _native, contract
from lineax_amgx._backends.amgx import _library


def test_solve_status_codes_are_amgx_s_and_one_of_ours():
    # amgx_c.h: AMGX_SOLVE_SUCCESS = 0, AMGX_SOLVE_FAILED = 1,
    # AMGX_SOLVE_DIVERGED = 2, AMGX_SOLVE_NOT_CONVERGED = 3.
    assert (_native.STATUS_SUCCESS, _native.STATUS_FAILED, _native.STATUS_DIVERGED,
            _native.STATUS_NOT_CONVERGED) == (0, 1, 2, 3)
    assert _native.STATUS_NONFINITE not in (0, 1, 2, 3)


def test_modes_are_amgx_s_and_their_sizes_follow_the_names():
    # amgx_config.h: AMGX_mode_dDDI = 8193, AMGX_mode_dDFI = 8449,
    # AMGX_mode_dFFI = 8465 (as its comments say), and the complex modes
    # AMGX_ASSEMBLE_MODE(device, vec, mat, int) with AMGX_ScalarPrecision
    # double 0, float 1, int 2, doublecomplex 3, complex 4 and the bases
    # memory 1, vector 16, matrix 16 * 16, index 16 * 16 * 16.
    precision = {"D": 0, "F": 1, "Z": 3, "C": 4}

    def assemble(vec, mat):
        return 1 + precision[vec] * 16 + precision[mat] * 256 + 2 * 4096

    assert _native.MODES == {
        "dDDI": 8193, "dDFI": 8449, "dFFI": 8465, "dZZI": 9009, "dCCI": 9281,
    }
    for name, code in _native.MODES.items():
        assert code == assemble(name[1], name[2])
    # AmgX's mode names: memory space, then vector, matrix and index precision.
    size = {"D": np.dtype(np.float64).itemsize, "F": np.dtype(np.float32).itemsize,
            "Z": np.dtype(np.complex128).itemsize,
            "C": np.dtype(np.complex64).itemsize}
    for name in _native.MODES:
        assert _native.MODE_VECTOR_BYTES[name] == size[name[1]]
        assert _native.MODE_MATRIX_BYTES[name] == size[name[2]]


def test_python_reads_the_codes_from_the_native_module():
    assert _library.codes is _native
    for name in ("SUCCESS", "FAILED", "DIVERGED", "NOT_CONVERGED", "NONFINITE"):
        assert contract.Status[name] == getattr(_native, f"STATUS_{name}")
    assert contract.MODES == _native.MODES


def test_ffi_targets_are_the_registered_handlers():
    assert set(_native.FFI_TARGETS) == {"setup", "solve", "dist_setup", "dist_solve"}
    assert set(_native.registrations()) == set(_native.FFI_TARGETS.values())


def test_counter_names_are_what_cache_info_reports():
    info = _native.cache_info()
    assert set(_native.COUNTER_NAMES) <= set(info)
    assert set(_native.COUNTER_NAMES) <= set(_native.dist_cache_info())
    assert len(set(_native.COUNTER_NAMES)) == len(_native.COUNTER_NAMES)


def test_resetup_modes_are_the_ones_set_resetup_mode_takes():
    before = _native.cache_info()["resetup_mode"]
    assert before in _native.RESETUP_MODES
    try:
        for mode in _native.RESETUP_MODES:
            _native.set_resetup_mode(mode)
            assert _native.cache_info()["resetup_mode"] == mode
        with pytest.raises(ValueError, match="resetup mode must be"):
            _native.set_resetup_mode("sometimes")
    finally:
        _native.set_resetup_mode(before)


def test_probe_outcomes_order_hit_below_resetup_below_setup():
    # The ranks agree on the maximum of their probes: the worst outcome wins.
    assert _native.PROBE_HIT < _native.PROBE_RESETUP < _native.PROBE_SETUP


def test_block_size_limit_is_defined_once():
    """The GPU's block-size limit lives in csrc/codes.h (the native core's refusal
    states it: tests/test_blocks.py); the model layer's error for blocks
    beyond the CPU's limit does not repeat the number."""
    import re

    from lineax_amgx._blocks import MAX_BLOCK_SIZE, check_block_size

    limit = _native.MAX_GPU_BLOCK_SIZE
    assert 1 <= limit < MAX_BLOCK_SIZE
    with pytest.raises(ValueError, match="fewer on the GPU") as e:
        check_block_size(MAX_BLOCK_SIZE + 1)
    assert not re.search(rf"\b{limit}\b", str(e.value))
