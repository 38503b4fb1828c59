"""graphspace.nn.conv: message-passing layers (graph metanetwork, EGNN, sheaf, unitary,
subgraph-equivariant)."""

from graphspace.nn.conv.egnn_conv import EGNN, EGNNConv
from graphspace.nn.conv.metanetwork_conv import MetaNetworkConv
from graphspace.nn.conv.sheaf_conv import (
    ConnectionLaplacian,
    ConnectionSheafConv,
    SheafConv,
    SheafLaplacian,
)
from graphspace.nn.conv.subgraph_conv import DSConv, DSSConv, SPENConv, SubgraphBagPool
from graphspace.nn.conv.unitary_conv import GUMPConv, LieUnitaryConv, UnitaryConv

__all__ = [
    "EGNN",
    "ConnectionLaplacian",
    "ConnectionSheafConv",
    "DSConv",
    "DSSConv",
    "EGNNConv",
    "GUMPConv",
    "LieUnitaryConv",
    "MetaNetworkConv",
    "SPENConv",
    "SheafConv",
    "SheafLaplacian",
    "SubgraphBagPool",
    "UnitaryConv",
]
