# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""The abstract values of the sparsity interpreter: a jaxpr variable is either
known (a NumPy value) or unknown with the index sets of the inputs it depends on."""

from __future__ import annotations

import numpy as np

from . import _sets as S


class Unsupported(Exception):
    """Raised for a primitive (or a use of one) that tracing cannot handle."""


# Work budget for unrolling loops: iterations x body equations.
_UNROLL_BUDGET = 200_000


class _Val:
    __slots__ = ("shape", "dtype", "known", "sets", "roots", "direct")

    def __init__(self, shape, dtype, known=None, sets=None, roots=frozenset(),
                 direct=False):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.known = known
        self.sets = sets
        self.roots = roots
        self.direct = direct

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_known(self) -> bool:
        return self.known is not None

    def get_sets(self) -> S.IndexSets:
        if self.sets is None:
            return S.empty(self.size)
        return self.sets

    @property
    def has_deps(self) -> bool:
        return self.sets is not None and self.sets.nnz > 0


def _unknown(aval, sets=None):
    if sets is not None and sets.nnz == 0:
        sets = None
    return _Val(aval.shape, aval.dtype, sets=sets)


class Context:
    """Records which constants' values shaped the pattern (for memoisation)."""

    def __init__(self):
        self.consulted: dict[int, str] = {}

    def consult(self, val: _Val, kind: str = "value"):
        for r in val.roots:
            if kind == "zero" and val.direct:
                self.consulted.setdefault(r, "zero")
            else:
                self.consulted[r] = "value"
