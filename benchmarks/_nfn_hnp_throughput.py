"""Training throughput of the ``nfn`` package's HNP model in its predict-generalization setup.

Runs in its *own* environment (``torch`` and ``nfn`` only, no graphspace):
``PEER_PYTHON benchmarks/_nfn_hnp_throughput.py [--threads 2] [--json]``;
``benchmarks/throughput.py`` calls it and prints the result next to graphspace's.

Model: the invariant NFN of Zhou et al. 2023 ("Permutation Equivariant Neural Functionals")
as configured for predicting the generalization of Small CNN Zoo networks in the authors'
experiments (``predict_gen`` with ``nfnet=hnp_inv``): three ``HNPLinear`` layers of 16, 16
and 5 channels, each followed by ReLU, then ``HNPPool``, an MLP head of width 1000 (three
``Linear`` layers with ReLU) and a sigmoid, trained with binary cross-entropy and Adam
(lr 1e-3). Inputs: random weights of the Small CNN Zoo architecture (three 3x3
convolutions 1->16->16->16 and a dense 16->10 layer, PyTorch default initialisation) in
``nfn``'s ``WeightSpaceFeatures`` layout: weights ``(B, 1, out, in[, 3, 3])``, biases
``(B, 1, out)``.

One step is ``zero_grad`` + forward + backward + ``Adam.step`` on a fixed batch; the result is
the median step time over ``--repeats`` steps after ``--warmup`` steps, as networks/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
from nfn.layers import HNPLinear, HNPPool, TupleOp
from torch import nn

#: (in, out, kernel) of the Small CNN Zoo layers (kernel 0: dense)
SMALL_CNN = ((1, 16, 3), (16, 16, 3), (16, 16, 3), (16, 10, 0))


def zoo_batch(batch: int, seed: int = 0) -> WeightSpaceFeatures:
    """``batch`` randomly initialised Small CNN Zoo networks as ``WeightSpaceFeatures``."""
    torch.manual_seed(seed)
    weights: list[list[torch.Tensor]] = [[] for _ in SMALL_CNN]
    biases: list[list[torch.Tensor]] = [[] for _ in SMALL_CNN]
    for _ in range(batch):
        for i, (cin, cout, k) in enumerate(SMALL_CNN):
            layer = nn.Conv2d(cin, cout, k) if k else nn.Linear(cin, cout)
            weights[i].append(layer.weight.detach())
            biases[i].append(layer.bias.detach())
    return WeightSpaceFeatures(
        [torch.stack(w).unsqueeze(1) for w in weights],  # (B, 1, out, in[, h, w])
        [torch.stack(b).unsqueeze(1) for b in biases],  # (B, 1, out)
    )


def hnp_invariant_nfn(spec, hchannels: tuple[int, ...] = (16, 16, 5),
                      head_width: int = 1000) -> nn.Sequential:
    """The ``hnp_inv`` predictor: HNP layers with ReLU, HNP pooling, an MLP head, sigmoid."""
    layers: list[nn.Module] = []
    prev = 1
    for c in hchannels:
        layers += [HNPLinear(spec, in_channels=prev, out_channels=c), TupleOp(nn.ReLU())]
        prev = c
    pooled = prev * HNPPool.get_num_outs(spec)
    layers += [HNPPool(spec), nn.Flatten(start_dim=-2),
               nn.Linear(pooled, head_width), nn.ReLU(),
               nn.Linear(head_width, head_width), nn.ReLU(),
               nn.Linear(head_width, 1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = zoo_batch(args.batch)
    spec = network_spec_from_wsfeat(params)
    torch.manual_seed(1)
    net = hnp_invariant_nfn(spec)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    target = torch.rand(args.batch)
    loss_fn = nn.BCELoss()

    def step() -> None:
        opt.zero_grad()
        loss_fn(net(params).squeeze(-1), target).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    result = {
        "model": "nfn HNP invariant NFN (hchannels 16,16,5; MLP head 1000; sigmoid, BCE)",
        "nfn_version": _version("nfn"),
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "params": sum(q.numel() for q in net.parameters()),
        "step_s": med,
        "networks_per_s": args.batch / med,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"torch {torch.__version__}, {platform.machine()}, threads={args.threads}")
    print(f"{result['model']}: {result['params']} parameters, batch {args.batch}: "
          f"{med * 1e3:.1f} ms/step, {result['networks_per_s']:.0f} networks/s")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
