r"""Merging as a Lightning task: align or fuse checkpoints, then evaluate the merge and barrier.

`MergeEvaluation` runs one merging method (weight matching, activation matching,
OT fusion or naive averaging, optionally followed by BatchNorm reset or REPAIR) from a
LightningCLI YAML, so merging experiments are configured and logged like every other task:

```bash
graphspace test --config experiments/merge_wm_digits.yaml
```

On `test` it loads the endpoint checkpoints (training them first on the datamodule's train
split when `train_missing=True` and a file is missing), merges them on the train split, and
reports on the test split: the loss and accuracy of each endpoint, of the naive average and of
the merged model, and the loss barrier (Frankle et al. 2020; Ainsworth et al. 2023, eq. 1)

$$
B(\theta_A, \theta_B) = \max_{\lambda} \Big[ L(\theta_\lambda)
    - \big((1 - \lambda) L(\theta_A) + \lambda L(\theta_B)\big) \Big]
$$

of the naive and of the aligned interpolation path (two-model merges). The curves are saved as
a PNG next to the results when matplotlib is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphspace.merge._utils import batch_input, batch_target, state_of
from graphspace.merge.api import METHODS, REPAIRS, align, merge
from graphspace.merge.interpolation import interpolation_curve, plot_curves
from graphspace.tasks.outputs import PredictionsFile

_TASK_METHODS = tuple(m for m in METHODS if m != "ste")  # STE is its own task (STEMatching)


class MergeEvaluation(PredictionsFile, pl.LightningModule):
    r"""Merge checkpoints with one method and evaluate the result (run with `test`).

    Args:
        model: model factory `"package.module:Factory"`.
        checkpoints: two or more checkpoint paths (safetensors or `torch.save`, loaded with
            `weights_only=True`); the first is the reference the others are aligned to.
        model_kwargs: keyword arguments of the factory.
        method: `"weight_matching"`, `"activation_matching"`, `"ot_fusion"` or
            `"average"` (see `graphspace.merge.merge`).
        method_kwargs: extra arguments of the method (e.g. `max_passes`, `solver`).
        repair: `None`, `"bn_reset"` or `"repair"`.
        lambdas: number of interpolation points for the barrier (default 11).
        num_batches: limit the train batches used for matching / repair.
        seed: seed of randomised steps (weight-matching group order).
        train_missing: train endpoints whose checkpoint file does not exist (Adam,
            `endpoint_epochs` epochs, endpoint `i` initialised with seed
            `endpoint_seed + i`) and save them atomically at that path.
        endpoint_epochs: epochs of that training (default 30).
        endpoint_lr: learning rate of that training (default `1e-3`).
        endpoint_seed: first initialisation seed (default 0).
        output: if set, the merged state dict is written there (atomically).
        plot: PNG path of the interpolation curves (default: `<log_dir>/interpolation.png`);
            the path written is printed and kept in `plot_path`.

    `predict` (e.g. `graphspace predict --config experiments/merge_wm_digits.yaml`) merges
    the same way (no barrier) and writes `predictions.csv` (or `.parquet`) to the run
    directory: one row per sample of the datamodule's predict (else test) loader with the
    `target`, and for every model (`merged`, `naive_average`, `endpoint_<i>`) its
    predicted class `pred_<model>` and cross-entropy `loss_<model>`.
    """

    def __init__(
        self,
        model: str,
        checkpoints: list[str],
        model_kwargs: dict[str, Any] | None = None,
        method: str = "weight_matching",
        method_kwargs: dict[str, Any] | None = None,
        repair: str | None = None,
        lambdas: int = 11,
        num_batches: int | None = None,
        seed: int = 0,
        train_missing: bool = False,
        endpoint_epochs: int = 30,
        endpoint_lr: float = 1e-3,
        endpoint_seed: int = 0,
        output: str | None = None,
        plot: str | None = None,
    ) -> None:
        super().__init__()
        if method not in _TASK_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {_TASK_METHODS} "
                             "(STE matching is graphspace.merge.ste.STEMatching)")
        if repair not in REPAIRS:
            raise ValueError(f"unknown repair {repair!r}; choose None, 'bn_reset' or 'repair'")
        if len(checkpoints) < 2:
            raise ValueError("MergeEvaluation needs at least two checkpoints")
        self.save_hyperparameters()
        self.factory, self.model_kwargs = model, dict(model_kwargs or {})
        self.checkpoints = [str(c) for c in checkpoints]
        self.method, self.method_kwargs = method, dict(method_kwargs or {})
        self.repair, self.lambdas, self.num_batches, self.seed = repair, lambdas, num_batches, seed
        self.train_missing = train_missing
        self.endpoint_epochs, self.endpoint_lr = endpoint_epochs, endpoint_lr
        self.endpoint_seed = endpoint_seed
        self.output, self.plot = output, plot
        self.endpoints: list[nn.Module] = []
        self.merged: nn.Module | None = None
        self._sums: dict[str, list[float]] = {}
        self.results: dict[str, float] = {}
        self.plot_path: Path | None = None
        # a parameter so Lightning has something to place on the device; never trained
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    # -- endpoints and merge ----------------------------------------------------------------
    def _build(self, seed: int | None = None) -> nn.Module:
        from graphspace.io import build_model

        if seed is not None:
            torch.manual_seed(seed)
        return build_model(self.factory, self.model_kwargs)

    def _endpoint(self, i: int, path: str, train_loader: Any) -> nn.Module:
        from graphspace.io import load_state_dict, save_state_dict

        if not os.path.exists(path):
            if not self.train_missing:
                raise FileNotFoundError(f"checkpoint {path!r} does not exist (set "
                                        "train_missing: true to train the endpoints first)")
            from graphspace.merge.digits import train_classifier

            m = train_classifier(self._build(self.endpoint_seed + i), train_loader,
                                 epochs=self.endpoint_epochs, lr=self.endpoint_lr,
                                 seed=self.endpoint_seed + i)
            save_state_dict(m.state_dict(), path)
            print(f"trained endpoint {i} -> {path}")
        m = self._build()
        m.load_state_dict(load_state_dict(path))
        return m.eval()

    def setup(self, stage: str) -> None:
        # runs before Lightning enters inference mode: endpoint training needs autograd
        if stage not in ("test", "predict"):
            raise ValueError("MergeEvaluation runs with `graphspace test` / `graphspace "
                             f"predict` (Trainer.test / predict), got stage {stage!r}")
        self.predict_on_test_loader(stage)
        dm = self.trainer.datamodule  # type: ignore[attr-defined]
        if dm is None:
            raise ValueError("MergeEvaluation needs a datamodule with train and test loaders")
        if hasattr(dm, "setup"):
            dm.setup("fit")
        train = dm.train_dataloader()
        self.endpoints = [self._endpoint(i, p, train) for i, p in enumerate(self.checkpoints)]
        need_data = self.method == "activation_matching" or self.repair is not None or \
            self.method_kwargs.get("cost") == "activation"
        self.merged = merge(self.endpoints, self.method, loader=train if need_data else None,
                            repair=self.repair, num_batches=self.num_batches, seed=self.seed,
                            **self.method_kwargs).eval()
        self.naive = merge(self.endpoints, "average").eval()
        if self.output:
            from graphspace.io import save_state_dict

            save_state_dict(state_of(self.merged), self.output)
            print(f"merged model -> {self.output}")
        self.results = {}
        if stage == "test" and len(self.endpoints) == 2 and self.method != "ot_fusion":
            self._barriers(train, dm.test_dataloader())

    def _to_device(self) -> None:
        assert self.merged is not None
        self.endpoints = [m.to(self.device) for m in self.endpoints]
        self.merged, self.naive = self.merged.to(self.device), self.naive.to(self.device)

    def on_test_start(self) -> None:
        self._to_device()
        self._sums = {}

    def on_predict_start(self) -> None:
        self._to_device()

    def _models(self) -> list[tuple[str, nn.Module]]:
        assert self.merged is not None
        return [("merged", self.merged), ("naive_average", self.naive),
                *((f"endpoint_{i}", m) for i, m in enumerate(self.endpoints))]

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, Tensor]:
        """Per-sample predictions of the merged model, the naive average and the endpoints.

        Returns:
            `{"target": [B], "pred_<model>": [B], "loss_<model>": [B], ...}` for the models
            `merged`, `naive_average`, `endpoint_<i>` (per-sample cross-entropy).
        """
        x, y = batch_input(batch), batch_target(batch)
        out: dict[str, Tensor] = {}
        if y is not None:
            out["target"] = y
        for name, m in self._models():
            logits = m(x)
            out[f"pred_{name}"] = logits.argmax(-1)
            if y is not None:
                out[f"loss_{name}"] = F.cross_entropy(logits.float(), y, reduction="none")
        return out

    # -- evaluation -------------------------------------------------------------------------
    def _accumulate(self, name: str, model: nn.Module, x: Any, y: Tensor) -> None:
        with torch.no_grad():
            out = model(x)
        s = self._sums.setdefault(name, [0.0, 0.0, 0.0])
        s[0] += float(F.cross_entropy(out, y, reduction="sum"))
        s[1] += float((out.argmax(-1) == y).sum())
        s[2] += y.numel()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch_input(batch), batch_target(batch)
        assert self.merged is not None
        self._accumulate("merged", self.merged, x, y)
        self._accumulate("naive average", self.naive, x, y)
        for i, m in enumerate(self.endpoints):
            self._accumulate(f"endpoint {i}", m, x, y)

    def on_test_epoch_end(self) -> None:
        for name, (loss, correct, n) in self._sums.items():
            key = name.replace(" ", "_")
            self.results[f"{key}/loss"] = loss / max(n, 1)
            self.results[f"{key}/acc"] = correct / max(n, 1)
        for k, v in self.results.items():
            self.log(f"test/{k}", v)

    def _barriers(self, train: Any, test: Any) -> None:
        a, b = self.endpoints
        if self.method == "average":
            aligned = b
        else:
            need = self.method == "activation_matching"
            aligned, _ = align(a, b, self.method, loader=train if need else None,
                               num_batches=self.num_batches, seed=self.seed,
                               **self.method_kwargs)
        reset = self.repair == "bn_reset"
        curves = {
            "naive": interpolation_curve(a, b, test, self.lambdas, reset_bn=reset,
                                         bn_loader=train),
            self.method: interpolation_curve(a, aligned, test, self.lambdas, reset_bn=reset,
                                             bn_loader=train),
        }
        self.results["barrier/naive"] = curves["naive"].barrier
        self.results[f"barrier/{self.method}"] = curves[self.method].barrier
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        path = self.plot or (os.path.join(log_dir, "interpolation.png") if log_dir else None)
        if path and self.trainer.is_global_zero:
            self.plot_path = plot_curves(curves, Path(path),
                                         title=f"{self.method} ({Path(self.factory).name})")

    def results_table(self) -> str:
        """Markdown table of the test results (printed and saved by `graphspace`)."""
        rows = ["| model | test loss | test accuracy |", "|---|---|---|"]
        for name in self._sums:
            key = name.replace(" ", "_")
            rows.append(f"| {name} | {self.results[f'{key}/loss']:.4f} | "
                        f"{self.results[f'{key}/acc']:.4f} |")
        for k, v in self.results.items():
            if k.startswith("barrier/"):
                rows.append(f"| loss barrier, {k.split('/', 1)[1]} path | {v:.4f} | |")
        if self.plot_path is not None:
            rows.append(f"\nInterpolation plot: `{self.plot_path}`")
        return "\n".join(rows)

    def configure_optimizers(self) -> None:
        return None

