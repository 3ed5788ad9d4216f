# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""benchmarks/tune.py (the tuning sweep run on the device) cannot rot: every
variant is a valid AmgX config for every kind of preset (the package's parser),
and the script runs end to end on the CPU (pyamg) at a tiny size with each
section's measurements converged."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def tune():
    sys.path.insert(0, BENCH)
    try:
        import tune

        yield tune
    finally:
        sys.path.remove(BENCH)


def test_every_variant_is_a_valid_config(tune):
    from lineax_amgx import _config

    tune.check_variants(tune.VARIANTS)
    cfg, kwargs = tune.variant_config("srl-all")
    assert cfg["solver"]["preconditioner"]["structure_reuse_levels"] == -1
    vc, _ = tune.variant_config("nos", vcycle=True)
    assert vc["solver"]["solver"] == "AMG" and vc["solver"]["max_iters"] == 1
    assert vc["solver"]["coarse_solver"] == "NOSOLVER"
    # a misspelt key is caught on the CPU, before any device time is spent
    with pytest.raises(_config.ConfigError, match="structure_reuse_level"):
        tune.variant_config('+{"structure_reuse_level": 1}')


def _run(out, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "tune.py"), "--cpu-smoke", "--out",
         str(out), *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "tune.jsonl")) as f:
        return [json.loads(line) for line in f], proc.stdout


def test_cpu_smoke_runs_every_section(tmp_path):
    rows, stdout = _run(
        tmp_path, "--variants", "default", "nos", "--seq-variants", "srl-all",
        "--seq-steps", "2", "--hard-problems", "contrast3d-checker",
        "--hard-variants", "default", "@top1", "--gridstats-variants", "default",
    )
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    by = {(r["section"], r["variant"]) for r in rows}
    assert by == {("a", "default"), ("a", "nos"), ("a", "lx-cg-mf"),
                  ("b", "default"), ("b", "nos"), ("c", "srl-all"),
                  ("c", "lx-cg-mf"), ("d", "default"), ("d", "nos")}, by
    for r in rows:
        if r["section"] in ("a", "c", "d"):
            assert r["converged"] and r["rel_residual"] <= 10 * r["rtol"], r
        if r["section"] in ("a", "d"):
            assert r["iterations"] > 0 and r["solve_s"] > 0, r
        if r["section"] == "b":
            # one cycle of a convergent multigrid reduces the residual
            assert 0 < r["residual_reduction"] < 0.5, r
        if r["section"] == "c":
            assert len(r["iterations"]) == 2 and len(r["step_s"]) == 2, r
    (grid,) = [r for r in rows if r.get("gridstats_file")]
    assert grid["variant"] == "default"
    assert "# ---- summary ----" in stdout


def test_budget_skips_what_does_not_fit(tmp_path):
    rows, stdout = _run(tmp_path, "--device-budget", "1", "--variants", "default",
                        "--sections", "a", "d", "--hard-problems", "aniso3d")
    assert rows and all("budget" in r["skipped"] for r in rows), rows
    assert "SKIPPED" in stdout
