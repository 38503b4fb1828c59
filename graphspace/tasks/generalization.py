r"""Generalization prediction: predict a network's test accuracy from its weights.

The graph metanetwork and the baselines are trained side by side on the same batches (their
parameters are disjoint, so summing their losses trains each one independently) and evaluated
with the same metrics, so one run yields a comparison table.

Metrics: Kendall's :math:`\tau` (rank correlation between predicted and true accuracies, the
metric of Unterthiner et al. 2020 and of the NFN / Neural Graphs papers) and :math:`R^2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import KendallRankCorrCoef, MetricCollection, R2Score

from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork

BASELINES = ("statnn", "norms", "flat")


class FeatureMLP(nn.Module):
    r"""MLP on a per-network feature vector (StatNN: Unterthiner et al. 2020 use per-layer
    statistics followed by a small fully connected network). Inputs are standardised with
    statistics fitted once on the first training batches (:meth:`fit_normalizer`)."""

    def __init__(self, attr: str, hidden: int = 64, out_channels: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attr = attr
        self.net = nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_channels))
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))

    def forward(self, batch: Any) -> Tensor:
        f = getattr(batch, self.attr).float()
        if self.mean.numel() == 0:
            if not self.training:  # not fitted yet (e.g. Lightning's sanity check)
                return self.net(f)
            self.mean = f.mean(0).detach()
            self.std = (f.std(0).detach().clamp_min(1e-6) if f.size(0) > 1
                        else torch.ones_like(self.mean))
        return self.net((f - self.mean) / self.std)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in ("mean", "std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args)


class GeneralizationPredictor(pl.LightningModule):
    r"""Predict test accuracy from a parameter graph (plus baselines, side by side).

    Args:
        model: the graph model (default: :class:`GraphMetaNetwork` with 1 output).
        baselines: any of ``"statnn"`` (batch attribute ``stats``), ``"norms"`` (``norms``),
            ``"flat"`` (``flat``, fixed architectures); see
            :class:`graphspace.tasks.features.AttachWeightFeatures`.
        lr, weight_decay: AdamW settings (default 1e-3, 0).
        target: batch attribute holding the targets (default ``y``).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        baselines: Sequence[str] = ("statnn",),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        target: str = "y",
        baseline_hidden: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        for b in baselines:
            if b not in BASELINES:
                raise ValueError(f"unknown baseline {b!r}; choose from {BASELINES}")
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
            self.log(f"{stage}/loss_{n}", v, batch_size=bs, prog_bar=(n == "gmn"))
        if stage in self.metrics:
            for n, p in preds.items():
                self.metrics[stage][n].update(p.float().detach(), y)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        for n in self.names:
            vals = self.metrics[stage][n].compute()
            self.metrics[stage][n].reset()
            row = {k: float(v) for k, v in vals.items()}
            for k, v in row.items():
                self.log(f"{stage}/{k}_{n}", v, prog_bar=(n == "gmn" and k == "tau"))
            self.results.setdefault(stage, {}).update({f"{k}_{n}": v for k, v in row.items()})

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def results_table(self, stage: str = "test") -> str:
        """A Markdown table of Kendall tau and R^2 per predictor."""
        res = self.results.get(stage, {})
        lines = ["| predictor | Kendall tau | R^2 |", "|---|---|---|"]
        for n in self.names:
            tau, r2 = res.get(f"tau_{n}", float("nan")), res.get(f"r2_{n}", float("nan"))
            lines.append(f"| {n} | {tau:.4f} | {r2:.4f} |")
        return "\n".join(lines)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)
