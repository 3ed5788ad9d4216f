# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The config is parsed and validated once per solver construction: neither
`init` nor `compute` parses it again."""

import collections
import json
import types

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse.linalg as spla
from helpers import poisson2d, rel_err

import lineax_amgx as lxa
from lineax_amgx import _config

jax.config.update("jax_enable_x64", True)

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


@pytest.fixture
def counts(monkeypatch):
    """Counts the calls of `_config.parse_config` and of `json.loads` inside
    `_config` (only there: the `json` module itself is left alone)."""
    counts = collections.Counter()

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(_config, "parse_config",
                        counting("parse", _config.parse_config))
    fake_json = types.SimpleNamespace(
        loads=counting("loads", json.loads), dumps=json.dumps,
        JSONDecodeError=json.JSONDecodeError,
    )
    monkeypatch.setattr(_config, "json", fake_json)
    return counts


def _problem():
    A = poisson2d(12)
    b = np.random.default_rng(0).standard_normal(A.shape[0])
    return A, lxa.CSROperator.from_scipy(A, tags=SPD), jnp.asarray(b)


# A user config as JSON text: parsing it is one `json.loads`.
USER_CONFIG = json.dumps(lxa.configs["PCG_AGGREGATION"])


def test_amgx_parses_its_config_once(counts):
    A, op, b = _problem()
    solver = lxa.AMGX(USER_CONFIG, rtol=1e-10, backend="pyamg")
    state = solver.init(op, {})
    x, result, _ = solver.compute(state, b, {})
    x2 = lx.linear_solve(op, b, solver=solver).value  # init + compute again
    assert result == lx.RESULTS.successful
    assert rel_err(x, spla.spsolve(A.tocsc(), np.asarray(b))) < 1e-8
    assert rel_err(x2, x) < 1e-12
    assert counts == {"parse": 1, "loads": 1}


def test_amgx_preset_is_parsed_once_per_process(counts):
    _config.preset.cache_clear()
    A, op, b = _problem()
    for _ in range(2):
        solver = lxa.AMGX(rtol=1e-10, backend="pyamg")  # preset chosen by tags
        x = lx.linear_solve(op, b, solver=solver).value
    assert rel_err(x, spla.spsolve(A.tocsc(), np.asarray(b))) < 1e-8
    assert counts == {"parse": 1}  # deep copies of the preset: no JSON


def test_preconditioner_parses_its_config_once(counts):
    A, op, b = _problem()
    cycle = json.dumps(lxa.configs["AMG_VCYCLE"])
    P = lxa.AMGXPreconditioner(op, cycle, backend="pyamg")
    y = P.mv(b)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert counts == {"parse": 1, "loads": 1}


def test_preconditioned_solver_parses_its_config_once(counts):
    A, op, b = _problem()
    cycle = json.dumps(lxa.configs["AMG_VCYCLE"])
    solver = lxa.AMGXPreconditioned(
        lx.GMRES(rtol=1e-10, atol=1e-10, restart=20), cycle, backend="pyamg"
    )
    x = lx.linear_solve(op, b, solver=solver).value
    x = lx.linear_solve(op, b, solver=solver).value  # a second init + compute
    assert rel_err(x, spla.spsolve(A.tocsc(), np.asarray(b))) < 1e-8
    assert counts == {"parse": 1, "loads": 1}


def test_tolerance_mapping_has_both_halves():
    """`Tolerances` scales `b` by `atol + rtol ||b||`; the finalised config
    stops at AmgX's ABSOLUTE 1.0 (the same object decides both)."""
    resolved = _config.resolve("PCG_AGGREGATION")
    tol = resolved.tolerances(1e-6, 1e-3)
    assert tol.scaled
    assert float(tol.scale(jnp.float64(2.0), jnp.float64)) == pytest.approx(
        1e-3 + 2e-6)
    final = json.loads(resolved.finalise(tol, max_steps=None, verbose=False))
    assert final["solver"]["convergence"] == "ABSOLUTE"
    assert final["solver"]["tolerance"] == 1.0
    own = dict(lxa.configs["PCG_AGGREGATION"])
    own["solver"] = dict(own["solver"], tolerance=1e-4, convergence="RELATIVE_INI")
    native = _config.resolve(own).tolerances(None, None)
    assert not native.scaled
    assert float(native.scale(jnp.float64(5.0), jnp.float64)) == 1.0
    final = json.loads(_config.resolve(own).finalise(native, max_steps=None,
                                                     verbose=False))
    assert final["solver"]["convergence"] == "RELATIVE_INI"
    assert final["solver"]["tolerance"] == 1e-4


@pytest.mark.parametrize("key", sorted(_config._RESOURCE_KEYS))
@pytest.mark.parametrize("where", ["top", "solver", "preconditioner"])
def test_resource_settings_are_refused_in_every_scope(key, where):
    """AmgX reads its resource settings (communicator, memory pools, streams) from
    the resources object the package shares, never from a solver config: in any
    scope they are refused, so no backend (the pyamg translation included) ever
    sees one."""
    value = "MPI" if key == "communicator" else 1
    cfg = {"config_version": 2, "solver": {
        "solver": "PCG", "preconditioner": {"solver": "AMG"}}}
    scope = {"top": cfg, "solver": cfg["solver"],
             "preconditioner": cfg["solver"]["preconditioner"]}[where]
    scope[key] = value
    with pytest.raises(lxa.ConfigError, match=f"{key!r} is a setting of AmgX's "
                       "resources"):
        lxa.AMGX(cfg)
