r"""The Small CNN Zoo (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights").

30k CNNs per image dataset (MNIST, Fashion-MNIST, CIFAR-10 and SVHN in grayscale), each three
3x3 stride-2 convolutions of 16 channels (`valid` padding), global average pooling and a
dense layer of 10 outputs: 4970 parameters for 1-channel inputs
(`graphspace.testing.models.SmallCNN`). Every run was checkpointed at epochs 0, 1, 2, 3,
20, 40, 60, 80 and 86. The published files are

* `weights.npy`: one row per checkpoint, the TensorFlow variables concatenated; convolution
  kernels in `HWIO` layout and dense kernels `(in, out)`, converted here to PyTorch's
  `OIHW` / `(out, in)`;
* `metrics.csv.gz`: one row per checkpoint: `config.*` hyper-parameter columns
  (`config.activation`, `config.w_init`, `config.init_std`, `config.learning_rate`,
  `config.optimizer`, `config.l2reg`, `config.dropout`, `config.train_fraction`,
  `config.epochs`, ...), `modeldir`, `step` (the epoch), `test_accuracy`,
  `test_loss`, `train_accuracy`, `train_loss`;
* `layout.csv`: `varname,start_idx,end_idx,shape` -- the column range and shape of every
  variable in a row.

**Standard protocol** (NFN, Zhou et al. 2023; Neural Graphs, Kofinas et al. 2024): the rows are
reordered by the published permutation file (`{mnist,fashion_mnist,cifar10,svhn}_split.csv`
of the NFN repository, read without a header: its first line, `0`, is the header pandas wrote
and becomes a leading row index `0`), the final checkpoints (`step == 86`) are kept, the
second half is the test set and the first half is shuffled with `random.Random(0)` and split
80/20 into train/val. With other epochs, each run stays in one split.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.data import Batch

from graphspace.data._io import write_file as atomic_write
from graphspace.data.zoo_dataset import SPLITS, StoreWriter, WeightZooDataset
from graphspace.testing.models import SmallCNN

__all__ = [
    "KERAS_ACTIVATIONS",
    "LayoutRow",
    "SmallCNNZoo",
    "read_layout",
    "read_metrics",
    "read_split_file",
    "small_cnn_layout",
    "small_cnn_protocol_split",
    "tf_to_torch",
    "torch_to_tf",
    "write_small_cnn_zoo",
]

ZOO_URL = "https://storage.googleapis.com/gresearch/smallcnnzoo-dataset/{name}.tar.xz"
SPLIT_URL = ("https://raw.githubusercontent.com/AllanYangZhou/nfn/main/experiments/"
             "predict_gen_data_splits/{name}_split.csv")
PUBLIC_ZOOS = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10",
               "svhn_cropped": "svhn"}

#: Keras activation names of ``config.activation`` -> PyTorch modules
KERAS_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "selu": nn.SELU, "elu": nn.ELU,
    "linear": nn.Identity, "softplus": nn.Softplus, "gelu": nn.GELU, "swish": nn.SiLU,
    "silu": nn.SiLU,
}

METRIC_COLUMNS = ("test_accuracy", "test_loss", "train_accuracy", "train_loss")


@dataclass
class LayoutRow:
    """One line of `layout.csv`: variable `varname` occupies columns `[start, end)`."""

    varname: str
    start: int
    end: int
    shape: tuple[int, ...]


# ----------------------------------------------------------------------------------------------
# Raw files
# ----------------------------------------------------------------------------------------------


def read_layout(path: str | os.PathLike) -> list[LayoutRow]:
    """Read `layout.csv` (`varname,start_idx,end_idx,shape`; shape like `(3, 3, 1, 16)`)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            shape = ast.literal_eval(r["shape"].strip())
            shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
            start, end = int(r["start_idx"]), int(r["end_idx"])
            if end - start != math.prod(shape):
                raise ValueError(f"layout row {r['varname']}: [{start}, {end}) does not hold "
                                 f"{shape}")
            rows.append(LayoutRow(r["varname"].strip(), start, end, shape))
    return rows


def read_metrics(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read `metrics.csv.gz` (or an uncompressed CSV) into columns of strings. A leading
    unnamed index column is dropped."""
    opener: Callable[..., Any] = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        cols: list[list[str]] = [[] for _ in header]
        for row in reader:
            for c, v in zip(cols, row):
                c.append(v)
    out = dict(zip(header, cols))
    if header and header[0] in ("", "Unnamed: 0"):
        out.pop(header[0])
    return out


def read_split_file(path: str | os.PathLike, keep_leading_zero: bool = True) -> list[int]:
    """Read a permutation file of row indices, one per line.

    The NFN files start with a line `0` that pandas wrote as the column name; NFN reads them
    with `header=None` so that `0` is a (duplicated) leading index. `keep_leading_zero`
    reproduces that; `False` drops the first line when it is `0` and the rest is a full
    permutation.
    """
    with open(path) as f:
        vals = [int(float(v)) for v in (line.strip() for line in f) if v]
    if not keep_leading_zero and vals and vals[0] == 0 and \
            sorted(vals[1:]) == list(range(len(vals) - 1)):
        vals = vals[1:]
    return vals


def small_cnn_layout(in_channels: int = 1, channels: int = 16, num_classes: int = 10,
                     num_layers: int = 3, prefix: str = "sequential") -> list[LayoutRow]:
    """The `layout.csv` rows of the Small CNN Zoo architecture (bias before kernel per layer,
    as in the published files: `conv2d/bias` = columns 0..16, `conv2d/kernel` 16..160, ...,
    `dense/kernel` 4810..4970)."""
    rows: list[LayoutRow] = []
    off = 0
    cin = in_channels
    names = [f"conv2d{'' if i == 0 else f'_{i}'}" for i in range(num_layers)] + ["dense"]
    for i, name in enumerate(names):
        if i < num_layers:
            kshape: tuple[int, ...] = (3, 3, cin, channels)
            bshape: tuple[int, ...] = (channels,)
            cin = channels
        else:
            kshape, bshape = (channels, num_classes), (num_classes,)
        for var, shape in (("bias", bshape), ("kernel", kshape)):
            n = math.prod(shape)
            rows.append(LayoutRow(f"{prefix}/{name}/{var}:0", off, off + n, shape))
            off += n
    return rows


def tf_to_torch(arr: np.ndarray | Tensor, batched: bool = True) -> np.ndarray | Tensor:
    """TensorFlow kernel layout -> PyTorch: `HWIO -> OIHW` (conv), `(in, out) -> (out, in)`
    (dense). With `batched` the first axis indexes networks."""
    b = 1 if batched else 0
    nd = arr.ndim - b
    if nd == 4:
        perm = (3, 2, 0, 1)
    elif nd == 2:
        perm = (1, 0)
    else:
        return arr
    perm = tuple(range(b)) + tuple(p + b for p in perm)
    return arr.transpose(perm) if isinstance(arr, np.ndarray) else arr.permute(perm)


def torch_to_tf(arr: np.ndarray | Tensor, batched: bool = True) -> np.ndarray | Tensor:
    """PyTorch kernel layout -> TensorFlow: `OIHW -> HWIO`, `(out, in) -> (in, out)`."""
    b = 1 if batched else 0
    nd = arr.ndim - b
    if nd == 4:
        perm = (2, 3, 1, 0)
    elif nd == 2:
        perm = (1, 0)
    else:
        return arr
    perm = tuple(range(b)) + tuple(p + b for p in perm)
    return arr.transpose(perm) if isinstance(arr, np.ndarray) else arr.permute(perm)


def _layers(layout: Sequence[LayoutRow]) -> list[dict[str, LayoutRow]]:
    """Group layout rows by layer scope, in column order."""
    scopes: dict[str, dict[str, LayoutRow]] = {}
    for r in layout:
        scope, var = r.varname.rsplit("/", 1) if "/" in r.varname else ("", r.varname)
        kind = "kernel" if var.startswith("kernel") else "bias" if var.startswith("bias") \
            else None
        if kind is None:
            raise ValueError(f"layout variable {r.varname!r} is neither a kernel nor a bias")
        scopes.setdefault(scope, {})[kind] = r
    layers = sorted(scopes.values(), key=lambda d: min(r.start for r in d.values()))
    for d in layers:
        if "kernel" not in d:
            raise ValueError(f"layer without kernel in layout: {list(d.values())}")
    return layers


def _arch_from_layout(layout: Sequence[LayoutRow]) -> dict[str, int]:
    layers = _layers(layout)
    convs = [d for d in layers if len(d["kernel"].shape) == 4]
    dense = [d for d in layers if len(d["kernel"].shape) == 2]
    if len(convs) != 3 or len(dense) != 1 or layers[-1] is not dense[0]:
        raise ValueError("layout is not the Small CNN Zoo architecture (3 convs + 1 dense)")
    widths = {d["kernel"].shape[3] for d in convs}
    if len(widths) != 1 or any(d["kernel"].shape[:2] != (3, 3) for d in convs):
        raise ValueError("Small CNN Zoo convolutions must be 3x3 with one width")
    return {"in_channels": convs[0]["kernel"].shape[2], "channels": widths.pop(),
            "num_classes": dense[0]["kernel"].shape[1]}


def rows_to_state_dicts(rows: np.ndarray, layout: Sequence[LayoutRow]) -> dict[str, Tensor]:
    """Batched PyTorch state dict (every tensor `[n, *shape]`) of TF-layout rows `[n, P]`
    for `SmallCNN`."""
    layers = _layers(layout)
    names = ["conv1", "conv2", "conv3", "fc"]
    n = rows.shape[0]
    out: dict[str, Tensor] = {}
    for name, d in zip(names, layers):
        k = d["kernel"]
        kern = np.asarray(rows[:, k.start:k.end]).reshape((n, *k.shape))
        out[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(tf_to_torch(kern)))
        if "bias" in d:
            b = d["bias"]
            out[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(rows[:, b.start:b.end]))
        else:
            out[f"{name}.bias"] = torch.zeros(n, k.shape[-1], dtype=torch.float32)
    return out


def state_dicts_to_rows(sd: Mapping[str, Tensor], layout: Sequence[LayoutRow]) -> np.ndarray:
    """Inverse of `rows_to_state_dicts`: `[n, P]` float32 TF-layout rows."""
    layers = _layers(layout)
    names = ["conv1", "conv2", "conv3", "fc"]
    n = next(iter(sd.values())).shape[0]
    width = max(r.end for r in layout)
    rows = np.zeros((n, width), dtype=np.float32)
    for name, d in zip(names, layers):
        k = d["kernel"]
        w = sd[f"{name}.weight"].detach().cpu().float().numpy()
        rows[:, k.start:k.end] = torch_to_tf(w).reshape(n, -1)
        if "bias" in d:
            b = d["bias"]
            rows[:, b.start:b.end] = sd[f"{name}.bias"].detach().cpu().float().numpy()
    return rows


def write_small_cnn_zoo(
    directory: str | os.PathLike,
    rows: np.ndarray,
    metrics: Mapping[str, Sequence[Any]],
    layout: Sequence[LayoutRow],
    permutation: Sequence[int] | None = None,
    split_name: str = "split.csv",
) -> Path:
    """Write a zoo in the Small CNN Zoo file format (every file atomically).

    Args:
        directory: output directory (created).
        rows: `[checkpoints, P]` TensorFlow-layout weights.
        metrics: column name -> one value per row (written in the given column order).
        layout: [`small_cnn_layout`][graphspace.data.small_cnn_zoo.small_cnn_layout] rows.
        permutation: row permutation written as `split_name` in the NFN style (a first line
            `0` -- the header pandas writes -- then one index per line).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n = rows.shape[0]
    for k, v in metrics.items():
        if len(v) != n:
            raise ValueError(f"metrics column {k!r} has {len(v)} values for {n} rows")

    def npy(p: str) -> None:
        with open(p, "wb") as f:
            np.save(f, rows)

    def metrics_csv(p: str) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = list(metrics)
        w.writerow(cols)
        for i in range(n):
            w.writerow([_fmt(metrics[c][i]) for c in cols])
        with open(p, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 mtime=0) as f:  # byte-reproducible
            f.write(buf.getvalue().encode())

    def layout_csv(p: str) -> None:
        with open(p, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["varname", "start_idx", "end_idx", "shape"])
            for r in layout:
                w.writerow([r.varname, r.start, r.end, str(tuple(r.shape))])

    atomic_write(d / "weights.npy", npy)
    atomic_write(d / "metrics.csv.gz", metrics_csv)
    atomic_write(d / "layout.csv", layout_csv)
    if permutation is not None:
        text = "0\n" + "".join(f"{int(i)}\n" for i in permutation)
        atomic_write(d / split_name, lambda p: Path(p).write_text(text))
    return d


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _num(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")


# ----------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------


def small_cnn_protocol_split(num_units: int, test_fraction: float = 0.5,
                             val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[int]]:
    """NFN's split of `num_units` (already permuted) items: the last `test_fraction` is the
    test set; the rest is shuffled with `random.Random(seed)` and its last `val_fraction`
    is the validation set (`test_fraction=0.5, val_fraction=0.2, seed=0` is NFN's)."""
    tp = int((1 - test_fraction) * num_units)
    trainval = list(range(tp))
    vp = int((1 - val_fraction) * len(trainval))
    random.Random(seed).shuffle(trainval)
    return {"train": trainval[:vp], "val": trainval[vp:], "test": list(range(tp, num_units))}


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class SmallCNNZoo(WeightZooDataset):
    r"""The Small CNN Zoo, or a zoo in its file format (e.g. made by
    [`graphspace.data.generators.generate_cnn_zoo`][graphspace.data.generators.generate_cnn_zoo]),
    as parameter graphs with target `y` = a metrics column (default `test_accuracy`) and attribute
    `step` (the epoch).

    Raw files go to `root/raw` (`weights.npy`, `metrics.csv.gz`, `layout.csv` and
    optionally the permutation file). With `dataset` set to a public zoo (`"mnist"`,
    `"fashion_mnist"`, `"cifar10"`, `"svhn_cropped"`) missing files are downloaded.

    Args:
        root: dataset directory.
        split: `"train"`, `"val"` or `"test"`.
        epochs: which checkpoints: `"final"` (`step == config.epochs`, i.e. 86 for the
            published zoo -- the standard protocol), an epoch, a list of epochs, or `"all"`.
        split_file: the row permutation: `"auto"` (`raw/split.csv`, else
            `raw/<name>_split.csv` of the public zoo, else a seeded permutation), a path, or
            `None` (a permutation drawn with `split_seed`).
        keep_leading_zero: keep the split file's leading `0` as NFN does (see
            [`read_split_file`][graphspace.data.small_cnn_zoo.read_split_file]).
        test_fraction, val_fraction, split_seed: the protocol (0.5, 0.2, 0: NFN's).
        target: the metrics column used as `y`.
        dataset: public zoo to download when raw files are missing.
        kernel, kernel_pad, transform, force_reload, log: see
            [`WeightZooDataset`][graphspace.data.WeightZooDataset].

    Per-network hyper-parameters and metrics:
    [`info`][graphspace.data.small_cnn_zoo.SmallCNNZoo.info] (e.g. `info("config.optimizer")`).
    """

    name = "small_cnn_zoo"

    def __init__(self, root: str, split: str = "train", epochs: int | Sequence[int] | str = "final",
                 split_file: str | os.PathLike | None = "auto", keep_leading_zero: bool = True,
                 test_fraction: float = 0.5, val_fraction: float = 0.2, split_seed: int = 0,
                 target: str = "test_accuracy", dataset: str | None = None, *,
                 kernel: str = "edge", kernel_pad: Sequence[int] | None = None,
                 transform: Callable | None = None, force_reload: bool = False,
                 log: bool = False) -> None:
        if dataset is not None and dataset not in PUBLIC_ZOOS:
            raise ValueError(f"dataset must be one of {sorted(PUBLIC_ZOOS)}, got {dataset!r}")
        if isinstance(epochs, str) and epochs not in ("final", "all"):
            raise ValueError(f"epochs must be 'final', 'all', an int or a list, got {epochs!r}")
        self.epochs = epochs if isinstance(epochs, (str, int)) else [int(e) for e in epochs]
        self.split_file = split_file
        self.keep_leading_zero = keep_leading_zero
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.target = target
        self.dataset = dataset
        super().__init__(root, split, kernel=kernel, kernel_pad=kernel_pad, transform=transform,
                         force_reload=force_reload, log=log)

    @property
    def raw_file_names(self) -> list[str]:
        return ["weights.npy", "metrics.csv.gz", "layout.csv"]

    # -- fast access (flat vectors of few architectures in one tensor) ------------------------
    def _index(self) -> tuple[list[int], list[int]]:
        """Architecture index and flat-vector offset of every network, as Python lists."""
        idx = self.__dict__.get("_fast_index")
        if idx is None:
            idx = (self._store["arch"].tolist(), self._store["offset"].tolist())
            self.__dict__["_fast_index"] = idx
        return idx

    def _fields(self, idx: Tensor) -> dict[str, Tensor]:
        """`y` and the per-graph numeric fields of networks `idx` (`[n]` each)."""
        s = self._store
        return {"y": s["y"][idx], **{k: t[idx] for k, t in s["fields"].items()}}

    def get(self, idx: int) -> Any:
        """Network `idx` as a parameter graph. Structure tensors (`edge_index`, ...) are
        shared by the graphs of this dataset, as in PyG's `InMemoryDataset`: do not modify
        them in place (transforms that change them should assign new tensors)."""
        s = self._store
        if "flat" not in s:
            return super().get(idx)
        arch, off = self._index()
        s = self._store
        fields = {"y": s["y"][idx:idx + 1].clone()}
        for k, t in s["fields"].items():
            fields[k] = t[idx:idx + 1].clone()
        return self.builder(arch[idx]).build(s["flat"][off[idx]:off[idx + 1]], fields,
                                             share_structure=True)

    def _groups(self, indices: Sequence[int]) -> list[tuple[int, Tensor, Tensor, Tensor]]:
        """`(architecture, positions in indices, stored rows, flat vectors)` per architecture
        of the networks `indices` (dataset indices, mapped through `indices`)."""
        s = self._store
        all_idx = self.indices()
        rows = torch.as_tensor([all_idx[i] for i in indices], dtype=torch.long)
        off = s["offset"]
        archs = s["arch"][rows]
        out = []
        for a in archs.unique().tolist():
            pos = (archs == a).nonzero().flatten()
            r = rows[pos]
            n = self.builder(a).numel
            starts = off[r]
            if not bool((off[r + 1] - starts == n).all()):
                raise RuntimeError(f"stored networks of architecture {a} do not have {n} "
                                   "parameters")
            out.append((a, pos, r, s["flat"][starts.unsqueeze(1) + torch.arange(n)]))
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """`[self[i] for i in indices]`, built in one vectorised pass per architecture (what
        `torch.utils.data.DataLoader` calls to fetch a batch)."""
        if "flat" not in self._store or len(indices) == 0:
            return [self[i] for i in indices]
        out: list[Any] = [None] * len(indices)
        for a, pos, r, flats in self._groups(indices):
            graphs = self.builder(a).build_many(flats, self._fields(r), share_structure=True)
            for p, g in zip(pos.tolist(), graphs):
                out[p] = g
        if self.transform is not None:  # in index order, as [self[i] for i in indices]
            out = [self.transform(g) for g in out]
        return out

    def batch(self, indices: Sequence[int]) -> Batch:
        """`Batch.from_data_list([self[i] for i in indices])`, built in one vectorised pass
        ([`GraphBuilder.build_batch`][graphspace.data.GraphBuilder.build_batch]; ReLU and
        tanh networks mix) unless there is a transform. Use it as the collate function of a
        loader over indices:

        ```python
        loader = torch.utils.data.DataLoader(range(len(ds)), batch_size=32,
                                             shuffle=True, collate_fn=ds.batch)
        ```
        """
        indices = [int(i) for i in indices]
        s = self._store
        if self.transform is not None or "flat" not in s or not indices:
            return Batch.from_data_list(self.__getitems__(indices))
        all_idx = self.indices()
        rows = torch.as_tensor([all_idx[i] for i in indices], dtype=torch.long)
        archs = s["arch"][rows]
        uniq = archs.unique()
        builders = [self.builder(a) for a in uniq.tolist()]
        n = builders[0].numel
        starts = s["offset"][rows]
        if not bool((s["offset"][rows + 1] - starts == n).all()):  # several layouts
            return Batch.from_data_list(self.__getitems__(indices))
        flats = s["flat"][starts.unsqueeze(1) + torch.arange(n)]
        return builders[0].build_batch(flats, self._fields(rows), others=builders[1:],
                                       which=torch.searchsorted(uniq, archs))

    def _split_path(self) -> Path | None:
        if self.split_file is None:
            return None
        if self.split_file != "auto":
            return Path(self.split_file)
        cands = [Path(self.raw_dir) / "split.csv"]
        if self.dataset is not None:
            cands.append(Path(self.raw_dir) / f"{PUBLIC_ZOOS[self.dataset]}_split.csv")
        return next((c for c in cands if c.exists()), None)

    def processing_params(self) -> dict[str, Any]:
        sp = self._split_path()
        return {"epochs": self.epochs, "split_file": None if sp is None else str(sp.resolve()),
                "split_file_size": None if sp is None else sp.stat().st_size,
                "keep_leading_zero": self.keep_leading_zero, "test": self.test_fraction,
                "val": self.val_fraction, "seed": self.split_seed, "target": self.target,
                "raw": [(os.path.getsize(p), os.stat(p).st_mtime_ns) for p in self.raw_paths],
                "split_mtime": None if sp is None else sp.stat().st_mtime_ns}

    def download(self) -> None:
        """Download and extract a public Small CNN Zoo archive and NFN's split file (needs
        network; several GB)."""
        if self.dataset is None:
            raise FileNotFoundError(
                f"no Small CNN Zoo files in {self.raw_dir}: put weights.npy, metrics.csv.gz and "
                "layout.csv there, generate a zoo (graphspace zoo cnn), or pass dataset=...")
        from torch_geometric.data import download_url, extract_tar

        raw = Path(self.raw_dir)
        raw.mkdir(parents=True, exist_ok=True)
        archive = download_url(ZOO_URL.format(name=self.dataset), str(raw))
        extract_tar(archive, str(raw / "_extract"), mode="r:xz")
        for name in self.raw_file_names:
            found = next((Path(dp) / name for dp, _, fs in os.walk(raw / "_extract")
                          if name in fs), None)
            if found is None:
                raise FileNotFoundError(f"{name} not found in {archive}")
            os.replace(found, raw / name)
        shutil.rmtree(raw / "_extract", ignore_errors=True)
        os.unlink(archive)
        split_name = PUBLIC_ZOOS[self.dataset]
        download_url(SPLIT_URL.format(name=split_name), str(raw))

    def build_model(self, arch: Mapping[str, Any]) -> nn.Module:
        act = KERAS_ACTIVATIONS.get(str(arch.get("activation", "relu")).lower())
        if act is None:
            raise ValueError(f"unknown activation {arch.get('activation')!r}")
        return SmallCNN(int(arch["in_channels"]), int(arch["channels"]),
                        int(arch["num_classes"]), act=act)

    def read_splits(self) -> dict[str, StoreWriter]:
        raw = Path(self.raw_dir)
        layout = read_layout(raw / "layout.csv")
        base_arch = _arch_from_layout(layout)
        metrics = read_metrics(raw / "metrics.csv.gz")
        weights = np.load(raw / "weights.npy", mmap_mode="r")
        n_rows = weights.shape[0]
        if any(len(v) != n_rows for v in metrics.values()):
            raise ValueError(f"metrics.csv.gz has {len(next(iter(metrics.values())))} rows, "
                             f"weights.npy {n_rows}")
        if self.target not in metrics:
            raise KeyError(f"no metrics column {self.target!r}; columns: {sorted(metrics)}")
        sp = self._split_path()
        if sp is not None:
            perm = read_split_file(sp, self.keep_leading_zero)
            if perm and (min(perm) < 0 or max(perm) >= n_rows):
                raise ValueError(f"{sp} indexes rows outside [0, {n_rows})")
        else:
            perm = np.random.default_rng(self.split_seed).permutation(n_rows).tolist()
        steps = [int(round(_num(s))) for s in metrics["step"]]
        final = [int(round(_num(s))) for s in metrics["config.epochs"]] \
            if "config.epochs" in metrics else None
        runs = metrics.get("modeldir")
        if self.epochs == "final":
            if final is None:  # last checkpoint of each run
                last: dict[str, int] = {}
                for i, s in enumerate(steps):
                    key = runs[i] if runs else str(i)
                    last[key] = max(last.get(key, s), s)
                keep = [s == last[runs[i] if runs else str(i)] for i, s in enumerate(steps)]
            else:
                keep = [s == f for s, f in zip(steps, final)]
        elif self.epochs == "all":
            keep = [True] * n_rows
        else:
            wanted = {self.epochs} if isinstance(self.epochs, int) else set(self.epochs)
            keep = [s in wanted for s in steps]
        single = self.epochs == "final" or isinstance(self.epochs, int)
        sel = [r for r in perm if keep[r]]
        if not single:  # the leading-0 duplicate only matters for NFN's single-epoch protocol
            sel = list(dict.fromkeys(sel))
        if not sel:
            raise ValueError(f"no checkpoint matches epochs={self.epochs!r}")
        model = self.build_model({**base_arch, "activation": "relu"})
        keys = list(model.state_dict())
        n_par = sum(v.numel() for v in model.state_dict().values())
        flat = torch.empty(len(sel), n_par)
        finite = np.zeros(len(sel), dtype=bool)
        block = 8192  # bounded memory for the 270k-row published files
        for a in range(0, len(sel), block):
            rows = np.asarray(weights[np.asarray(sel[a:a + block])], dtype=np.float32)
            finite[a:a + len(rows)] = np.isfinite(rows).all(1)
            sd = rows_to_state_dicts(rows, layout)
            flat[a:a + len(rows)] = torch.cat([sd[k].reshape(len(rows), -1) for k in keys], 1)
        keep_idx = np.flatnonzero(finite)
        sel = [sel[i] for i in keep_idx]
        flat = flat[torch.from_numpy(keep_idx)] if len(keep_idx) < len(finite) else flat
        if single or runs is None:
            units = [[i] for i in range(len(sel))]
        else:
            order: dict[str, list[int]] = {}
            for i, r in enumerate(sel):
                order.setdefault(runs[r], []).append(i)
            units = list(order.values())
        parts = small_cnn_protocol_split(len(units), self.test_fraction, self.val_fraction,
                                         self.split_seed)
        acts = metrics.get("config.activation")
        cfg_cols = [c for c in metrics if c not in METRIC_COLUMNS and c != "step"]
        out = {}
        for s in SPLITS:
            w = StoreWriter()
            for u in parts[s]:
                for i in units[u]:
                    r = sel[i]
                    arch = {**base_arch, "activation": acts[r].lower() if acts else "relu"}
                    info = {c: metrics[c][r] for c in cfg_cols}
                    info.update({c: _num(metrics[c][r]) for c in METRIC_COLUMNS if c in metrics})
                    info["row"] = int(r)
                    w.add(arch, _num(metrics[self.target][r]), flat=flat[i],
                          fields={"step": steps[r]}, info=info)
            out[s] = w
        return out
