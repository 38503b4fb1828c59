r"""Unitary / orthogonal graph convolutions.

* :class:`UnitaryConv` and :class:`LieUnitaryConv`: B. T. Kiani, L. Fesser, M. Weber,
  "Unitary Convolutions for Learning on Graphs and Groups", NeurIPS 2024,
  https://arxiv.org/abs/2410.05499 (UniConv, Lie UniConv and their real/orthogonal forms).
* :class:`GUMPConv`: H. Qiu, Y. Bian, Q. Yao, "Graph Unitary Message Passing",
  https://arxiv.org/abs/2403.11199 (2024; journal version 2025).

Complex features are accepted either as complex tensors or in a *real channel-paired*
form: a real tensor with ``2 * C`` columns whose first ``C`` columns are the real parts and
whose last ``C`` columns are the imaginary parts (see :func:`complex_to_real` and
:func:`real_to_complex`). All propagation is sparse message passing over ``edge_index``
(``graphspace.ops.scatter``); no dense :math:`N \times N` matrix is ever formed.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import (
    add_remaining_self_loops,
    coalesce,
    remove_self_loops,
    to_undirected,
)

from graphspace.ops import scatter

__all__ = [
    "GUMPConv",
    "LieUnitaryConv",
    "LineDigraph",
    "UnitaryConv",
    "arc_to_node",
    "complex_to_real",
    "gump_arcs",
    "line_digraph",
    "node_to_arc",
    "polar_factor",
    "real_to_complex",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def complex_to_real(x: Tensor) -> Tensor:
    """Complex ``(..., C)`` -> real channel-paired ``(..., 2C)`` = ``[Re | Im]``."""
    return torch.cat([x.real, x.imag], dim=-1)


def real_to_complex(x: Tensor) -> Tensor:
    """Real channel-paired ``(..., 2C)`` = ``[Re | Im]`` -> complex ``(..., C)``."""
    re, im = x.chunk(2, dim=-1)
    return torch.complex(re, im)


def _to_pair(x: Tensor, channels: int) -> tuple[Tensor, Tensor, bool]:
    if x.is_complex():
        if x.size(-1) != channels:
            raise ValueError(f"expected {channels} complex channels, got {x.size(-1)}")
        return x.real, x.imag, True
    if x.size(-1) != 2 * channels:
        raise ValueError(
            f"a real input must be channel-paired [Re | Im] with 2 * {channels} columns, "
            f"got {x.size(-1)}"
        )
    re, im = x.chunk(2, dim=-1)
    return re, im, False


def _from_pair(re: Tensor, im: Tensor, as_complex: bool) -> Tensor:
    return torch.complex(re, im) if as_complex else torch.cat([re, im], dim=-1)


def _times_i(z: Tensor) -> Tensor:
    """Multiply a channel-paired tensor ``[Re | Im]`` by the imaginary unit."""
    re, im = z.chunk(2, dim=-1)
    return torch.cat([-im, re], dim=-1)


def _cmatmul(re: Tensor, im: Tensor, w_re: Tensor, w_im: Tensor) -> tuple[Tensor, Tensor]:
    """``(re + i im) @ (w_re + i w_im)`` in real arithmetic."""
    return re @ w_re - im @ w_im, re @ w_im + im @ w_re


def _adjacency(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    num_nodes: int,
    normalize: bool,
    add_self_loops: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    if normalize:
        ei, ew = gcn_norm(
            edge_index, edge_weight, num_nodes, False, add_self_loops, "source_to_target", dtype
        )
        assert ew is not None
        return ei, ew
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    if add_self_loops:
        edge_index, edge_weight = add_remaining_self_loops(edge_index, edge_weight, 1.0, num_nodes)
    assert edge_weight is not None
    return edge_index, edge_weight.to(dtype)


def _propagate(x: Tensor, edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> Tensor:
    r"""Sparse :math:`\hat{A} x` with :math:`\hat{A}_{ij}` = weight of edge ``j -> i``."""
    msg = x.index_select(0, edge_index[0]) * edge_weight.unsqueeze(-1)
    return scatter(msg, edge_index[1], dim=0, dim_size=num_nodes, reduce="sum")


def _skew_hermitian_exp(g_re: Tensor, g_im: Tensor) -> tuple[Tensor, Tensor]:
    r"""Unitary :math:`\exp(S)` for :math:`S = B - B^\dagger`, :math:`B = g_{re} + i g_{im}`,
    via the real :math:`2m \times 2m` representation (works for any real dtype)."""
    s_re = g_re - g_re.T
    s_im = g_im + g_im.T
    m = s_re.size(0)
    rep = torch.cat([torch.cat([s_re, s_im], 1), torch.cat([-s_im, s_re], 1)], 0)
    e = torch.linalg.matrix_exp(rep)
    return e[:m, :m], e[:m, m:]


# ---------------------------------------------------------------------------------------
# UniConv
# ---------------------------------------------------------------------------------------


class UnitaryConv(nn.Module):
    r"""Separable unitary graph convolution (UniConv, Kiani et al. 2024, Def. 3):

    .. math::
        \mathbf{X}' = \exp\!\big(i\, t\, \hat{\mathbf{A}}\big)\, \mathbf{X}\, \mathbf{W}
        \;(+\, \mathbf{b}),
        \qquad
        \exp\!\big(i t \hat{\mathbf{A}}\big) \mathbf{X} \approx
        \sum_{k=0}^{K} \frac{(i t)^k}{k!} \hat{\mathbf{A}}^k \mathbf{X}

    with :math:`\hat{\mathbf{A}} = \tilde{\mathbf{D}}^{-1/2} (\mathbf{A} + \mathbf{I})
    \tilde{\mathbf{D}}^{-1/2}` (``normalize=True``; spectrum in :math:`(-1, 1]`). The
    truncated Taylor series is evaluated by :math:`K` sparse propagations; for a symmetric
    (undirected) :math:`\hat{\mathbf{A}}` the exact operator is unitary and the truncation
    error is at most :math:`\frac{(|t| \lVert\hat{\mathbf{A}}\rVert_2)^{K+1}}{(K+1)!}
    \lVert\mathbf{X}\rVert` (:math:`\approx 2.5 \cdot 10^{-8}` for :math:`K=10`,
    :math:`|t| \le 1`).

    Features are complex (a complex tensor, or the real channel-paired ``[Re | Im]`` form;
    the real form computes :math:`\cos(t\hat{A})X_{re} - \sin(t\hat{A})X_{im}` etc. with real
    arithmetic only, as the paper's "orthogonal" layers do). The weight :math:`\mathbf{W}
    \in \mathbb{C}^{F_{in} \times F_{out}}` is unconstrained in the paper
    (``weight="dense"``); ``weight="unitary"`` constrains it to have orthonormal rows
    (columns if :math:`F_{in} > F_{out}`), :math:`\mathbf{W} = \exp(\mathbf{S})_{:F_{in},
    :F_{out}}` with :math:`\mathbf{S}` skew-Hermitian, which makes the whole layer
    norm-preserving when :math:`F_{in} \le F_{out}`; ``weight="identity"`` drops it.
    Non-linearities (the paper applies ReLU separately to real and imaginary parts) are
    left to the model.

    Args:
        in_channels: complex input channels :math:`F_{in}`.
        out_channels: complex output channels :math:`F_{out}`.
        order: Taylor truncation :math:`K` (the paper's ``T``, default 10).
        t: initial time :math:`t` (the paper uses :math:`t = 1`).
        learn_t: make :math:`t` a learnable parameter.
        weight: ``"dense"``, ``"unitary"`` or ``"identity"``.
        normalize: use the symmetric GCN normalisation of the adjacency.
        add_self_loops: add self loops before normalising.
        bias: add a learnable complex bias (breaks exact unitarity).

    Shapes:
        - **input:** ``x`` :math:`(N, F_{in})` complex or :math:`(N, 2F_{in})` real,
          ``edge_index`` :math:`(2, E)` (undirected), ``edge_weight`` :math:`(E,)`.
        - **output:** :math:`(N, F_{out})` complex or :math:`(N, 2F_{out})` real (same form
          as the input).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        order: int = 10,
        t: float = 1.0,
        learn_t: bool = False,
        weight: Literal["dense", "unitary", "identity"] = "dense",
        normalize: bool = True,
        add_self_loops: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if weight not in ("dense", "unitary", "identity"):
            raise ValueError(f"unknown weight type {weight!r}")
        if weight == "identity" and in_channels != out_channels:
            raise ValueError("weight='identity' needs in_channels == out_channels")
        if order < 1:
            raise ValueError("order must be >= 1")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.order = order
        self.weight_type = weight
        self.normalize = normalize
        self.add_self_loops = add_self_loops
        if learn_t:
            self.t = nn.Parameter(torch.tensor(float(t)))
        else:
            self.register_buffer("t", torch.tensor(float(t)))
        self._t_init = float(t)
        m = max(in_channels, out_channels)
        shape = (m, m) if weight == "unitary" else (in_channels, out_channels)
        if weight == "identity":
            self.register_parameter("weight_re", None)
            self.register_parameter("weight_im", None)
        else:
            self.weight_re = nn.Parameter(torch.empty(shape))
            self.weight_im = nn.Parameter(torch.empty(shape))
        if bias:
            self.bias = nn.Parameter(torch.empty(2 * out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-style init of the complex weight (variance split between the real and
        imaginary parts), small random generator for ``weight="unitary"``, zero bias."""
        if self.weight_re is not None:
            if self.weight_type == "unitary":
                std = 1.0 / math.sqrt(2 * self.weight_re.size(0))
                nn.init.normal_(self.weight_re, 0.0, std)
                nn.init.normal_(self.weight_im, 0.0, std)
            else:
                bound = math.sqrt(3.0 / (self.in_channels + self.out_channels))
                nn.init.uniform_(self.weight_re, -bound, bound)
                nn.init.uniform_(self.weight_im, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if not isinstance(self.t, nn.Parameter):
            self.t.fill_(self._t_init)

    def complex_weight(self) -> tuple[Tensor, Tensor] | None:
        """The effective weight as ``(real, imag)`` of shape ``(F_in, F_out)``."""
        if self.weight_re is None:
            return None
        if self.weight_type == "unitary":
            e_re, e_im = _skew_hermitian_exp(self.weight_re, self.weight_im)
            return (
                e_re[: self.in_channels, : self.out_channels],
                e_im[: self.in_channels, : self.out_channels],
            )
        return self.weight_re, self.weight_im

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Apply the layer; the output has the same (complex or paired) form as ``x``."""
        re, im, as_complex = _to_pair(x, self.in_channels)
        n = re.size(0)
        w = self.complex_weight()
        if w is not None and self.out_channels < self.in_channels:
            re, im = _cmatmul(re, im, *w)
        ei, ew = _adjacency(
            edge_index, edge_weight, n, self.normalize, self.add_self_loops, re.dtype
        )
        z = torch.cat([re, im], dim=-1)
        term, out = z, z
        for k in range(1, self.order + 1):
            term = _times_i(_propagate(term, ei, ew, n)) * (self.t / k)
            out = out + term
        re, im = out.chunk(2, dim=-1)
        if w is not None and self.out_channels >= self.in_channels:
            re, im = _cmatmul(re, im, *w)
        if self.bias is not None:
            b_re, b_im = self.bias.chunk(2)
            re, im = re + b_re, im + b_im
        return _from_pair(re, im, as_complex)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"order={self.order}, weight={self.weight_type!r})"
        )


# ---------------------------------------------------------------------------------------
# Lie UniConv
# ---------------------------------------------------------------------------------------


class LieUnitaryConv(nn.Module):
    r"""Lie unitary / orthogonal graph convolution (Lie UniConv, Kiani et al. 2024):

    .. math::
        \mathbf{X}' = \exp\!\big(g_{conv}\big)(\mathbf{X}) \approx
        \sum_{k=0}^{K} \frac{1}{k!}\, g_{conv}^{k}(\mathbf{X}),
        \qquad
        g_{conv}(\mathbf{X}) =
        \begin{cases}
            \hat{\mathbf{A}} \mathbf{X} \mathbf{W}, &
                \mathbf{W} = \mathbf{B} - \mathbf{B}^\top \text{ (real, orthogonal)} \\
            i\, \hat{\mathbf{A}} \mathbf{X} \mathbf{H}, &
                \mathbf{H} = \tfrac12(\mathbf{B} + \mathbf{B}^\dagger) \text{ (complex,
                unitary)}
        \end{cases}

    As a linear map on :math:`\mathrm{vec}(\mathbf{X})`, :math:`g_{conv} =
    \hat{\mathbf{A}} \otimes \mathbf{W}^\top` (resp. :math:`i \hat{\mathbf{A}} \otimes
    \mathbf{H}^\top`), which is skew-symmetric (skew-Hermitian) for a symmetric
    :math:`\hat{\mathbf{A}}`, so :math:`\exp(g_{conv})` is orthogonal (unitary): the layer
    preserves :math:`\lVert\mathbf{X}\rVert_F` and is invertible. Each Taylor term costs one
    sparse propagation and one :math:`F \times F` product.

    ``complex=False`` (default) is the real orthogonal variant on real features
    :math:`(N, F)`; ``complex=True`` takes complex features (or the channel-paired real form
    :math:`(N, 2F)`). The paper requires :math:`F_{in} = F_{out}`; here
    :math:`F_{in} < F_{out}` is allowed by zero-padding the input (an isometry).

    Args:
        in_channels: input channels.
        out_channels: output channels (:math:`\ge` ``in_channels``).
        complex: complex (unitary) instead of real (orthogonal) form.
        order: Taylor truncation :math:`K` (default 10).
        normalize: symmetric GCN normalisation of the adjacency.
        add_self_loops: add self loops before normalising.
        bias: add a learnable bias (breaks exact norm preservation).

    Shapes:
        - **input:** ``x`` :math:`(N, F_{in})` real (``complex=False``), or complex
          :math:`(N, F_{in})` / paired real :math:`(N, 2F_{in})` (``complex=True``);
          ``edge_index`` :math:`(2, E)` (undirected); ``edge_weight`` :math:`(E,)`.
        - **output:** the same form with :math:`F_{out}` channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        complex: bool = False,
        order: int = 10,
        normalize: bool = True,
        add_self_loops: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("LieUnitaryConv needs out_channels >= in_channels")
        if order < 1:
            raise ValueError("order must be >= 1")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.complex = complex
        self.order = order
        self.normalize = normalize
        self.add_self_loops = add_self_loops
        self.weight_re = nn.Parameter(torch.empty(out_channels, out_channels))
        if complex:
            self.weight_im = nn.Parameter(torch.empty(out_channels, out_channels))
        else:
            self.register_parameter("weight_im", None)
        width = 2 * out_channels if complex else out_channels
        self.bias = nn.Parameter(torch.empty(width)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init of :math:`\\mathbf{B}` scaled so that the generator has spectral
        norm of order one (keeps the Taylor series accurate); zero bias."""
        std = 1.0 / (2.0 * math.sqrt(2.0 * self.out_channels))
        nn.init.normal_(self.weight_re, 0.0, std)
        if self.weight_im is not None:
            nn.init.normal_(self.weight_im, 0.0, std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def generator_weight(self) -> Tensor | tuple[Tensor, Tensor]:
        """Skew-symmetric :math:`\\mathbf{W}` (real) or Hermitian :math:`\\mathbf{H}` as
        ``(real, imag)`` (complex)."""
        b = self.weight_re
        if self.weight_im is None:
            return b - b.T
        return 0.5 * (b + b.T), 0.5 * (self.weight_im - self.weight_im.T)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Apply :math:`\\exp(g_{conv})` (+ bias); same input/output form."""
        pad = self.out_channels - self.in_channels
        as_complex = False
        if self.complex:
            re, im, as_complex = _to_pair(x, self.in_channels)
            if pad:
                re = nn.functional.pad(re, (0, pad))
                im = nn.functional.pad(im, (0, pad))
            z = torch.cat([re, im], dim=-1)
        else:
            if x.is_complex():
                raise ValueError("complex input needs LieUnitaryConv(..., complex=True)")
            if x.size(-1) != self.in_channels:
                raise ValueError(f"expected {self.in_channels} channels, got {x.size(-1)}")
            z = nn.functional.pad(x, (0, pad)) if pad else x
        n = z.size(0)
        ei, ew = _adjacency(
            edge_index, edge_weight, n, self.normalize, self.add_self_loops, z.dtype
        )
        w = self.generator_weight()

        def g(y: Tensor) -> Tensor:
            if isinstance(w, tuple):
                y_re, y_im = y.chunk(2, dim=-1)
                y = _times_i(torch.cat(_cmatmul(y_re, y_im, w[0], w[1]), dim=-1))
            else:
                y = y @ w
            return _propagate(y, ei, ew, n)

        term, out = z, z
        for k in range(1, self.order + 1):
            term = g(term) / k
            out = out + term
        if self.bias is not None:
            out = out + self.bias
        if self.complex:
            re, im = out.chunk(2, dim=-1)
            return _from_pair(re, im, as_complex)
        return out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"complex={self.complex}, order={self.order})"
        )


# ---------------------------------------------------------------------------------------
# GUMP
# ---------------------------------------------------------------------------------------


class LineDigraph(NamedTuple):
    """Block structure of the line digraph of an Eulerian digraph (see :func:`line_digraph`).

    Attributes:
        line_index: ``(2, L)``: line edge ``a -> b`` between arcs ``a = (u -> v)`` and
            ``b = (v -> w)`` (messages flow from arc ``a`` to arc ``b``).
        center: ``(L,)``: the shared node ``v`` of each line edge.
        backtrack: ``(L,)`` bool: ``b`` is the reverse of ``a`` (``w == u``).
        degree: ``(N,)``: in-degree (= out-degree) of every node.
        perm: ``(L,)``: line edges ordered block by block (node by node, grouped by
            degree), row-major inside each ``d x d`` block (row = out-arc, col = in-arc).
        inv_perm: the inverse permutation of ``perm``.
        block_sizes: the distinct degrees ``d`` present.
        block_counts: the number of nodes having each degree.
        num_arcs: number of arcs (line-graph nodes).
    """

    line_index: Tensor
    center: Tensor
    backtrack: Tensor
    degree: Tensor
    perm: Tensor
    inv_perm: Tensor
    block_sizes: list[int]
    block_counts: list[int]
    num_arcs: int


def gump_arcs(edge_index: Tensor, num_nodes: int | None = None) -> Tensor:
    """GUMP's graph transformation: the bidirected, loop-free, coalesced arc list of a
    graph (every undirected edge ``{u, v}`` becomes the arcs ``u -> v`` and ``v -> u``).
    A bidirected digraph is Eulerian (in-degree = out-degree), so its line digraph
    supports a unitary adjacency matrix."""
    ei, _ = remove_self_loops(edge_index)
    return coalesce(to_undirected(ei, num_nodes=num_nodes), num_nodes=num_nodes)


def node_to_arc(x: Tensor, arc_index: Tensor) -> Tensor:
    """Lift node features to arcs: ``[x_u | x_v]`` for arc ``u -> v``."""
    return torch.cat([x[arc_index[0]], x[arc_index[1]]], dim=-1)


def arc_to_node(x_arc: Tensor, arc_index: Tensor, num_nodes: int, reduce: str = "sum") -> Tensor:
    """Pool arc features to their head nodes (``reduce`` over the in-arcs of each node)."""
    return scatter(x_arc, arc_index[1], dim=0, dim_size=num_nodes, reduce=reduce)


def line_digraph(arc_index: Tensor, num_nodes: int | None = None) -> LineDigraph:
    r"""The line digraph :math:`L(G)` of an Eulerian digraph :math:`G` and its block
    structure. Its nodes are the arcs of :math:`G`; arc :math:`a = (u \to v)` is linked to
    every arc :math:`b = (v \to w)` (backtracking :math:`w = u` included). Grouping the
    in-arcs and out-arcs of every node :math:`v` shows that the adjacency of :math:`L(G)`
    is, up to row and column permutations, block diagonal with one full
    :math:`d_v \times d_v` block per node, so any matrix with unitary blocks on this
    support is unitary.

    Args:
        arc_index: ``(2, A)`` arcs (e.g. from :func:`gump_arcs`), without duplicates.
        num_nodes: number of nodes of :math:`G`.

    Raises:
        ValueError: if some node's in-degree differs from its out-degree.
    """
    src, dst = arc_index[0], arc_index[1]
    a_count = src.numel()
    if num_nodes is None:
        num_nodes = int(arc_index.max()) + 1 if a_count else 0
    n = num_nodes
    out_deg = torch.bincount(src, minlength=n)
    in_deg = torch.bincount(dst, minlength=n)
    if not torch.equal(out_deg, in_deg):
        raise ValueError(
            "GUMP needs an Eulerian digraph (in-degree == out-degree at every node); "
            "use gump_arcs(edge_index) to bidirect the graph first"
        )
    device = arc_index.device
    ar = torch.arange(a_count, device=device)
    ptr = torch.zeros(n + 1, dtype=torch.long, device=device)
    ptr[1:] = torch.cumsum(out_deg, 0)
    order_out = torch.argsort(src, stable=True)
    order_in = torch.argsort(dst, stable=True)
    in_pos = torch.empty_like(ar)
    in_pos[order_in] = ar - ptr[dst[order_in]]

    cnt = out_deg[dst]  # every arc a = (u -> v) meets the d_v out-arcs of v
    a_rep = torch.repeat_interleave(ar, cnt)
    start = torch.cumsum(cnt, 0) - cnt
    k = torch.arange(a_rep.numel(), device=device) - torch.repeat_interleave(start, cnt)
    center = dst[a_rep]
    b = order_out[ptr[center] + k]
    row, col = k, in_pos[a_rep]  # row: out-arc position, col: in-arc position
    backtrack = dst[b] == src[a_rep]

    deg_l = out_deg[center]
    sizes = torch.unique(out_deg[out_deg > 0]).tolist()
    counts: list[int] = []
    perms: list[Tensor] = []
    for d in sizes:
        sel = (deg_l == d).nonzero().view(-1)
        # order by (node, row, col) -> a (n_d, d, d) row-major block tensor
        key = (center[sel] * d + row[sel]) * d + col[sel]
        perms.append(sel[torch.argsort(key)])
        counts.append(int((out_deg == d).sum()))
    perm = torch.cat(perms) if perms else torch.empty(0, dtype=torch.long, device=device)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)
    return LineDigraph(
        line_index=torch.stack([a_rep, b]),
        center=center,
        backtrack=backtrack,
        degree=out_deg,
        perm=perm,
        inv_perm=inv_perm,
        block_sizes=[int(d) for d in sizes],
        block_counts=counts,
        num_arcs=a_count,
    )


class _PolarSVD(torch.autograd.Function):
    r"""Polar factor via SVD with a stable backward.

    With :math:`\mathbf{M} = \mathbf{W}\boldsymbol{\Sigma}\mathbf{V}^\top`,
    :math:`\mathbf{U} = \mathbf{W}\mathbf{V}^\top` and :math:`\mathbf{P} =
    \mathbf{V}\boldsymbol{\Sigma}\mathbf{V}^\top`, a perturbation gives
    :math:`d\mathbf{U} = \mathbf{U}\boldsymbol{\Omega}` with
    :math:`\boldsymbol{\Omega}\mathbf{P} + \mathbf{P}\boldsymbol{\Omega} =
    \mathbf{U}^\top d\mathbf{M} - d\mathbf{M}^\top \mathbf{U}`, hence
    :math:`\partial L/\partial \mathbf{M} = 2\mathbf{U}\mathbf{Y}`,
    :math:`\mathbf{Y} = \mathbf{V}\big[(\mathbf{V}^\top \mathrm{skew}(\mathbf{U}^\top
    \mathbf{G})\mathbf{V})_{ij} / (\sigma_i + \sigma_j)\big]\mathbf{V}^\top`. Only
    :math:`\sigma_i + \sigma_j` appears, so repeated singular values (e.g. an already
    orthogonal block) are harmless, unlike the generic SVD backward.
    """

    @staticmethod
    def forward(ctx, m: Tensor) -> Tensor:  # type: ignore[override]
        w, sig, vh = torch.linalg.svd(m)
        u = w @ vh
        ctx.save_for_backward(u, sig, vh)
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        u, sig, vh = ctx.saved_tensors
        a = u.transpose(-1, -2) @ grad
        skew = 0.5 * (a - a.transpose(-1, -2))
        v = vh.transpose(-1, -2)
        c = vh @ skew @ v
        denom = sig.unsqueeze(-1) + sig.unsqueeze(-2)
        y = torch.where(denom > 0, c / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0)
        return 2.0 * u @ (v @ y @ vh)


def polar_factor(
    m: Tensor, method: Literal["svd", "newton_schulz"] = "svd", steps: int = 30
) -> Tensor:
    r"""Unitary polar factor :math:`\mathbf{U} = \mathbf{M} (\mathbf{M}^\top
    \mathbf{M})^{-1/2}` of a batch of square matrices (the closest orthogonal matrix in
    Frobenius norm): all singular values set to one.

    ``"svd"``: :math:`\mathbf{M} = \mathbf{P}\boldsymbol{\Sigma}\mathbf{Q}^\top \Rightarrow
    \mathbf{U} = \mathbf{P}\mathbf{Q}^\top` (exact; custom backward that only divides by
    :math:`\sigma_i + \sigma_j`, so it stays finite at repeated singular values).
    ``"newton_schulz"``: ``steps``
    iterations :math:`\mathbf{X} \leftarrow \tfrac32 \mathbf{X} - \tfrac12 \mathbf{X}
    \mathbf{X}^\top \mathbf{X}` from :math:`\mathbf{M}/\lVert\mathbf{M}\rVert_F` (matmuls
    only; converges for non-singular :math:`\mathbf{M}`, slowly for ill-conditioned ones).
    """
    if method == "svd":
        return _PolarSVD.apply(m)
    if method == "newton_schulz":
        x = m / torch.linalg.matrix_norm(m, keepdim=True).clamp_min(1e-30)
        for _ in range(steps):
            x = 1.5 * x - 0.5 * x @ x.transpose(-1, -2) @ x
        return x
    raise ValueError(f"unknown polar method {method!r}")


class GUMPConv(nn.Module):
    r"""Graph Unitary Message Passing layer (Qiu, Bian & Yao, 2024/2025).

    GUMP runs message passing with a *unitary* adjacency matrix. A general graph has no
    unitary matrix supported on its adjacency, so GUMP first transforms the graph
    (:func:`gump_arcs`): each undirected edge becomes two arcs, giving an Eulerian
    digraph :math:`G'` whose line digraph :math:`L(G')` does admit unitary adjacency
    matrices (Severini 2003) and keeps the original connectivity (arcs sharing a node are
    linked). Features live on the arcs (:func:`node_to_arc` / :func:`arc_to_node` convert).
    A weighted adjacency :math:`\bar{\mathbf{A}}` on :math:`L(G')` is computed from the arc
    features with an attention score, and projected onto the unitary group,

    .. math::
        \bar{\mathbf{A}}_{ba} = \mathbf{a}^\top \mathrm{LeakyReLU}\big(
            \mathbf{W}_q \mathbf{h}_b + \mathbf{W}_k \mathbf{h}_a\big)
            \quad (a = u \to v,\; b = v \to w), \qquad
        \mathbf{U} = \bar{\mathbf{A}} \big(\bar{\mathbf{A}}^\top \bar{\mathbf{A}}
            \big)^{-1/2}, \qquad
        \mathbf{H}' = \mathbf{U}\, \mathbf{H}\, \mathbf{W} \;(+\, \mathbf{b}).

    Because :math:`\bar{\mathbf{A}}` is block diagonal up to permutations (one
    :math:`d_v \times d_v` block between the in-arcs and out-arcs of every node
    :math:`v`, see :func:`line_digraph`), the projection is done block by block
    (:math:`O(\sum_v d_v^3)` instead of :math:`O(|E|^3)`), batched over nodes of equal
    degree, with an exact SVD (``projection="svd"``, the conference version) or
    Newton–Schulz iterations (``"newton_schulz"``, the journal version). The polar factor
    satisfies :math:`\mathrm{polar}(\mathbf{P}\mathbf{M}\mathbf{Q}^\top) = \mathbf{P}\,
    \mathrm{polar}(\mathbf{M})\,\mathbf{Q}^\top`, so the layer is permutation equivariant;
    :math:`\mathbf{U}` is supported on :math:`L(G')` and :math:`\lVert \mathbf{U}\mathbf{H}
    \rVert_F = \lVert \mathbf{H} \rVert_F`. Propagation itself is sparse message passing
    over the line edges.

    Implementation choices not fixed by the paper's text: the score is the GATv2-style
    additive attention above without the softmax (a softmax would push blocks towards rank
    one; a dot-product score would give blocks of rank at most :math:`d_k`, singular at
    nodes of degree :math:`> d_k`, where the polar factor is neither unique nor
    equivariant). Blocks must be non-singular for a unique projection, so arc features
    should be informative (e.g. the output of a base GNN, as in the paper); the paper applies
    a base GNN before lifting to arcs and pools arcs back to nodes at the end (see the
    docs page for a model). Scores computed from arc features are often (nearly) rank
    deficient inside a block: with lifted features :math:`[\mathbf{x}_u | \mathbf{x}_v]`,
    all in-arcs of :math:`v` share :math:`\mathbf{x}_v`, and a piecewise-linear score is
    close to :math:`g(b) + k(a)` (rank two). ``grover_prior=True`` (default) therefore adds
    the fixed block :math:`\tfrac{2}{d_v}\mathbf{J} - \mathbf{R}_v` (:math:`\mathbf{J}`:
    all ones, :math:`\mathbf{R}_v`: the backtracking permutation :math:`u \to v \mapsto
    v \to u`) to :math:`\bar{\mathbf{A}}` before the projection. This is the
    permutation-equivariant, unitary coin of the Grover (flip-flop) quantum walk on arcs,
    so with zero scores :math:`\mathbf{U}` is exactly the Grover walk and the projection
    stays well conditioned. Set ``grover_prior=False`` for the bare attention matrix (the
    paper's formulation), which needs non-singular score blocks.

    Args:
        in_channels: arc feature size.
        out_channels: output arc feature size.
        attention_channels: hidden size of the attention score (default
            ``in_channels``).
        projection: ``"svd"`` or ``"newton_schulz"``.
        ns_steps: Newton–Schulz iterations.
        grover_prior: add the Grover-coin block before projecting (default ``True``).
        bias: add a learnable bias.

    Shapes:
        - **input:** ``x`` :math:`(A, F_{in})` arc features, ``arc_index`` :math:`(2, A)`
          (an Eulerian digraph, e.g. :func:`gump_arcs`), optional precomputed
          :class:`LineDigraph`.
        - **output:** :math:`(A, F_{out})`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        attention_channels: int | None = None,
        projection: Literal["svd", "newton_schulz"] = "svd",
        ns_steps: int = 30,
        grover_prior: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if projection not in ("svd", "newton_schulz"):
            raise ValueError(f"unknown projection {projection!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.attention_channels = in_channels if attention_channels is None else attention_channels
        self.projection = projection
        self.ns_steps = ns_steps
        self.grover_prior = grover_prior
        self.lin_query = nn.Linear(in_channels, self.attention_channels, bias=True)
        self.lin_key = nn.Linear(in_channels, self.attention_channels, bias=False)
        self.att = nn.Parameter(torch.empty(self.attention_channels))
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default ``nn.Linear`` init, uniform attention vector, zero bias."""
        self.lin_query.reset_parameters()
        self.lin_key.reset_parameters()
        self.lin.reset_parameters()
        bound = 1.0 / math.sqrt(self.attention_channels)
        nn.init.uniform_(self.att, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def scores(self, x: Tensor, structure: LineDigraph) -> Tensor:
        r"""The weighted adjacency :math:`\bar{\mathbf{A}}` on the line edges, ``(L,)``."""
        a, b = structure.line_index[0], structure.line_index[1]
        q = self.lin_query(x)
        k = self.lin_key(x)
        s = nn.functional.leaky_relu(q[b] + k[a], 0.2) @ self.att
        if self.grover_prior:
            d = structure.degree[structure.center].to(s.dtype)
            s = s + 2.0 / d - structure.backtrack.to(s.dtype)
        return s

    def unitary_adjacency(
        self, x: Tensor, arc_index: Tensor, structure: LineDigraph | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""The unitary adjacency :math:`\mathbf{U}` as ``(line_index, values)``; entry
        ``values[e]`` is :math:`\mathbf{U}_{ba}` for ``line_index[:, e] = (a, b)``."""
        if structure is None:
            structure = line_digraph(arc_index)
        s = self.scores(x, structure)[structure.perm]
        blocks = []
        offset = 0
        for d, c in zip(structure.block_sizes, structure.block_counts):
            size = c * d * d
            m = s[offset : offset + size].view(c, d, d)
            u = polar_factor(m, self.projection, self.ns_steps)
            blocks.append(u.reshape(-1))
            offset += size
        values = torch.cat(blocks)[structure.inv_perm] if blocks else s
        return structure.line_index, values

    def forward(self, x: Tensor, arc_index: Tensor, structure: LineDigraph | None = None) -> Tensor:
        """``U (x W) + b`` on the arcs."""
        if structure is None:
            structure = line_digraph(arc_index)
        line_index, values = self.unitary_adjacency(x, arc_index, structure)
        h = self.lin(x)
        msg = h.index_select(0, line_index[0]) * values.unsqueeze(-1)
        out = scatter(msg, line_index[1], dim=0, dim_size=x.size(0), reduce="sum")
        if self.bias is not None:
            out = out + self.bias
        return out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"projection={self.projection!r}, grover_prior={self.grover_prior})"
        )
