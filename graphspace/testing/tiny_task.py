"""A seconds-long Lightning task and data module for CLI tests (`graphspace fit/test`)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyData(pl.LightningDataModule):
    """64 random points of a linear regression problem (seeded), batches of 16."""

    def __init__(self, n: int = 64, dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g)

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class TinyTask(pl.LightningModule):
    """Linear regression with a `results_table()` (the test MSE), like graphspace's tasks."""

    def __init__(self, dim: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(dim, 1)
        self.test_mse = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = self._loss(batch)
        self.log("train_mse", loss, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_mse", self._loss(batch), batch_size=len(batch[0]))

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("test_mse", self._loss(batch), batch_size=len(batch[0]))

    def on_test_epoch_end(self) -> None:
        self.test_mse = float(self.trainer.callback_metrics["test_mse"])

    def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def results_table(self) -> str:
        return f"| model | test mse |\n|---|---|\n| linear | {self.test_mse:.6f} |"
