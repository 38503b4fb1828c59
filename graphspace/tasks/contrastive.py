r"""Graph contrastive pre-training (GRACE) with the optional POT regulariser, and linear probing.

**GRACE** (Zhu et al. 2020, "Deep Graph Contrastive Representation Learning",
[arXiv:2006.04131](https://arxiv.org/abs/2006.04131)): two views
$\tilde G_1, \tilde G_2$ of a graph are drawn with random augmentations (edge dropping,
feature masking, or any callable, e.g. weight-space augmentations for parameter graphs), encoded
by a shared GNN $f$ and projected by an MLP $g$. With
$\mathbf{u}_i = g(f(\tilde G_1))_i$, $\mathbf{v}_i = g(f(\tilde G_2))_i$ and
$\theta(\mathbf{a}, \mathbf{b}) = \cos(\mathbf{a}, \mathbf{b})$, the loss of the positive
pair $(\mathbf{u}_i, \mathbf{v}_i)$ has inter-view *and* intra-view negatives (GRACE eq. 1):

$$
\ell(\mathbf{u}_i, \mathbf{v}_i) = -\log
\frac{e^{\theta(\mathbf{u}_i, \mathbf{v}_i)/\tau}}
     {e^{\theta(\mathbf{u}_i, \mathbf{v}_i)/\tau}
      + \sum_{k \ne i} e^{\theta(\mathbf{u}_i, \mathbf{v}_k)/\tau}
      + \sum_{k \ne i} e^{\theta(\mathbf{u}_i, \mathbf{u}_k)/\tau}},
\qquad
\mathcal{J} = \frac{1}{2N} \sum_{i=1}^{N}
\big[\ell(\mathbf{u}_i, \mathbf{v}_i) + \ell(\mathbf{v}_i, \mathbf{u}_i)\big]
\quad \text{(eq. 2)}.
$$

At node level the $N$ samples are the nodes of a batch; at graph level they are the graphs
of a batch (one embedding per graph, e.g. one per network for parameter graphs).

**POT** (Yu et al. 2023, "Provable Training for Graph Contrastive Learning", NeurIPS,
[arXiv:2309.13944](https://arxiv.org/abs/2309.13944)): with $\mathbf{z}_{1,i}$ the
encoder output of node $i$ in view 1 and $\bar{\mathbf{z}}_{2,j}$ the normalised
outputs of view 2, the *GCL principle* asks the positive similarity to beat the mean negative
one, $\mathbf{z}_{1,i}^\top \mathbf{w}_i \ge 0$ with
$\mathbf{w}_i = \bar{\mathbf{z}}_{2,i} - \frac{1}{N-1} \sum_{j \ne i} \bar{\mathbf{z}}_{2,j}$.
The *node compactness* is its worst case over the augmentation's perturbation set
$\mathcal{G}_1$,

$$
\tilde f_{1,i} = \min_{\tilde G \in \mathcal{G}_1} \mathbf{w}_i^\top f(\tilde G)_i,
$$

lower-bounded by bound propagation through the 2-layer GCN
$f = \sigma(\hat A\,\sigma(\hat A X W_1 + b_1) W_2 + b_2)$: interval bounds on every
pre-activation, then linear (CROWN) relaxations of $\sigma$ propagated backwards from
$\mathbf{w}_i$ (see [`gcn_node_compactness`][graphspace.tasks.contrastive.gcn_node_compactness]).
POT adds the binary cross-entropy of the compactness with target 1 to the contrastive loss,

$$
\mathcal{L} = (1 - \kappa)\,\mathcal{J}
+ \frac{\kappa}{2}\big[\mathcal{L}_{POT}(\tilde G_1) + \mathcal{L}_{POT}(\tilde G_2)\big],
\qquad \mathcal{L}_{POT}(\tilde G_1) = -\frac{1}{N} \sum_i \log \operatorname{sigmoid}
(\tilde f_{1,i}).
$$

Evaluation: a linear probe (multinomial logistic regression, L-BFGS, on standardised frozen
encoder outputs) trained on the `train_mask` samples and scored on `val_mask` /
`test_mask` at the end of every validation / test epoch.

Run it with `graphspace fit --config experiments/contrastive_sbm.yaml`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn.models import GCN
from torch_geometric.utils import dropout_edge, mask_feature

from graphspace.ops import scatter
from graphspace.tasks.outputs import PredictionsFile

Transform = Callable[[Any], Any]
LEVELS = ("node", "graph")
POT_BOUNDS = ("view", "set")


# ---------------------------------------------------------------------------------------------
# augmentations
# ---------------------------------------------------------------------------------------------
def _select_edges(data: Any, keep: Tensor) -> Any:
    """A shallow copy of `data` keeping the edges where `keep` is true (every edge-level
    attribute is filtered, e.g. `edge_attr`, `edge_type`)."""
    out = copy.copy(data)
    idx = keep.nonzero().view(-1)
    for key, value in data.items():
        if not isinstance(value, Tensor) or key == "edge_index":
            continue
        if "edge" in key or (data.is_edge_attr(key) and not data.is_node_attr(key)):
            out[key] = value.index_select(data.__cat_dim__(key, value), idx)
    out.edge_index = data.edge_index.index_select(1, idx)
    return out


class DropEdges:
    r"""Remove every edge independently with probability `p` (GRACE's "removing edges"), by
    PyG's `torch_geometric.utils.dropout_edge`; every edge-level attribute (`edge_attr`,
    `edge_type`, ...) is filtered with the edges.

    Args:
        p: drop probability, in $[0, 1)$ (default 0.2).
        force_undirected: drop both directions of an undirected edge together (default
            `False`, like GRACE, which drops directed entries independently). The draw is made
            once per unordered pair $\{i, j\}$ (PyG's own `force_undirected` would instead
            rebuild the reverse direction, copying the forward edge's attributes and
            duplicating self-loops), so edge order and attributes are kept.
    """

    def __init__(self, p: float = 0.2, force_undirected: bool = False) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must lie in [0, 1), got {p}")
        self.p = p
        self.force_undirected = force_undirected

    def __call__(self, data: Any) -> Any:
        ei = data.edge_index
        if self.force_undirected:
            n = int(data.num_nodes)
            lo, hi = torch.minimum(ei[0], ei[1]), torch.maximum(ei[0], ei[1])
            uniq, inv = torch.unique(lo * n + hi, return_inverse=True)
            pairs = torch.stack([uniq // n, uniq % n])
            _, keep_pair = dropout_edge(pairs, p=self.p)
            keep = keep_pair[inv]
        else:
            _, keep = dropout_edge(ei, p=self.p)
        return _select_edges(data, keep)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, force_undirected={self.force_undirected})"


class MaskFeatures:
    r"""Zero each feature dimension (column of `attr`) with probability `p`, for all nodes at
    once (GRACE's "masking node features"), by PyG's `torch_geometric.utils.mask_feature`
    (`mode="col"`).

    Args:
        p: masking probability, in $[0, 1]$ (default 0.3).
        attr: the attribute to mask (default `"x"`; `"edge_attr"` masks edge feature
            dimensions; a 1-D attribute has one dimension per entry).
    """

    def __init__(self, p: float = 0.3, attr: str = "x") -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = p
        self.attr = attr

    def __call__(self, data: Any) -> Any:
        out = copy.copy(data)
        value = data[self.attr]
        flat = value.reshape(-1, value.size(-1)) if value.dim() != 1 else value.view(1, -1)
        masked, _ = mask_feature(flat, p=self.p, mode="col")
        out[self.attr] = masked.view(value.shape)
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, attr={self.attr!r})"


class GaussianNoise:
    r"""Add Gaussian noise $\epsilon \sim \mathcal{N}(0, (s\,\sigma_a)^2)$ to an
    attribute, $\sigma_a$ its standard deviation when `relative` (for parameter graphs,
    `attr="edge_attr"` perturbs the weights).

    Args:
        std (float): noise scale $s$ (default 0.05).
        attr (str): the attribute (default `"edge_attr"`).
        relative (bool): scale by the attribute's standard deviation (default `True`).
    """

    def __init__(self, std: float = 0.05, attr: str = "edge_attr", relative: bool = True) -> None:
        self.std = std
        self.attr = attr
        self.relative = relative

    def __call__(self, data: Any) -> Any:
        out = copy.copy(data)
        value = data[self.attr]
        scale = self.std * (value.std() if self.relative and value.numel() > 1 else 1.0)
        out[self.attr] = value + scale * torch.randn_like(value)
        return out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(std={self.std}, attr={self.attr!r}, "
                f"relative={self.relative})")


def _apply(transforms: Sequence[Transform], data: Any) -> Any:
    out = copy.copy(data)
    for t in transforms:
        out = t(out)
    return out


# ---------------------------------------------------------------------------------------------
# encoder and loss
# ---------------------------------------------------------------------------------------------
def _activation(name: str, channels: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(channels)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    raise ValueError(f"unknown activation {name!r}; choose relu, prelu or leaky_relu")


class GCNEncoder(GCN):
    r"""GRACE's encoder: a stack of GCN layers (Kipf & Welling 2017), each followed by the
    activation, $H^{(l)} = \sigma(\hat A H^{(l-1)} W_l + b_l)$ with
    $\hat A = \tilde D^{-1/2} (A + I) \tilde D^{-1/2}$.

    PyG's `torch_geometric.nn.models.GCN` with one activation module per layer: the layers,
    their initialisation and `reset_parameters` are PyG's; `forward` differs from `GCN`'s in
    applying the activation after the last layer too (GRACE does, `GCN` does not) and in using
    a separate activation per layer (`PReLU` has one slope per channel; POT's bound reads the
    slopes of `acts[0]` and `acts[1]`).

    Args:
        in_channels: input feature size (`-1` for lazy initialisation).
        out_channels: embedding size.
        hidden_channels: hidden size (default `2 * out_channels` as in GRACE).
        num_layers: GCN layers (default 2; POT's bound needs 2).
        activation: `"relu"` (default), `"prelu"` or `"leaky_relu"`.

    Shapes:
        - input: node features $(N, F_{in})$, edge indices $(2, E)$.
        - output: $(N, F_{out})$.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int | None = None,
                 num_layers: int = 2, activation: str = "relu") -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        hidden = hidden_channels or 2 * out_channels
        super().__init__(in_channels, hidden, num_layers, out_channels=out_channels, act=None)
        self.activation = activation
        dims = [hidden] * (num_layers - 1) + [out_channels]
        self.acts = nn.ModuleList(_activation(activation, b) for b in dims)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for act in self.acts:
            if isinstance(act, nn.PReLU):
                act.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor,  # type: ignore[override]
                edge_weight: Tensor | None = None) -> Tensor:
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x, edge_index, edge_weight))
        return x

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"num_layers={len(self.convs)}, activation={self.activation!r})")


class ProjectionHead(nn.Module):
    r"""GRACE's projection $g(\mathbf{z}) = W^{(2)} \operatorname{ELU}(W^{(1)} \mathbf{z})$
    (with biases)."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int | None = None
                 ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden_channels)
        self.fc2 = nn.Linear(hidden_channels, out_channels or in_channels)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, z: Tensor) -> Tensor:
        return self.fc2(F.elu(self.fc1(z)))


def nt_xent(h1: Tensor, h2: Tensor, tau: float = 0.5, symmetric: bool = True) -> Tensor:
    r"""GRACE's InfoNCE / NT-Xent loss with inter- and intra-view negatives (eqs. 1-2).

    `h1[i]` and `h2[i]` are the positive pair; every other row of `h2` (inter-view) and of
    `h1` (intra-view) is a negative. Computed in log space (`logsumexp`).

    Args:
        h1, h2: $(N, D)$ projections of the two views.
        tau: temperature $\tau$.
        symmetric: average $\ell(u_i, v_i)$ and $\ell(v_i, u_i)$ (default) or use
            only the first.

    Returns:
        The mean loss (a scalar).
    """
    if h1.shape != h2.shape or h1.dim() != 2:
        raise ValueError(f"h1 and h2 must be (N, D) of equal shape, got {h1.shape}, {h2.shape}")

    def semi(a: Tensor, b: Tensor) -> Tensor:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        between = a @ b.t() / tau
        refl = (a @ a.t() / tau).masked_fill(
            torch.eye(a.size(0), dtype=torch.bool, device=a.device), float("-inf"))
        return torch.logsumexp(torch.cat([between, refl], dim=1), dim=1) - between.diagonal()

    loss = semi(h1, h2)
    if symmetric:
        loss = 0.5 * (loss + semi(h2, h1))
    return loss.mean()


# ---------------------------------------------------------------------------------------------
# POT: node compactness by bound propagation
# ---------------------------------------------------------------------------------------------
def compactness_targets(z_other: Tensor) -> Tensor:
    r"""$\mathbf{w}_i = \bar{\mathbf{z}}_i - \frac{1}{N-1}\sum_{j \ne i} \bar{\mathbf{z}}_j$
    for the other view's outputs $\mathbf{z}$ ($\bar{\cdot}$ = L2-normalised)."""
    n = z_other.size(0)
    if n < 2:
        raise ValueError("compactness needs at least two samples")
    zn = F.normalize(z_other, dim=-1)
    return (zn * n - zn.sum(0, keepdim=True)) / (n - 1)


def _in_degree(edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> Tensor:
    ones = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    return scatter(ones, edge_index[1], 0, num_nodes, "sum")


def edge_drop_budget(edge_index: Tensor, num_nodes: int, drop_rate: float) -> Tensor:
    r"""POT's per-node edge-dropping budget ("local changes"):
    $\delta_i = \min(\max(d_i - 1, 0), \operatorname{round}(p\, d_i))$ with $d_i$
    the in-degree without self-loops (at least one neighbour is always kept)."""
    ei = edge_index[:, edge_index[0] != edge_index[1]]
    deg = _in_degree(ei, num_nodes, torch.float64)
    return torch.minimum((deg - 1).clamp_min(0), torch.round(drop_rate * deg)).long()


def _slope(act: nn.Module, channels: int, like: Tensor) -> Tensor:
    """Negative-side slope `a` of a (leaky / parametric) ReLU, per channel."""
    if isinstance(act, nn.ReLU):
        a = torch.zeros(channels, dtype=like.dtype, device=like.device)
    elif isinstance(act, nn.LeakyReLU):
        a = torch.full((channels,), float(act.negative_slope), dtype=like.dtype,
                       device=like.device)
    elif isinstance(act, nn.PReLU):
        a = act.weight.to(like.dtype).expand(channels)
    else:
        raise TypeError(f"POT bound supports ReLU, LeakyReLU and PReLU, got {type(act).__name__}")
    if bool(((a < 0) | (a > 1)).any()):
        raise ValueError("POT bound needs activation slopes in [0, 1] (a convex, monotone "
                         "piecewise-linear activation)")
    return a


def _leaky(v: Tensor, a: Tensor) -> Tensor:
    return torch.where(v >= 0, v, a * v)


def _relax(lo: Tensor, up: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    r"""Linear bounds $s v \le \sigma(v) \le s v + \beta$ on $[l, u]$ for
    $\sigma(v) = \max(v, a v)$, $0 \le a \le 1$: exact on stable neurons; on unstable
    ones $s$ is the chord slope $(u - a l)/(u - l)$ (a line through the origin with a
    slope in $[a, 1]$ is below a convex $\sigma$) and $\beta$ the chord's
    intercept $(a - 1) u l / (u - l)$."""
    pos, neg = lo >= 0, up <= 0
    width = (up - lo).clamp_min(torch.finfo(lo.dtype).tiny)
    s_chord = (up - a * lo) / width
    b_chord = (a - 1) * up * lo / width
    s = torch.where(pos, torch.ones_like(lo), torch.where(neg, a.expand_as(lo), s_chord))
    beta = torch.where(pos | neg, torch.zeros_like(lo), b_chord)
    return s, beta


def _pos(t: Tensor) -> Tensor:
    return t.clamp_min(0)


def _neg(t: Tensor) -> Tensor:
    return t.clamp_max(0)


def gcn_node_compactness(
    encoder: GCNEncoder,
    x: Tensor,
    edge_index: Tensor,
    target: Tensor,
    budget: Tensor,
    feature_masking: bool = False,
    view: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    r"""Lower bounds of POT's node compactness for a 2-layer
    [`GCNEncoder`][graphspace.tasks.contrastive.GCNEncoder].

    The perturbation set $\mathcal{G}$ of the clean graph $(X, A)$: any graph that
    removes at most `budget[i]` $=\delta_i$ incoming edges of every node $i$
    (self-loops stay) and, if `feature_masking`, sets any entries of $X$ to zero.
    The score of node $i$ is $s_i(\tilde G) = \mathbf{w}_i^\top f(\tilde G)_i$ with
    `target` $= W_{CL} = [\mathbf{w}_i]$.

    1. **Adjacency bounds.** With $\tilde d_i = d_i + 1$, every
       $\hat A'\in\mathcal{G}$ has $\hat A'_{ij} \in [0,
       ((\tilde d_i - \delta_i)(\tilde d_j - \delta_j))^{-1/2}]$ on edges and
       $\hat A'_{ii} \in [\tilde d_i^{-1}, (\tilde d_i - \delta_i)^{-1}]$
       ($\hat A_L, \hat A_U$; zero elsewhere).
    2. **Pre-activation bounds** (interval arithmetic, POT Theorem 1 extended to a bounded
       second-layer input): $l^{(1)} \le \hat A' X' W_1 + b_1 \le u^{(1)}$, then
       $H \in [\sigma(l^{(1)}), \sigma(u^{(1)})]$ and $l^{(2)}, u^{(2)}$ likewise,
       using $\min_{a \in [a_L, a_U] \subset \mathbb{R}_{\ge 0}} a p =
       a_L p^+ + a_U p^-$.
    3. **Backward linear relaxation** (CROWN, POT Theorem 2): with
       $s v \le \sigma(v) \le s v + \beta$ (see `_relax`),
       $\Lambda_i = \mathbf{w}_i \odot s^{(2)}_i$, $\mathbf{g}_i = W_2^\top
       \Lambda_i$, $\mathbf{e}_{ij} = \mathbf{g}_i \odot s^{(1)}_j$:

        $$
        s_i(\tilde G) \ge \sum_j \hat A'_{ij} \Big[\mathbf{e}_{ij}^\top (\hat A' X' W_1)_j
        + \mathbf{e}_{ij}^\top b_1 + (\mathbf{g}_i^-)^\top \beta^{(1)}_j\Big]
        + \Lambda_i^\top b_2 + (\mathbf{w}_i^-)^\top \beta^{(2)}_i.
        $$

    4. **Concretisation.** Without `view` the right-hand side is minimised over the box of
       step 1 (and the feature box), treating every occurrence of an adjacency entry as an
       independent variable: a certified $\tilde f_i \le \min_{\tilde G \in \mathcal{G}}
       s_i(\tilde G)$, cost $O(P\,d)$ for $P$ two-hop paths (padded batched
       products per middle node, $O(N \Delta^2 d)$, on nearly regular graphs). With
       `view=(x', edge_index')` (a member of $\mathcal{G}$, checked) it is evaluated at
       that graph, as the authors' code does: a bound on $s_i$ of that view, cost
       $O(E\,d)$.

    Args:
        encoder: a 2-layer [`GCNEncoder`][graphspace.tasks.contrastive.GCNEncoder] (ReLU / LeakyReLU
            / PReLU with slope in [0, 1]).
        x: clean node features $(N, F)$.
        edge_index: clean edges $(2, E)$ (no duplicates; self-loops are ignored).
        target: $(N, F_{out})$, the vectors $\mathbf{w}_i$.
        budget: $(N,)$ integer $\delta_i$ (see
            [`edge_drop_budget`][graphspace.tasks.contrastive.edge_drop_budget]).
        feature_masking: include feature masking in the set.
        view: optional `(x', edge_index')` to evaluate the bound at.

    Returns:
        $(N,)$ lower bounds.
    """
    if not isinstance(encoder, GCNEncoder) or len(encoder.convs) != 2:
        raise TypeError("gcn_node_compactness needs a 2-layer GCNEncoder")
    conv1, conv2 = encoder.convs
    for conv in (conv1, conv2):
        if not (conv.normalize and conv.add_self_loops and not conv.improved):
            raise ValueError("POT bound assumes GCNConv(normalize=True, add_self_loops=True)")
    n, dt = x.size(0), x.dtype
    w1, b1 = conv1.lin.weight.to(dt), conv1.bias.to(dt)
    w2, b2 = conv2.lin.weight.to(dt), conv2.bias.to(dt)
    a1 = _slope(encoder.acts[0], w1.size(0), x)
    a2 = _slope(encoder.acts[1], w2.size(0), x)

    ei = edge_index[:, edge_index[0] != edge_index[1]]
    src, dst = ei
    keys = src * n + dst
    if torch.unique(keys).numel() != keys.numel():
        raise ValueError("edge_index has duplicate edges")
    deg = _in_degree(ei, n, dt)
    budget = budget.to(deg.device)
    if bool((budget < 0).any()) or bool((budget.to(dt) > deg).any()):
        raise ValueError("budget must lie in [0, in-degree]")
    d_full = deg + 1
    d_min = d_full - budget.to(dt)
    loop = torch.arange(n, device=x.device)
    src_all, dst_all = torch.cat([src, loop]), torch.cat([dst, loop])
    fixed = (budget[dst] == 0).to(dt)  # no incoming edge of dst may be dropped
    a_up = torch.cat([torch.rsqrt(d_min[src] * d_min[dst]), 1.0 / d_min])
    a_lo = torch.cat([fixed * torch.rsqrt(d_full[src] * d_full[dst]), 1.0 / d_full])
    pair = torch.stack([dst_all, src_all])

    def adj(values: Tensor) -> Tensor:  # sparse (N, N) matrix, row = target node
        return torch.sparse_coo_tensor(pair, values, (n, n), check_invariants=False).coalesce()

    adj_lo, adj_up = adj(a_lo), adj(a_up)

    def bounds(m_lo: Tensor, m_up: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        # [min, max] of A' M + bias over A' in [adj_lo, adj_up] (>= 0), M in [m_lo, m_up]
        lo = torch.sparse.mm(adj_lo, _pos(m_lo)) + torch.sparse.mm(adj_up, _neg(m_lo))
        up = torch.sparse.mm(adj_up, _pos(m_up)) + torch.sparse.mm(adj_lo, _neg(m_up))
        return lo + bias, up + bias

    # step 2: interval bounds of the pre-activations
    if feature_masking:
        p_mid, p_rad = (0.5 * x) @ w1.t(), (0.5 * x.abs()) @ w1.abs().t()
    else:
        p_mid, p_rad = x @ w1.t(), torch.zeros(n, w1.size(0), dtype=dt, device=x.device)
    lo1, up1 = bounds(p_mid - p_rad, p_mid + p_rad, b1)
    h_lo, h_up = _leaky(lo1, a1), _leaky(up1, a1)
    q_mid = (0.5 * (h_lo + h_up)) @ w2.t()
    q_rad = (0.5 * (h_up - h_lo)) @ w2.abs().t()
    lo2, up2 = bounds(q_mid - q_rad, q_mid + q_rad, b2)

    # step 3: backward relaxation
    s1, beta1 = _relax(lo1, up1, a1)
    s2, beta2 = _relax(lo2, up2, a2)
    target = target.to(dt)
    lam = target * s2
    const = lam @ b2 + (_neg(target) * beta2).sum(-1)
    g = lam @ w2

    if view is not None:
        # step 4a: evaluate at a member of the set:
        # sum_j A'_ij [g_i . (s1_j * (pre_j)) + g_i^- . beta1_j] = g_i . (A' (s1 * pre))_i + ...
        xv, eiv = view
        eiv = eiv[:, eiv[0] != eiv[1]]
        kept = torch.isin(keys, eiv[0] * n + eiv[1])
        if int(kept.sum()) != eiv.size(1):
            raise ValueError("the view has edges that are not in the clean graph")
        deg_v = _in_degree(eiv, n, dt)
        if bool((deg - deg_v > budget.to(dt)).any()):
            raise ValueError("the view drops more edges than the budget allows")
        if feature_masking:
            if not bool(((xv == x) | (xv == 0)).all()):
                raise ValueError("the view's features are not a masking of x")
        elif not torch.equal(xv, x):
            raise ValueError("the view changes x but feature_masking=False")
        dv = deg_v + 1
        adj_v = adj(torch.cat([kept.to(dt) * torch.rsqrt(dv[src] * dv[dst]), 1.0 / dv]))
        pre = torch.sparse.mm(adj_v, xv.to(dt) @ w1.t()) + b1
        agg = torch.sparse.mm(adj_v, torch.cat([s1 * pre, beta1], dim=-1))
        r, rb = agg.split(pre.size(-1), dim=-1)
        return (g * r).sum(-1) + (_neg(g) * rb).sum(-1) + const

    # step 4b: certified minimum over the box, two-hop paths m -> j -> i (edge e1 = j -> i,
    # edge e2 = m -> j); every adjacency entry is minimised over its interval independently
    g_dst = g[dst_all]
    extra = (g_dst * s1[src_all]) @ b1 + (_neg(g_dst) * beta1[src_all]).sum(-1)
    inner = _two_hop_inner(g, s1, p_mid, p_rad, src_all, dst_all, a_lo, a_up, n)
    t = inner + extra
    return scatter(a_lo * _pos(t) + a_up * _neg(t), dst_all, 0, n, "sum") + const


def _grouped(index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Edge ids grouped by `index` into a padded `(n, max_count)` table (-1 = empty)."""
    order = torch.argsort(index, stable=True)
    count = torch.bincount(index, minlength=n)
    pos = torch.arange(index.numel(), device=index.device) - (torch.cumsum(count, 0) - count)[
        index[order]]
    table = torch.full((n, int(count.max())), -1, dtype=torch.long, device=index.device)
    table[index[order], pos] = order
    return table, count


def _two_hop_inner(g: Tensor, s1: Tensor, p_mid: Tensor, p_rad: Tensor, src: Tensor,
                   dst: Tensor, a_lo: Tensor, a_up: Tensor, n: int,
                   padded: bool | None = None) -> Tensor:
    r"""For every edge $e_1 = (j \to i)$: $\sum_m \min_{a \in [a_L, a_U]} a\,
    \min_{p}\, \mathbf{p}_m^\top (\mathbf{g}_i \odot s^{(1)}_j)$ over the incoming edges
    $(m \to j)$, with $\mathbf{p}_m \in [p_{mid} - p_{rad}, p_{mid} + p_{rad}]$
    (using $s^{(1)} \ge 0$). Nearly regular graphs use padded batched matrix products
    per middle node $j$; skewed degree distributions enumerate the two-hop paths
    (`padded` forces one of the two)."""
    num = src.numel()
    inc, count_in = _grouped(dst, n)  # incoming edges (m -> j) of every j
    out, count_out = _grouped(src, n)  # outgoing edges (j -> i) of every j
    paths = int((count_in * count_out).sum())
    if padded is None:
        padded = n * inc.size(1) * out.size(1) <= 4 * paths
    if padded:
        in_mask, out_mask = inc >= 0, out >= 0
        e2, e1 = inc.clamp_min(0), out.clamp_min(0)
        m = src[e2]
        mid = p_mid[m] * s1.unsqueeze(1)  # (n, D_in, d)
        rad = p_rad[m] * s1.unsqueeze(1)
        gi = g[dst[e1]]  # (n, D_out, d)
        ell = gi @ mid.transpose(1, 2) - gi.abs() @ rad.transpose(1, 2)  # (n, D_out, D_in)
        lo = (a_lo[e2] * in_mask).unsqueeze(1)
        up = (a_up[e2] * in_mask).unsqueeze(1)
        per_edge = (lo * _pos(ell) + up * _neg(ell)).sum(-1)  # (n, D_out)
        return torch.zeros(num, dtype=g.dtype, device=g.device).index_put(
            (e1[out_mask],), per_edge[out_mask])
    # enumerate the paths: for every e1 = (j -> i) all incoming edges of j
    reps = count_in[src]
    first = torch.repeat_interleave(torch.arange(num, device=g.device), reps)
    offset = torch.arange(first.numel(), device=g.device) - torch.repeat_interleave(
        torch.cumsum(reps, 0) - reps, reps)
    second = inc[src[first], offset]
    e = g[dst] * s1[src]
    ef, m = e[first], src[second]
    ell = (p_mid[m] * ef).sum(-1) - (p_rad[m] * ef.abs()).sum(-1)
    return scatter(a_lo[second] * _pos(ell) + a_up[second] * _neg(ell), first, 0, num, "sum")


def pot_loss(compactness: Tensor) -> Tensor:
    r"""$\mathcal{L}_{POT} = -\frac{1}{N}\sum_i \log\operatorname{sigmoid}(\tilde f_i)$,
    the binary cross-entropy of the compactness (as a logit) with target 1."""
    return F.softplus(-compactness).mean()


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------
def linear_probe(
    z_train: Tensor,
    y_train: Tensor,
    z_eval: Tensor,
    y_eval: Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    r"""Accuracy of an L2-regularised multinomial logistic regression (L-BFGS, float64, zero
    initialisation, so deterministic) trained on frozen embeddings `z_train` and scored on
    `z_eval`. Features are standardised with the training statistics."""
    if z_train.size(0) == 0 or z_eval.size(0) == 0:
        raise ValueError("linear probe needs non-empty train and eval sets")
    with torch.inference_mode(False), torch.enable_grad():
        zt = z_train.detach().clone().double()
        ze = z_eval.detach().clone().double()
        yt = y_train.detach().clone().long().view(-1)
        ye = y_eval.detach().clone().long().view(-1)
        c = num_classes or int(max(int(yt.max()), int(ye.max())) + 1)
        mean = zt.mean(0, keepdim=True)
        std = zt.std(0, keepdim=True).nan_to_num(1.0).clamp_min(1e-8) if zt.size(0) > 1 \
            else torch.ones_like(mean)
        zt, ze = (zt - mean) / std, (ze - mean) / std
        w = torch.zeros(zt.size(1), c, dtype=torch.float64, device=zt.device, requires_grad=True)
        b = torch.zeros(c, dtype=torch.float64, device=zt.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(zt @ w + b, yt) + weight_decay * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return float(((ze @ w + b).argmax(-1) == ye).double().mean())


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
def _as_list(t: Transform | Sequence[Transform] | None) -> list[Transform] | None:
    if t is None:
        return None
    if callable(t):
        return [t]
    return list(t)


class GraphContrastive(PredictionsFile, pl.LightningModule):
    r"""GRACE-style graph contrastive pre-training with the optional POT regulariser.

    The math is in the module docstring. `level="node"` contrasts the nodes of a batch
    (ordinary PyG graphs; encoder called as `encoder(x, edge_index)`); `level="graph"`
    contrasts whole graphs, e.g. parameter graphs with
    [`GraphMetaNetwork`][graphspace.nn.models.graph_metanetwork.GraphMetaNetwork] (called as
    `encoder(batch)`, one vector per graph; a node encoder is mean-pooled when
    `encoder_takes_data=False`). At graph level the augmentations are applied to every graph
    of the batch separately (so per-network weight-space augmentations work).

    Validation / test batches must carry labels `y` and `train_mask` plus `val_mask` /
    `test_mask` (per node, or per graph at graph level); at the end of the epoch a linear
    probe is trained on the frozen encoder outputs of the `train_mask` samples and its
    accuracy on the `val_mask` / `test_mask` samples is logged as `val/probe_acc` /
    `test/probe_acc`.

    Args:
        encoder: the GNN (default: [`GCNEncoder`][graphspace.tasks.contrastive.GCNEncoder]
            `(in_channels, hidden_channels)` at node level, `GraphMetaNetwork(hidden_channels)` at
            graph level).
        in_channels: input feature size for the default node encoder.
        level: `"node"` (default) or `"graph"`.
        hidden_channels: embedding size of the default encoders (default 128).
        proj_channels: hidden size of the projection head (default 128).
        tau: temperature $\tau$ (default 0.5).
        augment1, augment2: callables (or lists of callables, applied in order) that return an
            augmented copy of a graph without modifying it in place. Default:
            `[DropEdges(drop_edge[k]), MaskFeatures(mask_feature[k])]`.
        drop_edge, mask_feature: the default augmentations' rates per view
            (default (0.2, 0.4) and (0.3, 0.4)).
        pot: add the POT regulariser (node level, 2-layer
            [`GCNEncoder`][graphspace.tasks.contrastive.GCNEncoder] only).
        kappa: POT weight $\kappa$ (default 0.5).
        pot_drop_rate: drop rates defining POT's budgets per view (default `drop_edge`);
            each node's budget is raised to what the sampled view actually dropped, so the view
            always lies in the set.
        pot_bound: `"view"` (default; the CROWN bound evaluated at the sampled view, as in the
            authors' code) or `"set"` (certified minimum over the whole perturbation set).
        encoder_takes_data: call `encoder(batch)` instead of `encoder(x, edge_index)`
            (default: `True` at graph level, `False` at node level).
        lr, weight_decay: Adam settings (default 5e-4, 1e-5).
        probe_weight_decay, probe_max_iter: linear probe settings (default 1e-4, 200).
    """

    def __init__(
        self,
        encoder: nn.Module | None = None,
        in_channels: int | None = None,
        level: str = "node",
        hidden_channels: int = 128,
        proj_channels: int = 128,
        tau: float = 0.5,
        augment1: Transform | Sequence[Transform] | None = None,
        augment2: Transform | Sequence[Transform] | None = None,
        drop_edge: tuple[float, float] = (0.2, 0.4),
        mask_feature: tuple[float, float] = (0.3, 0.4),
        pot: bool = False,
        kappa: float = 0.5,
        pot_drop_rate: tuple[float, float] | None = None,
        pot_bound: str = "view",
        encoder_takes_data: bool | None = None,
        lr: float = 5e-4,
        weight_decay: float = 1e-5,
        probe_weight_decay: float = 1e-4,
        probe_max_iter: int = 200,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "augment1", "augment2"])
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if pot_bound not in POT_BOUNDS:
            raise ValueError(f"pot_bound must be one of {POT_BOUNDS}, got {pot_bound!r}")
        if tau <= 0:
            raise ValueError("tau must be positive")
        if encoder is None:
            if level == "node":
                if in_channels is None:
                    raise ValueError("the default node encoder needs in_channels")
                encoder = GCNEncoder(in_channels, hidden_channels)
            else:
                from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork

                encoder = GraphMetaNetwork(hidden_channels)
        if pot:
            if level != "node":
                raise ValueError("POT is defined for node-level contrastive learning")
            if not isinstance(encoder, GCNEncoder) or len(encoder.convs) != 2:
                raise ValueError("POT needs a 2-layer GCNEncoder")
        self.encoder = encoder
        self.level = level
        self.takes_data = (level == "graph") if encoder_takes_data is None \
            else encoder_takes_data
        out = getattr(encoder, "out_channels", None) or hidden_channels
        self.projector = ProjectionHead(out, proj_channels, out)
        self.augment = [
            _as_list(a) or [DropEdges(drop_edge[k]), MaskFeatures(mask_feature[k])]
            for k, a in enumerate((augment1, augment2))
        ]
        self.pot_rates = tuple(pot_drop_rate) if pot_drop_rate is not None else tuple(drop_edge)
        self.results: dict[str, dict[str, float]] = {}
        self._eval: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    # -- encoding ------------------------------------------------------------------------------
    def forward(self, batch: Any) -> Tensor:
        """Encoder outputs: one row per node (node level) or per graph (graph level)."""
        if self.takes_data:
            return self.encoder(batch)
        z = self.encoder(batch.x, batch.edge_index)
        if self.level == "graph":
            index = getattr(batch, "batch", None)
            if index is None:
                index = torch.zeros(z.size(0), dtype=torch.long, device=z.device)
            z = scatter(z, index, 0, int(getattr(batch, "num_graphs", 1) or 1), "mean")
        return z

    def views(self, batch: Any) -> tuple[Any, Any]:
        """Two independently augmented copies of `batch`."""
        out = []
        for transforms in self.augment:
            if self.level == "graph" and isinstance(batch, Batch):
                out.append(Batch.from_data_list(
                    [_apply(transforms, g) for g in batch.to_data_list()]))
            else:
                out.append(_apply(transforms, batch))
        return out[0], out[1]

    def compactness(self, batch: Any, view: Any, z_other: Tensor, drop_rate: float) -> Tensor:
        """POT node compactness of `view` (see
        [`gcn_node_compactness`][graphspace.tasks.contrastive.gcn_node_compactness])."""
        assert isinstance(self.encoder, GCNEncoder)
        n = batch.num_nodes
        clean = batch.edge_index[:, batch.edge_index[0] != batch.edge_index[1]]
        kept = view.edge_index[:, view.edge_index[0] != view.edge_index[1]]
        dropped = (_in_degree(clean, n, torch.float64) - _in_degree(kept, n, torch.float64))
        budget = torch.maximum(edge_drop_budget(clean, n, drop_rate), dropped.round().long())
        masking = not torch.equal(view.x, batch.x)
        target = compactness_targets(z_other)
        return gcn_node_compactness(
            self.encoder, batch.x, clean, target, budget, feature_masking=masking,
            view=(view.x, view.edge_index) if self.hparams.pot_bound == "view" else None)

    # -- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        v1, v2 = self.views(batch)
        z1, z2 = self(v1), self(v2)
        nce = nt_xent(self.projector(z1), self.projector(z2), self.hparams.tau)
        n = z1.size(0)
        self.log("train/nce", nce, batch_size=n, prog_bar=True)
        loss = nce
        if self.hparams.pot:
            f1 = self.compactness(batch, v1, z2, self.pot_rates[0])
            f2 = self.compactness(batch, v2, z1, self.pot_rates[1])
            pot = 0.5 * (pot_loss(f1) + pot_loss(f2))
            kappa = self.hparams.kappa
            loss = (1 - kappa) * nce + kappa * pot
            self.log("train/pot", pot, batch_size=n)
            self.log("train/compactness", 0.5 * (f1.mean() + f2.mean()), batch_size=n)
        self.log("train/loss", loss, batch_size=n)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        z = self(batch)
        mask = getattr(batch, f"{stage}_mask")
        self._eval.append((z.detach(), batch.y.view(-1).detach(), batch.train_mask.view(-1),
                           mask.view(-1)))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, Tensor]:
        """Encoder outputs (the embeddings a downstream model or probe uses), one row per node
        (node level) or per graph (graph level).

        Returns:
            `{"z": [N, D], "y": [N]}` (`y` only when the batch has one label per row); the
            predictions file gets columns `z_0 ... z_{D-1}`.
        """
        z = self(batch)
        out = {"z": z.float()}
        y = getattr(batch, "y", None)
        if isinstance(y, Tensor) and y.numel() == z.size(0):
            out["y"] = y.view(-1)
        return out

    def _probe(self, stage: str) -> None:
        if not self._eval:
            return
        z, y, tr, ev = (torch.cat(t) for t in zip(*self._eval))
        self._eval = []
        acc = linear_probe(z[tr], y[tr], z[ev], y[ev], int(y.max()) + 1,
                           self.hparams.probe_weight_decay, self.hparams.probe_max_iter)
        self.log(f"{stage}/probe_acc", acc, prog_bar=True)
        self.results.setdefault(stage, {})["probe_acc"] = acc

    def on_validation_epoch_start(self) -> None:
        self._eval = []

    def on_test_epoch_start(self) -> None:
        self._eval = []

    def on_validation_epoch_end(self) -> None:
        self._probe("val")

    def on_test_epoch_end(self) -> None:
        self._probe("test")

    def results_table(self) -> str:
        """A Markdown table of the linear-probe accuracies."""
        lines = ["| model | val probe accuracy | test probe accuracy |", "|---|---|---|"]
        name = "grace+pot" if self.hparams.pot else "grace"
        val = self.results.get("val", {}).get("probe_acc", float("nan"))
        test = self.results.get("test", {}).get("probe_acc", float("nan"))
        lines.append(f"| {name} | {val:.4f} | {test:.4f} |")
        return "\n".join(lines)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)


# ---------------------------------------------------------------------------------------------
# a small zoo of parameter graphs for graph-level contrastive learning
# ---------------------------------------------------------------------------------------------
FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sin": lambda t: torch.sin(math.pi * t),
    "cos": lambda t: torch.cos(math.pi * t),
    "square": lambda t: t * t,
    "abs": lambda t: t.abs(),
    "step": lambda t: 0.5 * torch.sign(t),
    "linear": lambda t: t,
}


class FunctionZooDataModule(pl.LightningDataModule):
    r"""A model zoo generated locally: MLPs `1 -> hidden -> 1` (ReLU), each fitted by Adam to
    one of several 1-D functions on $[-1, 1]$ from its own random initialisation; the
    label of a network is its function. Every network becomes a
    [`ParameterGraph`][graphspace.graphs.ParameterGraph] (one graph per network) with `y` and
    per-graph `train_mask` / `val_mask` / `test_mask` (a stratified split).
    Deterministic under `seed`; nothing touches the disk.

    Training iterates over the `train_mask` networks; validation and test iterate over all
    networks (the linear probe of
    [`GraphContrastive`][graphspace.tasks.contrastive.GraphContrastive] trains on `train_mask`).

    Args:
        functions: names from `FUNCTIONS` (default sin, square, abs, step).
        num_per_class: networks per function (default 16).
        hidden: hidden widths (default (16, 16)).
        fit_steps, fit_lr: Adam steps and learning rate fitting each network (default 150,
            1e-2).
        train_ratio, val_ratio: fraction of every class in train / validation (default 0.5 /
            0.25).
        batch_size: graphs per batch (default 16).
        seed: random seed (default 0).
    """

    def __init__(
        self,
        functions: Sequence[str] = ("sin", "square", "abs", "step"),
        num_per_class: int = 16,
        hidden: Sequence[int] = (16, 16),
        fit_steps: int = 150,
        fit_lr: float = 1e-2,
        train_ratio: float = 0.5,
        val_ratio: float = 0.25,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = [f for f in functions if f not in FUNCTIONS]
        if unknown:
            raise ValueError(f"unknown functions {unknown}; choose from {sorted(FUNCTIONS)}")
        self.save_hyperparameters()
        self.graphs: list[Data] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.hparams.functions)

    def setup(self, stage: str | None = None) -> None:
        if self.graphs is not None:
            return
        from graphspace.graphs import ParameterGraph, analyze
        from graphspace.testing.models import MLP

        h = self.hparams
        t = torch.linspace(-1, 1, 64).unsqueeze(-1)
        k, per = len(h.functions), h.num_per_class
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(h.seed)
            models = [MLP((1, *h.hidden, 1)) for _ in range(k * per)]
            splits = [torch.randperm(per) for _ in range(k)]
        analysis = analyze(models[0])
        # fit all networks at once: stacked parameters, one Adam (elementwise, so every network
        # is trained exactly as if alone; the summed loss keeps their gradients separate)
        states = [m.state_dict() for m in models]
        params = {name: torch.stack([sd[name] for sd in states]).requires_grad_()
                  for name in states[0]}
        targets = torch.stack([FUNCTIONS[f](t) for f in h.functions]).repeat_interleave(per, 0)
        opt = torch.optim.Adam(params.values(), lr=h.fit_lr)
        for _ in range(h.fit_steps):
            opt.zero_grad()
            out = t.expand(k * per, -1, -1)
            for idx, layer in enumerate(models[0].net):
                if isinstance(layer, nn.Linear):
                    out = torch.baddbmm(params[f"net.{idx}.bias"].unsqueeze(1), out,
                                        params[f"net.{idx}.weight"].transpose(1, 2))
                else:
                    out = layer(out)
            ((out - targets) ** 2).mean(dim=(1, 2)).sum().backward()
            opt.step()
        n_train = max(1, round(h.train_ratio * per))
        n_val = round(h.val_ratio * per)
        graphs: list[Data] = []
        for i in range(k * per):
            sd = {name: p[i].detach().clone() for name, p in params.items()}
            g = ParameterGraph.from_state_dict(sd, analysis)
            pos = int((splits[i // per] == i % per).nonzero())
            g.y = torch.tensor([i // per])
            g.train_mask = torch.tensor([pos < n_train])
            g.val_mask = torch.tensor([n_train <= pos < n_train + n_val])
            g.test_mask = torch.tensor([pos >= n_train + n_val])
            graphs.append(g)
        self.graphs = graphs

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.graphs is not None
        train = [g for g in self.graphs if bool(g.train_mask)]
        gen = torch.Generator().manual_seed(int(self.hparams.seed))
        return DataLoader(train, batch_size=self.hparams.batch_size, shuffle=True,
                          generator=gen, drop_last=len(train) > self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.graphs, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """All networks, in order (as validation and test)."""
        return self.val_dataloader()
