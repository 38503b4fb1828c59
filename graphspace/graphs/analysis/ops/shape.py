"""Layout ops (views, permutes, slices, concatenation): the node ids follow the values."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from graphspace.graphs.analysis import layout as L
from graphspace.graphs.analysis.context import (
    Act,
    Const,
    Opaque,
    Raw,
    Scores,
    TupleOut,
)
from graphspace.graphs.analysis.ops.elementwise import _free_set
from graphspace.graphs.analysis.ops.table import (
    _arg,
    _flatten_vals,
    _is_neuron,
    _is_param,
    _op_name,
    _path,
    _shape,
    _shapes,
    op,
)
from graphspace.graphs.analysis.ops.walker import Walker
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedOperationError

# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------


def _layout(w: Walker, node: fx.Node, x: Any, fn: Callable[[Act], Act]) -> Any:
    shape = _shape(node)
    if isinstance(x, Act):
        return fn(x)
    if isinstance(x, Raw):
        return Raw(x.holder, shape, x.chain)
    if isinstance(x, Const):
        return Const(shape, x.invariant, x.what)
    if isinstance(x, Scores):
        return Opaque(f"reshaped attention weights at {_path(node)}")
    return x


@op("view", "_unsafe_view", "reshape", "unflatten", "flatten", "view_copy", "_reshape_alias")
def _view(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    shape = _shape(node)
    return _layout(w, node, args[0], lambda x: L.reshape(x, shape))


@op("permute", "permute_copy")
def _permute(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _layout(w, node, args[0], lambda x: L.permute(x, args[1]))


@op("transpose", "swapaxes", "swapdims")
def _transpose(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if isinstance(x, Scores):
        return Opaque("transposed attention weights")
    return _layout(w, node, x, lambda a: L.transpose(a, args[1], args[2]))


@op("t", "numpy_T")
def _t(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _layout(w, node, args[0], lambda a: L.transpose(a, 0, -1) if a.ndim == 2 else a)


@op("unsqueeze")
def _unsqueeze(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _layout(w, node, args[0], lambda a: L.unsqueeze(a, args[1]))


@op("squeeze")
def _squeeze(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    d = args[1] if len(args) > 1 else None
    dims = None if d is None else ([d] if isinstance(d, int) else list(d))
    return _layout(w, node, args[0], lambda a: L.squeeze(a, dims))


@op("expand", "expand_copy", "expand_as", "broadcast_to")
def _expand(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    shape = _shape(node)
    return _layout(w, node, args[0], lambda a: L.expand(a, shape))


def _select_cell(w: Walker, x: Act, dim: int, index: Tensor) -> None:
    """Selecting part of a neuron dimension: the selected neurons form a cell."""
    if x.param is not None or not (x.ids.shape[dim] > 1):
        return
    part = x.ids.index_select(dim, index)
    w.ctx.cell(part)
    rest = torch.ones(x.ids.shape[dim], dtype=torch.bool)
    rest[index] = False
    if bool(rest.any()):
        w.ctx.cell(x.ids.index_select(dim, torch.nonzero(rest).view(-1)))


@op("select")
def _select(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, dim, i = args[0], args[1], args[2]
    if isinstance(x, Scores):
        return Opaque("a slice of attention weights")

    def fn(a: Act) -> Act:
        d = dim % a.ndim
        idx = torch.tensor([i % a.shape[d]])
        if a.ids.shape[d] > 1:
            _select_cell(w, a, d, idx)
            return L.index_dim(a, d, idx, False, _shape(node))
        return L.index_dim(a, d, torch.tensor([0]), False, _shape(node))

    return _layout(w, node, x, fn)


def _slice_index(size: int, start: Any, end: Any, step: Any) -> Tensor:
    return torch.arange(size)[slice(start, end, step or 1)]


@op("slice", "narrow")
def _slice(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = _op_name(node)
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim", 0)
    if name == "narrow":
        start, length = args[2], args[3]
        start_end = (start, start + length, 1)
    else:
        start_end = (_arg(args, kwargs, 2, "start"), _arg(args, kwargs, 3, "end"),
                     _arg(args, kwargs, 4, "step", 1))
    if isinstance(x, Scores):
        return Opaque("a slice of attention weights")

    def fn(a: Act) -> Act:
        d = dim % a.ndim
        size = a.shape[d]
        idx = _slice_index(size, *start_end)
        if a.ids.shape[d] > 1:
            if idx.numel() == size and torch.equal(idx, torch.arange(size)):
                return a.replace(shape=_shape(node))
            _select_cell(w, a, d, idx)
            out = L.index_dim(a, d, idx, True, _shape(node))
            return out.replace(chain=out.chain + ("slice",))
        return L.index_dim(a, d, idx, True, _shape(node))

    return _layout(w, node, x, fn)


@op("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split")
def _split(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = _op_name(node)
    x = args[0]
    shapes = _shapes(node)
    dim = _arg(args, kwargs, 2 if name not in ("unbind",) else 1, "dim", 0)
    if name == "unbind":
        dim = _arg(args, kwargs, 1, "dim", 0)
    if isinstance(x, Raw):
        return TupleOut([Raw(x.holder, s, x.chain) for s in shapes])
    if isinstance(x, Const):
        return TupleOut([Const(s, x.invariant, x.what) for s in shapes])
    if not isinstance(x, Act):
        return TupleOut([Opaque(f"a split of {getattr(x, 'what', 'a value')}")
                         for _ in shapes])
    d = dim % x.ndim
    out = []
    start = 0
    for s in shapes:
        if name == "unbind":
            idx = torch.tensor([start])
            size = 1
        else:
            size = s[d]
            idx = torch.arange(start, start + size)
        if x.ids.shape[d] > 1:
            _select_cell(w, x, d, idx)
            part = L.index_dim(x, d, idx, name != "unbind", s)
        else:
            part = L.index_dim(x, d, torch.tensor([0]), name != "unbind", s)
        out.append(part)
        start += size
    return TupleOut(out)


@op("cat", "concat", "concatenate")
def _cat(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _concat(w, node, list(args[0]), _arg(args, kwargs, 1, "dim", 0))


@op("stack")
def _stack(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """`stack` is `cat` of the parts unsqueezed at `dim`."""
    d = _arg(args, kwargs, 1, "dim", 0) % len(_shape(node))
    parts = [L.unsqueeze(p, d) if isinstance(p, Act) else dataclasses.replace(
        p, shape=p.shape[:d] + (1,) + p.shape[d:]) if isinstance(p, (Raw, Const)) else p
        for p in args[0]]
    return _concat(w, node, parts, d)


def _concat(w: Walker, node: fx.Node, parts: list, dim: int) -> Any:
    shape = _shape(node)
    nd = len(shape)
    d = dim % nd
    if not any(_is_neuron(p) for p in parts) and not any(_is_param(p) for p in parts):
        raw = next((p for p in parts if isinstance(p, Raw)), None)
        if raw is not None:
            return Raw(raw.holder, shape, raw.chain)
        return Const(shape)
    acts: list[Act] = []
    for p in parts:
        if _is_neuron(p):
            acts.append(p)
        elif _is_param(p):
            acts.append(_free_set(w, p, node))
        elif isinstance(p, Const):
            if "uniform" not in p.what:
                raise UnsupportedOperationError(
                    _path(node), "cat", f"concatenates neurons with {p.what}")
            acts.append(Act(torch.full([1] * nd, -1, dtype=torch.long), (False,) * nd, p.shape))
        elif isinstance(p, Raw):
            # the model input joins neurons along this axis: it needs input nodes
            ref = next(a for a in parts if _is_neuron(a))
            md = [k for k in range(nd) if ref.ids.shape[k] > 1]
            if len(md) != 1 or md[0] == d:
                raise UnsupportedOperationError(_path(node), "cat", "of a raw model input")
            acts.append(w.ctx.resolve(p, p.shape[md[0]], _path(node), md[0]))
        else:
            raise UnsupportedOperationError(_path(node), "cat", "of a non-tensor value")
    varies = any(a.ids.shape[d] > 1 for a in acts) or any(a.mat[d] for a in acts)
    depth = max(a.depth for a in acts)
    if varies:
        out = L.cat(acts, d, shape)
        for a in acts:
            w.ctx.add_use(a, Use("other", a.chain, "cat"))
        return out.replace(depth=depth, chain=())
    # along a non-neuron axis (tokens): parts must hold the same neurons
    mat = [False] * nd
    for a in acts:
        for k in range(nd):
            if a.ids.shape[k] > 1:
                mat[k] = True
    target = [shape[k] if mat[k] and k != d else 1 for k in range(nd)]
    ids = [a.ids.expand([t if a.ids.shape[k] == 1 else a.ids.shape[k]
                         for k, t in enumerate(target)]) for a in acts]
    ids = [i.expand(target) for i in ids]
    if all(torch.equal(ids[0], i) for i in ids[1:]):
        return acts[0].replace(ids=ids[0], shape=shape, depth=depth)
    for a in acts:
        w.ctx.add_use(a, Use("other", a.chain, "cat"))
    return w.merge(ids, shape, tuple(mat), "residual", [1.0] * len(ids), depth, _path(node))


@op("roll", "flip")
def _roll(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """`roll`/`flip` move entries along their dims: applied to the ids where they vary."""
    name = _op_name(node)

    def fn(a: Act) -> Act:
        if name == "flip":
            dims = [d % a.ndim for d in args[1] if a.ids.shape[d % a.ndim] > 1]
            ids = a.ids.flip(dims) if dims else a.ids
            return a.replace(ids=ids, shape=_shape(node))
        shifts = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = _arg(args, kwargs, 2, "dims", [])
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if not dims:
            if any(s_ > 1 for s_ in a.ids.shape):
                raise UnsupportedOperationError(_path(node), "roll of the flattened neurons")
            return a.replace(shape=_shape(node))
        moved = [(sh, d % a.ndim) for sh, d in zip(shifts, dims) if a.ids.shape[d % a.ndim] > 1]
        ids = torch.roll(a.ids, [m[0] for m in moved], [m[1] for m in moved]) if moved else a.ids
        return a.replace(ids=ids, shape=_shape(node))

    return _layout(w, node, args[0], fn)


@op("constant_pad_nd", "pad")
def _pad(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    pads = list(args[1])
    value = _arg(args, kwargs, 2, "value", 0.0)

    def fn(a: Act) -> Act:
        ids = a.ids
        for k in range(len(pads) // 2):
            dd = a.ndim - 1 - k
            lo, hi = pads[2 * k], pads[2 * k + 1]
            if ids.shape[dd] > 1 and (lo or hi):
                if lo < 0 or hi < 0:
                    raise UnsupportedOperationError(_path(node), "negative padding of neurons")
                if value not in (0, 0.0, None):
                    raise UnsupportedOperationError(_path(node), "non-zero padding of neurons")
                shp = list(ids.shape)
                shp[dd] = lo
                left = torch.full(shp, -1, dtype=torch.long)
                shp[dd] = hi
                right = torch.full(shp, -1, dtype=torch.long)
                ids = torch.cat([left, ids, right], dd)
        return a.replace(ids=ids, shape=_shape(node), chain=a.chain + ("pad",))

    return _layout(w, node, x, fn)


@op("repeat")
def _repeat(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    def fn(a: Act) -> Act:
        reps = list(args[1])
        lead = len(reps) - a.ndim
        ids = a.ids.reshape((1,) * lead + tuple(a.ids.shape))
        if any(r > 1 and ids.shape[k] > 1 for k, r in enumerate(reps)):
            raise UnsupportedOperationError(_path(node), "repeat along a neuron axis")
        return a.replace(ids=ids, mat=(False,) * lead + a.mat, shape=_shape(node))

    return _layout(w, node, args[0], fn)


@op("index", "index_select", "gather", "take", "_unsafe_index")
def _index(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """Gathers by index tensors. A gathered parameter (a relative-position bias table) is kept
    verbatim and acts as a constant: the neurons or heads it varies along stay fixed. Neurons may
    be gathered along other axes (tokens) when they vary along the last axis only."""
    x = args[0]
    shape = _shape(node)
    params = [v for v in _flatten_vals(args) if _is_param(v)]
    if params:
        if any(_is_neuron(v) for v in _flatten_vals(args)):
            raise UnsupportedOperationError(_path(node), "gather of neurons by a parameter")
        for p in params:
            w.ctx.add_extra(p.param, _path(node))
        return Const(shape, what="a gathered parameter")
    if isinstance(x, Raw):
        return Raw(x.holder, shape, x.chain)
    if isinstance(x, Const):
        return Const(shape, x.invariant, x.what)
    if not _is_neuron(x):
        return Opaque(f"a gather of {getattr(x, 'what', 'a value')}")
    varying = [d for d in range(x.ndim) if x.ids.shape[d] > 1]
    name = _op_name(node)
    dim = args[1] if name in ("index_select", "gather") else None
    if name == "take" or varying not in ([], [x.ndim - 1]) or (
            dim is not None and dim % x.ndim == x.ndim - 1) or (
            name in ("index", "_unsafe_index") and len(args[1]) >= x.ndim and
            args[1][x.ndim - 1] is not None) or shape[-1] != x.shape[-1]:
        raise UnsupportedOperationError(_path(node), f"{name} of neurons",
                                        "indexes the neuron axis")
    ids = x.ids.reshape(-1)[-1:] if not varying else x.ids.reshape(-1)
    nd = len(shape)
    return x.replace(ids=ids.view((1,) * (nd - 1) + (-1,)), mat=(False,) * (nd - 1) + (True,),
                     shape=shape, chain=x.chain + ("gather",))
