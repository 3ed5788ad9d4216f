# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""`detect_sparsity`: exact Jacobian sparsity by tracing, probing as the fallback."""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ..._pattern import SparsityPattern
from . import _sets as S
from ._interpret import eval_jaxpr
from ._values import Context, Unsupported, _Val

# -- tracing -------------------------------------------------------------------------


def _const_vals(consts):
    out = []
    for i, c in enumerate(consts):
        if isinstance(c, jax.core.Tracer):
            out.append(_Val(c.shape, c.dtype))
            continue
        try:
            k = np.asarray(c)
        except Exception:
            out.append(_Val(getattr(c, "shape", ()), getattr(c, "dtype", None)))
            continue
        out.append(_Val(k.shape, k.dtype, known=k, roots=frozenset([i]),
                        direct=True))
    return out


def trace_closed_jaxpr(closed) -> tuple[SparsityPattern, dict[int, str]]:
    """Index-set propagation through a closed jaxpr whose inputs are the unknowns
    (flattened in order, ravel order within each input). Returns the pattern and
    the constants (by position) whose values were consulted, with how."""
    in_avals = [v.aval for v in closed.jaxpr.invars]
    sizes = [int(np.prod(a.shape, dtype=np.int64)) for a in in_avals]
    n = int(sum(sizes))
    in_vals, off = [], 0
    for a, size in zip(in_avals, sizes):
        in_vals.append(_Val(a.shape, a.dtype, sets=S.identity(size, off)))
        off += size
    ctx = Context()
    outs = eval_jaxpr(closed.jaxpr, _const_vals(closed.consts), in_vals, ctx)
    rows = S.dedup(S.concat([o.get_sets() for o in outs]), n)
    m = rows.n
    pattern = SparsityPattern(
        rows.indptr, rows.idx, (m, n), method="traced", check=False
    )
    return pattern, dict(ctx.consulted)


# -- probing ----------------------------------------------------------------------


def _concrete_consts(consts, rng):
    out = []
    for c in consts:
        if isinstance(c, jax.core.Tracer):
            # Unknown at trace time: a random stand-in (treated as nonzero).
            out.append(np.asarray(rng.standard_normal(c.shape) + 2.0, c.dtype)
                       if jnp.issubdtype(c.dtype, jnp.inexact)
                       else np.ones(c.shape, c.dtype))
        else:
            out.append(c)
    return out


def _cast(x, dtype):
    """`x` as `dtype`; a complex probe reaches a real input as its real part."""
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.real(x)
    return x.astype(dtype)


def probe_closed_jaxpr(
    closed, x_leaves=None, *, max_elements: int = 2**24, seed: int = 0
) -> SparsityPattern:
    """Exhaustive probing: the nonzero pattern of the Jacobian (basis-vector JVPs,
    vmapped in memory-bounded batches) at `x` and at a random perturbation of `x`,
    united. Misses entries that are zero at both points (value-dependent zeros)."""
    rng = np.random.default_rng(seed)
    in_avals = [v.aval for v in closed.jaxpr.invars]
    shapes = [a.shape for a in in_avals]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    n = int(sum(sizes))
    dtypes = [a.dtype for a in in_avals]
    consts = _concrete_consts(closed.consts, rng)
    if x_leaves is None or any(isinstance(x, jax.core.Tracer) for x in x_leaves):
        x0 = rng.standard_normal(n)
    else:
        x0 = np.concatenate([np.ravel(np.asarray(x)) for x in x_leaves]
                            ) if n else np.zeros(0)
    splits = np.cumsum(sizes)[:-1]

    def f_flat(v):
        parts = jnp.split(v, splits) if len(sizes) > 1 else [v]
        args = [_cast(p.reshape(s), d) for p, s, d in zip(parts, shapes, dtypes)]
        outs = jax.core.eval_jaxpr(closed.jaxpr, consts, *args)
        return jnp.concatenate([jnp.ravel(o).astype(v.dtype) for o in outs]
                               ) if outs else jnp.zeros(0, v.dtype)

    out_avals = [v.aval for v in closed.jaxpr.outvars]
    m = int(sum(int(np.prod(a.shape, dtype=np.int64)) for a in out_avals))
    batch = int(max(1, min(n, max_elements // max(m, 1))))
    rows_all, cols_all = [], []
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    if any(jnp.issubdtype(a.dtype, jnp.complexfloating)
           for a in [*in_avals, *out_avals]):
        # Complex seeds and outputs: a real probe would drop imaginary entries.
        dt = jnp.complex128 if jax.config.jax_enable_x64 else jnp.complex64
    points = [x0, x0 + (0.5 + np.abs(x0)) * rng.standard_normal(n)]
    with jax.ensure_compile_time_eval():
        for p in points:
            pj = jnp.asarray(p, dt)

            @jax.jit
            def jvps(start, pj=pj):
                e = jax.nn.one_hot(start + jnp.arange(batch), n, dtype=dt)
                return jax.vmap(lambda t: jax.jvp(f_flat, (pj,), (t,))[1])(e)

            for start in range(0, n, batch):
                blk = np.asarray(jvps(start))  # (batch, m)
                c, r = np.nonzero(blk)
                c = c + start
                keep = c < n
                rows_all.append(r[keep])
                cols_all.append(c[keep])
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    cols = np.concatenate(cols_all) if cols_all else np.zeros(0, np.int64)
    key = np.unique(rows.astype(np.int64) * max(n, 1) + cols)
    r = key // max(n, 1)
    c = key - r * max(n, 1)
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=m), out=indptr[1:])
    return SparsityPattern(indptr, c, (m, n), method="probed", check=False)


# -- memoisation -----------------------------------------------------------------

_MEMO_SIZE = 256
_lock = threading.Lock()
_memo: collections.OrderedDict[Any, list] = collections.OrderedDict()
_counter = {"detections": 0, "hits": 0}


def detection_count() -> int:
    """How many times a sparsity pattern was actually detected (memo misses)."""
    return _counter["detections"]


def clear_detection_cache():
    """Forget all memoised patterns (the counter is kept)."""
    with _lock:
        _memo.clear()


def _fingerprint(c, kind: str) -> bytes:
    a = np.asarray(c)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((a.shape, a.dtype.str, kind)).encode())
    if kind == "zero":
        h.update(np.packbits((a != 0).reshape(-1)).tobytes())
    else:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def _nested_consts_digest(jaxpr, h):
    for eqn in jaxpr.eqns:
        for p in eqn.params.values():
            items = p if isinstance(p, (tuple, list)) else (p,)
            for it in items:
                if hasattr(it, "jaxpr") and hasattr(it, "consts"):
                    for c in it.consts:
                        if isinstance(c, jax.core.Tracer):
                            h.update(b"T")
                        else:
                            try:
                                h.update(np.ascontiguousarray(np.asarray(c)).tobytes())
                            except Exception:
                                h.update(repr(c).encode())
                    _nested_consts_digest(it.jaxpr, h)
                elif hasattr(it, "eqns"):
                    _nested_consts_digest(it, h)


def _structure_key(closed):
    h = hashlib.blake2b(digest_size=16)
    h.update(str(closed.jaxpr).encode())
    for c in closed.consts:
        tr = isinstance(c, jax.core.Tracer)
        h.update(str((getattr(c, "shape", ()), str(getattr(c, "dtype", "")), tr))
                 .encode())
    _nested_consts_digest(closed.jaxpr, h)
    return h.digest()


def detect_closed_jaxpr(
    closed, x_leaves=None, *, method: str = "auto", memo: bool = True
) -> SparsityPattern:
    """Sparsity of the Jacobian of a closed jaxpr with respect to all its inputs,
    memoised on the jaxpr's structure and on the constants that shaped it."""
    key = (_structure_key(closed), method) if memo else None
    if key is not None:
        with _lock:
            entries = _memo.get(key)
            if entries is not None:
                _memo.move_to_end(key)
                entries = list(entries)
        for checks, pattern in entries or ():
            if all(
                _fingerprint(closed.consts[i], kind) == fp for i, kind, fp in checks
            ):
                _counter["hits"] += 1
                return pattern
    _counter["detections"] += 1
    pattern, consulted = None, {}
    if method in ("auto", "traced"):
        try:
            pattern, consulted = trace_closed_jaxpr(closed)
        except Unsupported:
            if method == "traced":
                raise
    if pattern is None:
        pattern = probe_closed_jaxpr(closed, x_leaves)
        # A probed pattern depends on every constant's value.
        consulted = {
            i: "value"
            for i, c in enumerate(closed.consts)
            if not isinstance(c, jax.core.Tracer)
        }
    if key is not None:
        checks = tuple(
            (i, kind, _fingerprint(closed.consts[i], kind))
            for i, kind in sorted(consulted.items())
        )
        with _lock:
            _memo.setdefault(key, []).append((checks, pattern))
            _memo.move_to_end(key)
            while len(_memo) > _MEMO_SIZE:
                _memo.popitem(last=False)
    return pattern


def _abstract(x):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a),
                                                       jnp.result_type(a)), x)


def detect_sparsity(
    fn: Callable[[PyTree], PyTree],
    x: PyTree,
    *,
    method: str = "auto",
    memo: bool = True,
) -> SparsityPattern:
    """The sparsity pattern of the Jacobian of `fn` at `x`.

    Index sets are propagated through the jaxpr of `fn`, one rule per primitive
    (the method of Hill & Dalle, 2025, as in SparseConnectivityTracer.jl).
    Constants and literals of the jaxpr are known values, so products with exact
    zeros of a constant, `select_n` with a constant mask, gathers/scatters with
    constant indices, convolutions with zero kernel entries and loops that index
    with their counter are all resolved exactly. Values that depend on `x`
    (comparisons, `abs`, `max`, ...) are treated conservatively: the result is
    a superset of the true pattern, valid for every `x`.

    Where a primitive has no rule, the pattern is found by exhaustive probing
    instead: basis-vector JVPs (vmapped, in memory-bounded batches) at `x` and at
    a random perturbation of `x`, united. Probing can miss entries that happen
    to be zero at both points (value-dependent zeros). The result's `method`
    says which ran (`"traced"` or `"probed"`).

    Patterns are memoised per jaxpr (and per the constants whose values shaped
    them), so calling this again for the same function structure is cheap.

    **Arguments:**

    - `fn`: the function; inputs and outputs may be any pytrees of arrays.
    - `x`: the point (only shapes and dtypes matter for tracing). Inputs and
        outputs are flattened leaf by leaf, each leaf in ravel (C) order.
    - `method`: `"auto"` (trace, probe as a fallback), `"traced"` (raise
        if tracing is not possible) or `"probed"`.
    - `memo`: whether to use the pattern memo.

    **Returns:**

    A [`lineax_amgx.SparsityPattern`][] of shape `(output size, input size)`.
    """
    if method not in ("auto", "traced", "probed"):
        raise ValueError(
            f"method must be 'auto', 'traced' or 'probed', got {method!r}."
        )
    closed = jax.make_jaxpr(fn)(_abstract(x))
    leaves = jax.tree.leaves(x)
    return detect_closed_jaxpr(closed, leaves, method=method, memo=memo)


__all__ = [
    "detect_sparsity",
    "detect_closed_jaxpr",
    "detection_count",
    "clear_detection_cache",
    "probe_closed_jaxpr",
    "trace_closed_jaxpr",
]
