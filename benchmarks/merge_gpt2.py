"""Weight matching of two GPT-2-small models (124M parameters, from configs): every group.

Run: ``python benchmarks/merge_gpt2.py [--layers 12] [--threads 2]``

Two independently initialised ``GPT2LMHeadModel(GPT2Config())`` (seeds 0 and 1; nothing is
downloaded, needs the ``dev`` extra) are aligned with :func:`graphspace.merge.weight_matching`
over every permutation group the analysis proves: the residual stream (tied to the embedding
and the tied head), per-layer attention q/k and v (heads as blocks, coordinates within heads)
and the MLPs. Printed: the groups, seconds for the spec (export + analysis + slots) and for the
matching, passes, and a correctness run: B := A with every group permuted at random must be
aligned back bit for bit. Target of issue 14: <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from graphspace.graphs import permute_model
from graphspace.merge import AlignmentSpec, weight_matching


class Logits(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x).logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = GPT2Config(use_cache=False, n_layer=args.layers)
    torch.manual_seed(0)
    a = Logits(GPT2LMHeadModel(cfg).eval())
    torch.manual_seed(1)
    b = Logits(GPT2LMHeadModel(cfg).eval())
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads={args.threads}; GPT-2 with {args.layers} layers, "
          f"{sum(q.numel() for q in a.parameters()) / 1e6:.1f}M parameters")
    t = time.perf_counter()
    from graphspace.graphs import analyze

    spec = AlignmentSpec(analyze(a, x))
    t_spec = time.perf_counter() - t
    heads = sum(1 for g in spec.groups if g.num_heads)
    print(f"groups: {len(spec.groups)} ({heads} head-structured), sizes "
          f"{sorted({g.size for g in spec.groups})}")
    t = time.perf_counter()
    res = weight_matching(a, b, spec=spec)
    t_match = time.perf_counter() - t
    print(f"independent models: spec {t_spec:.1f} s, matching {t_match:.1f} s "
          f"({res.passes} passes), total {t_spec + t_match:.1f} s")
    bp, _ = permute_model(a, generator=torch.Generator().manual_seed(2), example_input=x)
    t = time.perf_counter()
    res = weight_matching(a, bp, spec=spec)
    t_exact = time.perf_counter() - t
    from graphspace.graphs import apply_permutation

    aligned = apply_permutation(spec.analysis, bp.state_dict(), res.perms)
    exact = all(torch.equal(aligned[k], v) for k, v in a.state_dict().items())
    print(f"permuted copy: aligned back exactly: {exact} ({res.passes} passes, {t_exact:.1f} s)")
    print("target (issue 14): <= 60 s for all groups on 2 cores")


if __name__ == "__main__":
    main()
