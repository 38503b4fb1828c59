"""Shared fixtures of the merging tests: small models trained on scikit-learn's digits."""

import pytest
import torch
from torch import Tensor, nn

from graphspace.merge.digits import DigitsDataModule, train_classifier
from graphspace.testing.models import MLP, ResNet


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrix products are much slower with 2 threads on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class VGG(nn.Module):
    """A small VGG-style CNN: 3x3 conv blocks with max pooling, a BN layer, flatten, MLP head."""

    def __init__(self, width: int = 8, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 4, 32), nn.ReLU(),
                                        nn.Linear(32, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, 8, 8]
        return self.classifier(self.features(x))


@pytest.fixture(scope="session")
def make_vgg():
    return VGG


@pytest.fixture(scope="session")
def digits() -> DigitsDataModule:
    pytest.importorskip("sklearn")
    dm = DigitsDataModule(batch_size=128)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def digits_images() -> DigitsDataModule:
    pytest.importorskip("sklearn")
    dm = DigitsDataModule(batch_size=128, flat=False)
    dm.setup()
    return dm


def _train_pair(make, dm, epochs, lr):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            out.append(train_classifier(make(), dm.train_dataloader(), epochs=epochs, lr=lr,
                                        seed=seed))
        return out
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mlp_pair(digits):
    """Two MLPs (64-128-128-10) trained on digits from different seeds (~1 s)."""
    return _train_pair(lambda: MLP((64, 128, 128, 10)), digits, epochs=20, lr=1e-3)


@pytest.fixture(scope="session")
def resnet_pair(digits_images):
    """Two BatchNorm ResNets (widths 16, 32, projection shortcut) trained on digits (~3 s)."""
    return _train_pair(lambda: ResNet((16, 32), blocks=1, in_channels=1), digits_images,
                       epochs=8, lr=3e-3)
