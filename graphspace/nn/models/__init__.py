"""graphspace.nn.models: graph metanetworks and their message-passing backbones."""

from graphspace.nn.models.backbones import (
    BACKBONES,
    EGNNBlock,
    MetaNetBlock,
    SheafBlock,
    SubgraphBlock,
    UnitaryBlock,
    register_backbone,
)
from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork, ParameterGraphEncoder

__all__ = [
    "BACKBONES",
    "EGNNBlock",
    "GraphMetaNetwork",
    "MetaNetBlock",
    "ParameterGraphEncoder",
    "SheafBlock",
    "SubgraphBlock",
    "UnitaryBlock",
    "register_backbone",
]
