"""Which neurons the analysis proves permutable, per model (the table in
``docs/supported-layers.md``).

Run: ``python benchmarks/coverage.py``

For each model: parameters, graph nodes, hidden neurons (neither model input nor output), the
fraction of hidden neurons inside a non-trivial permutation group, the groups (``h`` marks
head-structured ones) and the round trip. Hugging Face models are built from configs when
``transformers`` is installed (nothing is downloaded).
"""

from __future__ import annotations

import torch
from torch import nn

from graphspace.graphs import ParameterGraph, permutation_groups
from graphspace.testing.models import modern_models, reference_models


class _MainOutput(nn.Module):
    """A Hugging Face model's main output tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    out = dict(reference_models())
    out.update(modern_models())
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.Sequential(nn.Linear(5, 16), nn.TransformerEncoder(layer, 2,
                                                                 enable_nested_tensor=False),
                        nn.Linear(16, 3))
    out["nn.TransformerEncoder"] = (enc.eval(), torch.randn(2, 6, 5))
    try:
        import transformers as hf
    except ImportError:
        return out
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                 intermediate_size=64)
    tok = torch.randint(0, 50, (2, 8))
    out["hf GPT2LMHeadModel"] = (_MainOutput(hf.GPT2LMHeadModel(hf.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16, use_cache=False,
        bos_token_id=0, eos_token_id=0))).eval(), tok)
    out["hf BertForMaskedLM"] = (_MainOutput(hf.BertForMaskedLM(hf.BertConfig(
        vocab_size=50, max_position_embeddings=16, **small))).eval(), tok)
    out["hf ViTForImageClassification"] = (_MainOutput(hf.ViTForImageClassification(
        hf.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=5,
                     **small))).eval(), torch.randn(2, 3, 8, 8))
    return out


def row(name: str, m: nn.Module, x: torch.Tensor) -> str:
    g = ParameterGraph.from_module(m, x)
    sd = g.to_state_dict()
    exact = all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    groups = permutation_groups(g)
    hidden = int((g.node_role == 0).sum())
    grouped = sum(gr.size * len(gr.members) for gr in groups)
    heads = sum(1 for gr in groups if gr.num_heads)
    n_params = sum(p.numel() for p in m.parameters())
    return (f"| {name} | {n_params:,} | {g.num_nodes:,} | {hidden:,} | "
            f"{grouped / max(hidden, 1):.0%} | {len(groups)} ({heads} h) | "
            f"{'exact' if exact else 'DIFFERS'} |")


def main() -> None:
    print("| model | parameters | nodes | hidden neurons | in a permutation group | groups "
          "| round trip |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, (m, x) in models().items():
        print(row(name, m, x))


if __name__ == "__main__":
    main()
