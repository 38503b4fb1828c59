"""Model merging on scikit-learn's digits (offline): loss barriers and repaired accuracies.

Run from the repository root::

    PYTHONPATH=. python benchmarks/merge_digits.py --threads 2 [--pairs 3] [--plot merge.png]
    PYTHONPATH=. python benchmarks/merge_digits.py --save-endpoints datasets/merge_digits

For each pair of independently trained endpoints (seeds 2k, 2k+1):

* MLP 64-128-128-10: test loss barrier and midpoint loss/accuracy of naive interpolation,
  weight matching, activation matching and STE matching (Ainsworth et al. 2023); merged
  accuracy of OT fusion (Singh & Jaggi 2020); REPAIR (Jordan et al. 2022) on the naive and
  weight-matched midpoints;
* BatchNorm ResNet (widths 16, 32, one block per stage, projection shortcut) on 1x8x8 images:
  merged test accuracy before and after resetting BatchNorm statistics.

``--save-endpoints DIR`` writes the first MLP pair as ``DIR/mlp_seed{0,1}.safetensors`` for
``experiments/merge_ste_digits.yaml`` and exits.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from graphspace.io import save_state_dict
from graphspace.merge import (
    activation_matching,
    evaluate,
    interpolation_curve,
    merge,
    permuted_copy,
    plot_curves,
    ste_matching,
    weight_matching,
)
from graphspace.merge.digits import DigitsDataModule, train_classifier
from graphspace.testing.models import MLP, ResNet

MLP_SIZES = (64, 128, 128, 10)


def train_pair(make, dm: DigitsDataModule, k: int, epochs: int, lr: float) -> list:
    out = []
    for seed in (2 * k, 2 * k + 1):
        torch.manual_seed(seed)
        out.append(train_classifier(make(), dm.train_dataloader(), epochs=epochs, lr=lr,
                                    seed=seed))
    return out


def mlp_rows(k: int, dm: DigitsDataModule, lambdas: int, ste_epochs: int,
             curves: dict | None) -> dict[str, float]:
    a, b = train_pair(lambda: MLP(MLP_SIZES), dm, k, epochs=30, lr=1e-3)
    test, train = dm.test_dataloader(), dm.train_dataloader(shuffle=False)
    row: dict[str, float] = {}
    row["acc A"], row["acc B"] = evaluate(a, test)[1], evaluate(b, test)[1]
    t = time.perf_counter()
    wm = weight_matching(a, b)
    row["wm seconds"] = time.perf_counter() - t
    row["wm passes"] = wm.passes
    am = activation_matching(a, b, train)
    ste = ste_matching(a, b, dm.train_dataloader(), epochs=ste_epochs, lr=1e-3,
                       optimizer="adam", val_loader=dm.val_dataloader(), seed=k)
    for name, bb in (("naive", b), ("weight matching", permuted_copy(b, wm.perms)),
                     ("activation matching", permuted_copy(b, am.perms)),
                     ("STE", permuted_copy(b, ste.perms))):
        c = interpolation_curve(a, bb, test, lambdas)
        row[f"{name} barrier"] = c.barrier
        row[f"{name} mid loss"] = c.midpoint_loss
        row[f"{name} mid acc"] = c.midpoint_accuracy or 0.0
        if curves is not None:
            curves[name] = c
    ot = merge([a, b], "ot_fusion")
    row["OT fusion loss"], row["OT fusion acc"] = evaluate(ot, test)
    for method in ("average", "weight_matching"):
        rep = merge([a, b], method, loader=train, repair="repair")
        row[f"REPAIR {method} loss"], row[f"REPAIR {method} acc"] = evaluate(rep, test)
    return row


def resnet_rows(k: int, dm: DigitsDataModule) -> dict[str, float]:
    a, b = train_pair(lambda: ResNet((16, 32), blocks=1, in_channels=1), dm, k, epochs=8,
                      lr=3e-3)
    test, train = dm.test_dataloader(), dm.train_dataloader(shuffle=False)
    row: dict[str, float] = {"acc A": evaluate(a, test)[1], "acc B": evaluate(b, test)[1]}
    for method in ("average", "weight_matching", "activation_matching"):
        plain = merge([a, b], method, loader=train)
        reset = merge([a, b], method, loader=train, repair="bn_reset")
        row[f"{method} acc"] = evaluate(plain, test)[1]
        row[f"{method} + BN reset acc"] = evaluate(reset, test)[1]
    return row


def summarize(title: str, rows: list[dict[str, float]]) -> str:
    lines = [f"{title} ({len(rows)} endpoint pairs; mean ± std)", "", "| quantity | value |",
             "|---|---|"]
    for key in rows[0]:
        vals = [r[key] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {key} | {statistics.mean(vals):.4f} ± {sd:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3, help="independent endpoint pairs")
    p.add_argument("--lambdas", type=int, default=11)
    p.add_argument("--ste-epochs", type=int, default=30)
    p.add_argument("--plot", default=None, help="PNG of the first MLP pair's curves")
    p.add_argument("--save-endpoints", default=None, metavar="DIR")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    flat = DigitsDataModule(batch_size=128)
    flat.setup()
    if a.save_endpoints:
        out = Path(a.save_endpoints)
        for i, m in enumerate(train_pair(lambda: MLP(MLP_SIZES), flat, 0, 30, 1e-3)):
            save_state_dict(m.state_dict(), out / f"mlp_seed{i}.safetensors")
        print(f"wrote {out}/mlp_seed0.safetensors and mlp_seed1.safetensors")
        return
    images = DigitsDataModule(batch_size=128, flat=False)
    images.setup()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads={a.threads}")
    t0 = time.perf_counter()
    curves: dict = {}
    mlp = [mlp_rows(k, flat, a.lambdas, a.ste_epochs, curves if k == 0 else None)
           for k in range(a.pairs)]
    res = [resnet_rows(k, images) for k in range(a.pairs)]
    print(summarize(f"MLP {'-'.join(map(str, MLP_SIZES))}, digits test split", mlp))
    print()
    print(summarize("BatchNorm ResNet (16, 32), digits test split", res))
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if a.plot:
        plot_curves(curves, a.plot, title="MLP on digits: test loss along the segment")


if __name__ == "__main__":
    main()
