# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""Known values in the sparsity interpreter: evaluating a primitive on NumPy
inputs, and the index-array helpers the structural rules share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _sets as S
from ._values import _unknown, _Val

# Structural primitives: data operands' positions (None: all), or "select".
_STRUCTURAL = {
    "slice": None,
    "pad": None,
    "reshape": None,
    "transpose": None,
    "broadcast_in_dim": (0,),
    "squeeze": None,
    "expand_dims": None,
    "rev": None,
    "concatenate": None,
    "copy": None,
    "copy_p": None,
    "dynamic_slice": (0,),
    "dynamic_update_slice": (0, 1),
    "gather": (0,),
    "select_n": "select",
    "split": None,
}


def _is_float(dtype) -> bool:
    try:
        return bool(jnp.issubdtype(dtype, jnp.inexact))
    except TypeError:
        return False


def _to_numpy(x):
    try:
        return np.asarray(x)
    except Exception:  # e.g. PRNG key arrays
        return None


def _bind(eqn, args, params=None):
    bp = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    subfuns = ()
    if isinstance(bp, tuple):
        subfuns, bp = bp
    with jax.ensure_compile_time_eval():
        return eqn.primitive.bind(*subfuns, *args, **bp)


def _np_dot_general(a, b, dimension_numbers, **_):
    (lc, rc), (lb, rb) = dimension_numbers
    lf = [d for d in range(a.ndim) if d not in tuple(lc) + tuple(lb)]
    rf = [d for d in range(b.ndim) if d not in tuple(rc) + tuple(rb)]
    A = a.transpose(tuple(lb) + tuple(lf) + tuple(lc))
    B = b.transpose(tuple(rb) + tuple(rc) + tuple(rf))
    bs = A.shape[: len(lb)]
    fa, fb = A.shape[len(lb): len(lb) + len(lf)], B.shape[len(rb) + len(rc):]
    K = int(np.prod(A.shape[len(lb) + len(lf):], dtype=np.int64))
    A = A.reshape(bs + (int(np.prod(fa, dtype=np.int64)), K))
    B = B.reshape(bs + (K, int(np.prod(fb, dtype=np.int64))))
    return (A @ B).reshape(bs + fa + fb)


def _np_int_div(a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        q = np.abs(a) // np.where(b == 0, 1, np.abs(b))
        return np.sign(a) * np.sign(b) * q
    return np.true_divide(a, b)


def _np_iota(dtype, shape, dimension, **_):
    a = np.arange(shape[dimension], dtype=dtype)
    sh = [1] * len(shape)
    sh[dimension] = shape[dimension]
    return np.broadcast_to(a.reshape(sh), shape)


def _np_reduce(fn):
    return lambda x, axes, **_: fn(x, axis=tuple(axes))


_NP_ELEMENTWISE = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _np_int_div,
    "neg": np.negative, "sin": np.sin, "cos": np.cos, "tan": np.tan,
    "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "abs": np.abs,
    "tanh": np.tanh, "max": np.maximum, "min": np.minimum, "eq": np.equal,
    "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal, "and": np.bitwise_and, "or": np.bitwise_or,
    "not": np.invert, "xor": np.bitwise_xor, "sign": np.sign, "floor": np.floor,
    "ceil": np.ceil, "rem": np.fmod, "pow": np.power, "square": np.square,
    "atan2": np.arctan2, "log1p": np.log1p, "expm1": np.expm1,
}


def _np_eval(eqn, args):
    """Evaluate a primitive on known NumPy values without compiling anything."""
    name = eqn.primitive.name
    p = eqn.params
    if name in _NP_ELEMENTWISE:
        with np.errstate(all="ignore"):
            return _NP_ELEMENTWISE[name](*args)
    if name == "convert_element_type":
        return args[0].astype(p["new_dtype"])
    if name == "integer_pow":
        return args[0] ** p["y"]
    if name == "iota":
        return _np_iota(p["dtype"], p["shape"], p["dimension"])
    if name == "dot_general":
        return _np_dot_general(*args, p["dimension_numbers"])
    if name == "reduce_sum":
        return _np_reduce(np.sum)(args[0], **p)
    if name == "reduce_max":
        return _np_reduce(np.max)(args[0], **p)
    if name == "reduce_min":
        return _np_reduce(np.min)(args[0], **p)
    if name in _STRUCTURAL:
        outs = _structural_numpy(name, p, list(args), list(args))
        if outs is not None and len(outs) == 1:
            return outs[0]
    return None


def _eval_known(eqn, invals):
    out = None
    if not eqn.primitive.multiple_results:
        try:
            out = _np_eval(eqn, [v.known for v in invals])
        except Exception:
            out = None
        if out is not None:
            aval = eqn.outvars[0].aval
            out = np.asarray(out).astype(aval.dtype, copy=False).reshape(aval.shape)
    if out is None:
        out = _bind(eqn, [v.known for v in invals])
    outs = out if eqn.primitive.multiple_results else [out]
    roots = frozenset().union(*[v.roots for v in invals]) if invals else frozenset()
    res = []
    for var, o in zip(eqn.outvars, outs):
        k = _to_numpy(o)
        aval = var.aval
        if k is None:
            res.append(_unknown(aval))
        else:
            res.append(_Val(aval.shape, aval.dtype, known=k, roots=roots))
    return res


# -- helpers -----------------------------------------------------------------------


def _index_dtype(total):
    return np.int32 if total < np.iinfo(np.int32).max else np.int64


def _data_indices(vals):
    """Index arrays that encode each element of the data operands (-1: no deps),
    and the concatenated sets they index into."""
    total = sum(v.size for v in vals if v.has_deps)
    dt = _index_dtype(total)
    arrays, sets, off = [], [], 0
    for v in vals:
        if v.has_deps:
            arrays.append((np.arange(v.size, dtype=dt) + dt(off)).reshape(v.shape))
            sets.append(v.sets)
            off += v.size
        else:
            arrays.append(np.full(v.shape, -1, dt))
    return arrays, (S.concat(sets) if sets else None)


def _bcast_index(v: _Val, shape) -> np.ndarray:
    a = np.arange(v.size, dtype=np.int64).reshape(v.shape)
    return np.broadcast_to(a, shape)


def _elementwise(out_aval, parts):
    """Union of operands' sets per element. `parts`: list of (val, drop_mask|None)."""
    shape = out_aval.shape
    n = int(np.prod(shape, dtype=np.int64))
    pieces = []
    for v, drop in parts:
        if not v.has_deps:
            continue
        if v.shape == tuple(shape) and drop is None:
            pieces.append(v.sets)
            continue
        m = _bcast_index(v, shape)
        if drop is not None:
            m = np.where(np.broadcast_to(drop, shape), -1, m)
        pieces.append(S.gather(v.sets, m))
    if not pieces:
        return _unknown(out_aval)
    if len(pieces) == 1:
        return _unknown(out_aval, pieces[0])
    return _unknown(out_aval, S.union(pieces)) if n else _unknown(out_aval)


# -- structural primitives on index arrays --------------------------------------------


def _np_pad(a, pv, config):
    shape = []
    for size, (lo, hi, interior) in zip(a.shape, config):
        full = lo + hi + size + max(size - 1, 0) * interior
        shape.append(max(full, 0))
    out = np.full(shape, pv, dtype=a.dtype)
    srcs, dsts = [], []
    for size, d, (lo, _, interior) in zip(a.shape, shape, config):
        pos = lo + np.arange(size) * (interior + 1)
        ok = (pos >= 0) & (pos < d)
        srcs.append(np.nonzero(ok)[0])
        dsts.append(pos[ok])
    out[np.ix_(*dsts)] = a[np.ix_(*srcs)]
    return out


def _clamp_starts(starts, shape, sizes):
    return [
        int(min(max(int(s), 0), d - z)) for s, d, z in zip(starts, shape, sizes)
    ]


def _structural_numpy(name, params, arrs, known):
    """NumPy versions of common structural primitives (no XLA compile)."""
    if name == "slice":
        strides = params["strides"] or (1,) * arrs[0].ndim
        sl = tuple(
            slice(s, e, st)
            for s, e, st in zip(params["start_indices"], params["limit_indices"],
                                strides)
        )
        return [arrs[0][sl]]
    if name == "pad":
        return [_np_pad(arrs[0], arrs[1].reshape(()), params["padding_config"])]
    if name == "reshape" and params.get("dimensions") is None:
        return [arrs[0].reshape(params["new_sizes"])]
    if name == "transpose":
        return [arrs[0].transpose(params["permutation"])]
    if name == "broadcast_in_dim":
        if len(arrs) != 1:
            return None
        shape = params["shape"]
        tmp = [1] * len(shape)
        for i, d in enumerate(params["broadcast_dimensions"]):
            tmp[d] = arrs[0].shape[i]
        return [np.broadcast_to(arrs[0].reshape(tmp), shape)]
    if name == "squeeze":
        return [np.squeeze(arrs[0], axis=tuple(params["dimensions"]))]
    if name == "expand_dims":
        return [np.expand_dims(arrs[0], tuple(params["dimensions"]))]
    if name == "rev":
        return [np.flip(arrs[0], tuple(params["dimensions"]))]
    if name == "concatenate":
        return [np.concatenate(arrs, axis=params["dimension"])]
    if name in ("copy", "copy_p"):
        return [arrs[0]]
    if name == "dynamic_slice":
        a = arrs[0]
        sizes = params["slice_sizes"]
        st = _clamp_starts([k.reshape(()) for k in known[1:]], a.shape, sizes)
        return [a[tuple(slice(s, s + z) for s, z in zip(st, sizes))]]
    if name == "dynamic_update_slice":
        a, u = arrs[0].copy(), arrs[1]
        st = _clamp_starts([k.reshape(()) for k in known[2:]], a.shape, u.shape)
        a[tuple(slice(s, s + z) for s, z in zip(st, u.shape))] = u
        return [a]
    if name == "select_n":
        pred = known[0]
        cases = arrs[1:]
        if pred.dtype == bool:
            return [np.where(np.broadcast_to(pred, cases[0].shape), cases[1],
                             cases[0])]
        p = np.broadcast_to(pred.astype(np.int64), cases[0].shape)
        return [np.choose(p, cases)]
    return None


# primitive -> positions of operands that carry data (others must be known)
