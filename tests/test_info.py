# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""`lineax_amgx.info()`: a dict for programs (versions of the stack, AmgX, devices,
the backend a solve would use) that prints as a readable report."""

import json

import equinox
import jax
import jaxlib
import lineax
import numpy
import pyamg
import scipy

import lineax_amgx as lxa


def test_info_versions_match_the_modules():
    info = lxa.info()
    assert isinstance(info, dict)
    v = info["versions"]
    # Reference: the modules' own version attributes (info reads the metadata).
    assert v["jax"] == jax.__version__
    assert v["jaxlib"] == jaxlib.__version__
    assert v["equinox"] == equinox.__version__
    assert v["pyamg"] == pyamg.__version__
    assert v["numpy"] == numpy.__version__
    assert v["scipy"] == scipy.__version__
    assert v["lineax"] == getattr(lineax, "__version__", v["lineax"])
    assert v["lineax_amgx"] == lxa.__version__
    if info["amgx"]["loaded"]:
        assert v["amgx"] not in ("", "not loaded")
    else:
        assert v["amgx"] == "not loaded"
        assert info["amgx"]["error"]


def test_info_keys_and_backend():
    info = lxa.info()
    for key in ("versions", "amgx", "cuda_devices", "jax_devices", "default_backend"):
        assert key in info, key
    assert info["jax_devices"] == [str(d) for d in jax.devices()]
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    assert info["default_backend"] == ("amgx" if on_gpu else "pyamg")
    json.dumps(info)  # plain data, for programs and bug reports


def test_info_prints_readably(capsys):
    info = lxa.info(verbose=True)
    printed = capsys.readouterr().out
    text = str(info)
    assert printed.strip() == text.strip()
    assert text.startswith(f"lineax-amgx {lxa.__version__}")
    assert f"jax {jax.__version__}" in text
    assert f"pyamg {pyamg.__version__}" in text
    assert "AmgX: " in text and "JAX devices: " in text
    assert f"uses: {info['default_backend']}" in text
    # One line per fact, none of them the raw dict.
    assert "{" not in text and len(text.splitlines()) >= 6
    # repr stays the dict's (programs, logs).
    assert repr(info).startswith("{'versions'")
    assert lxa.info() == dict(info) and not capsys.readouterr().out
