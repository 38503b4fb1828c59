"""Plain-torch scatter (the fallback every backend is checked against)."""

from __future__ import annotations

import torch
from torch import Tensor


def scatter(
    src: Tensor,
    index: Tensor,
    dim: int = 0,
    dim_size: int | None = None,
    reduce: str = "sum",
) -> Tensor:
    """Reduce ``src`` into ``dim_size`` slots along ``dim`` by ``index``.

    Args:
        src: values to scatter.
        index: 1-D long tensor, one target slot per entry of ``src`` along ``dim``.
        dim: the dimension of ``src`` that ``index`` addresses.
        dim_size: number of output slots (always pass it under ``torch.compile``).
        reduce: ``"sum"``, ``"mean"``, ``"max"``, ``"min"`` or ``"std"``.
    """
    from torch_geometric.utils import scatter as pyg_scatter

    if reduce == "std":
        mean = pyg_scatter(src, index, dim, dim_size, "mean")
        mean_sq = pyg_scatter(src * src, index, dim, dim_size, "mean")
        return (mean_sq - mean * mean).clamp_min(0).add(1e-12).sqrt()
    return pyg_scatter(src, index, dim, dim_size, reduce)
