"""Benchmark: model -> ParameterGraph -> state dict, for ResNet-18 and GPT-2 small.

Run: ``python benchmarks/convert.py [--model resnet18|gpt2|both] [--threads 2] [--repeats 5]``

Prints median wall seconds of

* the analysis without its cache (``torch.export`` + the walk + solving the symmetries): what
  the first conversion of an architecture costs;
* model -> graph with the architecture cached (what every further model of a zoo costs);
* state dict -> graph with an analysis in hand (``ParameterGraph.from_state_dict``);
* graph -> state dict.

GPT-2 small (124M parameters, tied head) is built from ``transformers.GPT2Config()`` (no
download; needs the ``dev`` extra). Targets of issue 14: ResNet-18 to graph <= 0.3 s, GPT-2
small to graph <= 3 s including tracing, back <= 0.3 s.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import median_time  # benchmarks/ is on sys.path

from graphspace.graphs import ParameterGraph, analyze
from graphspace.testing.models import resnet18


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "resnet18":
        return resnet18().eval(), torch.randn(2, 3, 32, 32)
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(use_cache=False)).eval(), torch.randint(0, 50257, (1, 8))


def bench(name: str, repeats: int, kernel: str) -> None:
    torch.manual_seed(0)
    model, x = _model(name)
    n_params = sum(p.numel() for p in model.parameters())
    t_an = median_time(lambda: analyze(model, x, cache=False), repeats, warmup=True)
    g = ParameterGraph.from_module(model, x, kernel=kernel)
    t_to = median_time(lambda: ParameterGraph.from_module(model, x, kernel=kernel), repeats)
    a = analyze(model, x)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    t_cached = median_time(lambda: ParameterGraph.from_state_dict(sd, a, kernel=kernel),
                           repeats)
    t_back = median_time(g.to_state_dict, repeats)
    back = g.to_state_dict()
    exact = all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    print(f"{name}: {n_params / 1e6:.2f}M parameters, graph: {g.num_nodes} nodes, "
          f"{g.num_edges / 1e6:.2f}M edges (kernel={kernel}), exact round trip: {exact}")
    print(f"  {'step':<44}{'median s':>10}")
    print(f"  {'analysis, uncached (export + walk + groups)':<44}{t_an:>10.3f}")
    print(f"  {'model -> graph, architecture cached':<44}{t_to:>10.3f}")
    print(f"  {'state dict -> graph (analysis in hand)':<44}{t_cached:>10.3f}")
    print(f"  {'graph -> state dict':<44}{t_back:>10.3f}")
    print(f"  {'first conversion (uncached analysis + graph)':<44}{t_an + t_cached:>10.3f}")
    del g, back


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="both", choices=["resnet18", "gpt2", "both"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernel", default="edge", choices=["edge", "channel"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads={args.threads}")
    for name in (["resnet18", "gpt2"] if args.model == "both" else [args.model]):
        bench(name, args.repeats if name == "resnet18" else max(1, args.repeats // 2),
              args.kernel)
    print("targets (issue 14): ResNet-18 to graph <= 0.3 s; GPT-2 small to graph <= 3 s "
          "including tracing, back <= 0.3 s")


if __name__ == "__main__":
    main()
