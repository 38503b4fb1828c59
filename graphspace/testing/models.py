"""Reference architectures used across graphspace's tests, docs and benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """`BasicBlock` whose projection shortcut is a 3x3 strided convolution + BatchNorm,
    as in the Git Re-Basin code's ResNet-20 (`src/resnet20.py` of samuela/git-re-basin)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, stride)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                          nn.BatchNorm2d(cout))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2) at a width multiplier `w`, laid out like the
    network of Git Re-Basin (Ainsworth et al. 2023): a 3x3 stem of `16w` channels, three stages
    of three basic blocks of `16w`, `32w`, `64w` channels (the first block of stages 2 and 3
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
    """`ResNet20` at `width_multiplier` (0.29M parameters at 1, 4.7M at 4, 74M at 16,
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
    """Input projection, one `TransformerBlock`, a final LayerNorm and a linear head."""

    def __init__(self, in_dim: int = 6, dim: int = 16, heads: int = 4, out_dim: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.block = TransformerBlock(dim, heads, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.block(self.inp(x))))


class Siren(nn.Module):
    """SIREN (Sitzmann et al. 2020): `sin(w0 (W x + b))` layers and a linear output."""

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


# ---------------------------------------------------------------------------------------------
# Modern reference models: compact, nanoGPT-style versions of architectures people train today.
# ---------------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """Hyper-parameters of NanoGPT and ManualAttentionGPT.

    Attributes:
        vocab_size: Number of token ids.
        block_size: Maximum sequence length (size of the position table).
        n_layer: Number of transformer blocks.
        n_head: Number of attention heads; must divide n_embd.
        n_embd: Embedding width $C$.
        tie_weights: Share the token embedding matrix with the output head.
        bias: Use biases in the Linear and LayerNorm layers.
    """

    vocab_size: int = 37
    block_size: int = 16
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    tie_weights: bool = True
    bias: bool = True


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention with one packed QKV projection, as in nanoGPT.

    Each head computes $\mathrm{softmax}(q k^\top / \sqrt{d} + M) v$ with
    F.scaled_dot_product_attention, where $M$ is $-\infty$ above the diagonal.

    Args:
        config: Model hyper-parameters.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError("n_embd must be divisible by n_head")
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class ManualCausalSelfAttention(nn.Module):
    r"""Causal self-attention written out by hand, with separate q, k and v projections.

    Computes $\mathrm{softmax}(q k^\top / \sqrt{d})$ with future positions masked to
    $-\infty$ through a lower-triangular buffer, then multiplies by $v$.

    Args:
        config: Model hyper-parameters.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError("n_embd must be divisible by n_head")
        C, bs = config.n_embd, config.block_size
        self.n_head = config.n_head
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        mask = torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs)  # (1, 1, bs, bs)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        hs = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class GPTMLP(nn.Module):
    r"""The GPT feed-forward layer: $W_2\,\mathrm{GELU}(W_1 x)$ with a 4x wide hidden layer.

    Args:
        config: Model hyper-parameters.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    r"""A pre-LayerNorm GPT block.

    Computes $x \leftarrow x + \mathrm{attn}(\mathrm{LN}(x))$, then
    $x \leftarrow x + \mathrm{mlp}(\mathrm{LN}(x))$.

    Args:
        config: Model hyper-parameters.
        attention_cls: The attention module class, built as attention_cls(config).
    """

    def __init__(self, config: GPTConfig, attention_cls: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention_cls(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = GPTMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    r"""A decoder-only GPT in the style of Karpathy's nanoGPT.

    Token embedding wte plus learned position embedding wpe, n_layer pre-LayerNorm blocks of
    causal self-attention and MLP, a final LayerNorm and a bias-free head. With tie_weights the
    head's weight is the same Parameter as wte.weight. Weights follow nanoGPT's initialisation:
    $\mathcal{N}(0, 0.02^2)$, residual projections $\mathcal{N}(0, 0.02^2 / (2 L))$.

    Args:
        vocab_size: Number of token ids.
        block_size: Maximum sequence length.
        n_layer: Number of blocks $L$.
        n_head: Number of attention heads.
        n_embd: Embedding width $C$.
        tie_weights: Share wte.weight with lm_head.weight.
        bias: Use biases in Linear and LayerNorm layers.

    Shape:
        Input: LongTensor (B, T) of token ids with $T \le$ block_size.
        Output: logits (B, T, vocab_size).
    """

    attention_cls: type[nn.Module] = CausalSelfAttention

    def __init__(self, vocab_size: int = 37, block_size: int = 16, n_layer: int = 2,
                 n_head: int = 4, n_embd: int = 32, tie_weights: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        self.config = config = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd,
                                         tie_weights, bias)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(GPTBlock(config, self.attention_cls) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight  # one Parameter used twice
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """nanoGPT's initialisation: normal(0, 0.02) weights, zero biases."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)


class ManualAttentionGPT(NanoGPT):
    r"""NanoGPT with hand-written masked attention and separate q, k, v projections.

    Identical to NanoGPT except that each block uses ManualCausalSelfAttention (explicit
    $q k^\top$, a registered causal mask buffer and softmax) and the head is untied by default.

    Args:
        vocab_size: Number of token ids.
        block_size: Maximum sequence length (also the size of the mask buffer).
        n_layer: Number of blocks.
        n_head: Number of attention heads.
        n_embd: Embedding width.
        tie_weights: Share wte.weight with lm_head.weight.
        bias: Use biases in Linear and LayerNorm layers.
    """

    attention_cls = ManualCausalSelfAttention

    def __init__(self, vocab_size: int = 37, block_size: int = 16, n_layer: int = 2,
                 n_head: int = 4, n_embd: int = 32, tie_weights: bool = False,
                 bias: bool = True) -> None:
        super().__init__(vocab_size, block_size, n_layer, n_head, n_embd, tie_weights, bias)


class TinyViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021).

    Non-overlapping patches are embedded by a strided convolution, a learned class token is
    prepended, learned position embeddings are added, pre-norm TransformerBlocks
    (nn.MultiheadAttention + GELU MLP) follow, and a linear head reads the normalised class
    token.

    Args:
        image_size: Height and width of the input image.
        patch_size: Side of each square patch; must divide image_size.
        in_chans: Input channels.
        num_classes: Output logits.
        dim: Token width.
        depth: Number of transformer blocks.
        heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of dim.

    Shape:
        Input: (B, in_chans, image_size, image_size). Output: (B, num_classes).
    """

    def __init__(self, image_size: int = 8, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 5, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        x = self.patch_embed(x)  # (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, N + 1, dim)
        x = x + self.pos_embed  # (B, N + 1, dim)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0])  # (B, num_classes)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of a (B, C, H, W) tensor, as in torchvision.

    Args:
        normalized_shape: Number of channels $C$ (plus any nn.LayerNorm keyword arguments).
    """

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class ConvNeXtBlock(nn.Module):
    r"""A ConvNeXt block (Liu et al. 2022).

    Computes $x + \gamma \odot \mathrm{MLP}(\mathrm{LN}(\mathrm{dwconv}(x)))$, with the LayerNorm
    and MLP applied channels-last.

    Args:
        dim: Channels.
        layer_scale_init: Initial value of every entry of the layer-scale vector $\gamma$.
    """

    def __init__(self, dim: int, layer_scale_init: float = 1e-1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x)  # (B, C, H, W)
        h = h.permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))  # (B, H, W, C)
        h = self.gamma * h
        h = h.permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + h


class ConvNeXtBlockNet(nn.Module):
    """A one-stage ConvNeXt: patchify stem, ConvNeXt blocks, pooled LayerNorm and head.

    Args:
        in_chans: Input channels.
        dim: Channels after the stem.
        num_classes: Output logits.
        depth: Number of ConvNeXt blocks.
        layer_scale_init: Initial layer-scale value of every block.

    Shape:
        Input: (B, in_chans, 16, 16) (any even size works). Output: (B, num_classes).
    """

    def __init__(self, in_chans: int = 3, dim: int = 16, num_classes: int = 5, depth: int = 2,
                 layer_scale_init: float = 1e-1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, 2, stride=2), LayerNorm2d(dim))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, layer_scale_init) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))  # (B, dim, H/2, W/2)
        x = x.mean([-2, -1])  # (B, dim)
        return self.head(self.norm(x))  # (B, num_classes)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016) on a batch of residual branches.

    In training each sample's branch is zeroed with probability $p$ and otherwise scaled by
    $1 / (1 - p)$, so its expectation is unchanged; in evaluation it is the identity.

    Args:
        x: Residual branch of shape (B, C, H, W).
        p: Drop probability.
        training: Whether the model is in training mode.

    Returns:
        The (possibly dropped and rescaled) branch, same shape as x.
    """
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= p  # (B, 1, 1, 1)
    return x * keep / (1.0 - p)


class SqueezeExcite(nn.Module):
    r"""Squeeze-and-excitation (Hu et al. 2018): $x \cdot \sigma(W_2\,\mathrm{SiLU}(W_1 \bar{x}))$.

    Args:
        channels: Channels of the input.
        reduced: Channels of the bottleneck.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        s = torch.sigmoid(self.expand(F.silu(self.reduce(s))))  # (B, C, 1, 1)
        return x * s


class MBConv(nn.Module):
    r"""An EfficientNet inverted-residual block with squeeze-excitation and stochastic depth.

    1x1 expansion, depthwise 3x3, squeeze-excitation, 1x1 linear projection, then
    $x + \mathrm{drop\_path}(\mathrm{branch}(x))$.

    Args:
        channels: Input and output channels.
        expand_ratio: Hidden width as a multiple of channels.
        se_ratio: Squeeze-excitation bottleneck as a fraction of channels.
        drop_prob: Stochastic-depth probability of the residual branch.
    """

    def __init__(self, channels: int, expand_ratio: int = 4, se_ratio: float = 0.25,
                 drop_prob: float = 0.0) -> None:
        super().__init__()
        hidden = channels * expand_ratio
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False),
                                    nn.BatchNorm2d(hidden), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.SiLU())
        self.se = SqueezeExcite(hidden, max(1, int(channels * se_ratio)))
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels))
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        h = self.project(self.se(self.dw(self.expand(x))))  # (B, C, H, W)
        return x + drop_path(h, self.drop_prob, self.training)


class MBConvSENet(nn.Module):
    """A tiny EfficientNet-style network: conv-BN-SiLU stem, two MBConv blocks, pool and head.

    Args:
        in_chans: Input channels.
        num_classes: Output logits.
        width: Channels of the stem and blocks.
        drop_path: Stochastic-depth probability of each block's residual branch.

    Shape:
        Input: (B, in_chans, 16, 16). Output: (B, num_classes).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 5, width: int = 16,
                 drop_path: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(width, drop_prob=drop_path),
                                    MBConv(width, drop_prob=drop_path))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))  # (B, width, H/2, W/2)
        x = x.mean((2, 3))  # (B, width)
        return self.head(x)  # (B, num_classes)


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    """A 3x3 same-padding convolution followed by ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class TinyUNet(nn.Module):
    """A two-level U-Net (Ronneberger et al. 2015) for dense per-pixel prediction.

    Encoder: conv3x3+ReLU and 2x2 max-pool at each level; a bottleneck conv; decoder:
    ConvTranspose2d upsampling, concatenation with the matching encoder feature map and
    conv3x3+ReLU; a final 1x1 convolution gives out_chans logits per pixel.

    Args:
        in_chans: Input channels.
        out_chans: Output channels.
        base: Channels of the first level (doubled at each level down).

    Shape:
        Input: (B, in_chans, H, W) with H and W divisible by 4. Output: (B, out_chans, H, W).
    """

    def __init__(self, in_chans: int = 1, out_chans: int = 2, base: int = 8) -> None:
        super().__init__()
        self.enc1 = _conv_relu(in_chans, base)
        self.enc2 = _conv_relu(base, 2 * base)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _conv_relu(2 * base, 4 * base)
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, kernel_size=2, stride=2)
        self.dec2 = _conv_relu(4 * base, 2 * base)
        self.up1 = nn.ConvTranspose2d(2 * base, base, kernel_size=2, stride=2)
        self.dec1 = _conv_relu(2 * base, base)
        self.out = nn.Conv2d(base, out_chans, 1)

    def forward(self, x: Tensor) -> Tensor:
        s1 = self.enc1(x)  # (B, base, H, W)
        s2 = self.enc2(self.pool(s1))  # (B, 2 base, H/2, W/2)
        x = self.bottleneck(self.pool(s2))  # (B, 4 base, H/4, W/4)
        x = self.dec2(torch.cat([self.up2(x), s2], dim=1))  # cat: (B, 4 base, H/2, W/2)
        x = self.dec1(torch.cat([self.up1(x), s1], dim=1))  # cat: (B, 2 base, H, W)
        return self.out(x)  # (B, out_chans, H, W)


class LSTMTagger(nn.Module):
    """A sequence tagger: embedding, nn.LSTM (batch_first) and a Linear on every timestep.

    Args:
        vocab_size: Number of token ids.
        embed_dim: Embedding width.
        hidden_dim: Recurrent hidden width per direction.
        num_tags: Output logits per timestep.
        num_layers: Stacked recurrent layers.
        bidirectional: Run a second, reversed recurrence and concatenate both.

    Shape:
        Input: LongTensor (B, T). Output: (B, T, num_tags).
    """

    rnn_cls: type[nn.RNNBase] = nn.LSTM

    def __init__(self, vocab_size: int = 20, embed_dim: int = 8, hidden_dim: int = 12,
                 num_tags: int = 5, num_layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = self.rnn_cls(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                                bidirectional=bidirectional)
        self.head = nn.Linear(hidden_dim * (2 if bidirectional else 1), num_tags)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))  # (B, T, D * hidden_dim)
        return self.head(out)  # (B, T, num_tags)


class GRUTagger(LSTMTagger):
    """LSTMTagger with an nn.GRU in place of the nn.LSTM (same arguments and shapes)."""

    rnn_cls = nn.GRU


class RNNRegressor(nn.Module):
    r"""An Elman RNN regressor: $h_t = \tanh(W x_t + U h_{t-1} + b)$, then Linear on $h_T$.

    Args:
        input_size: Features per timestep.
        hidden: Hidden width.

    Shape:
        Input: float (B, T, input_size). Output: (B, 1).
    """

    def __init__(self, input_size: int = 4, hidden: int = 10) -> None:
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (B, T, hidden)
        return self.head(out[:, -1])  # (B, 1)


class TransformerClassifier(nn.Module):
    """`nn.TransformerEncoder` (torch's fused layers, packed q/k/v) over token embeddings,
    mean-pooled into a linear head."""

    def __init__(self, vocab: int = 23, dim: int = 16, heads: int = 4, layers: int = 2,
                 classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.encoder(self.embed(tokens))  # (B, T, dim)
        return self.head(h.mean(1))  # (B, classes)


def modern_models() -> dict[str, tuple[nn.Module, Tensor]]:
    """Name -> (model in eval mode, example input with batch 2) for the modern reference models.

    Parameters are drawn from the global RNG, so call torch.manual_seed first for reproducible
    weights; the inputs come from a fixed generator.
    """
    g = torch.Generator().manual_seed(0)
    models: dict[str, tuple[nn.Module, Tensor]] = {
        "nanogpt_tied": (NanoGPT(tie_weights=True), torch.randint(0, 37, (2, 12), generator=g)),
        "nanogpt_untied": (NanoGPT(tie_weights=False),
                           torch.randint(0, 37, (2, 12), generator=g)),
        "gpt_manual_attention": (ManualAttentionGPT(),
                                 torch.randint(0, 37, (2, 12), generator=g)),
        "vit": (TinyViT(), torch.randn(2, 3, 8, 8, generator=g)),
        "convnext": (ConvNeXtBlockNet(), torch.randn(2, 3, 16, 16, generator=g)),
        "mbconv_se": (MBConvSENet(), torch.randn(2, 3, 16, 16, generator=g)),
        "unet": (TinyUNet(), torch.randn(2, 1, 16, 16, generator=g)),
        "lstm": (LSTMTagger(), torch.randint(0, 20, (2, 7), generator=g)),
        "gru": (GRUTagger(), torch.randint(0, 20, (2, 7), generator=g)),
        "rnn": (RNNRegressor(), torch.randn(2, 9, 4, generator=g)),
        "transformer_encoder": (TransformerClassifier(),
                                torch.randint(0, 23, (2, 6), generator=g)),
    }
    return {name: (model.eval(), x) for name, (model, x) in models.items()}


def import_torchvision_models():
    """Import `torchvision.models`, also where torchvision's compiled ops cannot load.

    torchvision's wheels on the package index are built against the CUDA build of torch; over
    the CPU build, loading its operator library fails and `import torchvision` dies while
    registering fake kernels for those operators (`nms`, `roi_align`, ...). The model classes
    are plain Python and use none of them, so this skips that registration when (and only
    when) the operators are missing, and imports the models.

    Installed into the environment, such a wheel also breaks `import torchmetrics` (and so
    Lightning), which imports torchvision when it finds it. CI therefore installs it into a
    separate folder named by the environment variable `GRAPHSPACE_TORCHVISION_PATH`, which
    this function puts on `sys.path` before importing.

    Returns:
        The `torchvision.models` module.

    Raises:
        ImportError: torchvision is not installed (nor in `GRAPHSPACE_TORCHVISION_PATH`).
    """
    import importlib
    import importlib.util
    import os
    import sys
    import types

    extra = os.environ.get("GRAPHSPACE_TORCHVISION_PATH")
    if extra and extra not in sys.path and importlib.util.find_spec("torchvision") is None:
        sys.path.append(extra)
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed (pip install torchvision, or set "
                          "GRAPHSPACE_TORCHVISION_PATH to a folder that holds it)")
    try:
        return importlib.import_module("torchvision.models")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    return importlib.import_module("torchvision.models")
