"""Run Lineax's own tests with lineax_amgx.AMGX among Lineax's solvers.

Lineax's tests parametrise over the solvers in `solvers_tags_pseudoinverse`
(tests/helpers.py of github:patrick-kidger/lineax). This script copies a Lineax
checkout's `tests/` into a temporary directory, appends to the copy's conftest.py
a few lines that add

    (lxa.AMGX(rtol=tol, atol=tol), (), False)                            untagged
    (lxa.AMGX(rtol=tol, atol=tol), lx.positive_semidefinite_tag, False)  PSD-tagged
    (lxa.AMGX(rtol=tol, atol=tol), lx.symmetric_tag, False)              symmetric

to that list at run time (before the test modules are imported, so that their
`parametrize` decorators see them), keeps only the AMGX cases (unless
--all-solvers), runs pytest on the chosen files and prints the pass/fail counts
per file and dtype. Nothing of Lineax's code is kept in this repository; CI
cannot fetch, so the checkout's path is an argument.

    python tools/run_lineax_suite.py /tmp/lineax-src            # the four files
    python tools/run_lineax_suite.py /tmp/lineax-src -k complex128 -x
    python tools/run_lineax_suite.py /tmp/lineax-src --json result.json

Run it with the Python environment that has lineax_amgx, lineax and pytest
(the script uses its own interpreter; `-n N` needs pytest-xdist). Lineax's tests
turn on float64 and JAX's strict dtype promotion in their conftest.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

DEFAULT_FILES = ("test_solve", "test_jvp", "test_vmap", "test_well_posed")

# Appended to the copied tests/conftest.py (our code, run inside Lineax's tests).
_CONFTEST_ADDITION = '''

# ---- added by lineax-amgx's tools/run_lineax_suite.py ---------------------------
import json as _lxa_json
import os as _lxa_os

import lineax as _lxa_lx
import lineax_amgx as _lxa

from . import helpers as _lxa_helpers

_lxa_tol = _lxa_helpers.tol
_LXA_ENTRIES = [
    (_lxa.AMGX(rtol=_lxa_tol, atol=_lxa_tol), (), False),
    (_lxa.AMGX(rtol=_lxa_tol, atol=_lxa_tol), _lxa_lx.positive_semidefinite_tag, False),
    (_lxa.AMGX(rtol=_lxa_tol, atol=_lxa_tol), _lxa_lx.symmetric_tag, False),
]
_lxa_helpers.solvers_tags_pseudoinverse.extend(_LXA_ENTRIES)
# The lists Lineax derives from it at import, updated in place.
_lxa_helpers.solvers_tags[:] = [(a, b) for a, b, _ in
                                _lxa_helpers.solvers_tags_pseudoinverse]
_lxa_helpers.solvers[:] = [a for a, _, _ in _lxa_helpers.solvers_tags_pseudoinverse]
_lxa_helpers.pseudosolvers_tags[:] = [
    (a, b) for a, b, c in _lxa_helpers.solvers_tags_pseudoinverse if c
]
_LXA_ONLY = _lxa_os.environ.get("LXA_SUITE_ONLY_AMGX", "1") == "1"
_LXA_REPORT = _lxa_os.environ.get("LXA_SUITE_REPORT")


def _lxa_is_amgx(value):
    return isinstance(value, _lxa.AMGX)


def _lxa_dtype(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    dtype = params.get("dtype")
    if dtype is None:
        return "no dtype parameter"
    return getattr(dtype, "__name__", None) or getattr(dtype, "name", str(dtype))


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        amgx = any(_lxa_is_amgx(v) for v in params.values())
        if amgx or not _LXA_ONLY:
            item.user_properties.append(("lxa_dtype", _lxa_dtype(item)))
            item.user_properties.append(("lxa_amgx", amgx))
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report):
    if _LXA_REPORT is None:
        return
    if report.when == "call" or report.outcome != "passed":
        props = dict(report.user_properties)
        with open(_LXA_REPORT, "a") as f:
            f.write(_lxa_json.dumps(dict(
                nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                dtype=props.get("lxa_dtype", "?"), amgx=props.get("lxa_amgx"),
                message=(report.longreprtext.strip().splitlines() or [""])[-1][:300]
                if report.outcome == "failed" else "",
            )) + "\\n")
'''


def _lineax_commit(path: str, given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --commit)"


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lineax", help="path of a Lineax checkout (with tests/)")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES),
                        help="test files (without .py)")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="pytest -k expression")
    parser.add_argument("-x", dest="exitfirst", action="store_true")
    parser.add_argument("-n", dest="workers", default=None,
                        help="pytest-xdist workers (ignored without xdist)")
    parser.add_argument("--all-solvers", action="store_true",
                        help="also run Lineax's own solvers' cases")
    parser.add_argument("--commit", default=None,
                        help="the checkout's commit (read with git if omitted)")
    parser.add_argument("--json", default=None, help="write every outcome here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory")
    args = parser.parse_args()

    src = os.path.join(os.path.abspath(args.lineax), "tests")
    if not os.path.isfile(os.path.join(src, "helpers.py")):
        parser.error(f"{src} is not Lineax's tests directory (no helpers.py)")
    tmp = tempfile.mkdtemp(prefix="lineax-suite-")
    try:
        dst = os.path.join(tmp, "tests")
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        with open(os.path.join(dst, "conftest.py"), "a") as f:
            f.write(_CONFTEST_ADDITION)
        report = os.path.join(tmp, "report.jsonl")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", "--rootdir", tmp, "-W", "ignore::DeprecationWarning"]
        cmd += [os.path.join("tests", f"{name}.py") for name in args.files]
        if args.keyword:
            cmd += ["-k", args.keyword]
        if args.exitfirst:
            cmd += ["-x"]
        if args.workers is not None:
            if _has_xdist():
                cmd += ["-n", str(args.workers)]
            else:
                print("(pytest-xdist is not installed: -n ignored)")
        env = dict(os.environ, LXA_SUITE_REPORT=report,
                   LXA_SUITE_ONLY_AMGX="0" if args.all_solvers else "1")
        commit = _lineax_commit(args.lineax, args.commit)
        print(f"Lineax tests from {args.lineax} (commit {commit}); {' '.join(cmd)}",
              flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=tmp, env=env).returncode
        seconds = time.perf_counter() - t0
        rows = []
        if os.path.exists(report):
            with open(report) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        _print_counts(rows, seconds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(commit=commit, files=args.files, keyword=args.keyword,
                               seconds=round(seconds, 1), outcomes=rows), f, indent=1)
        return rc
    finally:
        if args.keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _print_counts(rows, seconds: float) -> None:
    """Counts per (file, dtype) and in total: a test counts once, by its worst
    phase (an error in setup or teardown is an error)."""
    final: dict[str, tuple[str, str]] = {}
    for r in rows:
        outcome = r["outcome"] if r["when"] == "call" else (
            "error" if r["outcome"] == "failed" else r["outcome"])
        prev = final.get(r["nodeid"])
        if prev is None or prev[1] == "passed":
            final[r["nodeid"]] = (r["dtype"], outcome)
    table: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter)
    for nodeid, (dtype, outcome) in final.items():
        name = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        table[(name, dtype)][outcome] += 1
        table[("all", dtype)][outcome] += 1
    kinds = ("passed", "failed", "error", "skipped")
    print(f"\n{'file':<18} {'dtype':<20} " + " ".join(f"{k:>8}" for k in kinds))
    for (name, dtype), counts in sorted(table.items(),
                                        key=lambda kv: (kv[0][0] == "all", kv[0])):
        print(f"{name:<18} {dtype:<20} " + " ".join(f"{counts[k]:>8}" for k in kinds))
    print(f"({len(final)} tests in {seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
