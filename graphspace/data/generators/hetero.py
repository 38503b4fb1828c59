r"""A heterogeneous CNN zoo written in the CNN Wild Park format.

Each network is a [`WildParkCNN`][graphspace.data.WildParkCNN] whose architecture is drawn per
network (as the Neural Graphs CNN sampler: residual connections from any layer but the preceding
one, `padding = kernel // 2`, stride 1) plus per-layer BatchNorm and a learning rate:

- n_layers: 2, 3, 4
- channels: 4, 8, 16 (per layer)
- kernel_size: 3, 5 (per layer)
- activation: relu, gelu, tanh, sigmoid, leaky_relu, none (per layer)
- residual: -1 or any layer before the preceding one (per layer)
- norm: none, batch (per layer)
- lr: log-uniform [1e-3, 1e-2] (AdamW, no weight decay)

Networks train one after the other inside a chunk (different architectures cannot be batched)
on the full training set; checkpoints after the listed epochs are evaluated on the test set.
Output in `<out>/raw`: `checkpoints/member_<i>/epoch_<e>.pt` (`{"model", "config",
"last_result": {"test/acc", "test/loss", "train/acc", "train/loss"}, "iteration"}`, all plain
tensors and Python values) and `splits.json` (`path`, `score`, `step`, `run`; runs
split by network with `val_fraction` / `test_fraction`), readable with
`CNNWildPark(out)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graphspace.data._io import save_torch
from graphspace.data._io import write_file as atomic_write
from graphspace.data.generators.cnn import member_seed
from graphspace.data.generators.runner import Chunk, ZooJob, register_job, run_zoo
from graphspace.data.generators.sources import ImageSource, load_source
from graphspace.data.wild_park import WildParkCNN

__all__ = ["HETERO_SPACE", "HeteroZooJob", "generate_hetero_zoo", "sample_architecture"]

HETERO_SPACE: dict[str, Any] = {
    "n_layers": [2, 3, 4],
    "channels": [4, 8, 16],
    "kernel_size": [3, 5],
    "activation": ["relu", "gelu", "tanh", "sigmoid", "leaky_relu", "none"],
    "norm": ["none", "batch"],
    "residual": True,
    "lr": [1e-3, 1e-2],
}


def sample_architecture(space: Mapping[str, Any], seed: int, in_channels: int, n_classes: int
                        ) -> dict[str, Any]:
    """Draw one Wild Park configuration (plus `norm` and `lr`) with numpy seed `seed`."""
    rng = np.random.default_rng(seed)

    def pick(vals: Sequence[Any]) -> Any:
        v = vals[int(rng.integers(len(vals)))]
        return v.item() if hasattr(v, "item") else v

    n = int(pick(space["n_layers"]))
    ks = [int(pick(space["kernel_size"])) for _ in range(n)]
    residual = [-1] + [int(pick([-1, *range(i)])) if space.get("residual", True) else -1
                       for i in range(n - 1)]
    lo, hi = space["lr"]
    return {
        "n_layers": n, "n_classes": int(n_classes), "in_channels": int(in_channels),
        "channels": [int(in_channels)] + [int(pick(space["channels"])) for _ in range(n)],
        "kernel_size": ks, "stride": [1] * n, "padding": [k // 2 for k in ks],
        "residual": residual, "activation": [str(pick(space["activation"])) for _ in range(n)],
        "norm": [str(pick(space["norm"])) for _ in range(n)],
        "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
    }


def _evaluate(model: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        return (float((logits.argmax(1) == y).float().mean()),
                float(F.cross_entropy(logits, y)))


def train_network(cfg: Mapping[str, Any], seed: int, x_train: Tensor, y_train: Tensor,
                  x_test: Tensor, y_test: Tensor, checkpoints: Sequence[int], batch_size: int
                  ) -> list[dict[str, Any]]:
    """Train one Wild Park CNN; returns `{"epoch", "model", metrics...}` per checkpoint."""
    g = torch.Generator().manual_seed(seed)
    arch = {k: v for k, v in cfg.items() if k != "lr"}
    with torch.random.fork_rng(devices=[]):  # PyTorch's default init draws from the global RNG
        torch.manual_seed(seed)
        model = WildParkCNN(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=0.0)
    n = len(x_train)
    out = []
    last = max(checkpoints)
    for epoch in range(last + 1):
        if epoch in checkpoints:
            te_acc, te_loss = _evaluate(model, x_test, y_test)
            tr_acc, tr_loss = _evaluate(model, x_train, y_train)
            out.append({"epoch": epoch,
                        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "test/acc": te_acc, "test/loss": te_loss, "train/acc": tr_acc,
                        "train/loss": tr_loss})
        if epoch == last:
            break
        model.train()
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return out


@register_job
class HeteroZooJob(ZooJob):
    """Recipe, plan and output of a heterogeneous zoo (see
    [`generate_hetero_zoo`][graphspace.data.generators.hetero.generate_hetero_zoo])."""

    kind = "hetero"

    def __init__(self, source: ImageSource, num_models: int, seed: int,
                 checkpoints: Sequence[int], batch_size: int, chunk_size: int,
                 space: Mapping[str, Any], val_fraction: float, test_fraction: float) -> None:
        self.source = source
        self.num_models = int(num_models)
        self.seed = int(seed)
        self.checkpoints = sorted({int(c) for c in checkpoints})
        self.batch_size = int(batch_size)
        self.chunk_size = int(chunk_size)
        self.space = dict(space)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self._data: tuple[Tensor, Tensor] | None = None

    def recipe(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": "cnn_wild_park", "seed": self.seed,
                "num_models": self.num_models, "checkpoints": self.checkpoints,
                "batch_size": self.batch_size, "chunk_size": self.chunk_size,
                "space": self.space, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "data": self.source.describe()}

    @classmethod
    def plan_from_recipe(cls, recipe: dict[str, Any]) -> list[Chunk]:
        d = recipe["data"]
        cin, ncls = int(d["shape"][0]), int(d["num_classes"])
        cfgs = [sample_architecture(recipe["space"], member_seed(int(recipe["seed"]), i), cin,
                                    ncls) for i in range(int(recipe["num_models"]))]
        cs = int(recipe["chunk_size"])
        n = len(cfgs)
        return [Chunk(j, list(range(s, min(s + cs, n))), {"configs": cfgs[s:s + cs]})
                for j, s in enumerate(range(0, n, cs))]

    def run_chunk(self, chunk: Chunk) -> dict[str, Any]:
        if self._data is None:
            self._data = self.source.scaled(-1.0, 1.0)
        x_tr, x_te = self._data
        nets = []
        for i, cfg in zip(chunk.members, chunk.payload["configs"]):
            nets.append(train_network(cfg, member_seed(self.seed, i), x_tr, self.source.y_train,
                                      x_te, self.source.y_test, self.checkpoints,
                                      self.batch_size))
        return {"networks": nets}

    @classmethod
    def finalize(cls, out: Path, recipe: dict[str, Any], plan: Sequence[Chunk],
                 results: Sequence[dict[str, Any]]) -> None:
        raw = out / "raw"
        n = int(recipe["num_models"])
        perm = np.random.default_rng(member_seed(int(recipe["seed"]), 9)).permutation(n)
        n_test = int(round(float(recipe["test_fraction"]) * n))
        n_val = int(round(float(recipe["val_fraction"]) * n))
        split_of = {}
        for rank, i in enumerate(perm.tolist()):
            split_of[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        splits: dict[str, dict[str, list[Any]]] = {
            s: {"path": [], "score": [], "step": [], "run": []} for s in ("train", "val", "test")}
        for chunk, res in zip(plan, results):
            for i, cfg, ckpts in zip(chunk.members, chunk.payload["configs"], res["networks"]):
                for c in ckpts:
                    rel = f"checkpoints/member_{i:05d}/epoch_{c['epoch']:03d}.pt"
                    obj = {"model": c["model"], "config": cfg, "iteration": c["epoch"],
                           "last_result": {k: c[k] for k in ("test/acc", "test/loss",
                                                              "train/acc", "train/loss")}}
                    save_torch(raw / rel, obj)
                    e = splits[split_of[i]]
                    e["path"].append(rel)
                    e["score"].append(c["test/acc"])
                    e["step"].append(c["epoch"])
                    e["run"].append(f"member_{i:05d}")
        text = json.dumps(splits)
        atomic_write(raw / "splits.json", lambda p: Path(p).write_text(text))


def generate_hetero_zoo(
    out: str | Path,
    num_models: int = 48,
    seed: int = 0,
    data: str | ImageSource | None = "digits",
    checkpoints: Sequence[int] = (1, 4, 8),
    batch_size: int = 64,
    chunk_size: int = 4,
    space: Mapping[str, Any] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    shard: str | tuple[int, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Any:
    """Generate (or resume) a heterogeneous CNN zoo in the CNN Wild Park format in
    `out/raw` (read it with `CNNWildPark(out)`).

    Args:
        out: output directory.
        num_models: number of networks.
        seed: zoo seed (architectures, initialisations, shuffling, split).
        data: `"digits"` (offline), an `ImageSource` or a tensor file.
        checkpoints: epochs saved (0 = initialisation).
        batch_size: minibatch size.
        chunk_size: networks per chunk (resume granularity).
        space: architecture space (default `HETERO_SPACE`; entries override).
        val_fraction, test_fraction: split of the networks.
        shard, workers, progress: see `run_zoo`.
    """
    src = load_source(data)
    sp = dict(HETERO_SPACE)
    sp.update(space or {})
    job = HeteroZooJob(src, num_models, seed, checkpoints, batch_size, chunk_size, sp,
                       val_fraction, test_fraction)
    return run_zoo(job, out, shard=shard, workers=workers, progress=progress)
