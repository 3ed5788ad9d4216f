# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""Column colorings for compressed Jacobian assembly (one JVP per color)."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from .._pattern import SparsityPattern

try:  # numba is optional: it only makes the sequential greedy kernels fast.
    import importlib.util

    _HAVE_NUMBA = importlib.util.find_spec("numba") is not None
except Exception:  # pragma: no cover
    _HAVE_NUMBA = False

_JITTED: dict = {}
# Below this much work (entries x densest row) plain Python is fast enough, and
# importing/compiling numba (seconds) is not worth it.
_NUMBA_THRESHOLD = 300_000


def _kernel(f, work: int):
    if not _HAVE_NUMBA or work < _NUMBA_THRESHOLD:
        return f
    if f not in _JITTED:
        from numba import njit

        _JITTED[f] = njit(cache=True, nogil=True)(f)
    return _JITTED[f]




class Coloring:
    """A coloring of the (block) columns of a sparsity pattern.

    Columns of one color never share a row (distance-2 coloring), so one JVP
    with the sum of their basis vectors recovers all of them. A `symmetric`
    coloring is a *star* coloring of a symmetric pattern: columns of one color may
    share a row, but every entry can still be read either from its own column's
    compressed product or, by symmetry, from its transpose's.

    Immutable and hashable (it is static metadata of
    [`lineax_amgx.sparsify`][]'s operator).

    **Arguments:**

    - `colors`: one color in `[0, num_colors)` per (block) column.
    - `symmetric`: whether this is a star coloring with symmetric decompression.
    - `method`: which heuristic produced it (informational).
    """

    __slots__ = ("colors", "num_colors", "symmetric", "method", "_hash")

    def __init__(self, colors, *, symmetric: bool = False, method: str = "given"):
        colors = np.ascontiguousarray(colors, dtype=np.int32)
        colors.setflags(write=False)
        object.__setattr__(self, "colors", colors)
        # -1 marks a "neutral" column (star colorings only): never seeded, all
        # its entries are read from their transposes.
        object.__setattr__(
            self, "num_colors", int(colors.max()) + 1 if colors.size else 0
        )
        object.__setattr__(self, "symmetric", bool(symmetric))
        object.__setattr__(self, "method", str(method))
        h = hashlib.blake2b(colors.tobytes(), digest_size=8)
        h.update(bytes([self.symmetric]))
        object.__setattr__(self, "_hash", int.from_bytes(h.digest(), "little"))

    def __setattr__(self, name, value):
        raise AttributeError("Coloring is immutable.")

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if not isinstance(other, Coloring):
            return NotImplemented
        return (
            self._hash == other._hash
            and self.symmetric == other.symmetric
            and np.array_equal(self.colors, other.colors)
        )

    def __repr__(self):
        kind = "star" if self.symmetric else "distance-2"
        return (
            f"Coloring(num_colors={self.num_colors}, columns={self.colors.size}, "
            f"{kind}, method={self.method!r})"
        )


# -- validity -----------------------------------------------------------------------


def _row_color_keys(pattern: SparsityPattern, colors: np.ndarray, K: int):
    K = max(K, 1)
    if pattern.block_rows * K < np.iinfo(np.int32).max:
        key = pattern.row_ids * np.int32(K)
        key += colors.astype(np.int32)[pattern.indices]
        return key
    rows = pattern.row_ids.astype(np.int64)
    return rows * K + colors[pattern.indices]


def is_valid_column_coloring(pattern: SparsityPattern, colors) -> bool:
    """No two columns of one color share a row."""
    colors = np.asarray(colors, np.int64)
    if pattern.nnz == 0:
        return True
    K = int(colors.max()) + 1
    key = _row_color_keys(pattern, colors, K)
    if pattern.block_rows * K <= 50_000_000:
        return int(np.bincount(key, minlength=1).max()) <= 1
    key.sort(kind="stable")
    return not bool(np.any(key[1:] == key[:-1]))


def star_recovery(pattern: SparsityPattern, colors) -> np.ndarray | None:
    """For a symmetric pattern and a coloring, per entry: True where the entry is
    read directly (its color is unique in its row), False where it is read from
    its transpose. None if some entry can be recovered neither way."""
    colors = np.asarray(colors, np.int64)
    if pattern.nnz == 0:
        return np.zeros(0, bool)
    K = int(colors.max()) + 2
    rows = pattern.row_ids.astype(np.int64)
    cols = pattern.indices.astype(np.int64)
    cr, cc = colors[rows], colors[cols]
    if np.any((rows != cols) & (cr == cc) & (cr >= 0)):
        return None
    # Color -1 ("neutral", as in post-processed star colorings) is never seeded.
    key = rows * K + cc + 1
    uniq, counts = np.unique(key[cc >= 0], return_counts=True)
    if uniq.size == 0:
        return None

    def unique_in_row(k, ok):
        pos = np.minimum(np.searchsorted(uniq, k), uniq.shape[0] - 1)
        return ok & (uniq[pos] == k) & (counts[pos] == 1)

    direct = unique_in_row(key, cc >= 0)
    trans = unique_in_row(cols * K + cr + 1, cr >= 0)
    if not np.all(direct | trans):
        return None
    return direct


# -- greedy kernels -----------------------------------------------------------------


def _greedy_d2(order, col_ptr, col_rows, row_ptr, row_cols, n):  # pragma: no cover
    colors = np.full(n, -1, np.int64)
    forbidden = np.full(n + 1, -1, np.int64)
    for v in order:
        for p in range(col_ptr[v], col_ptr[v + 1]):
            r = col_rows[p]
            for q in range(row_ptr[r], row_ptr[r + 1]):
                c = colors[row_cols[q]]
                if c >= 0:
                    forbidden[c] = v
        c = 0
        while forbidden[c] == v:
            c += 1
        colors[v] = c
    return colors


def _d2_degrees(col_ptr, col_rows, row_ptr, row_cols, n):  # pragma: no cover
    visited = np.full(n, -1, np.int64)
    deg = np.zeros(n, np.int64)
    for v in range(n):
        for p in range(col_ptr[v], col_ptr[v + 1]):
            r = col_rows[p]
            for q in range(row_ptr[r], row_ptr[r + 1]):
                w = row_cols[q]
                if w != v and visited[w] != v:
                    visited[w] = v
                    deg[v] += 1
    return deg


def _greedy_star(order, ptr, nbr, n):  # pragma: no cover
    # Greedy star coloring: distance-1 proper, and no 2-colored path on 4
    # vertices. `ptr/nbr` is the adjacency without self loops.
    colors = np.full(n, -1, np.int64)
    forbidden = np.full(n + 1, -1, np.int64)
    cnt = np.zeros(n + 1, np.int64)
    for v in order:
        for p in range(ptr[v], ptr[v + 1]):
            c = colors[nbr[p]]
            if c >= 0:
                forbidden[c] = v
                cnt[c] += 1
        for p in range(ptr[v], ptr[v + 1]):
            w = nbr[p]
            cw = colors[w]
            if cw < 0:
                continue
            v_twice = cnt[cw] >= 2
            for q in range(ptr[w], ptr[w + 1]):
                x = nbr[q]
                cx = colors[x]
                if x == v or cx < 0 or forbidden[cx] == v:
                    continue
                if v_twice:
                    forbidden[cx] = v
                    continue
                # does x have another neighbor y != w with color cw?
                for s in range(ptr[x], ptr[x + 1]):
                    y = nbr[s]
                    if y != w and colors[y] == cw:
                        forbidden[cx] = v
                        break
        for p in range(ptr[v], ptr[v + 1]):
            c = colors[nbr[p]]
            if c >= 0:
                cnt[c] = 0
        c = 0
        while forbidden[c] == v:
            c += 1
        colors[v] = c
    return colors


def _dsatur_d2(pattern: SparsityPattern) -> np.ndarray:
    """DSATUR (saturation-degree order, chosen dynamically) on the column
    intersection graph. Quadratic: only used for small patterns."""
    import scipy.sparse as sp

    n = pattern.block_cols
    A = sp.csr_array(
        (np.ones(pattern.nnz, np.int8), pattern.indices, pattern.indptr),
        shape=(pattern.block_rows, n),
    )
    G = (A.T @ A).tocsr()
    G.setdiag(0)
    G.eliminate_zeros()
    deg = np.diff(G.indptr)
    K = int(deg.max()) + 2 if n else 1
    seen = np.zeros((n, K), bool)
    sat = np.zeros(n, np.int64)
    colors = np.full(n, -1, np.int64)
    key_deg = deg.astype(np.float64) / (deg.max() + 1.0)
    for _ in range(n):
        score = np.where(colors < 0, sat + key_deg, -1.0)
        v = int(np.argmax(score))
        c = int(np.argmin(seen[v]))
        colors[v] = c
        nb = G.indices[G.indptr[v]:G.indptr[v + 1]]
        new = ~seen[nb, c]
        sat[nb[new]] += 1
        seen[nb, c] = True
    return colors


# -- lattice (modular) colorings for stencils -----------------------------------------


def _lattice_candidates(pattern: SparsityPattern, lower: int, deadline: float):
    """Colorings `(sum_t w_t * x_t) mod K` where `x_t` are grid coordinates inferred
    from the dominant column offsets (e.g. strides 1, N, N^2 of a stencil). Finds
    the optimum `(i + 2j + 3k) mod 7` for the 3-D 7-point stencil."""
    n_rows, n_cols = pattern.block_rows, pattern.block_cols
    if n_rows != n_cols or pattern.nnz == 0:
        return
    d = pattern.indices.astype(np.int64) - pattern.row_ids
    d = d[d > 0]
    if d.size == 0:
        return
    offs, counts = np.unique(d, return_counts=True)
    strides = [int(o) for o, c in zip(offs, counts) if c >= 0.25 * counts.max()]
    # keep "axis" strides: each not a small multiple combination of smaller ones
    axes = []
    for s in strides:
        if s == 1 or not axes or s >= 2 * axes[-1]:
            axes.append(s)
    axes = sorted(set([1] + axes))[:4]
    col = np.arange(n_cols, dtype=np.int64)
    coords = []
    for t, s in enumerate(axes):
        x = col // s
        if t + 1 < len(axes):
            x = x % max(axes[t + 1] // s, 1)
        coords.append(x)
    rng = np.random.default_rng(0)
    sample_rows = np.unique(
        np.concatenate([np.arange(min(n_rows, 512)),
                        rng.integers(0, n_rows, 2048),
                        np.arange(max(n_rows - 512, 0), n_rows)])
    )
    sub_ptr = pattern.indptr
    lens = np.diff(sub_ptr)[sample_rows]
    pos = np.repeat(sub_ptr[sample_rows] - np.concatenate([[0], np.cumsum(lens)[:-1]]),
                    lens) + np.arange(lens.sum())
    s_cols = pattern.indices[pos].astype(np.int64)
    s_rows = np.repeat(np.arange(sample_rows.shape[0]), lens)
    import itertools

    for K in range(lower, lower + 3):
        if K ** (len(axes) - 1) > 400:
            return
        for w in itertools.product(range(K), repeat=len(axes) - 1):
            if time.perf_counter() > deadline:
                return
            ws = (1,) + w
            c_s = sum(wt * coords[t][s_cols] for t, wt in enumerate(ws)) % K
            key = s_rows * K + c_s
            key.sort()
            if np.any(key[1:] == key[:-1]):
                continue
            colors = sum(wt * x for wt, x in zip(ws, coords)) % K
            if is_valid_column_coloring(pattern, colors):
                yield colors, f"lattice{tuple(axes)}x{ws}"
                return


def _compress(colors: np.ndarray) -> np.ndarray:
    if colors.size and colors.min() >= 0:
        present = np.bincount(colors) > 0
        if present.all():
            return colors
    used = np.unique(colors[colors >= 0])
    remap = np.full(int(colors.max()) + 2 if colors.size else 1, -1, np.int64)
    remap[used + 1] = np.arange(used.shape[0])
    return remap[colors + 1]


def color_columns(
    pattern: SparsityPattern,
    *,
    symmetric: bool = False,
    time_budget: float = 1.0,
) -> Coloring:
    """Color the (block) columns of `pattern` so that compressed JVPs recover
    every stored entry.

    Tries, within `time_budget` seconds, and keeps the coloring with the fewest
    colors: a lattice (modular) coloring for stencil-like patterns, and greedy
    distance-2 colorings in several orders (largest-first by distance-2 degree,
    natural, reverse). It stops early at the lower bound (the densest row). For a
    structurally symmetric pattern with `symmetric=True` it also tries a greedy
    star coloring (symmetric decompression), which can need fewer colors. When
    `asdex` is installed its colorings are candidates too, so the result never
    needs more colors than asdex's.

    **Arguments:**

    - `pattern`: a [`lineax_amgx.SparsityPattern`][]; block patterns are
        colored by block column.
    - `symmetric`: allow a star coloring (the pattern must be structurally
        symmetric, and the matrix symmetric, for symmetric decompression).
    - `time_budget`: seconds to spend on trying alternatives.

    **Returns:**

    A [`lineax_amgx.Coloring`][].
    """
    t0 = time.perf_counter()
    deadline = t0 + float(time_budget)
    n = pattern.block_cols
    if n == 0 or pattern.nnz == 0:
        return Coloring(np.zeros(n, np.int32), method="empty")
    lens = np.diff(pattern.indptr)
    lower = int(lens.max())
    best: tuple[int, np.ndarray, bool, str] | None = None

    def offer(colors, sym, method):
        nonlocal best
        colors = _compress(np.asarray(colors, np.int64))
        k = int(colors.max()) + 1
        if best is None or k < best[0]:
            best = (k, colors, sym, method)

    for colors, method in _lattice_candidates(pattern, lower, deadline):
        offer(colors, False, method)
    sym_ok = symmetric and pattern.is_structurally_symmetric
    if best is not None and best[0] <= lower and not sym_ok:
        return _finish(best)
    if best is not None and n > 200_000 and time.perf_counter() > deadline:
        return _finish(best)
    if n <= 3000 and (best is None or best[0] > lower):
        offer(_dsatur_d2(pattern), False, "dsatur")

    row_ptr = pattern.indptr.astype(np.int64)
    row_cols = pattern.indices.astype(np.int64)
    pt, _ = pattern.transpose()
    col_ptr = pt.indptr.astype(np.int64)
    col_rows = pt.indices.astype(np.int64)
    work = pattern.nnz * lower
    small = _HAVE_NUMBA or work <= _NUMBA_THRESHOLD
    d2_optimal = best is not None and best[0] <= lower
    if small and not d2_optimal:
        deg = _kernel(_d2_degrees, work)(col_ptr, col_rows, row_ptr, row_cols, n)
        orders = [
            ("largest-first", np.argsort(-deg, kind="stable")),
            ("natural", np.arange(n)),
            ("smallest-degree-last", np.argsort(deg, kind="stable")[::-1].copy()),
            ("reverse", np.arange(n)[::-1].copy()),
        ]
        for name, order in orders:
            if best is not None and (
                (best[0] <= lower and not sym_ok)
                or time.perf_counter() > deadline
            ):
                break
            offer(_kernel(_greedy_d2, work)(order.astype(np.int64), col_ptr,
                                            col_rows, row_ptr, row_cols, n),
                  False, name)
    # A star coloring can beat the distance-2 bound; try it while time remains
    # (always for small patterns).
    if sym_ok and (
        best is None
        or n <= 20_000
        or (time.perf_counter() < deadline and n <= 200_000)
    ):
        rows = pattern.row_ids.astype(np.int64)
        off = rows != row_cols
        cnt = np.bincount(rows[off], minlength=n)
        ptr = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64)
        nbr = row_cols[off]
        work = nbr.size * lower * lower
        if _HAVE_NUMBA or work <= _NUMBA_THRESHOLD:
            deg1 = cnt
            for name, order in (("star-largest-first", np.argsort(-deg1,
                                                                   kind="stable")),
                                ("star-natural", np.arange(n))):
                colors = _kernel(_greedy_star, work)(order.astype(np.int64), ptr,
                                                     nbr, n)
                if star_recovery(pattern, colors) is not None:
                    offer(colors, True, name)
                if time.perf_counter() > deadline and n > 20_000:
                    break
    _asdex_candidates(pattern, sym_ok, offer, best, lower)
    if best is None:  # no numba and a big pattern: one column per color
        offer(np.arange(n), False, "trivial")
    return _finish(best)


def _asdex_candidates(pattern, sym_ok, offer, best, lower):
    if best is not None and best[0] <= lower and not sym_ok:
        return
    if best is not None and pattern.block_cols > 200_000:
        return  # asdex's greedy is one of ours (largest-first) at this size
    try:
        import asdex
    except ImportError:
        return
    try:
        sp = asdex.SparsityPattern.from_coo(
            pattern.row_ids.astype(np.int32),
            pattern.indices.astype(np.int32),
            (pattern.block_rows, pattern.block_cols),
        )
        colors, _ = asdex.color_cols(sp)
        if is_valid_column_coloring(pattern, colors):
            offer(colors, False, "asdex")
        if sym_ok:
            for post in (False, True):
                colors, _, _ = asdex.color_symmetric(sp, postprocess=post)
                if star_recovery(pattern, colors) is not None:
                    offer(colors, True, "asdex-star")
    except Exception:  # pragma: no cover - asdex API drift
        return


def _finish(best) -> Coloring:
    k, colors, sym, method = best
    return Coloring(colors, symmetric=sym, method=method)
