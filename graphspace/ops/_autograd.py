"""`torch.autograd.Function` wrappers shared by the `torch` and `triton` backends.

Each wrapper calls its backend module's forward/backward (same function names in
`graphspace.ops._torch` and `graphspace.ops._triton`), casts to and from the
accumulation dtype, and saves only the inputs (never the `E x F` messages). The backward
passes are first-order (`once_differentiable`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from graphspace.ops.layout import CSR, EdgeList


def impl_module(backend: str) -> ModuleType:
    return importlib.import_module(f"graphspace.ops._{backend}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _in(t: Tensor | None, impl: ModuleType) -> Tensor | None:
    if t is None or not impl.UPCAST_INPUTS:
        return t
    return t.to(acc_dtype(t.dtype))


def _out(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    if t is None or like is None:
        return None
    return t.to(like.dtype)


class ScatterFn(torch.autograd.Function):
    """`scatter` of a 2-D `src` along dim 0 (`index` is the original target index)."""

    @staticmethod
    def forward(ctx: Any, src: Tensor, index: Tensor, csr: CSR, reduce: str,
                impl: ModuleType) -> Tensor:
        out = impl.scatter_forward(_in(src, impl), csr, reduce)
        ctx.csr, ctx.reduce = csr, reduce
        ctx.save_for_backward(src, index, out if reduce in ("max", "min", "std") else None)
        ctx.mark_non_differentiable(index)
        return out.to(src.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        src, index, out = ctx.saved_tensors
        csr, reduce = ctx.csr, ctx.reduce
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        acc = acc_dtype(src.dtype)
        g = g.to(acc)
        if reduce in ("mean", "std"):
            cnt = csr.counts(acc).clamp(min=1).unsqueeze(-1)
        if reduce == "sum":
            grad = g.index_select(0, index)
        elif reduce == "mean":
            grad = (g / cnt).index_select(0, index)
        elif reduce in ("max", "min"):
            s = src.to(acc)
            hit = s == out.index_select(0, index)
            ties = torch.zeros_like(out).index_add_(0, index, hit.to(acc))
            grad = (g / ties.clamp(min=1)).index_select(0, index).mul_(hit)
        else:  # std = sqrt(mean((x - mu)^2) + eps): d/dx_e = (x_e - mu) / (n * std)
            s = src.to(acc)
            mu = torch.zeros_like(out).index_add_(0, index, s) / cnt
            grad = (s - mu.index_select(0, index)).mul_((g / (cnt * out)).index_select(0, index))
        return grad.to(src.dtype), None, None, None, None


class WeightedFn(torch.autograd.Function):
    """`out_i = reduce_{j -> i} w_ij x_j`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, csr: CSR, reduce: str,
                impl: ModuleType) -> Tensor:
        extremum = reduce in ("max", "min")
        need_ties = extremum and any(ctx.needs_input_grad[:2])
        out, ties = impl.weighted_forward(_in(x, impl), _in(w, impl), csr, reduce, need_ties)
        ctx.csr, ctx.reduce, ctx.impl = csr, reduce, impl
        ctx.save_for_backward(x, w, out if extremum else None, ties)
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, out, ties = ctx.saved_tensors
        impl = ctx.impl
        gx, gw = impl.weighted_backward(
            g.to(acc_dtype(x.dtype)), _in(x, impl), _in(w, impl), out, ties, ctx.csr,
            ctx.reduce, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return _out(gx, x), _out(gw, w), None, None, None


class EgnnCoordFn(torch.autograd.Function):
    """`out_i = reduce_{j -> i} phi_ij (p_i - p_j) [/ (|p_i - p_j| + eps)]`."""

    @staticmethod
    def forward(ctx: Any, pos: Tensor, coef: Tensor, csr: CSR | EdgeList, reduce: str,
                normalize: bool, eps: float, impl: ModuleType) -> Tensor:
        out, diffs = impl.egnn_forward(_in(pos, impl), _in(coef, impl), csr, reduce, normalize,
                                       eps, keep=any(ctx.needs_input_grad[:2]))
        ctx.csr, ctx.reduce, ctx.normalize, ctx.eps, ctx.impl = csr, reduce, normalize, eps, impl
        ctx.save_for_backward(pos, coef, diffs)
        return out.to(pos.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        pos, coef, diffs = ctx.saved_tensors
        impl = ctx.impl
        gpos, gcoef = impl.egnn_backward(
            g.to(acc_dtype(pos.dtype)), _in(pos, impl), _in(coef, impl), diffs, ctx.csr,
            ctx.reduce, ctx.normalize, ctx.eps, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return _out(gpos, pos), _out(gcoef, coef), None, None, None, None, None


class SheafFn(torch.autograd.Function):
    """`out_i = reduce_{j -> i} F_ij x_j` with `x`: `(N, d, C)`, `F`: `(E, d, d)`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, maps: Tensor, csr: CSR, reduce: str,
                impl: ModuleType) -> Tensor:
        out = impl.sheaf_forward(_in(x, impl), _in(maps, impl), csr, reduce)
        ctx.csr, ctx.reduce, ctx.impl = csr, reduce, impl
        ctx.save_for_backward(x, maps)
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, maps = ctx.saved_tensors
        impl = ctx.impl
        gx, gmaps = impl.sheaf_backward(
            g.to(acc_dtype(x.dtype)), _in(x, impl), _in(maps, impl), ctx.csr, ctx.reduce,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return _out(gx, x), _out(gmaps, maps), None, None, None
