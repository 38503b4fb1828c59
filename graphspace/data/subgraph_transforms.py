r"""Bags of subgraphs for subgraph GNNs (ESAN, SPEN).

References:

* B. Bevilacqua, F. Frasca, D. Lim, B. Srinivasan, C. Cai, G. Balamurugan, M. M. Bronstein,
  H. Maron, "Equivariant Subgraph Aggregation Networks", ICLR 2022,
  https://arxiv.org/abs/2110.02910 (selection policies: node-deleted, edge-deleted,
  ego-networks, ego-networks with root identification "EGO+").
* J. Mitton, R. Murray-Smith, "Subgraph Permutation Equivariant Networks", TMLR 2023,
  https://arxiv.org/abs/2111.11840 (bags of $k$-hop ego-networks).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

__all__ = ["SubgraphBagData", "ToSubgraphBag"]

Policy = Literal["ego", "node_deleted", "edge_deleted"]


class SubgraphBagData(Data):
    r"""A bag of subgraphs of one graph, stored as one disjoint-union graph.

    Attributes (`n` original nodes, `m` subgraphs, `N` bag nodes):

    * `x` $(N, F)$, `edge_index` $(2, E_{bag})$, `edge_attr`: the bag.
    * `node_map` $(N,)$: the original node of every bag node.
    * `subgraph_id` $(N,)$: the subgraph of every bag node (`0..m-1`).
    * `subgraph_batch` $(m,)$: the graph of every subgraph (zeros here).
    * `num_subgraphs`, `orig_num_nodes`: $(1,)$ tensors `[m]` and `[n]`.
    * `orig_edge_index`, `orig_edge_attr`: the original graph.
    * `agg_edge_weight` $(E,)$: how many subgraphs contain each original edge, i.e.
      the original edges weighted as in $\sum_i A_i$.

    Batching several bags (PyG `Batch`/`DataLoader`) offsets `node_map` and
    `orig_edge_index` by the original node counts, `subgraph_id` by the subgraph
    counts and `subgraph_batch` by one per graph, so the batched attributes index the
    batch's original nodes, subgraphs and graphs; `batch` maps bag nodes to graphs.
    """

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key in ("node_map", "orig_edge_index"):
            return int(self.orig_num_nodes.sum())
        if key == "subgraph_id":
            return int(self.num_subgraphs.sum())
        if key == "subgraph_batch":
            return 1
        return super().__inc__(key, value, *args, **kwargs)


# bags saved by an InMemoryDataset load with torch.load(weights_only=True)
torch.serialization.add_safe_globals([SubgraphBagData])


class ToSubgraphBag(BaseTransform):
    r"""Turn a graph into a bag of subgraphs (a
    [`SubgraphBagData`][graphspace.data.subgraph_transforms.SubgraphBagData]).

    Selection policies (ESAN, Sec. 3 / App.):

    * `"ego"`: one $k$-hop ego-network per node (the subgraph induced by the nodes
      within `num_hops` of the root); `root_marking=True` gives ESAN's EGO+: two
      features are prepended to `x`, $[1, 0]$ on the root and $[0, 1]$
      elsewhere.
    * `"node_deleted"`: one subgraph per node, with that node's edges removed.
    * `"edge_deleted"`: one subgraph per undirected edge, with the edge (both directions)
      removed. A graph without edges gives a bag holding the graph itself.

    With `keep_all_nodes=True` (ESAN's convention) every subgraph keeps all $n$
    nodes, nodes outside the ego-network or the deleted node staying as isolated nodes, so
    the bag is an $m \times n$ tensor of node features; with `False` a subgraph holds
    only its own nodes (compact ego-networks as in SPEN; a deleted node is dropped).

    Node-level `x` and `pos` are copied to every subgraph, `edge_attr` to every kept
    edge; `y` is kept as is. The transform works for directed and undirected graphs (the
    ego-network of `r` is the set of nodes reaching `r` within `num_hops` steps along
    `edge_index`, PyG's `k_hop_subgraph` convention).

    Args:
        policy: `"ego"`, `"node_deleted"` or `"edge_deleted"`.
        num_hops: $k$ of the ego-networks.
        root_marking: EGO+ root identification (`policy="ego"` only).
        keep_all_nodes: keep every node in every subgraph (see above).
    """

    def __init__(
        self,
        policy: Policy = "ego",
        num_hops: int = 1,
        root_marking: bool = False,
        keep_all_nodes: bool = True,
    ) -> None:
        if policy not in ("ego", "node_deleted", "edge_deleted"):
            raise ValueError(f"unknown policy {policy!r}")
        if root_marking and policy != "ego":
            raise ValueError("root_marking is defined for the ego policy")
        if num_hops < 0:
            raise ValueError("num_hops must be >= 0")
        self.policy = policy
        self.num_hops = num_hops
        self.root_marking = root_marking
        self.keep_all_nodes = keep_all_nodes

    def _masks(self, edge_index: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """`(m, n)` node masks, `(m, E)` edge masks and the roots (ego/node-deleted)."""
        row, col = edge_index[0], edge_index[1]
        dev = edge_index.device
        e = edge_index.size(1)
        if self.policy == "ego":
            adj = torch.zeros(n, n, dtype=torch.bool, device=dev)
            adj[col, row] = True  # adj[i, j]: j -> i, so j reaches i in one step
            reach = torch.eye(n, dtype=torch.bool, device=dev)
            for _ in range(self.num_hops):
                reach = reach | ((reach.float() @ adj.float()) > 0)
            nodes = reach  # nodes[r, j]: j within num_hops of root r
            edges = nodes[:, row] & nodes[:, col]
            return nodes, edges, torch.arange(n, device=dev)
        if self.policy == "node_deleted":
            if n <= 1:
                return (
                    torch.ones(1, n, dtype=torch.bool, device=dev),
                    torch.ones(1, e, dtype=torch.bool, device=dev),
                    None,
                )
            nodes = ~torch.eye(n, dtype=torch.bool, device=dev)
            edges = nodes[:, row] & nodes[:, col]
            return nodes, edges, torch.arange(n, device=dev)
        # edge-deleted: one subgraph per undirected edge {a, b}
        keep = row != col
        lo, hi = torch.minimum(row, col), torch.maximum(row, col)
        key = torch.unique(lo[keep] * n + hi[keep])
        if key.numel() == 0:
            return (
                torch.ones(1, n, dtype=torch.bool, device=dev),
                torch.ones(1, e, dtype=torch.bool, device=dev),
                None,
            )
        edges = (lo * n + hi).unsqueeze(0) != key.unsqueeze(1)
        nodes = torch.ones(key.numel(), n, dtype=torch.bool, device=dev)
        return nodes, edges, None

    def forward(self, data: Data) -> SubgraphBagData:
        n = int(data.num_nodes)
        edge_index = data.edge_index
        nodes, edges, roots = self._masks(edge_index, n)
        m = nodes.size(0)
        if self.keep_all_nodes:
            nodes = torch.ones_like(nodes)
        sub, node_map = nodes.nonzero(as_tuple=True)  # sorted by subgraph, then node
        position = torch.full((m, n), -1, dtype=torch.long, device=edge_index.device)
        position[sub, node_map] = torch.arange(sub.numel(), device=edge_index.device)
        esub, eid = edges.nonzero(as_tuple=True)
        bag_edges = torch.stack(
            [position[esub, edge_index[0, eid]], position[esub, edge_index[1, eid]]]
        )

        out = SubgraphBagData()
        x = data.x[node_map] if data.x is not None else None
        if self.root_marking:
            assert roots is not None
            is_root = node_map == roots[sub]
            marks = torch.stack([is_root, ~is_root], dim=1)
            x = marks.float() if x is None else torch.cat([marks.to(x.dtype), x], dim=1)
        out.x = x
        if getattr(data, "pos", None) is not None:
            out.pos = data.pos[node_map]
        out.edge_index = bag_edges
        if data.edge_attr is not None:
            out.edge_attr = data.edge_attr[eid]
            out.orig_edge_attr = data.edge_attr
        out.node_map = node_map
        out.subgraph_id = sub
        out.subgraph_batch = torch.zeros(m, dtype=torch.long, device=edge_index.device)
        out.num_subgraphs = torch.tensor([m], device=edge_index.device)
        out.orig_num_nodes = torch.tensor([n], device=edge_index.device)
        out.orig_edge_index = edge_index
        out.agg_edge_weight = edges.sum(0).to(torch.get_default_dtype())
        if getattr(data, "y", None) is not None:
            out.y = data.y
        out.num_nodes = int(sub.numel())
        return out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(policy={self.policy!r}, num_hops={self.num_hops}, "
            f"root_marking={self.root_marking}, keep_all_nodes={self.keep_all_nodes})"
        )
