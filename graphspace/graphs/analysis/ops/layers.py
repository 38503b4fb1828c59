"""Parameterised layers: dense, convolution (and transposed), norms, embedding."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from graphspace.graphs.analysis.context import (
    Act,
    Const,
    Raw,
    TupleOut,
)
from graphspace.graphs.analysis.ops.elementwise import _unary
from graphspace.graphs.analysis.ops.table import (
    _arg,
    _is_param,
    _op_name,
    _path,
    _shape,
    _shapes,
    op,
)
from graphspace.graphs.analysis.ops.walker import Walker
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedModuleError, UnsupportedOperationError

# ---------------------------------------------------------------------------------------------
# parameterised layers
# ---------------------------------------------------------------------------------------------


def _flat_src(ids: Tensor, path: str, what: str) -> tuple[Tensor, tuple[int, ...],
                                                           tuple[int, ...], int]:
    """Source nodes of a dense layer's input features: `(src, view_tail, perm_tail, s)`
    where a flattened `(C, S)` or `(S, C)` input gives `C` sources, `S` positions."""
    n = ids.numel()
    if bool((ids < 0).any()):
        raise UnsupportedModuleError(path, what, "some input features carry no neuron "
                                     "(padding)")
    u = torch.unique(ids)
    if u.numel() == n:
        return ids, (n,), (1,), 1
    c = u.numel()
    if n % c == 0:
        s = n // c
        major = ids.view(c, s)
        if bool((major == major[:, :1]).all()):
            return major[:, 0], (c, s), (1, 2), s
        minor = ids.view(s, c)
        if bool((minor == minor[:1]).all()):
            return minor[0], (s, c), (2, 1), s
    raise UnsupportedModuleError(path, what, "its input features repeat neurons in an order "
                                 "that is neither channel-major nor channel-minor")


def _dense(w: Walker, node: fx.Node, x: Any, wt: Any, bias: Any, out_features: int,
           in_features: int, w_layout: str, kind: str = "linear", edge_type: str = "linear"
           ) -> Act:
    """`y = x W^T + b` for any dense weight (`w_layout`: `"oi"` for `(out, in)`,
    `"io"` for `(in, out)` as in `x @ W`)."""
    ctx = w.ctx
    path = _path(node)
    shape = _shape(node)
    x = ctx.resolve(x, in_features, path, -1, kind)
    key, full = w.weight(wt, path, partial=True)
    if full is not None and full.numel() < ctx.state[key].numel():
        return _dense_piece(w, node, x, wt, bias, key, full, out_features, in_features,
                            w_layout)
    src_ids = x.along(-1, path, kind)
    src, vt, pt, s = _flat_src(src_ids, path, kind)
    c = src.numel()
    o = out_features
    if w_layout == "oi":  # (out, in) -> (out, c[, s])
        view, perm = (o,) + vt, (0,) + pt
    else:  # (in, out), as in x @ W or HF Conv1D -> (out, c[, s])
        view, perm = vt + (o,), (len(vt),) + tuple(p - 1 for p in pt)
    index = None
    if full is not None:  # a reshaped or transposed parameter: gather
        pid = full.t() if w_layout == "io" else full
        index = pid.reshape(o, in_features).reshape((o,) + vt).permute((0,) + pt).reshape(-1)
    depth = x.depth + 1
    mod = path.split(" (")[0]
    sid = ctx.new_set(o, "linear", mod if mod != "<model>" else key.rsplit(".", 1)[0], depth)
    out = ctx.sets[sid].nodes
    cshape = (o, c) + ((s,) if s > 1 else ())
    if index is None:
        ctx.add_edge_param(key, out, src, edge_type, depth, mod, view, perm, dst_sets=[sid],
                           src_sets=ctx.sets_of(src))
    else:
        ctx.add_edge_param(key, out, src, edge_type, depth, mod, cshape, index=index,
                           dst_sets=[sid], src_sets=ctx.sets_of(src))
    if bias is not None:
        bkey, bfull = w.weight(bias, path, "bias")
        if bfull is not None:
            raise UnsupportedOperationError(path, "a permuted bias")
        ctx.add_node_param(bkey, out, 0, mod, depth, sets=[sid])
    ctx.add_use(x, Use("param", x.chain, key))
    return ctx.new_act(sid, shape, -1, depth)


def _dense_piece(w: Walker, node: fx.Node, x: Act, wt: Act, bias: Any, key: str, full: Tensor,
                 o: int, i: int, w_layout: str) -> Act:
    """A dense layer using rows of a packed weight (`in_proj_weight.chunk(3)`): the piece's
    neurons are created now; the record is written once every row of the weight is used."""
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    src = x.along(-1, path, "linear")
    if bool((src < 0).any()) or torch.unique(src).numel() != src.numel():
        raise UnsupportedOperationError(path, f"a partial use of '{key}'",
                                        "on flattened or padded features")
    pid = full.t() if w_layout == "io" else full
    pid = pid.reshape(o, i)
    depth = x.depth + 1
    sid = ctx.new_set(o, "linear", mod, depth)
    out = ctx.sets[sid].nodes
    pend = w.pending.setdefault(key, [])
    bpiece = None
    if bias is not None:
        bkey, bfull = w.weight(bias, path, "bias", partial=True)
        bpiece = (bkey, bfull.reshape(-1) if bfull is not None else torch.arange(o))
    pend.append((pid, out, src, sid, bpiece, depth, mod))
    total = ctx.state[key].numel()
    if sum(p[0].numel() for p in pend) == total:
        pend.sort(key=lambda p: int(p[0].min()))
        srcs = [p[2] for p in pend]
        if any(not torch.equal(srcs[0], s_) for s_ in srcs[1:]):
            raise UnsupportedOperationError(
                path, f"rows of '{key}' applied to different inputs",
                "a packed weight whose pieces read different neurons (cross-attention with "
                "kdim == vdim == embed_dim) cannot become one set of edges")
        index = torch.cat([p[0] for p in pend]).reshape(-1)
        dst = torch.cat([p[1] for p in pend])
        sets = [p[3] for p in pend]
        ctx.add_edge_param(key, dst, srcs[0], "linear", max(p[5] for p in pend), mod,
                           (dst.numel(), srcs[0].numel()),
                           index=None if torch.equal(index, torch.arange(total)) else index,
                           dst_sets=sets, src_sets=ctx.sets_of(srcs[0]))
        if all(p[4] is not None for p in pend):
            bkeys = {p[4][0] for p in pend}
            bidx = torch.cat([p[4][1] for p in pend])
            if len(bkeys) != 1 or not torch.equal(bidx, torch.arange(bidx.numel())):
                raise UnsupportedOperationError(path, f"the bias pieces of '{key}'")
            ctx.add_node_param(bkeys.pop(), dst, 0, mod, max(p[5] for p in pend), sets=sets)
        del w.pending[key]
    ctx.add_use(x, Use("param", x.chain, key))
    return ctx.new_act(sid, _shape(node), -1, depth)


@op("linear", weights=True)
def _linear(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, wt = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias")
    if not _is_param(wt):
        raise UnsupportedOperationError(_path(node), "linear with a computed weight")
    o, i = wt.shape
    return _dense(w, node, x, wt, b, o, i, "oi")


@op("addmm", weights=True)
def _addmm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    b, x, wt = args[0], args[1], args[2]
    if not _is_param(wt):
        raise UnsupportedOperationError(_path(node), "addmm with a computed weight")
    i, o = wt.shape
    return _dense(w, node, x, wt, b, o, i, "io")



@op("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "_convolution", weights=True)
def _conv(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = _op_name(node)
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    x, wt = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias")
    if name in ("convolution", "_convolution"):
        transposed = bool(args[6])
        groups = int(args[8])
    elif name.startswith("conv_transpose"):
        transposed = True
        groups = int(_arg(args, kwargs, 6, "groups", 1))
    else:
        transposed = False
        groups = int(_arg(args, kwargs, 6, "groups", 1))
    if not _is_param(wt):
        raise UnsupportedOperationError(path, name, "the weight is computed")
    wshape = wt.shape
    if transposed:
        cin, opg = wshape[0], wshape[1]
        cout = opg * groups
    else:
        cout, ipg = wshape[0], wshape[1]
        cin = ipg * groups
    x = ctx.resolve(x, cin, path, 1, name)
    src = x.along(1, path, name)
    if bool((src < 0).any()):
        raise UnsupportedModuleError(path, name, "some input channels carry no neuron")
    key, full = w.weight(wt, path)
    k = tuple(wshape[2:])
    cshape = (cout, cin // groups) + k
    view, perm, index = tuple(wshape), tuple(range(len(wshape))), None
    if transposed and groups == 1 and full is None:  # (in, out, *k) -> (out, in, *k)
        perm = (1, 0) + perm[2:]
    elif transposed or full is not None:  # a gather into (out, in_per_group, *k)
        pid = full if full is not None else torch.arange(ctx.state[key].numel()).view(wshape)
        if transposed:
            ipg = cin // groups
            pid = pid.view(groups, ipg, opg, *k).transpose(1, 2)
        index = pid.reshape(-1)
        view, perm = cshape, tuple(range(len(cshape)))
    depth = x.depth + 1
    sid = ctx.new_set(cout, "conv", mod, depth)
    out = ctx.sets[sid].nodes
    ctx.add_edge_param(key, out, src, "conv", depth, mod, view, perm, groups=groups,
                       dst_sets=[sid], src_sets=ctx.sets_of(src), index=index)
    if b is not None:
        bkey, bfull = w.weight(b, path, "bias")
        ctx.add_node_param(bkey, out, 0, mod, depth, sets=[sid])
    ctx.add_use(x, Use("param", x.chain, key))
    y = ctx.new_act(sid, _shape(node), 1, depth)
    if groups > 1:
        if groups == cin == cout:
            ctx.tie_nodes(src, out)
        else:
            ctx.fix_nodes(src)
            ctx.fix_nodes(out)
    return y


def _norm(w: Walker, node: fx.Node, x: Act, dim: int, weight: Any, bias: Any,
          stats: tuple[Any, Any] | None, extra: Any = None, groups: int = 1,
          kind: str = "norm") -> Act:
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    src = x.along(dim, path, kind)
    if bool((src < 0).any()):
        raise UnsupportedModuleError(path, kind, "some features carry no neuron")
    n = src.numel()
    depth = x.depth + 1
    sid = ctx.new_set(n, "norm", mod, depth)
    dst = ctx.sets[sid].nodes
    ctx.tie_nodes(src, dst)
    if weight is not None:
        key, full = w.weight(weight, path)
        if full is not None:
            raise UnsupportedOperationError(path, "a permuted norm weight")
        ctx.add_diag_param(key, dst, src, depth, mod, [sid], ctx.sets_of(src))
    else:
        ctx.add_struct_edges(src, dst, 1.0, "norm", depth)
    if bias is not None:
        bkey, _ = w.weight(bias, path, "bias")
        ctx.add_node_param(bkey, dst, 0, mod, depth, sets=[sid])
    if stats is not None:
        for col, s in ((1, stats[0]), (2, stats[1])):
            if _is_param(s):
                ctx.add_node_param(s.param, dst, col, mod, depth, sets=[sid])
        prefix = stats[0].param.rsplit(".", 1)[0] if _is_param(stats[0]) else None
        if prefix is not None and f"{prefix}.num_batches_tracked" in ctx.state:
            ctx.add_extra(f"{prefix}.num_batches_tracked", mod)
    if 1 < groups < n:
        for g in range(groups):
            ctx.cell(src.view(groups, -1)[g], "group")
    ctx.add_use(x, Use("other", x.chain, path))
    return ctx.new_act(sid, _shape(node), dim, depth)


def _channel_input(w: Walker, x: Any, size: int, path: str, dim: int) -> Act:
    return w.ctx.resolve(x, size, path, dim, "norm")


@op("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
    "_native_batch_norm_legit", "instance_norm", "cudnn_batch_norm", weights=True)
def _batch_norm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, wt, b, rm, rv = args[0], args[1], args[2], args[3], args[4]
    c = None
    for t in (wt, b, rm, rv):
        if _is_param(t):
            c = t.shape[0]
    if c is None:
        c = (x.shape if isinstance(x, (Act, Raw)) else ())[1]
    x = _channel_input(w, x, c, _path(node), 1)
    stats = (rm, rv) if (_is_param(rm) or _is_param(rv)) else None
    out = _norm(w, node, x, 1, wt, b, stats)
    if isinstance(node.meta.get("val"), (tuple, list)):  # native_* variants return stats too
        return TupleOut([out] + [Const(s) for s in _shapes(node)[1:]])
    return out


@op("layer_norm", "rms_norm", "native_layer_norm", weights=True)
def _layer_norm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = _op_name(node)
    x, ns = args[0], list(args[1])
    wt = _arg(args, kwargs, 2, "weight")
    b = _arg(args, kwargs, 3, "bias") if name != "rms_norm" else None
    path = _path(node)
    if not isinstance(x, (Act, Raw)):
        raise UnsupportedOperationError(path, name, "of a value without neurons")
    shape = x.shape
    nd = len(shape)
    ndims = list(range(nd - len(ns), nd))
    if len(ns) != 1:
        if isinstance(x, Act) and any(x.ids.shape[d] > 1 for d in ndims[:-1]):
            raise UnsupportedOperationError(path, name, "normalises several neuron axes")
        if wt is not None or b is not None:
            raise UnsupportedOperationError(path, name, "over several axes with an affine "
                                            "weight")
        return _unary(w, x, "norm", _shape(node))
    x = _channel_input(w, x, ns[0], path, -1)
    out = _norm(w, node, x, -1, wt, b, None)
    if name == "native_layer_norm":
        return TupleOut([out] + [Const(s) for s in _shapes(node)[1:]])
    return out


@op("group_norm", "native_group_norm", weights=True)
def _group_norm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, g = args[0], int(args[1])
    wt, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    c = x.shape[1]
    x = _channel_input(w, x, c, _path(node), 1)
    return _norm(w, node, x, 1, wt, b, None, groups=g)


@op("embedding", weights=True)
def _embedding(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    ctx = w.ctx
    wt, idx = args[0], args[1]
    path = _path(node)
    mod = path.split(" (")[0]
    key, full = w.weight(wt, path)
    if full is not None:
        raise UnsupportedOperationError(path, "embedding with a reshaped table")
    v, d = wt.shape
    if isinstance(idx, Raw):
        tok = ctx.sets[ctx.input_set(idx.holder, v, path, "embedding")].nodes
    elif isinstance(idx, Const):
        sid = ctx.new_set(v, "input", f"{key}.indices", 0, permutable=False)
        tok = ctx.sets[sid].nodes
    else:
        raise UnsupportedOperationError(path, "embedding", "its indices are computed from "
                                        "neurons")
    sid = ctx.new_set(d, "embedding", mod, 1)
    ctx.add_edge_param(key, ctx.sets[sid].nodes, tok, "embedding", 1, mod, (v, d), (1, 0),
                       dst_sets=[sid], src_sets=ctx.sets_of(tok))
    return ctx.new_act(sid, _shape(node), -1, 1)


@op("embedding_renorm", "embedding_renorm_", weights=True)
def _embedding_renorm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """`Embedding(max_norm=...)` rescales the looked-up rows of its table in place. Row norms
    do not depend on the order of the features, so the table stays what it was for the walk
    (export runs on fake tensors: the model's own table is never touched)."""
    return args[0]
