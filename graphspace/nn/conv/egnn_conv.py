r"""E(n)-equivariant graph convolution (Satorras, Hoogeboom & Welling, ICML 2021).

Reference: V. G. Satorras, E. Hoogeboom, M. Welling, "E(n) Equivariant Graph Neural
Networks", ICML 2021, https://arxiv.org/abs/2102.09844 (equations 3--7).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from graphspace.nn.validation import (
    as_edge_index,
    check_edge_features,
    check_node_features,
)
from graphspace.ops import egnn_coord_aggregate, scatter

__all__ = ["EGNNConv", "EGNN"]


class EGNNConv(MessagePassing):
    r"""One E(n)-equivariant graph convolutional layer (EGCL).

    For every edge $j \to i$ (`edge_index[0] = j`, `edge_index[1] = i`):

    $$
    \begin{aligned}
    \mathbf{m}_{ij} &= \phi_e\big(\mathbf{h}_i, \mathbf{h}_j,
        \lVert \mathbf{x}_i - \mathbf{x}_j \rVert^2, \mathbf{a}_{ij}\big) \\
    \mathbf{x}_i' &= \mathbf{x}_i + C \sum_{j \in \mathcal{N}(i)}
        (\mathbf{x}_i - \mathbf{x}_j)\, \phi_x(\mathbf{m}_{ij}) \\
    \mathbf{h}_i' &= \phi_h\Big(\mathbf{h}_i, \sum_{j \in \mathcal{N}(i)}
        \mathbf{m}_{ij}\Big) \;\big(+\, \mathbf{h}_i \text{ if residual}\big)
    \end{aligned}
    $$

    with $C = 1/|\mathcal{N}(i)|$ (`coords_agg="mean"`; equal to the paper's
    $1/(M-1)$ on a fully connected graph, and the default of the authors' code) or
    $C = 1$ (`coords_agg="sum"`).

    Options (all from the paper or the authors' reference code):

    * `attention`: messages are gated, $\mathbf{m}_{ij} \leftarrow e_{ij}
      \mathbf{m}_{ij}$ with $e_{ij} = \sigma(\phi_{inf}(\mathbf{m}_{ij}))$ (eq. 8).
    * `normalize`: use $(\mathbf{x}_i - \mathbf{x}_j) / (\lVert \mathbf{x}_i -
      \mathbf{x}_j \rVert + \epsilon)$ in the coordinate update (numerical stability).
    * `tanh`: bound the coordinate weight,
      $\phi_x(\mathbf{m}) = r \tanh(\mathrm{MLP}(\mathbf{m}))$ with
      $r$ = `coords_range`.
    * `velocity` (eq. 7): the layer also takes the (initial) velocity $\mathbf{v}_i$
      and returns an updated velocity,

        $$
        \begin{aligned}
        \mathbf{v}_i' &= \phi_v(\mathbf{h}_i)\, \mathbf{v}_i + C \sum_{j \ne i}
            (\mathbf{x}_i - \mathbf{x}_j)\, \phi_x(\mathbf{m}_{ij}) \\
        \mathbf{x}_i' &= \mathbf{x}_i + \mathbf{v}_i'
        \end{aligned}
        $$

    All MLPs use `act` (SiLU by default, as in the paper). The last layer of
    $\phi_x$ has no bias and is initialised with Xavier-uniform gain 0.001, as in
    the authors' code, so a freshly initialised layer moves coordinates very little.

    The layer is equivariant to rotations/reflections $Q \in O(n)$ and translations
    $t$ of `pos` (and rotations of `vel`), invariant in `h`, and equivariant to
    node permutations.

    Args:
        in_channels: size of the input node features $\mathbf{h}_i$.
        out_channels: size of the output node features.
        hidden_channels: width of the message / MLP hidden layers (default
            `out_channels`).
        edge_dim: size of the edge attributes $\mathbf{a}_{ij}$ (0: none).
        act: activation module used inside all MLPs (default `SiLU`).
        attention: gate messages with $\sigma(\phi_{inf}(\mathbf{m}_{ij}))$.
        normalize: normalise coordinate differences by their length (+ `eps`).
        tanh: bound $\phi_x$ by `coords_range * tanh(.)`.
        coords_range: the bound $r$ used when `tanh=True`.
        coords_agg: `"mean"` (paper's $C=1/(M-1)$) or `"sum"` ($C=1$).
        residual: add $\mathbf{h}_i$ to the node update (only when
            `in_channels == out_channels`; the paper's code default).
        velocity: the eq. 7 velocity variant (`forward` then needs `vel` and also
            returns the new velocity).
        eps: the $\epsilon$ of `normalize`.

    Shapes:
        - **input:** `x` $(N, F_{in})$ (floating point), `pos` $(N, D)$, `edge_index`
          $(2, E)$ (a `Tensor` or PyG `EdgeIndex`) or a transposed sparse adjacency `adj_t`
          $(N, N)$ (`torch.sparse` COO/CSR/CSC or `SparseTensor`; structure only, with
          `edge_attr`'s rows in the order of its non-zeros, row-major), `edge_attr`
          $(E, F_e)$ (optional), `vel` $(N, D)$ (velocity variant only).
        - **output:** `(h, pos)` with `h` $(N, F_{out})$ and `pos`
          $(N, D)$, or `(h, pos, vel)` when `velocity=True`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int | None = None,
        edge_dim: int = 0,
        act: nn.Module | None = None,
        attention: bool = False,
        normalize: bool = False,
        tanh: bool = False,
        coords_range: float = 1.0,
        coords_agg: Literal["mean", "sum"] = "mean",
        residual: bool = True,
        velocity: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(aggr=None)
        if coords_agg not in ("mean", "sum"):
            raise ValueError(f"coords_agg must be 'mean' or 'sum', got {coords_agg!r}")
        hidden = out_channels if hidden_channels is None else hidden_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_channels = hidden
        self.edge_dim = edge_dim
        self.attention = attention
        self.normalize = normalize
        self.tanh = tanh
        self.coords_range = coords_range
        self.coords_agg = coords_agg
        self.residual = residual and in_channels == out_channels
        self.velocity = velocity
        self.eps = eps
        act = nn.SiLU() if act is None else act

        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * in_channels + 1 + edge_dim, hidden),
            act,
            nn.Linear(hidden, hidden),
            act,
        )
        self.att_mlp = nn.Linear(hidden, 1) if attention else None
        self.node_mlp = nn.Sequential(
            nn.Linear(in_channels + hidden, hidden),
            act,
            nn.Linear(hidden, out_channels),
        )
        self.coord_mlp = nn.Sequential(
            nn.Linear(hidden, hidden),
            act,
            nn.Linear(hidden, 1, bias=False),
        )
        self.vel_mlp = (
            nn.Sequential(nn.Linear(in_channels, hidden), act, nn.Linear(hidden, 1))
            if velocity
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise all weights (PyTorch defaults; tiny Xavier init for the last
        coordinate layer, as in the authors' code)."""
        mlps: list[nn.Module | None] = [
            self.edge_mlp,
            self.att_mlp,
            self.node_mlp,
            self.coord_mlp,
            self.vel_mlp,
        ]
        for mlp in mlps:
            if mlp is None:
                continue
            for m in mlp.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        last = self.coord_mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.xavier_uniform_(last.weight, gain=0.001)

    def _phi_x(self, m: Tensor) -> Tensor:
        w = self.coord_mlp(m)
        if self.tanh:
            w = self.coords_range * torch.tanh(w)
        return w

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        edge_index: Any,
        edge_attr: Tensor | None = None,
        vel: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Run the layer; see the class docstring for shapes and return values."""
        edge_index, edge_attr = self._check(x, pos, edge_index, edge_attr, vel)
        src, dst = edge_index[0], edge_index[1]  # messages j=src -> i=dst
        diff = pos.index_select(0, dst) - pos.index_select(0, src)  # x_i - x_j
        radial = (diff * diff).sum(dim=-1, keepdim=True)
        m = self.edge_updater(edge_index, x=x, radial=radial, edge_attr=edge_attr)
        # coordinate update (eq. 4), fused: sum_j (x_i - x_j) phi_x(m_ij), mean or sum
        delta = egnn_coord_aggregate(pos, edge_index, self._phi_x(m), self.coords_agg,
                                     normalize=self.normalize, eps=self.eps)
        agg = self.propagate(edge_index, m=m, size=(x.size(0), x.size(0)))  # eq. 5
        h = self.node_mlp(torch.cat([x, agg], dim=-1))
        if self.residual:
            h = x + h

        if self.vel_mlp is not None:
            assert vel is not None
            vel_new = self.vel_mlp(x) * vel + delta
            return h, pos + vel_new, vel_new
        return h, pos + delta

    def _check(self, x: Tensor, pos: Tensor, edge_index: Any, edge_attr: Tensor | None,
               vel: Tensor | None) -> tuple[Tensor, Tensor | None]:
        name = type(self).__name__
        check_node_features(x, "x", layer=name, channels=self.in_channels)
        check_node_features(pos, "pos", layer=name, num_nodes=x.size(0))
        edge_index, _ = as_edge_index(edge_index, x.size(0), layer=name)
        if self.edge_dim > 0:
            if edge_attr is None:
                raise ValueError(f"{name}: edge_dim={self.edge_dim} but no edge_attr was given")
            if isinstance(edge_attr, Tensor) and edge_attr.dim() == 1:
                edge_attr = edge_attr.unsqueeze(-1)
            check_edge_features(edge_attr, edge_index.size(1), layer=name,
                                channels=self.edge_dim)
        else:
            edge_attr = None
        if self.vel_mlp is not None:
            if vel is None:
                raise ValueError(f"{name}: velocity=True needs vel")
            check_node_features(vel, "vel", layer=name, channels=pos.size(-1),
                                num_nodes=x.size(0))
        return edge_index, edge_attr

    def edge_update(self, x_i: Tensor, x_j: Tensor, radial: Tensor,
                    edge_attr: Tensor | None) -> Tensor:
        r"""The message $\mathbf m_{ij} = \phi_e(\mathbf h_i, \mathbf h_j, \lVert \mathbf x_i -
        \mathbf x_j \rVert^2, \mathbf a_{ij})$ (eq. 3), gated by attention if enabled."""
        feats = [x_i, x_j, radial] + ([edge_attr] if edge_attr is not None else [])
        m = self.edge_mlp(torch.cat(feats, dim=-1))
        if self.att_mlp is not None:
            m = m * torch.sigmoid(self.att_mlp(m))
        return m

    def message(self, m: Tensor) -> Tensor:
        """The messages of `edge_update`, passed on unchanged."""
        return m

    def aggregate(self, inputs: Tensor, index: Tensor, dim_size: int | None = None) -> Tensor:
        r"""$\sum_{j \in \mathcal N(i)} \mathbf m_{ij}$ through `graphspace.ops.scatter`."""
        return scatter(inputs, index, 0, dim_size, "sum")

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"hidden_channels={self.hidden_channels}, edge_dim={self.edge_dim}, "
            f"attention={self.attention}, normalize={self.normalize}, tanh={self.tanh}, "
            f"coords_agg={self.coords_agg!r}, velocity={self.velocity})"
        )


class EGNN(nn.Module):
    r"""A stack of `EGNNConv` layers with input/output embeddings, as used for the
    N-body experiment of Satorras et al. (2021) (their `EGNN_vel` model).

    $$
    \mathbf{h}^0 = W_{in} \mathbf{h} + b, \qquad
    (\mathbf{h}^{l+1}, \mathbf{x}^{l+1}) = \mathrm{EGCL}(\mathbf{h}^l, \mathbf{x}^l,
        \mathbf{a}, \mathbf{v}^{init}), \qquad
    \mathbf{h}^{out} = W_{out} \mathbf{h}^L + b
    $$

    In the velocity variant every layer receives the *initial* velocity
    $\mathbf{v}^{init}$ (eq. 7 of the paper).

    Args:
        in_channels: size of the input node features.
        hidden_channels: width of every layer (64 in the paper's N-body experiment).
        out_channels: size of the returned node features (`None`: return the hidden
            features without an output embedding).
        num_layers: number of `EGNNConv` layers (4 in the paper's N-body run).
        edge_dim: size of the edge attributes.
        velocity: use the velocity variant (`forward` then needs `vel`).
        **kwargs: further `EGNNConv` options (`attention`, `normalize`,
            `tanh`, `coords_range`, `coords_agg`, `residual`, `act`).

    Shapes:
        - **input:** `x` $(N, F_{in})$, `pos` $(N, D)$, `edge_index`
          $(2, E)$, `edge_attr` $(E, F_e)$, `vel` $(N, D)$.
        - **output:** `(h, pos)`: $(N, F_{out})$ and $(N, D)$.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int | None = None,
        num_layers: int = 4,
        edge_dim: int = 0,
        velocity: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.velocity = velocity
        self.embedding_in = nn.Linear(in_channels, hidden_channels)
        self.layers = nn.ModuleList(
            EGNNConv(
                hidden_channels,
                hidden_channels,
                hidden_channels,
                edge_dim=edge_dim,
                velocity=velocity,
                **kwargs,
            )
            for _ in range(num_layers)
        )
        self.embedding_out = (
            nn.Linear(hidden_channels, out_channels) if out_channels is not None else None
        )

    def reset_parameters(self) -> None:
        """Re-initialise all layers."""
        self.embedding_in.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        if self.embedding_out is not None:
            self.embedding_out.reset_parameters()

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor | None = None,
        vel: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return the final node features and coordinates."""
        if self.velocity and vel is None:
            raise ValueError("EGNN: velocity=True needs vel")
        check_node_features(x, "x", layer="EGNN", channels=self.in_channels)
        edge_index, _ = as_edge_index(edge_index, x.size(0), layer="EGNN")
        h = self.embedding_in(x)
        for layer in self.layers:
            if self.velocity:
                h, pos, _ = layer(h, pos, edge_index, edge_attr, vel)
            else:
                h, pos = layer(h, pos, edge_index, edge_attr)
        if self.embedding_out is not None:
            h = self.embedding_out(h)
        return h, pos

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
            f"out_channels={self.out_channels}, num_layers={self.num_layers}, "
            f"velocity={self.velocity})"
        )
