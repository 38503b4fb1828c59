"""Built-in layer rules: how each module type becomes neurons and parameter edges.

A rule receives the analysis context, the module, its qualified path and the analysed
arguments, records the module's state-dict entries and returns the analysed output. New module
types are added the same way with :func:`graphspace.graphs.register_rule`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphspace.graphs.analysis import (
    Act,
    AnalysisContext,
    Use,
    _Opaque,
    _TupleOut,
    register_rule,
)
from graphspace.graphs.errors import UnsupportedModuleError


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@register_rule(nn.Linear)
def linear_rule(ctx: AnalysisContext, m: nn.Linear, path: str, args: tuple, kwargs: dict) -> Act:
    """``y = x W^T + b``: one edge per weight entry ``W[o, i]`` from input ``i`` to output ``o``.

    After a flatten of ``C`` channels with ``S`` spatial positions, the input neurons are the
    ``C`` channels and each edge carries its spatial position (as in Graph Metanetworks).
    """
    x = args[0] if args else kwargs["input"]
    x = ctx.resolve(x, m.in_features, path)
    if x.flat is None and x.cdim != -1 and x.ndim != 2:
        raise UnsupportedModuleError(path, "Linear", "its input's neuron axis is not the last one")
    src = ctx.set_nodes(x.segs)
    c = src.numel()
    o = m.out_features
    wkey = _key(path, "weight")
    if x.flat is not None:
        if m.in_features % c:
            raise UnsupportedModuleError(
                path, "Linear", f"in_features={m.in_features} is not a multiple of the {c} "
                "flattened channels",
            )
        s = m.in_features // c
        if x.flat == "major":
            view, perm = (o, c, s), (0, 1, 2)
        else:
            view, perm = (o, s, c), (0, 2, 1)
    else:
        view, perm = (o, m.in_features), (0, 1)
    depth = x.depth + 1
    sid = ctx.new_set(o, "linear", path, depth)
    out = ctx.sets[sid].nodes
    ctx.add_edge_param(wkey, out, src, "linear", depth, path, view, perm,
                       dst_sets=[sid], src_sets=x.segs)
    if m.bias is not None:
        ctx.add_node_param(_key(path, "bias"), out, 0, path, depth, sets=[sid])
    ctx.add_use(x, Use("param", x.chain, wkey))
    return Act([sid], -1, depth, x.ndim if x.flat is None else 2)


@register_rule(nn.modules.conv._ConvNd)
def conv_rule(ctx: AnalysisContext, m: nn.Conv2d, path: str, args: tuple, kwargs: dict) -> Act:
    """``ConvNd``: one edge per kernel entry ``W[o, i, *k]`` carrying its spatial offset ``k``.

    Grouped convolutions connect output ``o`` to the inputs of its group. Depthwise convolutions
    (``groups == in == out``) tie the input and output channel permutations; other grouped
    convolutions keep their channels fixed (a conservative, always-correct choice).
    """
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        raise UnsupportedModuleError(path, type(m).__name__, "transposed convolutions")
    x = args[0] if args else kwargs["input"]
    if isinstance(x, Act) and x.segs is None:
        x = x.replace(cdim=1)
    x = ctx.resolve(x, m.in_channels, path)
    if x.cdim != 1 or x.flat is not None:
        raise UnsupportedModuleError(path, type(m).__name__, "its input's channel axis is not 1")
    depth = x.depth + 1
    sid = ctx.new_set(m.out_channels, "conv", path, depth)
    out = ctx.sets[sid].nodes
    wkey = _key(path, "weight")
    ctx.add_edge_param(wkey, out, ctx.set_nodes(x.segs), "conv", depth, path,
                       groups=m.groups, dst_sets=[sid], src_sets=x.segs)
    if m.bias is not None:
        ctx.add_node_param(_key(path, "bias"), out, 0, path, depth, sets=[sid])
    ctx.add_use(x, Use("param", x.chain, wkey))
    y = Act([sid], 1, depth, x.ndim)
    if m.groups > 1:
        if m.groups == m.in_channels == m.out_channels:
            ctx.tie_acts(x, y)
        else:
            ctx.fix(list(x.segs) + [sid])
    return y


def _norm(
    ctx: AnalysisContext, m: nn.Module, path: str, x: Act, weight: str | None,
    bias: str | None, stats: bool, cdim_ok: bool, fix: bool = False,
) -> Act:
    if not cdim_ok:
        raise UnsupportedModuleError(path, type(m).__name__, "its input's channel axis differs")
    depth = x.depth + 1
    new_segs: list[int] = []
    for s in x.segs or []:
        sid = ctx.new_set(ctx.sets[s].size, "norm", path, depth)
        new_segs.append(sid)
        ctx.tie(s, sid)
        if fix:
            ctx.fix([s, sid])
    src = ctx.set_nodes(x.segs)
    dst = ctx.set_nodes(new_segs)
    if weight is not None:
        ctx.add_diag_param(_key(path, weight), dst, src, depth, path, new_segs, x.segs)
    else:
        ctx.add_struct_edges(src, dst, 1.0, "norm", depth)
    if bias is not None:
        ctx.add_node_param(_key(path, bias), dst, 0, path, depth, sets=new_segs)
    if stats:
        ctx.add_node_param(_key(path, "running_mean"), dst, 1, path, depth, sets=new_segs)
        ctx.add_node_param(_key(path, "running_var"), dst, 2, path, depth, sets=new_segs)
        if _key(path, "num_batches_tracked") in ctx.state:
            ctx.add_extra(_key(path, "num_batches_tracked"), path)
    ctx.add_use(x, Use("other", x.chain, path))
    return Act(new_segs, x.cdim, depth, x.ndim)


@register_rule(nn.modules.batchnorm._NormBase)
def batchnorm_rule(ctx: AnalysisContext, m: nn.BatchNorm2d, path: str, args: tuple,
                   kwargs: dict) -> Act:
    """BatchNorm / InstanceNorm: a new neuron per channel. ``gamma`` is a diagonal edge from the
    channel to its normalised copy, ``beta`` the copy's bias; running mean and variance are
    node features (columns 1 and 2)."""
    x = args[0]
    if isinstance(x, Act) and x.segs is None:
        x = x.replace(cdim=1)
    x = ctx.resolve(x, m.num_features, path)
    ok = x.cdim == 1 or (x.cdim == -1 and x.ndim in (None, 2))
    has_stats = m.track_running_stats and m.running_mean is not None
    return _norm(ctx, m, path, x, "weight" if m.affine else None,
                 "bias" if m.affine else None, has_stats, ok)


@register_rule(nn.LayerNorm)
def layernorm_rule(ctx: AnalysisContext, m: nn.LayerNorm, path: str, args: tuple,
                   kwargs: dict) -> Act:
    """LayerNorm over the feature axis: diagonal ``gamma`` edges, ``beta`` biases."""
    if len(m.normalized_shape) != 1:
        raise UnsupportedModuleError(path, "LayerNorm", "normalized_shape must be one axis")
    x = ctx.resolve(args[0], m.normalized_shape[0], path)
    w = "weight" if m.weight is not None else None
    b = "bias" if getattr(m, "bias", None) is not None else None
    return _norm(ctx, m, path, x, w, b, False, x.cdim == -1 or x.ndim == 2)


@register_rule(nn.GroupNorm)
def groupnorm_rule(ctx: AnalysisContext, m: nn.GroupNorm, path: str, args: tuple,
                   kwargs: dict) -> Act:
    """GroupNorm: as LayerNorm per group. Channel permutations are kept only when they cannot
    mix groups (``num_groups`` is 1 or equals the channels); otherwise the channels are fixed."""
    x = args[0]
    if isinstance(x, Act) and x.segs is None:
        x = x.replace(cdim=1)
    x = ctx.resolve(x, m.num_channels, path)
    w = "weight" if m.affine else None
    fix = m.num_groups not in (1, m.num_channels)
    return _norm(ctx, m, path, x, w, w and "bias", False, x.cdim == 1, fix=fix)


@register_rule(nn.Embedding)
def embedding_rule(ctx: AnalysisContext, m: nn.Embedding, path: str, args: tuple,
                   kwargs: dict) -> Act:
    """Embedding: one input neuron per token, an edge ``token -> feature`` per table entry."""
    x = args[0]
    if not isinstance(x, Act) or x.segs is not None:
        raise UnsupportedModuleError(path, "Embedding", "its input must be a model input")
    x = ctx.resolve(x, m.num_embeddings, path)
    depth = 1
    sid = ctx.new_set(m.embedding_dim, "embedding", path, depth)
    ctx.add_edge_param(_key(path, "weight"), ctx.sets[sid].nodes, ctx.set_nodes(x.segs),
                       "embedding", depth, path, (m.num_embeddings, m.embedding_dim), (1, 0),
                       dst_sets=[sid], src_sets=x.segs)
    return Act([sid], -1, depth, None)


@register_rule(nn.MultiheadAttention)
def mha_rule(ctx: AnalysisContext, m: nn.MultiheadAttention, path: str, args: tuple,
             kwargs: dict) -> _TupleOut:
    r"""MultiheadAttention, head-aware.

    Query, key and value projections create neuron sets ``Q``, ``K``, ``V`` of ``embed_dim``
    neurons each (node feature ``head`` = head index); ``out_proj`` connects ``V`` to the output.
    Within a head, ``Q`` and ``K`` share one permutation (``q^T k`` is invariant) and ``V`` has
    its own; heads move as blocks in ``Q``, ``K`` and ``V`` together. Non-parameter edges
    ``q_j -> k_j`` (type ``attn_qk``) link matching query and key neurons.
    """
    q = args[0] if len(args) > 0 else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    if m.bias_k is not None or m.bias_v is not None:
        raise UnsupportedModuleError(path, "MultiheadAttention", "add_bias_kv=True")
    q = ctx.resolve(q, m.embed_dim, path)
    k = ctx.resolve(k, m.kdim, path)
    v = ctx.resolve(v, m.vdim, path)
    for a in (q, k, v):
        if a.cdim != -1:
            raise UnsupportedModuleError(path, "MultiheadAttention", "features must be last")
    d = m.embed_dim
    depth = max(q.depth, k.depth, v.depth) + 1
    sq = ctx.new_set(d, "attn_q", path + ".q", depth)
    sk = ctx.new_set(d, "attn_k", path + ".k", depth)
    sv = ctx.new_set(d, "attn_v", path + ".v", depth)
    so = ctx.new_set(d, "linear", path + ".out_proj", depth + 1)
    nq, nk, nv, no = (ctx.sets[s].nodes for s in (sq, sk, sv, so))
    qkv = torch.cat([nq, nk, nv])
    if m._qkv_same_embed_dim:
        same = q.segs == k.segs == v.segs
        if not same:
            raise UnsupportedModuleError(
                path, "MultiheadAttention",
                "packed in_proj_weight with different query/key/value inputs (cross-attention "
                "with kdim == vdim == embed_dim) cannot be split into per-input edges",
            )
        ctx.add_edge_param(_key(path, "in_proj_weight"), qkv, ctx.set_nodes(q.segs), "attn_in",
                           depth, path, dst_sets=[sq, sk, sv], src_sets=q.segs)
    else:
        for name, dst, src, sid in (("q_proj_weight", nq, q, sq), ("k_proj_weight", nk, k, sk),
                                    ("v_proj_weight", nv, v, sv)):
            ctx.add_edge_param(_key(path, name), dst, ctx.set_nodes(src.segs), "attn_in", depth,
                               path, dst_sets=[sid], src_sets=src.segs)
    if m.in_proj_bias is not None:
        ctx.add_node_param(_key(path, "in_proj_bias"), qkv, 0, path, depth, sets=[sq, sk, sv])
    ctx.add_edge_param(_key(path, "out_proj.weight"), no, nv, "linear", depth + 1, path,
                       dst_sets=[so], src_sets=[sv])
    if m.out_proj.bias is not None:
        ctx.add_node_param(_key(path, "out_proj.bias"), no, 0, path, depth + 1, sets=[so])
    ctx.add_struct_edges(nq, nk, 1.0, "attn_qk", depth)
    heads = torch.arange(d) // m.head_dim
    for nodes in (nq, nk, nv):
        ctx.head_of_node[int(nodes[0])] = (nodes, heads)
    hg = ctx.new_head_group()
    for s in (sq, sk, sv):
        ctx.sets[s].num_heads = m.num_heads
        ctx.sets[s].head_group = hg
    ctx.tie(sq, sk)
    for a in (q, k, v):
        ctx.add_use(a, Use("other", a.chain, path))
    ndim: Any = q.ndim
    return _TupleOut([Act([so], -1, depth + 1, ndim), _Opaque(f"attention weights of {path}")])

