# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Check lineax_amgx/_backends/_native.pyi against the installed extension with
mypy's stubtest.

    python tools/stubtest_native.py [stubtest options]

This is `python -m mypy.stubtest lineax_amgx._backends._native`, with two things made to
work that plain stubtest gets wrong for a nanobind module:

- Functions. nanobind's functions are `nb_func` objects, which stubtest does not
  count as functions and `inspect.signature` does not read, so plain stubtest
  reports every one as "not a function" and compares no parameters. Here each
  one's signature is read from its `__nb_signature__` (parameter names, kinds and
  default values), so a parameter renamed, added, dropped, or given another
  default on either side fails the check.
- Finding the stub. mypy skips an installed package without a `py.typed` marker
  (and plain stubtest then passes having checked nothing), while the source tree
  makes mypy type-check the whole package. Here the repository's stub alone is put
  on MYPYPATH, after checking that the installed package ships the same file.

The extension is imported from the installed package (run this after
`pip install .`; the script's own folder, not the repository, is on `sys.path`).
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "lineax_amgx._backends._native"
STUB = os.path.join(ROOT, "lineax_amgx", "_backends", "_native.pyi")


def _split_top_level(text: str, sep: str) -> list[str]:
    """`text` split at the `sep` characters outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    last = text[start:].strip()
    return [*parts, last] if last else parts


def _parameter_list(signature: str) -> str:
    """The text between the parentheses of `def name(...) -> ...`."""
    start = signature.index("(") + 1
    depth = 1
    for i in range(start, len(signature)):
        depth += {"(": 1, ")": -1}.get(signature[i], 0)
        if depth == 0:
            return signature[start:i]
    raise ValueError(f"unbalanced parentheses in {signature!r}")


def nb_signature(fn) -> inspect.Signature | None:
    """The signature of a nanobind function (None for overloaded ones)."""
    overloads = getattr(fn, "__nb_signature__", None)
    if not overloads or len(overloads) != 1:
        return None
    text, _doc, defaults = overloads[0]
    P = inspect.Parameter
    kind, params = P.POSITIONAL_OR_KEYWORD, []
    for item in _split_top_level(_parameter_list(text), ","):
        if item == "/":  # the ones before are positional-only
            params = [p.replace(kind=P.POSITIONAL_ONLY) for p in params]
            continue
        if item == "*":
            kind = P.KEYWORD_ONLY
            continue
        declaration, *value = _split_top_level(item, "=")
        name = declaration.split(":")[0].strip()
        default = P.empty
        if value:
            # nanobind writes defaults as \N, the N-th entry of `defaults`.
            v = value[0]
            default = defaults[int(v[1:])] if v.startswith("\\") else v
        if name.startswith("**"):
            params.append(P(name[2:], P.VAR_KEYWORD))
        elif name.startswith("*"):
            params.append(P(name[1:], P.VAR_POSITIONAL))
            kind = P.KEYWORD_ONLY
        else:
            params.append(P(name, kind, default=default))
    return inspect.Signature(params)


def _is_nb_func(obj) -> bool:
    return type(obj).__name__ == "nb_func" and type(obj).__module__ == "nanobind"


def main(argv: list[str]) -> int:
    import importlib

    import mypy.stubtest as stubtest

    native = importlib.import_module(MODULE)
    shipped = os.path.join(os.path.dirname(native.__file__), "_native.pyi")
    with open(STUB) as f:
        stub = f.read()
    if not os.path.exists(shipped) or open(shipped).read() != stub:
        print(f"{shipped} is missing or differs from {STUB}: reinstall the package "
              "(pip install .) before checking its stub.", file=sys.stderr)
        return 1

    is_function = stubtest.is_probably_a_function
    signature = stubtest.safe_inspect_signature
    stubtest.is_probably_a_function = lambda rt: _is_nb_func(rt) or is_function(rt)
    stubtest.safe_inspect_signature = (
        lambda rt: nb_signature(rt) if _is_nb_func(rt) else signature(rt))

    with tempfile.TemporaryDirectory() as d:
        pkg = os.path.join(d, "lineax_amgx")
        os.makedirs(pkg)
        open(os.path.join(pkg, "__init__.pyi"), "w").close()
        shutil.copy(STUB, pkg)
        os.environ["MYPYPATH"] = d
        cwd = os.getcwd()
        os.chdir(d)  # mypy makes a .mypy_cache folder in the working directory
        try:
            return stubtest.test_stubs(stubtest.parse_options([*argv, MODULE]))
        finally:
            os.chdir(cwd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
