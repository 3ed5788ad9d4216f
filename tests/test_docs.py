# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""The documentation site (`mkdocs.yml`, `docs/`).

- Every ```python block of the index and the user guide runs on the CPU, page by
  page in order, and prints exactly its ```text "Output" block; the blocks that
  need a GPU or several MPI ranks (a `# needs:` first line) are listed below.
- No user-guide page mentions issues, sessions or people.
- The example pages come from running the current examples at a small size: a
  figure from an older example (or none) makes this test run them again.
- `mkdocs build --strict` passes (no warning: no broken reference, no missing
  page) and its `objects.inv` holds every public name of `lineax_amgx` and
  `lineax_amgx.distributed` (decoded with zlib, a different reader than
  mkdocstrings' own).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
sys.path.insert(0, DOCS)
import _gen_examples  # noqa: E402
import _snippets  # noqa: E402

sys.path.remove(DOCS)

GUIDE_PAGES = ["index.md"] + sorted(
    os.path.relpath(p, DOCS) for p in glob.glob(os.path.join(DOCS, "guide", "*.md"))
)

# Blocks that are not run, with why: (page, the `# needs:` line).
NOT_RUN = {
    # A complete multi-GPU script: one MPI rank per GPU, AmgX's distributed solve.
    ("guide/distributed.md", "mpi and GPUs (solve.py: mpiexec -n 4 python solve.py)"),
    # Gradient of a distributed solve: continues the multi-rank script above.
    ("guide/distributed.md", "mpi (continues the example above)"),
    # A complete matrix-free Newton script (run under mpiexec -n 2 and 3 by
    # tests/test_distributed_jacobian.py).
    ("guide/distributed.md", "mpi (bratu.py: mpiexec -n 2 python bratu.py)"),
    # shard_map under jax.distributed: one JAX process per MPI rank.
    ("guide/distributed.md", "mpi under jax.distributed (continues the example above)"),
    # info() on a machine with AmgX and a GPU: shows AmgX's version and path.
    ("guide/installing-amgx.md", "gpu (a CUDA device and AmgX)"),
}


def _blocks(page):
    return _snippets.extract(os.path.join(DOCS, page))


def test_guide_pages_exist():
    assert "guide/solving.md" in GUIDE_PAGES and len(GUIDE_PAGES) >= 13


def test_blocks_not_run_are_listed():
    found = {
        (page, b["needs"])
        for page in GUIDE_PAGES
        for b in _blocks(page)
        if b["lang"] == "python" and b["needs"] is not None
    }
    assert found == NOT_RUN


@pytest.mark.parametrize("page", GUIDE_PAGES)
def test_python_blocks_run_on_cpu(page, tmp_path):
    blocks = _blocks(page)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)  # the installed package, not the source tree
    proc = subprocess.run(
        [sys.executable, os.path.join(DOCS, "_snippets.py"), os.path.join(DOCS, page)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout.rsplit("@@SNIPPETS@@", 1)[1])
    for r in records:
        assert r["error"] is None, f"{page}:{r['line']}\n{r['error']}"
    python = [b for b in blocks if b["lang"] == "python"]
    assert len(records) == len(python)
    # An "Output" block right after a python block is what it prints.
    by_line = {r["line"]: r for r in records}
    checked = 0
    for b, nxt in zip(blocks, blocks[1:]):
        if b["lang"] == "python" and nxt["title"] == "Output":
            assert b["needs"] is None, f"{page}:{b['line']}: output of a block not run"
            got = by_line[b["line"]]["stdout"]
            assert got.rstrip("\n") == nxt["code"].rstrip("\n"), (
                f"{page}:{b['line']} printed\n{got}\nbut the page shows\n{nxt['code']}"
            )
            checked += 1
    assert all(b["title"] != "Output" or i > 0 for i, b in enumerate(blocks))
    if page == "index.md":
        assert checked >= 1  # the quickstart shows its output


_FORBIDDEN = [
    (re.compile(r"\bsessions?\b", re.I), "a session"),
    (re.compile(r"\bissues? *#? *\d+", re.I), "an issue number"),
    (re.compile(r"(?<![\w/])#\d+\b"), "an issue number"),
    (re.compile(r"\b(?:the lead|reviewers?|edited by|written by)\b", re.I), "people"),
]


@pytest.mark.parametrize("page", GUIDE_PAGES + ["benchmarks.md"])
def test_user_pages_do_not_mention_issues_sessions_or_people(page):
    text = open(os.path.join(DOCS, page), encoding="utf-8").read()
    for pattern, what in _FORBIDDEN:
        m = pattern.search(text)
        assert m is None, f"{page} mentions {what}: {m.group(0)!r}"


def test_development_notes_live_under_development():
    top = {os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md"))}
    assert top == {"index.md", "benchmarks.md"}, top
    assert os.path.exists(os.path.join(DOCS, "development", "gpu-validation.md"))


def _example_pages() -> str:
    """docs/examples/, regenerated unless it holds the current examples' pages."""
    out = os.path.join(DOCS, "examples")
    if not _gen_examples.is_fresh(out):
        _gen_examples.generate(out)
    return out


_NO_MATPLOTLIB = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the examples' figures need matplotlib (pip install '.[docs]'); CI has it",
)


@pytest.mark.slow
@_NO_MATPLOTLIB
def test_example_pages_come_from_the_current_examples():
    out = _example_pages()
    assert _gen_examples.is_fresh(out)
    for script, _, args in _gen_examples.EXAMPLES:
        stem = os.path.splitext(script)[0]
        png = open(os.path.join(out, stem + ".png"), "rb").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(
            png[20:24], "big"
        )
        assert width >= 600 and height >= 250, (width, height)
        page = open(os.path.join(out, stem + ".md"), encoding="utf-8").read()
        assert "![" in page and f"({stem}.png)" in page
        assert " ".join(["python", f"examples/{script}", *args]) in page
        source = open(os.path.join(ROOT, "examples", script), encoding="utf-8").read()
        assert source.rstrip() in page  # the code shown is the code that ran
    # What each example prints is on its page.
    phrases = {
        "newton_bratu": "max |u_AMGX - u_LU|",
        "inverse_diffusion": "relative difference",
        "jfnk_nonlinear_diffusion": "AMG-preconditioned",
    }
    for stem, phrase in phrases.items():
        page = open(os.path.join(out, stem + ".md"), encoding="utf-8").read()
        output = page.split("## Output", 1)[1].split("## Code", 1)[0]
        assert phrase in output, stem


def _inventory_names(path: str) -> set[str]:
    data = open(path, "rb").read()
    header, _, body = data.partition(b"zlib.\n")
    assert b"# Sphinx inventory version 2" in header
    return {line.split()[0] for line in zlib.decompress(body).decode().splitlines()}


@pytest.mark.slow
@_NO_MATPLOTLIB
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings") is None,
    reason="the docs extra is not installed (pip install '.[docs]'); CI installs it",
)
def test_site_builds_strictly_and_lists_every_public_name(tmp_path):
    import lineax_amgx
    import lineax_amgx.distributed

    _example_pages()
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = _inventory_names(str(site / "objects.inv"))
    wanted = {f"lineax_amgx.{n}" for n in lineax_amgx.__all__}
    wanted |= {f"lineax_amgx.distributed.{n}" for n in lineax_amgx.distributed.__all__}
    assert not wanted - names, sorted(wanted - names)
    for page in ["index", "guide/solving", "examples/newton_bratu", "api/solver"]:
        assert (site / page / "index.html").exists() or (
            site / f"{page}.html"
        ).exists(), page
    assert (site / "examples" / "newton_bratu.png").exists()
