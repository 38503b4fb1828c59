r"""Message-passing blocks that [`GraphMetaNetwork`][graphspace.nn.models.GraphMetaNetwork] can use
as its backbone (`GraphMetaNetwork(..., backbone=name, backbone_kwargs={...})`).

- `metanet`: `MetaNetBlock`: [`MetaNetworkConv`][graphspace.nn.conv.MetaNetworkConv] (default)
- `egnn`: `EGNNBlock`: [`EGNNConv`][graphspace.nn.conv.EGNNConv] with learned or positional node
  coordinates carried across blocks
- `sheaf`: `SheafBlock`: Neural Sheaf Diffusion ([`SheafConv`][graphspace.nn.conv.SheafConv]) with
  restriction maps learned from both endpoints *and* the edge features
- `unitary`: `UnitaryBlock`: [`UnitaryConv`][graphspace.nn.conv.UnitaryConv] (or
  [`LieUnitaryConv`][graphspace.nn.conv.LieUnitaryConv]) on a symmetric, signed,
  edge-feature-weighted operator
- `subgraph`: `SubgraphBlock`: [`SPENConv`][graphspace.nn.conv.SPENConv] on the bag of node-marked
  1-hop ego-networks
- `ds`: [`DSBlock`][graphspace.nn.models.backbones.DSBlock]: ESAN's DS-GNN
  ([`DSConv`][graphspace.nn.conv.DSConv]) on the same bag, with ESAN bag subsampling (`fraction` /
  `k`, [`esan_vote`][graphspace.nn.models.backbones.esan_vote])
- `dss`: [`DSSBlock`][graphspace.nn.models.backbones.DSSBlock]: ESAN's DSS-GNN
  ([`DSSConv`][graphspace.nn.conv.DSSConv]), idem

The block protocol. A block maps `(x, edge_index, edge_attr, batch) -> (x, edge_attr)`.
A backbone whose blocks need extra per-node or per-graph state (EGNN coordinates, a
precomputed subgraph bag, a coalesced operator) defines a static method
`make_state(hidden, edge_channels, **backbone_kwargs) -> nn.Module`; the model then builds
that module once, calls `state = module(x, edge_index, edge_attr, batch, data)` once per
forward pass (after the encoder and after adding reversed edges), and calls every block as
`block(x, edge_index, edge_attr, batch, state) -> (x, edge_attr, state)`.

Every block uses the edge features (the parameter values live on the edges) and only
node-permutation-equivariant operations (gathers by `edge_index`, scatters, shared
per-node/per-edge maps), and no state gives nodes an identity, so the metanetwork stays
invariant to permutations of the input networks' hidden neurons whatever the backbone.
Every block costs $O(|\mathcal E|\,F)$ for $F$ the hidden width (plus terms on
coalesced node pairs, which are far fewer than parameter edges); see each block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch_geometric.nn import GraphConv

from graphspace.nn.conv.egnn_conv import EGNNConv
from graphspace.nn.conv.metanetwork_conv import MetaNetworkConv, _mlp
from graphspace.nn.conv.sheaf_conv import SheafConv, SheafLaplacian, maps_from_params
from graphspace.nn.conv.subgraph_conv import DSConv, DSSConv, SPENConv, bag_to_nodes
from graphspace.nn.conv.unitary_conv import LieUnitaryConv, UnitaryConv
from graphspace.ops import scatter

__all__ = [
    "BACKBONES",
    "CoordinateEncoder",
    "DSBlock",
    "DSSBlock",
    "EGNNBlock",
    "ESANBag",
    "EgoNetBag",
    "EgoNets",
    "MetaNetBlock",
    "SheafBlock",
    "SubgraphBlock",
    "SymmetricOperator",
    "SymmetricPairs",
    "UnitaryBlock",
    "esan_vote",
    "make_block",
    "make_state",
    "register_backbone",
    "subsample_bag",
]

BlockFactory = Callable[..., nn.Module]
BACKBONES: dict[str, BlockFactory] = {}


def register_backbone(name: str) -> Callable[[BlockFactory], BlockFactory]:
    """Register a block factory `f(hidden, edge_channels, dropout, **kw) -> nn.Module` under
    `name` (usable as a class decorator). A factory with a `make_state` attribute gets a
    state module (see the module docstring)."""

    def deco(fn: BlockFactory) -> BlockFactory:
        BACKBONES[name] = fn
        return fn

    return deco


def _factory(name: str) -> BlockFactory:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    return BACKBONES[name]


def make_block(name: str, hidden: int, edge_channels: int, dropout: float = 0.0,
               **kwargs: Any) -> nn.Module:
    """One block of backbone `name`."""
    return _factory(name)(hidden, edge_channels, dropout, **kwargs)


def make_state(name: str, hidden: int, edge_channels: int, **kwargs: Any) -> nn.Module | None:
    """The backbone's state module (`None` for stateless backbones)."""
    maker = getattr(_factory(name), "make_state", None)
    return None if maker is None else maker(hidden, edge_channels, **kwargs)


def _reset_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()


class _EdgeUpdate(nn.Module):
    r"""$\mathbf e'_{ij} = \mathbf e_{ij} + \phi_e([\mathbf x_i \,\|\, \mathbf x_j \,\|\,
    \mathbf e_{ij} \,\|\, \mathbf r_{ij}])$ (target $i$, source $j$, optional
    invariant extras $\mathbf r_{ij}$)."""

    def __init__(self, hidden: int, edge_channels: int, extra: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = _mlp(2 * hidden + edge_channels + extra, hidden, edge_channels, dropout)

    def reset_parameters(self) -> None:
        _reset_linears(self.mlp)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor,
                extra: Tensor | None = None) -> Tensor:
        feats = [x.index_select(0, edge_index[1]), x.index_select(0, edge_index[0]), edge_attr]
        if extra is not None:
            feats.append(extra)
        return edge_attr + self.mlp(torch.cat(feats, dim=-1))


# --------------------------------------------------------------------------- metanet


class MetaNetBlock(nn.Module):
    """[`MetaNetworkConv`][graphspace.nn.conv.MetaNetworkConv] (edge update, FiLM messages, PNA
    aggregation); `backbone_kwargs` go to the conv."""

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__()
        self.conv = MetaNetworkConv(hidden, hidden, edge_channels, dropout=dropout, **kwargs)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor,
                batch: Tensor) -> tuple[Tensor, Tensor]:
        return self.conv(x, edge_index, edge_attr, return_edge_attr=True)


register_backbone("metanet")(MetaNetBlock)


# --------------------------------------------------------------------------- egnn

Coords = Literal["learned", "positional"]


class CoordinateEncoder(nn.Module):
    r"""Initial node coordinates for the `egnn` backbone.

    * `"learned"`: $\mathbf p_i = W_p \mathbf h^0_i \in \mathbb R^{k}$, a bias-free
      projection of the encoder's node embedding (a translation would not matter: EGNN only
      sees differences).
    * `"positional"`: fixed $\mathbf p_i = (\ell_i / \max(1, \ell_{\max}),\
      [\text{input}]\,(q_i + 1)/n_{in},\ [\text{output}]\,(q_i + 1)/n_{out}) \in [0, 1]^3$
      from the layer index $\ell_i$, the input/output position $q_i$ and the
      per-network maxima. These attributes do not change under hidden-neuron permutations
      (all hidden neurons of a layer share a position), so the coordinates never give hidden
      neurons an identity.

    Args:
        hidden: node embedding size.
        coords: `"learned"` or `"positional"`.
        coord_dim: $k$ for learned coordinates (default 3; positional ones are 3-D).
    """

    def __init__(self, hidden: int, coords: Coords = "learned",
                 coord_dim: int | None = None) -> None:
        super().__init__()
        if coords not in ("learned", "positional"):
            raise ValueError(f"coords must be 'learned' or 'positional', got {coords!r}")
        if coords == "positional" and coord_dim not in (None, 3):
            raise ValueError("positional coordinates are 3-dimensional; drop coord_dim")
        self.coords = coords
        self.coord_dim = 3 if coord_dim is None else coord_dim
        self.proj = nn.Linear(hidden, self.coord_dim, bias=False) if coords == "learned" else None

    def reset_parameters(self) -> None:
        if self.proj is not None:
            self.proj.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                data: Any) -> Tensor:
        if self.proj is not None:
            return self.proj(x)
        for name in ("node_layer", "node_role", "node_pos"):
            if getattr(data, name, None) is None:
                raise ValueError(f"coords='positional' needs data.{name} (a ParameterGraph)")
        n, dt = x.size(0), x.dtype
        b = int(batch.max()) + 1 if n else 1
        layer = data.node_layer.to(dt)
        role, pos = data.node_role, (data.node_pos + 1).to(dt)
        zero = torch.zeros_like(pos)
        lmax = scatter(layer, batch, 0, b, "max").clamp_min(1.0)[batch]
        cols = [layer / lmax]
        for r in (1, 2):
            q = torch.where(role == r, pos, zero)
            qmax = scatter(q, batch, 0, b, "max").clamp_min(1.0)[batch]
            cols.append(q / qmax)
        return torch.stack(cols, dim=-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(coords={self.coords!r}, coord_dim={self.coord_dim})"


@register_backbone("egnn")
class EGNNBlock(nn.Module):
    r"""An [`EGNNConv`][graphspace.nn.conv.EGNNConv] block (Satorras et al. 2021) for parameter
    graphs, followed by an edge update that sees the new coordinates:

    $$
    \begin{aligned}
        (\mathbf h', \mathbf p') &= \mathrm{EGCL}(\mathbf h, \mathbf p,
            \mathbf a = \mathbf e) \\
        \mathbf e'_{ij} &= \mathbf e_{ij} + \phi_e\big([\mathbf h'_i \,\|\, \mathbf h'_j
            \,\|\, \mathbf e_{ij} \,\|\, \lVert \mathbf p'_i - \mathbf p'_j\rVert^2]\big)
    \end{aligned}
    $$

    The parameter-value edge features enter every message as $\mathbf a_{ij}$; with
    `attention=True` they also gate it. The edge update makes the coordinate update of
    every block (the last one included) reach the output through invariant distances.
    Coordinates $\mathbf p$ come from `CoordinateEncoder`
    (`coords="learned"`: a projection of the initial node embeddings; `"positional"`:
    layer index and input/output position) and are carried from block to block. The
    coordinate stream is E(k)-equivariant and everything else
    depends on coordinates only through distances, so rotating/reflecting or translating the
    initial coordinates changes nothing downstream; the block is node-permutation
    equivariant. Cost: two edge MLPs, $O(|\mathcal E| F^2)$.

    Args (`backbone_kwargs`):
        coords: `"learned"` (default) or `"positional"`.
        coord_dim: size of learned coordinates (default 3).
        attention: gate messages (default `True`).
        normalize: unit-length coordinate differences (default `True`).
        tanh: bound the coordinate weights by `coords_range * tanh` (default `True`).
        coords_range: default 1.0.
        coords_agg: `"mean"` (default) or `"sum"`.
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 coords: Coords = "learned", coord_dim: int | None = None,
                 attention: bool = True, normalize: bool = True, tanh: bool = True,
                 coords_range: float = 1.0, coords_agg: Literal["mean", "sum"] = "mean") -> None:
        super().__init__()
        if coords not in ("learned", "positional"):
            raise ValueError(f"coords must be 'learned' or 'positional', got {coords!r}")
        self.coords = coords
        self.edge_update = _EdgeUpdate(hidden, edge_channels, extra=1, dropout=dropout)
        self.conv = EGNNConv(hidden, hidden, hidden, edge_dim=edge_channels,
                             attention=attention, normalize=normalize, tanh=tanh,
                             coords_range=coords_range, coords_agg=coords_agg)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def make_state(hidden: int, edge_channels: int, coords: Coords = "learned",
                   coord_dim: int | None = None, **kwargs: Any) -> nn.Module:
        return CoordinateEncoder(hidden, coords, coord_dim)

    def reset_parameters(self) -> None:
        self.edge_update.reset_parameters()
        self.conv.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, pos = self.conv(self.dropout(x), pos, edge_index, edge_attr)
        diff = pos.index_select(0, edge_index[1]) - pos.index_select(0, edge_index[0])
        radial = (diff * diff).sum(-1, keepdim=True)
        return h, self.edge_update(h, edge_index, edge_attr, radial), pos

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(coords={self.coords!r}, {self.conv})"


# --------------------------------------------------------------------------- sheaf


@register_backbone("sheaf")
class SheafBlock(nn.Module):
    r"""A Neural Sheaf Diffusion block (Bodnar et al., NeurIPS 2022) whose restriction maps
    see the edge features.

    Node features $(n, F)$ are read as $d$-dimensional stalks with $F/d$
    channels. Every edge $e = (j \to i)$ of the batch (both directions, and every
    parallel kernel-entry edge, are separate edges of a multigraph sheaf) gets

    $$
    \begin{aligned}
        \mathbf e' &= \mathbf e + \phi_e([\mathbf x_i \,\|\, \mathbf x_j \,\|\, \mathbf e]) \\
        \mathcal F_{j \trianglelefteq e} &= \mathrm{maps}\big(\sigma(W [\mathbf x_j \,\|\,
            \mathbf x_i] + V \mathbf e')\big), \qquad
        \mathcal F_{i \trianglelefteq e} = \mathrm{maps}\big(\sigma(W [\mathbf x_i \,\|\,
            \mathbf x_j] + V \mathbf e')\big)
    \end{aligned}
    $$

    ($W$ and $\sigma$ = tanh are the [`SheafConv`][graphspace.nn.conv.SheafConv] map
    learner, $V$ the added edge term; `maps` is diagonal, orthogonal or general; with
    orthogonal maps and `edge_weights`, $\mathcal F \leftarrow w_e \mathcal F$ with
    $w_e = s_j s_i$, $s = \mathrm{sigmoid}(U[\mathbf x \| \mathbf x'] +
    u^\top \mathbf e')$). Then the normalised sheaf Laplacian
    $\Delta_{\mathcal F}$ of this multigraph ([`SheafLaplacian`][graphspace.nn.conv.SheafLaplacian],
    built from the batch's `edge_index` at every call: inductive) drives the NSD update of
    [`SheafConv`][graphspace.nn.conv.SheafConv],
    $X' = (1 + \tanh\varepsilon) \odot X - \sigma(\Delta_{\mathcal F}(I \otimes W_1) X W_2)$.
    Cost $O(|\mathcal E|(F^2 + d F))$ (edge MLP, map learner, block coboundary).

    Args (`backbone_kwargs`):
        stalk_dim: $d$ (default 4; must divide the hidden width).
        map_type: `"diag"` (default), `"orthogonal"` or `"general"`.
        orthogonal_map: `"householder"` (default), `"cayley"` or `"matrix_exp"`.
        edge_weights: learned edge weights for orthogonal maps (default: on for
            `map_type="orthogonal"`).
        augmented, left_weights, right_weights, epsilon, act: as in
            [`SheafConv`][graphspace.nn.conv.SheafConv].
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 stalk_dim: int = 4, map_type: Literal["diag", "orthogonal", "general"] = "diag",
                 orthogonal_map: Literal["householder", "cayley", "matrix_exp"] = "householder",
                 edge_weights: bool | None = None, augmented: bool = True,
                 left_weights: bool = True, right_weights: bool = True, epsilon: bool = True,
                 act: str = "elu") -> None:
        super().__init__()
        if edge_weights is None:
            edge_weights = map_type == "orthogonal"
        self.edge_update = _EdgeUpdate(hidden, edge_channels, dropout=dropout)
        self.conv = SheafConv(hidden, hidden, stalk_dim=stalk_dim, map_type=map_type,
                              orthogonal_map=orthogonal_map, edge_weights=edge_weights,
                              augmented=augmented, left_weights=left_weights,
                              right_weights=right_weights, epsilon=epsilon, act=act,
                              dropout=dropout)
        p = self.conv.num_map_params
        self.edge_maps = nn.Linear(edge_channels, p, bias=False) if p > 0 else None
        self.edge_weight = nn.Linear(edge_channels, 1, bias=False) if edge_weights else None

    def reset_parameters(self) -> None:
        self.edge_update.reset_parameters()
        self.conv.reset_parameters()
        for lin in (self.edge_maps, self.edge_weight):
            if lin is not None:
                lin.reset_parameters()

    def laplacian(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> SheafLaplacian:
        """The normalised sheaf Laplacian of the multigraph `edge_index` with maps from the
        node features and the (updated) edge features."""
        conv, d, n = self.conv, self.conv.stalk_dim, x.size(0)
        src, dst = edge_index[0], edge_index[1]
        m = src.numel()
        a = torch.cat([src, dst])  # incidence owner
        b = torch.cat([dst, src])  # the other end
        pair = torch.cat([x.index_select(0, a), x.index_select(0, b)], dim=-1)
        if conv.learner is not None and self.edge_maps is not None:
            em = self.edge_maps(edge_attr)
            params = conv.learner.act(conv.learner.mlp(pair) + torch.cat([em, em]))
        else:
            params = x.new_zeros(2 * m, 0)
        maps = maps_from_params(params, conv.map_type, d, conv.orthogonal_map)
        if (conv.map_type == "orthogonal" and self.edge_weight is not None
                and conv.edge_weight_learner is not None):
            ew = self.edge_weight(edge_attr)
            s = torch.sigmoid(conv.edge_weight_learner(pair) + torch.cat([ew, ew]))
            w = s[:m] * s[m:]  # one weight per edge, shared by both incidences
            maps = maps * torch.cat([w, w]).view(-1, 1, 1)
        return SheafLaplacian(edge_index, maps[:m], maps[m:], n, conv.map_type, conv.augmented)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor,
                batch: Tensor) -> tuple[Tensor, Tensor]:
        e = self.edge_update(x, edge_index, edge_attr)
        lap = self.laplacian(x, edge_index, e)
        return self.conv._update(x, lap), e

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.conv})"


# --------------------------------------------------------------------------- unitary


class SymmetricPairs(NamedTuple):
    """Coalesced symmetric support of a batch's edges (state of the `unitary` backbone).

    Attributes:
        pair_index: `(2, P + N)` distinct node pairs `(source, target)` of the symmetrised
            edge set, followed by the `N` self-loops.
        edge_to_pair: `(2E,)`: the pair of every edge `j -> i` (first `E` entries,
            feeding $A_{ij}$) and of its transpose (last `E`, feeding $A_{ji}$).
        num_pairs: $P$.
    """

    pair_index: Tensor
    edge_to_pair: Tensor
    num_pairs: int


class SymmetricOperator(nn.Module):
    r"""Computes `SymmetricPairs` once per forward pass (no parameters, no gradient):
    `torch.unique` over the keys of every edge and its reverse, $O(E \log E)$."""

    @torch.no_grad()
    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                data: Any) -> SymmetricPairs:
        n = x.size(0)
        src, dst = edge_index[0], edge_index[1]
        key = torch.cat([dst * n + src, src * n + dst])  # (target, source) of A and A^T
        uniq, inv = torch.unique(key, return_inverse=True)
        loops = torch.arange(n, device=x.device)
        pair_index = torch.stack([torch.cat([uniq % n, loops]), torch.cat([uniq // n, loops])])
        return SymmetricPairs(pair_index, inv, uniq.numel())


@register_backbone("unitary")
class UnitaryBlock(nn.Module):
    r"""A unitary-convolution block (Kiani et al., NeurIPS 2024) on a symmetric operator
    weighted by the edge features.

    $$
    \begin{aligned}
        \mathbf e'_{ij} &= \mathbf e_{ij} + \phi_e([\mathbf x_i \,\|\, \mathbf x_j \,\|\,
            \mathbf e_{ij}]), \qquad w^{(h)}_{ij} = \tanh(\mathbf u_h^\top \mathbf e'_{ij}) \\
        A^{(h)} &= \tfrac12 \textstyle\sum_{(j\to i)} w^{(h)}_{ij}\,
            (\mathbf 1_i \mathbf 1_j^\top + \mathbf 1_j \mathbf 1_i^\top) + I, \qquad
        \hat A^{(h)} = D_h^{-1/2} A^{(h)} D_h^{-1/2},\quad (D_h)_{ii} = \textstyle\sum_j
            |A^{(h)}_{ij}| \\
        \mathbf z^{(h)} &= \exp\big(i t \hat A^{(h)}\big) X^{(h)} W_h \ \text{(UniConv)}
            \quad\text{or}\quad \exp\big(\hat A^{(h)} \otimes W_h^\top\big) X^{(h)}
            \ \text{(Lie, orthogonal)} \\
        \mathbf x'_i &= \mathbf x_i + \phi_h([\mathbf x_i \,\|\, \mathbf z_i])
    \end{aligned}
    $$

    with one signed scalar weight per edge and head (the hidden channels are split into
    `heads` groups $X^{(h)}$; for UniConv each group is read as complex channels in
    the `[Re | Im]` paired form). Parallel edges (kernel entries) between two neurons add up.

    **Why the operator is unitary-compatible.** $\exp(it\hat A)$ is unitary (and
    $\exp(\hat A \otimes W^\top)$ orthogonal for skew $W$) only for a real
    symmetric (Hermitian) $\hat A$. Every edge contributes half its weight to both
    $A_{ij}$ and $A_{ji}$; with `bidirectional=True` (the model's default) every
    parameter is present as a forward and a reversed edge, each with its own
    direction-embedded features, so $A_{ij} = A_{ji} = \tfrac12(w(\mathbf e^{\to}) +
    w(\mathbf e^{\leftarrow}))$ summed over the parameters between the two neurons: the
    operator is symmetric by construction, for any weights. Normalising by absolute degrees
    (self-loops included) keeps $\lVert \hat A \rVert_2 \le 1$, so the Taylor series of
    order $K$ is accurate to $t^{K+1}/(K+1)!$. Signed weights let the operator
    reflect the sign of the network's parameters.

    Cost: the edge MLP, $O(|\mathcal E| F^2)$, plus $K$ sparse products over
    the $P$ coalesced node pairs, $O(K P F)$ with $P \ll |\mathcal E|$ for
    convolution kernels.

    Args (`backbone_kwargs`):
        conv: `"uniconv"` ([`UnitaryConv`][graphspace.nn.conv.UnitaryConv], default) or `"lie"`
            ([`LieUnitaryConv`][graphspace.nn.conv.LieUnitaryConv], real orthogonal).
        heads: number of operators (default 4; must divide the width, twice for UniConv).
        order: Taylor order $K$ (default 10).
        t: UniConv time (default 1.0); `learn_t` to learn it.
        weight: UniConv weight type (`"dense"` default, `"unitary"`, `"identity"`).
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 conv: Literal["uniconv", "lie"] = "uniconv", heads: int = 4, order: int = 10,
                 t: float = 1.0, learn_t: bool = False,
                 weight: Literal["dense", "unitary", "identity"] = "dense") -> None:
        super().__init__()
        if conv not in ("uniconv", "lie"):
            raise ValueError(f"conv must be 'uniconv' or 'lie', got {conv!r}")
        per = 2 * heads if conv == "uniconv" else heads
        if heads < 1 or hidden % per:
            raise ValueError(f"hidden width {hidden} must be divisible by {per} "
                             f"(heads={heads}, conv={conv!r})")
        self.kind, self.heads, self.hidden = conv, heads, hidden
        self.edge_update = _EdgeUpdate(hidden, edge_channels, dropout=dropout)
        self.edge_weight = nn.Linear(edge_channels, heads)
        c = hidden // heads
        self.convs = nn.ModuleList(
            UnitaryConv(c // 2, c // 2, order=order, t=t, learn_t=learn_t, weight=weight,
                        normalize=False, add_self_loops=False) if conv == "uniconv"
            else LieUnitaryConv(c, c, complex=False, order=order, normalize=False,
                                add_self_loops=False)
            for _ in range(heads)
        )
        self.node_update = _mlp(2 * hidden, hidden, hidden, dropout)

    @staticmethod
    def make_state(hidden: int, edge_channels: int, **kwargs: Any) -> nn.Module:
        return SymmetricOperator()

    def reset_parameters(self) -> None:
        self.edge_update.reset_parameters()
        self.edge_weight.reset_parameters()
        for conv in self.convs:
            conv.reset_parameters()
        _reset_linears(self.node_update)

    def operator(self, edge_attr: Tensor, pairs: SymmetricPairs) -> Tensor:
        r"""Normalised symmetric weights $\hat A^{(h)}$ on `pairs.pair_index`,
        `(P + N, heads)`."""
        w = torch.tanh(self.edge_weight(edge_attr))
        p = pairs.num_pairs
        a = scatter(0.5 * torch.cat([w, w]), pairs.edge_to_pair, 0, p, "sum")
        n = pairs.pair_index.size(1) - p
        a = torch.cat([a, a.new_ones(n, self.heads)])
        row, col = pairs.pair_index[1], pairs.pair_index[0]
        deg = scatter(a.abs(), row, 0, n, "sum")  # >= 1 thanks to the self-loop
        inv_sqrt = deg.rsqrt()
        return inv_sqrt.index_select(0, row) * a * inv_sqrt.index_select(0, col)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                pairs: SymmetricPairs) -> tuple[Tensor, Tensor, SymmetricPairs]:
        e = self.edge_update(x, edge_index, edge_attr)
        ahat = self.operator(e, pairs)
        chunks = x.chunk(self.heads, dim=-1)
        z = torch.cat([conv(xh, pairs.pair_index, ahat[:, h])
                       for h, (conv, xh) in enumerate(zip(self.convs, chunks))], dim=-1)
        return x + self.node_update(torch.cat([x, z], dim=-1)), e, pairs

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(heads={self.heads}, conv={self.kind!r}, "
                f"{self.convs[0]})")


# --------------------------------------------------------------------------- subgraph


class EgoNets(NamedTuple):
    """The bag of 1-hop ego-networks of every node (state of the `subgraph` backbone).

    Bag node `v < N` is the (marked) root of the ego-net of node `v`; bag node `N + p`
    is the copy of node `member[p]` in the ego-net of `center[p]`.

    Attributes:
        node_map: `(N_bag,)` original node of each bag node.
        subgraph_id: `(N_bag,)` ego-net (= its root node) of each bag node.
        bag_batch: `(N_bag,)` network of each bag node.
        bag_edge_index: `(2, E_bag)` root-member edges and, for every triangle of the
            graph, the member-member edges it induces, both directions.
        edge_to_bag: `(E,)` for every edge `j -> i`, the bag node "copy of `j` in the
            ego-net of `i`" (`i` itself for a self-loop).
        num_nodes, num_graphs, num_triangles: sizes.
    """

    node_map: Tensor
    subgraph_id: Tensor
    bag_batch: Tensor
    bag_edge_index: Tensor
    edge_to_bag: Tensor
    num_nodes: int
    num_graphs: int
    num_triangles: int


def _triangles(u: Tensor, v: Tensor, n: int, chunk: int) -> Tensor:
    r"""All triangles of the simple undirected graph `{u_k, v_k}` (`u < v` unique) as
    `(T, 3)`, with the compact-forward algorithm: orient every edge from lower to higher
    (degree, id) rank and intersect out-neighbourhoods, scanning the shorter list of each
    edge ($O(\sum_{a \to b} \min(d^+_a, d^+_b)) \le O(U^{3/2})$ candidate checks,
    processed `chunk` at a time)."""
    device = u.device
    deg = torch.bincount(torch.cat([u, v]), minlength=n)
    ru, rv = deg[u] * n + u, deg[v] * n + v
    a = torch.where(ru < rv, u, v)
    b = torch.where(ru < rv, v, u)
    okey, order = torch.sort(a * n + b)
    a, b = a[order], b[order]
    dplus = torch.bincount(a, minlength=n)
    ptr = torch.cumsum(dplus, 0) - dplus
    s = torch.where(dplus[a] <= dplus[b], a, b)  # scan the shorter out-list
    o = torch.where(dplus[a] <= dplus[b], b, a)
    cnt = dplus[s]
    found: list[Tensor] = []
    ends = torch.cumsum(cnt, 0)
    start_edge = 0
    num_edges = a.numel()
    while start_edge < num_edges:
        base = int(ends[start_edge - 1]) if start_edge else 0
        stop = int(torch.searchsorted(ends, torch.tensor(base + chunk, device=device),
                                      right=True))
        stop = max(stop, start_edge + 1)
        sel = torch.arange(start_edge, min(stop, num_edges), device=device)
        c = cnt[sel]
        if int(c.sum()) > 0:
            rep = sel.repeat_interleave(c)
            first = (torch.cumsum(c, 0) - c).repeat_interleave(c)
            off = torch.arange(rep.numel(), device=device) - first
            third = b[ptr[s[rep]] + off]  # out-neighbour of the scanned end
            want = o[rep] * n + third
            pos = torch.searchsorted(okey, want).clamp_max(okey.numel() - 1)
            hit = okey[pos] == want
            found.append(torch.stack([a[rep[hit]], b[rep[hit]], third[hit]], dim=-1))
        start_edge = stop
    if not found:
        return torch.empty(0, 3, dtype=torch.long, device=device)
    return torch.cat(found)


class EgoNetBag(nn.Module):
    r"""Builds `EgoNets`, the bag of node-marked 1-hop ego-networks (ESAN's
    "ego-nets+" policy), once per forward pass (no parameters, no gradient).

    Parallel and reversed edges are coalesced first ($U$ distinct neighbour pairs);
    the bag has $N + 2U$ nodes and $4U + 6T$ edges ($T$ triangles), i.e.
    it is linear in the graph size for the nearly triangle-free parameter graphs of
    feed-forward networks, instead of the $O(N^2)$ of a node-marking or node-deletion
    bag. Deeper ego-nets are not offered: two hops around a neuron already span two full
    layers, so their bag grows like $N \cdot \text{width}^2$. Construction: sorting
    ($O(E \log E)$) and triangle listing (see `_triangles`).

    Args:
        chunk: candidate triangle checks processed at a time (bounds memory).
    """

    def __init__(self, chunk: int = 1 << 22) -> None:
        super().__init__()
        self.chunk = chunk

    @torch.no_grad()
    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                data: Any) -> EgoNets:
        n, device = x.size(0), x.device
        b = int(batch.max()) + 1 if n else 1
        src, dst = edge_index[0], edge_index[1]
        keep = src != dst
        lo = torch.minimum(src, dst)[keep]
        hi = torch.maximum(src, dst)[keep]
        und = torch.unique(lo * n + hi)
        u, v = und // n, und % n
        # directed member list, sorted by (center, member)
        mkey, _ = torch.sort(torch.cat([u * n + v, v * n + u]))
        center, member = mkey // n, mkey % n
        k = mkey.numel()
        roots = torch.arange(n, device=device)
        node_map = torch.cat([roots, member])
        subgraph_id = torch.cat([roots, center])

        def copy_of(c: Tensor, m: Tensor) -> Tensor:  # bag id of m's copy in ego(c), c != m
            return n + torch.searchsorted(mkey, c * n + m)

        copies = n + torch.arange(k, device=device)
        e_src = [center, copies]
        e_dst = [copies, center]
        tri = _triangles(u, v, n, self.chunk)
        for c, p, q in ((0, 1, 2), (1, 0, 2), (2, 0, 1)):
            bp, bq = copy_of(tri[:, c], tri[:, p]), copy_of(tri[:, c], tri[:, q])
            e_src += [bp, bq]
            e_dst += [bq, bp]
        bag_edge_index = torch.stack([torch.cat(e_src), torch.cat(e_dst)])
        edge_to_bag = torch.where(keep, copy_of(dst, src).clamp_max(n + k - 1) if k else dst,
                                  dst)
        return EgoNets(node_map, subgraph_id, batch[subgraph_id], bag_edge_index, edge_to_bag,
                       n, b, tri.size(0))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(hops=1, marking=True)"


@register_backbone("subgraph")
class SubgraphBlock(nn.Module):
    r"""A subgraph block: a SPEN-style layer (Mitton & Murray-Smith, TMLR 2023;
    [`SPENConv`][graphspace.nn.conv.SPENConv]) on the bag of node-marked 1-hop ego-networks
    (ESAN's ego-nets+ policy, Bevilacqua et al., ICLR 2022), built by `EgoNetBag`.

    For the copy of node $v$ in the ego-net of root $i$,

    $$
    \begin{aligned}
        \mathbf e' &= \mathbf e + \phi_e([\mathbf x_i \,\|\, \mathbf x_j \,\|\, \mathbf e]) \\
        \mathbf h_{i,v} &= \mathbf x_v + [v = i]\, \mathbf m
            + [v \ne i]\, \operatorname*{mean}_{(v \to i) \in \mathcal E} W_e \mathbf e'_{iv}
            \\
        \mathbf h'_{i,v} &= \sigma\big(\mathrm{SPEN}(\mathbf h)_{i,v}\big) \\
        \mathbf x'_v &= \mathbf x_v + \phi_h\big([\mathbf x_v \,\|\, \mathbf h'_{v,v} \,\|\,
            \operatorname*{mean}_{i : v \in \mathrm{ego}(i)} \mathbf h'_{i,v}]\big)
    \end{aligned}
    $$

    The root marker $\mathbf m$ is the node marking; the edges between root and member
    (all parallel kernel-entry edges, both directions) enter the member's features, so each
    ego-net sees the parameter values of its root. SPEN combines the message passing inside
    every ego-net with pooling within the ego-net, over the copies of a node and over the
    bag; the readout uses the root copy and the mean over the copies. Every step is
    equivariant to node permutations (and invariant to the order of the ego-nets).

    Cost: the edge MLP $O(|\mathcal E| F^2)$ plus SPEN on $N + 2U$ bag nodes and
    $4U + 6T$ bag edges, $O((N + U + T) F^2)$ ($U$ distinct neighbour
    pairs, $T$ triangles; see `EgoNetBag`).

    Args (`backbone_kwargs`):
        aggr: SPEN pooling, `"mean"` (default) or `"sum"`.
        bag_term: SPEN's pooled-over-the-bag term (default `True`).
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 aggr: Literal["mean", "sum"] = "mean", bag_term: bool = True) -> None:
        super().__init__()
        self.edge_update = _EdgeUpdate(hidden, edge_channels, dropout=dropout)
        self.edge_in = nn.Linear(edge_channels, hidden, bias=False)
        self.marker = nn.Parameter(torch.empty(hidden))
        self.conv = SPENConv(hidden, hidden, aggr=aggr, bag_term=bag_term)
        self.act = nn.SiLU()
        self.node_update = _mlp(3 * hidden, hidden, hidden, dropout)
        self.reset_parameters()

    @staticmethod
    def make_state(hidden: int, edge_channels: int, **kwargs: Any) -> nn.Module:
        return EgoNetBag()

    def reset_parameters(self) -> None:
        self.edge_update.reset_parameters()
        self.edge_in.reset_parameters()
        nn.init.normal_(self.marker, 0.0, 1.0 / math.sqrt(self.marker.numel()))
        self.conv.reset_parameters()
        _reset_linears(self.node_update)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                bag: EgoNets) -> tuple[Tensor, Tensor, EgoNets]:
        n = bag.num_nodes
        n_bag = bag.node_map.numel()
        e = self.edge_update(x, edge_index, edge_attr)
        eta = scatter(self.edge_in(e), bag.edge_to_bag, 0, n_bag, "mean")
        is_root = (torch.arange(n_bag, device=x.device) < n).unsqueeze(-1).to(x.dtype)
        h = x.index_select(0, bag.node_map) + eta + is_root * self.marker
        h = self.act(self.conv(h, bag.bag_edge_index, bag.node_map, bag.subgraph_id,
                               bag.bag_batch, n, n, bag.num_graphs))
        pooled = bag_to_nodes(h, bag.node_map, n, "mean")
        return x + self.node_update(torch.cat([x, h[:n], pooled], dim=-1)), e, bag

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(ego_hops=1, {self.conv})"


# --------------------------------------------------------------------------- gump, connection
# (issue 18 item 4: the GUMP and connection-sheaf backbones; one block, kept together)

from graphspace.nn.conv.sheaf_conv import ConnectionSheafConv  # noqa: E402
from graphspace.nn.conv.unitary_conv import (  # noqa: E402
    GUMPConv,
    LineDigraph,
    gump_arcs,
    line_digraph,
)


class ArcStructure(NamedTuple):
    """The arcs of a batch's parameter graph (state of the `gump` backbone).

    Attributes:
        arc_index: `(2, A)` coalesced, bidirected, loop-free node pairs (`gump_arcs`).
        edge_to_arc: `(E,)`: the arc of every edge `j -> i` (`-1` for a self-loop).
        structure: the line digraph of the arcs (`line_digraph`).
    """

    arc_index: Tensor
    edge_to_arc: Tensor
    structure: LineDigraph


class ArcEncoder(nn.Module):
    """Computes `ArcStructure` once per forward pass (no parameters, no gradient)."""

    @torch.no_grad()
    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                data: Any) -> ArcStructure:
        n = x.size(0)
        arcs = gump_arcs(edge_index, n)
        key = arcs[0] * n + arcs[1]  # coalesced: sorted
        src, dst = edge_index[0], edge_index[1]
        pos = torch.searchsorted(key, src * n + dst).clamp_max(max(key.numel() - 1, 0))
        edge_to_arc = torch.where(src == dst, torch.full_like(pos, -1), pos)
        return ArcStructure(arcs, edge_to_arc, line_digraph(arcs, n))


@register_backbone("gump")
class GUMPBlock(nn.Module):
    r"""A Graph Unitary Message Passing block (Qiu, Bian & Yao, 2024) on the parameter graph.

    Every parameter edge $j \to i$ belongs to the arc $j \to i$ of the bidirected, coalesced
    neuron graph (`gump_arcs`; parallel kernel-entry edges share an arc). An arc carries
    $\mathbf h_{u \to v} = W_{in}[\mathbf x_u \,\|\, \mathbf x_v \,\|\,
    \bar{\mathbf e}_{u \to v}]$ with $\bar{\mathbf e}$ the mean of its (updated) edge
    features; `GUMPConv` propagates it with the unitary adjacency of the line digraph, and
    the arcs are pooled back to their head neurons:
    $$\mathbf e' = \mathbf e + \phi_e([\mathbf x_i \| \mathbf x_j \| \mathbf e]), \qquad
      \mathbf x'_v = \mathbf x_v + \phi_h\Big(\Big[\mathbf x_v \,\Big\|\,
      \tfrac{1}{d_v}\sum_{u \to v} (\mathbf U \mathbf H W)_{u \to v}\Big]\Big).$$
    Node relabelings permute arcs and line edges, under which the polar factor is
    equivariant, so the block is invariant to hidden-neuron permutations.

    Args (`backbone_kwargs`):
        projection: `"svd"` (default) or `"newton_schulz"`.
        grover_prior: add the Grover coin before projecting (default `True`).
        attention_channels: width of the attention score (default: the hidden width).
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 projection: Literal["svd", "newton_schulz"] = "svd", grover_prior: bool = True,
                 attention_channels: int | None = None) -> None:
        super().__init__()
        self.edge_update = _EdgeUpdate(hidden, edge_channels, dropout=dropout)
        self.arc_in = nn.Linear(2 * hidden + edge_channels, hidden)
        self.conv = GUMPConv(hidden, hidden, attention_channels=attention_channels,
                             projection=projection, grover_prior=grover_prior)
        self.node_update = _mlp(2 * hidden, hidden, hidden, dropout)

    @staticmethod
    def make_state(hidden: int, edge_channels: int, **kwargs: Any) -> nn.Module:
        return ArcEncoder()

    def reset_parameters(self) -> None:
        self.edge_update.reset_parameters()
        self.arc_in.reset_parameters()
        self.conv.reset_parameters()
        _reset_linears(self.node_update)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                arcs: ArcStructure) -> tuple[Tensor, Tensor, ArcStructure]:
        n, a = x.size(0), arcs.arc_index.size(1)
        e = self.edge_update(x, edge_index, edge_attr)
        keep = arcs.edge_to_arc >= 0
        e_arc = scatter(e[keep], arcs.edge_to_arc[keep], 0, a, "mean")
        src, dst = arcs.arc_index[0], arcs.arc_index[1]
        h = self.arc_in(torch.cat([x.index_select(0, src), x.index_select(0, dst), e_arc], -1))
        h = self.conv(h, arcs.arc_index, arcs.structure)
        pooled = scatter(h, dst, 0, n, "mean")
        return x + self.node_update(torch.cat([x, pooled], dim=-1)), e, arcs

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.conv})"


@register_backbone("connection_sheaf")
class ConnectionSheafBlock(nn.Module):
    r"""Sheaf diffusion on the connection Laplacian (Barbero et al., 2022) of the neuron
    graph, with restriction maps from local PCA of the current node features.

    The edge features enter through an edge update and a mean of their projections at each
    target neuron; the connection Laplacian $\Delta_{conn}$ is then built from those node
    features (`ConnectionLaplacian`, no gradient; gauge invariant) and drives the NSD update
    of `ConnectionSheafConv`:
    $$\mathbf e' = \mathbf e + \phi_e([\mathbf x_i \| \mathbf x_j \| \mathbf e]), \qquad
      \mathbf h_i = \mathbf x_i + \operatorname{mean}_{j \to i} V \mathbf e'_{ij}, \qquad
      X' = (1 + \tanh\varepsilon) \odot H - \sigma\big(\Delta_{conn}(H)\,(I \otimes W_1)
      H W_2\big).$$
    Neighbourhoods are the neuron's distinct graph neighbours only (`min_neighbors=0`, so
    networks batched together never exchange neighbours); choose `stalk_dim` at most the
    smallest neuron degree (default 2) so every local basis is determined by the data.

    Args (`backbone_kwargs`):
        stalk_dim: $d$ (default 2; must divide the hidden width).
        augmented, left_weights, right_weights, epsilon, act: as in `ConnectionSheafConv`.
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 stalk_dim: int = 2, augmented: bool = True, left_weights: bool = True,
                 right_weights: bool = True, epsilon: bool = True, act: str = "elu") -> None:
        super().__init__()
        self.edge_update = _EdgeUpdate(hidden, edge_channels, dropout=dropout)
        self.edge_in = nn.Linear(edge_channels, hidden, bias=False)
        self.conv = ConnectionSheafConv(hidden, hidden, stalk_dim=stalk_dim, augmented=augmented,
                                        min_neighbors=0, left_weights=left_weights,
                                        right_weights=right_weights, epsilon=epsilon, act=act,
                                        dropout=dropout)

    def reset_parameters(self) -> None:
        self.edge_update.reset_parameters()
        self.edge_in.reset_parameters()
        self.conv.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor,
                batch: Tensor) -> tuple[Tensor, Tensor]:
        e = self.edge_update(x, edge_index, edge_attr)
        h = x + scatter(self.edge_in(e), edge_index[1], 0, x.size(0), "mean")
        return self.conv(h, edge_index), e

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.conv})"


# --------------------------------------------------------------------------- ds / dss (ESAN)
# Two ego-net bag builders exist (`data.subgraph_transforms.ToSubgraphBag(policy="ego")` for
# datasets, `EgoNetBag` here for parameter graphs); consolidating them is left to a later
# issue.


def subsample_bag(bag: EgoNets, fraction: float | None = None, k: int | None = None,
                  generator: torch.Generator | None = None) -> EgoNets:
    r"""ESAN's stochastic bag subsampling (Bevilacqua et al., ICLR 2022, sec. 5): keep, in
    every graph, a uniformly random subset of its $m_g$ ego-nets, $\lceil f\, m_g \rceil$ of
    them (`fraction` $f$) or $\min(k, m_g)$ (`k`).

    The kept ego-nets keep all their bag nodes and bag edges (re-indexed); an edge of the
    original graph whose target's ego-net is dropped gets `edge_to_bag = -1`. The subgraph
    ids stay those of the full bag (the root node of each ego-net).

    Args:
        bag: the full bag of `EgoNetBag`.
        fraction: the fraction of ego-nets per graph to keep, in $(0, 1]$.
        k: the number of ego-nets per graph to keep (exclusive with `fraction`).
        generator: random generator (default: the global one).

    Returns:
        The sub-bag, as an `EgoNets`.
    """
    if (fraction is None) == (k is None):
        raise ValueError("subsample_bag: give exactly one of fraction and k")
    n = bag.num_nodes
    device = bag.node_map.device
    graph = bag.bag_batch[:n]  # graph of every ego-net (= of its root)
    size = torch.bincount(graph, minlength=bag.num_graphs)
    keep_n = (torch.ceil(size.double() * fraction).long() if fraction is not None
              else size.clamp(max=k))
    # a random rank of every ego-net inside its graph
    score = torch.rand(n, generator=generator, device=device if generator is None else
                       generator.device).to(device)
    order = torch.argsort(graph.double() * 2.0 + score)
    start = torch.cumsum(size, 0) - size
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device) - start[graph[order]]
    kept_net = rank < keep_n[graph]  # (n,) per ego-net (indexed by root)
    kept_node = kept_net[bag.subgraph_id]  # (N_bag,)
    new_id = torch.cumsum(kept_node.long(), 0) - 1
    e_keep = kept_node[bag.bag_edge_index[0]]
    bag_edge_index = new_id[bag.bag_edge_index[:, e_keep]]
    edge_to_bag = torch.where(kept_node[bag.edge_to_bag], new_id[bag.edge_to_bag],
                              torch.full_like(bag.edge_to_bag, -1))
    return EgoNets(bag.node_map[kept_node], bag.subgraph_id[kept_node],
                   bag.bag_batch[kept_node], bag_edge_index, edge_to_bag, n, bag.num_graphs,
                   bag.num_triangles)


class ESANBag(EgoNetBag):
    r"""`EgoNetBag` with ESAN's bag subsampling: in training, every forward pass keeps a
    random `fraction` (or `k`) of the ego-nets of every graph (`subsample_bag`); in
    evaluation, all of them, unless voting (`esan_vote`) switches sampling on.

    Args:
        fraction: fraction of ego-nets kept per graph in training (default: all).
        k: number of ego-nets kept per graph in training (exclusive with `fraction`).
        chunk: see `EgoNetBag`.
    """

    def __init__(self, fraction: float | None = None, k: int | None = None,
                 chunk: int = 1 << 22) -> None:
        super().__init__(chunk)
        if fraction is not None and k is not None:
            raise ValueError("ESANBag: give at most one of fraction and k")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"ESANBag: fraction must lie in (0, 1], got {fraction}")
        if k is not None and k < 1:
            raise ValueError(f"ESANBag: k must be at least 1, got {k}")
        self.fraction, self.k = fraction, k
        self.sample_at_eval = False
        self.generator: torch.Generator | None = None

    @torch.no_grad()
    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                data: Any) -> EgoNets:
        bag = super().forward(x, edge_index, edge_attr, batch, data)
        sampling = self.training or self.sample_at_eval
        if sampling and (self.fraction is not None or self.k is not None):
            bag = subsample_bag(bag, self.fraction, self.k, self.generator)
        return bag

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(hops=1, fraction={self.fraction}, k={self.k})"


@torch.no_grad()
def esan_vote(model: nn.Module, data: Any, num_votes: int = 5,
              generator: torch.Generator | None = None) -> Tensor:
    """ESAN's inference by voting: the mean of `num_votes` evaluation-mode predictions, each
    on a freshly subsampled bag (the `fraction` / `k` of the model's `ESANBag`).

    Args:
        model: a `GraphMetaNetwork` with a `ds` or `dss` backbone.
        data: the batch.
        num_votes: number of sampled bags.
        generator: random generator of the bag samples (default: the global one).

    Returns:
        The averaged prediction.
    """
    bags = [m for m in model.modules() if isinstance(m, ESANBag)]
    if not bags:
        raise ValueError("esan_vote: the model has no ESANBag (use backbone='ds' or 'dss')")
    if num_votes < 1:
        raise ValueError(f"esan_vote: num_votes must be at least 1, got {num_votes}")
    was_training = model.training
    model.eval()
    for b in bags:
        b.sample_at_eval, b.generator = True, generator
    try:
        return torch.stack([model(data) for _ in range(num_votes)]).mean(0)
    finally:
        for b in bags:
            b.sample_at_eval, b.generator = False, None
        model.train(was_training)


class _BagBlock(nn.Module):
    r"""Shared by the `ds` and `dss` blocks: bag features from the node features, the
    edges into each ego-net's root and a root marker (as in `SubgraphBlock`), one bag
    layer, and the mean over the kept copies of every node back to the nodes:

    $$\mathbf h_{i,v} = \mathbf x_v + [v = i]\,\mathbf m + [v \ne i]\,
    \mathrm{mean}_{(v \to i)} W_e \mathbf e'_{iv}, \quad
    \mathbf x'_v = \mathbf x_v + \phi_h([\mathbf x_v \,\|\, \mathrm{mean}_{i : v \in
    \mathrm{ego}(i)} \sigma(L(\mathbf h))_{i,v}])$$
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float, conv: nn.Module) -> None:
        super().__init__()
        self.edge_update = _EdgeUpdate(hidden, edge_channels, dropout=dropout)
        self.edge_in = nn.Linear(edge_channels, hidden, bias=False)
        self.marker = nn.Parameter(torch.empty(hidden))
        self.conv = conv
        self.act = nn.SiLU()
        self.node_update = _mlp(2 * hidden, hidden, hidden, dropout)
        self.reset_parameters()

    @staticmethod
    def make_state(hidden: int, edge_channels: int, fraction: float | None = None,
                   k: int | None = None, **kwargs: Any) -> nn.Module:
        return ESANBag(fraction, k)

    def reset_parameters(self) -> None:
        self.edge_update.reset_parameters()
        self.edge_in.reset_parameters()
        nn.init.normal_(self.marker, 0.0, 1.0 / math.sqrt(self.marker.numel()))
        self.conv.reset_parameters()
        _reset_linears(self.node_update)

    def _bag_features(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor,
                      bag: EgoNets) -> tuple[Tensor, Tensor]:
        n_bag = bag.node_map.numel()
        e = self.edge_update(x, edge_index, edge_attr)
        slot = torch.where(bag.edge_to_bag >= 0, bag.edge_to_bag,
                           torch.full_like(bag.edge_to_bag, n_bag))  # dropped: a spare row
        eta = scatter(self.edge_in(e), slot, 0, n_bag + 1, "mean")[:n_bag]
        is_root = (bag.node_map == bag.subgraph_id).unsqueeze(-1).to(x.dtype)
        return x.index_select(0, bag.node_map) + eta + is_root * self.marker, e

    def _readout(self, x: Tensor, h: Tensor, bag: EgoNets) -> Tensor:
        pooled = bag_to_nodes(self.act(h), bag.node_map, bag.num_nodes, "mean")
        return x + self.node_update(torch.cat([x, pooled], dim=-1))


@register_backbone("ds")
class DSBlock(_BagBlock):
    r"""A DS-GNN block (ESAN, Bevilacqua et al., ICLR 2022, eq. 3) on the bag of
    node-marked 1-hop ego-networks: `DSConv(GraphConv)` applies one shared layer to every
    ego-net independently (see `_BagBlock` for the bag features and the readout).

    Args (`backbone_kwargs`):
        fraction: ESAN subsampling, fraction of ego-nets kept per graph in training
            (default: all; see `ESANBag`, `esan_vote`).
        k: ESAN subsampling, number of ego-nets kept per graph in training.
        aggr: neighbourhood aggregation of the `GraphConv`, `"mean"` (default) or `"sum"`.
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 fraction: float | None = None, k: int | None = None,
                 aggr: Literal["mean", "sum"] = "mean") -> None:
        super().__init__(hidden, edge_channels, dropout,
                         DSConv(GraphConv(hidden, hidden, aggr=aggr)))

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                bag: EgoNets) -> tuple[Tensor, Tensor, EgoNets]:
        h, e = self._bag_features(x, edge_index, edge_attr, bag)
        return self._readout(x, self.conv(h, bag.bag_edge_index), bag), e, bag

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(ego_hops=1, {self.conv})"


@register_backbone("dss")
class DSSBlock(_BagBlock):
    r"""A DSS-GNN block (ESAN, Bevilacqua et al., ICLR 2022, eq. 4) on the bag of
    node-marked 1-hop ego-networks: `DSSConv(GraphConv)`, a shared layer on every ego-net
    plus a layer on the original graph of the features pooled over each node's copies
    (see `_BagBlock` for the bag features and the readout).

    Args (`backbone_kwargs`):
        fraction: ESAN subsampling, fraction of ego-nets kept per graph in training
            (default: all; see `ESANBag`, `esan_vote`).
        k: ESAN subsampling, number of ego-nets kept per graph in training.
        aggr: neighbourhood aggregation of both `GraphConv`s and the pooling over copies,
            `"mean"` (default) or `"sum"`.
    """

    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 fraction: float | None = None, k: int | None = None,
                 aggr: Literal["mean", "sum"] = "mean") -> None:
        super().__init__(hidden, edge_channels, dropout,
                         DSSConv(GraphConv(hidden, hidden, aggr=aggr), aggr=aggr))

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                bag: EgoNets) -> tuple[Tensor, Tensor, EgoNets]:
        h, e = self._bag_features(x, edge_index, edge_attr, bag)
        h = self.conv(h, bag.bag_edge_index, bag.node_map, edge_index, bag.num_nodes)
        return self._readout(x, h, bag), e, bag

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(ego_hops=1, {self.conv})"
