r"""Sheaf message passing: Neural Sheaf Diffusion and connection-Laplacian sheaves.

References:

* J. Hansen, T. Gebhart, "Sheaf Neural Networks", NeurIPS 2020 TDA workshop,
  https://arxiv.org/abs/2012.06333 (the sheaf convolution
  $\sigma((I - \Delta_{\mathcal F})(I_n \otimes W_1) X W_2)$).
* C. Bodnar, F. Di Giovanni, B. P. Chamberlain, P. Liò, M. M. Bronstein, "Neural Sheaf
  Diffusion: A Topological Perspective on Heterophily and Oversmoothing in GNNs",
  NeurIPS 2022, https://arxiv.org/abs/2202.04579 (learned restriction maps, eq. 9 update).
* F. Barbero, C. Bodnar, H. Sáez de Ocáriz Borde, M. Bronstein, P. Veličković, P. Liò,
  "Sheaf Neural Networks with Connection Laplacians", ICML 2022 TAG workshop,
  https://arxiv.org/abs/2206.08702 (restriction maps from local PCA + orthogonal alignment).

A cellular sheaf on an undirected graph gives every node $v$ and every edge $e$
a stalk $\mathbb R^d$ and every incidence $v \trianglelefteq e$ a restriction
map $\mathcal F_{v \trianglelefteq e} \in \mathbb R^{d\times d}$. Node features are
kept as $X \in \mathbb R^{n \times d \times f}$ (`x.view(n, d, f)` of a flat
`(n, d * f)` tensor: `f` channels in each of the `d` stalk dimensions). Everything is
computed edge-wise in block form; the $nd \times nd$ Laplacian is never materialised.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import MessagePassing

from graphspace.nn.validation import (
    GraphInputError,
    as_edge_index,
    check_node_features,
    is_validation_enabled,
)
from graphspace.ops import scatter, sheaf_aggregate

__all__ = [
    "ConnectionLaplacian",
    "ConnectionSheafConv",
    "SheafConv",
    "SheafLaplacian",
    "SheafLearner",
    "orthogonal_from_params",
    "sym_matrix_pow",
    "undirected_edges",
]

MapType = Literal["diag", "orthogonal", "general"]
OrthogonalMap = Literal["householder", "cayley", "matrix_exp"]


# --------------------------------------------------------------------------- helpers


def undirected_edges(edge_index: Tensor, num_nodes: int) -> Tensor:
    """The undirected edge set of `edge_index` as a `(2, E)` tensor with
    `row < col` (each pair once, sorted; self-loops dropped).

    Sheaves live on undirected graphs: `(u, v)` and `(v, u)` are the same edge, and a
    directed input is symmetrised.
    """
    if not torch.compiler.is_compiling() and edge_index.numel() and (
            int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index holds node indices outside [0, {num_nodes}): "
                         f"min {int(edge_index.min())}, max {int(edge_index.max())}")
    row, col = edge_index[0], edge_index[1]
    keep = row != col
    lo = torch.minimum(row, col)[keep]
    hi = torch.maximum(row, col)[keep]
    key = torch.unique(lo * num_nodes + hi)
    return torch.stack([key // num_nodes, key % num_nodes])


def num_orthogonal_params(d: int) -> int:
    """Number of free parameters of the orthogonal parametrisations, $d(d-1)/2$."""
    return d * (d - 1) // 2


def maps_from_params(params: Tensor, map_type: str, d: int,
                     method: OrthogonalMap = "householder") -> Tensor:
    """Restriction maps from the map learner's output, one row per incidence: the `[*, d]`
    diagonal itself (`"diag"`), a reshaped `[*, d, d]` matrix (`"general"`) or an
    orthogonal matrix (`"orthogonal"`, `orthogonal_from_params`)."""
    if map_type == "diag":
        return params
    if map_type == "general":
        return params.view(params.size(0), d, d)
    return orthogonal_from_params(params, d, method)


def orthogonal_from_params(params: Tensor, d: int, method: OrthogonalMap = "householder") -> Tensor:
    r"""Map `(..., d(d-1)/2)` unconstrained parameters to `(..., d, d)` orthogonal matrices.

    * `"matrix_exp"`: $Q = \exp(A)$ with $A = L - L^\top$ skew-symmetric, the
      strictly lower triangle of $L$ holding the parameters ($Q \in SO(d)$).
    * `"cayley"`: $Q = (I + A)^{-1}(I - A)$ with the same $A$ ($SO(d)$).
    * `"householder"`: $Q = H_1 \cdots H_d$, $H_k = I - 2 v_k v_k^\top /
      v_k^\top v_k$ with $v_k = e_k + \sum_{i>k} a_{ik} e_i$ (unit leading entry, so
      $v_k \ne 0$; the LAPACK `orgqr` convention used by NSD). $\det Q =
      (-1)^d$; since both ends of an edge share the component, transports
      $\mathcal F_v^\top \mathcal F_u$ are rotations for every parametrisation.

    Lower-precision inputs are computed in float64 and cast back, so the result is
    orthogonal to the precision of the output dtype.
    """
    k = num_orthogonal_params(d)
    if params.size(-1) != k:
        raise ValueError(f"expected {k} parameters for d={d}, got {params.size(-1)}")
    if params.dtype != torch.float64 and params.device.type != "mps":
        # tiny d x d matrices: build them in float64 so Q^T Q = I to the input precision
        return _orthogonal(params.double(), d, method).to(params.dtype)
    return _orthogonal(params, d, method)


def _orthogonal(params: Tensor, d: int, method: str) -> Tensor:
    batch = params.shape[:-1]
    eye = torch.eye(d, dtype=params.dtype, device=params.device)
    tril = torch.tril_indices(d, d, offset=-1, device=params.device)
    low = params.new_zeros(*batch, d, d)
    low[..., tril[0], tril[1]] = params
    if method == "matrix_exp":
        return torch.linalg.matrix_exp(low - low.transpose(-1, -2))
    if method == "cayley":
        a = low - low.transpose(-1, -2)
        return torch.linalg.solve(eye + a, eye - a)
    if method == "householder":
        v = low + eye  # column k is v_k
        q = eye.expand(*batch, d, d)
        for j in range(d):
            vj = v[..., :, j]
            qv = (q @ vj.unsqueeze(-1)).squeeze(-1)  # Q H_j = Q - (2 / v^T v) (Q v) v^T
            tau = (2.0 / (vj * vj).sum(-1))[..., None, None]
            q = q - tau * qv.unsqueeze(-1) * vj.unsqueeze(-2)
        return q
    raise ValueError(f"unknown orthogonal map {method!r}")


class _SymMatrixPow(torch.autograd.Function):
    r"""`A ** p` for symmetric PSD `A` via `eigh`, with a Daleckii–Krein backward that
    stays finite for repeated eigenvalues (plain `eigh` backward divides by
    $\lambda_i - \lambda_j$)."""

    @staticmethod
    def forward(ctx, a: Tensor, p: float, tol: float) -> Tensor:  # type: ignore[override]
        lam, vec = torch.linalg.eigh(a)
        cutoff = tol * lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
        good = lam > cutoff
        safe = torch.where(good, lam, torch.ones_like(lam))
        f = torch.where(good, safe.pow(p), torch.zeros_like(lam))
        ctx.save_for_backward(lam, vec, f, good)
        ctx.p = p
        return (vec * f.unsqueeze(-2)) @ vec.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        lam, vec, f, good = ctx.saved_tensors
        p = ctx.p
        g = 0.5 * (grad + grad.transpose(-1, -2))
        gbar = vec.transpose(-1, -2) @ g @ vec
        li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
        fi, fj = f.unsqueeze(-1), f.unsqueeze(-2)
        diff = li - lj
        scale = lam.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1.0)
        close = diff.abs() <= 1e-9 * scale
        mid = 0.5 * (li + lj)
        both_good = good.unsqueeze(-1) & good.unsqueeze(-2)
        fprime = torch.where(
            both_good, p * torch.where(both_good, mid, torch.ones_like(mid)).pow(p - 1), 0.0
        )
        kernel = torch.where(close, fprime, (fi - fj) / torch.where(close, 1.0, diff))
        da = vec @ (gbar * kernel) @ vec.transpose(-1, -2)
        return da, None, None


def sym_matrix_pow(a: Tensor, p: float, tol: float = 1e-10) -> Tensor:
    r"""Matrix power $A^p$ of a batch of symmetric PSD matrices `(..., d, d)`.

    Eigenvalues at or below `tol * max(1, |lambda|_max)` are treated as zero and mapped to
    zero (a pseudo-inverse power for negative `p`). The backward pass uses divided
    differences $(f(\lambda_i) - f(\lambda_j)) / (\lambda_i - \lambda_j)$, replaced by
    $f'(\lambda)$ for (near-)equal eigenvalues, so gradients are finite for repeated
    eigenvalues (e.g. $D_v + I$ of an isolated node).
    """
    return _SymMatrixPow.apply(a, p, tol)


# --------------------------------------------------------------------------- Laplacian


class SheafLaplacian:
    r"""The normalised sheaf Laplacian of a sheaf on an undirected graph, in block form.

    With coboundary $(\delta x)_e = \mathcal F_{a \trianglelefteq e} x_a -
    \mathcal F_{b \trianglelefteq e} x_b$ for $e = \{a, b\}$:

    $$
    L_{\mathcal F} = \delta^\top \delta, \qquad
    (L_{\mathcal F})_{vv} = \sum_{e \ni v} \mathcal F_{v \trianglelefteq e}^\top
    \mathcal F_{v \trianglelefteq e}, \qquad
    (L_{\mathcal F})_{vu} = -\mathcal F_{v \trianglelefteq e}^\top
    \mathcal F_{u \trianglelefteq e},
    $$

    $$
    \Delta_{\mathcal F} = \tilde D^{-1/2} L_{\mathcal F} \tilde D^{-1/2}, \qquad
    \tilde D = D + I \ (\text{augmented}) \text{ or } D, \quad
    D = \operatorname{blockdiag}(L_{\mathcal F})_{vv}.
    $$

    $\Delta_{\mathcal F}$ is symmetric PSD with spectrum in $[0, 2]$ (since
    $2D - L_{\mathcal F} = \delta_+^\top\delta_+ \succeq 0$). Zero (non-augmented)
    degree blocks use the pseudo-inverse. For orthogonal maps (possibly scaled by edge
    weights $w$), $D_v = \sum_e w_e^2 I$ is used directly.

    Args:
        edge_index: `(2, E)` undirected edges with `edge_index[0] < edge_index[1]`
            (see `undirected_edges`).
        maps_src: $\mathcal F_{a \trianglelefteq e}$, `(E, d)` for diagonal maps or
            `(E, d, d)`.
        maps_dst: $\mathcal F_{b \trianglelefteq e}$, same shape.
        num_nodes: $n$.
        map_type: `"diag"`, `"orthogonal"` or `"general"` (decides how
            $\tilde D^{-1/2}$ is computed).
        augmented: use $D + I$ (NSD default) instead of $D$.
    """

    def __init__(
        self,
        edge_index: Tensor,
        maps_src: Tensor,
        maps_dst: Tensor,
        num_nodes: int,
        map_type: MapType,
        augmented: bool = True,
    ) -> None:
        if map_type not in ("diag", "orthogonal", "general"):
            raise ValueError(f"unknown map_type {map_type!r}")
        self.edge_index = edge_index
        self.maps_src = maps_src
        self.maps_dst = maps_dst
        self.num_nodes = num_nodes
        self.map_type = map_type
        self.augmented = augmented
        self.stalk_dim = maps_src.size(-1)
        self.norm = self._normaliser()

    def _normaliser(self) -> Tensor:
        a, b = self.edge_index[0], self.edge_index[1]
        n, d = self.num_nodes, self.stalk_dim
        idx = torch.cat([a, b])
        maps = torch.cat([self.maps_src, self.maps_dst])
        if self.map_type == "diag":
            deg = scatter(maps * maps, idx, 0, n, "sum")  # (n, d)
        elif self.map_type == "orthogonal":
            sq = (maps * maps).sum((-1, -2)) / d  # w_e^2 for w_e Q
            deg = scatter(sq, idx, 0, n, "sum")  # (n,)
        else:
            ftf = maps.transpose(-1, -2) @ maps
            deg = scatter(ftf.reshape(-1, d * d), idx, 0, n, "sum").view(n, d, d)
            self.degree = deg
            if self.augmented:
                deg = deg + torch.eye(d, dtype=deg.dtype, device=deg.device)
            return sym_matrix_pow(deg, -0.5)
        self.degree = deg
        if self.augmented:
            return (deg + 1.0).rsqrt()
        safe = torch.where(deg > 0, deg, torch.ones_like(deg))
        return torch.where(deg > 0, safe.rsqrt(), torch.zeros_like(deg))

    def _scale(self, x: Tensor) -> Tensor:
        if self.map_type == "diag":
            return self.norm.unsqueeze(-1) * x
        if self.map_type == "orthogonal":
            return self.norm.view(-1, 1, 1) * x
        return self.norm @ x

    def _apply(self, maps: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        if self.map_type == "diag":
            return maps.unsqueeze(-1) * x
        return (maps.transpose(-1, -2) if transpose else maps) @ x

    def coboundary(self, x: Tensor) -> Tensor:
        r"""$(\delta x)_e = \mathcal F_{a \trianglelefteq e} x_a -
        \mathcal F_{b \trianglelefteq e} x_b$ for `x` of shape `(n, d, f)`; returns
        `(E, d, f)`."""
        a, b = self.edge_index[0], self.edge_index[1]
        return self._apply(self.maps_src, x[a]) - self._apply(self.maps_dst, x[b])

    def matmul(self, x: Tensor) -> Tensor:
        r"""$\Delta_{\mathcal F} x$ for `x` of shape `(n, d, f)` in
        $O(E d^2 f)$."""
        n, d, f = x.shape
        a, b = self.edge_index[0], self.edge_index[1]
        y = self._scale(x)
        de = self.coboundary(y)
        src = torch.cat(
            [self._apply(self.maps_src, de, True), -self._apply(self.maps_dst, de, True)]
        )
        z = scatter(src.reshape(-1, d * f), torch.cat([a, b]), 0, n, "sum").view(n, d, f)
        return self._scale(z)

    __matmul__ = matmul

    def diagonal_apply(self, y: Tensor) -> Tensor:
        r"""The block diagonal of $L_{\mathcal F}$ applied to `y` `(n, d, f)`:
        $D_v y_v$ with $D_v = \sum_{e \ni v} \mathcal F_{v \trianglelefteq e}^\top
        \mathcal F_{v \trianglelefteq e}$."""
        if self.map_type == "diag":
            return self.degree.unsqueeze(-1) * y
        if self.map_type == "orthogonal":
            return self.degree.view(-1, 1, 1) * y
        return self.degree @ y

    def off_diagonal(self) -> tuple[Tensor, Tensor]:
        r"""The off-diagonal blocks of $L_{\mathcal F}$ as messages: `(edge_index, blocks)`
        with `edge_index` `(2, 2E)` (both directions of every edge, sources first) and
        `blocks[k]` $= -\mathcal F_{i \trianglelefteq e}^\top \mathcal F_{j
        \trianglelefteq e}$ for the message $j \to i$ (`(2E, d)` for diagonal maps, else
        `(2E, d, d)`), so $(L_{\mathcal F} y)_i = D_i y_i + \sum_{j \to i}
        \text{blocks} \cdot y_j$."""
        a, b = self.edge_index[0], self.edge_index[1]
        fa, fb = self.maps_src, self.maps_dst
        if self.map_type == "diag":
            ab = -(fa * fb)
            blocks = torch.cat([ab, ab])
        else:
            blocks = torch.cat([-(fa.transpose(-1, -2) @ fb), -(fb.transpose(-1, -2) @ fa)])
        return torch.stack([torch.cat([b, a]), torch.cat([a, b])]), blocks

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_nodes={self.num_nodes}, "
            f"num_edges={self.edge_index.size(1)}, stalk_dim={self.stalk_dim}, "
            f"map_type={self.map_type!r}, augmented={self.augmented})"
        )


# --------------------------------------------------------------------------- learner


def _activation(act: str | nn.Module | None) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    table: dict[str | None, type[nn.Module]] = {
        "elu": nn.ELU,
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "identity": nn.Identity,
        "id": nn.Identity,
        None: nn.Identity,
    }
    if act not in table:
        raise ValueError(f"unknown activation {act!r}")
    return table[act]()


class SheafLearner(nn.Module):
    r"""Restriction-map parameters from the two endpoint features, as in NSD:
    $\Phi(x_v \,\|\, x_u) = \sigma(W [x_v \,\|\, x_u])$ (`hidden_channels=None`,
    bias-free, the paper's choice) or a two-layer MLP.

    Args:
        in_channels: size of a node's flat feature vector (`d * f`).
        out_channels: number of map parameters per incidence.
        hidden_channels: width of the MLP's hidden layer (`None`: a single linear map).
        act: output activation $\sigma$ (`"tanh"`, the NSD default, or
            `"identity"`, `"elu"`, ...).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int | None = None,
        act: str | nn.Module | None = "tanh",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        if hidden_channels is None:
            self.mlp: nn.Module = nn.Linear(2 * in_channels, out_channels, bias=False)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(2 * in_channels, hidden_channels),
                nn.ELU(),
                nn.Linear(hidden_channels, out_channels, bias=False),
            )
        self.act = _activation(act)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        r"""Parameters of $\mathcal F_{src \trianglelefteq (src, dst)}$, `(E, out)`."""
        return self.act(self.mlp(torch.cat([x[src], x[dst]], dim=-1)))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"hidden_channels={self.hidden_channels})"
        )


# --------------------------------------------------------------------------- diffusion


class _SheafDiffusionLayer(MessagePassing):
    r"""Shared weights and update of `SheafConv` and `ConnectionSheafConv`.

    The Laplacian is applied as PyG message passing: $\Delta_{\mathcal F} x = \tilde
    D^{-1/2}(D y + \sum_{j \to i} B_{ij} y_j)$, $y = \tilde D^{-1/2} x$, with `message`
    ($B_{ij} y_j$, the readable reference) or the fused `graphspace.ops.sheaf_aggregate`
    (`message_and_aggregate`, which PyG picks for the column-sorted `EdgeIndex` built here).
    """

    SUPPORTS_FUSED_EDGE_INDEX = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None,
        stalk_dim: int,
        left_weights: bool,
        right_weights: bool,
        epsilon: bool,
        residual: bool,
        act: str | nn.Module | None,
        dropout: float,
        augmented: bool,
    ) -> None:
        super().__init__(aggr="add", node_dim=0)
        out_channels = in_channels if out_channels is None else out_channels
        if stalk_dim < 1:
            raise ValueError("stalk_dim must be >= 1")
        for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
            if c % stalk_dim:
                raise ValueError(f"{name}={c} is not divisible by stalk_dim={stalk_dim}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stalk_dim = stalk_dim
        self.f_in = in_channels // stalk_dim
        self.f_out = out_channels // stalk_dim
        if self.f_in != self.f_out and not right_weights:
            raise ValueError("changing the channel count needs right_weights=True")
        self.residual = residual
        self.dropout = dropout
        self.augmented = augmented
        self.act = _activation(act)
        self.left = nn.Linear(stalk_dim, stalk_dim, bias=False) if left_weights else None
        self.right = nn.Linear(self.f_in, self.f_out, bias=False) if right_weights else None
        self.epsilon = nn.Parameter(torch.zeros(stalk_dim)) if epsilon else None
        self.skip = (
            nn.Linear(self.f_in, self.f_out, bias=False)
            if residual and self.f_in != self.f_out
            else None
        )

    def _reset_update(self) -> None:
        # NSD initialisation: W1 = I, W2 orthogonal, epsilon = 0.
        if self.left is not None:
            nn.init.eye_(self.left.weight)
        if self.right is not None:
            nn.init.orthogonal_(self.right.weight)
        if self.epsilon is not None:
            nn.init.zeros_(self.epsilon)
        if self.skip is not None:
            self.skip.reset_parameters()

    def _weights(self, x: Tensor) -> Tensor:
        h = F.dropout(x, p=self.dropout, training=self.training)
        if self.left is not None:
            h = torch.einsum("ij,njf->nif", self.left.weight, h)
        if self.right is not None:
            h = self.right(h)
        return h

    def message(self, x_j: Tensor, block: Tensor) -> Tensor:
        r"""$B_{ij}\, y_j$: a diagonal `(E, d)` or full `(E, d, d)` block per edge."""
        if block.dim() == 2:
            return block.unsqueeze(-1) * x_j
        return block @ x_j

    def message_and_aggregate(self, edge_index: Tensor, x: Tensor, block: Tensor) -> Tensor:
        if block.dim() == 2:
            block = torch.diag_embed(block)
        plain = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
        return sheaf_aggregate(x, plain, block, x.size(0))

    def diffuse(self, lap: SheafLaplacian, h: Tensor) -> Tensor:
        r"""$\Delta_{\mathcal F} h$ for `h` `(n, d, f)` by message passing (equal to
        `lap.matmul(h)`)."""
        n = h.size(0)
        ei, blocks = lap.off_diagonal()
        if not torch.compiler.is_compiling():  # compiled graphs take the message path
            ei, perm = EdgeIndex(ei, sparse_size=(n, n)).sort_by("col")
            if perm is not None:
                blocks = blocks[perm]
        y = lap._scale(h)
        z = lap.diagonal_apply(y) + self.propagate(ei, x=y, block=blocks)
        return lap._scale(z)

    def _update(self, x: Tensor, lap: SheafLaplacian) -> Tensor:
        n = x.size(0)
        xs = x.view(n, self.stalk_dim, self.f_in)
        h = self._weights(xs)
        if not self.residual:  # Hansen & Gebhart: sigma((I - Delta)(I x W1) X W2)
            return self.act(h - self.diffuse(lap, h)).reshape(n, self.out_channels)
        h = self.act(self.diffuse(lap, h))
        x0 = xs if self.skip is None else self.skip(xs)
        if self.epsilon is not None:
            x0 = (1.0 + torch.tanh(self.epsilon)).view(1, -1, 1) * x0
        return (x0 - h).reshape(n, self.out_channels)

    def _inputs(self, x: object, edge_index: object) -> tuple[Tensor, Tensor]:
        """Checked `x` `(n, d f_in)` and a plain `(2, E)` edge_index from any format."""
        name = type(self).__name__
        x = check_node_features(x, layer=name, channels=self.in_channels)
        if (torch.compiler.is_compiling() and isinstance(edge_index, Tensor)
                and not isinstance(edge_index, EdgeIndex) and edge_index.layout == torch.strided):
            return x, edge_index  # the index checks run in eager mode
        ei, _ = as_edge_index(edge_index, x.size(0), layer=name)
        if isinstance(ei, EdgeIndex):
            ei = ei.as_tensor()
        return x, ei.long()

    def _extra_repr(self) -> str:
        return (
            f"stalk_dim={self.stalk_dim}, left_weights={self.left is not None}, "
            f"right_weights={self.right is not None}, epsilon={self.epsilon is not None}, "
            f"residual={self.residual}, augmented={self.augmented}"
        )


class SheafConv(_SheafDiffusionLayer):
    r"""One layer of Neural Sheaf Diffusion (Bodnar et al., NeurIPS 2022) with restriction
    maps learned from the features at every call.

    Node features are $d$-dimensional stalks with $f$ channels each:
    `x` of shape $(n, d f)$ is read as $X \in \mathbb R^{n \times d \times f}$
    (`x.view(n, d, f)`). For every incidence of an (undirected) edge
    $e = \{v, u\}$ the map is predicted from the endpoint features,

    $$
    \mathcal F_{v \trianglelefteq e} = \Phi(\mathbf x_v \,\|\, \mathbf x_u)
    $$

    and shaped as diagonal (`map_type="diag"`, $d$ parameters), orthogonal
    (`"orthogonal"`, $d(d-1)/2$ parameters through `orthogonal_from_params`;
    optionally scaled by a learned edge weight) or general (`"general"`, $d^2$).
    With $\Delta_{\mathcal F}$ the normalised sheaf Laplacian (`SheafLaplacian`)
    the layer computes (NSD eq. 9 with the authors' $\varepsilon$ scaling)

    $$
    X' = \big(1 + \tanh\varepsilon\big) \odot X
         - \sigma\Big(\Delta_{\mathcal F(X)}\, (I_n \otimes W_1)\, X\, W_2\Big),
    $$

    with $W_1 \in \mathbb R^{d\times d}$ (left weights, init $I$),
    $W_2 \in \mathbb R^{f_{in} \times f_{out}}$ (right weights, init orthogonal),
    $\varepsilon \in \mathbb R^d$ per stalk dimension (init 0) and $\sigma$ = ELU.
    `residual=False` gives the sheaf convolution of Hansen & Gebhart instead,
    $X' = \sigma\big((I - \Delta_{\mathcal F})(I_n \otimes W_1) X W_2\big)$.

    Channels: `in_channels = d * f_in` and `out_channels = d * f_out` (default
    `in_channels`). Diffusion keeps the width; when `f_out != f_in` the residual path
    uses a bias-free linear map $X W_{skip}$ (an extension; the paper keeps widths
    equal and maps inputs in and out with MLPs outside the diffusion layers).

    The layer is inductive: maps and Laplacian are built from `edge_index` at every call
    (a directed `edge_index` is symmetrised; self-loops are ignored), and it is
    equivariant to node permutations.

    Args:
        in_channels: $d f_{in}$.
        out_channels: $d f_{out}$ (default `in_channels`).
        stalk_dim: $d$ (NSD default 2).
        map_type: `"diag"`, `"orthogonal"` or `"general"`.
        orthogonal_map: `"householder"` (NSD default), `"cayley"` or `"matrix_exp"`.
        sheaf_hidden_channels: hidden width of the map learner $\Phi$ (`None`: one
            bias-free linear layer, as in NSD).
        sheaf_act: activation on the map parameters (`"tanh"`, NSD default).
        edge_weights: for orthogonal maps, also learn
            $w_e = s(\mathbf x_v\|\mathbf x_u)\, s(\mathbf x_u\|\mathbf x_v)$ with
            $s = \mathrm{sigmoid}(\text{linear})$ and use
            $\mathcal F_{v\trianglelefteq e} = w_e Q_{v\trianglelefteq e}$ (the NSD
            code's option).
        augmented: normalise with $D + I$ (NSD default) rather than $D$.
        left_weights: use $W_1$.
        right_weights: use $W_2$.
        epsilon: learn the $(1 + \tanh\varepsilon)$ scaling (else 1).
        residual: NSD diffusion update (`True`) or Hansen–Gebhart convolution.
        act: $\sigma$ (`"elu"` default; a name or a module).
        dropout: dropout on $X$ before the weights.

    Shapes:
        - **input:** `x` $(n, d f_{in})$, `edge_index` $(2, E)$.
        - **output:** $(n, d f_{out})$.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stalk_dim: int = 2,
        map_type: MapType = "diag",
        orthogonal_map: OrthogonalMap = "householder",
        sheaf_hidden_channels: int | None = None,
        sheaf_act: str | nn.Module | None = "tanh",
        edge_weights: bool = False,
        augmented: bool = True,
        left_weights: bool = True,
        right_weights: bool = True,
        epsilon: bool = True,
        residual: bool = True,
        act: str | nn.Module | None = "elu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            stalk_dim,
            left_weights,
            right_weights,
            epsilon,
            residual,
            act,
            dropout,
            augmented,
        )
        if map_type not in ("diag", "orthogonal", "general"):
            raise ValueError(f"unknown map_type {map_type!r}")
        if orthogonal_map not in ("householder", "cayley", "matrix_exp"):
            raise ValueError(f"unknown orthogonal_map {orthogonal_map!r}")
        if edge_weights and map_type != "orthogonal":
            raise ValueError("edge_weights is an option of map_type='orthogonal'")
        d = stalk_dim
        self.map_type = map_type
        self.orthogonal_map = orthogonal_map
        self.num_map_params = {
            "diag": d,
            "orthogonal": num_orthogonal_params(d),
            "general": d * d,
        }[map_type]
        self.learner = (
            SheafLearner(in_channels, self.num_map_params, sheaf_hidden_channels, sheaf_act)
            if self.num_map_params > 0
            else None
        )
        self.edge_weight_learner = nn.Linear(2 * in_channels, 1) if edge_weights else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""NSD initialisation: $W_1 = I$, $W_2$ orthogonal, $\varepsilon=0$,
        PyTorch defaults for the map learner."""
        self._reset_update()
        if self.learner is not None:
            self.learner.reset_parameters()
        if self.edge_weight_learner is not None:
            self.edge_weight_learner.reset_parameters()

    def restriction_maps(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""The undirected edges `(2, E)` and the maps
        $\mathcal F_{a\trianglelefteq e}$, $\mathcal F_{b\trianglelefteq e}$
        (`(E, d)` for diagonal maps, else `(E, d, d)`)."""
        n, d = x.size(0), self.stalk_dim
        und = undirected_edges(edge_index, n)
        e = und.size(1)
        src = torch.cat([und[0], und[1]])
        dst = torch.cat([und[1], und[0]])
        if self.learner is not None:
            params = self.learner(x, src, dst)
        else:
            params = x.new_zeros(2 * e, 0)
        maps = maps_from_params(params, self.map_type, d, self.orthogonal_map)
        if self.map_type == "orthogonal" and self.edge_weight_learner is not None:
            s = torch.sigmoid(self.edge_weight_learner(torch.cat([x[src], x[dst]], -1)))
            w = s[:e] * s[e:]  # symmetric: the same weight on both incidences
            maps = maps * torch.cat([w, w]).view(-1, 1, 1)
        return und, maps[:e], maps[e:]

    def laplacian(self, x: Tensor, edge_index: Tensor) -> SheafLaplacian:
        r"""The normalised sheaf Laplacian $\Delta_{\mathcal F(X)}$ of this input."""
        und, fa, fb = self.restriction_maps(x, edge_index)
        return SheafLaplacian(und, fa, fb, x.size(0), self.map_type, self.augmented)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        r"""One diffusion step; `x` is $(n, d f_{in})$, returns $(n, d f_{out})$.
        `edge_index` may be any PyG adjacency format (values of a weighted sparse
        adjacency are ignored: the maps carry the weights)."""
        x, edge_index = self._inputs(x, edge_index)
        return self._update(x, self.laplacian(x, edge_index))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"map_type={self.map_type!r}, "
            + (f"orthogonal_map={self.orthogonal_map!r}, " if self.map_type == "orthogonal" else "")
            + f"{self._extra_repr()})"
        )


# --------------------------------------------------------------------------- connection


class ConnectionLaplacian(nn.Module):
    r"""Non-learned orthogonal sheaf from local PCA and Procrustes alignment
    (Barbero et al. 2022, following vector diffusion maps of Singer & Wu).

    For every node $i$ with neighbourhood $\mathcal N(i)$ (graph neighbours,
    topped up with the nearest nodes in feature space when fewer than `min_neighbors`),
    local PCA of the centred neighbours gives an orthonormal basis
    $O_i \in \mathbb R^{p \times d}$ of the approximate tangent space at
    $\mathbf x_i$: the top $d$ left singular vectors of
    $[\mathbf x_j - \mathbf x_i]_{j \in \mathcal N(i)} \in \mathbb R^{p \times k}$
    (the sign of each vector fixed from the neighbours' coordinates in it, so that
    $\sum_j c_{kj}^3 > 0$ with $c_{kj} = u_k^\top(\mathbf x_j - \mathbf x_i)$; this is
    independent of neighbour order and *gauge invariant*: rotating, reflecting or
    translating `pos` by any $\mathbf x \mapsto R\mathbf x + \mathbf b$, $R \in O(p)$,
    turns every $O_i$ into $R O_i$ and leaves the transports and the Laplacian unchanged,
    wherever the top $d$ singular values of each neighbourhood are distinct and non-zero,
    as they are for points in general position). Neighbouring tangent spaces are aligned by the
    closest orthogonal matrix (orthogonal Procrustes)

    $$
    O_{ij} = \operatorname*{arg\,min}_{O \in O(d)} \lVert O - O_i^\top O_j \rVert_F
           = U V^\top, \qquad O_i^\top O_j = U \Sigma V^\top,
    $$

    and the restriction maps of an edge $e = \{a, b\}$, $a < b$, are
    $\mathcal F_{a\trianglelefteq e} = I$, $\mathcal F_{b\trianglelefteq e} =
    O_{ab}$, so the transport $\mathcal F_a^\top \mathcal F_b = O_{ab}$ (and
    $O_{ba} = O_{ab}^\top$). The result is the normalised connection Laplacian
    $\Delta = \tilde D^{-1/2} L \tilde D^{-1/2}$, $\tilde D = (\deg + 1) I$
    (`augmented`) or $\deg\, I$.

    The maps are fixed preprocessing: they are computed without gradient. Memory is
    $O(n k_{max} p)$ with $k_{max}$ the largest neighbourhood.

    Args:
        stalk_dim: $d$ (at most the feature size $p$).
        augmented: normalise with $\deg + 1$.
        min_neighbors: neighbourhoods smaller than this (default $d$) are topped up
            with nearest neighbours in feature space (`0` disables it).

    Shapes:
        - **input:** `pos` $(n, p)$, `edge_index` $(2, E)$.
        - **output:** a `SheafLaplacian` with `map_type="orthogonal"`.
    """

    def __init__(
        self, stalk_dim: int, augmented: bool = True, min_neighbors: int | None = None
    ) -> None:
        super().__init__()
        self.stalk_dim = stalk_dim
        self.augmented = augmented
        self.min_neighbors = stalk_dim if min_neighbors is None else min_neighbors

    def _neighbourhoods(self, pos: Tensor, und: Tensor) -> tuple[Tensor, Tensor]:
        n = pos.size(0)
        row = torch.cat([und[0], und[1]])
        nbr = torch.cat([und[1], und[0]])
        deg = torch.bincount(row, minlength=n)
        need = (self.min_neighbors - deg).clamp_min(0).clamp_max(n - 1 - deg)
        lacking = (need > 0).nonzero().view(-1)
        if lacking.numel() > 0:
            k = int(need.max())
            dist = torch.cdist(pos[lacking], pos)
            local = torch.full((n,), -1, dtype=torch.long, device=pos.device)
            local[lacking] = torch.arange(lacking.numel(), device=pos.device)
            dist[torch.arange(lacking.numel(), device=pos.device), lacking] = float("inf")
            hit = local[row] >= 0
            dist[local[row[hit]], nbr[hit]] = float("inf")
            cand = dist.topk(k, dim=1, largest=False).indices  # (L, k)
            take = torch.arange(k, device=pos.device).view(1, -1) < need[lacking].view(-1, 1)
            row = torch.cat([row, lacking.view(-1, 1).expand(-1, k)[take]])
            nbr = torch.cat([nbr, cand[take]])
        return row, nbr

    @torch.no_grad()
    def local_bases(self, pos: Tensor, edge_index: Tensor) -> Tensor:
        """The local PCA bases $O_i$, `(n, p, d)`."""
        n, p = pos.shape
        d = self.stalk_dim
        if d > p:
            raise ValueError(f"stalk_dim={d} exceeds the feature size {p}")
        und = undirected_edges(edge_index, n)
        return self._bases(pos, und)

    def _bases(self, pos: Tensor, und: Tensor) -> Tensor:
        n, p = pos.shape
        d = self.stalk_dim
        row, nbr = self._neighbourhoods(pos, und)
        order = torch.argsort(row, stable=True)
        row, nbr = row[order], nbr[order]
        counts = torch.bincount(row, minlength=n)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(row.numel(), device=pos.device) - start[row]
        k = max(int(counts.max()) if row.numel() else 0, d)
        local = pos.new_zeros(n, p, k)
        local[row, :, slot] = pos[nbr] - pos[row]
        u = torch.linalg.svd(local, full_matrices=False)[0][..., :d]  # (n, p, d)
        # gauge: fix the sign of every basis vector u_k from the coordinates of the
        # neighbours in it, c_kj = u_k . (x_j - x_i), which a rotation or reflection of pos
        # leaves unchanged (up to that very sign): make sum_j c_kj^3 positive, or, when it
        # vanishes (a symmetric neighbourhood), the largest-magnitude c_kj
        coef = u.transpose(-1, -2) @ local  # (n, d, k)
        skew = coef.pow(3).sum(-1)  # (n, d)
        scale = coef.abs().amax(-1).pow(3) * k
        big = torch.gather(coef, -1, coef.abs().argmax(-1, keepdim=True)).squeeze(-1)
        tiny = skew.abs() <= 1e-9 * scale
        sign = torch.where(tiny, torch.sign(big), torch.sign(skew))
        return u * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)

    @torch.no_grad()
    def transports(self, pos: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        r"""Undirected edges `(2, E)` and the aligned transports $O_{ab}$
        `(E, d, d)`."""
        n, p = pos.shape
        if self.stalk_dim > p:
            raise ValueError(f"stalk_dim={self.stalk_dim} exceeds the feature size {p}")
        und = undirected_edges(edge_index, n)
        bases = self._bases(pos, und)
        s = bases[und[0]].transpose(-1, -2) @ bases[und[1]]
        u, _, vh = torch.linalg.svd(s)
        return und, u @ vh

    def forward(self, pos: Tensor, edge_index: Tensor) -> SheafLaplacian:
        und, o = self.transports(pos, edge_index)
        eye = torch.eye(self.stalk_dim, dtype=o.dtype, device=o.device).expand_as(o)
        return SheafLaplacian(und, eye, o, pos.size(0), "orthogonal", self.augmented)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(stalk_dim={self.stalk_dim}, "
            f"augmented={self.augmented}, min_neighbors={self.min_neighbors})"
        )


class ConnectionSheafConv(_SheafDiffusionLayer):
    r"""Sheaf diffusion on the connection Laplacian of Barbero et al. (2022): the NSD update
    of `SheafConv` with fixed orthogonal restriction maps from local PCA and
    Procrustes alignment (`ConnectionLaplacian`) instead of learned ones,

    $$
    X' = \big(1 + \tanh\varepsilon\big) \odot X
         - \sigma\Big(\Delta_{\mathrm{conn}}\, (I_n \otimes W_1)\, X\, W_2\Big).
    $$

    The maps come from `pos` (the features whose local geometry defines the tangent
    spaces: in the paper, the raw input node features; default `x` itself), or a
    precomputed `laplacian` can be passed so it is built once per graph. Nothing is tied
    to a graph at construction.

    Args:
        in_channels: $d f_{in}$.
        out_channels: $d f_{out}$ (default `in_channels`).
        stalk_dim: $d$.
        augmented: normalise with $\deg + 1$.
        min_neighbors: see `ConnectionLaplacian`.
        left_weights, right_weights, epsilon, residual, act, dropout: as in
            `SheafConv`.

    Shapes:
        - **input:** `x` $(n, d f_{in})$, `edge_index` $(2, E)$, `pos`
          $(n, p)$ with $p \ge d$ (optional).
        - **output:** $(n, d f_{out})$.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stalk_dim: int = 2,
        augmented: bool = True,
        min_neighbors: int | None = None,
        left_weights: bool = True,
        right_weights: bool = True,
        epsilon: bool = True,
        residual: bool = True,
        act: str | nn.Module | None = "elu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            stalk_dim,
            left_weights,
            right_weights,
            epsilon,
            residual,
            act,
            dropout,
            augmented,
        )
        self.connection = ConnectionLaplacian(stalk_dim, augmented, min_neighbors)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""NSD initialisation: $W_1 = I$, $W_2$ orthogonal, $\varepsilon=0$."""
        self._reset_update()

    def laplacian(self, pos: Tensor, edge_index: Tensor) -> SheafLaplacian:
        """The normalised connection Laplacian built from `pos`."""
        return self.connection(pos, edge_index)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        pos: Tensor | None = None,
        laplacian: SheafLaplacian | None = None,
    ) -> Tensor:
        """One diffusion step; `laplacian` (if given) overrides `pos`/`edge_index`."""
        name = type(self).__name__
        x, edge_index = self._inputs(x, edge_index)
        if laplacian is None:
            if pos is not None:
                check_node_features(pos, "pos", layer=name, num_nodes=x.size(0))
            laplacian = self.connection(x if pos is None else pos, edge_index)
        elif is_validation_enabled() and laplacian.num_nodes != x.size(0):
            raise GraphInputError(f"{name}: laplacian has {laplacian.num_nodes} nodes but x "
                                  f"has shape {tuple(x.shape)}")
        if laplacian.map_type != "orthogonal" or laplacian.stalk_dim != self.stalk_dim:
            raise ValueError("the Laplacian does not match this layer's stalk dimension")
        return self._update(x, laplacian)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"{self._extra_repr()})"
        )
