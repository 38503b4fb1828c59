"""LightningDataModules for the zoo datasets.

Each module builds the three splits, computes per-layer normalisation statistics on the
*training* split only ([`compute_statistics`][graphspace.data.compute_statistics]) and composes the
transforms of every split as `augmentations` (training only) -> `transforms` (all splits, e.g.
[`graphspace.tasks.features.AttachWeightFeatures`][graphspace.tasks.features.AttachWeightFeatures])
-> [`NormalizeWeights`][graphspace.data.NormalizeWeights].
Batches are PyG `Batch` objects of parameter graphs.

With `generate=True` a missing zoo is generated offline in `prepare_data` (scikit-learn
digits by default; `generate_kwargs` are passed to the generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch_geometric.loader import DataLoader
from torch_geometric.transforms import Compose

from graphspace.data.inr_zoo import INRZoo, NFNSirenZoo
from graphspace.data.small_cnn_zoo import SmallCNNZoo
from graphspace.data.weights import NormalizeWeights, WeightStatistics, compute_statistics
from graphspace.data.wild_park import CNNWildPark
from graphspace.data.zoo_dataset import WeightZooDataset

__all__ = [
    "CNNWildParkDataModule",
    "INRZooDataModule",
    "NFNSirenZooDataModule",
    "SmallCNNZooDataModule",
    "WeightSpaceDataModule",
]


class WeightSpaceDataModule(pl.LightningDataModule):
    """Base class: subclasses implement `make_dataset` (and `generate`).

    Args:
        batch_size: training batch size (32).
        eval_batch_size: validation / test batch size (default: `batch_size`).
        num_workers: DataLoader worker processes (0).
        normalize: standardise weights with training-split statistics.
        per_element_stats: one mean / std per weight entry instead of per tensor.
        augmentations: transforms applied to training graphs only (first).
        transforms: transforms applied to every split (after augmentations, before
            normalisation), e.g. feature extractors that need the raw weights; one with a
            `fit(dataset)` method ([`ProbeFeatures`][graphspace.data.ProbeFeatures]) is first fitted
            on the raw training split.
        generate: generate the zoo in `prepare_data` when its raw files are missing.
        generate_kwargs: keyword arguments of the generator.
        seed: seed of the training DataLoader's shuffling.
    """

    def __init__(self, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 0, normalize: bool = True, per_element_stats: bool = False,
                 augmentations: Sequence[Callable] | None = None,
                 transforms: Sequence[Callable] | None = None, generate: bool = False,
                 generate_kwargs: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.normalize = normalize
        self.per_element_stats = per_element_stats
        self.augmentations = list(augmentations or [])
        self.transforms = list(transforms or [])
        self.generate_zoo = generate
        self.generate_kwargs = dict(generate_kwargs or {})
        self.seed = seed
        self.stats: WeightStatistics | None = None
        self.train_set: WeightZooDataset | None = None
        self.val_set: WeightZooDataset | None = None
        self.test_set: WeightZooDataset | None = None

    # -- subclass API -------------------------------------------------------------------------
    root: str

    def make_dataset(self, split: str) -> WeightZooDataset:
        raise NotImplementedError

    def raw_ready(self) -> bool:
        """Whether the zoo's raw files exist."""
        raise NotImplementedError

    def generate(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot generate its zoo")

    # -- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.generate_zoo and not self.raw_ready():
            self.generate()
        self.make_dataset("train")  # processes the raw files once (all splits)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self.make_dataset("train")
        self.val_set = self.make_dataset("val")
        self.test_set = self.make_dataset("test")
        for t in self.transforms:  # transforms with statistics learn them from training data
            fit = getattr(t, "fit", None)
            if callable(fit):
                fit(self.train_set)
        tail: list[Callable] = list(self.transforms)
        if self.normalize:
            self.stats = compute_statistics(self.train_set, per_element=self.per_element_stats)
            tail.append(NormalizeWeights(self.stats))
        train_t = self.augmentations + tail
        self.train_set.transform = Compose(train_t) if train_t else None
        for ds in (self.val_set, self.test_set):
            ds.transform = Compose(tail) if tail else None

    def _loader(self, ds: WeightZooDataset | None, train: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("call setup() first")
        gen = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, num_workers=self.num_workers, generator=gen,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


class SmallCNNZooDataModule(WeightSpaceDataModule):
    """[`SmallCNNZoo`][graphspace.data.SmallCNNZoo] splits (generalisation prediction).

    Args:
        root: zoo directory (`root/raw` in the Small CNN Zoo format).
        dataset: public zoo to download (`"mnist"`, ...); `None` for local zoos.
        epochs, split_file, test_fraction, val_fraction, split_seed, target, kernel: see
            [`SmallCNNZoo`][graphspace.data.SmallCNNZoo] (the defaults are the standard protocol:
            half of the networks are the test set).
        **kwargs: see [`WeightSpaceDataModule`][graphspace.data.datamodules.WeightSpaceDataModule]
            (`generate=True` runs
            [`generate_cnn_zoo`][graphspace.data.generators.generate_cnn_zoo]).
    """

    def __init__(self, root: str, dataset: str | None = None,
                 epochs: int | list[int] | str = "final", split_file: str | None = "auto",
                 test_fraction: float = 0.5, val_fraction: float = 0.2, split_seed: int = 0,
                 target: str = "test_accuracy", kernel: str = "edge", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.dataset_kwargs = {"dataset": dataset, "epochs": epochs, "split_file": split_file,
                               "test_fraction": test_fraction, "val_fraction": val_fraction,
                               "split_seed": split_seed, "target": target, "kernel": kernel}

    def make_dataset(self, split: str) -> WeightZooDataset:
        return SmallCNNZoo(self.root, split, **self.dataset_kwargs)

    def raw_ready(self) -> bool:
        return (Path(self.root) / "raw" / "weights.npy").exists()

    def generate(self) -> None:
        from graphspace.data.generators import generate_cnn_zoo

        generate_cnn_zoo(self.root, **self.generate_kwargs)


class INRZooDataModule(WeightSpaceDataModule):
    """[`INRZoo`][graphspace.data.INRZoo] splits (INR classification).

    Args:
        root: zoo directory (`root/raw/<splits_file>` and the INR files).
        splits_file, dataset, kernel: see [`INRZoo`][graphspace.data.INRZoo].
        **kwargs: see [`WeightSpaceDataModule`][graphspace.data.datamodules.WeightSpaceDataModule]
            (`generate=True` runs
            [`generate_inr_zoo`][graphspace.data.generators.generate_inr_zoo]).
    """

    def __init__(self, root: str, splits_file: str = "splits.json", dataset: str | None = None,
                 kernel: str = "edge", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.dataset_kwargs = {"splits_file": splits_file, "dataset": dataset, "kernel": kernel}

    def make_dataset(self, split: str) -> WeightZooDataset:
        return INRZoo(self.root, split, **self.dataset_kwargs)

    def raw_ready(self) -> bool:
        return (Path(self.root) / "raw" / self.dataset_kwargs["splits_file"]).exists()

    def generate(self) -> None:
        from graphspace.data.generators import generate_inr_zoo

        generate_inr_zoo(self.root, **self.generate_kwargs)


class NFNSirenZooDataModule(WeightSpaceDataModule):
    """[`NFNSirenZoo`][graphspace.data.NFNSirenZoo] splits (NFN's SIREN layout).

    Args:
        root: directory whose `raw` holds the `<prefix>_<d>s` folders.
        prefix, split_points, kernel: see [`NFNSirenZoo`][graphspace.data.NFNSirenZoo].
        **kwargs: see [`WeightSpaceDataModule`][graphspace.data.datamodules.WeightSpaceDataModule].
    """

    def __init__(self, root: str, prefix: str = "randinit_smaller",
                 split_points: tuple[int, int] = (45000, 50000), kernel: str = "edge",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.dataset_kwargs = {"prefix": prefix, "split_points": tuple(split_points),
                               "kernel": kernel}

    def make_dataset(self, split: str) -> WeightZooDataset:
        return NFNSirenZoo(self.root, split, **self.dataset_kwargs)

    def raw_ready(self) -> bool:
        return (Path(self.root) / "raw").is_dir()


class CNNWildParkDataModule(WeightSpaceDataModule):
    """[`CNNWildPark`][graphspace.data.CNNWildPark] splits (heterogeneous generalisation
    prediction).

    Args:
        root: zoo directory.
        splits_file, epochs, trusted, in_memory, kernel, kernel_pad: see
            [`CNNWildPark`][graphspace.data.CNNWildPark]. `kernel="channel"` batches different
            kernel sizes only with a fixed `kernel_pad` (e.g. `[7, 7]`).
        **kwargs: see [`WeightSpaceDataModule`][graphspace.data.datamodules.WeightSpaceDataModule]
            (`generate=True` runs
            [`generate_hetero_zoo`][graphspace.data.generators.generate_hetero_zoo]).
    """

    def __init__(self, root: str, splits_file: str = "splits.json",
                 epochs: int | list[int] | str = "all", trusted: bool = False,
                 in_memory: bool = False, kernel: str = "edge",
                 kernel_pad: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.dataset_kwargs = {"splits_file": splits_file, "epochs": epochs, "trusted": trusted,
                               "in_memory": in_memory, "kernel": kernel,
                               "kernel_pad": kernel_pad}

    def make_dataset(self, split: str) -> WeightZooDataset:
        return CNNWildPark(self.root, split, **self.dataset_kwargs)

    def raw_ready(self) -> bool:
        return (Path(self.root) / "raw" / self.dataset_kwargs["splits_file"]).exists()

    def generate(self) -> None:
        from graphspace.data.generators import generate_hetero_zoo

        generate_hetero_zoo(self.root, **self.generate_kwargs)
