"""Benchmark: ResNet-18 (11.2M parameters) -> ParameterGraph -> state dict.

Run: ``python benchmarks/convert.py [--threads 2] [--repeats 5] [--kernel edge]``

Prints the median wall time of each direction (tracing and analysis included in "to graph"),
the analysis alone, and conversion of a second checkpoint with a cached analysis
(``ParameterGraph.from_state_dict``), as used for model zoos.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import median_time  # benchmarks/ is on sys.path

from graphspace.graphs import ParameterGraph, analyze
from graphspace.testing.models import resnet18


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernel", default="edge", choices=["edge", "channel"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = resnet18()
    n_params = sum(p.numel() for p in model.parameters())
    g = ParameterGraph.from_module(model, kernel=args.kernel)
    t_to = median_time(lambda: ParameterGraph.from_module(model, kernel=args.kernel), args.repeats)
    t_an = median_time(lambda: analyze(model), args.repeats)
    a = analyze(model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    t_cached = median_time(lambda: ParameterGraph.from_state_dict(sd, a, kernel=args.kernel),
                     args.repeats)
    t_back = median_time(g.to_state_dict, args.repeats)
    back = g.to_state_dict()
    exact = all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads={args.threads}")
    print(f"ResNet-18: {n_params / 1e6:.2f}M parameters, graph: {g.num_nodes} nodes, "
          f"{g.num_edges / 1e6:.2f}M edges (kernel={args.kernel}), exact round trip: {exact}")
    print(f"{'step':<36}{'median s':>10}")
    print(f"{'model -> graph (trace + analysis)':<36}{t_to:>10.3f}")
    print(f"{'  of which analysis (fx trace)':<36}{t_an:>10.3f}")
    print(f"{'state dict -> graph (cached analysis)':<36}{t_cached:>10.3f}")
    print(f"{'graph -> state dict':<36}{t_back:>10.3f}")
    print("reference (GMN construction, 2 cores): 0.85 s to graph, 0.014 s back; "
          "targets: <= 0.3 s, <= 0.05 s")


if __name__ == "__main__":
    main()
