"""Merging models as people write them today (GPTs, ViT, ConvNeXt, UNet, RNNs)."""

import pytest
import torch

from graphspace.graphs import permute_model
from graphspace.merge import merge
from graphspace.merge.ot_fusion import UnsupportedFusionError
from graphspace.merge.weight_matching import weight_matching
from graphspace.testing.models import modern_models

NAMES = sorted(modern_models())


def _pair(name):
    torch.manual_seed(0)
    m, x = modern_models()[name]
    m = m.double().eval()
    x = x.double() if x.is_floating_point() else x
    b, perms = permute_model(m, generator=torch.Generator().manual_seed(3), example_input=x)
    return m, b, x


@pytest.mark.parametrize("name", NAMES)
def test_weight_matching_undoes_a_random_permutation(name):
    m, b, x = _pair(name)
    with torch.no_grad():
        assert (b(x) - m(x)).abs().max() < 1e-10
    assert any(not torch.equal(v, m.state_dict()[k]) for k, v in b.state_dict().items())
    res = weight_matching(m, b)
    merged = merge([m, b], "weight_matching")
    for k, v in merged.state_dict().items():  # B aligned back onto A exactly
        assert torch.allclose(v, m.state_dict()[k], atol=1e-12), k
    assert res.converged


@pytest.mark.parametrize("name", ["nanogpt_untied", "vit", "lstm", "unet"])
def test_activation_matching_runs_and_keeps_the_function(name):
    m, b, x = _pair(name)
    merged = merge([m, b], "activation_matching", loader=[x])
    with torch.no_grad():
        assert (merged(x) - m(x)).abs().max() < 1e-8


@pytest.mark.parametrize("name", ["nanogpt_tied", "vit", "convnext", "lstm"])
def test_ot_fusion_names_what_it_cannot_fuse(name):
    m, b, _ = _pair(name)
    with pytest.raises(UnsupportedFusionError, match="permutation group"):
        merge([m, b], "ot_fusion")


def test_merging_gives_every_submodule_its_own_mode_back():
    """A wrapper in train mode around a model in eval mode (the usual way to wrap a Hugging
    Face model) must come back exactly so: `root.train(was)` would switch the inner model's
    dropout on."""
    m, x = modern_models()["nanogpt_untied"]
    wrapper = torch.nn.Sequential(m.double())  # root in train mode, inner model in eval
    assert wrapper.training and not m.training
    b, _ = permute_model(wrapper, generator=torch.Generator().manual_seed(3), example_input=x)
    for method in ("activation_matching", "weight_matching"):
        merge([wrapper, b], method, loader=[x])
        assert wrapper.training and not any(mod.training for mod in m.modules()), method
