import numpy as np
import pytest
import torch

from graphspace.graphs import permute_model
from graphspace.merge import UnsupportedFusionError, ot_fusion
from graphspace.testing.models import MLP, ResNet, TinyTransformer

ot = pytest.importorskip("ot")


def _is_permutation_matrix(m):
    r = m.round()
    return torch.allclose(m, r, atol=1e-9) and bool((r.sum(0) == 1).all()) and \
        bool((r.sum(1) == 1).all())


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
@pytest.mark.parametrize("cost", ["weight", "activation"])
def test_emd_uniform_equal_widths_gives_permutations(arch, cost, make_vgg):
    torch.manual_seed(0)
    a = (MLP((8, 16, 16, 4)) if arch == "mlp" else make_vgg(6)).eval()
    shape = (8,) if arch == "mlp" else (1, 8, 8)
    b, p = permute_model(a, generator=torch.Generator().manual_seed(2))
    loader = [torch.randn(32, *shape) for _ in range(2)]
    res = ot_fusion([a, b], cost=cost, loader=loader)
    assert set(res.transports[1]) == set(p)
    for name, t in res.transports[1].items():
        n = t.shape[0]
        assert _is_permutation_matrix(n * t), name
        # B's neuron i is A's neuron p[i]: the plan sends it there
        assert torch.equal((n * t).argmax(1), p[name]), name
    for k, v in a.state_dict().items():
        assert torch.allclose(res.model.state_dict()[k].float(), v.float(), atol=1e-6), k


def test_sinkhorn_plans_are_not_permutations():
    # negative control of the EMD test: entropic plans spread mass
    torch.manual_seed(0)
    a = MLP((8, 16, 16, 4)).eval()
    b, _ = permute_model(a, generator=torch.Generator().manual_seed(2))
    res = ot_fusion([a, b], solver="sinkhorn", reg=0.5)
    for t in res.transports[1].values():
        assert not _is_permutation_matrix(t.shape[0] * t)


def test_independent_models_fuse_to_permutation_average():
    """With equal widths and EMD, fusion = permutation alignment + averaging: the fused model
    is the average of A and a permuted (function-preserving) copy of B."""
    torch.manual_seed(0)
    a, b = MLP((8, 16, 16, 4)).eval(), MLP((8, 16, 16, 4)).eval()
    res = ot_fusion([a, b])
    perms = {name: (t.shape[0] * t).argmax(1).argsort() for name, t in res.transports[1].items()}
    for t in res.transports[1].values():
        assert _is_permutation_matrix(t.shape[0] * t)
    from graphspace.merge import permuted_copy

    bp = permuted_copy(b, perms)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(bp(x), b(x), atol=1e-5)
    for k, v in res.model.state_dict().items():
        assert torch.allclose(v, 0.5 * (a.state_dict()[k] + bp.state_dict()[k]), atol=1e-6)


def test_layer_matches_dense_reference():
    """One hidden layer, different widths: the fused weights equal the paper's formulas
    computed by hand with POT."""
    torch.manual_seed(0)
    a, b = MLP((5, 4, 3)).eval(), MLP((5, 6, 3)).eval()
    res = ot_fusion([a, b], weights=[0.3, 0.7])
    wa, ba_, va, ca = (a.net[0].weight.double(), a.net[0].bias.double(),
                       a.net[2].weight.double(), a.net[2].bias.double())
    wb, bb, vb, cb = (b.net[0].weight.double(), b.net[0].bias.double(),
                      b.net[2].weight.double(), b.net[2].bias.double())
    xa = torch.cat([wa, ba_[:, None]], 1).detach().numpy()
    xb = torch.cat([wb, bb[:, None]], 1).detach().numpy()
    cost = ((xb[:, None, :] - xa[None, :, :]) ** 2).sum(-1)
    alpha, beta = np.full(6, 1 / 6), np.full(4, 1 / 4)
    t = ot.emd(alpha, beta, cost)
    that = torch.from_numpy(t / beta[None, :])
    w_al = that.T @ wb.detach()
    b_al = that.T @ bb.detach()
    v_al = vb.detach() @ that
    sd = res.model.state_dict()
    assert torch.allclose(res.transports[1]["net.0"], torch.from_numpy(t))
    assert torch.allclose(sd["net.0.weight"].double(), 0.3 * wa.detach() + 0.7 * w_al, atol=1e-6)
    assert torch.allclose(sd["net.0.bias"].double(), 0.3 * ba_.detach() + 0.7 * b_al, atol=1e-6)
    assert torch.allclose(sd["net.2.weight"].double(), 0.3 * va.detach() + 0.7 * v_al, atol=1e-6)
    assert torch.allclose(sd["net.2.bias"].double(), 0.3 * ca.detach() + 0.7 * cb.detach(),
                          atol=1e-6)


@pytest.mark.parametrize("solver,marginals", [("emd", "uniform"), ("sinkhorn", "uniform"),
                                              ("emd", "importance"),
                                              ("sinkhorn", "importance")])
def test_different_widths_take_the_target_shape(solver, marginals, make_vgg):
    torch.manual_seed(0)
    models = [make_vgg(6).eval(), make_vgg(10).eval(), make_vgg(4).eval()]
    res = ot_fusion(models, solver=solver, marginals=marginals, reg=0.05)
    shapes = {k: v.shape for k, v in models[0].state_dict().items()}
    assert {k: v.shape for k, v in res.model.state_dict().items()} == shapes
    assert res.model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    expected = {"features.0": 6, "features.2": 12, "features.6": 12, "classifier.1": 32}
    for tr in res.transports[1:]:
        for name, t in tr.items():
            assert t.shape[1] == expected[name]
            # marginals: rows sum to the source marginal, columns to the target marginal
            assert torch.allclose(t.sum(), torch.tensor(1.0, dtype=t.dtype), atol=1e-6)
            if marginals == "uniform":
                assert torch.allclose(t.sum(0), torch.full((t.shape[1],), 1 / t.shape[1],
                                                           dtype=t.dtype), atol=1e-4)
                assert torch.allclose(t.sum(1), torch.full((t.shape[0],), 1 / t.shape[0],
                                                           dtype=t.dtype), atol=1e-4)
    # the wider input is fused into the target's shape the other way round too
    res2 = ot_fusion(models, target=1)
    assert res2.model.state_dict()["features.0.weight"].shape == (10, 1, 3, 3)


@pytest.mark.parametrize("model", [lambda: ResNet((4, 8), blocks=1),
                                   lambda: TinyTransformer()])
def test_unsupported_structures_raise_clear_errors(model):
    with pytest.raises(UnsupportedFusionError, match="sequential chains"):
        ot_fusion([model(), model()])


def test_argument_errors():
    m = MLP((4, 5, 2))
    with pytest.raises(ValueError, match="needs a loader"):
        ot_fusion([m, m], cost="activation")
    with pytest.raises(ValueError, match="unknown solver"):
        ot_fusion([m, m], solver="nope")
    with pytest.raises(ValueError, match="at least two"):
        ot_fusion([m])
