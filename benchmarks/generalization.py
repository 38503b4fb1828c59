"""Generalization prediction: graph metanetwork backbones vs StatNN / weight norms / flat MLP.

Run (resumable: finished runs are read back from ``--out`` and skipped)::

    python benchmarks/generalization.py --zoo digits --seeds 0 1 2
    python benchmarks/generalization.py --zoo hetero --seeds 0 1 2
    python benchmarks/generalization.py --summarize

For every (zoo, backbone, seed) a :class:`~graphspace.tasks.generalization.GeneralizationPredictor`
trains a ``GraphMetaNetwork`` with that backbone and, on the same batches, the baselines; each
predictor is tested at its own best validation epoch (Kendall tau). Zoos (generated offline if
missing, as the main job does):

* ``digits``: 400 Small CNNs (Small CNN Zoo space, scikit-learn digits), final checkpoints,
  Small CNN Zoo protocol split (200 test / 160 train / 40 val), ``kernel="channel"``;
* ``hetero``: 144 heterogeneous CNNs (CNN Wild Park format; depth 2-4, widths 4-16, kernels 3/5,
  6 activations, residuals, BatchNorm), checkpoints after epochs 1, 4, 8, split by network,
  ``kernel="channel"`` with kernels zero-padded to 5x5. The flat-weights baseline does not
  apply (architectures differ).

The baselines' numbers are taken from the ``metanet`` runs (they do not depend on the backbone).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from graphspace.data import CNNWildParkDataModule, SmallCNNZooDataModule
from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork
from graphspace.tasks.features import AttachWeightFeatures
from graphspace.tasks.generalization import GeneralizationPredictor

BACKBONES = ("metanet", "egnn", "sheaf", "unitary", "subgraph")


def make_data(zoo: str, root: str, seed: int) -> tuple[pl.LightningDataModule, int, tuple]:
    if zoo == "digits":
        dm = SmallCNNZooDataModule(
            root, epochs="final", kernel="channel", batch_size=32, eval_batch_size=64,
            generate=True, generate_kwargs={"num_models": 400, "seed": 0, "progress": False},
            transforms=[AttachWeightFeatures(max_tensors=8, flat=True)], seed=seed)
        return dm, 9, ("statnn", "norms", "flat")
    dm = CNNWildParkDataModule(
        root, epochs="all", kernel="channel", kernel_pad=[5, 5], batch_size=32,
        eval_batch_size=64, generate=True,
        generate_kwargs={"num_models": 144, "seed": 0, "progress": False},
        transforms=[AttachWeightFeatures(max_tensors=24)], seed=seed)
    return dm, 25, ("statnn", "norms")


def run_one(zoo: str, root: str, backbone: str, seed: int, epochs: int, hidden: int,
            layers: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm, edge_in, baselines = make_data(zoo, root, seed)
    net = GraphMetaNetwork(1, hidden_channels=hidden, num_layers=layers, backbone=backbone,
                           edge_in=edge_in)
    module = GeneralizationPredictor(net, baselines=baselines if backbone == "metanet" else (),
                                     lr=1e-3, select_best=True, lr_schedule="cosine")
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", deterministic=False)
    t = time.perf_counter()
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    res = module.results["test"]
    return {"zoo": zoo, "backbone": backbone, "seed": seed, "epochs": epochs,
            "hidden": hidden, "layers": layers, "seconds": time.perf_counter() - t,
            "params": sum(p.numel() for p in net.parameters()),
            "test": res, "best_val": {k: v["tau"] for k, v in module.best.items()}}


def summarize(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for zoo in ("digits", "hetero"):
        zr = [r for r in rows if r["zoo"] == zoo]
        if not zr:
            continue
        out += [f"\n{zoo} zoo (test split; mean ± std over seeds)",
                "| predictor | Kendall tau | R^2 | seeds | s / run |", "|---|---|---|---|---|"]
        preds: dict[str, list[dict[str, Any]]] = {}
        for r in zr:
            preds.setdefault(f"GMN ({r['backbone']})", []).append(
                {"tau": r["test"]["tau_gmn"], "r2": r["test"]["r2_gmn"], "s": r["seconds"]})
            for k in r["test"]:
                if k.startswith("tau_") and k != "tau_gmn":
                    n = k[4:]
                    preds.setdefault(n, []).append(
                        {"tau": r["test"][k], "r2": r["test"][f"r2_{n}"], "s": float("nan")})

        def ms(xs: list[float]) -> str:
            return (f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1
                    else f"{xs[0]:.3f}")

        for name, vals in preds.items():
            secs = [v["s"] for v in vals if v["s"] == v["s"]]
            out.append(f"| {name} | {ms([v['tau'] for v in vals])} | "
                       f"{ms([v['r2'] for v in vals])} | {len(vals)} | "
                       f"{statistics.mean(secs) if secs else float('nan'):.0f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", choices=("digits", "hetero"), default="digits")
    p.add_argument("--root", default=None, help="zoo directory (default datasets/<zoo>_...)")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/generalization_results.jsonl")
    p.add_argument("--summarize", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.summarize:
        print(summarize(out))
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    root = args.root or {"digits": "datasets/digits_cnn_zoo",
                         "hetero": "datasets/digits_hetero_zoo"}[args.zoo]
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["zoo"], r["backbone"], r["seed"], r["epochs"]))
    print(f"torch {torch.__version__}, {platform.machine()}, threads={args.threads}")
    for seed in args.seeds:
        for bb in args.backbones:
            if (args.zoo, bb, seed, args.epochs) in done:
                continue
            r = run_one(args.zoo, root, bb, seed, args.epochs, args.hidden, args.layers)
            print(json.dumps({k: v for k, v in r.items() if k != "best_val"}), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
    print(summarize(out))


if __name__ == "__main__":
    main()
