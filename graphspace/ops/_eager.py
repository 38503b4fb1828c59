"""Message-materialising formulations of every op (the way eager PyG computes them).

Used in two places: under `torch.compile` (plain differentiable torch ops that Inductor traces
and fuses, no host syncs, no graph breaks) and for the `torch_scatter` backend when a fused op
is forced onto it (`torch_scatter` only provides the reduction). Inputs are upcast to float32
for float16/bfloat16, like the other backends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ScatterFn = Callable[[Tensor, Tensor, int, str], Tensor]


def upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def torch_scatter_2d(src: Tensor, index: Tensor, dim_size: int, reduce: str) -> Tensor:
    """Traceable plain-torch reduction of `src` (`(E, ...)`) along dim 0."""
    shape = (dim_size,) + tuple(src.shape[1:])
    if reduce in ("sum", "mean"):
        out = src.new_zeros(shape).index_add(0, index, src)
        if reduce == "mean":
            cnt = src.new_zeros(dim_size).index_add(0, index, src.new_ones(index.shape))
            out = out / cnt.clamp(min=1).view((-1,) + (1,) * (src.dim() - 1))
        return out
    if reduce in ("max", "min"):
        idx = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
        amax = "amax" if reduce == "max" else "amin"
        return src.new_zeros(shape).scatter_reduce(0, idx, src, amax, include_self=False)
    if reduce == "std":
        return std_from_mean(src, index, dim_size, torch_scatter_2d)
    raise ValueError(reduce)


def std_from_mean(src: Tensor, index: Tensor, dim_size: int, scatter_fn: ScatterFn) -> Tensor:
    """`sqrt(mean((x - mean)^2) + 1e-12)` per group, 0 for empty groups."""
    mean = scatter_fn(src, index, dim_size, "mean")
    centred = src - mean.index_select(0, index)
    var = scatter_fn(centred * centred, index, dim_size, "mean")
    cnt = torch.zeros(dim_size, dtype=src.dtype, device=src.device).index_add(
        0, index, torch.ones_like(index, dtype=src.dtype))
    nonempty = (cnt > 0).view((-1,) + (1,) * (src.dim() - 1))
    return torch.where(nonempty, (var + 1e-12).sqrt(), torch.zeros_like(var))


def torch_scatter_ext(src: Tensor, index: Tensor, dim_size: int, reduce: str) -> Tensor:
    """Reduction by the `torch_scatter` extension (gradient of max/min: the arg-extremum)."""
    import torch_scatter

    if reduce == "std":
        return std_from_mean(src, index, dim_size, torch_scatter_ext)
    return torch_scatter.scatter(src, index, 0, dim_size=dim_size, reduce=reduce)


def scatter(src: Tensor, index: Tensor, dim_size: int, reduce: str, fn: ScatterFn) -> Tensor:
    return fn(upcast(src), index, dim_size, reduce).to(src.dtype)


def weighted(x: Tensor, edge_index: Tensor, w: Tensor | None, dim_size: int, reduce: str,
             fn: ScatterFn) -> Tensor:
    msg = upcast(x).index_select(0, edge_index[0])
    if w is not None:
        w = upcast(w)
        msg = msg * (w.unsqueeze(-1) if w.dim() == 1 else w)
    return fn(msg, edge_index[1], dim_size, reduce).to(x.dtype)


def egnn_coord(pos: Tensor, edge_index: Tensor, coef: Tensor, reduce: str, normalize: bool,
               eps: float, fn: ScatterFn) -> Tensor:
    p = upcast(pos)
    diff = p.index_select(0, edge_index[1]) - p.index_select(0, edge_index[0])
    if normalize:
        diff = diff / (diff.norm(dim=-1, keepdim=True) + eps)
    msg = diff * upcast(coef).unsqueeze(-1)
    return fn(msg, edge_index[1], pos.size(0), reduce).to(pos.dtype)


def sheaf(x: Tensor, edge_index: Tensor, maps: Tensor, dim_size: int, reduce: str,
          fn: ScatterFn) -> Tensor:
    msg = torch.bmm(upcast(maps), upcast(x).index_select(0, edge_index[0]))
    return fn(msg, edge_index[1], dim_size, reduce).to(x.dtype)
