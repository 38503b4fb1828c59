"""torchvision models built from their classes (no download). CI installs torchvision into a
side folder (`GRAPHSPACE_TORCHVISION_PATH`, see `.ci/run`): the registry's wheel is built for
CUDA torch and would break `import torchmetrics` over CI's CPU torch."""

import pytest
import torch

from graphspace.graphs import ParameterGraph, permutation_groups
from graphspace.testing import assert_permutation_invariant
from graphspace.testing.models import import_torchvision_models

try:
    tvm = import_torchvision_models()
except ImportError as err:
    pytest.skip(str(err), allow_module_level=True)


def _models():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    return {
        "vit": VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                 hidden_dim=32, mlp_dim=64, num_classes=5),
        "convnext": ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                             num_classes=5),
        "efficientnet_b0": tvm.efficientnet_b0(num_classes=5),
        "swin": SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                num_heads=[2, 4], window_size=[2, 2], num_classes=5),
        "resnet18": tvm.resnet18(num_classes=5),
        "mobilenet_v3_small": tvm.mobilenet_v3_small(num_classes=5),
    }


@pytest.mark.parametrize("name", ["vit", "convnext", "efficientnet_b0", "swin", "resnet18",
                                  "mobilenet_v3_small"])
def test_torchvision_round_trip_and_symmetries(name):
    torch.manual_seed(0)
    m = _models()[name].double().eval()
    with torch.no_grad():  # torchvision's init gives near-zero outputs: use larger weights
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    g = ParameterGraph.from_module(m, x)
    sd = g.to_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    groups = permutation_groups(g)
    assert groups
    if name == "vit":
        assert sum(1 for gr in groups if gr.num_heads) == 4
    if name == "swin":  # the relative-position bias tells heads apart: heads stay in place
        assert not any(gr.num_heads for gr in groups)
    assert_permutation_invariant(m, x, atol=1e-10, generator=torch.Generator().manual_seed(1),
                                 negative_control=name in ("vit", "convnext", "swin",
                                                           "resnet18"))


@pytest.mark.parametrize("name", ["vit", "convnext", "swin",
                                  pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_torchvision_merges_undo_a_random_permutation(name):
    from graphspace.graphs import permute_model
    from graphspace.merge import merge
    from graphspace.merge.api import align
    from graphspace.merge.ot_fusion import UnsupportedFusionError

    torch.manual_seed(0)
    m = _models()[name].double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    b, _ = permute_model(m, generator=torch.Generator().manual_seed(3), example_input=x)
    assert any(not torch.equal(v, m.state_dict()[k]) for k, v in b.state_dict().items())
    aligned, res = align(m, b, "weight_matching")
    with torch.no_grad():  # a found permutation is a symmetry: B's function is kept
        assert (aligned(x) - m(x)).abs().max() < 1e-9
    if name != "efficientnet_b0":
        merged = merge([m, b], "weight_matching")
        for k, v in merged.state_dict().items():  # B aligned back onto A exactly
            assert torch.allclose(v, m.state_dict()[k], atol=1e-12), k
    # EfficientNet-B0 (16 MBConv blocks): Git Re-Basin's coordinate descent from the identity
    # stops in a local optimum (objective 36,266 against 61,767 at the true permutation, from
    # which it does not move); docs/merging.md says so.
    merged = merge([m, b], "activation_matching", loader=[x])
    with torch.no_grad():
        assert (merged(x) - m(x)).abs().max() < 1e-8
    try:
        merge([m, b], "ot_fusion")
    except UnsupportedFusionError as err:
        assert "permutation group" in str(err)
