import importlib.util

import pytest
import torch

from graphspace.data import (
    DWSNetsINR,
    GaussianWeightNoise,
    NFNSiren,
    RandomNeuronPermutation,
    RandomPositiveRescaling,
    RandomSignFlip,
    SirenBiasShift,
    WeightDropout,
    WeightMixUp,
    mixup_graphs,
)
from graphspace.graphs import ParameterGraph, analyze, apply_scaling
from graphspace.testing.models import ResNet, SmallCNN

HAS_MATCHING = importlib.util.find_spec("graphspace.merge.weight_matching") is not None


def _net(make, seed=0, **kw):
    torch.manual_seed(seed)
    m = make(**kw).double().eval()
    with torch.no_grad():  # nonzero biases so that bias transforms are exercised
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def _inputs(make):
    g = torch.Generator().manual_seed(5)
    if make in (DWSNetsINR, NFNSiren):
        return torch.rand(64, 2, generator=g, dtype=torch.float64) * 2 - 1
    if make is ResNet:
        return torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    return torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64)


def _weight_change(g, g2):
    return max((a - b).abs().max().item() for a, b in
               zip(g.to_state_dict().values(), g2.to_state_dict().values())
               if a.is_floating_point())


PRESERVING = [
    (RandomNeuronPermutation, SmallCNN, {}),
    (RandomNeuronPermutation, ResNet, {"widths": (4, 8), "blocks": 1}),
    (RandomNeuronPermutation, DWSNetsINR, {}),
    (RandomPositiveRescaling, SmallCNN, {}),
    (RandomSignFlip, DWSNetsINR, {}),
    (RandomSignFlip, NFNSiren, {}),
    (RandomSignFlip, SmallCNN, {"act": torch.nn.Tanh}),
    (SirenBiasShift, DWSNetsINR, {}),
    (SirenBiasShift, NFNSiren, {}),
]


@pytest.mark.parametrize("transform,make,kw", PRESERVING)
def test_function_preserving_in_fp64(transform, make, kw):
    model = _net(make, **kw)
    x = _inputs(make)
    for kernel in ("edge", "channel"):
        g = ParameterGraph.from_module(model, kernel=kernel)
        before = {k: v.clone() for k, v in g.to_state_dict().items()}
        g2 = transform(seed=1)(g)
        assert _weight_change(g, g2) > 1e-3  # the weights did change ...
        out = g2.to_module(model).eval()(x)
        assert torch.allclose(out, model(x), rtol=0, atol=1e-10)  # ... the function did not
        for k, v in g.to_state_dict().items():  # the input graph is untouched
            assert torch.equal(v, before[k])


@pytest.mark.parametrize("transform", [GaussianWeightNoise(0.1, seed=0),
                                       WeightDropout(0.2, seed=0)])
def test_perturbations_change_the_function(transform):
    model = _net(SmallCNN)
    x = _inputs(SmallCNN)
    g = ParameterGraph.from_module(model)
    out = transform(g).to_module(model).eval()(x)
    assert (out - model(x)).abs().max() > 1e-3


def test_noise_is_scaled_by_each_tensors_std():
    model = _net(SmallCNN)
    with torch.no_grad():
        model.conv2.weight.mul_(100.0)
    g = ParameterGraph.from_module(model)
    sd = g.to_state_dict()
    diffs = {k: [] for k in ("conv1.weight", "conv2.weight")}
    for s in range(20):
        sd2 = GaussianWeightNoise(0.1, seed=s)(g).to_state_dict()
        for k in diffs:
            diffs[k].append(sd2[k] - sd[k])
    for k in diffs:
        d = torch.stack(diffs[k])
        assert float(d.std() / sd[k].std()) == pytest.approx(0.1, rel=0.1)
        assert abs(float(d.mean() / sd[k].std())) < 0.02


def test_dropout_rate_and_rescaling():
    g = ParameterGraph.from_module(_net(SmallCNN))
    sd, sd2 = g.to_state_dict(), WeightDropout(0.25, seed=0)(g).to_state_dict()
    w, w2 = sd["conv2.weight"], sd2["conv2.weight"]
    zero = w2 == 0
    assert float(zero.float().mean()) == pytest.approx(0.25, abs=0.04)
    assert torch.allclose(w2[~zero], w[~zero] / 0.75)


def test_rescaling_respects_the_activation():
    # a tanh network has no positive rescaling symmetry: nothing to rescale ...
    tanh = _net(SmallCNN, act=torch.nn.Tanh)
    g = ParameterGraph.from_module(tanh)
    assert _weight_change(g, RandomPositiveRescaling(seed=0)(g)) == 0
    # ... and forcing one changes its function (negative control) or is refused
    a = analyze(tanh)
    sid = next(s.id for s in a.sets if s.name == "conv1")
    with pytest.raises(ValueError):
        apply_scaling(a, tanh.state_dict(), {sid: torch.full((16,), 2.0)})
    # a ReLU network has no sign-flip symmetry
    relu = ParameterGraph.from_module(_net(SmallCNN))
    assert _weight_change(relu, RandomSignFlip(seed=0)(relu)) == 0


def test_seeded_transforms_are_reproducible():
    g = ParameterGraph.from_module(_net(SmallCNN))
    for t in (RandomNeuronPermutation, GaussianWeightNoise, RandomPositiveRescaling):
        a, b, c = t(seed=3)(g), t(seed=3)(g), t(seed=4)(g)
        assert torch.equal(a.edge_attr, b.edge_attr)
        assert not torch.equal(a.edge_attr, c.edge_attr)


def _pair():
    m1, m2 = _net(SmallCNN, 0), _net(SmallCNN, 1)
    g1, g2 = ParameterGraph.from_module(m1), ParameterGraph.from_module(m2)
    g1.y, g2.y = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.8],
                                                                        dtype=torch.float64)
    return m1, m2, g1, g2


def test_vanilla_mixup_interpolates_weights_and_targets():
    m1, m2, g1, g2 = _pair()
    out = mixup_graphs(g1, g2, 0.3)
    for k, v in out.to_state_dict().items():
        want = 0.3 * m1.state_dict()[k] + 0.7 * m2.state_dict()[k]
        assert torch.allclose(v, want, atol=1e-12), k
    assert float(out.y) == pytest.approx(0.3 * 0.2 + 0.7 * 0.8)
    x = _inputs(SmallCNN)
    assert (out.to_module(m1)(x) - m1(x)).abs().max() > 1e-3  # not function preserving


def test_permute_mixup_uses_a_permuted_partner():
    m1, m2, g1, g2 = _pair()
    x = _inputs(SmallCNN)
    out = mixup_graphs(g1, g2, 0.0, "permute", torch.Generator().manual_seed(0))
    assert torch.allclose(out.to_module(m1)(x), m2(x), atol=1e-10)  # lam=0: the partner's fn
    assert _weight_change(out, g2) > 1e-3  # ... with permuted weights


def test_mixup_classification_targets():
    _, _, g1, g2 = _pair()
    g1.y, g2.y = torch.tensor([3]), torch.tensor([5])
    out = mixup_graphs(g1, g2, 0.4, num_classes=10)
    assert out.y_soft.shape == (1, 10)
    assert float(out.y_soft[0, 3]) == pytest.approx(0.4)
    assert float(out.y_soft[0, 5]) == pytest.approx(0.6)
    assert int(out.y) == 5


@pytest.mark.skipif(not HAS_MATCHING, reason="graphspace.merge.weight_matching not available")
def test_align_mixup_undoes_a_permutation():
    m1, _, g1, _ = _pair()
    g_perm = RandomNeuronPermutation(seed=0)(g1)
    vanilla = mixup_graphs(g1, g_perm, 0.5, "vanilla")
    aligned = mixup_graphs(g1, g_perm, 0.5, "align")
    assert _weight_change(aligned, g1) < 1e-9  # alignment recovers the permutation exactly
    assert _weight_change(vanilla, g1) > 1e-2


def test_mixup_transform_draws_partners_from_a_dataset():
    graphs = []
    for s in range(4):
        g = ParameterGraph.from_module(_net(SmallCNN, s))
        g.y = torch.tensor([float(s)], dtype=torch.float64)
        graphs.append(g)
    t = WeightMixUp(graphs, alpha=0.5, seed=0)
    out = t(graphs[0])
    lam = float(out.mix_lambda)
    assert 0 <= lam <= 1
    partner_y = (float(out.y) - lam * 0.0) / (1 - lam)
    assert min(abs(partner_y - s) for s in range(4)) < 1e-6
    other = ParameterGraph.from_module(_net(ResNet))  # no partner of this architecture
    same = WeightMixUp(graphs, seed=0, max_tries=3)(other)
    assert _weight_change(same, other) == 0 and "mix_lambda" not in same
    with pytest.raises(ValueError, match="mode"):
        WeightMixUp(graphs, mode="magic")
