"""Input validation shared by the public ops: clear errors before any kernel launches.

Shape, dtype and device checks run here; index *range* checks need the index values (one host
sync) and run when the CSR layout is built (`graphspace.ops.layout.build_csr`), i.e.
once per index tensor thanks to the layout cache.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

_ALIASES = {"add": "sum", "amax": "max", "amin": "min"}


def check_reduce(reduce: str, allowed: tuple[str, ...], op: str) -> str:
    if not isinstance(reduce, str):
        raise TypeError(f"{op}: reduce must be a string, got {type(reduce).__name__}")
    r = _ALIASES.get(reduce, reduce)
    if r not in allowed:
        raise ValueError(f"{op}: unknown reduce {reduce!r}; choose from {allowed}")
    return r


def check_tensor(t: object, name: str, op: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_index(index: object, name: str, op: str, ndim: int = 1) -> Tensor:
    index = check_tensor(index, name, op)
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: {name} must be an int64 or int32 tensor, got {index.dtype}")
    if index.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(index.shape)}")
    return index


def check_edge_index(edge_index: object, op: str) -> Tensor:
    edge_index = check_index(edge_index, "edge_index", op, ndim=2)
    if edge_index.size(0) != 2:
        raise ValueError(f"{op}: edge_index must have shape (2, E), got "
                         f"{tuple(edge_index.shape)}")
    return edge_index


def check_float(t: object, name: str, op: str, ndim: tuple[int, ...] | None = None) -> Tensor:
    t = check_tensor(t, name, op)
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if ndim is not None and t.dim() not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    return t


def check_like(t: Tensor, ref: Tensor, name: str, ref_name: str, op: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                        "cast them to one dtype")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_device(index: Tensor, ref: Tensor, name: str, ref_name: str, op: str) -> None:
    if index.device != ref.device:
        raise ValueError(f"{op}: {name} is on {index.device} but {ref_name} is on {ref.device}")


def check_length(n: int, expected: int, what: str, op: str) -> None:
    if n != expected:
        raise ValueError(f"{op}: mismatched lengths: {what} has {n} entries, expected {expected}")


def check_dim_size(dim_size: object, op: str) -> int:
    if isinstance(dim_size, bool):
        raise TypeError(f"{op}: dim_size must be an int, got bool")
    try:
        dim_size = operator.index(dim_size)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{op}: dim_size must be an int, got {type(dim_size).__name__}") from None
    if dim_size < 0:
        raise ValueError(f"{op}: dim_size must be >= 0, got {dim_size}")
    return dim_size
