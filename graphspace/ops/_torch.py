"""Plain-PyTorch backend: forward and backward of every op, without autograd.

Strategy (measured on CPU, see `benchmarks/RESULTS.md`):

* plain scatter reductions of unsorted targets on CPU use ATen's `scatter_add_` /
  `scatter_reduce_` with the index broadcast over columns (as eager PyG does): measured
  faster there than the CSR product, whose reads of `src` follow the sort permutation;
* products with a per-edge *scalar* (or no) weight are sparse-dense products with the cached
  CSR layout (`torch.sparse.mm`; MKL on CPU, cuSPARSE on CUDA; the `amax`/`amin`
  reductions of `torch.sparse.mm` on CPU), and their weight gradient
  `<g_i, x_j>` per edge is a sampled dense-dense product (`sampled_addmm`);
* the sheaf block mat-vec is a block-sparse (BSR) product;
* per-channel weighted sums on CPU walk the edges in input order (chunked gather, multiply,
  `index_add_`), reading the `E x F` weights sequentially;
* everything else walks the edges in CSR order in chunks of `CHUNK_VALUES` values: gather,
  multiply, `index_add_`/`scatter_reduce_`. Only a chunk of messages exists at any time,
  never the whole `E x F` tensor. The chunk tensors live in a per-thread workspace that is
  reused across chunks and calls: a fresh multi-megabyte tensor per chunk costs more in page
  faults than the arithmetic on it (measured: gathers 4x slower with fresh outputs).

All functions take and return tensors in the *accumulation* dtype (float32 for float16 /
bfloat16 inputs, otherwise the input dtype); the autograd wrappers cast.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

from graphspace.ops.layout import CSR, EdgeList

#: inputs are cast to the accumulation dtype before they reach this module
UPCAST_INPUTS = True
#: values per chunk of the chunked loops (16 MB of float32 per workspace buffer)
CHUNK_VALUES = 1 << 22

CoefFn = Callable[[Tensor], Tensor | None]

_workspace = threading.local()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk(width: int) -> int:
    return max(1, CHUNK_VALUES // max(width, 1))


def _spans(n: int, width: int):
    step = _chunk(width)
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _buffer(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable scratch tensor of `shape` (contents undefined; valid until the next request
    of the same `name` in this thread). One flat buffer per name, dtype and device."""
    store = getattr(_workspace, "buffers", None)
    if store is None:
        store = _workspace.buffers = {}
    numel = 1
    for n in shape:
        numel *= n
    key = (name, like.dtype, like.device)
    flat = store.get(key)
    if flat is None or flat.numel() < numel:
        flat = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
        store[key] = flat
    return flat[:numel].view(shape)


def release_workspace() -> None:
    """Free this thread's chunk buffers."""
    _workspace.buffers = {}


def _gather(name: str, src: Tensor, idx: Tensor) -> Tensor:
    """`src[idx]` written into the workspace buffer `name`."""
    return torch.index_select(src, 0, idx, out=_buffer(name, (idx.numel(),) + src.shape[1:], src))


def _finish(out: Tensor, csr: CSR | EdgeList, reduce: str) -> Tensor:
    """Mean division / empty rows of max-min set to 0 (in place)."""
    if reduce == "mean":
        out.div_(csr.counts(out.dtype).clamp(min=1).view(-1, *([1] * (out.dim() - 1))))
    elif reduce in ("max", "min"):
        empty = (csr.counts() == 0).view(-1, *([1] * (out.dim() - 1)))
        out.masked_fill_(empty, 0.0)
    return out


def _init(shape: tuple[int, ...], reduce: str, like: Tensor) -> Tensor:
    if reduce == "max":
        return torch.full(shape, float("-inf"), dtype=like.dtype, device=like.device)
    if reduce == "min":
        return torch.full(shape, float("inf"), dtype=like.dtype, device=like.device)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _spmm(a: Tensor, x: Tensor, reduce: str) -> Tensor | None:
    """`torch.sparse.mm` with a reduction, or `None` where torch has no kernel for it."""
    if reduce in ("sum", "mean"):
        return torch.sparse.mm(a, x)
    if x.device.type == "cpu":
        return torch.sparse.mm(a, x, "amax" if reduce == "max" else "amin")
    return None


def _message(x: Tensor, coef: CoefFn, csr: CSR, s: int, e: int) -> Tensor:
    """Messages `x[col] * coef(perm)` of sorted edges `s:e` (workspace buffer `msg`)."""
    msg = _gather("msg", x, csr.col[s:e])
    c = coef(csr.perm[s:e])
    return msg.mul_(c) if c is not None else msg


def _reduce_chunks(x: Tensor, coef: CoefFn, csr: CSR, reduce: str) -> Tensor:
    """`out[row] (+)= x[col] * coef(perm)` walking the sorted edges in chunks."""
    f = x.size(1)
    out = _init((csr.num_rows, f), reduce, x)
    for s, e in _spans(csr.num_edges, f):
        rows = csr.row[s:e]
        msg = _message(x, coef, csr, s, e)
        if reduce in ("sum", "mean"):
            out.index_add_(0, rows, msg)
        else:
            amax = "amax" if reduce == "max" else "amin"
            out.scatter_reduce_(0, rows.view(-1, 1).expand_as(msg), msg, amax)
    return _finish(out, csr, reduce)


def _hits(x: Tensor, coef: CoefFn, out: Tensor, csr: CSR, s: int, e: int) -> Tensor:
    """1.0 where the message of edge `s:e` equals its target's output (else 0.0)."""
    return _message(x, coef, csr, s, e).eq_(_gather("sel", out, csr.row[s:e]))


def _backward_chunks(
    g: Tensor,
    x: Tensor,
    coef: CoefFn,
    out: Tensor,
    csr: CSR,
    reduce: str,
    need_x: bool,
    coef_grad: Callable[[int, int, Tensor], None] | None,
) -> Tensor | None:
    """Shared backward of `out_i = reduce_j x_j * c_ij`.

    Returns `grad_x` (or `None`) and hands `dL/dc` of every chunk to `coef_grad`.
    For max/min the gradient of each output entry is split evenly between the edges that
    attain it (the convention of `torch.scatter_reduce`).
    """
    extremum = reduce in ("max", "min")
    f = x.size(1)
    if reduce == "mean":
        gh = g / csr.counts(g.dtype).clamp(min=1).unsqueeze(-1)
    elif extremum:
        ties = torch.zeros_like(out)
        for s, e in _spans(csr.num_edges, f):
            ties.index_add_(0, csr.row[s:e], _hits(x, coef, out, csr, s, e))
        gh = g / ties.clamp_(min=1)
    else:
        gh = g
    gx = torch.zeros_like(x) if need_x else None
    for s, e in _spans(csr.num_edges, f):
        cols = csr.col[s:e]
        ge = _gather("ge", gh, csr.row[s:e])
        if extremum:
            ge.mul_(_hits(x, coef, out, csr, s, e))
        c = coef(csr.perm[s:e])
        if gx is not None:
            gx.index_add_(0, cols, torch.mul(ge, c, out=_buffer("msg", ge.shape, ge))
                          if c is not None else ge)
        if coef_grad is not None:
            coef_grad(s, e, ge.mul_(_gather("xs", x, cols)))
    return gx


# ---------------------------------------------------------------- scatter / segment reductions

def scatter_forward(src: Tensor, csr: CSR, reduce: str) -> Tensor:
    """`out_i = reduce_{e: index_e = i} src_e` for 2-D `src` (`reduce` incl. `std`)."""
    if reduce == "std":
        mean = scatter_forward(src, csr, "mean")
        centred = src - mean.index_select(0, _unsorted_index(csr))
        var = scatter_forward(centred.square_(), csr, "mean")
        out = var.add_(1e-12).sqrt_()
        return out.masked_fill_((csr.counts() == 0).unsqueeze(-1), 0.0)
    if src.device.type == "cpu" and not _in_order(csr):
        # unsorted targets: one pass over ``src`` in its own order with the target index
        # broadcast over the columns -- ATen's scatter kernel for this case, the one eager PyG
        # calls -- instead of the CSR product, whose reads of ``src`` rows follow the sort
        # permutation (measured slower than eager PyG on CPU; sorted input keeps the product)
        idx = _unsorted_index(csr).view(-1, 1).expand_as(src)
        out = torch.zeros((csr.num_rows, src.size(1)), dtype=src.dtype, device=src.device)
        if reduce in ("sum", "mean"):
            out.scatter_add_(0, idx, src)
        else:
            out.scatter_reduce_(0, idx, src, "amax" if reduce == "max" else "amin",
                                include_self=False)
        return _finish(out, csr, reduce)
    out = _spmm(csr.sparse_ones(src.dtype), src, reduce)
    if out is None:
        return _reduce_chunks(src, lambda ids: None, csr, reduce)
    return _finish(out, csr, reduce)


def _in_order(csr: CSR) -> bool:
    """Whether the layout's edges are already sorted by target (identity permutation)."""
    if "in_order" not in csr._memo:
        csr._memo["in_order"] = bool(torch.equal(
            csr.perm, torch.arange(csr.perm.numel(), device=csr.perm.device,
                                   dtype=csr.perm.dtype)))
    return csr._memo["in_order"]


def _unsorted_source(csr: CSR) -> Tensor:
    """The source (column) index of a layout's edges in their original order."""
    if "source" not in csr._memo:
        src = torch.empty_like(csr.col)
        src[csr.perm] = csr.col
        csr._memo["source"] = src
    return csr._memo["source"]


def _unsorted_index(csr: CSR) -> Tensor:
    """The original (unsorted) target index of a scatter layout."""
    if "index" not in csr._memo:
        idx = torch.empty_like(csr.row)
        idx[csr.perm] = csr.row
        csr._memo["index"] = idx
    return csr._memo["index"]


# ------------------------------------------------------------------- (a) weighted aggregation

def _weight_coef(w: Tensor | None) -> CoefFn:
    if w is None:
        return lambda ids: None
    if w.dim() == 1:
        return lambda ids: _gather("coef", w, ids).unsqueeze(-1)
    return lambda ids: _gather("coef", w, ids)


def weighted_forward(
    x: Tensor, w: Tensor | None, csr: CSR, reduce: str, need_ties: bool = False
) -> tuple[Tensor, None]:
    """`out_i = reduce_{j -> i} w_ij * x_j` (`w`: `None`, `(E,)` or `(E, F)`).

    Max/min tie counts are recomputed in the backward pass, so the second value is `None`.
    """
    if w is None or w.dim() == 1:
        a = csr.sparse_ones(x.dtype) if w is None else csr.sparse(w.index_select(0, csr.perm))
        out = _spmm(a, x, reduce)
        if out is not None:
            return _finish(out, csr, reduce), None
    if _edge_order(x, w, reduce):
        dst, src = _unsorted_index(csr), _unsorted_source(csr)
        out = torch.zeros((csr.num_rows, x.size(1)), dtype=x.dtype, device=x.device)
        for s, e in _spans(csr.num_edges, x.size(1)):
            out.index_add_(0, dst[s:e], _gather("msg", x, src[s:e]).mul_(w[s:e]))
        return _finish(out, csr, reduce), None
    return _reduce_chunks(x, _weight_coef(w), csr, reduce), None


def _edge_order(x: Tensor, w: Tensor | None, reduce: str) -> bool:
    """Per-channel sums on CPU walk the edges in input order: the `E x F` weights are then
    read (and their gradient written) sequentially instead of through the sort permutation
    (measured 1.3-1.7x faster forward and backward at E = 1e5 .. 1e6, F = 64)."""
    return (x.device.type == "cpu" and w is not None and w.dim() == 2
            and reduce in ("sum", "mean"))


def weighted_backward(
    g: Tensor, x: Tensor, w: Tensor | None, out: Tensor, ties: Tensor | None, csr: CSR,
    reduce: str, need_x: bool, need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    need_w = need_w and w is not None
    if reduce in ("sum", "mean") and (w is None or w.dim() == 1):
        gh = g / csr.counts(g.dtype).clamp(min=1).unsqueeze(-1) if reduce == "mean" else g
        gx = None
        if need_x:
            t = csr.transpose()
            at = t.sparse_ones(x.dtype) if w is None else t.sparse(w.index_select(0, t.perm))
            gx = torch.sparse.mm(at, gh)
        gw = None
        if need_w:
            assert w is not None
            # dL/dw_e = <g_i, x_j> for every stored (i, j): a sampled dense-dense product
            dots = torch.sparse.sampled_addmm(csr.sparse_ones(x.dtype), gh, x.t(), beta=0.0)
            gw = torch.empty_like(w).index_copy_(0, csr.perm, dots.values())
        return gx, gw

    if _edge_order(x, w, reduce):
        assert w is not None
        gh = g / csr.counts(g.dtype).clamp(min=1).unsqueeze(-1) if reduce == "mean" else g
        dst, src = _unsorted_index(csr), _unsorted_source(csr)
        gx = torch.zeros_like(x) if need_x else None
        gw = torch.empty_like(w) if need_w else None
        for s, e in _spans(csr.num_edges, x.size(1)):
            ge = _gather("ge", gh, dst[s:e])
            if gx is not None:
                gx.index_add_(0, src[s:e], torch.mul(ge, w[s:e], out=_buffer("msg", ge.shape, ge)))
            if gw is not None:
                torch.mul(ge, _gather("xs", x, src[s:e]), out=gw[s:e])
        return gx, gw

    gw = torch.empty_like(w) if need_w and w is not None else None

    def coef_grad(s: int, e: int, gc: Tensor) -> None:
        assert gw is not None
        val = gc.sum(-1) if gw.dim() == 1 else gc
        gw.index_copy_(0, csr.perm[s:e], val)

    gx = _backward_chunks(g, x, _weight_coef(w), out, csr, reduce, need_x,
                          coef_grad if gw is not None else None)
    return gx, gw


# ------------------------------------------- (c1) EGNN coordinates sum_j (p_i - p_j) phi_ij

def _unit(d: Tensor, normalize: bool, eps: float) -> tuple[Tensor, Tensor | None]:
    """`u = d [/ (|d| + eps)]` and `|d|` (when normalising)."""
    if not normalize:
        return d, None
    r = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    return d / (r + eps), r


def egnn_forward(
    pos: Tensor, coef: Tensor, edges: EdgeList, reduce: str, normalize: bool, eps: float,
    keep: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`out_i = reduce_{j -> i} phi_ij (p_i - p_j) [/ (|p_i - p_j| + eps)]`.

    The coordinates are narrow (`D = 3`), so the edges are walked in input order (sorting
    them would cost as much as the arithmetic), and with `keep` the `(E, D)` differences
    are returned for the backward pass (as small as the edge index itself).
    """
    n_d = pos.size(1)
    out = torch.zeros(edges.num_rows, n_d, dtype=pos.dtype, device=pos.device)
    diffs = torch.empty(edges.num_edges, n_d, dtype=pos.dtype, device=pos.device) \
        if keep else None
    for s, e in _spans(edges.num_edges, n_d):
        src, dst = edges.src[s:e], edges.dst[s:e]
        d = torch.index_select(pos, 0, dst, out=diffs[s:e] if diffs is not None
                               else _buffer("msg", (e - s, n_d), pos))
        d.sub_(_gather("xs", pos, src))
        u, _ = _unit(d, normalize, eps)
        msg = torch.mul(u, coef[s:e].unsqueeze(-1), out=_buffer("coef", u.shape, u))
        out.index_add_(0, dst, msg)
    return _finish(out, edges, reduce), diffs


def egnn_backward(
    g: Tensor, pos: Tensor, coef: Tensor, diffs: Tensor, edges: EdgeList, reduce: str,
    normalize: bool, eps: float, need_pos: bool, need_coef: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Backward of `egnn_forward` given its saved `(E, D)` differences."""
    gh = g / edges.counts(g.dtype).clamp(min=1).unsqueeze(-1) if reduce == "mean" else g
    gpos = torch.zeros_like(pos) if need_pos else None
    gcoef = torch.empty_like(coef) if need_coef else None
    for s, e in _spans(edges.num_edges, pos.size(1)):
        src, dst = edges.src[s:e], edges.dst[s:e]
        d = diffs[s:e]
        u, r = _unit(d, normalize, eps)
        ge = _gather("ge", gh, dst)
        if gcoef is not None:
            torch.linalg.vecdot(ge, u, out=gcoef[s:e])
        if gpos is not None:
            v = ge.mul_(coef[s:e].unsqueeze(-1))
            if r is not None:
                # d/dd of d / (|d| + eps) is I / s - d d^T / (|d| s^2); 0 at d = 0
                sr = r + eps
                radial = torch.linalg.vecdot(d, v).unsqueeze(-1) / (r * sr * sr)
                v = v.div_(sr).sub_(d * torch.where(r > 0, radial, torch.zeros_like(radial)))
            gpos.index_add_(0, dst, v)
            gpos.index_add_(0, src, v.neg_())  # (index_add_'s alpha= path is ~7x slower)
    return gpos, gcoef


# ---------------------------------------------------- (c2) sheaf block mat-vec sum_j F_ij x_j

def _bsr(csr: CSR, blocks: Tensor) -> Tensor:
    d = blocks.size(-1)
    return torch.sparse_bsr_tensor(
        csr.ptr, csr.col, blocks, (csr.num_rows * d, csr.num_cols * d), check_invariants=False
    )


def sheaf_forward(x: Tensor, maps: Tensor, csr: CSR, reduce: str) -> Tensor:
    """`out_i = reduce_{j -> i} F_ij @ x_j` with `x`: `(N, d, C)`, `maps`: `(E, d, d)`."""
    n, d, c = x.shape
    if csr.num_edges == 0:
        return torch.zeros(csr.num_rows, d, c, dtype=x.dtype, device=x.device)
    a = _bsr(csr, maps.index_select(0, csr.perm))
    out = (a @ x.reshape(n * d, c)).view(csr.num_rows, d, c)
    return _finish(out, csr, reduce)


def sheaf_backward(
    g: Tensor, x: Tensor, maps: Tensor, csr: CSR, reduce: str, need_x: bool, need_maps: bool
) -> tuple[Tensor | None, Tensor | None]:
    n, d, c = x.shape
    gh = g / csr.counts(g.dtype).clamp(min=1).view(-1, 1, 1) if reduce == "mean" else g
    gx = gmaps = None
    if need_x:
        if csr.num_edges == 0:
            gx = torch.zeros_like(x)
        else:
            t = csr.transpose()
            at = _bsr(t, maps.index_select(0, t.perm).transpose(1, 2))
            gx = (at @ gh.reshape(-1, c)).view(n, d, c)
    if need_maps:
        gmaps = torch.empty_like(maps)
        for s, e in _spans(csr.num_edges, d * c):
            ge = gh.index_select(0, csr.row[s:e])
            xs = x.index_select(0, csr.col[s:e])
            gmaps.index_copy_(0, csr.perm[s:e], torch.bmm(ge, xs.transpose(1, 2)))
    return gx, gmaps
