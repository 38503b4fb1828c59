"""Reductions and pooling."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from graphspace.graphs.analysis.context import (
    Act,
    Const,
    Opaque,
    Raw,
    Scores,
    TupleOut,
)
from graphspace.graphs.analysis.ops.elementwise import _binary, _unary
from graphspace.graphs.analysis.ops.table import _arg, _op_name, _path, _shapes, op
from graphspace.graphs.analysis.ops.walker import Walker
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedOperationError

# ---------------------------------------------------------------------------------------------
# reductions and pooling
# ---------------------------------------------------------------------------------------------


@op("mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod",
    "var_mean", "std_mean", "linalg_vector_norm", "all", "any", "argmax", "argmin", "nansum",
    "nanmean")
def _reduce(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = _op_name(node)
    x = args[0]
    overload = node.target._overloadname  # type: ignore[union-attr]
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], (Act, Const, Raw)):
        return _binary(w, node, args[0], args[1], "maximum")
    if name in ("norm", "linalg_vector_norm"):
        dim = _arg(args, kwargs, 2, "dim")
    elif name in ("var", "std", "var_mean", "std_mean") and overload == "correction":
        dim = _arg(args, kwargs, 1, "dim")
    else:
        dim = _arg(args, kwargs, 1, "dim")
    keep = bool(_arg(args, kwargs, 2 if name not in ("norm", "linalg_vector_norm") else 3,
                     "keepdim", False))
    shapes = _shapes(node)
    tuple_out = isinstance(node.meta.get("val"), (tuple, list))
    shape = shapes[0]
    if not isinstance(x, Act):
        if isinstance(x, Scores):
            return Opaque("a reduction of attention weights")
        if isinstance(x, Raw):
            r = Raw(x.holder, shape, x.chain)
            return TupleOut([r, Const(shapes[-1])]) if tuple_out else r
        c = Const(shape, getattr(x, "invariant", False))
        return TupleOut([c, Const(shapes[-1])]) if tuple_out else c
    nd = x.ndim
    dims = list(range(nd)) if dim is None or dim == [] else (
        [dim] if isinstance(dim, int) else list(dim))
    dims = sorted({d % nd for d in dims})
    over_neurons = [d for d in dims if x.ids.shape[d] > 1 or x.mat[d]]
    if x.param is not None:
        raise UnsupportedOperationError(_path(node), f"{name} of a parameter")
    if over_neurons:
        others = [d for d in range(nd) if d not in dims and x.ids.shape[d] > 1]
        if others:
            w.ctx.fix_act(x)
        w.ctx.add_use(x, Use("other", x.chain, _path(node)))
        c = Const(shape, invariant=True, what=f"a reduction over neurons ({name})")
        return TupleOut([c, Const(shapes[-1])]) if tuple_out else c
    tag = {"mean": "avgpool", "sum": "sumpool", "amax": "maxpool", "max": "maxpool",
           "nansum": "sumpool", "nanmean": "avgpool"}.get(name, "elementwise")
    if name in ("argmax", "argmin"):
        return Opaque(f"{name} indices")
    ids = x.ids
    mat = list(x.mat)
    if not keep:
        for d in reversed(dims):
            ids = ids.squeeze(d) if ids.dim() > d else ids
            del mat[d]
    out = x.replace(ids=ids, mat=tuple(mat), shape=shape, chain=x.chain + (tag,))
    return TupleOut([out, Const(shapes[-1])]) if tuple_out else out


POOL_OPS = {
    "max_pool1d": "maxpool", "max_pool2d": "maxpool", "max_pool3d": "maxpool",
    "max_pool2d_with_indices": "maxpool", "max_pool3d_with_indices": "maxpool",
    "max_pool1d_with_indices": "maxpool",
    "avg_pool1d": "avgpool", "avg_pool2d": "avgpool", "avg_pool3d": "avgpool",
    "adaptive_avg_pool1d": "avgpool", "adaptive_avg_pool2d": "avgpool",
    "adaptive_avg_pool3d": "avgpool", "_adaptive_avg_pool2d": "avgpool",
    "adaptive_max_pool1d": "maxpool", "adaptive_max_pool2d": "maxpool",
    "adaptive_max_pool3d": "maxpool",
    "upsample_nearest1d": "upsample", "upsample_nearest2d": "upsample",
    "upsample_nearest3d": "upsample", "upsample_bilinear2d": "upsample_linear",
    "upsample_linear1d": "upsample_linear", "upsample_trilinear3d": "upsample_linear",
    "upsample_bicubic2d": "upsample_linear", "_upsample_nearest_exact2d": "upsample",
    "pixel_shuffle": "shuffle", "pixel_unshuffle": "shuffle",
}


@op(*POOL_OPS)
def _pool(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = _op_name(node)
    tag = POOL_OPS[name]
    x = args[0]
    shapes = _shapes(node)
    tuple_out = isinstance(node.meta.get("val"), (tuple, list))
    if isinstance(x, Raw):
        r = Raw(x.holder, shapes[0], x.chain)
        return TupleOut([r, Const(shapes[-1])]) if tuple_out else r
    if not isinstance(x, Act) or x.param is not None:
        return _unary(w, x, tag, shapes[0])
    if tag == "shuffle" or any(x.ids.shape[d] > 1 for d in range(2, x.ndim)):
        raise UnsupportedOperationError(_path(node), name, "mixes the channel axis")
    out = x.replace(shape=shapes[0], chain=x.chain + (tag if tag != "upsample" else
                                                        "avgpool",))
    return TupleOut([out, Const(shapes[-1])]) if tuple_out else out
