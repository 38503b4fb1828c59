"""``graphspace merge A B [C ...] --model pkg.module:Factory --method ... -o merged.safetensors``.

Checkpoints are safetensors files or ``torch.save`` state dicts, loaded with
``torch.load(weights_only=True)``: a checkpoint that needs code to be unpickled is refused. The
merged state dict is written atomically (a temporary file in the output's directory, then
``os.replace``), as safetensors for a ``.safetensors`` path and with ``torch.save`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from graphspace.merge.api import METHODS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graphspace merge",
        description="Merge checkpoints of one architecture (Git Re-Basin, OT fusion, ...).")
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (.safetensors or "
                   "torch.save state dicts); the first is the reference")
    p.add_argument("--model", required=True, help="model factory, package.module:Factory")
    p.add_argument("--model-kwargs", action="append", default=None, metavar="JSON",
                   help="JSON keyword arguments of the factory; give it once for all models or "
                        "once per checkpoint (models of different widths, ot_fusion)")
    p.add_argument("--method", default="weight_matching", choices=METHODS)
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="averaging weights, one per checkpoint (uniform by default)")
    p.add_argument("--repair", default="none", choices=["none", "bn_reset", "repair"])
    p.add_argument("--data", default=None, metavar="pkg.module:factory",
                   help="callable returning a DataLoader/iterable of batches or a "
                        "LightningDataModule (its train loader is used); needed by "
                        "activation_matching, ste, --ot-cost activation and repairs")
    p.add_argument("--data-kwargs", default="{}", metavar="JSON")
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
    p.add_argument("-o", "--output", required=True, help="output file (.safetensors or .pt)")
    return p


def _data(spec: str | None, kwargs: dict[str, Any]) -> Any:
    if spec is None:
        return None
    import lightning.pytorch as pl

    from graphspace.io import import_object

    obj = import_object(spec)
    data = obj(**kwargs) if callable(obj) else obj
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit")
        return data.train_dataloader()
    return data


def _run(a: argparse.Namespace) -> int:
    from graphspace.graphs import (
        ArchitectureMismatchError,
        NonFiniteWeightError,
        analyze,
        check_state_dict,
    )
    from graphspace.graphs.parameter_graph import non_finite_keys
    from graphspace.io import build_model, load_state_dict, save_state_dict
    from graphspace.merge.api import merge

    n = len(a.checkpoints)
    if n < 2:
        raise ValueError("give at least two checkpoints")
    kw = [json.loads(s) for s in (a.model_kwargs or ["{}"])]
    if len(kw) not in (1, n):
        raise ValueError(f"--model-kwargs given {len(kw)} times for {n} checkpoints")
    kw = kw * n if len(kw) == 1 else kw
    models = []
    for i, (path, kwargs) in enumerate(zip(a.checkpoints, kw)):
        sd = load_state_dict(path, a.key)
        if a.strip_prefix:
            sd = {k[len(a.strip_prefix):] if k.startswith(a.strip_prefix) else k: v
                  for k, v in sd.items()}
        model = build_model(a.model, kwargs)
        try:
            check_state_dict(sd, analyze(model))
        except ArchitectureMismatchError as e:
            raise ArchitectureMismatchError(f"checkpoint {i} ('{path}'): {e}") from None
        bad = non_finite_keys(sd)
        if bad:
            raise NonFiniteWeightError(f"checkpoint {i} ('{path}'): NaN or Inf in {bad[:3]}")
        model.load_state_dict(sd)
        models.append(model.eval())
    loader = _data(a.data, json.loads(a.data_kwargs))
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
                   num_batches=a.num_batches, seed=a.seed, **extra)
    meta = {"graphspace.model": a.model, "graphspace.merge.method": a.method,
            "graphspace.merge.inputs": json.dumps(list(a.checkpoints))}
    save_state_dict(merged.state_dict(), a.output,
                    metadata=meta if str(a.output).endswith(".safetensors") else None)
    print(f"merged {n} checkpoints with {a.method} -> {a.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``graphspace merge`` (``argv`` without the ``merge`` word)."""
    from graphspace.graphs import GraphConversionError
    from graphspace.io import UntrustedCheckpointError

    try:
        a = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help or a usage error
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return _run(a)
    except (UntrustedCheckpointError, GraphConversionError, OSError, ValueError, ImportError,
            KeyError) as e:
        print(f"graphspace merge: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
