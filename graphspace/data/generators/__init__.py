"""Offline zoo generators (Python API of ``graphspace zoo ...``).

* :func:`generate_cnn_zoo` -- Small CNNs in the Small CNN Zoo's hyper-parameter space and file
  format (read with :class:`~graphspace.data.SmallCNNZoo`);
* :func:`generate_hetero_zoo` -- heterogeneous CNNs in the CNN Wild Park format
  (:class:`~graphspace.data.CNNWildPark`);
* :func:`generate_inr_zoo` -- SIRENs fitted to images, DWSNets layout
  (:class:`~graphspace.data.INRZoo`);
* :func:`merge_zoo` -- gather shards built in several directories.

All run on scikit-learn's bundled digits by default (or any :class:`ImageSource`), use all CPU
cores, are deterministic given the seed, shardable and resumable (see
:mod:`graphspace.data.generators.runner`).
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
