"""Hugging Face GPT-2, BERT and ViT built from configs (nothing is downloaded)."""

import pytest
import torch

from graphspace.graphs import ParameterGraph, permutation_groups
from graphspace.testing import assert_permutation_invariant

transformers = pytest.importorskip("transformers")


class _Logits(torch.nn.Module):
    """The model's main output tensor (HF models return ModelOutput objects)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _models():
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                 intermediate_size=64)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16, use_cache=False,
        bos_token_id=0, eos_token_id=0))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, max_position_embeddings=16, **small), add_pooling_layer=False)
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, **small), add_pooling_layer=False)
    tok = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    img = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return {"gpt2": (gpt2, tok), "bert": (bert, tok), "vit": (vit, img.double())}


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_hf_model_round_trip_and_symmetries(name):
    torch.manual_seed(0)
    m, x = _models()[name]
    m = _Logits(m.double().eval())
    g = ParameterGraph.from_module(m, x)
    sd, ref = g.to_state_dict(), m.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    groups = permutation_groups(g)
    assert sum(1 for gr in groups if gr.num_heads == 4) == 4  # q/k and v of both layers
    if name == "gpt2":  # its residual stream ends in the tied head: permutable
        assert any(len(gr.members) > 8 for gr in groups)
        assert any(r.kind == "alias" for r in g.spec.records)
    assert_permutation_invariant(m, x, atol=1e-10, generator=torch.Generator().manual_seed(2),
                                 negative_control=x.is_floating_point())


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_hf_weight_matching_undoes_a_random_permutation(name):
    from graphspace.graphs import permute_model
    from graphspace.merge import merge
    from graphspace.merge.ot_fusion import UnsupportedFusionError

    torch.manual_seed(0)
    m, x = _models()[name]
    m = _Logits(m.double().eval())
    b, _ = permute_model(m, generator=torch.Generator().manual_seed(3), example_input=x)
    assert any(not torch.equal(v, m.state_dict()[k]) for k, v in b.state_dict().items())
    merged = merge([m, b], "weight_matching")
    for k, v in merged.state_dict().items():  # B aligned back onto A exactly
        assert torch.allclose(v, m.state_dict()[k], atol=1e-12), k
    merged = merge([m, b], "activation_matching", loader=[x])
    with torch.no_grad():
        assert (merged(x) - m(x)).abs().max() < 1e-8
    with pytest.raises(UnsupportedFusionError, match="permutation group"):
        merge([m, b], "ot_fusion")
