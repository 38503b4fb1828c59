"""Offline data and endpoint models for merging experiments: scikit-learn's `load_digits`.

The 1797 8x8 handwritten digits ship with scikit-learn, so experiments and tests run without
network access. [`DigitsDataModule`][graphspace.merge.digits.DigitsDataModule] serves fixed
train/val/test splits as flat 64-feature vectors (`flat=True`) or `1x8x8` images; `train_classifier`
trains an endpoint model (e.g. two MLPs from different seeds) in a few seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from graphspace.merge._utils import model_device


def load_digits_tensors(flat: bool = True) -> tuple[Tensor, Tensor]:
    """All digits as float features in `[0, 1]` (`[N, 64]` or `[N, 1, 8, 8]`) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the [data]/[dev] extras
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    xt = torch.as_tensor(x, dtype=torch.float32) / 16.0
    if not flat:
        xt = xt.view(-1, 1, 8, 8)
    return xt, torch.as_tensor(y, dtype=torch.long)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, split once with a fixed seed.

    Args:
        batch_size: batch size of every loader (default 128).
        flat: 64-feature vectors (MLPs) instead of `1x8x8` images.
        val_fraction: share of the data used for validation (default 0.15).
        test_fraction: share used for testing (default 0.25).
        seed: seed of the split and of the training-loader shuffling.
    """

    def __init__(self, batch_size: int = 128, flat: bool = True, val_fraction: float = 0.15,
                 test_fraction: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.flat = flat
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.train_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.flat)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
        n_test = int(round(self.test_fraction * x.shape[0]))
        n_val = int(round(self.val_fraction * x.shape[0]))
        te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])
        self.test_set = TensorDataset(x[te], y[te])

    def train_dataloader(self, shuffle: bool = True) -> DataLoader:
        self.setup()
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=shuffle,
                          generator=g if shuffle else None)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.test_set, batch_size=self.batch_size)


def train_classifier(
    model: nn.Module,
    loader: DataLoader,
    epochs: int = 20,
    lr: float = 1e-2,
    seed: int = 0,
    weight_decay: float = 0.0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> nn.Module:
    """Train `model` in place with Adam (cross-entropy); returns it in eval mode.

    `seed` fixes the data order (the model's initialisation is the caller's).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    dev = model_device(model)
    g = torch.Generator().manual_seed(seed)
    data = loader.dataset
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=g)  # type: ignore[arg-type]
        for i in range(0, len(order), loader.batch_size or 128):
            x, y = data[order[i:i + (loader.batch_size or 128)]]
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return model.eval()
