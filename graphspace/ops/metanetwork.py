r"""Fused CPU kernels of the graph-metanetwork layer (`MetaNetworkConv`).

`metanetwork_messages` computes, for a `MetaNetworkConv`, the edge update, the FiLM messages
and all aggregations in one call, with fewer passes over the edges than the layer's
readable `message`/`aggregate` reference, and the same function (same values, and the same
max/min subgradient convention: an output's gradient is split evenly between the messages
that attain it, as in `graphspace.ops.scatter`). Two variants:

* edges sorted by target (what `GraphMetaNetwork` passes) and no dropout in the edge MLP:
  `_ChunkedEdgeLayer`, one chunk of whole target nodes at a time;
* otherwise: `_PairGather` (node projections gathered per edge) and `_MultiAggregate`
  (every aggregator in one pass over a cached CSR layout).

Both run on CPU float32/float64 tensors in eager mode (`metanetwork_fusable`); elsewhere
the layer's reference path runs, whose scatters dispatch to the compiled / Triton kernels.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from graphspace.ops.layout import CSR, get_csr

__all__ = ["EDGE_CHUNK", "KEEP", "metanetwork_fusable", "metanetwork_messages"]

#: dtypes of the fused CPU path (others take the layer's reference path).
_FUSED_DTYPES = (torch.float32, torch.float64)


class _PairGather(torch.autograd.Function):
    r"""`z_c = p_c[dst] + q_c[src]` for column blocks `c` of `p`, `q`: `(N, C * h)`.

    The blocks come out as separate contiguous `(E, h)` tensors (slicing one `(E, C h)`
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


def _node_coefficients(g: Tensor, aggregators: tuple[str, ...], f: int, cntc: Tensor,
                       std: Tensor | None) -> tuple[Tensor | None, Tensor | None,
                                                    list[tuple[str, Tensor]]]:
    r"""Per-node coefficients of the message gradient of a multi-aggregation with output
    gradient `g` (`(N, len(aggregators) * f)`): `a = g_sum + g_mean / n` (of the plain
    gather), `c = g_std / (n \sigma)` (of the centred message) and the `(name, g)` blocks
    of max/min (`None` where no aggregator contributes; fresh tensors, never views of
    `g`)."""
    lin: Tensor | None = None
    cstd: Tensor | None = None
    ext: list[tuple[str, Tensor]] = []
    for k, a in enumerate(aggregators):
        gk = g[:, k * f:(k + 1) * f]
        if a in ("sum", "mean"):
            term = gk.clone() if a == "sum" else gk / cntc
            lin = term if lin is None else lin.add_(term)
        elif a == "std":
            term = gk / (cntc * torch.where(std > 0, std, torch.ones_like(std)))
            cstd = term if cstd is None else cstd.add_(term)
        else:
            ext.append((a, gk))
    return lin, cstd, ext


class _MultiAggregate(torch.autograd.Function):
    r"""Several reductions of the same messages over the same target index in one pass.

    `out = [agg_1(m) | agg_2(m) | ...]` (`(N, len(aggregators) * F)`) with the conventions
    of `scatter`: empty rows are 0, `std` is
    $\sqrt{\operatorname{mean}((m - \mu)^2) + 10^{-12}}$, and the gradient of a
    max/min entry is split evenly between the messages that attain it. All reductions run as
    products with the (cached) sparse CSR matrix of ones of the target index, so the sum that
    `mean` and `std` share is taken once and, when the edges are sorted by target, every
    product reads the messages contiguously. The backward pass gathers one per-node
    coefficient per reduction and forms the message gradient in place:

    $$
    \frac{\partial L}{\partial m_e} = \sum_{\text{sum}} g_{i} +
    \sum_{\text{mean}} \frac{g_{i}}{n_i} + \sum_{\text{max/min}} [m_e = o_i]
    \frac{g_{i}}{t_i} + \sum_{\text{std}} (m_e - \mu_i)\frac{g_{i}}{n_i\,\sigma_i},
    \qquad i = \mathrm{index}_e
    $$

    ($n_i$ messages and $t_i$ ties at row $i$).
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
        lin, cstd, ext = _node_coefficients(g, ctx.aggregators, f, cntc, std)
        grad: Tensor | None = None
        if cstd is not None:
            grad = cstd.index_select(0, index).mul_(centred)
        for a, gk in ext:  # max / min: split between the messages equal to the output
            hit = (mx if a == "max" else mn).index_select(0, index)
            torch.eq(m, hit, out=hit)  # 1.0 / 0.0 in m's dtype
            ties = torch.sparse.mm(csr.sparse_ones(m.dtype), hit).clamp_(min=1)
            part = (gk / ties).index_select(0, index).mul_(hit)
            grad = part if grad is None else grad.add_(part)
        if lin is not None:
            part = lin.index_select(0, index)
            grad = part if grad is None else grad.add_(part)
        return grad, None, None, None


#: target number of edges per chunk of the chunked CPU path (chunks end at node boundaries).
EDGE_CHUNK = 16384
#: per-edge intermediates of the chunked path kept for backward (the others are recomputed)
KEEP = ("z0", "act", "zm", "gamma", "m")


class _EdgeChunks:
    """Target-node-aligned chunks of target-sorted edges, built once per CSR layout.

    Chunk `k` covers nodes `n0:n1` and exactly their incoming edges `s:t` (contiguous
    because the edges are sorted by target); `ldst` holds the chunk-local targets
    (`dst - n0`) and the sparse CSR matrix of ones `(n1 - n0, t - s)` sums a chunk's
    messages per node.
    """

    def __init__(self, csr: CSR, chunk: int) -> None:
        ptr = csr.ptr
        e = csr.num_edges
        targets = torch.tensor(list(range(chunk, e, chunk)), dtype=ptr.dtype, device=ptr.device)
        nodes = sorted({0, csr.num_rows, *torch.searchsorted(ptr, targets).tolist()})
        bounds = ptr[nodes].tolist()
        self.csr = csr
        self.chunks: list[tuple[int, int, int, int]] = []
        self.ldst: list[Tensor] = []
        for (n0, n1), (s, t) in zip(zip(nodes[:-1], nodes[1:]), zip(bounds[:-1], bounds[1:])):
            if t > s:
                self.chunks.append((n0, n1, s, t))
                self.ldst.append(csr.row[s:t] - n0)
        self._ones: dict[torch.dtype, list[Tensor]] = {}

    def ones(self, dtype: torch.dtype) -> list[Tensor]:
        """Per chunk: the `(n1 - n0, t - s)` sparse CSR matrix of ones of its targets."""
        if dtype not in self._ones:
            mats = []
            for n0, n1, s, t in self.chunks:
                crow = self.csr.ptr[n0:n1 + 1] - s
                col = torch.arange(t - s, device=crow.device)
                vals = torch.ones(t - s, dtype=dtype, device=crow.device)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                    mats.append(torch.sparse_csr_tensor(crow, col, vals, (n1 - n0, t - s),
                                                        check_invariants=False))
            self._ones[dtype] = mats
        return self._ones[dtype]

    @staticmethod
    def of(csr: CSR, chunk: int) -> _EdgeChunks | None:
        """The chunks of `csr` (cached on it), or `None` unless its edges are sorted."""
        key = ("edge_chunks", chunk)
        if key not in csr._memo:
            perm = csr.perm
            ordered = perm.numel() < 2 or bool((perm[1:] > perm[:-1]).all())
            csr._memo[key] = _EdgeChunks(csr, chunk) if ordered else None
        return csr._memo[key]


class _ChunkPass:
    """The per-chunk steps shared by the forward and backward of `_ChunkedEdgeLayer`,
    over the contiguous `(N, h)` column blocks of the node projections and the row blocks
    of `film`'s weight (split once per call, so every per-edge tensor is contiguous). Each
    step writes into `out` when one is given (a slice of a kept full-size tensor)."""

    def __init__(self, p: Tensor, q: Tensor, e: Tensor, we: Tensor | None, w2: Tensor | None,
                 wf: Tensor, bf: Tensor, src: Tensor) -> None:
        h = wf.size(0) // 2
        k = p.size(1) // h
        self.h, self.mlp = h, we is not None
        self.ps = [p[:, c * h:(c + 1) * h].contiguous() for c in range(k)]
        self.qs = [q[:, c * h:(c + 1) * h].contiguous() for c in range(k)]
        self.e, self.src = e, src
        self.wet = we.t() if self.mlp else None
        self.w2t = w2.t() if self.mlp else None
        self.wfg, self.wfb = wf[:h], wf[h:]  # row blocks: contiguous
        self.bfg, self.bfb = bf[:h], bf[h:]

    def pair(self, c: int, dst_c: Tensor, s: int, t: int, out: Tensor | None = None) -> Tensor:
        """Block `c` of `p[dst] + q[src]` for the chunk's edges `s:t`."""
        z = torch.index_select(self.ps[c], 0, dst_c, out=out)
        return z.add_(self.qs[c].index_select(0, self.src[s:t]))

    def z0(self, dst_c: Tensor, s: int, t: int, out: Tensor | None = None) -> Tensor:
        """The edge MLP's pre-activation `p0[dst] + q0[src] + e W_e^T`."""
        return self.pair(0, dst_c, s, t, out).addmm_(self.e[s:t], self.wet)

    def zm(self, dst_c: Tensor, s: int, t: int, out: Tensor | None = None) -> Tensor:
        """The message layer's block `W_m [x_i || x_j] + b`."""
        return self.pair(len(self.ps) - 1, dst_c, s, t, out)

    def gamma(self, ec: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.addmm(self.bfg, ec, self.wfg.t(), out=out)

    def message(self, ec: Tensor, gamma: Tensor, zm: Tensor,
                out: Tensor | None = None) -> Tensor:
        """`m = gamma * zm + beta`."""
        beta = torch.addmm(self.bfb, ec, self.wfb.t(), out=out)
        return beta.addcmul_(gamma, zm)


class _ChunkedEdgeLayer(torch.autograd.Function):
    r"""Edge update, FiLM messages and multi-aggregation of `MetaNetworkConv` over
    target-sorted edges, one chunk of whole target nodes at a time.

    Inputs: `p` `(N, k h)` the target halves (biases included) and `q` `(N, k h)` the
    source halves of the node projections (`k = 2`: edge-MLP first layer | message layer;
    `k = 1`: message layer only), edge features `e`, the edge MLP's edge weight `we`
    `(h, D)`, second layer `w2` `(D', h)`, `b2`, and `film`'s `wf` `(2h, D')`,
    `bf`. Per chunk of edges:

    $$
    \begin{aligned}
    z &= p_{dst} + q_{src}, \quad
    \mathbf e' = [\mathbf e +]\, W_2\, \mathrm{SiLU}(z_{:h} + W_e \mathbf e) + b_2, \\
    [\gamma \| \beta] &= W_f \mathbf e' + b_f, \quad
    \mathbf m = \gamma \odot z_{h:} + \beta
    \end{aligned}
    $$

    and the aggregations of `_MultiAggregate` over the chunk's nodes (the per-node
    finishing steps of `mean`/`std`/`max`/`min` run once over all nodes). Returns
    `(agg, e')`. The per-edge intermediates named in `KEEP` (`z0` the SiLU input,
    `act`, `zm = z_{h:}`, `gamma`, `m`) are written into full-size tensors kept for
    backward; the others are recomputed chunk by chunk there. Keeping all of them is the
    fastest on CPU when freed memory stays in the process
    (`tune_cpu_allocator`); recomputing trades GEMMs for ~5 fewer
    `(E, h)` tensors. Max/min ties are taken against chunk extrema of the kept (or
    recomputed) messages, so the gradient is exact for them. With the per-node coefficients
    of `backward` folded together, the message gradient of an edge
    into node $i$ is

    $$
    \frac{\partial L}{\partial m} = \big(a_i - c_i \mu_i\big) + c_i\, m +
    \sum_{\text{max/min}} [m = o_i]\, \frac{g_i}{t_i},
    \qquad a = g_{sum} + \frac{g_{mean}}{n}, \quad c = \frac{g_{std}}{n \sigma}.
    $$

    Every per-edge tensor is contiguous (the column blocks of `p`, `q` and of `film`'s
    weight are split once per call), and the target-half gradient is one CSR product over
    all edges after the loop.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor, q: Tensor, e: Tensor, we: Tensor | None,
                w2: Tensor | None, b2: Tensor | None, wf: Tensor, bf: Tensor,
                src: Tensor, plan: _EdgeChunks, aggregators: tuple[str, ...],
                residual: bool) -> tuple[Tensor, Tensor]:
        cp = _ChunkPass(p, q, e, we, w2, wf, bf, src)
        h, mlp, n = cp.h, cp.mlp, p.size(0)
        cnt = plan.csr.counts(p.dtype).unsqueeze(-1)
        cntc = cnt.clamp(min=1)
        aset = set(aggregators)
        need_sum = bool(aset & {"sum", "mean", "std"})
        # zero-filled: the node ranges without edges belong to no chunk
        total = p.new_zeros(n, h) if "sum" in aset else None
        mean = p.new_zeros(n, h) if need_sum else None
        sq = p.new_zeros(n, h) if "std" in aset else None
        ext = {a: p.new_zeros(n, h) for a in ("max", "min") if a in aset}
        eo = e.new_empty(e.size(0), w2.size(0)) if mlp else e
        names = [k for k in KEEP if mlp or k not in ("z0", "act")]
        kept = {k: e.new_empty(e.size(0), h) for k in names}  # written chunk by chunk
        for (n0, n1, s, t), ldst, ones in zip(plan.chunks, plan.ldst, plan.ones(p.dtype)):
            dst_c = plan.csr.row[s:t]
            out = {k: v[s:t] for k, v in kept.items()}
            if mlp:
                z0 = cp.z0(dst_c, s, t, out.get("z0"))
                act = nn.functional.silu(z0) if "act" not in out else \
                    torch.ops.aten.silu.out(z0, out=out["act"])
                ec = eo[s:t]
                if residual:
                    torch.add(e[s:t], b2, out=ec)
                else:
                    ec.copy_(b2)
                ec.addmm_(act, cp.w2t)
            else:
                ec = e[s:t]
            zm = cp.zm(dst_c, s, t, out.get("zm"))
            m = cp.message(ec, cp.gamma(ec, out.get("gamma")), zm, out.get("m"))
            for a, buf in ext.items():
                buf[n0:n1] = torch.sparse.mm(ones, m, "amax" if a == "max" else "amin")
            if need_sum:
                sums = torch.mm(ones, m, out=total[n0:n1]) if total is not None else \
                    torch.sparse.mm(ones, m)
                mean_c = torch.div(sums, cntc[n0:n1], out=mean[n0:n1])
                if sq is not None:
                    cen = mean_c.index_select(0, ldst)
                    cen = torch.sub(m, cen, out=cen) if "m" in out else m.sub_(cen)
                    torch.mm(ones, cen.square_(), out=sq[n0:n1])
        empty = cnt == 0
        outs: dict[str, Tensor] = {"sum": total, "mean": mean}
        for a, buf in ext.items():
            outs[a] = buf.masked_fill_(empty, 0.0)
        if sq is not None:
            outs["std"] = sq.div_(cntc).add_(1e-12).sqrt_().masked_fill_(empty, 0.0)
        ctx.plan, ctx.aggregators, ctx.residual = plan, aggregators, residual
        ctx.kept = tuple(kept)
        ctx.save_for_backward(p, q, e, we, w2, b2, wf, bf, src, eo if mlp else None,
                              mean, outs.get("std"), *kept.values())
        ctx.set_materialize_grads(False)
        agg = torch.cat([outs[a] for a in aggregators], dim=-1)
        return agg, eo if mlp else e.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_agg: Tensor, g_eo: Tensor | None) -> tuple[Tensor | None, ...]:
        p, q, e, we, w2, b2, wf, bf, src, eo, mean, std, *kept_t = ctx.saved_tensors
        kept = dict(zip(ctx.kept, kept_t))
        plan: _EdgeChunks = ctx.plan
        aggregators: tuple[str, ...] = ctx.aggregators
        cp = _ChunkPass(p, q, e, we, w2, wf, bf, src)
        h, mlp = cp.h, cp.mlp
        n, kh = p.shape
        if g_agg is None:
            g_agg = p.new_zeros(n, len(aggregators) * h)
        if not mlp:
            g_eo = None
        cntc = plan.csr.counts(p.dtype).unsqueeze(-1).clamp(min=1)
        # per-node coefficients of the message gradient (see the class docstring)
        lin, cstd, ext = _node_coefficients(g_agg, aggregators, h, cntc, std)
        if lin is None:
            lin = p.new_zeros(n, h)
        if cstd is not None:  # folded: a - c mu per node, c m per edge
            lin.addcmul_(cstd, mean, value=-1.0)
        need_m = cstd is not None or bool(ext)
        gzs = [e.new_empty(e.size(0), h) for _ in range(kh // h)]  # d z per column block
        ge_in = torch.empty_like(e)
        gwe = torch.zeros_like(we) if mlp else None
        gw2 = torch.zeros_like(w2) if mlp else None
        gb2 = torch.zeros_like(b2) if mlp else None
        gwf, gbf = torch.zeros_like(wf), torch.zeros_like(bf)
        for (n0, n1, s, t), ldst, ones in zip(plan.chunks, plan.ldst, plan.ones(p.dtype)):
            dst_c = plan.csr.row[s:t]
            ec = eo[s:t] if mlp else e[s:t]
            got = {k: v[s:t] for k, v in kept.items()}
            if mlp:
                z0 = got["z0"] if "z0" in got else cp.z0(dst_c, s, t)
                act = got["act"] if "act" in got else nn.functional.silu(z0)
            zm = got["zm"] if "zm" in got else cp.zm(dst_c, s, t)
            gamma = got["gamma"] if "gamma" in got else cp.gamma(ec)
            m = got["m"] if "m" in got else cp.message(ec, gamma, zm) if need_m else None
            gm = lin.index_select(0, dst_c)
            if cstd is not None:
                gm.addcmul_(cstd.index_select(0, dst_c), m)
            for a, gk in ext:
                red = torch.sparse.mm(ones, m, "amax" if a == "max" else "amin")
                hit = red.index_select(0, ldst)
                torch.eq(m, hit, out=hit)  # 1.0 / 0.0 in m's dtype
                ties = torch.sparse.mm(ones, hit).clamp_(min=1)
                gm.addcmul_((gk[n0:n1] / ties).index_select(0, ldst), hit)
            # film: d gamma = gm * zm, d beta = gm; message-layer block: gm * gamma
            ggamma = gm * zm
            torch.mul(gm, gamma, out=gzs[-1][s:t])
            gwf[:h].addmm_(ggamma.t(), ec)
            gwf[h:].addmm_(gm.t(), ec)
            gbf[:h].add_(ggamma.sum(0))
            gbf[h:].add_(gm.sum(0))
            gec = ge_in[s:t] if not mlp or ctx.residual else e.new_empty(t - s, ec.size(1))
            torch.mm(ggamma, cp.wfg, out=gec).addmm_(gm, cp.wfb)
            if g_eo is not None:
                gec.add_(g_eo[s:t])
            if not mlp:
                continue  # gec is ge_in[s:t] already
            gw2.addmm_(gec.t(), act)
            gb2.add_(gec.sum(0))
            gz0 = gzs[0][s:t]
            torch.ops.aten.silu_backward.grad_input(gec @ w2, z0, grad_input=gz0)
            gwe.addmm_(gz0.t(), e[s:t])
            if ctx.residual:
                gec.addmm_(gz0, we)  # in place: gec is ge_in[s:t]
            else:
                torch.mm(gz0, we, out=ge_in[s:t])
        # the source- and target-half gradients: one CSR product each over all edges
        ones_dst = plan.csr.sparse_ones(p.dtype)
        gp = torch.cat([torch.sparse.mm(ones_dst, gzb) for gzb in gzs], dim=1)
        gq = None
        if ctx.needs_input_grad[1]:
            ones_src = get_csr(src, n).sparse_ones(p.dtype)
            gq = torch.cat([torch.sparse.mm(ones_src, gzb) for gzb in gzs], dim=1)
        return (gp, gq, ge_in, gwe, gw2, gb2, gwf, gbf, None, None, None, None)


def metanetwork_fusable(x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> bool:
    """Whether `metanetwork_messages` can run: CPU float32/float64 tensors of one dtype, at
    least one edge and one node, eager mode (not under `torch.compile`)."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype in _FUSED_DTYPES and edge_attr.dtype == x.dtype
            and edge_index.size(1) > 0 and x.size(0) > 0)


def metanetwork_messages(conv: nn.Module, x: Tensor, edge_index: Tensor,
                         edge_attr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Edge update, FiLM messages and multi-aggregation of a `MetaNetworkConv`, fused.

    Computes what the layer's `edge_update`, `message` and `aggregate` compute,

    $$\mathbf e'_{ij} = [\mathbf e_{ij} +]\, \phi_e([\mathbf x_i \| \mathbf x_j \|
    \mathbf e_{ij}]), \quad \mathbf m_{ij} = \gamma(\mathbf e'_{ij}) \odot
    W_m[\mathbf x_i \| \mathbf x_j] + \beta(\mathbf e'_{ij}), \quad
    \mathbf a_i = [\textstyle\bigoplus_j \mathbf m_{ij}]_{\oplus \in \mathcal A},$$

    reading the layer's weights (`conv.msg`, `conv.film`, `conv.edge_mlp`,
    `conv.aggregators`, `conv.in_channels`, `conv.hidden_channels`).

    Args:
        conv: the `MetaNetworkConv` whose weights to use.
        x: node features, CPU float32/float64 (see `metanetwork_fusable`).
        edge_index: `(2, E)` edges, row 0 sources, row 1 targets, indices checked.
        edge_attr: `(E, D)` edge features, dtype of `x`.

    Returns:
        `(agg, deg, edge_attr')`: the aggregations `(N, len(aggregators) * h)`, the
        in-degrees `(N,)` in the dtype of `x`, and the updated edge features (`edge_attr`
        itself when the layer has no edge update).
    """
    return _messages_fused(conv, x, edge_index, edge_attr)


def _messages_fused(conv: Any, x: Tensor, edge_index: Tensor,
                    edge_attr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The layer's edge update, messages and aggregation with fewer passes over the edges.

    * The node halves of the edge MLP's first layer and of the message layer (biases
      included) are one `[N, F] x [F, 4h]` product, gathered per edge by
      `_PairGather` (target half's gradient: a CSR product, no scatter).
    * `gamma` and `beta` come from the two halves of `film`'s weight, so no
      `(E, 2h)` tensor is split (its backward would concatenate the gradients).
    * All aggregators run in one `_MultiAggregate` on the cached CSR layout of the
      targets, which also gives the degrees (no scatter of ones).
    * The residual edge update adds in place into the MLP output.

    Fastest when the edges are sorted by target (as `GraphMetaNetwork` passes
    them): the CSR products then read the messages contiguously.
    """
    src, dst = edge_index[0], edge_index[1]
    n, f, h = x.size(0), conv.in_channels, conv.hidden_channels
    csr = get_csr(dst, n, names=("edge_index[1]", "edge_index[0]"))
    dropout = conv.edge_mlp is not None and conv.training and conv.edge_mlp[2].p > 0
    chunks = None if dropout else _EdgeChunks.of(csr, EDGE_CHUNK)
    w_dst, w_src, bias = _node_halves(conv, x)
    if chunks is not None:
        return _messages_chunked(conv, x, src, edge_attr, chunks, w_dst, w_src, bias)
    proj = x @ torch.cat([w_dst, w_src], dim=0).t()  # [N, 2kh]: target | source halves
    k = w_dst.size(0)
    p_dst = proj[:, :k] + bias
    zs = _PairGather.apply(p_dst, proj[:, k:], dst, src, csr, h)  # [E, h] per layer
    z = zs[-1]  # W_m [x_i || x_j] + b
    if conv.edge_mlp is not None:
        lin, rest = conv.edge_mlp[0], conv.edge_mlp[1:]
        upd = rest(torch.addmm(zs[0], edge_attr, lin.weight[:, 2 * f:].t()))
        # the residual adds in place: the last Linear's backward does not need its output
        edge_attr = upd.add_(edge_attr) if upd.shape == edge_attr.shape else upd
    # gamma and beta as two products with the halves of film's weight: their gradients
    # are then separate tensors (no (E, 2h) split / concatenation round trip)
    wf, bf = conv.film.weight, conv.film.bias
    gamma = nn.functional.linear(edge_attr, wf[:h], bf[:h])
    beta = nn.functional.linear(edge_attr, wf[h:], bf[h:])
    m = torch.addcmul(beta, gamma, z)  # gamma * (W_m [x_i || x_j] + b) + beta
    agg = _MultiAggregate.apply(m, dst.long(), csr, conv.aggregators)
    return agg, csr.counts(x.dtype), edge_attr

def _node_halves(conv: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Target-node and source-node halves of the weights of the layers that read
    $[\mathbf x_i \| \mathbf x_j \| \dots]$ (edge MLP's first layer, if any, then the
    message layer), stacked `[k h, F]`, and their biases `[k h]`."""
    f = conv.in_channels
    lins = [conv.msg] if conv.edge_mlp is None else [conv.edge_mlp[0], conv.msg]
    w_dst = torch.cat([lin.weight[:, :f] for lin in lins], dim=0)
    w_src = torch.cat([lin.weight[:, f:2 * f] for lin in lins], dim=0)
    bias = torch.cat([lin.bias if lin.bias is not None else x.new_zeros(lin.out_features)
                      for lin in lins])
    return w_dst, w_src, bias

def _messages_chunked(conv: Any, x: Tensor, src: Tensor, edge_attr: Tensor,
                      chunks: _EdgeChunks, w_dst: Tensor, w_src: Tensor,
                      bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`_messages_fused` on target-sorted edges: the node projections as two
    `[N, F] x [F, k h]` products, everything per edge in `_ChunkedEdgeLayer`."""
    f = conv.in_channels
    p = torch.addmm(bias, x, w_dst.t())
    q = x @ w_src.t()
    we = w2 = b2 = None
    residual = False
    if conv.edge_mlp is not None:
        we = conv.edge_mlp[0].weight[:, 2 * f:]
        w2, b2 = conv.edge_mlp[3].weight, conv.edge_mlp[3].bias
        residual = w2.size(0) == edge_attr.size(1)
    agg, eo = _ChunkedEdgeLayer.apply(p, q, edge_attr, we, w2, b2, conv.film.weight,
                                      conv.film.bias, src.long(), chunks,
                                      conv.aggregators, residual)
    return agg, chunks.csr.counts(x.dtype), eo if conv.edge_mlp is not None else edge_attr

