# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Extract and run the ```python blocks of a documentation page.

    python docs/_snippets.py docs/guide/solving.md     # runs the page, prints JSON

A page's blocks run in order in one namespace (as a reader runs them, top to
bottom), each block's stdout captured on its own. A block whose first line is
`# needs: gpu` or `# needs: mpi ...` is not run (it needs a GPU or several MPI
ranks); `tests/test_docs.py` lists every such block. A ```text block titled
"Output" right after a python block is that block's expected stdout.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import traceback
import types

_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)$")


def extract(path: str) -> list[dict]:
    """Every fenced block of a Markdown page: `lang`, `title`, `code`, `line`
    (1-based line of the opening fence), `needs` (from a `# needs:` first line)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group("info").strip():
            i += 1
            continue
        indent, info = len(m.group("indent")), m.group("info").strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[indent:] if not line[:indent].strip() else line)
            i += 1
        i += 1
        lang = info.split()[0]
        t = re.search(r'title="([^"]*)"', info)
        code = "\n".join(body) + "\n"
        needs = None
        if body and body[0].startswith("# needs:"):
            needs = body[0][len("# needs:"):].strip()
        blocks.append({"lang": lang, "title": t.group(1) if t else None,
                       "code": code, "line": start, "needs": needs})
    return blocks


def run(path: str) -> list[dict]:
    """Run the page's python blocks in one namespace; one record per block."""
    # A real module: dataclasses (Equinox modules) look their module up.
    module = types.ModuleType("__docs__")
    sys.modules["__docs__"] = module
    namespace = module.__dict__
    out = []
    for b in extract(path):
        if b["lang"] != "python":
            continue
        rec = {"line": b["line"], "needs": b["needs"], "stdout": "", "error": None}
        if b["needs"] is None:
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(compile(b["code"], f"{path}:{b['line']}", "exec"), namespace)
            except BaseException:  # noqa: BLE001 - reported to the test
                rec["error"] = traceback.format_exc(limit=8)
            rec["stdout"] = buf.getvalue()
        out.append(rec)
        if rec["error"]:
            break  # later blocks depend on this one
    return out


if __name__ == "__main__":
    records = run(sys.argv[1])
    sys.stdout.flush()
    print("\n@@SNIPPETS@@" + json.dumps(records))
