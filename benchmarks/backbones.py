"""Benchmark: one forward + backward of GraphMetaNetwork per backbone on a zoo-sized batch.

Run: ``python benchmarks/backbones.py [--threads 2] [--repeats 5] [--batch 32] [--hidden 64]``

The batch holds ``--batch`` randomly initialised SmallCNN networks (the Small CNN Zoo
architecture: 59 neurons, 4,912 parameter edges each, ``kernel="edge"``); the model is
``GraphMetaNetwork(1, hidden, num_layers=4, backbone=name)`` in float32 with default
backbone options. Prints the median wall time of ``loss.backward()`` after a forward pass
(warm-up excluded), and the forward alone.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import median_time  # benchmarks/ is on sys.path
from torch_geometric.data import Batch

from graphspace.graphs import ParameterGraph
from graphspace.nn import BACKBONES, GraphMetaNetwork
from graphspace.testing.models import SmallCNN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = Batch.from_data_list(
        [ParameterGraph.from_module(SmallCNN()) for _ in range(args.batch)])
    print(f"torch {torch.__version__}, {platform.machine()}, threads={args.threads}; "
          f"batch of {args.batch} SmallCNN graphs: {batch.num_nodes} nodes, "
          f"{batch.num_edges} edges (x2 with reversed edges)")
    target = torch.zeros(args.batch, 1)
    print(f"{'backbone':<10} {'params':>8} {'forward s':>10} {'fwd+bwd s':>10}")
    for name in sorted(BACKBONES):
        net = GraphMetaNetwork(1, hidden_channels=args.hidden, num_layers=args.layers,
                               backbone=name)

        def step(net: GraphMetaNetwork = net) -> None:
            net.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(net(batch), target).backward()

        def fwd(net: GraphMetaNetwork = net) -> None:
            with torch.no_grad():
                net(batch)

        n_par = sum(q.numel() for q in net.parameters())
        print(f"{name:<10} {n_par:>8} {median_time(fwd, args.repeats):>10.3f} "
              f"{median_time(step, args.repeats):>10.3f}")


if __name__ == "__main__":
    main()
