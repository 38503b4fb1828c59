r"""Fused gather -> message -> aggregate ops (never materialise the `E x F` message tensor).

All ops take a PyG `edge_index` (row 0: source $j$, row 1: target $i$, the
`source_to_target` flow) and aggregate over the incoming edges of every target node.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphspace.ops import _eager
from graphspace.ops._autograd import (
    EgnnCoordFn,
    SheafFn,
    WeightedFn,
    impl_module,
)
from graphspace.ops._checks import (
    check_device,
    check_dim_size,
    check_edge_index,
    check_float,
    check_length,
    check_like,
    check_reduce,
)
from graphspace.ops.backend import _record, resolve_backend
from graphspace.ops.layout import CSR, edge_list, get_csr


def _edge_csr(edge_index: Tensor, num_targets: int, num_sources: int) -> CSR:
    return get_csr(edge_index[1], num_targets, source=edge_index[0], num_cols=num_sources,
                   names=("edge_index[1] (targets)", "edge_index[0] (sources)"))


def _common(x: Tensor, edge_index: object, dim_size: int | None, op: str
            ) -> tuple[Tensor, int]:
    edge_index = check_edge_index(edge_index, op)
    check_device(edge_index, x, "edge_index", "x", op)
    size = x.size(0) if dim_size is None else dim_size
    if not torch.compiler.is_compiling():
        size = check_dim_size(size, op)
    return edge_index, size


def weighted_aggregate(
    x: Tensor,
    edge_index: Tensor,
    edge_weight: Tensor | None = None,
    dim_size: int | None = None,
    reduce: str = "sum",
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Weighted neighbourhood aggregation without a message tensor.

    $$
    \mathbf{out}_i = \operatorname*{reduce}_{(j \to i) \in \mathcal{E}}
        w_{ji} \cdot \mathbf{x}_j, \qquad \mathrm{reduce} \in \{\Sigma, \mathrm{mean},
        \max, \min\}
    $$

    with a scalar $w_{ji}$ per edge, a per-channel $\mathbf{w}_{ji}$
    (elementwise product), or none ($w = 1$). Repeated edges count separately; nodes with
    no incoming edge get 0. Gradients flow to `x` and `edge_weight`; for max/min an
    output's gradient is split evenly between the edges attaining it.

    Args:
        x: source node features.
        edge_index: `(2, E)` int64/int32, row 0 the sources $j$, row 1 the targets
            $i$.
        edge_weight: `None`, `(E,)` (or `(E, 1)`) or `(E, F)`, same dtype as `x`.
            (default: `None`)
        dim_size: number of target nodes. (default: `x.size(0)`)
        reduce: `"sum"`, `"mean"`, `"max"` or `"min"`. (default: `"sum"`)
        backend: force `"torch"`, `"torch_scatter"` or `"triton"`. (default: `None`)

    Shapes:
        - **x:** $(N_{src}, F)$ or $(N_{src},)$
        - **output:** $(N_{dst}, F)$ (or $(N_{dst},)$)
    """
    op = "weighted_aggregate"
    x = check_float(x, "x", op, ndim=(1, 2))
    reduce = check_reduce(reduce, ("sum", "mean", "max", "min"), op)
    edge_index, size = _common(x, edge_index, dim_size, op)
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(-1) if squeeze else x
    w = edge_weight
    if w is not None:
        w = check_float(w, "edge_weight", op, ndim=(1, 2))
        check_like(w, x, "edge_weight", "x", op)
        check_length(w.size(0), edge_index.size(1), "edge_weight vs edge_index.size(1)", op)
        if w.dim() == 2 and w.size(1) == 1:
            w = w.view(-1)
        elif w.dim() == 2 and w.size(1) != x2.size(1):
            raise ValueError(f"{op}: per-channel edge_weight has {w.size(1)} channels but x has "
                             f"{x2.size(1)}")
    if torch.compiler.is_compiling():
        out = _eager.weighted(x2, edge_index, w, size, reduce, _eager.torch_scatter_2d)
        return out.squeeze(-1) if squeeze else out
    name = resolve_backend(x.device, op, backend)
    if name == "torch_scatter":
        out = _eager.weighted(x2, edge_index, w, size, reduce, _eager.torch_scatter_ext)
    else:
        csr = _edge_csr(edge_index, size, x.size(0))
        out = WeightedFn.apply(x2, w, csr, reduce, impl_module(name))
    _record(name)
    return out.squeeze(-1) if squeeze else out


def egnn_coord_aggregate(
    pos: Tensor,
    edge_index: Tensor,
    coef: Tensor,
    reduce: str = "sum",
    *,
    normalize: bool = False,
    eps: float = 1e-8,
    backend: str | None = None,
) -> Tensor:
    r"""EGNN coordinate aggregation (Satorras et al., 2021, eq. 4), fused.

    $$
    \mathbf{out}_i = \operatorname*{reduce}_{(j \to i) \in \mathcal{E}}
        \phi_{ji}\, \frac{\mathbf{p}_i - \mathbf{p}_j}{\lVert \mathbf{p}_i - \mathbf{p}_j
        \rVert + \epsilon}
    $$

    (without the denominator unless `normalize`). With `reduce="mean"` this is the
    $\frac{1}{|\mathcal{N}(i)|}\sum_j$ of the paper; the coordinate update is
    $\mathbf{p}_i + \mathbf{out}_i$. E(n)-equivariant: rotating/translating `pos`
    rotates the output. Gradients flow to `pos` (through both endpoints) and `coef`.

    Args:
        pos: node coordinates.
        edge_index: `(2, E)`, row 0 sources $j$, row 1 targets $i$.
        coef: `(E,)` or `(E, 1)` scalar $\phi_{ji}$ per edge, same dtype as `pos`.
        reduce: `"sum"` or `"mean"`. (default: `"sum"`)
        normalize: divide each difference by its length plus `eps`. (default: `False`)
        eps: the $\epsilon$ of `normalize`. (default: `1e-8`)
        backend: force a backend. (default: `None`)

    Shapes:
        - **pos:** $(N, D)$, **coef:** $(E,)$ or $(E, 1)$
        - **output:** $(N, D)$
    """
    op = "egnn_coord_aggregate"
    pos = check_float(pos, "pos", op, ndim=(2,))
    reduce = check_reduce(reduce, ("sum", "mean"), op)
    edge_index, size = _common(pos, edge_index, None, op)
    coef = check_float(coef, "coef", op, ndim=(1, 2))
    check_like(coef, pos, "coef", "pos", op)
    if coef.dim() == 2:
        if coef.size(1) != 1:
            raise ValueError(f"{op}: coef must be (E,) or (E, 1), got {tuple(coef.shape)}")
        coef = coef.view(-1)
    check_length(coef.size(0), edge_index.size(1), "coef vs edge_index.size(1)", op)
    eps = float(eps)
    if torch.compiler.is_compiling():
        return _eager.egnn_coord(pos, edge_index, coef, reduce, normalize, eps,
                                 _eager.torch_scatter_2d)
    name = resolve_backend(pos.device, op, backend)
    if name == "torch_scatter":
        out = _eager.egnn_coord(pos, edge_index, coef, reduce, normalize, eps,
                                _eager.torch_scatter_ext)
    else:
        # the torch backend walks the (narrow) coordinate messages in input order, unsorted
        layout = edge_list(edge_index, size, size) if name == "torch" else \
            _edge_csr(edge_index, size, size)
        out = EgnnCoordFn.apply(pos, coef, layout, reduce, bool(normalize), eps,
                                impl_module(name))
    _record(name)
    return out


def sheaf_aggregate(
    x: Tensor,
    edge_index: Tensor,
    maps: Tensor,
    dim_size: int | None = None,
    reduce: str = "sum",
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Sheaf block mat-vec: apply a $d \times d$ map per edge and aggregate, fused.

    $$
    \mathbf{out}_i = \operatorname*{reduce}_{(j \to i) \in \mathcal{E}} F_{ji}\,
        \mathbf{x}_j, \qquad F_{ji} \in \mathbb{R}^{d \times d}
    $$

    The off-diagonal part of a sheaf Laplacian applied to stalk features (Bodnar et al.,
    *Neural Sheaf Diffusion*, 2022): with $F_{ji} = -\mathcal{F}_{i \trianglelefteq
    e}^\top \mathcal{F}_{j \trianglelefteq e}$ it is $-(L_\mathcal{F})_{ij}\mathbf{x}_j$
    summed over neighbours. `x` may carry `C` channels per stalk dimension; every channel
    uses the same maps. Gradients flow to `x` and `maps`.

    Args:
        x: stalk features.
        edge_index: `(2, E)`, row 0 sources, row 1 targets.
        maps: `(E, d, d)` per-edge maps, same dtype as `x`.
        dim_size: number of target nodes. (default: `x.size(0)`)
        reduce: `"sum"` or `"mean"`. (default: `"sum"`)
        backend: force a backend. (default: `None`)

    Shapes:
        - **x:** $(N_{src}, d)$ or $(N_{src}, d, C)$, **maps:** $(E, d, d)$
        - **output:** $(N_{dst}, d)$ or $(N_{dst}, d, C)$
    """
    op = "sheaf_aggregate"
    x = check_float(x, "x", op, ndim=(2, 3))
    reduce = check_reduce(reduce, ("sum", "mean"), op)
    edge_index, size = _common(x, edge_index, dim_size, op)
    maps = check_float(maps, "maps", op, ndim=(3,))
    check_like(maps, x, "maps", "x", op)
    d = x.size(1)
    if maps.shape[1:] != (d, d):
        raise ValueError(f"{op}: maps must have shape (E, {d}, {d}) to act on stalks of "
                         f"dimension {d}, got {tuple(maps.shape)}")
    check_length(maps.size(0), edge_index.size(1), "maps vs edge_index.size(1)", op)
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    if torch.compiler.is_compiling():
        out = _eager.sheaf(x3, edge_index, maps, size, reduce, _eager.torch_scatter_2d)
        return out.squeeze(-1) if squeeze else out
    name = resolve_backend(x.device, op, backend)
    if name == "torch_scatter":
        out = _eager.sheaf(x3, edge_index, maps, size, reduce, _eager.torch_scatter_ext)
    else:
        csr = _edge_csr(edge_index, size, x.size(0))
        out = SheafFn.apply(x3, maps, csr, reduce, impl_module(name))
    _record(name)
    return out.squeeze(-1) if squeeze else out
