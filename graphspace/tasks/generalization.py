r"""Generalization prediction: predict a network's test accuracy from its weights.

The graph metanetwork and the baselines are trained side by side on the same batches (their
parameters are disjoint, so summing their losses trains each one independently) and evaluated
with the same metrics, so one run yields a comparison table.

Metrics: Kendall's $\tau$ (rank correlation between predicted and true accuracies, the
metric of Unterthiner et al. 2020 and of the NFN / Neural Graphs papers) and $R^2$.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import KendallRankCorrCoef, MetricCollection, R2Score

from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork
from graphspace.tasks.outputs import PredictionsFile, pyplot, run_dir, save_figure

BASELINES = ("statnn", "norms", "flat")
LR_SCHEDULES = ("constant", "cosine")


class FeatureMLP(nn.Module):
    r"""MLP on a per-network feature vector (StatNN: Unterthiner et al. 2020 use per-layer
    statistics followed by a small fully connected network).

    Inputs are standardised, $(\mathbf f - \boldsymbol\mu) / \boldsymbol\sigma$, with
    statistics of the training split set by `fit_normalizer` (which
    `GeneralizationPredictor` calls in `setup` with the whole training split, before
    any distributed wrapping); if it was never called, the first training batch is used.

    Args:
        attr: batch attribute holding the `[batch, F]` features.
        hidden: hidden width (64).
        out_channels: outputs (1).
        dropout: dropout after the first layer (0).
    """

    def __init__(self, attr: str, hidden: int = 64, out_channels: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attr = attr
        self.net = nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_channels))
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))

    @property
    def fitted(self) -> bool:
        """Whether the input statistics are set."""
        return self.mean.numel() > 0

    @torch.no_grad()
    def fit_normalizer(self, features: Tensor) -> None:
        """Set the standardisation statistics from `[N, F]` training features and
        materialise the lazy first layer."""
        if features.dim() != 2 or features.size(0) == 0:
            raise ValueError(f"expected [N, F] features with N > 0, got {tuple(features.shape)}")
        f = features.float()
        device = self.mean.device
        self.mean = f.mean(0).to(device)
        self.std = (f.std(0).clamp_min(1e-6) if f.size(0) > 1
                    else torch.ones_like(f[0])).to(device)
        self.net(torch.zeros(1, f.size(1), device=device))

    def forward(self, batch: Any) -> Tensor:
        f = getattr(batch, self.attr).float()
        if not self.fitted:
            if not self.training:  # not fitted yet (e.g. Lightning's sanity check)
                return self.net(f)
            self.fit_normalizer(f.detach())
        return self.net((f - self.mean) / self.std)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in ("mean", "std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name],
                                                     device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)


class GeneralizationPredictor(PredictionsFile, pl.LightningModule):
    r"""Predict test accuracy from a parameter graph (plus baselines, side by side).

    Every predictor $f$ (the graph metanetwork `gmn` and each baseline) is trained with
    the mean squared error $\frac1B\sum_b (f(G_b) - y_b)^2$ on the same batches; the
    summed loss trains each one independently because their parameters are disjoint (AdamW is
    a per-parameter method; do not combine with gradient-norm clipping, which would couple
    them). Validation and test report Kendall's $\tau$ and $R^2$ per predictor,
    computed over the whole split (gathered across processes under DDP).

    **Model selection.** With `select_best=True` each predictor keeps a copy of its weights
    from the validation epoch with its highest Kendall $\tau$ (stored in checkpoints) and
    is tested with them, as if it had been trained alone with early stopping; the baselines
    are thus not judged at the metanetwork's best epoch.

    **Outputs** (in the run directory, see `graphspace.tasks.outputs.run_dir`; skipped with a
    one-line message without matplotlib): after `test`, `predictions_test.png`, predicted
    against actual accuracy per predictor with its Kendall $\tau$ (the points are in
    `test_predictions` / `test_targets`); after `fit`, `learning_curves.png`, the epoch means
    of the training and validation losses and the validation $\tau$ per predictor (kept in
    `history`). `predict` writes `predictions.csv` (or `.parquet`): one row per network with
    the predicted test accuracy of every predictor (`gmn`, baselines) and the target when the
    batch has one; predictors use their best-epoch weights as in `test`.

    Args:
        model: the graph model (default: `GraphMetaNetwork` with 1 output).
        baselines: any of `"statnn"` (batch attribute `stats`), `"norms"` (`norms`),
            `"flat"` (`flat`, fixed architectures); see
            `graphspace.tasks.features.AttachWeightFeatures`.
        lr, weight_decay: AdamW settings (default 1e-3, 0).
        target: batch attribute holding the targets (default `y`).
        baseline_hidden: hidden width of the baselines' MLPs (64).
        select_best: test every predictor at its best validation epoch (default `True`).
        lr_schedule: `"constant"` (default) or `"cosine"` (annealed to 0 over
            `trainer.max_epochs`, stepped per epoch).
        plots: save the figures (default `True`; `False` for benchmarks and sweeps).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        baselines: Sequence[str] = ("statnn",),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        target: str = "y",
        baseline_hidden: int = 64,
        select_best: bool = True,
        lr_schedule: str = "constant",
        plots: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        for b in baselines:
            if b not in BASELINES:
                raise ValueError(f"unknown baseline {b!r}; choose from {BASELINES}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose from {LR_SCHEDULES}")
        self.model = model if model is not None else GraphMetaNetwork(1)
        attrs = {"statnn": "stats", "norms": "norms", "flat": "flat"}
        self.baselines = nn.ModuleDict(
            {b: FeatureMLP(attrs[b], baseline_hidden) for b in baselines})
        self.names = ["gmn", *baselines]
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({
                n: MetricCollection({"tau": KendallRankCorrCoef(), "r2": R2Score()})
                for n in self.names})
            for stage in ("val", "test")
        })
        self.results: dict[str, dict[str, float]] = {}
        #: per predictor: best validation tau, its epoch and a CPU copy of the weights
        self.best: dict[str, dict[str, Any]] = {}
        #: per-epoch curves: ``epoch``, ``train/loss_<n>``, ``val/loss_<n>``, ``val/tau_<n>``
        self.history: dict[str, list[float]] = {}
        self.test_predictions: dict[str, Tensor] = {}
        self.test_targets: Tensor | None = None
        self._sums: dict[str, list[Any]] = {}
        self._test_parts: list[tuple[dict[str, Tensor], Tensor]] = []

    def predictor(self, name: str) -> nn.Module:
        """The module of predictor `name` (`"gmn"` or a baseline)."""
        return self.model if name == "gmn" else self.baselines[name]

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Fit the baselines' input standardisation on the whole training split (before DDP
        wraps the module, so the lazy layers exist and every process holds the same
        statistics)."""
        self.predict_on_test_loader(stage)
        if stage != "fit" or all(m.fitted for m in self.baselines.values()):
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or type(dm).train_dataloader is pl.LightningDataModule.train_dataloader:
            return  # no datamodule: the first training batch is used instead
        feats: dict[str, list[Tensor]] = {n: [] for n in self.baselines}
        for batch in dm.train_dataloader():
            for n, m in self.baselines.items():
                feats[n].append(getattr(batch, m.attr).float())
        for n, m in self.baselines.items():
            if feats[n]:
                m.fit_normalizer(torch.cat(feats[n]).to(self.device))

    # -- steps ------------------------------------------------------------------------------
    def forward(self, batch: Any) -> dict[str, Tensor]:
        preds = {"gmn": self.model(batch).view(-1)}
        for name, mod in self.baselines.items():
            preds[name] = mod(batch).view(-1)
        return preds

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        y = getattr(batch, self.hparams.target).view(-1).float()
        preds = self(batch)
        losses = {n: F.mse_loss(p.float(), y) for n, p in preds.items()}
        loss = sum(losses.values())
        bs = y.numel()
        for n, v in losses.items():
            self.log(f"{stage}/loss_{n}", v, batch_size=bs, prog_bar=(n == "gmn"),
                     sync_dist=stage != "train")
            acc = self._sums.setdefault(f"{stage}/loss_{n}", [0.0, 0])
            acc[0] = acc[0] + v.detach() * bs  # a tensor: no device sync per step
            acc[1] += bs
        if stage in self.metrics:
            for n, p in preds.items():
                self.metrics[stage][n].update(p.float().detach(), y)
        if stage == "test":
            self._test_parts.append(({n: p.detach().float().cpu() for n, p in preds.items()},
                                     y.detach().cpu()))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, Tensor]:
        """Predicted test accuracy of every network of the batch, per predictor.

        Returns:
            `{"gmn": [B], <baseline>: [B], ..., "target": [B]}` (`target` only when the batch
            carries the target attribute).
        """
        out = {n: p.float() for n, p in self(batch).items()}
        y = getattr(batch, self.hparams.target, None)
        if isinstance(y, Tensor):
            out["target"] = y.view(-1).float()
        return out

    def _epoch_end(self, stage: str) -> None:
        sanity = self._trainer is not None and self.trainer.sanity_checking
        for n in self.names:
            coll = self.metrics[stage][n]
            if not coll["tau"].update_called:
                continue
            vals = coll.compute()  # torchmetrics gathers the states of all processes
            coll.reset()
            row = {k: float(v) for k, v in vals.items()}
            for k, v in row.items():
                self.log(f"{stage}/{k}_{n}", v, prog_bar=(n == "gmn" and k == "tau"))
            self.results.setdefault(stage, {}).update({f"{k}_{n}": v for k, v in row.items()})
            if stage == "val" and not sanity and self.hparams.select_best:
                self._keep_if_best(n, row["tau"])

    def _keep_if_best(self, name: str, tau: float) -> None:
        if math.isnan(tau) or (name in self.best and tau <= self.best[name]["tau"]):
            return
        state = {k: v.detach().to("cpu", copy=True)
                 for k, v in self.predictor(name).state_dict().items()}
        self.best[name] = {"tau": tau, "epoch": int(self.current_epoch), "state": state}

    def _mean_losses(self, stage: str) -> dict[str, float]:
        out = {}
        for key in [k for k in self._sums if k.startswith(f"{stage}/")]:
            total, n = self._sums.pop(key)
            out[key] = float(total) / max(n, 1)
        return out

    def on_train_epoch_start(self) -> None:
        self._mean_losses("train")

    def on_validation_epoch_start(self) -> None:
        self._mean_losses("val")

    def on_validation_epoch_end(self) -> None:
        sanity = self._trainer is not None and self.trainer.sanity_checking
        val_losses = self._mean_losses("val")
        self._epoch_end("val")
        if not sanity:
            self._val_row = {**val_losses, **{
                f"val/tau_{n}": self.results.get("val", {}).get(f"tau_{n}", float("nan"))
                for n in self.names}}

    def on_train_epoch_end(self) -> None:
        # runs after the epoch's validation: one row per epoch, train and val together
        row = {"epoch": float(self.current_epoch), **self._mean_losses("train"),
               **getattr(self, "_val_row", {})}
        self._val_row = {}
        keys = list(self.history) + [k for k in row if k not in self.history]
        done = len(self.history.get("epoch", []))
        for k in keys:
            self.history.setdefault(k, [float("nan")] * done).append(row.get(k, float("nan")))

    def on_fit_end(self) -> None:
        if self.hparams.plots and self.trainer.is_global_zero and self.history.get("epoch"):
            self.plot_learning_curves(run_dir(self.trainer) / "learning_curves.png")

    def _load_best(self) -> None:
        if not self.hparams.select_best:
            return
        for name, b in self.best.items():
            if name in self.names:
                self.predictor(name).load_state_dict(b["state"])

    def on_test_epoch_start(self) -> None:
        self._test_parts = []
        self._mean_losses("test")
        self._load_best()

    def on_predict_epoch_start(self) -> None:
        super().on_predict_epoch_start()
        self._load_best()

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")
        self._mean_losses("test")
        if not self._test_parts:
            return
        self.test_predictions = {n: torch.cat([p[n] for p, _ in self._test_parts])
                                 for n in self.names}
        self.test_targets = torch.cat([y for _, y in self._test_parts])
        self._test_parts = []
        if self.hparams.plots and self.trainer.is_global_zero:
            self.plot_predictions(run_dir(self.trainer) / "predictions_test.png")

    # -- figures ----------------------------------------------------------------------------
    def plot_predictions(self, path: str | None = None) -> Any:
        """Predicted against actual test accuracy per predictor (Kendall $\tau$ in the titles),
        from the last `test` (this process's samples).

        Args:
            path: where to save the PNG (the figure is then closed); `None` returns it open.

        Returns:
            The figure (or `None` without matplotlib); the saved path is printed.
        """
        from graphspace.tasks.plots import prediction_scatter

        if self.test_targets is None:
            raise ValueError("plot_predictions needs a finished test run (no test predictions)")
        plt = pyplot("the predicted-vs-actual plot")
        if plt is None:
            return None
        taus = {n: self.results.get("test", {}).get(f"tau_{n}", float("nan"))
                for n in self.names}
        fig = prediction_scatter(plt, self.test_predictions, self.test_targets, taus)
        if path is not None:
            print(f"predicted vs actual -> {save_figure(fig, path)}")
        return fig

    def plot_learning_curves(self, path: str | None = None) -> Any:
        """Training / validation loss and validation Kendall $\tau$ per epoch (`history`).

        Args:
            path: where to save the PNG (the figure is then closed); `None` returns it open.

        Returns:
            The figure (or `None` without matplotlib); the saved path is printed.
        """
        from graphspace.tasks.plots import learning_curves

        if not self.history.get("epoch"):
            raise ValueError("plot_learning_curves needs at least one finished training epoch")
        plt = pyplot("the learning curves")
        if plt is None:
            return None
        epochs = [int(e) for e in self.history["epoch"]]
        fig = learning_curves(plt, {k: v for k, v in self.history.items() if k != "epoch"},
                              epochs)
        if path is not None:
            print(f"learning curves -> {save_figure(fig, path)}")
        return fig

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["graphspace_best_predictors"] = self.best
        checkpoint["graphspace_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best = dict(checkpoint.get("graphspace_best_predictors", {}))
        self.history = {k: list(v) for k, v in checkpoint.get("graphspace_history", {}).items()}

    # -- report -----------------------------------------------------------------------------
    def results_table(self, stage: str = "test") -> str:
        """A Markdown table of Kendall tau and R^2 per predictor (with, under model selection,
        the validation tau and epoch each predictor was taken from)."""
        res = self.results.get(stage, {})
        sel = self.hparams.select_best and bool(self.best)
        head = "| predictor | Kendall tau | R^2 |" + (" best val tau (epoch) |" if sel else "")
        lines = [head, "|---|---|---|" + ("---|" if sel else "")]
        for n in self.names:
            tau, r2 = res.get(f"tau_{n}", float("nan")), res.get(f"r2_{n}", float("nan"))
            line = f"| {n} | {tau:.4f} | {r2:.4f} |"
            if sel:
                b = self.best.get(n)
                line += f" {b['tau']:.4f} ({b['epoch']}) |" if b else " - |"
            lines.append(line)
        return "\n".join(lines)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return opt
        epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
