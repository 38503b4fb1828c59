import copy

import pytest
import torch
from torch import nn

from graphspace.merge import (
    activation_statistics,
    align,
    evaluate,
    merge,
    repair,
    repairable_sets,
    reset_bn_stats,
)
from graphspace.merge._utils import state_of, weighted_average, with_state
from graphspace.testing.models import MLP, ResNet


def test_reset_bn_stats_recomputes_dataset_statistics():
    torch.manual_seed(0)
    m = ResNet((4, 8), blocks=1, in_channels=3).eval()
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.fill_(5.0)
            b.running_var.fill_(9.0)
    before = copy.deepcopy(m.state_dict())
    xs = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    out = reset_bn_stats(m, xs)
    for k, v in m.state_dict().items():  # the input is untouched
        assert torch.equal(v, before[k])
    assert not out.training
    # reference: the stem BN sees stem(x); cumulative average of per-batch statistics
    with torch.no_grad():
        z = [m.stem(x) for x in xs]
    mean = torch.stack([t.mean((0, 2, 3)) for t in z]).mean(0)
    var = torch.stack([t.var((0, 2, 3), unbiased=True) for t in z]).mean(0)
    assert torch.allclose(out.bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(out.bn.running_var, var, atol=1e-5)
    assert out.bn.momentum == m.bn.momentum
    with pytest.raises(ValueError, match="no BatchNorm"):
        reset_bn_stats(MLP(), [torch.randn(2, 8)])


def _pair():
    torch.manual_seed(0)
    return MLP((8, 32, 32, 4)).eval(), MLP((8, 32, 32, 4)).eval()


def test_repair_matches_interpolated_statistics():
    a, b = _pair()
    xs = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    bal, _ = align(a, b)
    merged = with_state(a, weighted_average([state_of(a), state_of(bal)], [0.3, 0.7]))
    sets = repairable_sets(merged)
    assert len(sets) == 2
    st_a = activation_statistics(a, xs, sets)
    st_b = activation_statistics(bal, xs, sets)
    target_mean = {s: 0.3 * st_a[s].mean_a + 0.7 * st_b[s].mean_a for s in sets}
    target_std = {s: 0.3 * st_a[s].std_a + 0.7 * st_b[s].std_a for s in sets}
    before = activation_statistics(merged, xs, sets)
    # negative control: merging shrinks the spread of the pre-activations
    assert all((before[s].std_a < target_std[s]).float().mean() > 0.5 for s in sets)
    fixed = repair(merged, [a, bal], xs, [0.3, 0.7])
    after = activation_statistics(fixed, xs, sets)
    for s in sets:
        assert torch.allclose(after[s].mean_a, target_mean[s], atol=1e-4)
        assert torch.allclose(after[s].std_a, target_std[s], rtol=1e-3, atol=1e-4)
    # the output layer is not repaired, and the input model is untouched
    assert torch.equal(fixed.net[4].weight, merged.net[4].weight)
    assert not torch.equal(fixed.net[0].weight, merged.net[0].weight)


def test_repair_without_bias_only_rescales():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(),  # noqa: E731
                                 nn.Linear(16, 3)).eval()
    a, b = make(), make()
    xs = [torch.randn(64, 6)]
    merged = merge([a, b], "average")
    fixed = repair(merged, [a, b], xs)
    st = activation_statistics(fixed, xs, [1])[1]
    ta, tb = activation_statistics(a, xs, [1])[1], activation_statistics(b, xs, [1])[1]
    assert torch.allclose(st.std_a, 0.5 * (ta.std_a + tb.std_a), rtol=1e-3)
    ratio = fixed[0].weight / merged[0].weight
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # rows rescaled


def test_bn_reset_improves_merged_resnet(resnet_pair, digits_images):
    a, b = resnet_pair
    train, test = digits_images.train_dataloader(shuffle=False), digits_images.test_dataloader()
    acc_a, acc_b = evaluate(a, test)[1], evaluate(b, test)[1]
    assert min(acc_a, acc_b) > 0.9
    plain = merge([a, b], "weight_matching")
    reset = merge([a, b], "weight_matching", loader=train, repair="bn_reset")
    acc_plain, acc_reset = evaluate(plain, test)[1], evaluate(reset, test)[1]
    assert acc_reset > acc_plain + 0.1, (acc_plain, acc_reset)


def test_repair_improves_naive_and_matched_mlp_merges(mlp_pair, digits):
    a, b = mlp_pair
    train, test = digits.train_dataloader(shuffle=False), digits.test_dataloader()
    for method in ("average", "weight_matching"):
        plain = merge([a, b], method)
        fixed = merge([a, b], method, loader=train, repair="repair")
        assert evaluate(fixed, test)[0] < evaluate(plain, test)[0], method
    with pytest.raises(ValueError, match="needs data"):
        merge([a, b], "average", repair="repair")
