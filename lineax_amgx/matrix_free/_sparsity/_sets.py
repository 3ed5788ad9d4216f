# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""Index sets for many array elements at once, stored like a CSR matrix.

Element `r` of an array depends on the inputs `idx[indptr[r]:indptr[r + 1]]`. Every
operation below is a handful of vectorised NumPy passes over these two arrays;
no Python object is created per element. Duplicates are allowed in intermediate
results (a union is a concatenation) and removed lazily by `dedup`, when the
estimated duplication grows past `_DUP_FACTOR` and once at the end.
"""

from __future__ import annotations

import numpy as np

_DUP_FACTOR = 4.0


class IndexSets:
    """Per-element dependency lists of one (flattened) array.

    **Arguments:**

    - `indptr`: int64 array of length `n + 1`.
    - `idx`: int64 array of input indices, `indptr[-1]` long.
    - `base`: an estimate of the number of distinct entries (`<= nnz`); `dedup`
        runs when `nnz` exceeds it by `_DUP_FACTOR`.
    - `clean`: whether every row is known to be sorted and duplicate-free.
    """

    __slots__ = ("_indptr", "_idx", "base", "clean", "_lens", "ell", "_nnz")

    def __init__(self, indptr=None, idx=None, base=None, clean=False, ell=None):
        # Either CSR (`indptr`, `idx`) or ELL: a 2-D `ell[n, width]` array with
        # -1 for "no entry" (fast for the narrow rows of stencil codes).
        self._indptr = indptr
        self._idx = idx
        self.ell = ell
        self._lens = None
        self._nnz = None
        if ell is None:
            self.base = float(idx.shape[0] if base is None else base)
        else:
            self.base = float(ell.size if base is None else base)
        self.clean = clean

    def _to_csr(self):
        if self._indptr is None:
            mask = self.ell >= 0
            lens = mask.sum(axis=1, dtype=np.int64)
            indptr = np.zeros(self.ell.shape[0] + 1, np.int64)
            np.cumsum(lens, out=indptr[1:])
            self._idx = self.ell[mask].astype(np.int64, copy=False)
            self._indptr = indptr
            self._lens = lens

    @property
    def indptr(self):
        self._to_csr()
        return self._indptr

    @property
    def idx(self):
        self._to_csr()
        return self._idx

    @property
    def n(self) -> int:
        if self.ell is not None:
            return self.ell.shape[0]
        return self._indptr.shape[0] - 1

    @property
    def nnz(self) -> int:
        if self._nnz is None:
            if self._indptr is not None:
                self._nnz = int(self._indptr[-1])
            else:
                self._nnz = int(np.count_nonzero(self.ell >= 0))
        return self._nnz

    @property
    def lens(self) -> np.ndarray:
        if self._lens is None:
            if self._indptr is None:
                self._lens = (self.ell >= 0).sum(axis=1, dtype=np.int64)
            else:
                self._lens = np.diff(self._indptr)
        return self._lens


def empty(n: int) -> IndexSets:
    return IndexSets(
        np.zeros(n + 1, np.int64), np.zeros(0, np.int64), base=0.0, clean=True
    )


def identity(n: int, offset: int = 0) -> IndexSets:
    dt = np.int32 if offset + n < np.iinfo(np.int32).max else np.int64
    return IndexSets(ell=np.arange(offset, offset + n, dtype=dt)[:, None], clean=True)


_ELL_MAX = 64


def _ell_dedup(a: np.ndarray) -> np.ndarray:
    a = np.sort(a, axis=1)
    if a.shape[1] > 1:
        dup = a[:, 1:] == a[:, :-1]
        a[:, 1:][dup] = -1
        a.sort(axis=1)
    valid = a >= 0
    w = int(valid.sum(axis=1).max()) if a.shape[0] else 0
    return np.ascontiguousarray(a[:, a.shape[1] - w:])


def gather(s: IndexSets, rows: np.ndarray) -> IndexSets:
    """Row `i` of the result is row `rows[i]` of `s` (empty where `rows[i] < 0`)."""
    rows = np.asarray(rows).reshape(-1).astype(np.int64, copy=False)
    m = rows.shape[0]
    if s.ell is not None:
        out = s.ell[np.maximum(rows, 0)]
        neg = rows < 0
        if neg.any():
            out[neg] = -1
        return IndexSets(ell=out, clean=s.clean)
    if s.nnz == 0:
        return empty(m)
    valid = rows >= 0
    allvalid = bool(valid.all())
    r = rows if allvalid else np.where(valid, rows, 0)
    lens = s.lens[r]
    if not allvalid:
        lens = np.where(valid, lens, 0)
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    total = int(indptr[-1])
    if total == 0:
        return empty(m)
    if s.nnz == s.n and total == m and bool(np.all(s.lens == 1)):
        # Every row (of s and of the result) holds exactly one entry.
        idx = s.idx[r]
    else:
        pos = np.repeat(s.indptr[:-1][r] - indptr[:-1], lens)
        pos += np.arange(total, dtype=np.int64)
        idx = s.idx[pos]
    base = total * (s.base / s.nnz)
    return IndexSets(indptr, idx, base=base, clean=s.clean)


def union(sets: list[IndexSets]) -> IndexSets:
    """Row-wise union of sets of equal length (duplicates kept until `dedup`)."""
    if all(s.ell is not None for s in sets):
        width = sum(s.ell.shape[1] for s in sets)
        if width <= _ELL_MAX:
            a = np.concatenate([s.ell for s in sets], axis=1)
            if width > 8:
                return IndexSets(ell=_ell_dedup(a), clean=True)
            return IndexSets(ell=a)
    nonempty = [s for s in sets if s.nnz]
    if not nonempty:
        return empty(sets[0].n)
    if len(nonempty) == 1:
        return nonempty[0]
    n = nonempty[0].n
    lens = nonempty[0].lens.copy()
    for s in nonempty[1:]:
        lens += s.lens
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    total = int(indptr[-1])
    out = np.empty(total, np.int64)
    off = indptr[:-1].copy()
    for s in nonempty:
        dest = np.repeat(off - s.indptr[:-1], s.lens)
        dest += np.arange(s.nnz, dtype=np.int64)
        out[dest] = s.idx
        off += s.lens
    base = max(s.base for s in nonempty)
    return maybe_dedup(IndexSets(indptr, out, base=base))


def combine_sorted(s: IndexSets, ptr: np.ndarray, src: np.ndarray) -> IndexSets:
    """Row `r` of the result is the union of rows `src[ptr[r]:ptr[r + 1]]` of `s`."""
    g = gather(s, src)
    out = IndexSets(g.indptr[ptr], g.idx, base=min(g.base, s.base + 1.0))
    return maybe_dedup(out)


def combine_pairs(
    s: IndexSets, out: np.ndarray, src: np.ndarray, n_out: int
) -> IndexSets:
    """Row `r` of the result is the union of rows `src[k]` of `s` over all `k` with
    `out[k] == r` (pairs with `src < 0` are ignored)."""
    out = np.asarray(out, np.int64).reshape(-1)
    src = np.asarray(src, np.int64).reshape(-1)
    keep = src >= 0
    if not keep.all():
        out, src = out[keep], src[keep]
    if out.shape[0] == 0 or s.nnz == 0:
        return empty(n_out)
    order = np.argsort(out, kind="stable")
    counts = np.bincount(out, minlength=n_out)
    ptr = np.zeros(n_out + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    return combine_sorted(s, ptr, src[order])


def concat(sets: list[IndexSets]) -> IndexSets:
    """Stack the rows of several sets (for flattening several arrays)."""
    if len(sets) == 1:
        return sets[0]
    idx = np.concatenate([s.idx for s in sets])
    lens = np.concatenate([s.lens for s in sets])
    indptr = np.zeros(lens.shape[0] + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    base = sum(s.base for s in sets)
    return IndexSets(indptr, idx, base=base, clean=all(s.clean for s in sets))


def dedup(s: IndexSets, n_in: int | None = None) -> IndexSets:
    """Sort every row and remove duplicates."""
    if s.clean and s.ell is None:
        return s
    if s.ell is not None:
        a = s.ell if s.clean else _ell_dedup(s.ell)
        out = IndexSets(ell=a, clean=True)
        out._to_csr()
        out.ell = None
        return out
    if s.nnz == 0:
        return IndexSets(s.indptr, s.idx, base=0.0, clean=True)
    n_in = int(s.idx.max()) + 1 if n_in is None else max(int(n_in), 1)
    rows = np.repeat(np.arange(s.n, dtype=np.int64), s.lens)
    key = rows * n_in + s.idx
    key.sort(kind="stable")
    keep = np.empty(key.shape[0], bool)
    keep[0] = True
    np.not_equal(key[1:], key[:-1], out=keep[1:])
    key = key[keep]
    rows = key // n_in
    idx = key - rows * n_in
    counts = np.bincount(rows, minlength=s.n)
    indptr = np.zeros(s.n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return IndexSets(indptr, idx, clean=True)


def maybe_dedup(s: IndexSets) -> IndexSets:
    if s.ell is not None:
        return s
    if not s.clean and s.nnz > 1024 and s.nnz > _DUP_FACTOR * max(s.base, 1.0):
        return dedup(s, None)
    if s.nnz and s.nnz <= 1024:
        # Tiny: always keep it clean, so duplication never compounds.
        return dedup(s, None)
    return s
