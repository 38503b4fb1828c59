"""Scatter and fused gather -> message -> aggregate ops with one dispatch point.

Backends: Triton kernels on CUDA, `torch_scatter` when installed, plain torch otherwise;
`GRAPHSPACE_OPS_BACKEND` or each op's `backend=` argument forces one, and
[`last_backend`][graphspace.ops.last_backend] reports which one ran. See `docs/ops.md`.
"""

from graphspace.ops.backend import (
    BACKENDS,
    ENV_VAR,
    available_backends,
    last_backend,
    resolve_backend,
)
from graphspace.ops.fused import (
    egnn_coord_aggregate,
    sheaf_aggregate,
    weighted_aggregate,
)
from graphspace.ops.layout import CSR, clear_layout_cache, get_csr
from graphspace.ops.scatter import REDUCTIONS, scatter, segment

__all__ = [
    "BACKENDS",
    "CSR",
    "ENV_VAR",
    "REDUCTIONS",
    "available_backends",
    "clear_layout_cache",
    "egnn_coord_aggregate",
    "get_csr",
    "last_backend",
    "resolve_backend",
    "scatter",
    "segment",
    "sheaf_aggregate",
    "weighted_aggregate",
]
