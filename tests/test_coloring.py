# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

import jax

jax.config.update("jax_enable_x64", True)


import hypothesis.strategies as st  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.spatial  # noqa: E402
from helpers import import_asdex  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from lineax_amgx._pattern import SparsityPattern  # noqa: E402
from lineax_amgx.matrix_free import _coloring  # noqa: E402
from lineax_amgx.matrix_free._coloring import (  # noqa: E402
    AsdexWarning,
    Coloring,
    color_columns,
    is_valid_column_coloring,
    star_recovery,
)


def _pattern(A):
    A = sp.csr_array(A)
    A.sum_duplicates()
    A.sort_indices()
    return SparsityPattern(A.indptr, A.indices, A.shape)


def laplacian(n, d):
    T = sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)],
                       offsets=[-1, 0, 1])
    Id = sp.identity(n)
    if d == 2:
        return _pattern(sp.kron(T, Id) + sp.kron(Id, T))
    return _pattern(sp.kron(sp.kron(T, Id), Id) + sp.kron(sp.kron(Id, T), Id)
                    + sp.kron(sp.kron(Id, Id), T))


def _brute_valid(p, colors):
    """Reference check, written differently: dense column-intersection test."""
    D = p.to_scipy(np.ones(p.nnz)).toarray() != 0
    for c in np.unique(colors):
        if np.any(D[:, colors == c].sum(axis=1) > 1):
            return False
    return True


def _asdex_colors(asdex, p, symmetric=False):
    """asdex's number of colors (greedy distance-2, or star when symmetric)."""
    sa = asdex.SparsityPattern.from_coo(p.row_ids, p.indices, p.shape)
    if symmetric:
        return asdex.color_symmetric(sa)[1]
    return asdex.color_cols(sa)[1]


@pytest.mark.parametrize("n", [5, 16, 64])
def test_2d_five_point_gets_five(n):
    p = laplacian(n, 2)
    c = color_columns(p)
    assert c.num_colors == 5
    assert is_valid_column_coloring(p, c.colors)
    if n <= 16:
        assert _brute_valid(p, c.colors)


@pytest.mark.parametrize("n", [4, 10, 20])
def test_3d_seven_point_reaches_bound_seven(n):
    p = laplacian(n, 3)
    c = color_columns(p)
    assert c.num_colors == 7
    assert is_valid_column_coloring(p, c.colors)


def _random_pattern(seed, m, n, density, symmetric):
    rng = np.random.default_rng(seed)
    A = sp.random_array((m, n), density=density, rng=rng) != 0
    if symmetric:
        A = (A + A.T + sp.identity(n)) != 0
    return _pattern(A.astype(float))


_RANDOM = (st.integers(0, 10_000), st.integers(5, 60), st.floats(0.02, 0.3),
           st.booleans())


@settings(max_examples=25, deadline=None)
@given(*_RANDOM)
def test_random_patterns_valid(seed, n, density, sym):
    p = _random_pattern(seed, n if sym else n + 3, n, density, sym)
    c = color_columns(p, symmetric=sym)
    if c.symmetric:
        assert star_recovery(p, c.colors) is not None
    else:
        assert _brute_valid(p, c.colors)


@settings(max_examples=10, deadline=None)
@given(*_RANDOM)
def test_random_patterns_not_worse_than_asdex(seed, n, density, sym):
    asdex = import_asdex()
    p = _random_pattern(seed, n if sym else n + 3, n, density, sym)
    c = color_columns(p, symmetric=sym)
    assert c.num_colors <= _asdex_colors(asdex, p)
    if sym:
        assert c.num_colors <= _asdex_colors(asdex, p, symmetric=True)


def _fem_pattern():
    pts = np.random.default_rng(0).random((200, 2))
    tri = scipy.spatial.Delaunay(pts).simplices
    r = np.repeat(tri, 3, axis=1).ravel()
    cc = np.tile(tri, (1, 3)).ravel()
    return _pattern(sp.coo_array((np.ones(r.size), (r, cc)), shape=(200, 200)))


def test_fem_mesh_star_coloring():
    p = _fem_pattern()
    d2 = color_columns(p)
    star = color_columns(p, symmetric=True)
    assert _brute_valid(p, d2.colors)
    assert star.num_colors <= d2.num_colors
    if star.symmetric:
        assert star_recovery(p, star.colors) is not None


def test_fem_mesh_not_worse_than_asdex():
    asdex = import_asdex()
    p = _fem_pattern()
    assert color_columns(p).num_colors <= _asdex_colors(asdex, p)


def test_star_recovery_rejects_invalid():
    p = laplacian(4, 2)
    assert star_recovery(p, np.zeros(16, np.int64)) is None


def test_coloring_is_immutable_and_hashable():
    p = laplacian(6, 2)
    a, b = color_columns(p), color_columns(p)
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    with pytest.raises(AttributeError):
        a.num_colors = 3
    with pytest.raises(ValueError):
        a.colors[0] = 1
    assert isinstance(a, Coloring) and a.colors.dtype == np.int32


# -- asdex failures inside the search warn ------------------------------------------


class _FailingFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import asdex` fail as asdex 0.5.2 does under jax 0.12."""

    def find_spec(self, name, path=None, target=None):
        if name == "asdex":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("cannot import name 'ClosedJaxpr' from 'jax._src.core'")


def _needs_asdex():
    # symmetric=True on a structurally symmetric pattern: asdex's star coloring
    # is always among the candidates.
    return _random_pattern(7, 30, 30, 0.1, True)


def _asdex_warnings(monkeypatch, module=None, finder=None):
    monkeypatch.delitem(sys.modules, "asdex", raising=False)
    if module is not None:
        monkeypatch.setitem(sys.modules, "asdex", module)
    if finder is not None:
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    p = _needs_asdex()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = color_columns(p, symmetric=True)
    assert star_recovery(p, c.colors) is not None  # our own colorings stand
    return [w for w in caught if issubclass(w.category, AsdexWarning)]


def test_asdex_api_drift_warns(monkeypatch):
    fake = types.ModuleType("asdex")

    class SparsityPattern:
        @staticmethod
        def from_coo(rows, cols, shape):
            raise TypeError("from_coo() got an unexpected keyword argument 'n'")

    fake.SparsityPattern = SparsityPattern
    (w,) = _asdex_warnings(monkeypatch, module=fake)
    msg = str(w.message)
    assert "asdex" in msg and "TypeError" in msg and "unexpected keyword" in msg
    assert w.filename == __file__  # attributed to the caller of color_columns


def test_asdex_that_does_not_import_warns(monkeypatch):
    (w,) = _asdex_warnings(monkeypatch, finder=_FailingFinder())
    msg = str(w.message)
    assert "asdex" in msg and "ImportError" in msg and "ClosedJaxpr" in msg


def test_asdex_not_installed_is_silent(monkeypatch):
    # `None` in sys.modules: `import asdex` raises ModuleNotFoundError('asdex').
    monkeypatch.setitem(sys.modules, "asdex", None)
    p = _needs_asdex()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        color_columns(p, symmetric=True)
    assert not [w for w in caught if issubclass(w.category, AsdexWarning)]
# -- without numba (and without asdex) ----------------------------------------------


def _mesh_pattern(n, seed=0):
    """The pattern of a P1 finite-element matrix on a random Delaunay mesh: an
    unstructured pattern, with no lattice coloring."""
    pts = np.random.default_rng(seed).random((n, 2))
    tri = scipy.spatial.Delaunay(pts).simplices
    r = np.repeat(tri, 3, axis=1).ravel()
    cc = np.tile(tri, (1, 3)).ravel()
    return _pattern(sp.coo_array((np.ones(r.size), (r, cc)), shape=(n, n)))


def _sparse_valid(p, colors):
    """Reference check, written differently: the compressed pattern (one column
    per color, entries summed) has no entry above one."""
    A = p.to_scipy(np.ones(p.nnz))
    seed = sp.csr_array((np.ones(colors.size), (np.arange(colors.size), colors)))
    return (A @ seed).max() <= 1


@pytest.fixture
def no_asdex(monkeypatch):
    monkeypatch.setitem(sys.modules, "asdex", None)  # `import asdex` fails


def test_without_numba_colors_within_twice_numba(monkeypatch, no_asdex):
    pytest.importorskip("numba")
    p = _mesh_pattern(10_000)
    with_numba = color_columns(p)
    monkeypatch.setattr(_coloring, "_HAVE_NUMBA", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = color_columns(p)
    # Large enough that plain Python would not run the greedy kernels (before
    # numpy's greedy, this pattern got one color per column).
    assert p.nnz * int(np.diff(p.indptr).max()) > _coloring._NUMBA_THRESHOLD
    assert c.method == "largest-first-numpy"
    assert _sparse_valid(p, c.colors)
    assert c.num_colors <= 2 * with_numba.num_colors, (c, with_numba)
    assert c.num_colors < 100


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 80), st.floats(0.01, 0.3))
def test_numpy_greedy_is_the_sequential_greedy(seed, n, density):
    p = _random_pattern(seed, n + 5, n, density, False)
    order = np.random.default_rng(seed).permutation(n)
    rows = p.row_ids.astype(np.int64)
    cols = p.indices.astype(np.int64)
    pt, _ = p.transpose()
    # The sequential loop in plain Python (numba is not involved here).
    expected = _coloring._greedy_d2(order, pt.indptr, pt.indices, p.indptr,
                                    p.indices, n)
    got = _coloring._greedy_d2_by_class(order, rows, cols, n)
    np.testing.assert_array_equal(got, expected)


def test_forced_trivial_coloring_warns(monkeypatch, no_asdex):
    p = _mesh_pattern(10_000)
    monkeypatch.setattr(_coloring, "_HAVE_NUMBA", False)
    monkeypatch.setattr(_coloring, "_greedy_d2_by_class",
                        lambda order, rows, cols, n: np.arange(n))
    with pytest.warns(UserWarning, match=r"10000 colors .*pip install numba"):
        c = color_columns(p)
    assert c.num_colors == 10_000


def test_many_colors_warn_names_the_fix():
    # Every pair of 12 columns shares a row of two entries: 12 colors are
    # needed against a lower bound of 2.
    i, j = np.triu_indices(12, 1)
    r = np.repeat(np.arange(i.size), 2)
    p = _pattern(sp.coo_array((np.ones(r.size), (r, np.stack([i, j], 1).ravel())),
                              shape=(i.size, 12)))
    with pytest.warns(UserWarning,
                      match=r"12 colors .*lx.symmetric_tag.*symmetric=True"):
        c = color_columns(p)
    assert c.num_colors == 12


def test_near_bound_coloring_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        color_columns(_mesh_pattern(2000))
        color_columns(laplacian(16, 2))
