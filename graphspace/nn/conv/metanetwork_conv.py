r"""Edge- and node-updating message passing for parameter graphs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from graphspace.ops import CSR, get_csr, scatter

AGGREGATORS = ("mean", "max", "min", "std", "sum")
SCALERS = ("identity", "amplification", "attenuation")


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


#: dtypes of the fused CPU path (others take the reference path through :func:`scatter`).
_FUSED_DTYPES = (torch.float32, torch.float64)


class _PairGather(torch.autograd.Function):
    r"""``z_c = p_c[dst] + q_c[src]`` for column blocks ``c`` of ``p``, ``q``: ``(N, C * h)``.

    The blocks come out as separate contiguous ``(E, h)`` tensors (slicing one ``(E, C h)``
    result would make autograd zero-fill or concatenate full-size gradients). Backward: the
    target half is a product with the cached CSR matrix of the targets (contiguous reads when
    the edges are sorted by target), the source half a scatter-add.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor, q: Tensor, dst: Tensor, src: Tensor, csr: CSR,
                h: int) -> tuple[Tensor, ...]:
        outs = []
        for c in range(p.size(1) // h):
            z = p[:, c * h:(c + 1) * h].index_select(0, dst)
            outs.append(z.add_(q[:, c * h:(c + 1) * h].index_select(0, src)))
        ctx.csr, ctx.h = csr, h
        ctx.save_for_backward(src)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        (src,) = ctx.saved_tensors
        csr: CSR = ctx.csr
        gp = gq = None
        if ctx.needs_input_grad[0]:
            ones = csr.sparse_ones(grads[0].dtype)
            gp = torch.cat([torch.sparse.mm(ones, g) for g in grads], dim=1)
        if ctx.needs_input_grad[1]:
            gq = torch.cat([g.new_zeros(csr.num_rows, g.size(1)).index_add_(0, src, g)
                            for g in grads], dim=1)
        return gp, gq, None, None, None, None


class _MultiAggregate(torch.autograd.Function):
    r"""Several reductions of the same messages over the same target index in one pass.

    ``out = [agg_1(m) | agg_2(m) | ...]`` (``(N, len(aggregators) * F)``) with the conventions
    of :func:`graphspace.ops.scatter`: empty rows are 0, ``std`` is
    :math:`\sqrt{\operatorname{mean}((m - \mu)^2) + 10^{-12}}`, and the gradient of a
    max/min entry is split evenly between the messages that attain it. All reductions run as
    products with the (cached) sparse CSR matrix of ones of the target index, so the sum that
    ``mean`` and ``std`` share is taken once and, when the edges are sorted by target, every
    product reads the messages contiguously. The backward pass gathers one per-node
    coefficient per reduction and forms the message gradient in place:

    .. math::
        \frac{\partial L}{\partial m_e} = \sum_{\text{sum}} g_{i} +
        \sum_{\text{mean}} \frac{g_{i}}{n_i} + \sum_{\text{max/min}} [m_e = o_i]
        \frac{g_{i}}{t_i} + \sum_{\text{std}} (m_e - \mu_i)\frac{g_{i}}{n_i\,\sigma_i},
        \qquad i = \mathrm{index}_e

    (:math:`n_i` messages and :math:`t_i` ties at row :math:`i`).
    """

    @staticmethod
    def forward(ctx: Any, m: Tensor, index: Tensor, csr: CSR,
                aggregators: tuple[str, ...]) -> Tensor:
        ones = csr.sparse_ones(m.dtype)
        cnt = csr.counts(m.dtype).unsqueeze(-1)
        cntc = cnt.clamp(min=1)
        empty = cnt == 0
        total = mean = centred = None
        if any(a in ("sum", "mean", "std") for a in aggregators):
            total = torch.sparse.mm(ones, m)
            mean = total / cntc
        outs: dict[str, Tensor] = {}
        for a in aggregators:
            if a in outs:
                continue
            if a == "sum":
                outs[a] = total
            elif a == "mean":
                outs[a] = mean
            elif a in ("max", "min"):
                ext = torch.sparse.mm(ones, m, "amax" if a == "max" else "amin")
                outs[a] = ext.masked_fill_(empty, 0.0)
            else:  # std
                centred = mean.index_select(0, index)
                torch.sub(m, centred, out=centred)
                var = torch.sparse.mm(ones, centred.square()).div_(cntc)
                outs[a] = var.add_(1e-12).sqrt_().masked_fill_(empty, 0.0)
        ctx.csr, ctx.aggregators = csr, aggregators
        ctx.save_for_backward(m, index, centred, outs.get("max"), outs.get("min"),
                              outs.get("std"))
        return torch.cat([outs[a] for a in aggregators], dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        m, index, centred, mx, mn, std = ctx.saved_tensors
        csr: CSR = ctx.csr
        f = m.size(1)
        cntc = csr.counts(m.dtype).clamp(min=1).unsqueeze(-1)
        lin: Tensor | None = None  # per-node coefficient of the plain gather (sum, mean)
        grad: Tensor | None = None
        for k, a in enumerate(ctx.aggregators):
            gk = g[:, k * f:(k + 1) * f]
            if a in ("sum", "mean"):
                term = gk if a == "sum" else gk / cntc
                lin = term if lin is None else lin + term
                continue
            if a == "std":
                coef = gk / (cntc * torch.where(std > 0, std, torch.ones_like(std)))
                part = coef.index_select(0, index).mul_(centred)
            else:  # max / min: split between the messages equal to the output
                out = mx if a == "max" else mn
                hit = out.index_select(0, index)
                torch.eq(m, hit, out=hit)  # 1.0 / 0.0 in m's dtype
                ties = torch.sparse.mm(csr.sparse_ones(m.dtype), hit).clamp_(min=1)
                part = (gk / ties).index_select(0, index).mul_(hit)
            grad = part if grad is None else grad.add_(part)
        if lin is not None:
            part = lin.index_select(0, index)
            grad = part if grad is None else grad.add_(part)
        return grad, None, None, None


class MetaNetworkConv(nn.Module):
    r"""The graph-metanetwork layer: edge update, edge-conditioned (FiLM) messages, and a
    PNA-style multi-aggregator node update.

    From *Graph Metanetworks for Processing Diverse Neural Architectures* (Lim et al., ICLR 2024)
    and *Graph Neural Networks for Learning Equivariant Representations of Neural Networks*
    (Kofinas et al., ICLR 2024), whose layer is PNA (Corso et al., NeurIPS 2020) with edge
    updates and FiLM-conditioned messages. With source :math:`j` and target :math:`i`:

    .. math::
        \mathbf{e}'_{ij} &= \mathbf{e}_{ij} + \phi_e\big([\mathbf{x}_i \,\|\, \mathbf{x}_j \,\|\,
            \mathbf{e}_{ij}]\big) \\
        \mathbf{m}_{ij} &= \gamma(\mathbf{e}'_{ij}) \odot \mathbf{W}_m [\mathbf{x}_i \,\|\,
            \mathbf{x}_j] + \beta(\mathbf{e}'_{ij}) \\
        \mathbf{a}_i &= \Big[\, s(d_i) \cdot \textstyle\bigoplus_{j \in \mathcal{N}(i)}
            \mathbf{m}_{ij} \Big]_{\oplus \in \mathcal{A},\, s \in \mathcal{S}} \\
        \mathbf{x}'_i &= \mathbf{W}_r \mathbf{x}_i + \phi_u\big([\mathbf{x}_i \,\|\,
            \mathbf{a}_i]\big)

    with aggregators :math:`\mathcal{A} \subseteq` {mean, max, min, std, sum} and PNA degree
    scalers :math:`s(d) \in \{1,\ (\log(d+1)/\delta),\ (\delta/\log(d+1))\}` where
    :math:`\delta` is the average of :math:`\log(d+1)` over training graphs. Isolated nodes
    aggregate to zero. The layer is equivariant to any permutation of the nodes (every function
    of a node uses only its features and its neighbours' multiset), so a model built on it is
    invariant to permutations of a network's hidden neurons.

    Args:
        in_channels (int): node feature size.
        out_channels (int): output node feature size.
        edge_dim (int): edge feature size.
        edge_out_channels (int, optional): output edge feature size (default: ``edge_dim``).
        hidden_channels (int, optional): MLP width (default: ``out_channels``).
        aggregators (Sequence[str]): default ``("mean", "max", "std")``.
        scalers (Sequence[str]): default ``("identity", "amplification", "attenuation")``.
        avg_log_degree (float): :math:`\delta` (default 1.0; see :meth:`compute_avg_log_degree`).
        update_edges (bool): apply the edge update (default ``True``).
        dropout (float): dropout inside the MLPs (default 0).

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)`, edge features :math:`(|\mathcal{E}|, D)`
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})`, edge features
          :math:`(|\mathcal{E}|, D_{out})`
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
        super().__init__()
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
        self.update = _mlp(in_channels + n_agg * h, h, out_channels, dropout)
        self.root = nn.Linear(in_channels, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    @staticmethod
    def compute_avg_log_degree(edge_indices: Sequence[Tensor], num_nodes: Sequence[int]) -> float:
        """:math:`\\delta = \\operatorname{mean}_i \\log(d_i + 1)` over training graphs."""
        total, count = 0.0, 0
        for ei, n in zip(edge_indices, num_nodes):
            deg = torch.bincount(ei[1], minlength=n).double()
            total += float(torch.log1p(deg).sum())
            count += n
        return total / max(count, 1)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> tuple[Tensor, Tensor]:
        if self._fusable(x, edge_index, edge_attr):
            agg, deg, edge_attr = self._messages_fused(x, edge_index, edge_attr)
        else:
            agg, deg, edge_attr = self._messages_reference(x, edge_index, edge_attr)
        return self._update(x, agg, deg), edge_attr

    def _fusable(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> bool:
        """The fused path: CPU float32/float64 tensors, at least one edge, eager mode (under
        ``torch.compile`` and on accelerators the reference path runs, whose scatters
        dispatch to the compiled / Triton kernels)."""
        return (not torch.compiler.is_compiling() and x.device.type == "cpu"
                and x.dtype in _FUSED_DTYPES and edge_attr.dtype == x.dtype
                and edge_index.size(1) > 0 and x.size(0) > 0)

    def _messages_reference(self, x: Tensor, edge_index: Tensor,
                            edge_attr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Edge update, messages and aggregation with one :func:`scatter` per aggregator."""
        src, dst = edge_index[0], edge_index[1]
        n = x.size(0)
        if self.edge_mlp is not None:
            lin, rest = self.edge_mlp[0], self.edge_mlp[1:]
            upd = rest(self._pair_linear(lin, x, src, dst, edge_attr))
            edge_attr = upd + edge_attr if upd.shape == edge_attr.shape else upd
        gamma, beta = self.film(edge_attr).chunk(2, dim=-1)
        m = gamma * self._pair_linear(self.msg, x, src, dst) + beta
        deg = scatter(torch.ones_like(dst, dtype=x.dtype), dst, 0, n, "sum")
        aggs = [scatter(m, dst, 0, n, a) for a in self.aggregators]
        return torch.cat(aggs, dim=-1), deg, edge_attr

    def _messages_fused(self, x: Tensor, edge_index: Tensor,
                        edge_attr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""The same function as :meth:`_messages_reference` with fewer passes over the edges.

        * The node halves of the edge MLP's first layer and of the message layer (biases
          included) are one ``[N, F] x [F, 4h]`` product, gathered per edge by
          :class:`_PairGather` (target half's gradient: a CSR product, no scatter).
        * ``gamma`` and ``beta`` come from the two halves of ``film``'s weight, so no
          ``(E, 2h)`` tensor is split (its backward would concatenate the gradients).
        * All aggregators run in one :class:`_MultiAggregate` on the cached CSR layout of the
          targets, which also gives the degrees (no scatter of ones).
        * The residual edge update adds in place into the MLP output.

        Fastest when the edges are sorted by target (as :class:`GraphMetaNetwork` passes
        them): the CSR products then read the messages contiguously.
        """
        src, dst = edge_index[0], edge_index[1]
        n, f, h = x.size(0), self.in_channels, self.hidden_channels
        csr = get_csr(dst, n, names=("edge_index[1]", "edge_index[0]"))
        lins = [self.msg] if self.edge_mlp is None else [self.edge_mlp[0], self.msg]
        w_dst = torch.cat([lin.weight[:, :f] for lin in lins], dim=0)
        w_src = torch.cat([lin.weight[:, f:2 * f] for lin in lins], dim=0)
        proj = x @ torch.cat([w_dst, w_src], dim=0).t()  # [N, 2kh]: target | source halves
        k = len(lins) * h
        biases = [lin.bias if lin.bias is not None else x.new_zeros(lin.out_features)
                  for lin in lins]
        p_dst = proj[:, :k] + torch.cat(biases)
        zs = _PairGather.apply(p_dst, proj[:, k:], dst, src, csr, h)  # [E, h] per layer
        z = zs[-1]  # W_m [x_i || x_j] + b
        if self.edge_mlp is not None:
            lin, rest = self.edge_mlp[0], self.edge_mlp[1:]
            upd = rest(torch.addmm(zs[0], edge_attr, lin.weight[:, 2 * f:].t()))
            # the residual adds in place: the last Linear's backward does not need its output
            edge_attr = upd.add_(edge_attr) if upd.shape == edge_attr.shape else upd
        # gamma and beta as two products with the halves of film's weight: their gradients
        # are then separate tensors (no (E, 2h) split / concatenation round trip)
        wf, bf = self.film.weight, self.film.bias
        gamma = nn.functional.linear(edge_attr, wf[:h], bf[:h])
        beta = nn.functional.linear(edge_attr, wf[h:], bf[h:])
        m = torch.addcmul(beta, gamma, z)  # gamma * (W_m [x_i || x_j] + b) + beta
        agg = _MultiAggregate.apply(m, dst.long(), csr, self.aggregators)
        return agg, csr.counts(x.dtype), edge_attr

    def _update(self, x: Tensor, agg: Tensor, deg: Tensor) -> Tensor:
        log_deg = torch.log1p(deg).unsqueeze(-1)
        scaled = []
        for s in self.scalers:
            if s == "identity":
                scaled.append(agg)
            elif s == "amplification":
                scaled.append(agg * (log_deg / self.avg_log_degree))
            else:
                scaled.append(agg * (self.avg_log_degree / log_deg.clamp_min(math.log(2.0))))
        return self.root(x) + self.update(torch.cat([x] + scaled, dim=-1))

    def _pair_linear(self, lin: nn.Linear, x: Tensor, src: Tensor, dst: Tensor,
                     edge_attr: Tensor | None = None) -> Tensor:
        r""":math:`W[\mathbf x_i \,\|\, \mathbf x_j \,\|\, \mathbf e_{ij}] + b` computed as
        :math:`(W_1 \mathbf x)_i + (W_2 \mathbf x)_j + W_3 \mathbf e_{ij} + b`: the node
        projections are taken once per node and gathered, so no :math:`|\mathcal E| \times
        (2F + D)` concatenation is materialised (same result, about half the memory
        traffic on parameter graphs, where edges outnumber nodes ~100x)."""
        f = self.in_channels
        w = lin.weight
        xw = x @ torch.cat([w[:, :f], w[:, f:2 * f]], dim=0).t()  # [N, 2h]
        h = w.size(0)
        out = xw[:, :h].index_select(0, dst) + xw[:, h:].index_select(0, src)
        if edge_attr is not None:
            out = torch.addmm(out, edge_attr, w[:, 2 * f:].t())
        return out + lin.bias if lin.bias is not None else out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"edge_dim={self.edge_dim}, aggregators={list(self.aggregators)}, "
                f"scalers={list(self.scalers)})")
