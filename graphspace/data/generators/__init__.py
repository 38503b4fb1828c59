"""Offline zoo generators (Python API of `graphspace zoo ...`).

* [`generate_cnn_zoo`][graphspace.data.generators.generate_cnn_zoo] -- Small CNNs in the Small CNN
  Zoo's hyper-parameter space and file format (read with
  [`SmallCNNZoo`][graphspace.data.SmallCNNZoo]);
* [`generate_hetero_zoo`][graphspace.data.generators.generate_hetero_zoo] -- heterogeneous CNNs in
  the CNN Wild Park format ([`CNNWildPark`][graphspace.data.CNNWildPark]);
* [`generate_inr_zoo`][graphspace.data.generators.generate_inr_zoo] -- SIRENs fitted to images,
  DWSNets layout ([`INRZoo`][graphspace.data.INRZoo]);
* [`merge_zoo`][graphspace.data.generators.merge_zoo] -- gather shards built in several directories.

All run on scikit-learn's bundled digits by default (or any `ImageSource`), use all CPU
cores, are deterministic given the seed, shardable and resumable (see
`graphspace.data.generators.runner`).
"""

from graphspace.data.generators.cnn import (
    DEFAULT_CHECKPOINTS,
    PAPER_CHECKPOINTS,
    SMALL_CNN_SPACE,
    CNNZooJob,
    generate_cnn_zoo,
)
from graphspace.data.generators.hetero import HETERO_SPACE, HeteroZooJob, generate_hetero_zoo
from graphspace.data.generators.inr import INRZooJob, generate_inr_zoo
from graphspace.data.generators.runner import (
    Chunk,
    ZooConfigError,
    ZooJob,
    ZooStatus,
    merge_zoo,
    parse_shard,
    run_zoo,
    zoo_status,
)
from graphspace.data.generators.sources import (
    ImageSource,
    load_digits_source,
    load_mnist_source,
    load_source,
)

__all__ = [
    "DEFAULT_CHECKPOINTS",
    "HETERO_SPACE",
    "PAPER_CHECKPOINTS",
    "SMALL_CNN_SPACE",
    "CNNZooJob",
    "Chunk",
    "HeteroZooJob",
    "INRZooJob",
    "ImageSource",
    "ZooConfigError",
    "ZooJob",
    "ZooStatus",
    "generate_cnn_zoo",
    "generate_hetero_zoo",
    "generate_inr_zoo",
    "load_digits_source",
    "load_mnist_source",
    "load_source",
    "merge_zoo",
    "parse_shard",
    "run_zoo",
    "zoo_status",
]
