r"""`GraphMetaNetwork`: a GNN over parameter graphs, invariant to hidden-neuron permutations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from graphspace.graphs.analysis import ACTIVATIONS, EDGE_TYPES, NODE_TYPES
from graphspace.nn.models.backbones import BACKBONES, make_block, make_state
from graphspace.ops import scatter

READOUTS = ("pool", "output")

#: backbones whose blocks run faster on edges sorted by target (their CSR products then read
#: the edges contiguously); for these the model hands the blocks target-sorted edges.
_SORTED_EDGE_BACKBONES = ("metanet",)


class ParameterGraphEncoder(nn.Module):
    r"""Embeds parameter-graph nodes and edges.

    Node embedding: $W_x \mathbf{x} + E_{type} + E_{layer} + E_{io} + E_{act}$ where the
    input/output embedding $E_{io}$ distinguishes each input and output position (inputs
    and outputs are not permutable) and gives all hidden neurons one shared vector, so the
    encoding is invariant to permutations of hidden neurons (Lim et al. 2024; Kofinas et al.
    2024). Edge embedding: $W_e \mathbf{e} + E_{type} + E_{layer} + \sum_d E^{(d)}_{pos}$.
    Attention head indices are deliberately not encoded (heads are permutable).

    `edge_pos=False` drops $E_{pos}$ (graphs built with `kernel="channel"` carry the
    kernel as edge features and have no per-edge spatial offset); when it is enabled and a batch
    has no `edge_pos`, every edge gets offset 0, so all parameters take part in every forward
    pass (as DDP requires).
    """

    def __init__(self, hidden_channels: int, edge_channels: int, node_in: int = 3,
                 edge_in: int = 1, max_layers: int = 64, max_io: int = 1024,
                 max_pos: int = 64, edge_pos: bool = True) -> None:
        super().__init__()
        self.max_layers, self.max_io, self.max_pos = max_layers, max_io, max_pos
        self.node_lin = nn.Linear(node_in, hidden_channels)
        self.node_type = nn.Embedding(len(NODE_TYPES), hidden_channels)
        self.node_layer = nn.Embedding(max_layers, hidden_channels)
        self.node_io = nn.Embedding(1 + 2 * max_io, hidden_channels)
        self.node_act = nn.Embedding(len(ACTIVATIONS), hidden_channels)
        self.edge_lin = nn.Linear(edge_in, edge_channels)
        self.edge_type = nn.Embedding(len(EDGE_TYPES), edge_channels)
        self.edge_layer = nn.Embedding(max_layers, edge_channels)
        self.edge_pos = nn.ModuleList(nn.Embedding(max_pos, edge_channels) for _ in range(3)) \
            if edge_pos else None

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()

    def edges_both_directions(self, data: Any, order: Tensor,
                              direction: Tensor) -> Tensor:
        r"""The edge embedding of the forward and reversed copy of every edge, in `order`
        (position $p < E_0$ of `order` is edge $p$ forwards, $p \ge E_0$
        edge $p - E_0$ reversed), plus `direction[0]` / `direction[1]`; the same
        values as `cat([e + d[0], e + d[1]])[order]` with `e` from
        [`forward`][graphspace.tasks.contrastive.GraphContrastive.forward].

        Without spatial offsets the type, layer and direction embeddings (and `edge_lin`'s
        bias) are one table of $|types| \cdot L \cdot 2$ rows, built per call, so each
        edge copy costs one row gather and one `edge_in`-wide product, and the backward
        pass is one scatter into that table instead of one per embedding plus the gathers of
        the direction copies.
        """
        e0 = data.edge_attr.size(0)
        which = torch.remainder(order, e0)
        dirn = torch.div(order, e0, rounding_mode="floor")
        if self.edge_pos is not None:  # offsets: the embeddings of every copy one by one
            return self._edge_embedding(data, which) + direction.index_select(0, dirn)
        n_layers = self.max_layers
        table = (self.edge_type.weight[:, None, None] + self.edge_layer.weight[None, :, None]
                 + direction[None, None] + self.edge_lin.bias)
        et = data.edge_type.index_select(0, which)
        el = data.edge_layer.index_select(0, which).clamp_max(n_layers - 1)
        code = (et * n_layers + el) * 2 + dirn
        return torch.addmm(table.reshape(-1, table.size(-1)).index_select(0, code),
                           data.edge_attr.index_select(0, which), self.edge_lin.weight.t())

    def _edge_embedding(self, data: Any, rows: Tensor | None = None) -> Tensor:
        """`edge_lin` + type + layer (+ offset) embeddings of the edges `rows` (all if
        `None`)."""
        def pick(t: Tensor) -> Tensor:
            return t if rows is None else t.index_select(0, rows)

        e = self.edge_lin(pick(data.edge_attr)) + self.edge_type(pick(data.edge_type)) + \
            self.edge_layer(pick(data.edge_layer).clamp_max(self.max_layers - 1))
        if self.edge_pos is not None:
            ep = getattr(data, "edge_pos", None)
            if ep is None:
                e = e + sum(emb.weight[0] for emb in self.edge_pos)
            else:
                ep = pick(ep).long().clamp(0, self.max_pos - 1)
                for d in range(3):
                    e = e + self.edge_pos[d](ep[:, d])
        return e

    def forward(self, data: Any) -> tuple[Tensor, Tensor]:
        return self.nodes(data), self._edge_embedding(data)

    def nodes(self, data: Any) -> Tensor:
        """The node embedding."""
        x = self.node_lin(data.x)
        x = x + self.node_type(data.node_type) + self.node_layer(
            data.node_layer.clamp_max(self.max_layers - 1))
        role, pos = data.node_role, data.node_pos.clamp(0, self.max_io - 1)
        io = torch.where(role == 1, 1 + pos, torch.where(role == 2, 1 + self.max_io + pos,
                                                         torch.zeros_like(pos)))
        return x + self.node_io(io) + self.node_act(data.node_act)


class GraphMetaNetwork(nn.Module):
    r"""A graph metanetwork: encoder, message-passing blocks, readout.

    It consumes [`ParameterGraph`][graphspace.graphs.ParameterGraph] batches (`torch_geometric`
    `Batch` objects) of any architectures and returns one vector per network. Every block is
    equivariant to node permutations and the encoder gives hidden neurons no identity, so the output
    is invariant to permutations of each input network's hidden neurons (but not of its input or
    output neurons).

    Args:
        out_channels (int): size of the per-network output.
        hidden_channels (int): node width (default 64).
        edge_channels (int): edge width (default `hidden_channels`).
        num_layers (int): message-passing blocks (default 4).
        backbone (str): the message-passing family of the blocks, one of
            `BACKBONES`: `"metanet"`
            ([`MetaNetworkConv`][graphspace.nn.conv.MetaNetworkConv], default), `"egnn"`
            ([`EGNNConv`][graphspace.nn.conv.EGNNConv] with learned or positional coordinates),
            `"sheaf"` ([`SheafConv`][graphspace.nn.conv.SheafConv], neural sheaf diffusion),
            `"unitary"` ([`UnitaryConv`][graphspace.nn.conv.UnitaryConv] /
            [`LieUnitaryConv`][graphspace.nn.conv.LieUnitaryConv]) or `"subgraph"`
            ([`SPENConv`][graphspace.nn.conv.SPENConv] on node-marked ego-nets). Every backbone
            uses the edge features and keeps the invariance to hidden-neuron permutations;
            see `graphspace.nn.models.backbones` for the equations, options and costs.
            New families are added with
            [`register_backbone`][graphspace.nn.models.backbones.register_backbone].
        readout (str): `"pool"` (DeepSets: mean and max over nodes and mean over edges, then an
            MLP) or `"output"` (concatenate the output neurons' features in output order,
            plus the pooled features; every network in a batch must have as many outputs as
            `num_outputs`).
        num_outputs (int): output neurons per network for `readout="output"`.
        bidirectional (bool): also pass messages along reversed edges (with a direction
            embedding) (default `True`).
        node_in (int), edge_in (int): raw feature sizes (3 and 1 for `kernel="edge"` graphs;
            `edge_in = kh * kw` of the largest kernel for `kernel="channel"` graphs).
        edge_pos (bool, optional): embed the per-edge spatial kernel offset (default: only when
            `edge_in == 1`, i.e. for `kernel="edge"` graphs).
        backbone_kwargs (dict): extra arguments for the blocks, e.g.
            `{"coords": "positional"}` for `"egnn"`, `{"map_type": "orthogonal"}` for
            `"sheaf"`, `{"conv": "lie", "heads": 2}` for `"unitary"`.

    Example:

    ```python
    net = GraphMetaNetwork(1, hidden_channels=32, backbone="sheaf",
                           backbone_kwargs={"stalk_dim": 4, "map_type": "orthogonal"})
    y = net(Batch.from_data_list([ParameterGraph.from_module(m) for m in models]))
    ```
    """

    def __init__(
        self,
        out_channels: int,
        hidden_channels: int = 64,
        edge_channels: int | None = None,
        num_layers: int = 4,
        backbone: str = "metanet",
        readout: str = "pool",
        num_outputs: int = 0,
        bidirectional: bool = True,
        node_in: int = 3,
        edge_in: int = 1,
        dropout: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        edge_pos: bool | None = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose from {READOUTS}")
        if readout == "output" and num_outputs <= 0:
            raise ValueError("readout='output' needs num_outputs > 0")
        edge_channels = edge_channels or hidden_channels
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.backbone = backbone
        self.readout = readout
        self.num_outputs = num_outputs
        self.bidirectional = bidirectional
        self.encoder = ParameterGraphEncoder(hidden_channels, edge_channels, node_in, edge_in,
                                             edge_pos=edge_in == 1 if edge_pos is None
                                             else edge_pos)
        self.direction = nn.Embedding(2, edge_channels)
        self.blocks = nn.ModuleList(
            make_block(backbone, hidden_channels, edge_channels, dropout,
                       **(backbone_kwargs or {}))
            for _ in range(num_layers)
        )
        # Extra state carried through the blocks (EGNN coordinates, a subgraph bag, ...);
        # None for stateless backbones such as "metanet".
        self.state_encoder = make_state(backbone, hidden_channels, edge_channels,
                                        **(backbone_kwargs or {}))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_channels) for _ in range(num_layers))
        pooled = 3 * hidden_channels
        if readout == "output":
            pooled += num_outputs * hidden_channels
        self.head = nn.Sequential(nn.Linear(pooled, hidden_channels), nn.SiLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden_channels, out_channels))

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, data: Any) -> Tensor:
        edge_index = data.edge_index
        order = self._sorted_order(edge_index) if self.bidirectional else None
        if order is not None:  # both directions, sorted by target, embedded in one pass
            x = self.encoder.nodes(data)
            full = torch.cat([edge_index, edge_index.flip(0)], dim=1)
            edge_index = full.index_select(1, order)
            e = self.encoder.edges_both_directions(data, order, self.direction.weight)
        else:
            x, e = self.encoder(data)
            if self.bidirectional:
                d = self.direction.weight
                edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
                e = torch.cat([e + d[0], e + d[1]], dim=0)
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        num_graphs = int(getattr(data, "num_graphs", 1) or 1)
        if self.state_encoder is None:
            for block, norm in zip(self.blocks, self.norms):
                x, e = block(x, edge_index, e, batch)
                x = norm(x)
        else:
            state = self.state_encoder(x, edge_index, e, batch, data)
            for block, norm in zip(self.blocks, self.norms):
                x, e, state = block(x, edge_index, e, batch, state)
                x = norm(x)
        ebatch = batch.index_select(0, edge_index[1])
        pooled = [scatter(x, batch, 0, num_graphs, "mean"), scatter(x, batch, 0, num_graphs, "max"),
                  scatter(e, ebatch, 0, num_graphs, "mean")]
        if self.readout == "output":
            pooled.append(self._outputs(x, data, batch, num_graphs))
        return self.head(torch.cat(pooled, dim=-1))

    def _sorted_order(self, edge_index: Tensor) -> Tensor | None:
        """For the backbones of `_SORTED_EDGE_BACKBONES` (eager mode): the stable order
        that sorts the forward and reversed edges (`cat([edge_index, edge_index.flip(0)])`)
        by target node, which every edge-order-invariant block accepts and the CSR-based ones
        run faster on; `None` otherwise (forward edges first, then the reversed ones)."""
        if self.backbone not in _SORTED_EDGE_BACKBONES or torch.compiler.is_compiling() \
                or edge_index.size(1) == 0:
            return None
        dst = torch.cat([edge_index[1], edge_index[0]])
        keys = dst.int() if dst.numel() < 2**31 else dst  # int32 keys: fewer radix passes
        return torch.sort(keys, stable=True)[1]

    def _outputs(self, x: Tensor, data: Any, batch: Tensor, num_graphs: int) -> Tensor:
        mask = data.node_role == 2
        counts = torch.bincount(batch[mask], minlength=num_graphs)
        if bool((counts != self.num_outputs).any()):
            raise ValueError(f"readout='output' expects {self.num_outputs} output neurons per "
                             f"network, got {counts.tolist()}")
        key = batch[mask] * self.num_outputs + data.node_pos[mask]
        order = torch.argsort(key)
        return x[mask][order].reshape(num_graphs, self.num_outputs * x.size(-1))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(out_channels={self.out_channels}, "
                f"hidden_channels={self.hidden_channels}, num_layers={len(self.blocks)}, "
                f"backbone={self.backbone!r}, readout={self.readout!r})")
