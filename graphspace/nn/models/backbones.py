"""Message-passing blocks that :class:`GraphMetaNetwork` can use as its backbone.

Every block maps ``(x, edge_index, edge_attr, batch) -> (x, edge_attr)`` and is equivariant to
node permutations, so the metanetwork stays invariant to hidden-neuron permutations whatever
the backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from graphspace.nn.conv.metanetwork_conv import MetaNetworkConv

BlockFactory = Callable[..., nn.Module]
BACKBONES: dict[str, BlockFactory] = {}


def register_backbone(name: str) -> Callable[[BlockFactory], BlockFactory]:
    """Register a block factory ``f(hidden, edge_channels, dropout, **kw) -> nn.Module``."""

    def deco(fn: BlockFactory) -> BlockFactory:
        BACKBONES[name] = fn
        return fn

    return deco


def make_block(name: str, hidden: int, edge_channels: int, dropout: float = 0.0,
               **kwargs: Any) -> nn.Module:
    return BACKBONES[name](hidden, edge_channels, dropout, **kwargs)


class MetaNetBlock(nn.Module):
    def __init__(self, hidden: int, edge_channels: int, dropout: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__()
        self.conv = MetaNetworkConv(hidden, hidden, edge_channels, dropout=dropout, **kwargs)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor,
                batch: Tensor) -> tuple[Tensor, Tensor]:
        return self.conv(x, edge_index, edge_attr)


register_backbone("metanet")(MetaNetBlock)
