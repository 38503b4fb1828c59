"""PyG conventions for the metanetwork, EGNN and subgraph layers: `MessagePassing`
subclasses, `torch_geometric.nn.Sequential` composition, every adjacency format giving the
output of a plain `edge_index`, PyG hooks, and one max-subgradient convention on ties."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import GraphConv, MessagePassing
from torch_geometric.nn import Sequential as PygSequential

from graphspace.nn.conv import DSConv, DSSConv, EGNNConv, MetaNetworkConv, SPENConv
from graphspace.ops import get_csr
from graphspace.ops import metanetwork as mops

F64 = torch.float64
N = 8


def _edges(seed: int = 0) -> torch.Tensor:
    """A random simple directed graph on N nodes (no duplicates), in random edge order."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, N, generator=g) < 0.4
    mask.fill_diagonal_(False)
    ei = mask.nonzero().t()
    return ei[:, torch.randperm(ei.size(1), generator=g)]


def _formats(ei: torch.Tensor, n: int):
    """(name, adjacency, perm): `perm` maps the rows of per-edge tensors given in the order
    of `ei` to the order the adjacency yields (row-major over adj_t, i.e. by target)."""
    order = (ei[1] * n + ei[0]).argsort()
    adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1), dtype=F64), (n, n))
    ident = torch.arange(ei.size(1))
    out = [("tensor", ei, ident),
           ("EdgeIndex", EdgeIndex(ei, sparse_size=(n, n)), ident),
           ("sparse_coo", adj_t, order),
           ("sparse_csr", adj_t.to_sparse_csr(), order)]
    return out


def _bag(seed: int = 0):
    """Two full copies of an N-node graph as a bag (disjoint union)."""
    ei = _edges(seed)
    bag_ei = torch.cat([ei, ei + N], dim=1)
    node_map = torch.arange(N).repeat(2)
    subgraph_id = torch.arange(2).repeat_interleave(N)
    return ei, bag_ei, node_map, subgraph_id


def _cases():
    torch.manual_seed(0)
    x = torch.randn(N, 5, dtype=F64)
    xb = torch.randn(2 * N, 3, dtype=F64)
    pos = torch.randn(N, 3, dtype=F64)
    ea = torch.randn(_edges().size(1), 4, dtype=F64)
    _, _, node_map, sub = _bag()
    orig = _edges()
    return {
        "metanetwork": (MetaNetworkConv(5, 6, edge_dim=4).double(),
                        lambda c, adj, p: c(x, adj, ea[p], return_edge_attr=True), True, N),
        "egnn": (EGNNConv(5, 5, hidden_channels=8, edge_dim=4).double(),
                 lambda c, adj, p: c(x, pos, adj, ea[p]), False, N),
        "ds": (DSConv(GraphConv(3, 4)).double(), lambda c, adj, p: c(xb, adj), False, 2 * N),
        "dss": (DSSConv(GraphConv(3, 4)).double(),
                lambda c, adj, p: c(xb, adj, node_map, orig, N), False, 2 * N),
        "spen": (SPENConv(3, 4).double(), lambda c, adj, p: c(xb, adj, node_map, sub),
                 False, 2 * N),
    }


CASES = ["metanetwork", "egnn", "ds", "dss", "spen"]


@pytest.mark.parametrize("name", CASES)
def test_is_message_passing(name):
    conv = _cases()[name][0]
    assert isinstance(conv, MessagePassing)


@pytest.mark.parametrize("name", CASES)
def test_every_adjacency_format_matches_edge_index(name):
    conv, call, edge_out, n = _cases()[name]
    base = _edges() if n == N else _bag()[1]
    ref = call(conv, base, torch.arange(base.size(1)))
    ref = ref if isinstance(ref, tuple) else (ref,)
    for fmt, adj, perm in _formats(base, n):
        out = call(conv, adj, perm)
        out = out if isinstance(out, tuple) else (out,)
        torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0, msg=fmt)
        if edge_out:  # edge outputs, matched edge for edge
            torch.testing.assert_close(out[1], ref[1][perm], atol=1e-6, rtol=0, msg=fmt)
        elif len(out) > 1:  # EGNN's coordinates
            torch.testing.assert_close(out[1], ref[1], atol=1e-6, rtol=0, msg=fmt)
    # negative control: a different graph changes the output
    other = call(conv, base[:, : base.size(1) // 2], torch.arange(base.size(1) // 2)) \
        if name != "metanetwork" else None
    if other is not None:
        other = other if isinstance(other, tuple) else (other,)
        assert (other[0] - ref[0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", CASES)
def test_sparse_tensor_matches_edge_index(name):
    torch_sparse = pytest.importorskip("torch_sparse")
    conv, call, _, n = _cases()[name]
    base = _edges() if n == N else _bag()[1]
    order = (base[1] * n + base[0]).argsort()
    adj_t = torch_sparse.SparseTensor(row=base[1], col=base[0], sparse_sizes=(n, n))
    ref = call(conv, base, torch.arange(base.size(1)))
    out = call(conv, adj_t, order)
    ref, out = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0)


def test_sequential_composition():
    torch.manual_seed(0)
    x = torch.randn(N, 5)
    ei = _edges()
    ea = torch.randn(ei.size(1), 4)
    pos = torch.randn(N, 3)
    model = PygSequential("x, pos, edge_index, edge_attr", [
        (MetaNetworkConv(5, 5, edge_dim=4), "x, edge_index, edge_attr -> x"),
        nn.SiLU(),
        (EGNNConv(5, 5, hidden_channels=8, edge_dim=4), "x, pos, edge_index, edge_attr -> x, pos"),
        (lambda x, pos: x, "x, pos -> x"),
        (DSConv(GraphConv(5, 3)), "x, edge_index -> x"),
    ])
    out = model(x, pos, ei, ea)
    assert out.shape == (N, 3)
    # the composition equals the layers called one by one
    m0, m2, m4 = model.module_0, model.module_2, model.module_4
    h = nn.functional.silu(m0(x, ei, ea))
    h, _ = m2(h, pos, ei, ea)
    torch.testing.assert_close(out, m4(h, ei))


def test_sequential_composition_subgraph_layers():
    torch.manual_seed(0)
    _, bag_ei, node_map, sub = _bag()
    x = torch.randn(2 * N, 3)
    model = PygSequential("x, edge_index, node_map, subgraph_id, orig_edge_index", [
        (SPENConv(3, 4), "x, edge_index, node_map, subgraph_id -> x"),
        nn.ReLU(),
        (DSSConv(GraphConv(4, 4)), "x, edge_index, node_map, orig_edge_index -> x"),
    ])
    out = model(x, bag_ei, node_map, sub, _edges())
    ref = model.module_2(model.module_0(x, bag_ei, node_map, sub).relu(), bag_ei, node_map,
                         _edges())
    torch.testing.assert_close(out, ref)


def test_message_hook_sees_messages_and_output_unchanged():
    """With a PyG message hook the layer runs its message/aggregate reference (the hook
    sees the (E, h) messages) and computes what the fused path computes."""
    conv, call, _, _ = _cases()["metanetwork"]
    ei = _edges()
    fused = call(conv, ei, torch.arange(ei.size(1)))
    seen = []
    handle = conv.register_message_forward_hook(lambda m, inp, out: seen.append(out.shape))
    ref = call(conv, ei, torch.arange(ei.size(1)))
    handle.remove()
    assert seen == [(ei.size(1), conv.hidden_channels)]
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_return_edge_attr_option():
    conv = MetaNetworkConv(5, 6, edge_dim=4, edge_out_channels=3)
    x, ei = torch.randn(N, 5), _edges()
    ea = torch.randn(ei.size(1), 4)
    out = conv(x, ei, ea)
    assert isinstance(out, torch.Tensor) and out.shape == (N, 6)
    out2, e2 = conv(x, ei, ea, return_edge_attr=True)
    assert torch.equal(out, out2) and e2.shape == (ei.size(1), 3)
    conv_noupd = MetaNetworkConv(5, 6, edge_dim=4, update_edges=False)
    _, e3 = conv_noupd(x, ei, ea, return_edge_attr=True)
    assert e3 is ea


def test_old_checkpoint_names_load():
    """The node MLP was `update` before the layer became a MessagePassing: old state dicts
    still load."""
    conv = MetaNetworkConv(5, 6, edge_dim=4)
    sd = {k.replace("update_mlp.", "update."): v for k, v in conv.state_dict().items()}
    fresh = MetaNetworkConv(5, 6, edge_dim=4)
    fresh.load_state_dict(sd)
    for k, v in conv.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


@pytest.mark.parametrize("agg", ["max", "min"])
@pytest.mark.parametrize("sort", [False, True])
def test_tied_extrema_split_gradient_evenly_on_both_paths(agg, sort):
    """Two equal messages into one node: each gets half of the max/min gradient (the
    convention of graphspace.ops.scatter), identically on the reference, fused and chunked
    paths; with one of them removed the other gets all of it."""
    torch.manual_seed(0)
    conv = MetaNetworkConv(3, 4, edge_dim=2, aggregators=(agg,), update_edges=False,
                           scalers=("identity",)).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    x0 = torch.randint(-2, 3, (4, 3)).double()
    x0[1] = x0[0]  # sources 0 and 1 are identical
    ea = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-9.0, 9.0]], dtype=F64)
    ea[2] = -50.0 if agg == "max" else 50.0  # the third message never attains the extremum
    # target-sorted edges take the chunked kernel, unsorted ones the pair-gather kernel
    ei = torch.tensor([[0, 1, 2], [3, 3, 3]]) if sort else torch.tensor([[0, 2, 1], [3, 2, 3]])
    if not sort:
        ea = ea[[0, 2, 1]]
    csr = get_csr(ei[1], 4)
    assert (mops._EdgeChunks.of(csr, mops.EDGE_CHUNK) is not None) == sort

    def grad_x(edges: torch.Tensor, attrs: torch.Tensor, fused: bool) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        if not fused:
            conv._fusable = lambda *a: False
        try:
            out = conv(x, edges, attrs)
        finally:
            conv.__dict__.pop("_fusable", None)
        out[3].sum().backward()
        return x.grad

    tied = {}
    for fused in (False, True):
        tied[fused] = grad_x(ei, ea, fused)
    torch.testing.assert_close(tied[True], tied[False], rtol=0, atol=0)
    g = tied[False]
    assert g[0].abs().sum() > 0 and torch.equal(g[0], g[1])  # split evenly, not first-wins
    keep = ei[0] != 0  # drop source 0: only source 1 attains the extremum
    single = grad_x(ei[:, keep], ea[keep], False)
    torch.testing.assert_close(single[1], 2 * g[1], rtol=0, atol=1e-12)
    assert single[0].abs().sum() == 0
