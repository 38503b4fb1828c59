import copy

import pytest
import torch
from torch_geometric.data import Batch

from graphspace.graphs import ParameterGraph, permute_model
from graphspace.nn.conv.metanetwork_conv import MetaNetworkConv
from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork
from graphspace.testing import swap_io_neurons
from graphspace.testing.models import MLP, ResNet, SmallCNN, TinyTransformer


def _graphs(models):
    return Batch.from_data_list([ParameterGraph.from_module(m) for m in models])


def test_conv_shapes_repr_and_node_equivariance():
    torch.manual_seed(0)
    conv = MetaNetworkConv(8, 16, edge_dim=4, edge_out_channels=6).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    ei = torch.randint(0, 10, (2, 30))
    ea = torch.randn(30, 4, dtype=torch.float64)
    out, e = conv(x, ei, ea, return_edge_attr=True)
    assert out.shape == (10, 16) and e.shape == (30, 6)
    assert "MetaNetworkConv(8, 16" in repr(conv)
    perm = torch.randperm(10)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(10)
    out_p, e_p = conv(x[perm], inv[ei], ea, return_edge_attr=True)
    assert torch.allclose(out_p, out[perm], atol=1e-10)
    assert torch.allclose(e_p, e, atol=1e-10)
    # negative control: permuting node features without relabelling edges changes the output
    out_bad = conv(x[perm], ei, ea)
    assert not torch.allclose(out_bad, out[perm], atol=1e-4)
    # gradients reach every parameter
    (out.sum() + e.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


def test_conv_isolated_nodes_and_bad_aggregator():
    conv = MetaNetworkConv(4, 4, edge_dim=2)
    x = torch.randn(5, 4)
    ei = torch.tensor([[0, 1], [1, 2]])
    out = conv(x, ei, torch.randn(2, 2))
    assert out.shape == (5, 4)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="aggregator"):
        MetaNetworkConv(4, 4, 2, aggregators=("median",))


@pytest.mark.parametrize("readout", ["pool", "output"])
def test_metanetwork_invariant_to_hidden_permutations(readout):
    torch.manual_seed(0)
    models = [MLP((8, 16, 16, 4)), SmallCNN(num_classes=4), ResNet(num_classes=4),
              TinyTransformer(out_dim=4)]
    permuted = [permute_model(m, generator=torch.Generator().manual_seed(i))[0]
                for i, m in enumerate(models)]
    net = GraphMetaNetwork(3, hidden_channels=16, num_layers=2, readout=readout,
                           num_outputs=4).double().eval()
    a = net(_double(_graphs(models)))
    b = net(_double(_graphs(permuted)))
    assert a.shape == (4, 3)
    assert torch.allclose(a, b, atol=1e-6)
    # negative control: swapping two input neurons' weights changes the prediction
    c = net(_double(_graphs([swap_io_neurons(m) for m in models])))
    assert (c - a).abs().max() > 1e-5


def _double(batch):
    batch.x = batch.x.double()
    batch.edge_attr = batch.edge_attr.double()
    return batch


def test_metanetwork_trains_and_reports_bad_config():
    torch.manual_seed(0)
    models = [MLP((8, 16, 4)) for _ in range(6)]
    batch = _graphs(models)
    target = torch.stack([m.net[0].weight.norm() for m in models]).detach().unsqueeze(-1)
    net = GraphMetaNetwork(1, hidden_channels=16, num_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(batch), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert "GraphMetaNetwork" in repr(net)
    with pytest.raises(ValueError, match="backbone"):
        GraphMetaNetwork(1, backbone="nope")
    with pytest.raises(ValueError, match="output neurons"):
        GraphMetaNetwork(1, readout="output", num_outputs=3)(copy.copy(batch))


@pytest.mark.parametrize("kernel", ["edge", "channel"])
def test_every_parameter_is_used_for_both_kernel_layouts(kernel):
    """DDP (without find_unused_parameters) needs every parameter in every forward pass."""
    torch.manual_seed(0)
    graphs = [ParameterGraph.from_module(SmallCNN(), kernel=kernel) for _ in range(2)]
    b = Batch.from_data_list(graphs)
    net = GraphMetaNetwork(1, 8, num_layers=1, edge_in=b.edge_attr.size(1))
    assert (net.encoder.edge_pos is None) == (kernel == "channel")
    net(b).sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    del b.edge_pos  # an edge-layout encoder on a batch without offsets still uses them all
    if kernel == "edge":
        net.zero_grad(set_to_none=True)
        net(b).sum().backward()
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kernel", ["edge", "channel"])
def test_sorted_bidirectional_encoding_matches_plain(kernel):
    """The target-sorted path (edges of both directions embedded in one table pass) gives
    the same output and parameter gradients as the plain path (concatenated directions, no
    sort) in float64, with and without spatial offsets."""
    torch.manual_seed(0)
    graphs = [ParameterGraph.from_module(SmallCNN(), kernel=kernel) for _ in range(3)]
    b = Batch.from_data_list(graphs)
    b.x, b.edge_attr = b.x.double(), b.edge_attr.double()
    net = GraphMetaNetwork(2, 8, num_layers=2, edge_in=b.edge_attr.size(1)).double()
    assert net._sorted_order(b.edge_index) is not None

    def run(sorted_path: bool) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        if not sorted_path:
            net._sorted_order = lambda ei: None
        try:
            out = net(b)
        finally:
            net.__dict__.pop("_sorted_order", None)
        (out * torch.arange(1.0, 3.0, dtype=out.dtype)).sum().backward()
        return [out] + [p.grad.clone() for p in net.parameters()]

    for a, c in zip(run(True), run(False)):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)


def _fused_case(aggs, update_edges, edge_out):
    """A float64 conv and a random graph with isolated nodes 25..29 (200 edges)."""
    torch.manual_seed(0)
    conv = MetaNetworkConv(8, 16, edge_dim=5, edge_out_channels=edge_out, aggregators=aggs,
                           update_edges=update_edges, avg_log_degree=1.3).double()
    x0 = torch.randn(30, 8, dtype=torch.float64)
    ei = torch.randint(0, 25, (2, 200))
    ea0 = torch.randn(200, 5, dtype=torch.float64)
    return conv, x0, ei, ea0


@pytest.mark.parametrize("aggs,update_edges,edge_out,sort", [
    (("mean", "max", "std"), True, None, False),
    (("sum", "min", "max", "mean", "std"), True, 7, False),
    (("mean", "std"), False, None, True),
    (("max",), True, None, True),
])
def test_fused_cpu_path_matches_reference(aggs, update_edges, edge_out, sort):
    """The fused CPU aggregation equals the reference composition (fp64, outputs and every
    gradient), with isolated nodes, unsorted and target-sorted edges."""
    conv, x0, ei, ea0 = _fused_case(aggs, update_edges, edge_out)
    if sort:
        order = ei[1].argsort()
        ei, ea0 = ei[:, order], ea0[order]

    def run(fused: bool) -> list[torch.Tensor]:
        conv.zero_grad(set_to_none=True)
        x, ea = x0.clone().requires_grad_(), ea0.clone().requires_grad_()
        conv._fusable = (lambda *a: True) if fused else (lambda *a: False)
        try:
            out, e = conv(x, ei, ea, return_edge_attr=True)
        finally:
            del conv._fusable
        g = torch.Generator().manual_seed(1)
        w = torch.randn(out.shape, generator=g, dtype=out.dtype)
        we = torch.randn(e.shape, generator=g, dtype=e.dtype)
        ((out * w).sum() + (e * we).sum()).backward()
        return [out, e, x.grad, ea.grad] + [p.grad.clone() for p in conv.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("aggs,update_edges,edge_out", [
    (("mean", "max", "std"), True, None),
    (("sum", "min", "max", "mean", "std"), True, 7),
    (("sum", "min", "max", "mean", "std"), False, None),
])
@pytest.mark.parametrize("integer", [False, True])
def test_chunked_path_matches_reference(monkeypatch, aggs, update_edges, edge_out, integer):
    """On target-sorted edges the chunked path (many chunks, isolated nodes) equals the
    reference composition in fp64, outputs and every gradient. ``integer``: small-integer
    inputs and parameters without edge update, so every message is exact whatever the
    summation order and two equal messages into one node are an exact max/min tie (whose
    gradient both paths split evenly)."""
    from graphspace.ops import metanetwork as mc

    if integer and update_edges:
        pytest.skip("the SiLU edge update makes messages inexact")
    monkeypatch.setattr(mc, "EDGE_CHUNK", 16)
    conv, x0, ei, ea0 = _fused_case(aggs, update_edges, edge_out)
    if integer:
        with torch.no_grad():
            for prm in conv.parameters():
                prm.copy_(torch.randint(-2, 3, prm.shape))
        x0, ea0 = x0.round(), ea0.round()
        x0[3] = x0[4]  # two identical sources into one target: exact max/min ties
        ei[:, :2] = torch.tensor([[3, 4], [7, 7]])
        ea0[1] = ea0[0]
    order = ei[1].argsort(stable=True)
    ei, ea0 = ei[:, order], ea0[order]
    calls = []
    real = mc._ChunkedEdgeLayer.apply
    monkeypatch.setattr(mc._ChunkedEdgeLayer, "apply",
                        lambda *a: calls.append(len(a[9].chunks)) or real(*a))

    def run(fused: bool) -> list[torch.Tensor]:
        conv.zero_grad(set_to_none=True)
        x, ea = x0.clone().requires_grad_(), ea0.clone().requires_grad_()
        if not fused:
            conv._fusable = lambda *a: False
        try:
            out, e = conv(x, ei, ea, return_edge_attr=True)
        finally:
            conv.__dict__.pop("_fusable", None)
        g = torch.Generator().manual_seed(1)
        w = torch.randn(out.shape, generator=g, dtype=out.dtype)
        we = torch.randn(e.shape, generator=g, dtype=e.dtype)
        ((out * w).sum() + (e * we).sum()).backward()
        return [out, e, x.grad, ea.grad] + [p.grad.clone() for p in conv.parameters()]

    fused, ref = run(True), run(False)
    assert calls and calls[0] > 5  # the chunked path ran, on many chunks
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("keep", ["all", "none", "some"])
@pytest.mark.parametrize("update_edges,residual", [(True, True), (True, False), (False, False)])
def test_chunked_edge_layer_gradcheck(monkeypatch, update_edges, residual, keep):
    """The hand-written backward of the chunked edge layer passes fp64 gradcheck, whichever
    per-edge intermediates it keeps and whichever it recomputes."""
    from graphspace.ops import get_csr
    from graphspace.ops import metanetwork as mc
    from graphspace.ops.metanetwork import _ChunkedEdgeLayer, _EdgeChunks

    kept = {"all": mc.KEEP, "none": (), "some": ("z0", "m")}[keep]
    monkeypatch.setattr(mc, "KEEP", kept)

    torch.manual_seed(0)
    n, e, h, d = 9, 40, 3, 4
    ei = torch.randint(0, 7, (2, e))  # nodes 7, 8 are isolated
    ei = ei[:, ei[1].argsort(stable=True)]
    plan = _EdgeChunks(get_csr(ei[1], n), 8)
    assert len(plan.chunks) > 2
    k = 2 if update_edges else 1
    dout = d if residual or not update_edges else 5

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    args = [t(n, k * h), t(n, k * h), t(e, d)]
    args += [t(h, d), t(dout, h), t(dout)] if update_edges else [None, None, None]
    args += [t(2 * h, dout), t(2 * h)]
    aggs = ("sum", "mean", "max", "min", "std")

    def f(*a):
        agg, eo = _ChunkedEdgeLayer.apply(*a, ei[0].clone(), plan, aggs, residual)
        return (agg, eo) if update_edges else agg

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)
