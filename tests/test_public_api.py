# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The public face: `__all__` lists what exists, the distributed package is public,
and the old private module path still works for a release, with a warning."""

import importlib
import sys

import pytest

import lineax_amgx as lxa
import lineax_amgx.distributed as lxd


def test_all_names_exist():
    for module in (lxa, lxd):
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert missing == [], (module.__name__, missing)
    assert lxa.distributed is lxd


def test_errors_and_warnings_are_public():
    assert issubclass(lxa.PyamgTranslationWarning, UserWarning)
    assert issubclass(lxa.DistributedError, ValueError)
    for exc in (lxa.DistributedOrderError, lxa.DistributedTimeoutError):
        assert issubclass(exc, RuntimeError)
    assert lxd.DistributedError is lxa.DistributedError


def test_private_distributed_module_is_a_deprecated_alias():
    sys.modules.pop("lineax_amgx._distributed", None)
    with pytest.warns(DeprecationWarning, match="lineax_amgx.distributed"):
        old = importlib.import_module("lineax_amgx._distributed")
    assert old.Layout is lxd.Layout
    assert old.gather_vector is lxd.gather_vector
    assert old.DistributedError is lxd.DistributedError
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018
