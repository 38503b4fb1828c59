"""Attention: `scaled_dot_product_attention` and `softmax(q @ k^T) @ v` written by hand."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from graphspace.graphs.analysis import layout as L
from graphspace.graphs.analysis.context import (
    Act,
    Const,
    Raw,
    Scores,
    TupleOut,
)
from graphspace.graphs.analysis.ops.layers import _dense
from graphspace.graphs.analysis.ops.table import (
    _arg,
    _is_neuron,
    _is_param,
    _path,
    _shape,
    _shapes,
    op,
)
from graphspace.graphs.analysis.ops.walker import Walker
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedOperationError


@op("matmul", "mm", "bmm", weights=True)
def _matmul(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    a, b = args[0], args[1]
    path = _path(node)
    if _is_param(b) and len(b.shape) == 2 and not _is_param(a):
        i, o = b.shape
        return _dense(w, node, a, b, None, o, i, "io")
    if _is_neuron(a) and _is_neuron(b):
        # q @ k^T: contraction over the last axis of q and axis -2 of k^T
        k = L.transpose(b, -1, -2)
        return Scores(a, k, _shape(node))
    if isinstance(a, Scores) and _is_neuron(b):
        return _attention(w, node, a.q, a.k, b, a.head_dependent)
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(_shape(node))
    if isinstance(a, Raw) or isinstance(b, Raw):
        if not (_is_neuron(a) or _is_neuron(b) or _is_param(a) or _is_param(b)):
            r = a if isinstance(a, Raw) else b
            return Raw(r.holder, _shape(node))
    raise UnsupportedOperationError(path, "matmul", "of this combination of operands")


def _head_nodes(x: Act, path: str) -> Tensor:
    """`(*lead, E)` nodes of an attention operand `(*lead, L, E)` (constant along L)."""
    if x.ids.dim() < 2:
        raise UnsupportedOperationError(path, "attention", "operands need a sequence axis")
    if x.ids.shape[-2] > 1:
        raise UnsupportedOperationError(path, "attention", "neurons vary along the sequence")
    ids = x.ids.select(-2, 0)
    return ids.expand(*ids.shape[:-1], x.shape[-1])


def _attention(w: Walker, node: fx.Node, q: Act, k: Act, v: Act, dependent: bool) -> Act:
    ctx = w.ctx
    path = _path(node)
    shape = _shape(node)
    qn, kn, vn = _head_nodes(q, path), _head_nodes(k, path), _head_nodes(v, path)
    lead = torch.broadcast_shapes(qn.shape[:-1], kn.shape[:-1], vn.shape[:-1])
    qn = qn.expand(*lead, qn.shape[-1]).reshape(-1, qn.shape[-1])
    kn = kn.expand(*lead, kn.shape[-1]).reshape(-1, kn.shape[-1])
    vn = vn.expand(*lead, vn.shape[-1]).reshape(-1, vn.shape[-1])
    if qn.shape[-1] != kn.shape[-1]:
        raise UnsupportedOperationError(path, "attention", "query and key widths differ")
    for t in (qn, kn, vn):
        if bool((t < 0).any()):
            raise UnsupportedOperationError(path, "attention", "padded head features")
    ctx.tie_nodes(qn, kn)
    trip = torch.cat([qn, kn, vn], 1)
    uniq = torch.unique(trip, dim=0)
    e = qn.shape[-1]
    hq, hk, hv = uniq[:, :e], uniq[:, e:2 * e], uniq[:, 2 * e:]
    cells = []
    for part in (hq, hk, hv):
        for row in part:
            ctx.cell(row, "head")
            cells.append(len(ctx.cells) - 1)
    heads = hq.shape[0]
    if heads > 1 and not dependent:
        ctx.heads.append(dict(H=heads, q=list(hq), k=list(hk), v=list(hv), cells=set(cells)))
    for h in range(heads):
        for part in (hq, hk, hv):
            ctx.head_of_node[int(part[h][0])] = (part[h], torch.full_like(part[h], h))
    ctx.add_struct_edges(uniq[:, :e].reshape(-1), uniq[:, e:2 * e].reshape(-1), 1.0,
                         "attn_qk", max(q.depth, k.depth))
    for a in (q, k, v):
        ctx.add_use(a, Use("other", a.chain, path))
    # output: v's neurons at every query position
    nd = len(shape)
    vids = v.ids.select(-2, 0).unsqueeze(-2)
    vids = vids.reshape((1,) * (nd - vids.dim()) + tuple(vids.shape))
    mat = tuple(vids.shape[d] > 1 for d in range(nd))
    return Act(vids, mat, shape, v.depth)


@op("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", weights=True)
def _sdpa(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    q, k, v = args[0], args[1], args[2]
    mask = _arg(args, kwargs, 3, "attn_mask")
    if kwargs.get("enable_gqa"):
        raise UnsupportedOperationError(_path(node), "grouped-query attention")
    for x in (q, k, v):
        if not _is_neuron(x):
            raise UnsupportedOperationError(_path(node), "attention",
                                            "q, k and v must come from layers")
    dependent = False
    if _is_neuron(mask):
        raise UnsupportedOperationError(_path(node), "attention with a neuron mask")
    if _is_param(mask):
        w.ctx.add_extra(mask.param, _path(node))
        dependent = True
    if isinstance(mask, Const):
        lead = q.ids.shape[:-2]
        msh = (1,) * (len(q.shape) - len(mask.shape)) + tuple(mask.shape)
        dependent = any(lead[d] > 1 and msh[d] > 1 for d in range(len(lead)))
    out = _attention(w, node, q, k, v, dependent)
    if isinstance(node.meta.get("val"), (tuple, list)):
        return TupleOut([out] + [Const(s) for s in _shapes(node)[1:]])
    return out
