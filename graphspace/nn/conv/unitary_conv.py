r"""Unitary / orthogonal graph convolutions.

* `UnitaryConv` and `LieUnitaryConv`: B. T. Kiani, L. Fesser, M. Weber, "Unitary
  Convolutions for Learning on Graphs and Groups", NeurIPS 2024,
  https://arxiv.org/abs/2410.05499 (UniConv, Lie UniConv and their real/orthogonal forms).
* `GUMPConv`: H. Qiu, Y. Bian, Q. Yao, "Graph Unitary Message Passing",
  https://arxiv.org/abs/2403.11199 (2024; journal version 2025).
* The exponentials are applied to the graph signal with a truncated Taylor series inside a
  scaling-and-squaring loop whose degree and number of steps come from a norm bound, as in
  A. H. Al-Mohy, N. J. Higham, "Computing the Action of the Matrix Exponential, with an
  Application to Exponential Integrators", SIAM J. Sci. Comput. 33(2), 2011
  (`expm_multiply`).

Complex features are accepted either as complex tensors or in a *real channel-paired*
form: a real tensor with `2 * C` columns whose first `C` columns are the real parts and
whose last `C` columns are the imaginary parts (see `complex_to_real` and
`real_to_complex`). All propagation is sparse message passing (`torch_geometric`'s
`MessagePassing`, fused through `graphspace.ops.weighted_aggregate`); no dense $N \times N$
matrix is ever formed. Every layer accepts the adjacency as an `edge_index` tensor, a PyG
`EdgeIndex`, a transposed `torch.sparse` adjacency (`conv(x, adj.t())`) or a
`torch_sparse.SparseTensor` (`graphspace.nn.validation.as_edge_index`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import (
    add_remaining_self_loops,
    coalesce,
    remove_self_loops,
    to_undirected,
)

from graphspace.nn.validation import (
    GraphInputError,
    as_edge_index,
    check_edge_features,
    check_edge_index,
    check_node_features,
    is_validation_enabled,
)
from graphspace.ops import scatter, weighted_aggregate

__all__ = [
    "GUMPConv",
    "LieUnitaryConv",
    "LineDigraph",
    "UnitaryConv",
    "arc_to_node",
    "complex_to_real",
    "expm_multiply",
    "gump_arcs",
    "line_digraph",
    "node_to_arc",
    "polar_factor",
    "real_to_complex",
    "taylor_schedule",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def complex_to_real(x: Tensor) -> Tensor:
    """Complex `(..., C)` -> real channel-paired `(..., 2C)` = `[Re | Im]`."""
    return torch.cat([x.real, x.imag], dim=-1)


def real_to_complex(x: Tensor) -> Tensor:
    """Real channel-paired `(..., 2C)` = `[Re | Im]` -> complex `(..., C)`."""
    re, im = x.chunk(2, dim=-1)
    return torch.complex(re, im)


def _check_features(x: object, channels: int, layer: str, complex_ok: bool = True) -> Tensor:
    """`x` must be complex `(N, C)` or real paired `(N, 2C)` (real `(N, C)` if not
    `complex_ok`); a one-line error names the expected and actual shape."""
    if isinstance(x, Tensor) and x.is_complex():
        if not complex_ok:
            raise GraphInputError(f"{layer}: x is complex ({x.dtype}); complex features need "
                                  f"complex=True")
        check_node_features(x, layer=layer, floating=False)
        if is_validation_enabled() and x.size(-1) != channels:
            raise GraphInputError(f"{layer}: x must have {channels} complex channels, got "
                                  f"shape {tuple(x.shape)}")
        return x
    width = 2 * channels if complex_ok else channels
    check_node_features(x, layer=layer, floating=True)
    if x.size(-1) != width:  # type: ignore[union-attr]
        form = f"channel-paired [Re | Im] with 2 * {channels}" if complex_ok else f"{channels}"
        raise GraphInputError(f"{layer}: a real x must be {form} columns, got shape "
                              f"{tuple(x.shape)}")  # type: ignore[union-attr]
    return x  # type: ignore[return-value]


def _to_pair(x: Tensor, channels: int) -> tuple[Tensor, Tensor, bool]:
    if x.is_complex():
        return x.real, x.imag, True
    re, im = x.chunk(2, dim=-1)
    return re, im, False


def _from_pair(re: Tensor, im: Tensor, as_complex: bool) -> Tensor:
    return torch.complex(re, im) if as_complex else torch.cat([re, im], dim=-1)


def _times_i(z: Tensor) -> Tensor:
    """Multiply a channel-paired tensor `[Re | Im]` by the imaginary unit."""
    re, im = z.chunk(2, dim=-1)
    return torch.cat([-im, re], dim=-1)


def _cmatmul(re: Tensor, im: Tensor, w_re: Tensor, w_im: Tensor) -> tuple[Tensor, Tensor]:
    """`(re + i im) @ (w_re + i w_im)` in real arithmetic."""
    return re @ w_re - im @ w_im, re @ w_im + im @ w_re


def _plain(edge_index: Tensor) -> Tensor:
    return edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index


def _is_dense_index(edge_index: object) -> bool:
    return (isinstance(edge_index, Tensor) and not isinstance(edge_index, EdgeIndex)
            and edge_index.layout == torch.strided)


def _graph_input(layer: str, edge_index: object, edge_weight: Tensor | None,
                 num_nodes: int) -> tuple[Tensor, Tensor | None]:
    """Any PyG adjacency format as a plain `(edge_index, edge_weight)`, checked (a dense
    `edge_index` is taken as is inside `torch.compile`; the checks run in eager mode)."""
    if torch.compiler.is_compiling() and _is_dense_index(edge_index):
        return edge_index, edge_weight  # type: ignore[return-value]
    ei, values = as_edge_index(edge_index, num_nodes, layer=layer)
    ei = _plain(ei).long()
    if edge_weight is not None:
        if values is not None and not torch.all(values == 1):
            raise GraphInputError(f"{layer}: edge_weight given twice (as edge_weight and as "
                                  f"the values of a weighted sparse adjacency)")
        check_edge_features(edge_weight, ei.size(1), name="edge_weight", layer=layer, dim=1)
    elif values is not None and values.is_floating_point():
        edge_weight = values
    return ei, edge_weight


def _adjacency(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    num_nodes: int,
    normalize: bool,
    add_self_loops: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    r"""The symmetric operator $\hat{A}$ as `(edge_index, edge_weight)`.

    Parallel edges are summed first; a one-direction edge `j -> i` then gets its reverse
    with the same weight and an edge present in both directions the mean of its two weights
    (`to_undirected(reduce="mean")`), so $A$ is symmetric for every input and the
    exponentials below are exactly unitary. The GCN normalisation and self-loops follow.
    """
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    edge_weight = edge_weight.to(dtype)
    edge_index, edge_weight = coalesce(edge_index, edge_weight, num_nodes, reduce="sum")
    edge_index, edge_weight = to_undirected(edge_index, edge_weight, num_nodes, reduce="mean")
    if normalize:
        ei, ew = gcn_norm(
            edge_index, edge_weight, num_nodes, False, add_self_loops, "source_to_target", dtype
        )
        return ei, ew  # type: ignore[return-value]
    if add_self_loops:
        edge_index, edge_weight = add_remaining_self_loops(edge_index, edge_weight, 1.0, num_nodes)
    return edge_index, edge_weight  # type: ignore[return-value]


def _norm_bound(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> float:
    r"""Gershgorin bound $\lVert \hat{A} \rVert_2 \le \max_i \sum_j |\hat{A}_{ij}|$ (exact
    for the 2-norm bound of a symmetric matrix: $\lVert A\rVert_2 \le \sqrt{\lVert A\rVert_1
    \lVert A\rVert_\infty}$)."""
    if edge_weight.numel() == 0:
        return 0.0
    with torch.no_grad():
        rows = scatter(edge_weight.detach().abs(), edge_index[1], 0, num_nodes, "sum")
        return float(rows.max())


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


def _remainder(tau: float, m: int) -> float:
    r"""Upper bound on $\sum_{k > m} \tau^k / k!$ (the relative error of the degree-$m$
    Taylor polynomial of $\exp(B)$ applied to a vector, $\lVert B\rVert \le \tau$)."""
    if tau <= 0.0:
        return 0.0
    if tau >= m + 2:
        return math.inf
    log_term = (m + 1) * math.log(tau) - math.lgamma(m + 2)
    return math.exp(log_term) / (1.0 - tau / (m + 2))


#: largest norm of one scaled step $A/s$: the Taylor terms of a step peak near
#: $\tau^\tau/\tau! \le e^\tau$, so rounding cancels to at most $e^5 u \approx 150u$.
_MAX_STEP_NORM = 5.0


@functools.lru_cache(maxsize=4096)
def _schedule(theta: float, tol: float, max_order: int) -> tuple[int, int]:
    best: tuple[int, int] | None = None
    for m in range(1, max_order + 1):
        # smallest s with s * r(theta / s) <= tol (monotone in s); doubling then bisection
        lo = max(1, math.ceil(theta / _MAX_STEP_NORM))
        hi = max(lo, math.ceil(theta / (m + 1)))
        while hi * _remainder(theta / hi, m) > tol:
            hi *= 2
            if hi > 1 << 40:
                break
        if hi > 1 << 40:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if mid * _remainder(theta / mid, m) <= tol:
                hi = mid
            else:
                lo = mid + 1
        if best is None or m * hi < best[0] * best[1]:
            best = (m, hi)
    if best is None:
        raise ValueError(f"no Taylor schedule of degree <= {max_order} reaches tol={tol} "
                         f"for norm bound {theta}")
    return best


def taylor_schedule(theta: float, tol: float, max_order: int | None = None) -> tuple[int, int]:
    r"""Degree $m$ and number of steps $s$ for $\exp(A)\,x \approx (T_m(A/s))^s x$.

    Among $m \le$ `max_order` (default 55, as in Al-Mohy & Higham 2011) it picks the pair of
    least cost $m s$ (matrix-vector products) whose forward error bound
    $s \sum_{k>m} (\theta/s)^k / k! \le$ `tol` holds, with $\theta \ge \lVert A \rVert_2$
    and steps of norm $\theta / s \le 5$ (so that cancellation between the Taylor terms,
    which peak near $e^{\theta/s}$, costs at most $e^5 \approx 150$ units of roundoff).
    For a normal $A$ with $\exp(A)$ unitary each step is a contraction-free isometry up to
    its truncation error, so the relative error of the result, and hence of its norm, is at
    most `tol` (plus rounding).

    Args:
        theta: an upper bound on $\lVert A\rVert_2$.
        tol: the relative error allowed.
        max_order: the largest Taylor degree $m$ considered (default 55).

    Returns:
        `(m, s)`; `(0, 1)` when `theta == 0` ($\exp(0) = I$).
    """
    if not math.isfinite(theta) or theta < 0:
        raise ValueError(f"theta must be a finite non-negative norm bound, got {theta}")
    if theta == 0.0:
        return 0, 1
    # round theta up onto a fine geometric grid so that the cache stays small
    grid = 2.0 ** (math.ceil(32.0 * math.log2(theta)) / 32.0)
    return _schedule(max(grid, theta), float(tol), 55 if max_order is None else int(max_order))


def expm_multiply(apply: Callable[[Tensor], Tensor], x: Tensor, theta: float, tol: float,
                  max_order: int | None = None) -> Tensor:
    r"""$\exp(A)\,x$ for a linear map `apply(y) = A y` with $\lVert A \rVert_2 \le \theta$.

    Scaling and squaring for the action of the exponential (A. H. Al-Mohy, N. J. Higham,
    "Computing the Action of the Matrix Exponential", SIAM J. Sci. Comput. 2011): with
    `(m, s) = taylor_schedule(theta, tol, max_order)`,
    $$\exp(A)\,x = \big(\exp(A/s)\big)^s x, \qquad
      \exp(A/s)\,y \approx \sum_{k=0}^{m} \frac{(A/s)^k}{k!}\,y,$$
    so the cost is $m s$ applications of `apply` and no matrix is ever formed. Gradients
    flow through `apply` and `x` (the schedule is a step count, not differentiated).

    Args:
        apply: $y \mapsto A y$.
        x: the vector(s), any shape `apply` accepts.
        theta: an upper bound on $\lVert A \rVert_2$ (e.g. Gershgorin).
        tol: relative error allowed (e.g. the unit roundoff of the dtype).
        max_order: the largest Taylor degree per step (default 55).

    Returns:
        $\exp(A)\,x$, same shape as `x`.
    """
    m, s = taylor_schedule(theta, tol, max_order)
    for _ in range(s):
        term, out = x, x
        for k in range(1, m + 1):
            term = apply(term) / (k * s)
            out = out + term
        x = out
    return x


def _skew_hermitian_exp(g_re: Tensor, g_im: Tensor) -> tuple[Tensor, Tensor]:
    r"""Unitary $\exp(S)$ for $S = B - B^\dagger$, $B = g_{re} + i g_{im}$, via the real
    $2m \times 2m$ representation (works for any real dtype)."""
    s_re = g_re - g_re.T
    s_im = g_im + g_im.T
    m = s_re.size(0)
    rep = torch.cat([torch.cat([s_re, s_im], 1), torch.cat([-s_im, s_re], 1)], 0)
    e = torch.linalg.matrix_exp(rep)
    return e[:m, :m], e[:m, m:]


class _GraphOperatorConv(MessagePassing):
    r"""Shared propagation of `UnitaryConv` and `LieUnitaryConv`: $y \mapsto \hat{A} y$ as
    PyG message passing (`message` is the readable reference, `message_and_aggregate` the
    fused `graphspace.ops.weighted_aggregate` that PyG picks for a column-sorted
    `EdgeIndex`)."""

    SUPPORTS_FUSED_EDGE_INDEX = True

    def __init__(self) -> None:
        super().__init__(aggr="add", node_dim=0)

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        return edge_weight.unsqueeze(-1) * x_j

    def message_and_aggregate(self, edge_index: Tensor, x: Tensor,
                              edge_weight: Tensor) -> Tensor:
        return weighted_aggregate(x, _plain(edge_index), edge_weight, x.size(0))

    def _operator(self, edge_index: object, edge_weight: Tensor | None, num_nodes: int,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
        r"""`(edge_index, edge_weight, norm bound)` of $\hat{A}$, sorted by target."""
        ei, ew = _graph_input(type(self).__name__, edge_index, edge_weight, num_nodes)
        ei, ew = _adjacency(ei, ew, num_nodes, self.normalize, self.add_self_loops, dtype)
        bound = _norm_bound(ei, ew, num_nodes)
        if self.normalize and bound > 1.0 and not bool((ew < 0).any()):
            # D^-1/2 A D^-1/2 with non-negative weights has spectral radius <= 1 (it is
            # similar to the row-stochastic D^-1 A), a tighter bound than Gershgorin's
            bound = 1.0
        if torch.compiler.is_compiling():  # compiled graphs take the message path
            return ei, ew, bound
        sorted_ei, perm = EdgeIndex(ei, sparse_size=(num_nodes, num_nodes)).sort_by("col")
        if perm is not None:
            ew = ew[perm]
        return sorted_ei, ew, bound

    def _adj(self, y: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        return self.propagate(edge_index, x=y, edge_weight=edge_weight)

    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if self.promote and dtype != torch.float64 else dtype


# ---------------------------------------------------------------------------------------
# UniConv
# ---------------------------------------------------------------------------------------


class UnitaryConv(_GraphOperatorConv):
    r"""Separable unitary graph convolution (UniConv, Kiani et al. 2024, Def. 3):

    $$
    \mathbf{X}' = \exp\!\big(i\, t\, \hat{\mathbf{A}}\big)\, \mathbf{X}\, \mathbf{W}
    \;(+\, \mathbf{b}),
    $$

    with $\hat{\mathbf{A}} = \tilde{\mathbf{D}}^{-1/2} (\mathbf{A} + \mathbf{I})
    \tilde{\mathbf{D}}^{-1/2}$ (`normalize=True`; spectrum in $(-1, 1]$). The input graph is
    made undirected first (a one-direction edge gets its reverse, two directions with
    different weights their mean; see `_adjacency`), so $\hat{\mathbf{A}}$ is symmetric and
    $\exp(i t \hat{\mathbf{A}})$ is unitary for every graph, weight and $t$.

    The exponential acts on the signal by sparse propagations only (`expm_multiply`):
    scaling and squaring with a Taylor degree and step count chosen from the Gershgorin bound
    $|t| \max_i \sum_j |\hat{A}_{ij}|$ and the unit roundoff $u$ of the input dtype
    (Al-Mohy & Higham 2011), so the relative error is at most $u$ for *any* $t$ and weight;
    the cost grows linearly with $|t| \lVert\hat{\mathbf{A}}\rVert$. Measured (tests):
    $\big|\lVert\mathbf{X}'\rVert / \lVert\mathbf{X}\rVert - 1\big| \le 10^{-12}$ in float64
    and $\le 10^{-6}$ in float32 for $t$ up to 100 with an identity or unitary weight.
    Lower-precision inputs are computed in float64 and cast back (`promote=True`), since a
    float32 $\hat{\mathbf{A}}$ alone is only symmetric to $\approx 10^{-7}$.

    Features are complex (a complex tensor, or the real channel-paired `[Re | Im]` form;
    the real form computes $\cos(t\hat{A})X_{re} - \sin(t\hat{A})X_{im}$ etc. with real
    arithmetic only, as the paper's "orthogonal" layers do). The weight $\mathbf{W}
    \in \mathbb{C}^{F_{in} \times F_{out}}$ is unconstrained in the paper (`weight="dense"`);
    `weight="unitary"` constrains it to have orthonormal rows (columns if
    $F_{in} > F_{out}$), $\mathbf{W} = \exp(\mathbf{S})_{:F_{in}, :F_{out}}$ with
    $\mathbf{S}$ skew-Hermitian, which makes the whole layer norm-preserving when
    $F_{in} \le F_{out}$; `weight="identity"` drops it. Non-linearities (the paper applies
    ReLU separately to real and imaginary parts) are left to the model. `inverse` undoes the
    layer where it is invertible.

    Args:
        in_channels: complex input channels $F_{in}$.
        out_channels: complex output channels $F_{out}$.
        order: the largest Taylor degree per scaling step (default `None`: chosen with the
            step count, up to 55; the paper's fixed `T` without scaling is not exact).
        t: initial time $t$ (the paper uses $t = 1$); any real value is exact.
        learn_t: make $t$ a learnable parameter.
        weight: `"dense"`, `"unitary"` or `"identity"`.
        normalize: use the symmetric GCN normalisation of the adjacency.
        add_self_loops: add self loops before normalising.
        bias: add a learnable complex bias (breaks exact unitarity).
        promote: compute in float64 when the input has a lower precision (default `True`).

    Shapes:
        - input: `x` $(N, F_{in})$ complex or $(N, 2F_{in})$ real, `edge_index` $(2, E)$ (or
          any adjacency format, see the module), `edge_weight` $(E,)$.
        - output: $(N, F_{out})$ complex or $(N, 2F_{out})$ real (same form as the input).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        order: int | None = None,
        t: float = 1.0,
        learn_t: bool = False,
        weight: Literal["dense", "unitary", "identity"] = "dense",
        normalize: bool = True,
        add_self_loops: bool = True,
        bias: bool = False,
        promote: bool = True,
    ) -> None:
        super().__init__()
        if weight not in ("dense", "unitary", "identity"):
            raise ValueError(f"unknown weight type {weight!r}")
        if weight == "identity" and in_channels != out_channels:
            raise ValueError("weight='identity' needs in_channels == out_channels")
        if order is not None and not 1 <= order <= 55:
            raise ValueError(f"order must be None or in [1, 55], got {order}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.order = order
        self.weight_type = weight
        self.normalize = normalize
        self.add_self_loops = add_self_loops
        self.promote = promote
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
        imaginary parts), small random generator for `weight="unitary"`, zero bias."""
        super().reset_parameters()
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
        """The effective weight as `(real, imag)` of shape `(F_in, F_out)`."""
        if self.weight_re is None:
            return None
        if self.weight_type == "unitary":
            e_re, e_im = _skew_hermitian_exp(self.weight_re, self.weight_im)
            return (
                e_re[: self.in_channels, : self.out_channels],
                e_im[: self.in_channels, : self.out_channels],
            )
        return self.weight_re, self.weight_im

    def propagator(self, z: Tensor, edge_index: object, edge_weight: Tensor | None = None,
                   sign: float = 1.0, tol: float | None = None) -> Tensor:
        r"""$\exp(\pm i t \hat{\mathbf{A}})\, z$ for a paired `[Re | Im]` tensor `z`
        (`sign=-1` for the inverse), in `z`'s dtype, to relative accuracy `tol` (default:
        the unit roundoff of `z`'s dtype)."""
        tol = _unit_roundoff(z.dtype) if tol is None else tol
        n = z.size(0)
        ei, ew, bound = self._operator(edge_index, edge_weight, n, z.dtype)
        t = self.t.to(z.dtype) * sign

        def apply(y: Tensor) -> Tensor:
            return _times_i(self._adj(y, ei, ew)) * t

        theta = abs(float(self.t.detach())) * bound
        return expm_multiply(apply, z, theta, tol, self.order)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Apply the layer; the output has the same (complex or paired) form as `x`."""
        x = _check_features(x, self.in_channels, type(self).__name__)
        re, im, as_complex = _to_pair(x, self.in_channels)
        out_dtype = re.dtype
        dtype = self._compute_dtype(out_dtype)
        re, im = re.to(dtype), im.to(dtype)
        w = self.complex_weight()
        if w is not None:
            w = (w[0].to(dtype), w[1].to(dtype))
        if w is not None and self.out_channels < self.in_channels:
            re, im = _cmatmul(re, im, *w)
        out = self.propagator(torch.cat([re, im], dim=-1), edge_index, edge_weight,
                              tol=_unit_roundoff(out_dtype))
        re, im = out.chunk(2, dim=-1)
        if w is not None and self.out_channels >= self.in_channels:
            re, im = _cmatmul(re, im, *w)
        if self.bias is not None:
            b_re, b_im = self.bias.to(dtype).chunk(2)
            re, im = re + b_re, im + b_im
        return _from_pair(re.to(out_dtype), im.to(out_dtype), as_complex)

    def inverse(self, y: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        r"""$\mathbf{X} = \exp(-i t \hat{\mathbf{A}})(\mathbf{Y} - \mathbf{b})\,
        \mathbf{W}^{-1}$, the input that `forward` maps to `y`.

        Defined for `weight="identity"`, `weight="unitary"` with $F_{in} \le F_{out}$
        ($\mathbf{W}\mathbf{W}^\dagger = \mathbf{I}$, so $\mathbf{W}^{-1} := \mathbf{W}^\dagger$
        recovers $\mathbf{X}$ from any output of the layer) and a square `weight="dense"`
        (a linear solve; raises if $\mathbf{W}$ is singular).

        Raises:
            ValueError: the layer is not invertible (a dense or unitary weight with
                $F_{out} < F_{in}$, or a non-square dense weight).
        """
        name = type(self).__name__
        if self.out_channels < self.in_channels or (
                self.weight_type == "dense" and self.in_channels != self.out_channels):
            raise ValueError(f"{name}.inverse: a {self.weight_type} weight of shape "
                             f"({self.in_channels}, {self.out_channels}) is not invertible")
        y = _check_features(y, self.out_channels, name)
        re, im, as_complex = _to_pair(y, self.out_channels)
        out_dtype = re.dtype
        dtype = self._compute_dtype(out_dtype)
        re, im = re.to(dtype), im.to(dtype)
        if self.bias is not None:
            b_re, b_im = self.bias.to(dtype).chunk(2)
            re, im = re - b_re, im - b_im
        z = self.propagator(torch.cat([re, im], dim=-1), edge_index, edge_weight, sign=-1.0,
                            tol=_unit_roundoff(out_dtype))
        re, im = z.chunk(2, dim=-1)
        w = self.complex_weight()
        if w is not None:
            w_re, w_im = w[0].to(dtype), w[1].to(dtype)
            if self.weight_type == "unitary":  # X = Y W^dagger
                re, im = _cmatmul(re, im, w_re.T, -w_im.T)
            else:  # X W = Z  ->  W^T X^T = Z^T
                wc = torch.complex(w_re, w_im)
                xc = torch.linalg.solve(wc.T, torch.complex(re, im).T).T
                re, im = xc.real, xc.imag
        return _from_pair(re.to(out_dtype), im.to(out_dtype), as_complex)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"order={self.order}, weight={self.weight_type!r})"
        )


# ---------------------------------------------------------------------------------------
# Lie UniConv
# ---------------------------------------------------------------------------------------


class LieUnitaryConv(_GraphOperatorConv):
    r"""Lie unitary / orthogonal graph convolution (Lie UniConv, Kiani et al. 2024):

    $$
    \mathbf{X}' = \exp\!\big(g_{conv}\big)(\mathbf{X}), \qquad
    g_{conv}(\mathbf{X}) =
    \begin{cases}
        \hat{\mathbf{A}} \mathbf{X} \mathbf{W}, &
            \mathbf{W} = \mathbf{B} - \mathbf{B}^\top \text{ (real, orthogonal)} \\
        i\, \hat{\mathbf{A}} \mathbf{X} \mathbf{H}, &
            \mathbf{H} = \tfrac12(\mathbf{B} + \mathbf{B}^\dagger) \text{ (complex, unitary)}
    \end{cases}
    $$

    As a linear map on $\mathrm{vec}(\mathbf{X})$, $g_{conv} = \hat{\mathbf{A}} \otimes
    \mathbf{W}^\top$ (resp. $i \hat{\mathbf{A}} \otimes \mathbf{H}^\top$), which is
    skew-symmetric (skew-Hermitian) for the symmetric $\hat{\mathbf{A}}$ (a directed input
    is made undirected, as in `UnitaryConv`), so $\exp(g_{conv})$ is orthogonal (unitary):
    the layer preserves $\lVert\mathbf{X}\rVert_F$ and `inverse` applies
    $\exp(-g_{conv})$. The exponential is applied with scaling and squaring
    (`expm_multiply`, Al-Mohy & Higham 2011) from the bound $\lVert g_{conv}\rVert_2 \le
    \max_i \sum_j |\hat{A}_{ij}| \cdot \lVert\mathbf{W}\rVert_2$, so it stays exact for any
    weight norm: measured norm error $\le 10^{-12}$ (float64) and $\le 10^{-6}$ (float32)
    at $\lVert\mathbf{W}\rVert_2 = 100$. Each Taylor term costs one sparse propagation and
    one $F \times F$ product; the number of terms grows linearly with
    $\lVert\mathbf{W}\rVert_2$.

    `complex=False` (default) is the real orthogonal variant on real features $(N, F)$;
    `complex=True` takes complex features (or the channel-paired real form $(N, 2F)$). The
    paper requires $F_{in} = F_{out}$; here $F_{in} < F_{out}$ is allowed by zero-padding
    the input (an isometry).

    Args:
        in_channels: input channels.
        out_channels: output channels ($\ge$ `in_channels`).
        complex: complex (unitary) instead of real (orthogonal) form.
        order: the largest Taylor degree per scaling step (default `None`: automatic).
        normalize: symmetric GCN normalisation of the adjacency.
        add_self_loops: add self loops before normalising.
        bias: add a learnable bias (breaks exact norm preservation).
        promote: compute in float64 when the input has a lower precision (default `True`).

    Shapes:
        - input: `x` $(N, F_{in})$ real (`complex=False`), or complex $(N, F_{in})$ / paired
          real $(N, 2F_{in})$ (`complex=True`); `edge_index` $(2, E)$ or any adjacency
          format; `edge_weight` $(E,)$.
        - output: the same form with $F_{out}$ channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        complex: bool = False,
        order: int | None = None,
        normalize: bool = True,
        add_self_loops: bool = True,
        bias: bool = False,
        promote: bool = True,
    ) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("LieUnitaryConv needs out_channels >= in_channels")
        if order is not None and not 1 <= order <= 55:
            raise ValueError(f"order must be None or in [1, 55], got {order}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.complex = complex
        self.order = order
        self.normalize = normalize
        self.add_self_loops = add_self_loops
        self.promote = promote
        self.weight_re = nn.Parameter(torch.empty(out_channels, out_channels))
        if complex:
            self.weight_im = nn.Parameter(torch.empty(out_channels, out_channels))
        else:
            self.register_parameter("weight_im", None)
        width = 2 * out_channels if complex else out_channels
        self.bias = nn.Parameter(torch.empty(width)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Normal init of $\mathbf{B}$ scaled so that the generator has spectral norm of
        order one; zero bias."""
        super().reset_parameters()
        std = 1.0 / (2.0 * math.sqrt(2.0 * self.out_channels))
        nn.init.normal_(self.weight_re, 0.0, std)
        if self.weight_im is not None:
            nn.init.normal_(self.weight_im, 0.0, std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def generator_weight(self) -> Tensor | tuple[Tensor, Tensor]:
        r"""Skew-symmetric $\mathbf{W}$ (real) or Hermitian $\mathbf{H}$ as `(real, imag)`
        (complex)."""
        b = self.weight_re
        if self.weight_im is None:
            return b - b.T
        return 0.5 * (b + b.T), 0.5 * (self.weight_im - self.weight_im.T)

    def _check(self, x: Tensor, channels: int) -> Tensor:
        name = type(self).__name__
        if self.complex:
            return _check_features(x, channels, name)
        return _check_features(x, channels, name, complex_ok=False)

    def _exp(self, z: Tensor, edge_index: object, edge_weight: Tensor | None, sign: float,
             tol: float) -> Tensor:
        r"""$\exp(\pm g_{conv})\, z$ on the padded (paired) features `z`."""
        n = z.size(0)
        ei, ew, bound = self._operator(edge_index, edge_weight, n, z.dtype)
        w = self.generator_weight()
        with torch.no_grad():
            if isinstance(w, tuple):
                w_norm = float(torch.linalg.matrix_norm(
                    torch.complex(w[0].double(), w[1].double()), 2))
            else:
                w_norm = float(torch.linalg.matrix_norm(w.double(), 2))
        if isinstance(w, tuple):
            w_re, w_im = w[0].to(z.dtype) * sign, w[1].to(z.dtype) * sign

            def apply(y: Tensor) -> Tensor:
                y_re, y_im = y.chunk(2, dim=-1)
                y = _times_i(torch.cat(_cmatmul(y_re, y_im, w_re, w_im), dim=-1))
                return self._adj(y, ei, ew)
        else:
            w_real = w.to(z.dtype) * sign

            def apply(y: Tensor) -> Tensor:
                return self._adj(y @ w_real, ei, ew)

        return expm_multiply(apply, z, bound * w_norm, tol, self.order)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        r"""Apply $\exp(g_{conv})$ (+ bias); same input/output form."""
        x = self._check(x, self.in_channels)
        pad = self.out_channels - self.in_channels
        as_complex = x.is_complex()
        if self.complex:
            re, im, _ = _to_pair(x, self.in_channels)
            if pad:
                re = nn.functional.pad(re, (0, pad))
                im = nn.functional.pad(im, (0, pad))
            z = torch.cat([re, im], dim=-1)
        else:
            z = nn.functional.pad(x, (0, pad)) if pad else x
        out_dtype = z.dtype
        z = z.to(self._compute_dtype(out_dtype))
        out = self._exp(z, edge_index, edge_weight, 1.0, _unit_roundoff(out_dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        out = out.to(out_dtype)
        if self.complex:
            re, im = out.chunk(2, dim=-1)
            return _from_pair(re, im, as_complex)
        return out

    def inverse(self, y: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        r"""$\mathbf{X} = \exp(-g_{conv})(\mathbf{Y} - \mathbf{b})$ with the zero padding
        dropped: the input that `forward` maps to `y` (same form as `y`, $F_{in}$ channels).
        """
        y = self._check(y, self.out_channels)
        as_complex = y.is_complex()
        z = complex_to_real(y) if as_complex else y
        out_dtype = z.dtype
        z = z.to(self._compute_dtype(out_dtype))
        if self.bias is not None:
            z = z - self.bias.to(z.dtype)
        x = self._exp(z, edge_index, edge_weight, -1.0, _unit_roundoff(out_dtype)).to(out_dtype)
        if self.complex:
            re, im = x.chunk(2, dim=-1)
            re, im = re[:, : self.in_channels], im[:, : self.in_channels]
            return _from_pair(re, im, as_complex)
        return x[:, : self.in_channels]

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"complex={self.complex}, order={self.order})"
        )

# ---------------------------------------------------------------------------------------
# GUMP
# ---------------------------------------------------------------------------------------


class LineDigraph(NamedTuple):
    """Block structure of the line digraph of an Eulerian digraph (see `line_digraph`).

    Attributes:
        line_index: `(2, L)`: line edge `a -> b` between arcs `a = (u -> v)` and
            `b = (v -> w)` (messages flow from arc `a` to arc `b`).
        center: `(L,)`: the shared node `v` of each line edge.
        backtrack: `(L,)` bool: `b` is the reverse of `a` (`w == u`).
        degree: `(N,)`: in-degree (= out-degree) of every node.
        perm: `(L,)`: line edges ordered block by block (node by node, grouped by
            degree), row-major inside each `d x d` block (row = out-arc, col = in-arc).
        inv_perm: the inverse permutation of `perm`.
        block_sizes: the distinct degrees `d` present.
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
    graph (every undirected edge `{u, v}` becomes the arcs `u -> v` and `v -> u`).
    A bidirected digraph is Eulerian (in-degree = out-degree), so its line digraph
    supports a unitary adjacency matrix."""
    ei, _ = as_edge_index(edge_index, num_nodes, layer="gump_arcs")
    ei, _ = remove_self_loops(_plain(ei).long())
    if num_nodes is None:
        num_nodes = int(ei.max()) + 1 if ei.numel() else 0
    return coalesce(to_undirected(ei, num_nodes=num_nodes), num_nodes=num_nodes)


def node_to_arc(x: Tensor, arc_index: Tensor) -> Tensor:
    """Lift node features to arcs: `[x_u | x_v]` for arc `u -> v`."""
    check_node_features(x, layer="node_to_arc")
    arc_index = check_edge_index(arc_index, x.size(0), name="arc_index", layer="node_to_arc")
    return torch.cat([x[arc_index[0]], x[arc_index[1]]], dim=-1)


def arc_to_node(x_arc: Tensor, arc_index: Tensor, num_nodes: int, reduce: str = "sum") -> Tensor:
    """Pool arc features to their head nodes (`reduce` over the in-arcs of each node)."""
    check_edge_index(arc_index, num_nodes, name="arc_index", layer="arc_to_node")
    check_edge_features(x_arc, arc_index.size(1), name="x_arc", layer="arc_to_node")
    return scatter(x_arc, arc_index[1], dim=0, dim_size=num_nodes, reduce=reduce)


def line_digraph(arc_index: Tensor, num_nodes: int | None = None) -> LineDigraph:
    r"""The line digraph $L(G)$ of an Eulerian digraph $G$ and its block
    structure. Its nodes are the arcs of $G$; arc $a = (u \to v)$ is linked to
    every arc $b = (v \to w)$ (backtracking $w = u$ included). Grouping the
    in-arcs and out-arcs of every node $v$ shows that the adjacency of $L(G)$
    is, up to row and column permutations, block diagonal with one full
    $d_v \times d_v$ block per node, so any matrix with unitary blocks on this
    support is unitary.

    Args:
        arc_index: `(2, A)` arcs (e.g. from `gump_arcs`), without duplicates.
        num_nodes: number of nodes of $G$.

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

    With $\mathbf{M} = \mathbf{W}\boldsymbol{\Sigma}\mathbf{V}^\top$,
    $\mathbf{U} = \mathbf{W}\mathbf{V}^\top$ and $\mathbf{P} =
    \mathbf{V}\boldsymbol{\Sigma}\mathbf{V}^\top$, a perturbation gives
    $d\mathbf{U} = \mathbf{U}\boldsymbol{\Omega}$ with
    $\boldsymbol{\Omega}\mathbf{P} + \mathbf{P}\boldsymbol{\Omega} =
    \mathbf{U}^\top d\mathbf{M} - d\mathbf{M}^\top \mathbf{U}$, hence
    $\partial L/\partial \mathbf{M} = 2\mathbf{U}\mathbf{Y}$,
    $\mathbf{Y} = \mathbf{V}\big[(\mathbf{V}^\top \mathrm{skew}(\mathbf{U}^\top
    \mathbf{G})\mathbf{V})_{ij} / (\sigma_i + \sigma_j)\big]\mathbf{V}^\top$. Only
    $\sigma_i + \sigma_j$ appears, so repeated singular values (e.g. an already
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
    r"""Unitary polar factor $\mathbf{U} = \mathbf{M} (\mathbf{M}^\top
    \mathbf{M})^{-1/2}$ of a batch of square matrices (the closest orthogonal matrix in
    Frobenius norm): all singular values set to one.

    `"svd"`: $\mathbf{M} = \mathbf{P}\boldsymbol{\Sigma}\mathbf{Q}^\top \Rightarrow
    \mathbf{U} = \mathbf{P}\mathbf{Q}^\top$ (exact; custom backward that only divides by
    $\sigma_i + \sigma_j$, so it stays finite at repeated singular values).
    `"newton_schulz"`: `steps`
    iterations $\mathbf{X} \leftarrow \tfrac32 \mathbf{X} - \tfrac12 \mathbf{X}
    \mathbf{X}^\top \mathbf{X}$ from $\mathbf{M}/\lVert\mathbf{M}\rVert_F$ (matmuls
    only; converges for non-singular $\mathbf{M}$, slowly for ill-conditioned ones).
    """
    if method == "svd":
        return _PolarSVD.apply(m)
    if method == "newton_schulz":
        x = m / torch.linalg.matrix_norm(m, keepdim=True).clamp_min(1e-30)
        for _ in range(steps):
            x = 1.5 * x - 0.5 * x @ x.transpose(-1, -2) @ x
        return x
    raise ValueError(f"unknown polar method {method!r}")


class GUMPConv(MessagePassing):
    r"""Graph Unitary Message Passing layer (Qiu, Bian & Yao, 2024/2025).

    GUMP runs message passing with a *unitary* adjacency matrix. A general graph has no
    unitary matrix supported on its adjacency, so GUMP first transforms the graph
    (`gump_arcs`): each undirected edge becomes two arcs, giving an Eulerian
    digraph $G'$ whose line digraph $L(G')$ does admit unitary adjacency
    matrices (Severini 2003) and keeps the original connectivity (arcs sharing a node are
    linked). Features live on the arcs (`node_to_arc` / `arc_to_node` convert).
    A weighted adjacency $\bar{\mathbf{A}}$ on $L(G')$ is computed from the arc
    features with an attention score, and projected onto the unitary group,

    $$
    \bar{\mathbf{A}}_{ba} = \mathbf{a}^\top \mathrm{LeakyReLU}\big(
        \mathbf{W}_q \mathbf{h}_b + \mathbf{W}_k \mathbf{h}_a\big)
        \quad (a = u \to v,\; b = v \to w), \qquad
    \mathbf{U} = \bar{\mathbf{A}} \big(\bar{\mathbf{A}}^\top \bar{\mathbf{A}}
        \big)^{-1/2}, \qquad
    \mathbf{H}' = \mathbf{U}\, \mathbf{H}\, \mathbf{W} \;(+\, \mathbf{b}).
    $$

    Because $\bar{\mathbf{A}}$ is block diagonal up to permutations (one
    $d_v \times d_v$ block between the in-arcs and out-arcs of every node
    $v$, see `line_digraph`), the projection is done block by block
    ($O(\sum_v d_v^3)$ instead of $O(|E|^3)$), batched over nodes of equal
    degree, with an exact SVD (`projection="svd"`, the conference version) or
    Newton–Schulz iterations (`"newton_schulz"`, the journal version). The polar factor
    satisfies $\mathrm{polar}(\mathbf{P}\mathbf{M}\mathbf{Q}^\top) = \mathbf{P}\,
    \mathrm{polar}(\mathbf{M})\,\mathbf{Q}^\top$, so the layer is permutation equivariant;
    $\mathbf{U}$ is supported on $L(G')$ and $\lVert \mathbf{U}\mathbf{H}
    \rVert_F = \lVert \mathbf{H} \rVert_F$. Propagation itself is sparse message passing
    over the line edges.

    Implementation choices not fixed by the paper's text: the score is the GATv2-style
    additive attention above without the softmax (a softmax would push blocks towards rank
    one; a dot-product score would give blocks of rank at most $d_k$, singular at
    nodes of degree $> d_k$, where the polar factor is neither unique nor
    equivariant). Blocks must be non-singular for a unique projection, so arc features
    should be informative (e.g. the output of a base GNN, as in the paper); the paper applies
    a base GNN before lifting to arcs and pools arcs back to nodes at the end (see the
    docs page for a model). Scores computed from arc features are often (nearly) rank
    deficient inside a block: with lifted features $[\mathbf{x}_u | \mathbf{x}_v]$,
    all in-arcs of $v$ share $\mathbf{x}_v$, and a piecewise-linear score is
    close to $g(b) + k(a)$ (rank two). `grover_prior=True` (default) therefore adds
    the fixed block $\tfrac{2}{d_v}\mathbf{J} - \mathbf{R}_v$ ($\mathbf{J}$:
    all ones, $\mathbf{R}_v$: the backtracking permutation $u \to v \mapsto
    v \to u$) to $\bar{\mathbf{A}}$ before the projection. This is the
    permutation-equivariant, unitary coin of the Grover (flip-flop) quantum walk on arcs,
    so with zero scores $\mathbf{U}$ is exactly the Grover walk and the projection
    stays well conditioned. Set `grover_prior=False` for the bare attention matrix (the
    paper's formulation), which needs non-singular score blocks.

    Args:
        in_channels: arc feature size.
        out_channels: output arc feature size.
        attention_channels: hidden size of the attention score (default
            `in_channels`).
        projection: `"svd"` or `"newton_schulz"`.
        ns_steps: Newton–Schulz iterations.
        grover_prior: add the Grover-coin block before projecting (default `True`).
        bias: add a learnable bias.

    Shapes:
        - **input:** `x` $(A, F_{in})$ arc features, `arc_index` $(2, A)$
          (an Eulerian digraph, e.g. `gump_arcs`), optional precomputed
          `LineDigraph`.
        - **output:** $(A, F_{out})$.
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
        super().__init__(aggr="add", node_dim=0)
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
        """Default `nn.Linear` init, uniform attention vector, zero bias."""
        super().reset_parameters()
        self.lin_query.reset_parameters()
        self.lin_key.reset_parameters()
        self.lin.reset_parameters()
        bound = 1.0 / math.sqrt(self.attention_channels)
        nn.init.uniform_(self.att, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def scores(self, x: Tensor, structure: LineDigraph) -> Tensor:
        r"""The weighted adjacency $\bar{\mathbf{A}}$ on the line edges, `(L,)`."""
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
        r"""The unitary adjacency $\mathbf{U}$ as `(line_index, values)`; entry
        `values[e]` is $\mathbf{U}_{ba}$ for `line_index[:, e] = (a, b)`."""
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

    def _inputs(self, x: object, arc_index: object,
                structure: LineDigraph | None) -> tuple[Tensor, Tensor, LineDigraph]:
        name = type(self).__name__
        x = check_node_features(x, layer=name, channels=self.in_channels)
        arcs, _ = as_edge_index(arc_index, name="arc_index", layer=name)
        arcs = _plain(arcs).long()
        if is_validation_enabled():
            if arcs.numel() and int(arcs.min()) < 0:
                raise GraphInputError(f"{name}: arc_index holds a negative node index "
                                      f"({int(arcs.min())})")
            if arcs.size(1) != x.size(0):
                raise GraphInputError(f"{name}: x holds one row per arc, so it must have "
                                      f"{arcs.size(1)} rows (arc_index has shape "
                                      f"{tuple(arcs.shape)}), got shape {tuple(x.shape)}")
        if structure is None:
            structure = line_digraph(arcs)
        elif structure.num_arcs != x.size(0):
            raise GraphInputError(f"{name}: structure has {structure.num_arcs} arcs but x has "
                                  f"{x.size(0)} rows")
        return x, arcs, structure

    def forward(self, x: Tensor, arc_index: Tensor, structure: LineDigraph | None = None) -> Tensor:
        """`U (x W) + b` on the arcs; `arc_index` may be any adjacency format (its arcs in
        the order `graphspace.nn.validation.as_edge_index` lists them)."""
        x, arcs, structure = self._inputs(x, arc_index, structure)
        line_index, values = self.unitary_adjacency(x, arcs, structure)
        out = self.propagate(line_index, x=self.lin(x), value=values,
                             size=(x.size(0), x.size(0)))
        if self.bias is not None:
            out = out + self.bias
        return out

    def message(self, x_j: Tensor, value: Tensor) -> Tensor:
        r"""$\mathbf{U}_{ba}\, (\mathbf{W}^\top \mathbf{h}_a)$ along line edge $a \to b$."""
        return value.unsqueeze(-1) * x_j

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"projection={self.projection!r}, grover_prior={self.grover_prior})"
        )
