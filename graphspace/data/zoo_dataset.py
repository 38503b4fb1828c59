r"""Common machinery of the model-zoo datasets (PyG `Dataset` pattern, processed cache).

`process()` reads a zoo's raw files once and writes one compact file per split under
`root/processed`: every network as a flat float32 parameter vector (or, for lazy zoos of
large heterogeneous networks, the path of its checkpoint), its architecture, target and
metadata -- tensors, strings and numbers only, loaded back with `torch.load(...,
weights_only=True)`. Parameter graphs are built on access with one
[`GraphBuilder`][graphspace.data.weights.GraphBuilder] per architecture, which is far smaller on
disk than collated graphs (the Small CNN Zoo's 15k training networks take 300 MB as vectors, 3 GB as
graphs) and as fast to read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Dataset

from graphspace.data._io import write_file as atomic_write
from graphspace.data.weights import GraphBuilder
from graphspace.graphs import ParameterGraph, ParamRecord
from graphspace.io import UntrustedCheckpointError

__all__ = ["SPLITS", "StoreWriter", "WeightZooDataset", "load_checkpoint"]

SPLITS = ("train", "val", "test")


def arch_key(arch: Mapping[str, Any]) -> str:
    """Canonical JSON of an architecture description."""
    return json.dumps(arch, sort_keys=True)


def load_checkpoint(path: str | os.PathLike, trusted: bool = False) -> Any:
    """`torch.load` a checkpoint on the CPU with `weights_only=True`.

    `trusted=True` allows full unpickling (arbitrary code!) for files from a source you trust
    that store non-tensor Python objects (e.g. OmegaConf configs).
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"refusing to unpickle '{path}' ({str(e).splitlines()[0]}). If you trust its "
            "source, pass trusted=True to the dataset."
        ) from e


class StoreWriter:
    """Accumulates the networks of one split and writes the processed file."""

    def __init__(self) -> None:
        self.archs: list[str] = []
        self._arch_index: dict[str, int] = {}
        self.arch: list[int] = []
        self.flats: list[Tensor] = []
        self.paths: list[str] = []
        self.y: list[Any] = []
        self.fields: dict[str, list[float]] = {}
        self.info: dict[str, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.arch)

    def add(self, arch: Mapping[str, Any], y: float | int, flat: Tensor | None = None,
            path: str | None = None, fields: Mapping[str, float] | None = None,
            info: Mapping[str, Any] | None = None) -> None:
        """Add one network: its flat parameters (or checkpoint path), target, per-graph numeric
        `fields` (become `[1]` graph attributes) and non-tensor `info` (kept per split)."""
        k = arch_key(arch)
        if k not in self._arch_index:
            self._arch_index[k] = len(self.archs)
            self.archs.append(k)
        n = len(self.arch)
        self.arch.append(self._arch_index[k])
        if (flat is None) == (path is None):
            raise ValueError("give exactly one of flat and path")
        if flat is not None:
            if self.paths:
                raise ValueError("cannot mix flat vectors and paths in one store")
            self.flats.append(flat.reshape(-1).float())
        else:
            if self.flats:
                raise ValueError("cannot mix flat vectors and paths in one store")
            self.paths.append(str(path))
        self.y.append(y)
        for name, store in ((fields, self.fields), (info, self.info)):
            for key, v in (name or {}).items():
                store.setdefault(key, [None] * n).append(v)
            for lst in store.values():
                if len(lst) < n + 1:
                    lst.append(None)

    def to_dict(self) -> dict[str, Any]:
        y = torch.tensor(self.y)
        if not y.is_floating_point():
            y = y.long()
        out: dict[str, Any] = {
            "version": 1,
            "archs": list(self.archs),
            "arch": torch.tensor(self.arch, dtype=torch.long),
            "y": y,
            "fields": {k: _field_tensor(vals) for k, vals in self.fields.items()},
            "info": {k: list(v) for k, v in self.info.items()},
        }
        if self.flats or not self.paths:
            sizes = torch.tensor([0] + [f.numel() for f in self.flats], dtype=torch.long)
            out["offset"] = torch.cumsum(sizes, 0)
            out["flat"] = torch.cat(self.flats) if self.flats else torch.zeros(0)
        else:
            out["path"] = list(self.paths)
        return out

    def save(self, path: str | os.PathLike) -> None:
        d = self.to_dict()
        atomic_write(path, lambda p: torch.save(d, p))


def _field_tensor(vals: Sequence[Any]) -> Tensor:
    """Integer fields (epochs, indices) as `long` (-1 where missing), others as float."""
    if all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in vals):
        return torch.tensor([-1 if v is None else v for v in vals], dtype=torch.long)
    return torch.tensor([float("nan") if v is None else float(v) for v in vals])


class WeightZooDataset(Dataset):
    r"""Base class of the zoo datasets: one split of a collection of trained networks, each
    returned as a [`ParameterGraph`][graphspace.graphs.ParameterGraph] with target `y` (shape
    `[1]`).

    Subclasses define `raw_file_names`, `download`,
    [`processing_params`][graphspace.data.zoo_dataset.WeightZooDataset.processing_params] (what the
    processed content depends on),
    [`read_splits`][graphspace.data.zoo_dataset.WeightZooDataset.read_splits] (the networks of every
    split, written once by `process`) and
    [`build_model`][graphspace.data.zoo_dataset.WeightZooDataset.build_model] (an `nn.Module` of an
    architecture description). Lazy zoos override
    [`load_state_dict`][graphspace.data.zoo_dataset.WeightZooDataset.load_state_dict].

    Args:
        root: dataset directory (`root/raw`, `root/processed`).
        split: `"train"`, `"val"` or `"test"`.
        kernel: parameter-graph kernel mode, `"edge"` (Graph Metanetworks) or `"channel"`
            (Neural Graphs).
        kernel_pad: spatial size kernels are padded to with `kernel="channel"` (default: the
            largest kernel of each architecture; fix it to batch architectures together).
        transform: transform applied to every graph on access (augmentations, normalisation).
        force_reload: re-process the raw files.
        log: print PyG's processing messages.
    """

    name: str = "zoo"

    def __init__(self, root: str, split: str = "train", *, kernel: str = "edge",
                 kernel_pad: Sequence[int] | None = None, transform: Callable | None = None,
                 force_reload: bool = False, log: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if kernel not in ("edge", "channel"):
            raise ValueError(f"kernel must be 'edge' or 'channel', got {kernel!r}")
        self.split = split
        self.kernel = kernel
        self.kernel_pad = tuple(kernel_pad) if kernel_pad is not None else None
        self._builders: dict[int, GraphBuilder] = {}
        super().__init__(root, transform, None, None, log=log, force_reload=force_reload)
        self._store = torch.load(self.processed_paths[0], map_location="cpu", weights_only=True)
        self._archs = [json.loads(a) for a in self._store["archs"]]

    # -- to be provided by subclasses ---------------------------------------------------------
    def processing_params(self) -> dict[str, Any]:
        """JSON-able parameters that determine the processed files."""
        return {}

    def read_splits(self) -> dict[str, StoreWriter]:
        """Read the raw files: one [`StoreWriter`][graphspace.data.zoo_dataset.StoreWriter] per
        split."""
        raise NotImplementedError

    def build_model(self, arch: Mapping[str, Any]) -> nn.Module:
        """A module of the architecture described by `arch` (any initial weights)."""
        raise NotImplementedError

    def load_state_dict(self, path: str, arch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Load the weights of a lazily stored network."""
        raise NotImplementedError

    # -- PyG plumbing ---------------------------------------------------------------------------
    @property
    def processed_file_names(self) -> list[str]:
        key = json.dumps({"cls": type(self).__name__, **self.processing_params()},
                         sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return [f"{self.name}_{self.split}_{digest}.pt"]

    def process(self) -> None:
        splits = self.read_splits()
        base = self.processed_file_names[0]
        for s in SPLITS:
            name = base.replace(f"{self.name}_{self.split}_", f"{self.name}_{s}_", 1)
            splits[s].save(os.path.join(self.processed_dir, name))

    def len(self) -> int:
        return int(self._store["arch"].numel())

    # -- access ---------------------------------------------------------------------------------
    @property
    def architectures(self) -> list[dict[str, Any]]:
        """The distinct architecture descriptions of this split."""
        return list(self._archs)

    def arch(self, idx: int) -> dict[str, Any]:
        """The architecture description of network `idx`."""
        return self._archs[int(self._store["arch"][idx])]

    def builder(self, arch_index: int) -> GraphBuilder:
        """The (cached) [`GraphBuilder`][graphspace.data.zoo_dataset.GraphBuilder] of
        architecture `arch_index`."""
        b = self._builders.get(arch_index)
        if b is None:
            b = GraphBuilder(self.build_model(self._archs[arch_index]), kernel=self.kernel,
                             kernel_pad=self.kernel_pad)
            self._builders[arch_index] = b
        return b

    def flat(self, idx: int) -> Tensor:
        """The flat parameter vector of network `idx` (state-dict order, PyTorch layout)."""
        s = self._store
        if "flat" in s:
            return s["flat"][int(s["offset"][idx]):int(s["offset"][idx + 1])]
        a = int(s["arch"][idx])
        return self.builder(a).flatten(self.load_state_dict(s["path"][idx], self._archs[a]))

    def state_dict(self, idx: int) -> dict[str, Tensor]:
        """The weights of network `idx`."""
        return self.builder(int(self._store["arch"][idx])).unflatten(self.flat(idx))

    def model(self, idx: int) -> nn.Module:
        """Network `idx` as a module (in eval mode)."""
        m = self.build_model(self.arch(idx))
        m.load_state_dict(self.state_dict(idx))
        return m.eval()

    def info(self, key: str) -> list[Any]:
        """Per-network metadata of this split (e.g. hyper-parameters, paths)."""
        return list(self._store["info"][key])

    @property
    def y(self) -> Tensor:
        """All targets of this split."""
        return self._store["y"]

    def get(self, idx: int) -> ParameterGraph:
        s = self._store
        g = self.builder(int(s["arch"][idx])).build(self.flat(idx))
        g.y = s["y"][idx:idx + 1].clone()
        for k, t in s["fields"].items():
            setattr(g, k, t[idx:idx + 1].clone())
        return g

    def iter_state_dicts(self) -> Iterator[tuple[list[ParamRecord], dict[str, Tensor]]]:
        """`(records, state_dict)` for every network (used by
        [`compute_statistics`][graphspace.data.compute_statistics])."""
        for i in range(self.len()):
            b = self.builder(int(self._store["arch"][i]))
            yield b.records, b.unflatten(self.flat(i))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.len()}, split={self.split!r})"
