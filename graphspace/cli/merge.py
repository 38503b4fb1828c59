"""`graphspace merge A B [C ...] --model pkg.module:Factory --method ... -o merged.safetensors`.

Checkpoints are safetensors files or `torch.save` state dicts, loaded with
`torch.load(weights_only=True)`: a checkpoint that needs code to be unpickled is refused. The
merged state dict is written atomically (a temporary file in the output's directory, then
`os.replace`), as safetensors for a `.safetensors` path and with `torch.save` otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from graphspace.cli._common import (
    CLIError,
    add_model_arguments,
    build,
    load_checkpoint,
    model_specs,
    parse_mapping,
)

NAME = "merge"
HELP = "merge checkpoints of one architecture (Git Re-Basin, OT fusion, averaging, REPAIR)"
# graphspace.merge.api.METHODS, spelled out so that `--help` does not import torch (a test
# checks that both agree)
METHODS = ("weight_matching", "activation_matching", "ste", "ot_fusion", "average")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (.safetensors or "
                   "torch.save state dicts); the first is the reference")
    add_model_arguments(p, per_checkpoint=True)
    p.add_argument("--method", default="weight_matching", choices=METHODS)
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="averaging weights, one per checkpoint (uniform by default)")
    p.add_argument("--repair", default="none", choices=["none", "bn_reset", "repair"])
    p.add_argument("--data", default=None, metavar="CLASS_PATH",
                   help="callable returning a DataLoader/iterable of batches or a "
                        "LightningDataModule (its train loader is used); needed by "
                        "activation_matching, ste, --ot-cost activation and repairs")
    p.add_argument("--data-kwargs", default="{}", metavar="MAPPING")
    p.add_argument("--num-batches", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-passes", type=int, default=100, help="weight matching pass limit")
    p.add_argument("--device", default="auto", help="weight matching device (auto/cpu/cuda)")
    p.add_argument("--epochs", type=int, default=5, help="STE epochs")
    p.add_argument("--lr", type=float, default=1e-2, help="STE learning rate")
    p.add_argument("--ot-cost", default="weight", choices=["weight", "activation"])
    p.add_argument("--ot-solver", default="emd", choices=["emd", "sinkhorn"])
    p.add_argument("--ot-reg", type=float, default=1e-2)
    p.add_argument("--ot-marginals", default="uniform", choices=["uniform", "importance"])
    p.add_argument("--key", default=None, help="entry of the checkpoint holding the state dict")
    p.add_argument("--strip-prefix", default="", help="remove this prefix from checkpoint keys "
                   "(e.g. 'model.' for Lightning checkpoints)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge checkpoints holding NaN or Inf (refused by default; weight "
                        "matching refuses them regardless)")
    p.add_argument("--eval", default=None, metavar="CLASS_PATH",
                   help="evaluation data (a LightningDataModule, whose test loader is used, or "
                        "an iterable of (x, y) batches): prints the accuracies and loss barriers "
                        "and saves the interpolation plot next to the output")
    p.add_argument("--eval-kwargs", default="{}", metavar="MAPPING")
    p.add_argument("--eval-points", type=int, default=11,
                   help="interpolation points in [0, 1] for --eval (default 11)")
    p.add_argument("-o", "--output", required=True, help="output file (.safetensors or .pt)")


def _data(spec: str | None, kwargs: dict[str, Any], stage: str = "fit",
          flag: str = "--data") -> Any:
    if spec is None:
        return None
    import lightning.pytorch as pl

    from graphspace.io import import_object

    try:
        obj = import_object(spec)
    except ValueError as e:
        raise CLIError(f"{flag}: {e}") from None
    data = obj(**kwargs) if callable(obj) else obj
    if isinstance(data, pl.LightningDataModule):
        data.setup(stage)
        return data.train_dataloader() if stage == "fit" else data.test_dataloader()
    return data


def _evaluate(a: argparse.Namespace, models: list, merged: Any, loader: Any,
              extra: dict[str, Any]) -> None:
    """`--eval`: accuracies of the inputs and the merge, loss barriers along the straight
    lines A -> B (naive) and A -> aligned B, and their plot next to the output."""
    from graphspace.merge.api import align
    from graphspace.merge.interpolation import evaluate, interpolation_curve, plot_curves

    ev = _data(a.eval, parse_mapping(a.eval_kwargs, "--eval-kwargs"), stage="test",
               flag="--eval")
    n = a.num_batches

    def fmt(loss: float, acc: float | None) -> str:
        return f"loss {loss:.4f}" + ("" if acc is None else f", accuracy {acc:.4f}")

    for i, m in enumerate(models):
        print(f"  model {i} ({a.checkpoints[i]}): {fmt(*evaluate(m, ev, num_batches=n))}")
    print(f"  merged ({a.method}): {fmt(*evaluate(merged, ev, num_batches=n))}")
    if len(models) != 2:
        return
    curves = {"naive": interpolation_curve(models[0], models[1], ev, a.eval_points,
                                           num_batches=n)}
    if a.method in ("weight_matching", "activation_matching", "ste"):
        aligned, _ = align(models[0], models[1], a.method, loader=loader, num_batches=n,
                           seed=a.seed, **extra)
        curves[a.method] = interpolation_curve(models[0], aligned, ev, a.eval_points,
                                               num_batches=n)
    for label, c in curves.items():
        print(f"  loss barrier, {label}: {c.barrier:.4f}")
    stem = os.path.splitext(a.output)[0]
    plot_curves(curves, stem + ".interpolation.png",  # prints where it saved the plot
                title=f"{a.method}: {os.path.basename(a.output)}")


def _validate(a: argparse.Namespace) -> None:
    n = len(a.checkpoints)
    if n < 2:
        raise CLIError(f"give at least two checkpoints, got {n}")
    if a.weights is not None:
        if len(a.weights) != n:
            raise CLIError(f"--weights: {len(a.weights)} values for {n} checkpoints")
        if any(w < 0 for w in a.weights) or sum(a.weights) <= 0:
            raise CLIError(f"--weights must be non-negative with a positive sum, got "
                           f"{a.weights}")
    if a.eval_points < 2:
        raise CLIError(f"--eval-points must be >= 2, got {a.eval_points}")
    for name in ("num_batches", "max_passes", "epochs"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if a.method in ("activation_matching", "ste") or a.repair != "none" or \
            (a.method == "ot_fusion" and a.ot_cost == "activation"):
        if a.data is None:
            raise CLIError(f"--method {a.method} --repair {a.repair} needs --data")
    if not a.output.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
        raise CLIError(f"--output must end with .safetensors or .pt, got {a.output!r}")
    out_dir = os.path.dirname(os.path.abspath(a.output))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CLIError(f"--output: {out_dir!r} is not a directory")
    for path in a.checkpoints:
        if os.path.abspath(path) == os.path.abspath(a.output):
            raise CLIError(f"--output {a.output!r} is also an input checkpoint")
    if a.method == "ot_fusion":
        from graphspace.cli._common import require

        require("ot")


def run(a: argparse.Namespace) -> int:
    _validate(a)
    specs = model_specs(a, len(a.checkpoints))
    data_kwargs = parse_mapping(a.data_kwargs, "--data-kwargs")
    # every checkpoint is read and checked before any work
    models = []
    for i, (path, spec) in enumerate(zip(a.checkpoints, specs)):
        model = build(spec)
        sd = load_checkpoint(path, model, key=a.key, strip_prefix=a.strip_prefix,
                             allow_nonfinite=a.allow_nonfinite, label=f"{i} ")
        model.load_state_dict(sd)
        models.append(model.eval())
    from graphspace.io import save_state_dict
    from graphspace.merge.api import merge

    loader = _data(a.data, data_kwargs)
    extra: dict[str, Any] = {}
    if a.method == "weight_matching":
        extra = {"max_passes": a.max_passes, "device": a.device}
    elif a.method == "ste":
        extra = {"epochs": a.epochs, "lr": a.lr}
    elif a.method == "ot_fusion":
        extra = {"cost": a.ot_cost, "solver": a.ot_solver, "reg": a.ot_reg,
                 "marginals": a.ot_marginals}
    merged = merge(models, a.method, weights=a.weights, loader=loader,
                   repair=None if a.repair == "none" else a.repair,
                   num_batches=a.num_batches, seed=a.seed,
                   allow_nonfinite=a.allow_nonfinite, **extra)
    meta = {"graphspace.model": specs[0]["class_path"], "graphspace.merge.method": a.method,
            "graphspace.merge.inputs": json.dumps(list(a.checkpoints))}
    save_state_dict(merged.state_dict(), a.output,
                    metadata=meta if str(a.output).endswith(".safetensors") else None)
    print(f"merged {len(models)} checkpoints with {a.method} -> {a.output}")
    if a.eval is not None:
        _evaluate(a, models, merged, loader, extra)
    return 0
