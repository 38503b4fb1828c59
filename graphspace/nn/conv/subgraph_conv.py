r"""Subgraph-equivariant layers: ESAN's DS-/DSS-GNN layers and a SPEN-style layer.

References:

* B. Bevilacqua, F. Frasca, D. Lim, B. Srinivasan, C. Cai, G. Balamurugan, M. M. Bronstein,
  H. Maron, "Equivariant Subgraph Aggregation Networks", ICLR 2022,
  https://arxiv.org/abs/2110.02910 (DS-GNN eq. 3, DSS-GNN layer eq. 4).
* J. Mitton, R. Murray-Smith, "Subgraph Permutation Equivariant Networks", TMLR 2023,
  https://arxiv.org/abs/2111.11840.

All layers take the disjoint-union bag produced by
`ToSubgraphBag` (batched with PyG's
`DataLoader`): bag-node features `x`, bag edges `edge_index`, the original node of every
bag node `node_map` and its subgraph `subgraph_id`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from graphspace.nn.validation import (
    as_edge_index,
    check_index,
    check_node_features,
    has_message_hooks,
)
from graphspace.ops import scatter, weighted_aggregate

__all__ = [
    "DSConv",
    "DSSConv",
    "SPENConv",
    "SubgraphBagPool",
    "bag_to_nodes",
    "subgraph_readout",
]

Reduce = Literal["sum", "mean", "max"]


def _size(index: Tensor, given: int | None) -> int:
    """`given`, or one more than the largest entry of `index` (0 for an empty index)."""
    if given is not None:
        return given
    return int(index.max()) + 1 if index.numel() else 0


def _known(channels: object) -> int | None:
    """A wrapped conv's input size if it is a fixed int (not lazy `-1` or a tuple)."""
    return channels if isinstance(channels, int) and channels > 0 else None


def _check_bag(layer: nn.Module, x: Tensor, edge_index: Any, node_map: Tensor,
               num_nodes: int | None) -> Tensor:
    """Validate a bag's node features, adjacency and `node_map`; returns `edge_index` as
    given (a sparse adjacency stays sparse for the wrapped conv)."""
    name = type(layer).__name__
    check_node_features(x, "x", layer=name, channels=_known(layer.in_channels))
    as_edge_index(edge_index, x.size(0), layer=name)
    check_index(node_map, x.size(0), num_nodes, name="node_map", layer=name)
    return edge_index


def _call_conv(conv: nn.Module, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None) -> Tensor:
    if edge_attr is None:
        return conv(x, edge_index)
    return conv(x, edge_index, edge_attr)


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


def _channels(conv: nn.Module) -> tuple[int | None, int | None]:
    in_c = getattr(conv, "in_channels", None)
    out_c = getattr(conv, "out_channels", None)
    nn_ = getattr(conv, "nn", None)  # GINConv / GINEConv keep their MLP in .nn
    if nn_ is not None and (in_c is None or out_c is None):
        lins = [m for m in nn_.modules() if isinstance(m, nn.Linear)]
        if lins:
            in_c = lins[0].in_features if in_c is None else in_c
            out_c = lins[-1].out_features if out_c is None else out_c
    return in_c, out_c


def bag_to_nodes(
    x: Tensor, node_map: Tensor, num_nodes: int | None = None, reduce: Reduce = "mean"
) -> Tensor:
    r"""Aggregate bag-node features over the subgraphs containing each original node,
    $h_v = \operatorname{reduce}_{i : v \in G_i} x_{i, v}$ (node-level readout).

    Args:
        x: bag-node features $(N_{bag}, F)$.
        node_map: original node of each bag node $(N_{bag},)$.
        num_nodes: number of original nodes (pass it to avoid a device sync).
        reduce: `"sum"`, `"mean"` or `"max"`.
    """
    return scatter(x, node_map, 0, _size(node_map, num_nodes), reduce)


def subgraph_readout(
    x: Tensor, subgraph_id: Tensor, num_subgraphs: int | None = None, reduce: Reduce = "mean"
) -> Tensor:
    r"""Pool bag-node features per subgraph, $h_{G_i} = \operatorname{reduce}_{v \in V_i}
    x_{i,v}$ (one row per subgraph; `num_subgraphs = data.subgraph_batch.numel()`)."""
    return scatter(x, subgraph_id, 0, _size(subgraph_id, num_subgraphs), reduce)


class DSConv(MessagePassing):
    r"""DS-GNN layer (ESAN, eq. 3): a shared graph layer applied to every subgraph
    independently,

    $$
    X_i' = L(A_i, X_i), \qquad i = 1, \dots, m.
    $$

    The bag is a disjoint union of the subgraphs, so one call of the wrapped conv on the bag
    is exactly the per-subgraph computation. Stacking DS layers and pooling with
    `SubgraphBagPool` gives DS-GNN: $h_G = E_{sets}(\{\!\{ E_{sub}(G_i) \}\!\})$.

    Args:
        conv: any PyG graph layer `conv(x, edge_index[, edge_attr])`.

    Shapes:
        - **input:** `x` $(N_{bag}, F_{in})$, `edge_index` $(2, E_{bag})$ (or any
          adjacency format of `graphspace.nn.validation.as_edge_index`),
          `edge_attr` (optional, passed as the conv's third positional argument).
        - **output:** $(N_{bag}, F_{out})$.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__(aggr=None)
        self.conv = conv
        self.in_channels, self.out_channels = _channels(conv)

    def reset_parameters(self) -> None:
        """Re-initialise the wrapped conv."""
        _reset(self.conv)

    def forward(self, x: Tensor, edge_index: Any, edge_attr: Tensor | None = None) -> Tensor:
        """Apply the wrapped conv to the bag (its message passing is the layer's)."""
        name = type(self).__name__
        check_node_features(x, "x", layer=name, channels=_known(self.in_channels))
        as_edge_index(edge_index, x.size(0), layer=name)
        return _call_conv(self.conv, x, edge_index, edge_attr)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.conv})"


class DSSConv(MessagePassing):
    r"""DSS-GNN layer (ESAN, eq. 4): a Siamese layer on every subgraph plus an
    information-sharing layer on the aggregated graph,

    $$
    X_i' = L^1(A_i, X_i) + L^2\Big(\sum_{j=1}^m A_j,\ \sum_{j=1}^m X_j\Big),
    \qquad i = 1, \dots, m,
    $$

    where $\sum_j X_j$ sums, for every original node, its features over the
    subgraphs that contain it (`aggr="sum"`; `"mean"` as in the authors' code), and the
    result of $L^2$ is broadcast back to every copy of the node. $L^2$ runs on the
    original graph (`orig_edge_index`), whose support is that of $\sum_j A_j$; pass
    `orig_edge_attr=data.agg_edge_weight` to a conv that takes edge weights (e.g.
    `GraphConv`, `GCNConv`) to use the multiplicities of $\sum_j A_j$ exactly
    (for node- and edge-deleted bags $\sum_j A_j$ is a multiple of $A$). The layer
    is equivariant to permutations of the subgraphs and of the nodes,
    $S_m \times S_n$.

    Args:
        conv: $L^1$, any PyG graph layer `conv(x, edge_index[, edge_attr])`.
        agg_conv: $L^2$ (default: a freshly initialised deep copy of `conv`).
        aggr: `"sum"` (the paper's equation) or `"mean"` over the bag.

    Shapes:
        - **input:** `x` $(N_{bag}, F_{in})$, `edge_index` $(2, E_{bag})$ (or any
          adjacency format of `graphspace.nn.validation.as_edge_index`),
          `node_map` $(N_{bag},)$, `orig_edge_index` $(2, E)$,
          `num_nodes` = number of original nodes (optional),
          `edge_attr` / `orig_edge_attr` (optional; third positional argument of
          $L^1$ / $L^2$).
        - **output:** $(N_{bag}, F_{out})$.
    """

    def __init__(
        self, conv: nn.Module, agg_conv: nn.Module | None = None, aggr: Reduce = "sum"
    ) -> None:
        super().__init__(aggr=None)
        if aggr not in ("sum", "mean", "max"):
            raise ValueError(f"unknown aggr {aggr!r}")
        self.conv = conv
        if agg_conv is None:
            agg_conv = copy.deepcopy(conv)
            _reset(agg_conv)
        self.agg_conv = agg_conv
        self.aggr = aggr
        self.in_channels, self.out_channels = _channels(conv)

    def reset_parameters(self) -> None:
        """Re-initialise both convs."""
        _reset(self.conv)
        _reset(self.agg_conv)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        node_map: Tensor,
        orig_edge_index: Tensor,
        num_nodes: int | None = None,
        edge_attr: Tensor | None = None,
        orig_edge_attr: Tensor | None = None,
    ) -> Tensor:
        _check_bag(self, x, edge_index, node_map, num_nodes)
        n = _size(node_map, num_nodes)
        as_edge_index(orig_edge_index, n, name="orig_edge_index", layer=type(self).__name__)
        h = _call_conv(self.conv, x, edge_index, edge_attr)
        # sum_j X_j: every bag node k sends its features to its original node node_map[k]
        copies = torch.stack([torch.arange(x.size(0), device=x.device), node_map.long()])
        pooled = self.propagate(copies, x=x, size=(x.size(0), n))
        g = _call_conv(self.agg_conv, pooled, orig_edge_index, orig_edge_attr)
        return h + g.index_select(0, node_map.long())

    def message(self, x_j: Tensor) -> Tensor:
        """A bag node's features, sent to its original node."""
        return x_j

    def aggregate(self, inputs: Tensor, index: Tensor, dim_size: int | None = None) -> Tensor:
        """`aggr` over the copies of every original node (`graphspace.ops.scatter`)."""
        return scatter(inputs, index, 0, dim_size, self.aggr)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.conv}, {self.agg_conv}, aggr={self.aggr!r})"


class SPENConv(MessagePassing):
    r"""A SPEN-style layer on a bag of ego-network subgraphs (Mitton & Murray-Smith), for
    first-order features $h_{i,v}$ on (subgraph, node) pairs.

    Each term is equivariant to relabelling nodes inside a subgraph, to permuting the
    subgraphs and to permuting the original nodes; the layer is the linear
    $S_m \times S_n$-equivariant basis for first-order bag features (self, pooled
    within the subgraph, pooled over the copies of the node in other subgraphs, pooled over
    the bag) plus message passing inside each subgraph:

    $$
    h'_{i,v} = W_1 h_{i,v}
        + W_2 \sum_{u \in \mathcal N_i(v)} h_{i,u}
        + W_3 \operatorname*{agg}_{u \in V_i} h_{i,u}
        + W_4 \operatorname*{agg}_{j : v \in V_j} h_{j,v}
        + W_5 \operatorname*{agg}_{j,\, u \in V_j} h_{j,u} + b
    $$

    ($\mathcal N_i(v)$: neighbours of $v$ in subgraph $i$; `agg` = sum
    or mean, `aggr`; the $W_5$ bag-level term is optional). Nodes lying in several
    ego-networks exchange information through the $W_4$ term, which ties the
    per-subgraph updates into one update of the bag. The layer is affine; put a
    non-linearity between layers. Only first-order (node) representations are implemented;
    SPEN's second-order (edge-tensor) representation spaces are not.

    Args:
        in_channels: size of $h_{i,v}$.
        out_channels: size of $h'_{i,v}$.
        aggr: `"mean"` or `"sum"` for the pooled terms $W_3, W_4, W_5$.
        bag_term: include the $W_5$ term.
        bias: learn $b$.

    Shapes:
        - **input:** `x` $(N_{bag}, F_{in})$, `edge_index` $(2, E_{bag})$ (or any
          adjacency format of `graphspace.nn.validation.as_edge_index`),
          `node_map` and `subgraph_id` $(N_{bag},)$, `batch` (bag node to
          graph, $(N_{bag},)$, optional: one graph), `num_nodes` /
          `num_subgraphs` / `num_graphs` (optional sizes; pass them to avoid syncs).
        - **output:** $(N_{bag}, F_{out})$.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        aggr: Literal["mean", "sum"] = "mean",
        bag_term: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__(aggr=None)
        if aggr not in ("mean", "sum"):
            raise ValueError(f"unknown aggr {aggr!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.aggr = aggr
        self.bag_term = bag_term
        self.lin_self = nn.Linear(in_channels, out_channels, bias=bias)
        self.lin_nbr = nn.Linear(in_channels, out_channels, bias=False)
        self.lin_sub = nn.Linear(in_channels, out_channels, bias=False)
        self.lin_node = nn.Linear(in_channels, out_channels, bias=False)
        self.lin_bag = nn.Linear(in_channels, out_channels, bias=False) if bag_term else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_self, self.lin_nbr, self.lin_sub, self.lin_node, self.lin_bag):
            if lin is not None:
                lin.reset_parameters()

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        node_map: Tensor,
        subgraph_id: Tensor,
        batch: Tensor | None = None,
        num_nodes: int | None = None,
        num_subgraphs: int | None = None,
        num_graphs: int | None = None,
    ) -> Tensor:
        name = type(self).__name__
        check_node_features(x, "x", layer=name, channels=self.in_channels)
        n_bag = x.size(0)
        edge_index, edge_weight = as_edge_index(edge_index, n_bag, layer=name)
        check_index(node_map, n_bag, num_nodes, name="node_map", layer=name)
        check_index(subgraph_id, n_bag, num_subgraphs, name="subgraph_id", layer=name)
        if batch is not None:
            check_index(batch, n_bag, num_graphs, name="batch", layer=name)
        if edge_weight is not None:
            edge_weight = edge_weight.to(x.dtype)
        out = self.lin_self(x)
        # sum over neighbours inside the subgraph (weighted by a sparse adjacency's values)
        if has_message_hooks(self):
            nbr = self.propagate(edge_index, x=x, edge_weight=edge_weight, size=(n_bag, n_bag))
        else:  # fused: no (E, F) message tensor
            nbr = weighted_aggregate(x, edge_index, edge_weight, n_bag, "sum")
        out = out + self.lin_nbr(nbr)
        m = _size(subgraph_id, num_subgraphs)
        out = out + self.lin_sub(scatter(x, subgraph_id, 0, m, self.aggr)[subgraph_id])
        out = out + self.lin_node(bag_to_nodes(x, node_map, num_nodes, self.aggr)[node_map])
        if self.lin_bag is not None:
            if batch is None:
                batch = torch.zeros(n_bag, dtype=torch.long, device=x.device)
                num_graphs = 1
            b = _size(batch, num_graphs)
            out = out + self.lin_bag(scatter(x, batch, 0, b, self.aggr)[batch])
        return out

    def message(self, x_j: Tensor, edge_weight: Tensor | None) -> Tensor:
        """$h_{i,u}$ of the neighbour $u$ (times the edge weight of a sparse adjacency)."""
        return x_j if edge_weight is None else x_j * edge_weight.unsqueeze(-1)

    def aggregate(self, inputs: Tensor, index: Tensor, dim_size: int | None = None) -> Tensor:
        """Sum over the neighbours inside the subgraph (`graphspace.ops.scatter`)."""
        return scatter(inputs, index, 0, dim_size, "sum")

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"aggr={self.aggr!r}, bag_term={self.bag_term})"
        )


class SubgraphBagPool(nn.Module):
    r"""Readout of a bag: per-subgraph pooling, then pooling over the bag (ESAN's
    $E_{sets}$ aggregation; follow it with an MLP for the full DeepSets form),

    $$
    h_{G_i} = \operatorname{pool}_{v \in V_i} x_{i,v}, \qquad
    h_G = \operatorname{agg}_{i=1}^m h_{G_i}.
    $$

    Invariant to the order of the subgraphs and of the nodes.

    Args:
        node_reduce: `"mean"` (ESAN code default), `"sum"` or `"max"` within each
            subgraph.
        bag_reduce: `"mean"` (ESAN code default), `"sum"` or `"max"` over the bag.

    Shapes:
        - **input:** `x` $(N_{bag}, F)$, `subgraph_id` $(N_{bag},)$,
          `subgraph_batch` $(m,)$ (graph of each subgraph), `num_graphs`
          (optional).
        - **output:** $(B, F)$.
    """

    def __init__(self, node_reduce: Reduce = "mean", bag_reduce: Reduce = "mean") -> None:
        super().__init__()
        for r in (node_reduce, bag_reduce):
            if r not in ("sum", "mean", "max"):
                raise ValueError(f"unknown reduction {r!r}")
        self.node_reduce = node_reduce
        self.bag_reduce = bag_reduce

    def reset_parameters(self) -> None:
        """No parameters."""

    def forward(
        self,
        x: Tensor,
        subgraph_id: Tensor,
        subgraph_batch: Tensor,
        num_graphs: int | None = None,
    ) -> Tensor:
        name = type(self).__name__
        check_node_features(x, "x", layer=name)
        check_index(subgraph_id, x.size(0), subgraph_batch.numel(), name="subgraph_id",
                    layer=name)
        check_index(subgraph_batch, subgraph_batch.numel(), num_graphs, name="subgraph_batch",
                    layer=name)
        h_sub = subgraph_readout(x, subgraph_id, subgraph_batch.numel(), self.node_reduce)
        b = _size(subgraph_batch, num_graphs)
        return scatter(h_sub, subgraph_batch, 0, b, self.bag_reduce)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(node_reduce={self.node_reduce!r}, "
            f"bag_reduce={self.bag_reduce!r})"
        )
