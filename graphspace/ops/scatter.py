r"""Scatter / segment reductions: the one dispatch point every layer aggregates through."""

from __future__ import annotations

import torch
from torch import Tensor

from graphspace.ops import _eager
from graphspace.ops._autograd import ScatterFn, impl_module
from graphspace.ops._checks import (
    check_device,
    check_dim_size,
    check_index,
    check_length,
    check_reduce,
    check_tensor,
)
from graphspace.ops.backend import _record, resolve_backend
from graphspace.ops.layout import CSR, get_csr

REDUCTIONS: tuple[str, ...] = ("sum", "mean", "max", "min", "std")


def _to_2d(src: Tensor, dim: int) -> tuple[Tensor, tuple[int, ...]]:
    moved = src.movedim(dim, 0) if dim != 0 else src
    rest = tuple(moved.shape[1:])
    width = 1
    for s in rest:
        width *= s
    return moved.reshape(moved.size(0), width), rest


def _from_2d(out: Tensor, rest: tuple[int, ...], dim: int) -> Tensor:
    out = out.view((out.size(0),) + rest)
    return out.movedim(0, dim) if dim != 0 else out


def _reduce_csr(src2: Tensor, index: Tensor, csr: CSR, reduce: str, backend: str) -> Tensor:
    if backend == "torch_scatter":
        return _eager.scatter(src2, index, csr.num_rows, reduce, _eager.torch_scatter_ext)
    return ScatterFn.apply(src2, index, csr, reduce, impl_module(backend))


def scatter(
    src: Tensor,
    index: Tensor,
    dim: int = 0,
    dim_size: int | None = None,
    reduce: str = "sum",
    *,
    index_sorted: bool = False,
    backend: str | None = None,
) -> Tensor:
    r"""Reduce the slices of `src` along `dim` into `dim_size` slots chosen by `index`.

    $$
    \mathrm{out}_i = \operatorname*{reduce}_{e \,:\, \mathrm{index}_e = i} \mathrm{src}_e,
    \qquad \mathrm{std}_i = \sqrt{\tfrac{1}{n_i} \textstyle\sum_e
    (\mathrm{src}_e - \mu_i)^2 + 10^{-12}}
    $$

    Empty slots are 0 for every reduction. Gradients: `sum`/`mean`/`std` exact;
    `max`/`min` split each output's gradient evenly between the entries attaining it
    (like `torch.scatter_reduce`; the `torch_scatter` backend gives it to one of them).
    float16/bfloat16 inputs accumulate in float32.

    Args:
        src: values, any shape; integer `src` supports `sum`/`max`/`min` (no autograd).
        index: 1-D int64/int32 tensor with one target slot per slice of `src` along `dim`.
        dim: the dimension of `src` that `index` addresses. (default: `0`)
        dim_size: number of output slots; `None` uses `index.max() + 1` (a host sync and a
            graph break under `torch.compile`: always pass it in layers). (default: `None`)
        reduce: `"sum"` (alias `"add"`), `"mean"`, `"max"`, `"min"` or `"std"`.
            (default: `"sum"`)
        index_sorted: `index` is non-decreasing (checked): skip the sort. (default: `False`)
        backend: force `"torch"`, `"torch_scatter"` or `"triton"`; `None` follows
            `GRAPHSPACE_OPS_BACKEND` / auto. (default: `None`)

    Shapes:
        - **src:** $(*, E, *)$, **index:** $(E,)$
        - **output:** `src` shape with `dim` of size `dim_size`

    Raises:
        TypeError: non-tensor inputs, non-integer `index`, unsupported `src` dtype.
        ValueError: unknown `reduce`/`dim`, `index` not 1-D, mismatched lengths.
        IndexError: `index` outside `[0, dim_size)`.
    """
    op = "scatter"
    src = check_tensor(src, "src", op)
    index = check_index(index, "index", op)
    reduce = check_reduce(reduce, REDUCTIONS, op)
    if src.dim() == 0:
        raise ValueError(f"{op}: src must have at least one dimension")
    if not -src.dim() <= dim < src.dim():
        raise ValueError(f"{op}: dim={dim} is out of range for src of shape {tuple(src.shape)}")
    dim = dim % src.dim()
    check_length(index.numel(), src.size(dim), f"index vs src.size({dim})", op)
    check_device(index, src, "index", "src", op)
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() > 0 else 0

    src2, rest = _to_2d(src, dim)
    if torch.compiler.is_compiling():
        out = _eager.scatter(src2, index.long(), dim_size, reduce, _eager.torch_scatter_2d)
        return _from_2d(out, rest, dim)

    dim_size = check_dim_size(dim_size, op)
    if not (src.is_floating_point()):
        if src.is_complex() or reduce in ("mean", "std"):
            raise TypeError(f"{op}: reduce={reduce!r} needs a floating-point src, got {src.dtype}")
        get_csr(index, dim_size, index_sorted=index_sorted)  # validates the index range
        _record("torch")
        out = _eager.torch_scatter_2d(src2, index.long(), dim_size, reduce)
        return _from_2d(out, rest, dim)

    name = resolve_backend(src.device, "scatter", backend)
    csr = get_csr(index, dim_size, index_sorted=index_sorted)
    out = _reduce_csr(src2, index.long(), csr, reduce, name)
    _record(name)
    return _from_2d(out, rest, dim)


def segment(
    src: Tensor,
    ptr: Tensor,
    reduce: str = "sum",
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Reduce consecutive row segments of `src`: `out_i = reduce(src[ptr[i]:ptr[i+1]])`.

    The CSR form of [`scatter`][graphspace.ops.scatter.scatter] for data already sorted by target
    (no sort, no permutation). Same reductions, empty-segment and gradient conventions as
    [`scatter`][graphspace.ops.scatter.scatter].

    Args:
        src: `(E, *)` floating-point values, sorted by segment along dim 0.
        ptr: `(N + 1,)` int64/int32 non-decreasing offsets with `ptr[0] == 0` and
            `ptr[-1] == E`.
        reduce: `"sum"`, `"mean"`, `"max"`, `"min"` or `"std"`. (default: `"sum"`)
        backend: as in [`scatter`][graphspace.ops.scatter.scatter]. (default: `None`)

    Shapes:
        - **src:** $(E, *)$, **ptr:** $(N + 1,)$
        - **output:** $(N, *)$
    """
    op = "segment"
    src = check_tensor(src, "src", op)
    ptr = check_index(ptr, "ptr", op)
    reduce = check_reduce(reduce, REDUCTIONS, op)
    if not src.is_floating_point():
        raise TypeError(f"{op}: src must be a floating-point tensor, got {src.dtype}")
    if src.dim() == 0:
        raise ValueError(f"{op}: src must have at least one dimension")
    if ptr.numel() == 0:
        raise ValueError(f"{op}: ptr must hold at least one offset (N + 1 entries)")
    check_device(ptr, src, "ptr", "src", op)
    num_rows = ptr.numel() - 1
    ptr = ptr.long()
    counts = ptr[1:] - ptr[:-1]
    if torch.compiler.is_compiling():
        index = torch.repeat_interleave(torch.arange(num_rows, device=src.device), counts,
                                        output_size=src.size(0))
        src2, rest = _to_2d(src, 0)
        out = _eager.scatter(src2, index, num_rows, reduce, _eager.torch_scatter_2d)
        return _from_2d(out, rest, 0)
    first, last = int(ptr[0]), int(ptr[-1])
    if first != 0 or last != src.size(0):
        raise ValueError(f"{op}: mismatched lengths: ptr must run from 0 to src.size(0)="
                         f"{src.size(0)}, got {first} .. {last}")
    if num_rows > 0 and bool((counts < 0).any()):
        raise ValueError(f"{op}: ptr must be non-decreasing")
    name = resolve_backend(src.device, "segment", backend)
    src2, rest = _to_2d(src, 0)
    if name == "torch_scatter":
        import torch_scatter

        if reduce == "std":
            index = torch.repeat_interleave(torch.arange(num_rows, device=src.device), counts)
            out = _eager.scatter(src2, index, num_rows, reduce, _eager.torch_scatter_ext)
        else:
            out = torch_scatter.segment_csr(_eager.upcast(src2), ptr, reduce=reduce).to(src.dtype)
    else:
        index = torch.repeat_interleave(torch.arange(num_rows, device=src.device), counts,
                                        output_size=src.size(0))
        perm = torch.arange(src.size(0), device=src.device)
        csr = CSR(ptr=ptr, perm=perm, row=index, col=perm, num_rows=num_rows,
                  num_cols=src.size(0))
        csr._memo["in_order"] = True  # already sorted by segment (see _torch._in_order)
        out = ScatterFn.apply(src2, index, csr, reduce, impl_module(name))
    _record(name)
    return _from_2d(out, rest, 0)
