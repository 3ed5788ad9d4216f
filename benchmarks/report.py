# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Tables and plots of the benchmark suite, merged across runs.

Reads every JSON line of the suite (`docs/results/suite.jsonl` by default; more
files with `--inputs`), keeps the newest result per (card, problem, size,
method), and writes one section per problem (a table per card and size: setup,
solve, total, iterations, true residual, speedup against the best Lineax Krylov
method; and a PNG plot under `docs/results/`) into `docs/benchmarks.md`, between
the markers `<!-- suite:begin -->` and `<!-- suite:end -->`. The rest of that
file is left alone.

    python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.normpath(os.path.join(HERE, "..", "docs"))
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
PROBLEM_ORDER = [
    "poisson3d", "contrast3d-layers", "contrast3d-checker", "aniso2d", "aniso3d",
    "elasticity3d", "elasticity3d-bsr", "convdiff3d", "fem2d",
]


def _normalise(r: dict) -> dict:
    # Runs with --repeats 0 time only the first call (compile included): no
    # setup/solve/total then, iterations and residual only.
    if r.get("repeats") == 0:
        r = {**r, "setup_s": None, "solve_s": None, "total_s": None}
    return r


def load(paths: list[str]) -> list[dict]:
    """The newest record per (card, problem, size, method)."""
    newest: dict[tuple, tuple] = {}
    order = 0
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not r.get("suite"):
                    continue
                order += 1
                key = (r.get("card"), r["problem"], r["size"], r["method"])
                rank = (r.get("date", ""), order)
                if key not in newest or rank >= newest[key][0]:
                    newest[key] = (rank, r)
    return [_normalise(r) for _, r in newest.values()]


def _t(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def _is_lineax(m: str) -> bool:
    return m.startswith("lx-")


def _ok(r) -> bool:
    return "error" not in r and bool(r.get("converged"))


def _size_label(n: int) -> str:
    for div, suf in ((10**6, "M"), (10**3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suf}"
    return str(n)


def table(rows: list[dict]) -> list[str]:
    lx_best = min((r["total_s"] for r in rows
                   if _is_lineax(r["method"]) and _ok(r) and r.get("total_s")),
                  default=None)
    has_resetup = any(r.get("resetup_s") is not None for r in rows)
    head = ["method", "setup s", "solve s", "total s"]
    if has_resetup:
        head.append("resetup s")
    head += ["iters", "rel. residual", "vs best Lineax"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def key(r):
        return (not _ok(r), "error" in r, r.get("total_s") or math.inf)

    for r in sorted(rows, key=key):
        name = f"`{r['method']}`" + (" (default)" if r.get("default") else "")
        if "error" in r:
            msg = r["error"].splitlines()[0][:90].replace("|", "/")
            cells = [name, f"error: {msg}"] + [""] * (len(head) - 2)
            out.append("| " + " | ".join(cells) + " |")
            continue
        res = r.get("rel_residual")
        res_s = "–" if res is None else f"{res:.1e}"
        if not _ok(r):
            res_s += f" ✗ ({r.get('status')})"
        speed = "–"
        if lx_best and r.get("total_s") and _ok(r):
            speed = f"{lx_best / r['total_s']:.2g}×"
        cells = [name, _t(r.get("setup_s")), _t(r.get("solve_s")), _t(r.get("total_s"))]
        if has_resetup:
            cells.append(_t(r.get("resetup_s")))
        its = r.get("iterations")
        cells += ["–" if its is None else str(its), res_s, speed]
        out.append("| " + " | ".join(cells) + " |")
    return out


def plot(problem: str, rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; no plots", file=sys.stderr)
        return False
    cards = sorted({r["card"] for r in rows})
    fig, axes = plt.subplots(1, len(cards), figsize=(6.5 * len(cards), 4.8),
                             squeeze=False)
    for ax, card in zip(axes[0], cards):
        rs = [r for r in rows if r["card"] == card and _ok(r) and r.get("total_s")]
        sizes = sorted({r["n"] for r in rs})
        if len(sizes) > 1:
            by_m = defaultdict(list)
            for r in rs:
                by_m[r["method"]].append((r["n"], r["total_s"]))
            for m, pts in sorted(by_m.items()):
                pts.sort()
                ax.plot(*zip(*pts), marker="o", ls="--" if _is_lineax(m) else "-",
                        label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("unknowns")
            ax.set_ylabel("setup + solve [s]")
            ax.legend(fontsize=6, ncol=2)
        elif sizes:
            rs = sorted(rs, key=lambda r: r["total_s"], reverse=True)
            labels = [r["method"] for r in rs]
            setup = [r.get("setup_s") or 0.0 for r in rs]
            solve = [r["total_s"] - s for r, s in zip(rs, setup)]
            ax.barh(labels, setup, color="tab:orange", label="setup")
            ax.barh(labels, solve, left=setup, color="tab:blue", label="solve")
            ax.set_xscale("log")
            ax.set_xlabel(f"seconds at {_size_label(sizes[0])} unknowns")
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=7)
        ax.set_title(f"{problem} — {card}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def render(records: list[dict], figures: str, md_dir: str) -> str:
    by_problem = defaultdict(list)
    for r in records:
        by_problem[r["problem"]].append(r)
    order = [p for p in PROBLEM_ORDER if p in by_problem]
    order += sorted(set(by_problem) - set(order))
    lines = [
        "Generated by `benchmarks/report.py` from `docs/results/suite.jsonl` "
        "(newest result per card, problem, size and method; produce them with "
        "`benchmarks/suite.py`). Right-hand side all ones, stopping at the relative "
        "2-norm residual given per row's `rtol` (1e-8 unless stated); *rel. "
        "residual* is `||b - Ax|| / ||b||` recomputed in float64 on the host. "
        "*setup* is a cold setup (hierarchy built from scratch), *solve* the solve "
        "alone with that setup cached, *total* their sum; *resetup* (GPU) the setup "
        "for new values of the same pattern. *vs best Lineax* is the best converged "
        "Lineax Krylov total divided by this total (>1: faster). ✗ marks a result "
        "that did not reach 10×rtol. AmgX presets/candidates run on the GPU "
        "through AmgX, on the CPU through pyamg (the same configuration "
        "translated; iteration counts differ). Tables on `cpu` come from "
        "development hosts (the first ones from a shared, heavily loaded 2-core "
        "machine): read their iteration counts, not their times.",
        "",
    ]
    for prob in order:
        rows = by_problem[prob]
        lines += [f"### {prob}", ""]
        fig_name = f"suite_{prob}.png"
        if plot(prob, rows, os.path.join(figures, fig_name)):
            rel = os.path.relpath(os.path.join(figures, fig_name), md_dir)
            lines += [f"![{prob}]({rel})", ""]
        groups = defaultdict(list)
        for r in rows:
            groups[(r.get("card"), r["size"])].append(r)
        for (card, size) in sorted(groups, key=lambda k: (str(k[0]), k[1])):
            g = groups[(card, size)]
            n = max((r.get("n") or 0 for r in g), default=0) or size
            nnz = max((r.get("nnz") or 0 for r in g), default=0)
            dates = sorted(r.get("date", "") for r in g)
            jaxv = sorted({r.get("jax") for r in g if r.get("jax")})
            rtols = sorted({r.get("rtol") for r in g if r.get("rtol")})
            desc = next((r["description"] for r in g if r.get("description")), "")
            lines += [f"**{card}, n = {n:,}**: {desc} (nnz {nnz:,}; "
                      f"rtol {', '.join(f'{t:g}' for t in rtols)}; "
                      f"jax {', '.join(jaxv)}; {dates[0][:10]}"
                      + (f" – {dates[-1][:10]}" if dates[-1][:10] != dates[0][:10]
                         else "") + ")", ""]
            lines += table(g) + [""]
    return "\n".join(lines)


def write_markdown(path: str, body: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="+",
                    default=[os.path.join(DOCS, "results", "suite.jsonl")])
    ap.add_argument("--markdown", default=os.path.join(DOCS, "benchmarks.md"))
    ap.add_argument("--figures", default=os.path.join(DOCS, "results"))
    args = ap.parse_args(argv)
    records = load(args.inputs)
    if not records:
        print("report: no suite results found in", args.inputs, file=sys.stderr)
    os.makedirs(args.figures, exist_ok=True)
    md_dir = os.path.dirname(os.path.abspath(args.markdown))
    body = render(records, os.path.abspath(args.figures), md_dir)
    write_markdown(args.markdown, body)
    print(f"report: {len(records)} results -> {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
