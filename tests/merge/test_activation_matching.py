import numpy as np
import pytest
import torch

from graphspace.graphs import analyze, permute_model
from graphspace.merge import (
    ActivationTap,
    activation_matching,
    activation_statistics,
    align_state,
    invert,
)
from graphspace.testing.models import MLP, ResNet, TinyTransformer


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (MLP((8, 32, 32, 4)), (8,)),
        "resnet": (ResNet((8, 16), blocks=1, in_channels=3), (3, 8, 8)),
        "transformer": (TinyTransformer(in_dim=6, dim=32, heads=4), (5, 6)),
    }


@pytest.mark.parametrize("arch", ["mlp", "resnet", "transformer"])
def test_recovers_exact_permutation(arch):
    a, shape = _models()[arch]
    a.eval()
    b, p = permute_model(a, generator=torch.Generator().manual_seed(1))
    loader = [torch.randn(16, *shape, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    res = activation_matching(a, b, loader)
    expected = invert(p)
    for name in p:
        assert torch.equal(res.perms[name], expected[name]), name
    aligned = align_state(a, b.state_dict(), res.perms)
    assert all(torch.equal(aligned[k], v) for k, v in a.state_dict().items())


def test_tap_reads_every_set_including_attention_projections():
    torch.manual_seed(0)
    m = TinyTransformer(in_dim=6, dim=16, heads=4).eval()
    x = torch.randn(2, 5, 6)
    a = analyze(m, x)
    tap = ActivationTap(m, analysis=a)
    acts = tap(x)
    byname = {a.sets[s].name: v for s, v in acts.items()}
    # the packed in-projection is one set of 3 x 16 neurons: q, k, v
    qkv = next(s for s in acts if a.sets[s].name == "block.attn" and a.sets[s].size == 48)
    byname["block.attn.q"], byname["block.attn.v"] = acts[qkv][:, :16], acts[qkv][:, 32:]
    with torch.no_grad():
        h = m.block.norm1(m.inp(x))
        w, bias = m.block.attn.in_proj_weight, m.block.attn.in_proj_bias
        q = h @ w[:16].T + bias[:16]
        v = h @ w[32:].T + bias[32:]
        r = m.inp(x) + m.block.attn(h, h, h, need_weights=False)[0]
        fc1 = m.block.fc1(m.block.norm2(r))
    assert torch.allclose(byname["inp"], m.inp(x).reshape(-1, 16))
    # batch_first attention projects (L, B, E): samples come token-major
    assert torch.allclose(byname["block.attn.q"], q.transpose(0, 1).reshape(-1, 16), atol=1e-6)
    assert torch.allclose(byname["block.attn.v"], v.transpose(0, 1).reshape(-1, 16), atol=1e-6)
    assert torch.allclose(byname["block.fc1"], fc1.reshape(-1, 32), atol=1e-5)


def test_conv_activations_are_channel_last_samples():
    torch.manual_seed(0)
    m = ResNet((4, 8), blocks=1, in_channels=3).eval()
    a = analyze(m)
    x = torch.randn(2, 3, 6, 6)
    acts = ActivationTap(m)(x)
    stem = next(v for s, v in acts.items() if a.sets[s].name == "stem")
    with torch.no_grad():
        ref = m.stem(x).permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(stem, ref)


def test_statistics_match_numpy():
    torch.manual_seed(0)
    ma, mb = MLP((8, 6, 4)).eval(), MLP((8, 6, 4)).eval()
    xs = [torch.randn(10, 8) for _ in range(3)]
    st = activation_statistics(ma, xs, [1], model_b=mb)[1]
    with torch.no_grad():
        za = torch.cat([ma.net[0](x) for x in xs]).double().numpy()
        zb = torch.cat([mb.net[0](x) for x in xs]).double().numpy()
    ref = np.corrcoef(za.T, zb.T)[:6, 6:]
    assert np.allclose(st.correlation(eps=0).numpy(), ref, atol=1e-10)
    assert np.allclose(st.mean_a.numpy(), za.mean(0))
    assert np.allclose(st.std_b.numpy(), zb.std(0))
    d = ((za[:, :, None] - zb[:, None, :]) ** 2).mean(0)
    assert np.allclose(st.squared_distance().numpy(), d)


def test_digits_activation_matching_lowers_barrier(mlp_pair, digits):
    from graphspace.merge import interpolation_curve, permuted_copy

    a, b = mlp_pair
    res = activation_matching(a, b, digits.train_dataloader(shuffle=False))
    test = digits.test_dataloader()
    naive = interpolation_curve(a, b, test, 5).barrier
    matched = interpolation_curve(a, permuted_copy(b, res.perms), test, 5).barrier
    assert matched < 0.5 * naive
