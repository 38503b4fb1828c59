r"""Edge- and node-updating message passing for parameter graphs (Graph Metanetworks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from graphspace.nn.validation import (
    as_edge_index,
    check_edge_features,
    check_node_features,
    has_message_hooks,
)
from graphspace.ops import scatter
from graphspace.ops.metanetwork import metanetwork_fusable, metanetwork_messages

AGGREGATORS = ("mean", "max", "min", "std", "sum")
SCALERS = ("identity", "amplification", "attenuation")


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    # Not PyG's `MLP`: the fused edge kernels (`graphspace.ops.metanetwork`) split the first
    # Linear of `edge_mlp` by position (`edge_mlp[0]`, the rest applied after it), and
    # checkpoints' keys (`edge_mlp.0.weight`) follow this layout.
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


class MetaNetworkConv(MessagePassing):
    r"""The graph-metanetwork layer: edge update, edge-conditioned (FiLM) messages, and a
    PNA-style multi-aggregator node update.

    From *Graph Metanetworks for Processing Diverse Neural Architectures* (Lim et al., ICLR
    2024, https://arxiv.org/abs/2312.04501) and *Graph Neural Networks for Learning
    Equivariant Representations of Neural Networks* (Kofinas et al., ICLR 2024), whose layer
    is PNA (Corso et al., NeurIPS 2020) with edge updates and FiLM-conditioned messages. With
    source $j$ and target $i$ (`edge_index[0] = j`, `edge_index[1] = i`):

    $$
    \begin{aligned}
    \mathbf{e}'_{ij} &= \mathbf{e}_{ij} + \phi_e\big([\mathbf{x}_i \,\|\, \mathbf{x}_j \,\|\,
        \mathbf{e}_{ij}]\big) \\
    \mathbf{m}_{ij} &= \gamma(\mathbf{e}'_{ij}) \odot \mathbf{W}_m [\mathbf{x}_i \,\|\,
        \mathbf{x}_j] + \beta(\mathbf{e}'_{ij}) \\
    \mathbf{a}_i &= \Big[\, s(d_i) \cdot \textstyle\bigoplus_{j \in \mathcal{N}(i)}
        \mathbf{m}_{ij} \Big]_{\oplus \in \mathcal{A},\, s \in \mathcal{S}} \\
    \mathbf{x}'_i &= \mathbf{W}_r \mathbf{x}_i + \phi_u\big([\mathbf{x}_i \,\|\,
        \mathbf{a}_i]\big)
    \end{aligned}
    $$

    with aggregators $\mathcal{A} \subseteq$ {mean, max, min, std, sum} (conventions of
    `graphspace.ops.scatter`: an empty neighbourhood gives 0, std is
    $\sqrt{\mathrm{var} + 10^{-12}}$, and the gradient of a max/min is split evenly between
    the messages that attain it) and PNA degree scalers
    $s(d) \in \{1,\ \log(d+1)/\delta,\ \delta/\log(d+1)\}$, where $\delta$ is the average of
    $\log(d+1)$ over training graphs. The residual in $\mathbf{e}'$ applies when the edge
    output size equals `edge_dim`. The layer is equivariant to any permutation of the nodes,
    so a model built on it is invariant to permutations of a network's hidden neurons.

    `edge_update` / `message` / `aggregate` are the readable reference (they run under
    `torch.compile`, on accelerators, and whenever PyG hooks or explainers are attached);
    on CPU float32/float64 tensors in eager mode the same function runs through the fused
    kernels of `graphspace.ops.metanetwork`.

    Args:
        in_channels: node feature size.
        out_channels: output node feature size.
        edge_dim: edge feature size.
        edge_out_channels: output edge feature size (default: `edge_dim`).
        hidden_channels: MLP width (default: `out_channels`).
        aggregators: default `("mean", "max", "std")`.
        scalers: default `("identity", "amplification", "attenuation")`.
        avg_log_degree: $\delta$ (default 1.0; see `compute_avg_log_degree`).
        update_edges: apply the edge update (default `True`).
        dropout: dropout inside the MLPs (default 0).

    Shapes:
        - **input:** node features $(|\mathcal{V}|, F_{in})$; `edge_index` $(2, |\mathcal{E}|)$
          (a `Tensor` or PyG `EdgeIndex`) or a transposed sparse adjacency `adj_t`
          $(|\mathcal{V}|, |\mathcal{V}|)$ (`torch.sparse` COO/CSR/CSC or `SparseTensor`;
          only its structure is used, and `edge_attr`'s rows then follow its non-zeros in
          row-major order, i.e. `adj_t.to_sparse_coo().coalesce().indices()`); edge features
          $(|\mathcal{E}|, D)$.
        - **output:** node features $(|\mathcal{V}|, F_{out})$; with
          `return_edge_attr=True` the tuple `(x', e')` with $\mathbf{e}'$ of shape
          $(|\mathcal{E}|, D_{out})$ ($D_{out}$ = `edge_dim` when `update_edges=False`).

    Example:
        ```python
        conv = MetaNetworkConv(8, 16, edge_dim=4)
        x_new = conv(x, edge_index, edge_attr)                                # (N, 16)
        x_new, e_new = conv(x, edge_index, edge_attr, return_edge_attr=True)  # + (E, 4)
        ```
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        edge_dim: int,
        edge_out_channels: int | None = None,
        hidden_channels: int | None = None,
        aggregators: Sequence[str] = ("mean", "max", "std"),
        scalers: Sequence[str] = ("identity", "amplification", "attenuation"),
        avg_log_degree: float = 1.0,
        update_edges: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(aggr=None)
        for a in aggregators:
            if a not in AGGREGATORS:
                raise ValueError(f"unknown aggregator {a!r}; choose from {AGGREGATORS}")
        for s in scalers:
            if s not in SCALERS:
                raise ValueError(f"unknown scaler {s!r}; choose from {SCALERS}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.edge_dim = edge_dim
        self.edge_out_channels = edge_out_channels or edge_dim
        self.hidden_channels = hidden_channels or out_channels
        self.aggregators = tuple(aggregators)
        self.scalers = tuple(scalers)
        self.avg_log_degree = float(avg_log_degree)
        self.update_edges = update_edges
        h = self.hidden_channels
        self.edge_mlp = _mlp(2 * in_channels + edge_dim, h, self.edge_out_channels, dropout) \
            if update_edges else None
        e_dim = self.edge_out_channels if update_edges else edge_dim
        self.msg = nn.Linear(2 * in_channels, h)
        self.film = nn.Linear(e_dim, 2 * h)
        n_agg = len(self.aggregators) * len(self.scalers)
        # `update` is MessagePassing's hook, so the node MLP is `update_mlp` (checkpoints
        # that call it `update` still load: see `_load_old_names`)
        self.update_mlp = _mlp(in_channels + n_agg * h, h, out_channels, dropout)
        self.root = nn.Linear(in_channels, out_channels, bias=False)
        self._register_load_state_dict_pre_hook(self._load_old_names)
        self.reset_parameters()

    @staticmethod
    def _load_old_names(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + "update.")]:
            state_dict[prefix + "update_mlp." + key[len(prefix) + 7:]] = state_dict.pop(key)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    @staticmethod
    def compute_avg_log_degree(edge_indices: Sequence[Tensor], num_nodes: Sequence[int]) -> float:
        r"""$\delta = \mathrm{mean}_i \log(d_i + 1)$ over training graphs (in-degrees)."""
        total, count = 0.0, 0
        for ei, n in zip(edge_indices, num_nodes):
            deg = torch.bincount(ei[1], minlength=n).double()
            total += float(torch.log1p(deg).sum())
            count += n
        return total / max(count, 1)

    def forward(self, x: Tensor, edge_index: Any, edge_attr: Tensor,
                return_edge_attr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Run the layer.

        Args:
            x: node features `(N, in_channels)`.
            edge_index: `(2, E)` edges or a transposed sparse adjacency (see the class).
            edge_attr: edge features `(E, edge_dim)`.
            return_edge_attr: also return the updated edge features.

        Returns:
            The new node features `(N, out_channels)`, or `(x', e')` when
            `return_edge_attr` is set.
        """
        name = type(self).__name__
        check_node_features(x, "x", layer=name, channels=self.in_channels)
        edge_index, _ = as_edge_index(edge_index, x.size(0), layer=name)
        check_edge_features(edge_attr, edge_index.size(1), layer=name, channels=self.edge_dim)
        if self._fusable(x, edge_index, edge_attr):
            agg, deg, edge_attr = metanetwork_messages(self, x, edge_index, edge_attr)
        else:
            if self.edge_mlp is not None:
                edge_attr = self.edge_updater(edge_index, x=x, edge_attr=edge_attr)
            agg = self.propagate(edge_index, x=x, edge_attr=edge_attr)
            deg = scatter(x.new_ones(edge_index.size(1)), edge_index[1], 0, x.size(0), "sum")
        out = self._node_update(x, agg, deg)
        return (out, edge_attr) if return_edge_attr else out

    def _fusable(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> bool:
        """The fused CPU path runs unless PyG hooks or an explainer need the messages."""
        return not has_message_hooks(self) and metanetwork_fusable(x, edge_index, edge_attr)

    def edge_update(self, x_i: Tensor, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        r"""$\mathbf e'_{ij} = [\mathbf e_{ij} +]\, \phi_e([\mathbf x_i \| \mathbf x_j \|
        \mathbf e_{ij}])$."""
        upd = self.edge_mlp(torch.cat([x_i, x_j, edge_attr], dim=-1))
        return upd + edge_attr if upd.shape == edge_attr.shape else upd

    def message(self, x_i: Tensor, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        r"""$\mathbf m_{ij} = \gamma(\mathbf e'_{ij}) \odot \mathbf W_m [\mathbf x_i \|
        \mathbf x_j] + \beta(\mathbf e'_{ij})$."""
        gamma, beta = self.film(edge_attr).chunk(2, dim=-1)
        return gamma * self.msg(torch.cat([x_i, x_j], dim=-1)) + beta

    def aggregate(self, inputs: Tensor, index: Tensor, dim_size: int | None = None) -> Tensor:
        """Every aggregator of `aggregators`, concatenated along the channels."""
        return torch.cat([scatter(inputs, index, 0, dim_size, a) for a in self.aggregators],
                         dim=-1)

    def _node_update(self, x: Tensor, agg: Tensor, deg: Tensor) -> Tensor:
        r"""PNA degree scalers, then $\mathbf W_r \mathbf x_i + \phi_u([\mathbf x_i \|
        \mathbf a_i])$."""
        log_deg = torch.log1p(deg).unsqueeze(-1)
        scaled = []
        for s in self.scalers:
            if s == "identity":
                scaled.append(agg)
            elif s == "amplification":
                scaled.append(agg * (log_deg / self.avg_log_degree))
            else:
                scaled.append(agg * (self.avg_log_degree / log_deg.clamp_min(math.log(2.0))))
        return self.root(x) + self.update_mlp(torch.cat([x] + scaled, dim=-1))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"edge_dim={self.edge_dim}, aggregators={list(self.aggregators)}, "
                f"scalers={list(self.scalers)})")
