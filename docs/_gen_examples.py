# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Render `examples/*.py` as pages of this site: each example is run at a small
size on the CPU, and its page shows how to run it, its printed output, the figure
it saved, and its code.

    python docs/_gen_examples.py                 # writes docs/examples/
    python docs/_gen_examples.py --if-stale      # only if an example changed
    python docs/_gen_examples.py --out DIR       # elsewhere

The pages and figures are generated, never committed (`docs/examples/` is
ignored by git), so the site always shows what the current examples produce.
`manifest.json` records, per example, the SHA-256 of its source, the arguments,
and the SHA-256 of the figure (and the SHA-256 of this script): `is_fresh` says
whether the pages were produced by running the current examples.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (script, title, small-size arguments for the page)
EXAMPLES = [
    ("newton_bratu.py", "Newton–Bratu with Optimistix", ["--n", "32"]),
    ("inverse_diffusion.py", "Inverse diffusion: gradients through solves",
     ["--n", "16", "--iters", "30"]),
    ("jfnk_nonlinear_diffusion.py", "Jacobian-free Newton–Krylov with an AMG "
     "preconditioner", ["--n", "32"]),
]


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_example(script: str, args: list[str], out_dir: str) -> tuple[str, str]:
    """Run one example on the CPU; returns (stdout, figure path)."""
    stem = os.path.splitext(script)[0]
    figure = os.path.join(out_dir, stem + ".png")
    if os.path.exists(figure):
        os.remove(figure)  # a figure left from an earlier run must not survive
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore",
               MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args,
         "--figure", figure],
        capture_output=True, text=True, timeout=600, env=env, cwd=out_dir,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    if not os.path.exists(figure):
        raise RuntimeError(f"{script} saved no figure at {figure}")
    return proc.stdout, figure


def page(script: str, title: str, args: list[str], stdout: str, seconds: float) -> str:
    path = os.path.join(ROOT, "examples", script)
    source = open(path, encoding="utf-8").read()
    doc = ast.get_docstring(ast.parse(source)) or ""
    # The docstring's first line is the title; the rest (with its indented
    # formulas and commands as code) is the introduction.
    intro = doc.split("\n", 1)[1].strip("\n") if "\n" in doc else ""
    blocks, buf, code = [], [], False
    for line in intro.splitlines():
        indented = line.startswith("    ")
        if indented != code and line.strip():
            blocks.append(("code" if code else "text", buf))
            buf, code = [], indented
        buf.append(line[4:] if indented else line)
    blocks.append(("code" if code else "text", buf))
    parts = []
    for kind, lines in blocks:
        text = "\n".join(lines).strip("\n")
        if not text:
            continue
        parts.append(f"```text\n{text}\n```" if kind == "code" else text)
    stem = os.path.splitext(script)[0]
    command = " ".join(["python", f"examples/{script}", *args])
    return "\n\n".join([
        f"# {title}",
        *parts,
        "## Output",
        f"`{command}` on the CPU (pyamg backend), as run to build this page "
        f"({seconds:.0f} s):",
        f"```text\n{stdout.rstrip()}\n```",
        f"![{title}]({stem}.png)",
        "## Code",
        f"`examples/{script}`:",
        f"```python\n{source.rstrip()}\n```",
    ]) + "\n"


def is_fresh(out_dir: str) -> bool:
    """Whether `out_dir` holds the pages and figures of the current examples, made
    by this script as it is now (hashes of the sources, this script and the
    figures all match the manifest)."""
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest.pop("_generator_sha256") != _sha(os.path.abspath(__file__)):
            return False
        if sorted(manifest) != sorted(script for script, _, _ in EXAMPLES):
            return False
        for script, _, args in EXAMPLES:
            entry, stem = manifest[script], os.path.splitext(script)[0]
            if (
                entry["source_sha256"] != _sha(os.path.join(ROOT, "examples", script))
                or entry["args"] != args
                or entry["figure_sha256"] != _sha(os.path.join(out_dir, stem + ".png"))
                or not os.path.exists(os.path.join(out_dir, stem + ".md"))
            ):
                return False
    except (OSError, KeyError, ValueError):
        return False
    return True


def generate(out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    manifest: dict = {"_generator_sha256": _sha(os.path.abspath(__file__))}
    for script, title, args in EXAMPLES:
        t0 = time.perf_counter()
        stdout, figure = run_example(script, args, out_dir)
        seconds = time.perf_counter() - t0
        stem = os.path.splitext(script)[0]
        with open(os.path.join(out_dir, stem + ".md"), "w", encoding="utf-8") as f:
            f.write(page(script, title, args, stdout, seconds))
        manifest[script] = {
            "source_sha256": _sha(os.path.join(ROOT, "examples", script)),
            "args": args,
            "figure_sha256": _sha(figure),
            "seconds": round(seconds, 1),
        }
        print(f"{script}: {seconds:.1f} s", flush=True)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "examples"))
    ap.add_argument("--if-stale", action="store_true",
                    help="do nothing when the pages are those of the current examples")
    opts = ap.parse_args()
    out = os.path.abspath(opts.out)
    if opts.if_stale and is_fresh(out):
        print(f"{out}: up to date")
    else:
        generate(out)
