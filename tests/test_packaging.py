# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""What pyproject.toml declares agrees with the floor environment's pins
(.ci/constraints-floor.txt), and the installed package carries its licence and
its `py.typed` marker."""

import importlib.metadata
import importlib.resources
import os
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(ROOT, ".ci", "constraints-floor.txt")


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _declared():
    """Every requirement pyproject declares: build, runtime and extras."""
    meta = _pyproject()
    reqs = list(meta["build-system"]["requires"]) + list(
        meta["project"]["dependencies"]
    )
    for extra in meta["project"].get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def _floors():
    """name -> the version of its `>=` bound; one floor per name."""
    floors: dict[str, Version] = {}
    for req in _declared():
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{req}: declare exactly one '>=' floor"
        name = canonicalize_name(req.name)
        assert floors.setdefault(name, lows[0]) == lows[0], (
            f"{req.name} has two different floors in pyproject.toml: "
            f"{floors[name]} and {lows[0]}"
        )
    return floors


def _pins():
    pins: dict[str, Version] = {}
    with open(CONSTRAINTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", (
                f"{line!r}: the floor file pins with '==' only"
            )
            name = canonicalize_name(req.name)
            assert name not in pins, f"{req.name} is pinned twice"
            pins[name] = Version(specs[0].version)
    return pins


def test_floor_pins_equal_declared_floors():
    floors, pins = _floors(), _pins()
    assert set(floors) <= set(pins), (
        f"declared but not pinned in {CONSTRAINTS}: {sorted(set(floors) - set(pins))}"
    )
    assert set(pins) <= set(floors), (
        f"pinned but not declared in pyproject.toml: {sorted(set(pins) - set(floors))}"
    )
    wrong = {n: (str(floors[n]), str(pins[n])) for n in floors if floors[n] != pins[n]}
    assert not wrong, f"(declared floor, pin) disagree: {wrong}"


def test_requires_python_floor_is_the_floor_environment():
    spec = _pyproject()["project"]["requires-python"]
    assert spec == ">=3.11", spec
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        # The floor block checks that it runs on that Python.
        assert "sys.version_info[:2] == (3, 11)" in f.read()


def test_installed_package_has_license_and_py_typed():
    try:
        dist = importlib.metadata.distribution("lineax-amgx")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pytest.skip("lineax-amgx is not installed (tests use the installed package)")
    names = {p.name for p in dist.files or ()}
    assert "LICENSE" in names, sorted(names)
    lic = next(p for p in dist.files if p.name == "LICENSE")
    assert "Apache License" in lic.read_text() and "Version 2.0" in lic.read_text()
    assert importlib.resources.files("lineax_amgx").joinpath("py.typed").is_file()
    assert "License :: OSI Approved :: Apache Software License" in (
        dist.metadata.get_all("Classifier") or []
    )
