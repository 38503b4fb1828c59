"""Triton backend: fused gather -> message -> aggregate kernels (imported lazily).

Forward kernels walk the CSR layout (edges sorted by target): one program per (target row,
feature tile) loops over the row's edges, gathers source rows, forms the messages in registers
and reduces them in float32 (float64 for float64 inputs). No `E x F` tensor is written and no
atomics are used, so forward results are deterministic.

Backward: gradients with respect to node features of sum/mean ops reuse the forward kernel on
the transposed layout (edges sorted by source); per-edge gradients (edge weights, edge features,
EGNN coefficients, sheaf maps) come from edge-parallel kernels. Max/min backward and the EGNN
position gradient accumulate node gradients with float32/64 atomics.

Every function here takes tensors already validated by `graphspace.ops` and returns them in
the accumulation dtype, like `graphspace.ops._torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphspace.ops.layout import CSR

#: kernels read inputs in their own dtype and accumulate in float32/float64 registers
UPCAST_INPUTS = False
_REDUCE = {"sum": 0, "mean": 1, "max": 2, "min": 3, "std": 4}


@triton.jit
def _coef(w_ptr, stride_w, eid, emask, m2, offs_f, ea, wt,
          MODE: tl.constexpr, ACC: tl.constexpr):
    """Per-edge message coefficient tile: scalar weight (MODE 1), per-channel weight (MODE 2) or
    the edge-conditioned `e_ij @ W` (MODE 3). MODE 0 has none (callers skip the product)."""
    if MODE == 1:
        c = tl.load(w_ptr + eid, mask=emask, other=0.0).to(ACC)[:, None]
    elif MODE == 2:
        c = tl.load(w_ptr + eid[:, None] * stride_w + offs_f[None, :], mask=m2, other=0.0).to(ACC)
    else:
        c = tl.dot(ea, wt, input_precision="ieee", out_dtype=ACC)
    return c


@triton.jit
def _csr_reduce_kernel(
    x_ptr, stride_x, col_ptr, perm_ptr, ptr_ptr,
    w_ptr, stride_w, ea_ptr, stride_ea, wt_ptr, stride_wt, n_de,
    out_ptr, stride_out, ties_ptr, n_f,
    MODE: tl.constexpr, REDUCE: tl.constexpr, NEED_TIES: tl.constexpr, ACC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < n_f
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < n_de
    wt = tl.zeros((BLOCK_D, BLOCK_F), dtype=ACC)
    if MODE == 3:
        wt = tl.load(wt_ptr + offs_d[:, None] * stride_wt + offs_f[None, :],
                     mask=dmask[:, None] & fmask[None, :], other=0.0).to(ACC)
    # max and min share one code path: min is minus the max of the negated messages
    if REDUCE == 2 or REDUCE == 3:
        acc = tl.full((BLOCK_F,), float("-inf"), dtype=ACC)
    else:
        acc = tl.zeros((BLOCK_F,), dtype=ACC)
    ties = tl.zeros((BLOCK_F,), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        m2 = emask[:, None] & fmask[None, :]
        src = tl.load(col_ptr + offs_e, mask=emask, other=0)
        eid = tl.load(perm_ptr + offs_e, mask=emask, other=0)
        msg = tl.load(x_ptr + src[:, None] * stride_x + offs_f[None, :], mask=m2,
                      other=0.0).to(ACC)
        if MODE != 0:
            ea = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC)
            if MODE == 3:
                ea = tl.load(ea_ptr + eid[:, None] * stride_ea + offs_d[None, :],
                             mask=emask[:, None] & dmask[None, :], other=0.0).to(ACC)
            msg = msg * _coef(w_ptr, stride_w, eid, emask, m2, offs_f, ea, wt, MODE, ACC)
        if REDUCE == 3:
            msg = -msg
        if REDUCE == 2 or REDUCE == 3:
            msg = tl.where(m2, msg, float("-inf"))
            bmax = tl.max(msg, axis=0)
            if NEED_TIES:
                hit = m2 & (msg == bmax[None, :])
                bcnt = tl.sum(tl.where(hit, 1.0, 0.0).to(ACC), axis=0)
                ties = tl.where(bmax > acc, bcnt, tl.where(bmax == acc, ties + bcnt, ties))
            acc = tl.maximum(acc, bmax)
        else:
            acc += tl.sum(msg, axis=0)
    n = (end - start).to(ACC)
    if REDUCE == 1:
        acc = acc / tl.maximum(n, 1.0)
    elif REDUCE == 2:
        acc = tl.where(n > 0, acc, 0.0)
    elif REDUCE == 3:
        acc = tl.where(n > 0, -acc, 0.0)
    elif REDUCE == 4:
        mean = acc / tl.maximum(n, 1.0)
        var = tl.zeros((BLOCK_F,), dtype=ACC)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            emask = offs_e < end
            m2 = emask[:, None] & fmask[None, :]
            src = tl.load(col_ptr + offs_e, mask=emask, other=0)
            v = tl.load(x_ptr + src[:, None] * stride_x + offs_f[None, :], mask=m2,
                        other=0.0).to(ACC)
            dv = tl.where(m2, v - mean[None, :], 0.0)
            var += tl.sum(dv * dv, axis=0)
        acc = tl.where(n > 0, tl.sqrt(var / tl.maximum(n, 1.0) + 1e-12), 0.0)
    tl.store(out_ptr + row * stride_out + offs_f, acc, mask=fmask)
    if NEED_TIES:
        tl.store(ties_ptr + row * stride_out + offs_f, ties, mask=fmask)


@triton.jit
def _edge_backward_kernel(
    g_ptr, x_ptr, row_ptr, col_ptr, perm_ptr, n_e, n_f,
    w_ptr, stride_w, ea_ptr, stride_ea, wt_ptr, stride_wt, n_de,
    out_ptr, ties_ptr, gx_ptr, gw_ptr, gea_ptr, gwt_ptr,
    MODE: tl.constexpr, EXTREMUM: tl.constexpr, GX_ATOMIC: tl.constexpr,
    NEED_W: tl.constexpr, NEED_EA: tl.constexpr, NEED_WT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-edge gradients of `out_i = reduce_j x_j * c_ij` (`g`, `x`, `out`, `ties` and
    `gx` are contiguous with `n_f` columns)."""
    offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = offs_e < n_e
    rows = tl.load(row_ptr + offs_e, mask=emask, other=0)
    src = tl.load(col_ptr + offs_e, mask=emask, other=0)
    eid = tl.load(perm_ptr + offs_e, mask=emask, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < n_de
    ea = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC)
    if MODE == 3:
        ea = tl.load(ea_ptr + eid[:, None] * stride_ea + offs_d[None, :],
                     mask=emask[:, None] & dmask[None, :], other=0.0).to(ACC)
    gw_acc = tl.zeros((BLOCK_E,), dtype=ACC)
    gea_acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC)
    for f0 in range(0, n_f, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < n_f
        m2 = emask[:, None] & fmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * n_f + offs_f[None, :], mask=m2, other=0.0).to(ACC)
        xv = tl.load(x_ptr + src[:, None] * n_f + offs_f[None, :], mask=m2, other=0.0).to(ACC)
        wt = tl.zeros((BLOCK_D, BLOCK_F), dtype=ACC)
        if MODE == 3:
            wt = tl.load(wt_ptr + offs_d[:, None] * stride_wt + offs_f[None, :],
                         mask=dmask[:, None] & fmask[None, :], other=0.0).to(ACC)
        c = tl.zeros((BLOCK_E, BLOCK_F), dtype=ACC) + 1.0
        if MODE != 0:
            c = c * _coef(w_ptr, stride_w, eid, emask, m2, offs_f, ea, wt, MODE, ACC)
        if EXTREMUM:
            if MODE != 0:
                msg = xv * _coef(w_ptr, stride_w, eid, emask, m2, offs_f, ea, wt, MODE, ACC)
            else:
                msg = xv
            o = tl.load(out_ptr + rows[:, None] * n_f + offs_f[None, :], mask=m2, other=0.0)
            t = tl.load(ties_ptr + rows[:, None] * n_f + offs_f[None, :], mask=m2, other=1.0)
            g = tl.where(m2 & (msg == o), g / tl.maximum(t, 1.0), 0.0)
        if GX_ATOMIC:
            tl.atomic_add(gx_ptr + src[:, None] * n_f + offs_f[None, :], g * c, mask=m2)
        gc = g * xv
        if NEED_W:
            if MODE == 1:
                gw_acc += tl.sum(gc, axis=1)
            else:
                tl.store(gw_ptr + eid[:, None] * stride_w + offs_f[None, :], gc, mask=m2)
        if NEED_EA:
            gea_acc += tl.dot(gc, tl.trans(wt), input_precision="ieee", out_dtype=ACC)
        if NEED_WT:
            part = tl.dot(tl.trans(ea), gc, input_precision="ieee", out_dtype=ACC)
            tl.atomic_add(gwt_ptr + offs_d[:, None] * n_f + offs_f[None, :], part,
                          mask=dmask[:, None] & fmask[None, :])
    if NEED_W:
        if MODE == 1:
            tl.store(gw_ptr + eid, gw_acc, mask=emask)
    if NEED_EA:
        tl.store(gea_ptr + eid[:, None] * stride_ea + offs_d[None, :], gea_acc,
                 mask=emask[:, None] & dmask[None, :])


@triton.jit
def _egnn_forward_kernel(
    pos_ptr, coef_ptr, col_ptr, perm_ptr, ptr_ptr, out_ptr, n_d, eps,
    MEAN: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < n_d
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    pi = tl.load(pos_ptr + row * n_d + offs_d, mask=dmask, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        m2 = emask[:, None] & dmask[None, :]
        src = tl.load(col_ptr + offs_e, mask=emask, other=0)
        eid = tl.load(perm_ptr + offs_e, mask=emask, other=0)
        pj = tl.load(pos_ptr + src[:, None] * n_d + offs_d[None, :], mask=m2, other=0.0).to(ACC)
        c = tl.load(coef_ptr + eid, mask=emask, other=0.0).to(ACC)
        diff = tl.where(m2, pi[None, :] - pj, 0.0)
        if NORMALIZE:
            r = tl.sqrt(tl.sum(diff * diff, axis=1))
            c = c / (r + eps)
        acc += tl.sum(diff * c[:, None], axis=0)
    if MEAN:
        acc = acc / tl.maximum((end - start).to(ACC), 1.0)
    tl.store(out_ptr + row * n_d + offs_d, acc, mask=dmask)


@triton.jit
def _egnn_backward_kernel(
    g_ptr, pos_ptr, coef_ptr, row_ptr, col_ptr, perm_ptr, n_e, n_d, eps,
    gpos_ptr, gcoef_ptr,
    NORMALIZE: tl.constexpr, NEED_POS: tl.constexpr, NEED_COEF: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = offs_e < n_e
    offs_d = tl.arange(0, BLOCK_D)
    m2 = emask[:, None] & (offs_d < n_d)[None, :]
    rows = tl.load(row_ptr + offs_e, mask=emask, other=0)
    src = tl.load(col_ptr + offs_e, mask=emask, other=0)
    eid = tl.load(perm_ptr + offs_e, mask=emask, other=0)
    g = tl.load(g_ptr + rows[:, None] * n_d + offs_d[None, :], mask=m2, other=0.0).to(ACC)
    pi = tl.load(pos_ptr + rows[:, None] * n_d + offs_d[None, :], mask=m2, other=0.0).to(ACC)
    pj = tl.load(pos_ptr + src[:, None] * n_d + offs_d[None, :], mask=m2, other=0.0).to(ACC)
    c = tl.load(coef_ptr + eid, mask=emask, other=0.0).to(ACC)
    diff = pi - pj
    if NORMALIZE:
        r = tl.sqrt(tl.sum(diff * diff, axis=1))
        sr = r + eps
        u = diff / sr[:, None]
    else:
        u = diff
    if NEED_COEF:
        tl.store(gcoef_ptr + eid, tl.sum(g * u, axis=1), mask=emask)
    if NEED_POS:
        v = g * c[:, None]
        if NORMALIZE:
            # d/dd of d / (|d| + eps) is I / s - d d^T / (|d| s^2); the second term is 0 at d = 0
            radial = tl.sum(diff * v, axis=1) / tl.where(r > 0, r * sr * sr, 1.0)
            v = v / sr[:, None] - diff * radial[:, None]
        tl.atomic_add(gpos_ptr + rows[:, None] * n_d + offs_d[None, :], v, mask=m2)
        tl.atomic_add(gpos_ptr + src[:, None] * n_d + offs_d[None, :], -v, mask=m2)


@triton.jit
def _sheaf_forward_kernel(
    x_ptr, maps_ptr, col_ptr, perm_ptr, ptr_ptr, out_ptr, n_c,
    D: tl.constexpr, MEAN: tl.constexpr, TRANS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """`out[i, a, c] = sum_e F_e[a, b] x[j, b, c]` (`F_e^T` when `TRANS`)."""
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < n_c
    offs_a = tl.arange(0, BLOCK_D)
    amask = offs_a < D
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_D, BLOCK_C), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        src = tl.load(col_ptr + offs_e, mask=emask, other=0)
        eid = tl.load(perm_ptr + offs_e, mask=emask, other=0)
        part = tl.zeros((BLOCK_E, BLOCK_D, BLOCK_C), dtype=ACC)
        for b in tl.static_range(D):
            if TRANS:
                m_offs = eid[:, None] * (D * D) + b * D + offs_a[None, :]
            else:
                m_offs = eid[:, None] * (D * D) + offs_a[None, :] * D + b
            fb = tl.load(maps_ptr + m_offs, mask=emask[:, None] & amask[None, :],
                         other=0.0).to(ACC)
            xb = tl.load(x_ptr + src[:, None] * (D * n_c) + b * n_c + offs_c[None, :],
                         mask=emask[:, None] & cmask[None, :], other=0.0).to(ACC)
            part += fb[:, :, None] * xb[:, None, :]
        acc += tl.sum(part, axis=0)
    if MEAN:
        acc = acc / tl.maximum((end - start).to(ACC), 1.0)
    tl.store(out_ptr + row * (D * n_c) + offs_a[:, None] * n_c + offs_c[None, :], acc,
             mask=amask[:, None] & cmask[None, :])


@triton.jit
def _sheaf_maps_grad_kernel(
    g_ptr, x_ptr, row_ptr, col_ptr, perm_ptr, gmaps_ptr, n_e, n_c,
    D: tl.constexpr, ACC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """`dF_e[a, b] = sum_c g[i, a, c] x[j, b, c]`."""
    offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = offs_e < n_e
    rows = tl.load(row_ptr + offs_e, mask=emask, other=0)
    src = tl.load(col_ptr + offs_e, mask=emask, other=0)
    eid = tl.load(perm_ptr + offs_e, mask=emask, other=0)
    offs_a = tl.arange(0, BLOCK_D)
    amask = offs_a < D
    for b in tl.static_range(D):
        acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC)
        for c0 in range(0, n_c, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < n_c
            g = tl.load(g_ptr + rows[:, None, None] * (D * n_c) + offs_a[None, :, None] * n_c
                        + offs_c[None, None, :],
                        mask=emask[:, None, None] & amask[None, :, None] & cmask[None, None, :],
                        other=0.0).to(ACC)
            xb = tl.load(x_ptr + src[:, None] * (D * n_c) + b * n_c + offs_c[None, :],
                         mask=emask[:, None] & cmask[None, :], other=0.0).to(ACC)
            acc += tl.sum(g * xb[:, None, :], axis=2)
        tl.store(gmaps_ptr + eid[:, None] * (D * D) + offs_a[None, :] * D + b, acc,
                 mask=emask[:, None] & amask[None, :])


# --------------------------------------------------------------------------------- launchers

def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(max(n, 1)))
    return min(v, hi) if hi is not None else v


def _block_e(csr: CSR, mode: int) -> int:
    avg = csr.num_edges / max(csr.num_rows, 1)
    return 16 if (mode == 3 or avg < 24) else 32


def _csr_reduce(
    x: Tensor, csr: CSR, reduce: str, mode: int = 0, w: Tensor | None = None,
    ea: Tensor | None = None, weight: Tensor | None = None, need_ties: bool = False,
) -> tuple[Tensor, Tensor | None]:
    x = x.contiguous()
    n_f = x.size(1)
    acc = _acc(x.dtype)
    out = torch.empty(csr.num_rows, n_f, dtype=acc, device=x.device)
    ties = torch.empty_like(out) if need_ties else out
    if csr.num_rows == 0 or n_f == 0:
        return out, (ties if need_ties else None)
    dummy = x
    w_t = w.contiguous() if w is not None else dummy
    ea_t = ea.contiguous() if ea is not None else dummy
    wt_t = weight.contiguous() if weight is not None else dummy
    n_de = weight.size(0) if weight is not None else 1
    block_f = _pow2(n_f, lo=16 if mode == 3 else 1, hi=64)
    block_d = _pow2(n_de, lo=16) if mode == 3 else 1
    grid = (csr.num_rows, triton.cdiv(n_f, block_f))
    _csr_reduce_kernel[grid](
        x, x.stride(0), csr.col, csr.perm, csr.ptr,
        w_t, w_t.stride(0) if w_t.dim() > 0 else 1, ea_t, ea_t.stride(0), wt_t,
        wt_t.stride(0), n_de,
        out, out.stride(0), ties, n_f,
        MODE=mode, REDUCE=_REDUCE[reduce], NEED_TIES=need_ties, ACC=_tl_acc(x.dtype),
        BLOCK_E=_block_e(csr, mode), BLOCK_F=block_f, BLOCK_D=block_d,
    )
    return out, (ties if need_ties else None)


def _mode(w: Tensor | None) -> int:
    return 0 if w is None else (1 if w.dim() == 1 else 2)


def _scale_mean(g: Tensor, csr: CSR, reduce: str) -> Tensor:
    if reduce != "mean":
        return g
    shape = (-1,) + (1,) * (g.dim() - 1)
    return g / csr.counts(g.dtype).clamp(min=1).view(shape)


def _edge_backward(
    g: Tensor, x: Tensor, out: Tensor | None, ties: Tensor | None, csr: CSR, reduce: str,
    mode: int, w: Tensor | None, ea: Tensor | None, weight: Tensor | None,
    gx_atomic: bool, need_w: bool, need_ea: bool, need_wt: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    acc = g.dtype
    n_f = x.size(1)
    g = g.contiguous()
    x = x.contiguous()
    gx = torch.zeros(x.shape, dtype=acc, device=x.device) if gx_atomic else None
    gw = torch.empty(w.shape, dtype=acc, device=x.device) if need_w and w is not None else None
    gea = torch.empty(ea.shape, dtype=acc, device=x.device) if need_ea and ea is not None \
        else None
    gwt = torch.zeros(weight.shape, dtype=acc, device=x.device) \
        if need_wt and weight is not None else None
    if csr.num_edges == 0 or n_f == 0:
        if gea is not None:
            gea.zero_()
        if gw is not None:
            gw.zero_()
        return gx, gw, gea, gwt
    dummy = g
    w_t = w.contiguous() if w is not None else dummy
    ea_t = ea.contiguous() if ea is not None else dummy
    wt_t = weight.contiguous() if weight is not None else dummy
    n_de = weight.size(0) if weight is not None else 1
    block_e = 16 if mode == 3 else 32
    block_f = _pow2(n_f, lo=16 if mode == 3 else 1, hi=64)
    block_d = _pow2(n_de, lo=16) if mode == 3 else 1
    extremum = reduce in ("max", "min")
    _edge_backward_kernel[(triton.cdiv(csr.num_edges, block_e),)](
        g, x, csr.row, csr.col, csr.perm, csr.num_edges, n_f,
        w_t, w_t.stride(0) if w_t.dim() > 0 else 1, ea_t, ea_t.stride(0), wt_t,
        wt_t.stride(0), n_de,
        out if out is not None else dummy, ties if ties is not None else dummy,
        gx if gx is not None else dummy, gw if gw is not None else dummy,
        gea if gea is not None else dummy, gwt if gwt is not None else dummy,
        MODE=mode, EXTREMUM=extremum, GX_ATOMIC=gx_atomic, NEED_W=gw is not None,
        NEED_EA=gea is not None, NEED_WT=gwt is not None, ACC=_tl_acc(acc),
        BLOCK_E=block_e, BLOCK_F=block_f, BLOCK_D=block_d,
    )
    return gx, gw, gea, gwt


# ------------------------------------------------------------------------- the backend API

def scatter_forward(src: Tensor, csr: CSR, reduce: str) -> Tensor:
    return _csr_reduce(src, csr, reduce)[0]


def weighted_forward(
    x: Tensor, w: Tensor | None, csr: CSR, reduce: str, need_ties: bool = False
) -> tuple[Tensor, Tensor | None]:
    return _csr_reduce(x, csr, reduce, _mode(w), w=w, need_ties=need_ties)


def weighted_backward(
    g: Tensor, x: Tensor, w: Tensor | None, out: Tensor, ties: Tensor | None, csr: CSR,
    reduce: str, need_x: bool, need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    mode = _mode(w)
    need_w = need_w and w is not None
    extremum = reduce in ("max", "min")
    gx = None
    if need_x and not extremum:
        gx = _csr_reduce(_scale_mean(g, csr, reduce), csr.transpose(), "sum", mode, w=w)[0]
    gh = g if extremum else _scale_mean(g, csr, reduce)
    if need_w or (need_x and extremum):
        gxa, gw, _, _ = _edge_backward(gh, x, out, ties, csr, reduce, mode, w,
                                       None, None, gx_atomic=need_x and extremum,
                                       need_w=need_w, need_ea=False, need_wt=False)
        if extremum:
            gx = gxa
        return gx, gw
    return gx, None


def egnn_forward(
    pos: Tensor, coef: Tensor, csr: CSR, reduce: str, normalize: bool, eps: float,
    keep: bool = False,
) -> tuple[Tensor, None]:
    pos = pos.contiguous()
    n_d = pos.size(1)
    out = torch.empty(csr.num_rows, n_d, dtype=_acc(pos.dtype), device=pos.device)
    if csr.num_rows == 0 or n_d == 0:
        return out.zero_(), None
    _egnn_forward_kernel[(csr.num_rows,)](
        pos, coef.contiguous(), csr.col, csr.perm, csr.ptr, out, n_d, float(eps),
        MEAN=reduce == "mean", NORMALIZE=normalize, ACC=_tl_acc(pos.dtype),
        BLOCK_E=32, BLOCK_D=_pow2(n_d),
    )
    return out, None


def egnn_backward(
    g: Tensor, pos: Tensor, coef: Tensor, diffs: None, csr: CSR, reduce: str, normalize: bool,
    eps: float, need_pos: bool, need_coef: bool,
) -> tuple[Tensor | None, Tensor | None]:
    acc = _acc(pos.dtype)
    gh = _scale_mean(g.to(acc), csr, reduce).contiguous()
    gpos = torch.zeros(pos.shape, dtype=acc, device=pos.device) if need_pos else None
    gcoef = torch.zeros(coef.shape, dtype=acc, device=pos.device) if need_coef else None
    if csr.num_edges == 0 or pos.size(1) == 0:
        return gpos, gcoef
    block_e = 64
    _egnn_backward_kernel[(triton.cdiv(csr.num_edges, block_e),)](
        gh, pos.contiguous(), coef.contiguous(), csr.row, csr.col, csr.perm, csr.num_edges,
        pos.size(1), float(eps), gpos if gpos is not None else gh,
        gcoef if gcoef is not None else gh,
        NORMALIZE=normalize, NEED_POS=need_pos, NEED_COEF=need_coef, ACC=_tl_acc(pos.dtype),
        BLOCK_E=block_e, BLOCK_D=_pow2(pos.size(1)),
    )
    return gpos, gcoef


def _sheaf_apply(x: Tensor, maps: Tensor, csr: CSR, mean: bool, trans: bool) -> Tensor:
    x = x.contiguous()
    _, d, c = x.shape
    out = torch.empty(csr.num_rows, d, c, dtype=_acc(x.dtype), device=x.device)
    if csr.num_rows == 0 or c == 0 or d == 0:
        return out.zero_()
    block_c = _pow2(c, hi=64)
    _sheaf_forward_kernel[(csr.num_rows, triton.cdiv(c, block_c))](
        x, maps.contiguous(), csr.col, csr.perm, csr.ptr, out, c,
        D=d, MEAN=mean, TRANS=trans, ACC=_tl_acc(x.dtype),
        BLOCK_E=16, BLOCK_D=_pow2(d), BLOCK_C=block_c,
    )
    return out


def sheaf_forward(x: Tensor, maps: Tensor, csr: CSR, reduce: str) -> Tensor:
    return _sheaf_apply(x, maps, csr, reduce == "mean", trans=False)


def sheaf_backward(
    g: Tensor, x: Tensor, maps: Tensor, csr: CSR, reduce: str, need_x: bool, need_maps: bool
) -> tuple[Tensor | None, Tensor | None]:
    acc = _acc(x.dtype)
    gh = _scale_mean(g.to(acc), csr, reduce).contiguous()
    gx = _sheaf_apply(gh, maps, csr.transpose(), False, trans=True) if need_x else None
    gmaps = None
    if need_maps:
        _, d, c = x.shape
        gmaps = torch.zeros(maps.shape, dtype=acc, device=x.device)
        if csr.num_edges > 0 and c > 0 and d > 0:
            block_e = 16
            _sheaf_maps_grad_kernel[(triton.cdiv(csr.num_edges, block_e),)](
                gh, x.contiguous(), csr.row, csr.col, csr.perm, gmaps, csr.num_edges, c,
                D=d, ACC=_tl_acc(x.dtype), BLOCK_E=block_e, BLOCK_D=_pow2(d),
                BLOCK_C=_pow2(c, hi=32),
            )
    return gx, gmaps
