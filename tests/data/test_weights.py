import pytest
import torch

from graphspace.data import (
    GraphBuilder,
    NormalizeWeights,
    WeightStatistics,
    compute_statistics,
    set_state_dict,
)
from graphspace.graphs import ParameterGraph, analyze
from graphspace.testing.models import ResNet, Siren, SmallCNN


def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + seed)
          for k, v in model.state_dict().items()}
    return sd


@pytest.mark.parametrize("kernel", ["edge", "channel"])
@pytest.mark.parametrize("make", [SmallCNN, ResNet, Siren])
def test_builder_equals_from_state_dict(make, kernel):
    model = make()
    b = GraphBuilder(model, kernel=kernel)
    a = analyze(model)
    for seed in (0, 1):
        sd = _perturbed(model, seed)
        g = b.build(b.flatten(sd))
        ref = ParameterGraph.from_state_dict(sd, a, kernel=kernel)
        for key in ref.keys():
            if key == "spec":
                continue
            if torch.is_tensor(ref[key]):
                assert torch.equal(g[key], ref[key]), key
            else:
                assert g[key] == ref[key], key
        back = g.to_state_dict()
        for k, v in sd.items():
            assert torch.equal(back[k], v), k
        assert b.unflatten(b.flatten(sd)).keys() == sd.keys()


@pytest.mark.parametrize("kernel", ["edge", "channel"])
def test_set_state_dict_inverts_to_state_dict(kernel):
    model = ResNet()
    g = ParameterGraph.from_module(model, kernel=kernel)
    sd = _perturbed(model, 3)
    g2 = set_state_dict(g, sd)
    for k, v in sd.items():
        assert torch.equal(g2.to_state_dict()[k], v), k
    # the original graph is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(g.to_state_dict()[k], v)


def _collection(n=6):
    model = SmallCNN()
    a = analyze(model)
    recs = a.records
    return [(recs, _perturbed(model, s)) for s in range(n)], model


def test_statistics_match_direct_computation():
    items, _ = _collection()
    st = compute_statistics(items)
    w = torch.stack([sd["conv2.weight"] for _, sd in items]).double()
    assert float(st.mean["conv2.weight"]) == pytest.approx(float(w.mean()), rel=1e-6)
    assert float(st.std["conv2.weight"]) == pytest.approx(float(w.std()), rel=1e-6)
    pe = compute_statistics(items, per_element=True)
    assert pe.mean["fc.bias"].shape == (10,)
    assert torch.allclose(pe.std["fc.bias"].double(),
                          torch.stack([sd["fc.bias"] for _, sd in items]).double().std(0),
                          atol=1e-6)


@pytest.mark.parametrize("per_element", [False, True])
def test_normalization_standardises_and_inverts(per_element):
    items, model = _collection(8)
    st = compute_statistics(items, per_element=per_element)
    a = analyze(model)
    norm = NormalizeWeights(st)
    graphs = [ParameterGraph.from_state_dict(sd, a) for _, sd in items]
    out = [norm(g) for g in graphs]
    w = torch.stack([g.to_state_dict()["conv3.weight"] for g in out]).double()
    if per_element:
        assert w.mean(0).abs().max() < 1e-5
        assert torch.allclose(w.std(0), torch.ones(()).double(), atol=1e-3)
    else:
        assert abs(float(w.mean())) < 1e-5
        assert float(w.std()) == pytest.approx(1.0, abs=1e-3)
    back = NormalizeWeights(st, inverse=True)(out[0])
    for k, v in items[0][1].items():
        assert torch.allclose(back.to_state_dict()[k], v, atol=1e-5), k
    # negative control: statistics of other networks do not standardise
    shifted = [(r, {k: v * 3 + 1 for k, v in sd.items()}) for r, sd in items]
    w2 = torch.stack([norm(ParameterGraph.from_state_dict(sd, a)).to_state_dict()["conv3.weight"]
                      for _, sd in shifted]).double()
    assert float(w2.std()) > 2


def test_normalization_keeps_channel_padding_zero():
    model = ResNet()
    items = [(analyze(model).records, _perturbed(model, s)) for s in range(3)]
    st = compute_statistics(items)
    g = ParameterGraph.from_module(model, kernel="channel", kernel_pad=(5, 5))
    out = NormalizeWeights(st)(g)
    pad_free = torch.zeros_like(g.edge_attr, dtype=torch.bool)
    for r in g.spec.records:
        if r.kind == "edge":
            a, b = g.spec.ranges[r.key]
            pad_free[a:b][:, g.spec.pad_index[r.key]] = True
    pad_free[g.num_param_edges:] = True
    diag_col = 12  # centre of a 5x5 kernel (norm weights sit there)
    pad_free[:, diag_col] = True
    assert (out.edge_attr[~pad_free] == 0).all()


def test_statistics_save_load(tmp_path):
    items, _ = _collection(3)
    st = compute_statistics(items)
    st.save(tmp_path / "stats.pt")
    st2 = WeightStatistics.load(tmp_path / "stats.pt")
    assert st2.mean.keys() == st.mean.keys()
    assert all(torch.equal(st.std[k], st2.std[k]) for k in st.std)
