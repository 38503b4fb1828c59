"""Reference architectures used across graphspace's tests, docs and benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """A ReLU multi-layer perceptron."""

    def __init__(self, sizes: tuple[int, ...] = (8, 16, 16, 4), act: type = nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """The Small CNN Zoo network (Unterthiner et al. 2020): three 3x3 stride-2 convolutions of
    16 channels, global average pooling, a dense layer of 10 outputs."""

    def __init__(self, in_channels: int = 1, channels: int = 16, num_classes: int = 10,
                 act: type = nn.ReLU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2)
        self.conv3 = nn.Conv2d(channels, channels, 3, stride=2)
        self.act = act()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.act(self.conv3(x))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet with BatchNorm and projection shortcuts (He et al. 2016)."""

    def __init__(self, widths: tuple[int, ...] = (8, 16), blocks: int = 2, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 layout (11.2M parameters at widths 64..512)."""
    return ResNet(widths=(64, 128, 256, 512), blocks=2, in_channels=3, num_classes=num_classes)


class _ResNet20Block(BasicBlock):
    """:class:`BasicBlock` whose projection shortcut is a 3x3 strided convolution + BatchNorm,
    as in the Git Re-Basin code's ResNet-20 (``src/resnet20.py`` of samuela/git-re-basin)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, stride)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                          nn.BatchNorm2d(cout))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2) at a width multiplier ``w``, laid out like the
    network of Git Re-Basin (Ainsworth et al. 2023): a 3x3 stem of ``16w`` channels, three stages
    of three basic blocks of ``16w``, ``32w``, ``64w`` channels (the first block of stages 2 and 3
    has stride 2 and a 3x3 projection shortcut, every other shortcut is the identity), global
    average pooling and a linear classifier. Git Re-Basin's code uses LayerNorm; this one uses
    BatchNorm as in He et al.

    Permutation symmetry: 3 residual streams (one per stage) and 9 block-internal channel sets.
    """

    def __init__(self, width_multiplier: int = 1, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if width_multiplier < 1:
            raise ValueError(f"width_multiplier must be >= 1, got {width_multiplier}")
        w = int(width_multiplier)
        self.stem = nn.Conv2d(in_channels, 16 * w, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16 * w)
        blocks = []
        cin = 16 * w
        for stage, cout in enumerate((16 * w, 32 * w, 64 * w)):
            for b in range(3):
                blocks.append(_ResNet20Block(cin, cout, 2 if (b == 0 and stage > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        return self.fc(x.mean(dim=(2, 3)))


def resnet20(width_multiplier: int = 1, num_classes: int = 10) -> ResNet20:
    """:class:`ResNet20` at ``width_multiplier`` (0.29M parameters at 1, 4.7M at 4, 74M at 16,
    297M at 32)."""
    return ResNet20(width_multiplier, num_classes)


class DepthwiseSeparableCNN(nn.Module):
    """MobileNet-style depthwise-separable convolutions with BatchNorm."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.bn1 = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.fc(self.flat(self.pool(x)))


class TransformerBlock(nn.Module):
    """A pre-norm transformer encoder block: MultiheadAttention + LayerNorm + MLP."""

    def __init__(self, dim: int = 16, heads: int = 4, mlp: int = 32) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Input projection, one :class:`TransformerBlock`, a final LayerNorm and a linear head."""

    def __init__(self, in_dim: int = 6, dim: int = 16, heads: int = 4, out_dim: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.block = TransformerBlock(dim, heads, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.block(self.inp(x))))


class Siren(nn.Module):
    """SIREN (Sitzmann et al. 2020): ``sin(w0 (W x + b))`` layers and a linear output."""

    def __init__(self, in_dim: int = 2, hidden: int = 32, layers: int = 3, out_dim: int = 1,
                 w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = w0
        dims = [in_dim] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, out_dim)
        with torch.no_grad():
            for i, lin in enumerate(self.hidden):
                bound = 1 / a if (a := lin.in_features) and i == 0 else math.sqrt(6 / a) / w0
                lin.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        for lin in self.hidden:
            x = torch.sin(self.w0 * lin(x))
        return self.out(x)


def reference_models() -> dict[str, tuple[nn.Module, Tensor]]:
    """Name -> (model, example input) for every architecture the round-trip tests cover."""
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (MLP(), torch.randn(5, 8, generator=g)),
        "small_cnn": (SmallCNN(), torch.randn(2, 1, 28, 28, generator=g)),
        "resnet": (ResNet(), torch.randn(2, 3, 16, 16, generator=g)),
        "depthwise": (DepthwiseSeparableCNN(), torch.randn(2, 3, 12, 12, generator=g)),
        "transformer": (TinyTransformer(), torch.randn(2, 7, 6, generator=g)),
        "siren": (Siren(), torch.rand(16, 2, generator=g) * 2 - 1),
    }
