import pytest
import torch

from graphspace.graphs import ArchitectureMismatchError, apply_permutation, permute_model
from graphspace.merge import AlignmentSpec, align_state, invert, permuted_copy, weight_matching
from graphspace.merge.weight_matching import group_cost
from graphspace.testing.models import MLP, DepthwiseSeparableCNN, ResNet, TinyTransformer


def _arch(name, make_vgg, seed=0):
    torch.manual_seed(100 + seed)
    if name == "mlp":
        return MLP((8, 32, 32, 4)), torch.randn(6, 8)
    if name == "vgg":
        return make_vgg(8), torch.randn(4, 1, 8, 8)
    if name == "resnet":
        return ResNet((8, 16), blocks=2, in_channels=3), torch.randn(3, 3, 10, 10)
    if name == "depthwise":
        return DepthwiseSeparableCNN(3, 8, 5), torch.randn(3, 3, 8, 8)
    if name == "transformer":
        return TinyTransformer(in_dim=6, dim=32, heads=4), torch.randn(3, 5, 6)
    raise KeyError(name)


ARCHS = ["mlp", "vgg", "resnet", "depthwise", "transformer"]


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_recovers_exact_permutation(arch, seed, make_vgg):
    a, x = _arch(arch, make_vgg, seed)
    b, p = permute_model(a, generator=torch.Generator().manual_seed(seed))
    spec = AlignmentSpec(a)
    assert any(not torch.equal(v, torch.arange(len(v))) for v in p.values())
    res = weight_matching(a, b, spec=spec, seed=seed)
    assert res.converged and res.passes <= 5
    expected = invert(p)
    for name in p:
        assert torch.equal(res.perms[name], expected[name]), name
    aligned = align_state(spec, b.state_dict(), res.perms)
    for k, v in a.state_dict().items():
        assert torch.equal(aligned[k], v), k
    assert torch.allclose(_logits(permuted_copy(b, res.perms, spec), x), _logits(a, x),
                          atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_self_alignment_is_identity(arch, make_vgg):
    a, _ = _arch(arch, make_vgg)
    res = weight_matching(a, a)
    assert res.passes == 1
    for name, perm in res.perms.items():
        assert torch.equal(perm, torch.arange(perm.numel())), name


@pytest.mark.parametrize("arch", ARCHS)
def test_alignment_of_independent_models_keeps_function(arch, make_vgg):
    a, x = _arch(arch, make_vgg, 0)
    b, _ = _arch(arch, make_vgg, 1)
    spec = AlignmentSpec(a)
    res = weight_matching(a, b, spec=spec)
    assert any(not torch.equal(v, torch.arange(len(v))) for v in res.perms.values())
    aligned = permuted_copy(b, res.perms, spec)
    assert (_logits(aligned, x) - _logits(b, x)).abs().max() <= 1e-5
    # the objective grows monotonically and beats the unaligned inner product
    obj = res.objective
    assert all(y >= x_ - 1e-6 * abs(x_) for x_, y in zip(obj, obj[1:]))

    def inner(sd):
        return sum(float((a.state_dict()[k].double() * sd[k].double()).sum())
                   for k in spec.matched)

    assert inner(aligned.state_dict()) > inner(b.state_dict())
    assert inner(aligned.state_dict()) == pytest.approx(obj[-1], rel=1e-5)
    # negative control: B's function is not A's
    assert (_logits(aligned, x) - _logits(a, x)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_group_cost_is_the_objective_restricted_to_the_group(arch, make_vgg):
    """For every group P (others held at a random permutation), the assignment objective
    sum_i C[i, p(i)] changes exactly like <A, pi(B)> computed densely with apply_permutation:
    every parameter touching P (weights, biases, norms, conv kernels, flattened inputs,
    attention projections) enters the generic cost."""
    a, _ = _arch(arch, make_vgg, 0)
    b, _ = _arch(arch, make_vgg, 1)
    spec = AlignmentSpec(a)
    sa = {k: v.double() for k, v in a.state_dict().items()}
    sb = {k: v.double() for k, v in b.state_dict().items()}
    ca, cb = spec.canonical(sa, dtype=torch.float64), spec.canonical(sb, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    base = {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}

    def dense(perms):
        pb = apply_permutation(spec.analysis, sb, perms)
        return sum(float((sa[k] * pb[k]).sum()) for k in spec.matched)

    for gi, grp in enumerate(spec.groups):
        cost = group_cost(spec, gi, ca, cb, spec.node_map(base))
        rows = torch.arange(grp.size)
        p, q = torch.randperm(grp.size, generator=g), torch.randperm(grp.size, generator=g)
        lhs = dense({**base, grp.name: p}) - dense({**base, grp.name: q})
        rhs = float(cost[rows, p].sum() - cost[rows, q].sum())
        assert rhs == pytest.approx(lhs, rel=1e-9, abs=1e-9), grp.name
        assert abs(lhs) > 0  # non-trivial check


def test_mismatched_architectures_name_the_tensor():
    with pytest.raises(ArchitectureMismatchError, match="net.0.weight"):
        weight_matching(MLP((8, 16, 4)), MLP((8, 32, 4)))


def test_init_warm_start_and_max_passes(make_vgg):
    a, _ = _arch("mlp", make_vgg, 0)
    b, p = permute_model(a, generator=torch.Generator().manual_seed(3))
    res = weight_matching(a, b, init=invert(p))
    assert res.passes == 1 and all(torch.equal(res.perms[k], invert(p)[k]) for k in p)
    capped = weight_matching(a, _arch("mlp", make_vgg, 1)[0], max_passes=1)
    assert capped.passes == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_costs_match_cpu(make_vgg):
    a, _ = _arch("resnet", make_vgg, 0)
    b, _ = _arch("resnet", make_vgg, 1)
    cpu = weight_matching(a, b, device="cpu", dtype=torch.float64)
    gpu = weight_matching(a, b, device="cuda", dtype=torch.float64)
    for k in cpu.perms:
        assert torch.equal(cpu.perms[k], gpu.perms[k])
