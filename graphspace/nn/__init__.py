"""graphspace.nn: PyG layers and graph metanetwork models.

`from graphspace.nn import EGNNConv, SheafConv, GraphMetaNetwork, ...`; the layers live in
`graphspace.nn.conv`, the models and backbones in `graphspace.nn.models`.
"""

from graphspace.nn.conv import (
    EGNN,
    ConnectionLaplacian,
    ConnectionSheafConv,
    DSConv,
    DSSConv,
    EGNNConv,
    GUMPConv,
    LieUnitaryConv,
    MetaNetworkConv,
    SheafConv,
    SheafLaplacian,
    SPENConv,
    SubgraphBagPool,
    UnitaryConv,
)
from graphspace.nn.models import (
    BACKBONES,
    GraphMetaNetwork,
    ParameterGraphEncoder,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "EGNN",
    "ConnectionLaplacian",
    "ConnectionSheafConv",
    "DSConv",
    "DSSConv",
    "EGNNConv",
    "GUMPConv",
    "GraphMetaNetwork",
    "LieUnitaryConv",
    "MetaNetworkConv",
    "ParameterGraphEncoder",
    "SPENConv",
    "SheafConv",
    "SheafLaplacian",
    "SubgraphBagPool",
    "UnitaryConv",
    "register_backbone",
]
