"""graphspace.data: model-zoo datasets, zoo generators, weight-space augmentations.

* datasets (PyG `Dataset` pattern, processed cache in `root/processed`):
  [`SmallCNNZoo`][graphspace.data.SmallCNNZoo] (Unterthiner et al. 2020 format),
  [`INRZoo`][graphspace.data.INRZoo] (DWSNets / Neural Graphs INRs),
  [`NFNSirenZoo`][graphspace.data.NFNSirenZoo] (NFN's SIRENs),
  [`CNNWildPark`][graphspace.data.CNNWildPark] (heterogeneous CNNs);
* generators (offline, sharded, resumable): `graphspace.data.generators`;
* augmentations on parameter graphs: `graphspace.data.augment`;
* normalisation statistics (training split only) and LightningDataModules.
"""

from typing import Any

from graphspace.data.augment import (
    GaussianWeightNoise,
    RandomNeuronPermutation,
    RandomPositiveRescaling,
    RandomSignFlip,
    SirenBiasShift,
    WeightDropout,
    WeightMixUp,
    mixup_graphs,
    mixup_state_dicts,
)
from graphspace.data.inr_zoo import DWSNetsINR, INRZoo, NFNSiren, NFNSirenZoo
from graphspace.data.probe import ProbeFeatures
from graphspace.data.small_cnn_zoo import (
    SmallCNNZoo,
    read_layout,
    read_metrics,
    read_split_file,
    small_cnn_layout,
    small_cnn_protocol_split,
    tf_to_torch,
    torch_to_tf,
    write_small_cnn_zoo,
)
from graphspace.data.weights import (
    GraphBuilder,
    NormalizeWeights,
    WeightStatistics,
    compute_statistics,
    map_records,
    set_state_dict,
)
from graphspace.data.wild_park import ChannelResidual, CNNWildPark, WildParkCNN
from graphspace.data.zoo_dataset import StoreWriter, WeightZooDataset, load_checkpoint

_LAZY = {name: "graphspace.data.datamodules" for name in (
    "CNNWildParkDataModule", "INRZooDataModule", "NFNSirenZooDataModule",
    "SmallCNNZooDataModule", "WeightSpaceDataModule")}


def __getattr__(name: str) -> Any:  # Lightning is imported on first use of a DataModule
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphspace.data' has no attribute {name!r}")


try:  # written by another worker
    from graphspace.data.nbody import NBodyCharged
except ImportError:  # pragma: no cover
    pass

__all__ = [
    "CNNWildPark",
    "CNNWildParkDataModule",
    "ChannelResidual",
    "DWSNetsINR",
    "GaussianWeightNoise",
    "GraphBuilder",
    "INRZoo",
    "INRZooDataModule",
    "NBodyCharged",
    "NFNSiren",
    "NFNSirenZoo",
    "NFNSirenZooDataModule",
    "NormalizeWeights",
    "ProbeFeatures",
    "RandomNeuronPermutation",
    "RandomPositiveRescaling",
    "RandomSignFlip",
    "SirenBiasShift",
    "SmallCNNZoo",
    "SmallCNNZooDataModule",
    "StoreWriter",
    "WeightDropout",
    "WeightMixUp",
    "WeightSpaceDataModule",
    "WeightStatistics",
    "WeightZooDataset",
    "WildParkCNN",
    "compute_statistics",
    "load_checkpoint",
    "map_records",
    "mixup_graphs",
    "mixup_state_dicts",
    "read_layout",
    "read_metrics",
    "read_split_file",
    "set_state_dict",
    "small_cnn_layout",
    "small_cnn_protocol_split",
    "tf_to_torch",
    "torch_to_tf",
    "write_small_cnn_zoo",
]
if "NBodyCharged" not in globals():  # pragma: no cover
    __all__.remove("NBodyCharged")
