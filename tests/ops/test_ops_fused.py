"""Fused gather -> message -> aggregate ops against float64 references, on every backend."""

from __future__ import annotations

import math

import pytest
import torch
from ops_reference import (
    BACKEND_DEVICES,
    grads,
    leaf,
    random_graph,
    ref_egnn,
    ref_sheaf,
    ref_weighted,
)

from graphspace import ops
from graphspace.ops import _torch

TOL = {"atol": 1e-9, "rtol": 1e-9}
N_SRC, N_DST, N_EDGES = 9, 11, 40


@pytest.fixture(params=BACKEND_DEVICES)
def bd(request):
    return request.param


def _check(out, ref, inputs, ref_inputs, tol=TOL):
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol)
    for g, i, g_ref in zip(grads(out, inputs), inputs, grads(ref, ref_inputs)):
        assert g.dtype == i.dtype
        torch.testing.assert_close(g.cpu().double(), g_ref, **tol)


# ------------------------------------------------------------------------ weighted_aggregate

@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("weight", ["none", "scalar", "scalar_col", "channel"])
def test_weighted_aggregate(bd, reduce, weight):
    backend, device = bd
    ei = random_graph(N_SRC, N_DST, N_EDGES, seed=3)
    e = ei.size(1)
    x64 = torch.randn(N_SRC, 6, dtype=torch.float64)
    w64 = {"none": None, "scalar": torch.randn(e, dtype=torch.float64),
           "scalar_col": torch.randn(e, 1, dtype=torch.float64),
           "channel": torch.randn(e, 6, dtype=torch.float64)}[weight]
    rx = leaf(x64, torch.float64, "cpu")
    rw = None if w64 is None else leaf(w64, torch.float64, "cpu")
    ref = ref_weighted(rx, ei, None if rw is None else (rw.view(-1) if weight == "scalar_col"
                                                        else rw), N_DST, reduce)
    x = leaf(x64, torch.float64, device)
    w = None if w64 is None else leaf(w64, torch.float64, device)
    out = ops.weighted_aggregate(x, ei.to(device), w, N_DST, reduce, backend=backend)
    assert ops.last_backend() == backend
    assert out.shape == (N_DST, 6)
    assert torch.all(out[-3:] == 0)
    _check(out, ref, [x] + ([w] if w is not None else []),
           [rx] + ([rw] if rw is not None else []))


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_weighted_aggregate_wide_features_and_1d(bd, reduce):
    backend, device = bd
    ei = random_graph(N_SRC, N_DST, 30, seed=4)
    x64 = torch.randn(N_SRC, 70, dtype=torch.float64)  # more than one 64-wide feature tile
    w64 = torch.randn(ei.size(1), dtype=torch.float64)
    rx, rw = leaf(x64, torch.float64, "cpu"), leaf(w64, torch.float64, "cpu")
    x, w = leaf(x64, torch.float64, device), leaf(w64, torch.float64, device)
    out = ops.weighted_aggregate(x, ei.to(device), w, N_DST, reduce, backend=backend)
    _check(out, ref_weighted(rx, ei, rw, N_DST, reduce), [x, w], [rx, rw])
    out1 = ops.weighted_aggregate(x64[:, 0].to(device), ei.to(device), w64.to(device), N_DST,
                                  reduce, backend=backend)
    assert out1.shape == (N_DST,)
    torch.testing.assert_close(out1.cpu(), ref_weighted(x64[:, :1], ei, w64, N_DST,
                                                        reduce)[:, 0])


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_weighted_aggregate_half_precision(bd, reduce):
    backend, device = bd
    ei = random_graph(N_SRC, N_DST, N_EDGES, seed=5)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(N_SRC, 6).to(dtype)
        w = torch.randn(ei.size(1)).to(dtype)
        xd, wd = leaf(x, dtype, device), leaf(w, dtype, device)
        out = ops.weighted_aggregate(xd, ei.to(device), wd, N_DST, reduce, backend=backend)
        assert out.dtype == dtype
        rx, rw = leaf(x, torch.float64, "cpu"), leaf(w, torch.float64, "cpu")
        tol = {"atol": 5e-2, "rtol": 3e-2}
        _check(out, ref_weighted(rx, ei, rw, N_DST, reduce), [xd, wd], [rx, rw], tol)


def test_chunked_torch_path_spans_many_chunks(monkeypatch):
    monkeypatch.setattr(_torch, "CHUNK_VALUES", 13)  # 2 edges per chunk at F = 6
    ei = random_graph(N_SRC, N_DST, N_EDGES, seed=6)
    x64 = torch.randn(N_SRC, 6, dtype=torch.float64)
    w64 = torch.randn(ei.size(1), 6, dtype=torch.float64)
    for reduce in ("sum", "max"):
        rx, rw = leaf(x64, torch.float64, "cpu"), leaf(w64, torch.float64, "cpu")
        x, w = leaf(x64, torch.float64, "cpu"), leaf(w64, torch.float64, "cpu")
        out = ops.weighted_aggregate(x, ei, w, N_DST, reduce, backend="torch")
        _check(out, ref_weighted(rx, ei, rw, N_DST, reduce), [x, w], [rx, rw])


# ----------------------------------------------------------------------- egnn_coord_aggregate

@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_egnn_coord_aggregate(bd, reduce, normalize):
    backend, device = bd
    n = 10
    ei = random_graph(n, n, N_EDGES, seed=8)
    ei = ei[:, ei[0] != ei[1]]  # no zero-length differences (d/dp |p| is singular there)
    ts = (torch.randn(n, 3, dtype=torch.float64), torch.randn(ei.size(1), dtype=torch.float64))
    rins = [leaf(t, torch.float64, "cpu") for t in ts]
    ins = [leaf(t, torch.float64, device) for t in ts]
    out = ops.egnn_coord_aggregate(ins[0], ei.to(device), ins[1], reduce, normalize=normalize,
                                   eps=1e-3, backend=backend)
    assert out.shape == (n, 3)
    _check(out, ref_egnn(rins[0], ei, rins[1], reduce, normalize, 1e-3), ins, rins)
    # (E, 1) coefficients, as EGNN's phi_x MLP returns them, give the same result
    out_col = ops.egnn_coord_aggregate(ins[0], ei.to(device), ins[1][:, None], reduce,
                                       normalize=normalize, eps=1e-3, backend=backend)
    torch.testing.assert_close(out_col, out)


def test_egnn_coord_aggregate_is_e3_equivariant(bd):
    backend, device = bd
    gen = torch.Generator().manual_seed(9)
    n = 8
    ei = random_graph(n, n, 30, seed=9)
    pos = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    coef = torch.randn(ei.size(1), dtype=torch.float64, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=gen))
    shift = torch.randn(3, dtype=torch.float64, generator=gen)

    def f(p):
        return ops.egnn_coord_aggregate(p.to(device), ei.to(device), coef.to(device), "mean",
                                        normalize=True, backend=backend).cpu()

    base = f(pos)
    torch.testing.assert_close(f(pos @ q.T + shift), base @ q.T)
    # negative control: the output rotates with the input, so it is not rotation-invariant,
    # and a non-rigid map (anisotropic scaling) breaks the equivariance
    assert not torch.allclose(f(pos @ q.T), base, atol=1e-3)
    scale = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    assert not torch.allclose(f(pos @ scale), base @ scale, atol=1e-3)


# ---------------------------------------------------------------------------- sheaf_aggregate

@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize(("d", "channels"), [(3, None), (3, 5), (1, 4), (2, 70)])
def test_sheaf_aggregate(bd, reduce, d, channels):
    backend, device = bd
    ei = random_graph(N_SRC, N_DST, N_EDGES, seed=10)
    shape = (N_SRC, d) if channels is None else (N_SRC, d, channels)
    ts = (torch.randn(shape, dtype=torch.float64),
          torch.randn(ei.size(1), d, d, dtype=torch.float64))
    rins = [leaf(t, torch.float64, "cpu") for t in ts]
    ins = [leaf(t, torch.float64, device) for t in ts]
    out = ops.sheaf_aggregate(ins[0], ei.to(device), ins[1], N_DST, reduce, backend=backend)
    assert out.shape == (N_DST,) + shape[1:]
    _check(out, ref_sheaf(rins[0], ei, rins[1], N_DST, reduce), ins, rins)


def test_sheaf_aggregate_is_the_sheaf_laplacian_off_diagonal(bd):
    """With F_ji = -P_i^T P_j (restriction maps P per edge end) and the degree blocks added
    back, the op reproduces the dense sheaf Laplacian L_F x of Hansen & Ghrist / Bodnar et al."""
    backend, device = bd
    gen = torch.Generator().manual_seed(11)
    n, d = 6, 2
    und = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [1, 4]])  # node 5 isolated
    restr = torch.randn(und.size(0), 2, d, d, dtype=torch.float64, generator=gen)
    ei = torch.cat([und.T, und.T.flip(0)], dim=1)  # both directions
    p_src = torch.cat([restr[:, 0], restr[:, 1]])  # restriction of the source end
    p_dst = torch.cat([restr[:, 1], restr[:, 0]])
    maps = -p_dst.transpose(1, 2) @ p_src
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    dense = torch.zeros(n * d, n * d, dtype=torch.float64)
    for k, (u, v) in enumerate(und.tolist()):
        pu, pv = restr[k, 0], restr[k, 1]
        dense[u * d:(u + 1) * d, u * d:(u + 1) * d] += pu.T @ pu
        dense[v * d:(v + 1) * d, v * d:(v + 1) * d] += pv.T @ pv
        dense[u * d:(u + 1) * d, v * d:(v + 1) * d] -= pu.T @ pv
        dense[v * d:(v + 1) * d, u * d:(u + 1) * d] -= pv.T @ pu
    diag = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        diag[i] = dense[i * d:(i + 1) * d, i * d:(i + 1) * d] @ x[i]
    off = ops.sheaf_aggregate(x.to(device), ei.to(device), maps.to(device), n,
                              backend=backend).cpu()
    torch.testing.assert_close((diag + off).reshape(-1), dense @ x.reshape(-1))
    assert torch.all(off[5] == 0)


# ------------------------------------------------------------------- shared edge cases

def test_fused_ops_without_edges(bd):
    backend, device = bd
    ei = torch.zeros(2, 0, dtype=torch.long, device=device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.zeros(0, dtype=torch.float64, device=device, requires_grad=True)
    outs = [
        ops.weighted_aggregate(x, ei, None, 3, "max", backend=backend),
        ops.weighted_aggregate(x, ei, w, 3, "mean", backend=backend),
        ops.weighted_aggregate(x, ei, torch.zeros(0, 4, dtype=torch.float64, device=device), 3,
                               backend=backend),
        ops.egnn_coord_aggregate(x[:, :3], ei, torch.zeros(0, dtype=torch.float64,
                                                           device=device), backend=backend),
        ops.sheaf_aggregate(x[:, :2], ei, torch.zeros(0, 2, 2, dtype=torch.float64,
                                                      device=device), 3, backend=backend),
    ]
    for out in outs:
        assert torch.all(out == 0)
    sum(o.sum() for o in outs).backward()
    assert torch.all(x.grad == 0) and w.grad.shape == (0,)


def test_gradcheck_torch_backend():
    ei = random_graph(5, 6, 12, seed=12)
    e = ei.size(1)

    def dbl(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w = dbl(5, 3), dbl(e)
    assert torch.autograd.gradcheck(
        lambda x, w: ops.weighted_aggregate(x, ei, w, 6, "mean", backend="torch"), (x, w))
    sq = ei[:, (ei[0] != ei[1]) & (ei[1] < 5)]
    pos, coef = dbl(5, 3), dbl(sq.size(1))
    assert torch.autograd.gradcheck(
        lambda p, c: ops.egnn_coord_aggregate(p, sq, c, normalize=True, eps=0.1,
                                              backend="torch"), (pos, coef))
    xs, maps = dbl(5, 2, 3), dbl(e, 2, 2)
    assert torch.autograd.gradcheck(
        lambda x, m: ops.sheaf_aggregate(x, ei, m, 6, "mean", backend="torch"), (xs, maps))


def _bad_cases():
    x = torch.randn(4, 3)
    ei = torch.tensor([[0, 1, 3], [1, 2, 0]])
    return x, ei


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, ei: ops.weighted_aggregate(x, torch.tensor([[0, 4], [1, 1]])), IndexError,
         r"edge_index\[0\] \(sources\) holds 4"),
        (lambda x, ei: ops.weighted_aggregate(x, ei, dim_size=2), IndexError,
         r"edge_index\[1\] \(targets\) holds 2"),
        (lambda x, ei: ops.weighted_aggregate(x, ei, torch.ones(2)), ValueError,
         "mismatched lengths"),
        (lambda x, ei: ops.weighted_aggregate(x, ei, torch.ones(3, dtype=torch.float64)),
         TypeError, "dtype"),
        (lambda x, ei: ops.weighted_aggregate(x, ei, torch.ones(3, 2)), ValueError, "channels"),
        (lambda x, ei: ops.weighted_aggregate(x.long(), ei), TypeError, "floating-point"),
        (lambda x, ei: ops.weighted_aggregate(x, ei.float()), TypeError, "int64 or int32"),
        (lambda x, ei: ops.weighted_aggregate(x, ei[:1]), ValueError, r"\(2, E\)"),
        (lambda x, ei: ops.weighted_aggregate(x, ei, reduce="std"), ValueError, "reduce"),
        (lambda x, ei: ops.egnn_coord_aggregate(x, ei, torch.ones(3, 2)), ValueError, r"\(E, 1\)"),
        (lambda x, ei: ops.egnn_coord_aggregate(x, ei, torch.ones(3), "max"), ValueError,
         "reduce"),
        (lambda x, ei: ops.sheaf_aggregate(x, ei, torch.ones(3, 2, 2)), ValueError,
         r"\(E, 3, 3\)"),
        (lambda x, ei: ops.sheaf_aggregate(x, ei, torch.ones(3, 3, 3, dtype=torch.float16)),
         TypeError, "dtype"),
    ],
)
def test_fused_bad_input_raises_clear_errors(call, error, match):
    x, ei = _bad_cases()
    with pytest.raises(error, match=match):
        call(x, ei)


def test_isolated_and_repeated_edges_count_separately():
    x = torch.tensor([[1.0], [10.0], [100.0]], dtype=torch.float64)
    ei = torch.tensor([[0, 0, 1], [2, 2, 2]])  # edge 0 -> 2 twice; nodes 0, 1 receive nothing
    out = ops.weighted_aggregate(x, ei, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64),
                                 reduce="mean")
    assert out.view(-1).tolist() == [0.0, 0.0, (1.0 + 2.0 + 5.0) / 3]
    assert math.isclose(ops.weighted_aggregate(x, ei, reduce="sum")[2, 0].item(), 12.0)
