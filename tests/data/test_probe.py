"""ProbeFeatures: neuron values on probe inputs as node features (Neural Graphs)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from graphspace.data import DWSNetsINR, RandomNeuronPermutation, RandomSignFlip
from graphspace.data.probe import ProbeFeatures
from graphspace.graphs import ParameterGraph
from graphspace.testing.models import SmallCNN


@pytest.fixture
def inr() -> DWSNetsINR:
    torch.manual_seed(0)
    m = DWSNetsINR((2, 8, 8, 1)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_values_are_the_pre_activations(inr: DWSNetsINR) -> None:
    g = ParameterGraph.from_module(inr)
    t = ProbeFeatures(DWSNetsINR((2, 8, 8, 1)), num_points=5, seed=3)
    h = t(g)
    assert h.x.shape == (g.num_nodes, 3 + 5)
    assert torch.equal(h.x[:, :3], g.x)  # the original channels are kept
    pts = t.points.double()
    f = h.x[:, 3:]
    z1 = inr.seq[0](pts)
    z2 = inr.seq[1](torch.sin(inr.w0 * z1))
    r = g.spec.analysis.record
    torch.testing.assert_close(f[r("seq.0.weight").dst], z1.T, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(f[r("seq.1.weight").dst], z2.T, atol=1e-5, rtol=1e-5)
    # the output neuron carries the INR's values (without its constant offset)
    torch.testing.assert_close(f[r("seq.2.weight").dst], (inr(pts) - inr.offset).T, atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(f[:2], pts.T)  # input neurons carry the probe coordinates
    assert (pts >= -1).all() and (pts <= 1).all()


def test_equivariant_to_neuron_permutations(inr: DWSNetsINR) -> None:
    g = ParameterGraph.from_module(inr)
    t = ProbeFeatures(DWSNetsINR((2, 8, 8, 1)), num_points=7)
    gp = RandomNeuronPermutation(seed=0)(g)
    assert not torch.allclose(gp.edge_attr, g.edge_attr)
    f, fp = t(g).x, t(gp).x
    r = g.spec.analysis.record
    out = r("seq.2.weight").dst
    torch.testing.assert_close(fp[out], f[out], atol=1e-6, rtol=1e-6)
    for key in ("seq.0.weight", "seq.1.weight"):
        nodes = r(key).dst
        a, b = f[nodes], fp[nodes]
        # same rows, moved with their neurons (matched through the bias column)
        order_a, order_b = a[:, 0].argsort(), b[:, 0].argsort()
        torch.testing.assert_close(b[order_b], a[order_a], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(a, b)


def test_sign_flip_flips_hidden_features_only(inr: DWSNetsINR) -> None:
    g = ParameterGraph.from_module(inr)
    t = ProbeFeatures(DWSNetsINR((2, 8, 8, 1)), num_points=4)
    f, ff = t(g).x[:, 3:], t(RandomSignFlip(seed=2)(g)).x[:, 3:]
    torch.testing.assert_close(ff.abs(), f.abs(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ff, f)  # some hidden neuron was flipped
    torch.testing.assert_close(ff[-1], f[-1], atol=1e-6, rtol=1e-6)


def test_explicit_points_and_template_untouched(inr: DWSNetsINR) -> None:
    template = DWSNetsINR((2, 8, 8, 1))
    before = copy.deepcopy(template.state_dict())
    pts = torch.tensor([[0.0, 0.0], [0.5, -0.5], [1.0, 1.0]])
    t = ProbeFeatures(template, points=pts, scale=2.0)
    assert t.out_channels == 3
    h = t(ParameterGraph.from_module(inr))
    torch.testing.assert_close(h.x[:2, 3:], 2.0 * pts.T.double())
    for k, v in template.state_dict().items():
        assert torch.equal(v, before[k])


def test_convolutions_average_space() -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(channels=4)
    g = ParameterGraph.from_module(cnn, kernel="channel")
    pts = torch.randn(3, 1, 28, 28)
    h = ProbeFeatures(SmallCNN(channels=4), points=pts)(g)
    r = g.spec.analysis.record
    want = cnn.conv1(pts).mean(dim=(2, 3)).T
    torch.testing.assert_close(h.x[r("conv1.weight").dst, 3:], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.x[r("fc.weight").dst, 3:], cnn(pts).T, atol=1e-5, rtol=1e-5)
    inputs = g.spec.analysis.sets[g.spec.analysis.input_sets[0]].nodes
    torch.testing.assert_close(h.x[inputs, 3:], pts.mean(dim=(2, 3)).T)


def test_bad_input() -> None:
    g = ParameterGraph.from_module(DWSNetsINR((2, 8, 8, 1)))

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    with pytest.raises(ValueError, match="seq.0"):
        ProbeFeatures(Other())(g)
    from torch_geometric.data import Batch

    with pytest.raises(TypeError, match="batches"):
        ProbeFeatures(DWSNetsINR((2, 8, 8, 1)))(Batch.from_data_list([g, g]))
    with pytest.raises(ValueError, match="num_points"):
        ProbeFeatures(DWSNetsINR(), num_points=0)


def _inr_graphs(n: int) -> list[ParameterGraph]:
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(ParameterGraph.from_module(DWSNetsINR((2, 8, 8, 1)).double()))
    return out


def test_fit_gives_unit_rms_per_layer_and_keeps_symmetries() -> None:
    graphs = _inr_graphs(6)
    raw = ProbeFeatures(DWSNetsINR((2, 8, 8, 1)), num_points=5, normalize=False)
    t = ProbeFeatures(DWSNetsINR((2, 8, 8, 1)), num_points=5)
    assert torch.equal(t(graphs[0]).x, raw(graphs[0]).x)  # not fitted yet: raw features
    assert t.fit(graphs) is t
    layers = sorted(t.layer_scale)
    assert layers == sorted(graphs[0].node_layer.unique().tolist())
    feats = torch.cat([t(g).x[:, 3:] for g in graphs])
    layer = torch.cat([g.node_layer for g in graphs])
    for lv in layers:
        rms = feats[layer == lv].pow(2).mean().sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-9, rtol=1e-9)
    # layers have very different raw magnitudes, so one global factor would not do
    assert max(t.layer_scale.values()) > 2 * min(t.layer_scale.values())
    # one scalar per layer: a multiple of the raw features, and sign flips still flip exactly
    g = graphs[1]
    f, f_raw = t(g).x[:, 3:], raw(g).x[:, 3:]
    torch.testing.assert_close(f, f_raw * torch.tensor([t.layer_scale[v] for v in
                                                        g.node_layer.tolist()]).unsqueeze(1))
    flipped = t(RandomSignFlip(seed=2)(g)).x[:, 3:]
    torch.testing.assert_close(flipped.abs(), f.abs(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(flipped, f)
    # normalize=False ignores fit
    assert raw.fit(graphs).layer_scale == {}


def test_datamodule_fits_transforms_on_the_training_split(tmp_path) -> None:
    from graphspace.data import INRZooDataModule

    t = ProbeFeatures(DWSNetsINR(), num_points=4)
    dm = INRZooDataModule(str(tmp_path / "inr"), batch_size=4, generate=True,
                          generate_kwargs={"num_images": 12, "steps": 5, "workers": 1,
                                           "progress": False, "val_fraction": 0.25},
                          transforms=[t])
    dm.prepare_data()
    dm.setup("fit")
    assert t.layer_scale  # fitted
    train = [dm.train_set.get(i) for i in range(len(dm.train_set))]
    expected = ProbeFeatures(DWSNetsINR(), num_points=4).fit(train).layer_scale
    assert t.layer_scale == pytest.approx(expected)
    batch = next(iter(dm.train_dataloader()))
    assert batch.x.shape[1] == 3 + 4
