# Copyright 2026 The lineax-amgx authors.
# Licensed under the Apache License, Version 2.0.
"""Propagate index sets through a jaxpr, one rule per primitive.

Every jaxpr variable becomes a `_Val`: either a *known* NumPy value (literals,
concrete constants, and anything computed only from them, e.g. `iota`, masks,
loop counters) or an *unknown* value with an `IndexSets` of input dependencies.
Known values make the analysis exact where a global analysis is not: a product
with an exact zero of a constant drops the dependency, `select_n` with a constant
mask picks per element, gathers/scatters/dynamic slices with constant indices
move dependencies exactly, and loops with known trip counts are unrolled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _sets as S

try:
    from jax.extend.core import Literal as _Literal
except ImportError:  # pragma: no cover
    from jax.core import Literal as _Literal

from ._numeric import (
    _STRUCTURAL,
    _bind,
    _data_indices,
    _elementwise,
    _eval_known,
    _index_dtype,
    _is_float,
    _structural_numpy,
    _to_numpy,
)
from ._values import (
    _UNROLL_BUDGET,
    Unsupported,
    _unknown,
    _Val,
)


def _rule_structural(eqn, invals, ctx):
    name = eqn.primitive.name
    spec = _STRUCTURAL[name]
    n_ops = len(invals)
    if spec is None:
        data_pos = tuple(range(n_ops))
    elif spec == "select":
        data_pos = tuple(range(1, n_ops))
    else:
        data_pos = spec
    others = [i for i in range(n_ops) if i not in data_pos]
    for i in others:
        if not invals[i].is_known:
            return _rule_index_unknown(eqn, invals, data_pos)
        ctx.consult(invals[i], "value")
    data = [invals[i] for i in data_pos]
    arrays, cat = _data_indices(data)
    if cat is None:
        return [_unknown(v.aval) for v in eqn.outvars]
    arrs = [None] * n_ops
    for i, a in zip(data_pos, arrays):
        arrs[i] = a
    known = [v.known if v.is_known else None for v in invals]
    outs = _structural_numpy(name, eqn.params, arrs, known)
    if outs is None:
        ops = [arrs[i] if i in data_pos else known[i] for i in range(n_ops)]
        params = dict(eqn.params)
        if name == "gather" and params.get("fill_value") is None:
            params["fill_value"] = -1
        o = _bind(eqn, ops, params)
        outs = [np.asarray(x) for x in (o if eqn.primitive.multiple_results else [o])]
    return [
        _unknown(var.aval, S.gather(cat, np.asarray(o)))
        for var, o in zip(eqn.outvars, outs)
    ]


def _rule_index_unknown(eqn, invals, data_pos):
    name = eqn.primitive.name
    if name == "select_n":
        # Data-dependent mask: union of all cases per element.
        return [_elementwise(eqn.outvars[0].aval, [(invals[i], None)
                                                   for i in data_pos])]
    # Unknown indices: every output element may depend on any data element.
    return [_dense(var.aval, [invals[i] for i in data_pos]) for var in eqn.outvars]


def _dense(aval, vals):
    pieces = [v.sets for v in vals if v.has_deps]
    n = int(np.prod(aval.shape, dtype=np.int64))
    if not pieces:
        return _unknown(aval)
    allsets = S.dedup(S.concat(pieces))
    # one row holding every dependency, then broadcast
    one = S.IndexSets(np.array([0, allsets.nnz], np.int64),
                      np.unique(allsets.idx), clean=True)
    one = S.IndexSets(np.array([0, one.idx.shape[0]], np.int64), one.idx, clean=True)
    return _unknown(aval, S.gather(one, np.zeros(n, np.int64)))


# -- elementwise -------------------------------------------------------------------

_ZERO_DERIV = {
    "sign", "floor", "ceil", "round", "is_finite", "stop_gradient", "eq", "ne",
    "lt", "le", "gt", "ge", "and", "or", "not", "xor", "argmax", "argmin", "iota",
    "population_count", "clz", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "random_bits", "random_seed", "random_wrap",
    "random_unwrap", "random_fold_in", "random_split", "threefry2x32",
    "rng_bit_generator", "rng_uniform", "nextafter",
}

_UNARY = {
    "neg", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh",
    "asinh", "acosh", "atanh", "exp", "exp2", "log", "log1p", "expm1", "logistic",
    "sqrt", "rsqrt", "cbrt", "abs", "square", "erf", "erfc", "erf_inv", "lgamma",
    "digamma", "reduce_precision", "convert_element_type", "real", "imag", "conj",
    "integer_pow", "bessel_i0e", "bessel_i1e", "polygamma", "tan", "sort_p",
}

_NARY = {
    "add", "sub", "add_any", "max", "min", "pow", "atan2", "rem", "clamp",
    "igamma", "igammac", "complex", "polygamma", "zeta", "regularized_incomplete_beta",
}


def _rule_unary(eqn, invals, ctx):
    if eqn.primitive.name == "integer_pow" and eqn.params.get("y") == 0:
        return [_unknown(eqn.outvars[0].aval)]
    return [_elementwise(eqn.outvars[0].aval, [(invals[0], None)])]


def _rule_nary(eqn, invals, ctx):
    return [_elementwise(eqn.outvars[0].aval, [(v, None) for v in invals])]


def _rule_mul(eqn, invals, ctx):
    a, b = invals
    parts = []
    for this, other in ((a, b), (b, a)):
        if not this.has_deps:
            continue
        drop = None
        if other.is_known:
            ctx.consult(other, "zero")
            drop = other.known == 0
        parts.append((this, drop))
    return [_elementwise(eqn.outvars[0].aval, parts)]


def _rule_div(eqn, invals, ctx):
    a, b = invals
    parts = [(a, None)]
    if b.has_deps:
        drop = None
        if a.is_known:
            ctx.consult(a, "zero")
            drop = a.known == 0
        parts.append((b, drop))
    return [_elementwise(eqn.outvars[0].aval, parts)]


def _rule_zero(eqn, invals, ctx):
    return [_unknown(v.aval) for v in eqn.outvars]


def _rule_identity_multi(eqn, invals, ctx):
    # e.g. optimization_barrier: outputs are the inputs.
    return [
        _Val(v.shape, v.dtype, known=v.known, sets=v.sets, roots=v.roots)
        for v in invals
    ]


# -- reductions and scans -------------------------------------------------------------


def _rule_reduce(eqn, invals, ctx):
    (x,) = invals[:1]
    out_aval = eqn.outvars[0].aval
    if not x.has_deps:
        return [_unknown(v.aval) for v in eqn.outvars]
    axes = tuple(eqn.params["axes"])
    n_out = int(np.prod(out_aval.shape, dtype=np.int64))
    seg = np.arange(n_out, dtype=np.int64).reshape(out_aval.shape)
    seg = np.broadcast_to(np.expand_dims(seg, tuple(sorted(axes))), x.shape)
    src = np.arange(x.size, dtype=np.int64)
    res = _unknown(out_aval, S.combine_pairs(x.sets, seg.reshape(-1), src, n_out))
    return [res] + [_unknown(v.aval) for v in eqn.outvars[1:]]


def _rule_reduce_generic(eqn, invals, ctx):
    # `reduce` with a custom computation: union over the reduced axes of all
    # operands, for every output.
    nops = len(invals) // 2
    ops = invals[:nops]
    axes = tuple(eqn.params["dimensions"])
    out_aval = eqn.outvars[0].aval
    n_out = int(np.prod(out_aval.shape, dtype=np.int64))
    pieces = []
    for x in ops:
        if not x.has_deps:
            continue
        seg = np.arange(n_out, dtype=np.int64).reshape(out_aval.shape)
        seg = np.broadcast_to(np.expand_dims(seg, tuple(sorted(axes))), x.shape)
        pieces.append(S.combine_pairs(x.sets, seg.reshape(-1),
                                      np.arange(x.size), n_out))
    sets = S.union(pieces) if pieces else None
    return [_unknown(v.aval, sets) for v in eqn.outvars]


def _rule_cumulative(eqn, invals, ctx):
    (x,) = invals
    out_aval = eqn.outvars[0].aval
    if not x.has_deps:
        return [_unknown(out_aval)]
    axis = eqn.params["axis"]
    rev = eqn.params.get("reverse", False)
    idx = np.moveaxis(np.arange(x.size, dtype=np.int64).reshape(x.shape), axis, -1)
    L = idx.shape[-1]
    idx = idx.reshape(-1, L)
    j, k = np.triu_indices(L) if rev else np.tril_indices(L)
    out = idx[:, j].reshape(-1)
    src = idx[:, k].reshape(-1)
    return [_unknown(out_aval, S.combine_pairs(x.sets, out, src, x.size))]


def _rule_sort(eqn, invals, ctx):
    dim = eqn.params["dimension"]
    shape = invals[0].shape
    n = invals[0].size
    pieces = []
    idx = np.moveaxis(np.arange(n, dtype=np.int64).reshape(shape), dim, -1)
    L = idx.shape[-1]
    idx = idx.reshape(-1, L)
    out = np.repeat(idx, L, axis=1).reshape(-1)
    src = np.tile(idx, (1, L)).reshape(-1)
    for x in invals:
        if x.has_deps:
            pieces.append(S.combine_pairs(x.sets, out, src, n))
    sets = S.union(pieces) if pieces else None
    return [_unknown(v.aval, sets) for v in eqn.outvars]


# -- linear algebra ------------------------------------------------------------------


def _nonzero_mask(v: _Val, ctx) -> np.ndarray:
    if v.is_known:
        ctx.consult(v, "zero")
        return v.known != 0
    return np.ones(v.shape, bool)


def _rule_dot_general(eqn, invals, ctx):
    lhs, rhs = invals
    out_aval = eqn.outvars[0].aval
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
    lf = tuple(d for d in range(len(lhs.shape)) if d not in lc + lb)
    rf = tuple(d for d in range(len(rhs.shape)) if d not in rc + rb)
    B = int(np.prod([lhs.shape[d] for d in lb], dtype=np.int64))
    nI = int(np.prod([lhs.shape[d] for d in lf], dtype=np.int64))
    K = int(np.prod([lhs.shape[d] for d in lc], dtype=np.int64))
    J = int(np.prod([rhs.shape[d] for d in rf], dtype=np.int64))
    n_out = B * nI * J
    pieces = []
    if lhs.has_deps:
        xi = np.arange(lhs.size).reshape(lhs.shape).transpose(lb + lf + lc)
        xi = xi.reshape(B, nI, K)
        m = _nonzero_mask(rhs, ctx).transpose(rb + rc + rf).reshape(B, K, J)
        bb, kk, jj = np.nonzero(m)
        ii = np.arange(nI, dtype=np.int64)[:, None]
        out = (bb[None, :] * nI + ii) * J + jj[None, :]
        src = xi[bb[None, :], ii, kk[None, :]]
        pieces.append(S.combine_pairs(lhs.sets, out, src, n_out))
    if rhs.has_deps:
        xi = np.arange(rhs.size).reshape(rhs.shape).transpose(rb + rc + rf)
        xi = xi.reshape(B, K, J)
        m = _nonzero_mask(lhs, ctx).transpose(lb + lf + lc).reshape(B, nI, K)
        bb, ii, kk = np.nonzero(m)
        jj = np.arange(J, dtype=np.int64)[None, :]
        out = (bb[:, None] * nI + ii[:, None]) * J + jj
        src = xi[bb[:, None], kk[:, None], jj]
        pieces.append(S.combine_pairs(rhs.sets, out, src, n_out))
    if not pieces:
        return [_unknown(out_aval)]
    return [_unknown(out_aval, S.union(pieces))]


def _rule_conv(eqn, invals, ctx):
    lhs, rhs = invals
    out_aval = eqn.outvars[0].aval
    p = eqn.params
    if p.get("batch_group_count", 1) != 1 or rhs.has_deps:
        raise Unsupported("conv_general_dilated with a traced kernel")
    if not lhs.has_deps or int(np.prod(out_aval.shape)) == 0:
        return [_unknown(out_aval)]
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    n_lhs = lhs.size
    if n_lhs >= 2**53:
        raise Unsupported("conv too large")
    fdt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    if fdt == jnp.float32 and n_lhs >= 2**24:
        raise Unsupported("conv index encoding needs x64")
    lidx = (np.arange(n_lhs, dtype=np.float64) + 1).reshape(lhs.shape)
    lidx = lidx.transpose(lhs_spec)  # (N, C, spatial...)
    w = _nonzero_mask(rhs, ctx).transpose(rhs_spec)  # (O, I, k...)
    nO, Ig = w.shape[:2]
    ksp = w.shape[2:]
    with jax.ensure_compile_time_eval():
        patches = jax.lax.conv_general_dilated_patches(
            jnp.asarray(lidx, fdt),
            filter_shape=ksp,
            window_strides=p["window_strides"],
            padding=p["padding"],
            lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"],
            precision=jax.lax.Precision.HIGHEST,
        )
    patches = np.asarray(patches).astype(np.int64) - 1  # (N, C*prod(k), out...)
    N = patches.shape[0]
    out_sp = patches.shape[2:]
    P = int(np.prod(out_sp, dtype=np.int64))
    patches = patches.reshape(N, -1, P)
    G = p["feature_group_count"]
    Kp = int(np.prod(ksp, dtype=np.int64))
    oo, ii, kk = np.nonzero(w.reshape(nO, Ig, Kp))
    g = oo // (nO // G)
    chan = (g * Ig + ii) * Kp + kk  # row of patches
    # canonical out index (n, o, pos) -> actual flat index
    oshape = out_aval.shape
    ocan = np.arange(int(np.prod(oshape))).reshape(oshape).transpose(out_spec)
    ocan = ocan.reshape(N, nO, P)
    out = ocan[:, oo, :]  # (N, Q, P)
    src = patches[:, chan, :]
    return [_unknown(out_aval, S.combine_pairs(lhs.sets, out, src, ocan.size))]


# -- scatter -----------------------------------------------------------------------


def _scatter_dest(eqn, operand_shape, updates_shape, indices):
    dn = eqn.params["dimension_numbers"]
    from jax.lax import GatherDimensionNumbers, GatherScatterMode

    slice_sizes = []
    uw = iter(dn.update_window_dims)
    skip = set(dn.inserted_window_dims) | set(
        getattr(dn, "operand_batching_dims", ())
    )
    for d in range(len(operand_shape)):
        if d in skip:
            slice_sizes.append(1)
        else:
            slice_sizes.append(updates_shape[next(uw)])
    gdn = GatherDimensionNumbers(
        offset_dims=tuple(dn.update_window_dims),
        collapsed_slice_dims=tuple(dn.inserted_window_dims),
        start_index_map=tuple(dn.scatter_dims_to_operand_dims),
        operand_batching_dims=tuple(getattr(dn, "operand_batching_dims", ())),
        start_indices_batching_dims=tuple(
            getattr(dn, "scatter_indices_batching_dims", ())
        ),
    )
    mode = eqn.params.get("mode")
    gmode = (
        GatherScatterMode.CLIP
        if mode == GatherScatterMode.CLIP
        else GatherScatterMode.FILL_OR_DROP
    )
    n = int(np.prod(operand_shape, dtype=np.int64))
    ar = np.arange(n, dtype=_index_dtype(n)).reshape(operand_shape)
    with jax.ensure_compile_time_eval():
        dest = jax.lax.gather(
            ar, indices, gdn, tuple(slice_sizes), mode=gmode, fill_value=-1
        )
    dest = np.asarray(dest).astype(np.int64)
    assert dest.shape == tuple(updates_shape)
    return dest.reshape(-1)


def _rule_scatter(eqn, invals, ctx):
    operand, indices, updates = invals[:3]
    out_aval = eqn.outvars[0].aval
    name = eqn.primitive.name.replace("_", "-")
    n = operand.size
    if not indices.is_known:
        return [_dense(out_aval, [operand, updates])]
    ctx.consult(indices, "value")
    dest = _scatter_dest(eqn, operand.shape, updates.shape, indices.known)
    ok = dest >= 0
    pieces = []
    if name == "scatter":
        unique = eqn.params.get("unique_indices", False)
        written = np.zeros(n, bool)
        written[dest[ok]] = True
        if operand.has_deps:
            keep = np.where(written, -1, np.arange(n))
            pieces.append(S.gather(operand.sets, keep))
        if updates.has_deps:
            if not unique:
                # Duplicate targets: the winner is unspecified, take the union.
                pass
            pieces.append(
                S.combine_pairs(updates.sets, dest[ok],
                                np.nonzero(ok)[0], n)
            )
    else:
        if operand.has_deps:
            pieces.append(operand.sets)
        if updates.has_deps:
            src = np.nonzero(ok)[0]
            dst = dest[ok]
            if name == "scatter-mul" and operand.is_known:
                pass
            pieces.append(S.combine_pairs(updates.sets, dst, src, n))
    if not pieces:
        return [_unknown(out_aval)]
    return [_unknown(out_aval, S.union(pieces))]


# -- control flow and calls ------------------------------------------------------


# Higher-order primitives' params change between JAX releases. Jax 0.11 replaced
# scan's `num_consts`/`num_carry` with a FlatTree `ft_in` (leaves: consts, carry,
# xs) and passes sub-jaxprs as `Jaxpr`s, not `ClosedJaxpr`s (jax 0.12 removes
# `ClosedJaxpr`: a `Jaxpr` carries its own `consts`). Read on jax 0.10.2, 0.11.2
# and 0.12.0.1.
# The accessors below read each form by whatever the installed JAX provides,
# derive counts from the sub-jaxprs where those determine them, and raise
# `Unsupported` (so detection falls back to probing) on a form they do not know:
# never a KeyError.


def _closed(jaxpr_like):
    """(jaxpr, consts) for a ClosedJaxpr, an open Jaxpr, or (jax >= 0.12) a Jaxpr
    carrying its own consts."""
    if hasattr(jaxpr_like, "jaxpr") and hasattr(jaxpr_like, "consts"):
        jaxpr, consts = jaxpr_like.jaxpr, list(jaxpr_like.consts)
    elif hasattr(jaxpr_like, "eqns"):
        jaxpr, consts = jaxpr_like, []
    else:
        raise Unsupported(f"not a jaxpr: {type(jaxpr_like).__name__}")
    if len(jaxpr.constvars) != len(consts):
        raise Unsupported(
            f"a sub-jaxpr with {len(jaxpr.constvars)} constvars but "
            f"{len(consts)} consts"
        )
    return jaxpr, consts


def _n_in(jaxpr_like) -> int:
    return len(_closed(jaxpr_like)[0].invars)


def _n_out(jaxpr_like) -> int:
    return len(_closed(jaxpr_like)[0].outvars)


def _param(eqn, *names):
    """The first of `names` present in `eqn.params`."""
    for name in names:
        if name in eqn.params:
            return eqn.params[name]
    raise Unsupported(
        f"{eqn.primitive.name!r} under jax {jax.__version__} has none of the "
        f"params {names} (it has {sorted(eqn.params)})"
    )


def _call_jaxpr(eqn):
    """The body of a call-like primitive (jit/pjit, closed_call, remat,
    custom_jvp_call, custom_vjp_call(_jaxpr), ...): its inputs are the operands."""
    sub = _param(eqn, "jaxpr", "call_jaxpr", "fun_jaxpr")
    if _n_in(sub) != len(eqn.invars) or _n_out(sub) != len(eqn.outvars):
        raise Unsupported(
            f"{eqn.primitive.name!r}: the body's inputs/outputs do not match the "
            "operands/results"
        )
    return sub


def _cond_branches(eqn):
    """The branches of `cond` (operands: the index, then the branches' inputs)."""
    branches = tuple(_param(eqn, "branches"))
    if not branches or any(_n_in(b) != len(eqn.invars) - 1 for b in branches):
        raise Unsupported("cond: the branches' inputs do not match the operands")
    return branches


def _while_parts(eqn):
    """`(cond, body, cond_nconsts, body_nconsts)` of a `while`; the operands are
    the cond consts, the body consts, then the carry. The counts are derived from
    the jaxprs (the body maps carry to carry)."""
    cond = _param(eqn, "cond_jaxpr")
    body = _param(eqn, "body_jaxpr")
    n_carry = _n_out(body)
    cn, bn = _n_in(cond) - n_carry, _n_in(body) - n_carry
    if min(cn, bn) < 0 or cn + bn + n_carry != len(eqn.invars):
        raise Unsupported("while: the jaxprs do not match the operands")
    return cond, body, cn, bn


def _scan_counts(eqn) -> tuple[int, int]:
    """`(num_consts, num_carry)` of a `scan` (operands: consts, carry, xs).
    Not derivable from the body alone: read `num_consts`/`num_carry` (jax <= 0.10)
    or the leaf counts of `ft_in` (jax >= 0.11)."""
    p = eqn.params
    if "num_consts" in p and "num_carry" in p:
        nc, nk = int(p["num_consts"]), int(p["num_carry"])
    elif "ft_in" in p:
        try:
            consts, carry, _ = p["ft_in"].unpack()
        except (AttributeError, TypeError, ValueError) as e:
            raise Unsupported(f"scan: unrecognised ft_in ({e!r})") from e
        nc, nk = len(consts), len(carry)
    else:
        _param(eqn, "num_consts", "ft_in")  # raises, naming the params found
    body = _param(eqn, "jaxpr")
    if (nc + nk > len(eqn.invars) or _n_in(body) != len(eqn.invars)
            or _n_out(body) != len(eqn.outvars) or nk > len(eqn.outvars)):
        raise Unsupported("scan: the body does not match the operands")
    return nc, nk


def _const_val(c, aval=None):
    if isinstance(c, jax.core.Tracer):
        return _Val(c.shape, c.dtype)
    k = _to_numpy(c)
    if k is None:
        shape = getattr(c, "shape", ())
        return _Val(shape, getattr(c, "dtype", None))
    return _Val(k.shape, k.dtype, known=k)


def _call(jaxpr_like, invals, ctx):
    jaxpr, consts = _closed(jaxpr_like)
    return eval_jaxpr(jaxpr, [_const_val(c) for c in consts], invals, ctx)


def _rule_call(eqn, invals, ctx):
    outs = _call(_call_jaxpr(eqn), invals, ctx)
    return [_retag(o, v.aval) for o, v in zip(outs, eqn.outvars)]


def _retag(o: _Val, aval):
    return _Val(aval.shape, aval.dtype, known=o.known, sets=o.sets, roots=o.roots,
                direct=o.direct)


def _union_vals(vals, aval):
    if all(v.is_known for v in vals) and all(
        np.array_equal(vals[0].known, v.known) for v in vals[1:]
    ):
        roots = frozenset().union(*[v.roots for v in vals])
        return _Val(aval.shape, aval.dtype, known=vals[0].known, roots=roots)
    return _elementwise(aval, [(v, None) for v in vals])


def _rule_cond(eqn, invals, ctx):
    index, ops = invals[0], invals[1:]
    branches = _cond_branches(eqn)
    if index.is_known:
        ctx.consult(index, "value")
        i = int(np.clip(int(index.known.reshape(())), 0, len(branches) - 1))
        outs = _call(branches[i], ops, ctx)
        return [_retag(o, v.aval) for o, v in zip(outs, eqn.outvars)]
    results = [_call(br, ops, ctx) for br in branches]
    return [
        _union_vals([r[k] for r in results], var.aval)
        for k, var in enumerate(eqn.outvars)
    ]


def _n_eqns(jaxpr_like) -> int:
    jaxpr, _ = _closed(jaxpr_like)
    return max(len(jaxpr.eqns), 1)


def _same_sets(a: _Val, b: _Val) -> bool:
    if a.has_deps != b.has_deps:
        return False
    if not a.has_deps:
        return True
    sa, sb = S.dedup(a.sets), S.dedup(b.sets)
    return np.array_equal(sa.indptr, sb.indptr) and np.array_equal(sa.idx, sb.idx)


def _forget(v: _Val) -> _Val:
    return _Val(v.shape, v.dtype, sets=v.sets)


def _fixpoint(step, carry, max_iter=10_000):
    """Iterate carry <- carry U step(carry) until the sets stop growing. Values
    become unknown (they change between iterations)."""
    carry = [_forget(c) for c in carry]
    for _ in range(max_iter):
        new = step(carry)
        merged = [
            _elementwise(_aval_of(c), [(c, None), (nv, None)])
            for c, nv in zip(carry, new)
        ]
        merged = [
            _Val(m.shape, m.dtype, sets=S.dedup(m.sets) if m.has_deps else None)
            for m in merged
        ]
        if all(_same_sets(a, b) for a, b in zip(carry, merged)):
            return merged
        carry = merged
    raise Unsupported("loop fixed point did not converge")


class _Aval:
    def __init__(self, shape, dtype):
        self.shape = tuple(shape)
        self.dtype = dtype


def _aval_of(v: _Val):
    return _Aval(v.shape, v.dtype)


def _rule_while(eqn, invals, ctx):
    cond, body, cn, bn = _while_parts(eqn)
    cconsts, bconsts, carry = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    budget = _UNROLL_BUDGET // (_n_eqns(body) + _n_eqns(cond))
    it = 0
    carry0 = carry
    while it <= budget:
        (pred,) = _call(cond, list(cconsts) + list(carry), ctx)
        if not pred.is_known:
            break
        ctx.consult(pred, "value")
        if not bool(pred.known.reshape(())):
            return [_retag(c, v.aval) for c, v in zip(carry, eqn.outvars)]
        carry = _call(body, list(bconsts) + list(carry), ctx)
        it += 1
    # Unknown or too long a trip count: fixed point over the carry.
    res = _fixpoint(
        lambda c: _call(body, list(bconsts) + list(c), ctx),
        [_union_vals([a, b], _aval_of(a)) for a, b in zip(carry0, carry)],
    )
    return [_retag(c, v.aval) for c, v in zip(res, eqn.outvars)]


def _slice0(v: _Val, t: int, aval) -> _Val:
    if v.is_known:
        return _Val(aval.shape, aval.dtype, known=v.known[t], roots=v.roots)
    if not v.has_deps:
        return _unknown(aval)
    m = int(np.prod(v.shape[1:], dtype=np.int64))
    return _unknown(aval, S.gather(v.sets, np.arange(t * m, (t + 1) * m)))


def _stack(vals: list[_Val], aval) -> _Val:
    if all(v.is_known for v in vals):
        roots = frozenset().union(*[v.roots for v in vals])
        return _Val(aval.shape, aval.dtype, known=np.stack([v.known for v in vals]),
                    roots=roots)
    return _unknown(aval, S.concat([v.get_sets() for v in vals]))


def _rule_scan(eqn, invals, ctx):
    p = eqn.params
    nc, nk = _scan_counts(eqn)
    length = int(_param(eqn, "length"))
    body = _param(eqn, "jaxpr")
    consts, carry, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    jaxpr, _ = _closed(body)
    x_avals = [v.aval for v in jaxpr.invars[nc + nk:]]
    y_avals = [v.aval for v in eqn.outvars[nk:]]
    if length * _n_eqns(body) <= _UNROLL_BUDGET:
        ys = [[None] * length for _ in y_avals]
        order = range(length - 1, -1, -1) if p.get("reverse") else range(length)
        for t in order:
            x_t = [_slice0(x, t, a) for x, a in zip(xs, x_avals)]
            out = _call(body, list(consts) + list(carry) + x_t, ctx)
            carry = out[:nk]
            for k, y in enumerate(out[nk:]):
                ys[k][t] = y
        outs = list(carry) + [
            _stack(ys[k], var.aval) for k, var in enumerate(eqn.outvars[nk:])
        ]
        return [_retag(o, v.aval) for o, v in zip(outs, eqn.outvars)]
    # Fixed point: every iteration sees the union of all xs slices.
    x_all = []
    for x, a in zip(xs, x_avals):
        if not x.has_deps:
            x_all.append(_unknown(a))
            continue
        m = int(np.prod(a.shape, dtype=np.int64))
        src = np.arange(x.size, dtype=np.int64)
        x_all.append(_unknown(a, S.combine_pairs(x.sets, src % m, src, m)))
    res = _fixpoint(
        lambda c: _call(body, list(consts) + list(c) + x_all, ctx)[:nk], carry
    )
    out = _call(body, list(consts) + res + x_all, ctx)
    ys = []
    for y, var in zip(out[nk:], eqn.outvars[nk:]):
        m = y.size
        ys.append(_unknown(var.aval, S.gather(y.get_sets(),
                                              np.tile(np.arange(m), length))))
    return [_retag(o, v.aval) for o, v in zip(list(res) + ys, eqn.outvars)]


_RULES: dict[str, Any] = {}
for _n in _STRUCTURAL:
    _RULES[_n] = _rule_structural
for _n in _ZERO_DERIV:
    _RULES[_n] = _rule_zero
for _n in _UNARY:
    _RULES[_n] = _rule_unary
for _n in _NARY:
    _RULES[_n] = _rule_nary
_RULES.update(
    mul=_rule_mul,
    div=_rule_div,
    dot_general=_rule_dot_general,
    conv_general_dilated=_rule_conv,
    reduce_sum=_rule_reduce,
    reduce_max=_rule_reduce,
    reduce_min=_rule_reduce,
    reduce_prod=_rule_reduce,
    reduce_and=_rule_reduce,
    reduce_or=_rule_reduce,
    reduce_xor=_rule_reduce,
    argmax=_rule_zero,
    argmin=_rule_zero,
    reduce=_rule_reduce_generic,
    cumsum=_rule_cumulative,
    cumprod=_rule_cumulative,
    cummax=_rule_cumulative,
    cummin=_rule_cumulative,
    cumlogsumexp=_rule_cumulative,
    sort=_rule_sort,
    scatter=_rule_scatter,
    optimization_barrier=_rule_identity_multi,
    cond=_rule_cond,
    scan=_rule_scan,
)
_RULES["while"] = _rule_while
for _n in ("scatter-add", "scatter_add", "scatter-mul", "scatter_mul",
           "scatter-min", "scatter_min", "scatter-max", "scatter_max"):
    _RULES[_n] = _rule_scatter
# Call-like primitives: the body runs once on the operands. (`closed_call` is
# named `eval_jaxpr` from jax 0.11.)
_CALLS = (
    "pjit", "jit", "remat", "remat2", "checkpoint", "closed_call", "eval_jaxpr",
    "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
    "custom_lin_call",
)
for _n in _CALLS:
    _RULES[_n] = _rule_call

_HIGHER_ORDER = {*_CALLS, "cond", "while", "scan", "optimization_barrier"}


def eval_jaxpr(jaxpr, const_vals, in_vals, ctx) -> list[_Val]:
    """Propagate `_Val`s through `jaxpr` (an open jaxpr)."""
    env: dict[Any, _Val] = {}

    def read(v):
        if isinstance(v, _Literal):
            k = np.asarray(v.val)
            return _Val(k.shape, k.dtype, known=k)
        return env[v]

    for var, val in zip(jaxpr.constvars, const_vals):
        env[var] = val
    for var, val in zip(jaxpr.invars, in_vals):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if all(v.is_known for v in invals):
            outs = _eval_known(eqn, invals)
        elif name not in _HIGHER_ORDER and not any(
            _is_float(v.aval.dtype) for v in eqn.outvars
        ):
            outs = [_unknown(v.aval) for v in eqn.outvars]
        else:
            rule = _RULES.get(name)
            if rule is None:
                raise Unsupported(f"no sparsity rule for primitive {name!r}")
            outs = rule(eqn, invals, ctx)
        for var, o in zip(eqn.outvars, outs):
            if type(var).__name__ != "DropVar":
                env[var] = o
    return [read(v) for v in jaxpr.outvars]
