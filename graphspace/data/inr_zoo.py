r"""Zoos of implicit neural representations (SIRENs fitted to images).

Two published layouts:

* **DWSNets / Neural Graphs** (Navon et al. 2023; Kofinas et al. 2024): one file per image
  holding the state dict of `INR` -- `seq.{i}.weight` / `seq.{i}.bias`, layers
  $2 \to 32 \to 32 \to 1$, $h \mapsto \sin(30 (W h + b))$ for the hidden layers, a
  linear output layer and `+ 0.5` on the output ([`DWSNetsINR`][graphspace.data.inr_zoo.DWSNetsINR])
  -- a splits JSON `{"train": {"path": [...], "label": [...]}, "val": ..., "test": ...}` and a
  per-layer statistics file `{"weights": {"mean": [...], "std": [...]}, "biases": {...}}`. MNIST
  paths look like `mnist-inrs/mnist_png_training_2_23089/checkpoints/model_final.pth` (label 2,
  image 23089); the Fashion-MNIST files (`fmnist_inrs/train/model_938.pth`) also store
  `"label"`.
* **NFN** (Zhou et al. 2023): `siren_mnist_wts/randinit_smaller_{d}s/net{idx}.pth` for digit
  `d` and image index `idx` (MNIST train then test images); state dicts of NFN's `Siren`
  -- `net.{i}.linear.weight`, `net.{i}.linear.bias` for the sine layers ($\omega_0 =
  30$) and `net.{L}.weight` / `bias` for the linear output
  ([`NFNSiren`][graphspace.data.inr_zoo.NFNSiren]); splits by
  index: train `< 45000`, val `< 50000`, test the rest.

The architecture of every network is read from its tensors' shapes, so other widths and depths
of these layouts load too.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graphspace.data.weights import WeightStatistics
from graphspace.data.zoo_dataset import SPLITS, StoreWriter, WeightZooDataset, load_checkpoint

__all__ = ["DWSNetsINR", "INRZoo", "NFNSiren", "NFNSirenZoo", "siren_init_"]

DWSNETS_URLS = {
    "mnist": "https://www.dropbox.com/sh/56pakaxe58z29mq/AABrctdu2U65jGYr2WQRzmMna/"
             "mnist-inrs.zip?dl=1",
    "fmnist": "https://www.dropbox.com/sh/56pakaxe58z29mq/AAAssoHq719OmSHSKKTiKKHGa/"
              "fmnist_inrs.zip?dl=1",
}
NFN_SIREN_URL = "https://drive.google.com/drive/folders/15CdOTPWHqDcS4SwbIdm100rXkTYZPcC5"


class DWSNetsINR(nn.Module):
    r"""The INR of DWSNets / Neural Graphs: `seq` of linear layers,
    $h \mapsto \sin(\omega_0 (W h + b))$ after every layer but the last, `+ offset` on
    the output. State-dict keys `seq.{i}.weight` / `seq.{i}.bias` as in the published files.

    Args:
        dims: layer widths, e.g. `(2, 32, 32, 1)` (the MNIST INRs).
        w0: frequency $\omega_0$ (30).
        offset: constant added to the output (0.5).
    """

    def __init__(self, dims: Sequence[int] = (2, 32, 32, 1), w0: float = 30.0,
                 offset: float = 0.5) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.w0 = float(w0)
        self.offset = float(offset)
        self.seq = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(self.dims[:-1],
                                                                    self.dims[1:])])
        siren_init_(list(self.seq), self.w0)

    def forward(self, x: Tensor) -> Tensor:
        for lin in self.seq[:-1]:
            x = torch.sin(self.w0 * lin(x))
        return self.seq[-1](x) + self.offset


class _SineLayer(nn.Module):
    def __init__(self, cin: int, cout: int, w0: float) -> None:
        super().__init__()
        self.w0 = w0
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * self.linear(x))


class NFNSiren(nn.Module):
    r"""The SIREN of NFN's INR datasets: sine layers `net.{i}.linear` ($\omega_0 = 30$)
    and a linear output `net.{L}`; `dims=(2, 32, 32, 1)` is the MNIST / Fashion-MNIST one."""

    def __init__(self, dims: Sequence[int] = (2, 32, 32, 1), w0: float = 30.0) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.w0 = float(w0)
        layers: list[nn.Module] = [_SineLayer(a, b, self.w0)
                                   for a, b in zip(self.dims[:-2], self.dims[1:-1])]
        layers.append(nn.Linear(self.dims[-2], self.dims[-1]))
        self.net = nn.Sequential(*layers)
        siren_init_([m.linear for m in layers[:-1]] + [layers[-1]], self.w0)  # type: ignore

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def siren_init_(linears: Sequence[nn.Linear], w0: float = 30.0, c: float = 6.0,
                generator: torch.Generator | None = None) -> None:
    r"""SIREN initialisation (Sitzmann et al. 2020): first layer
    $U(-1/n, 1/n)$, later layers $U(-\sqrt{c/n}/\omega_0, \sqrt{c/n}/\omega_0)$
    ($n$ = fan-in), zero biases (as DWSNets)."""
    with torch.no_grad():
        for i, lin in enumerate(linears):
            n = lin.in_features
            bound = 1.0 / n if i == 0 else (c / n) ** 0.5 / w0
            lin.weight.uniform_(-bound, bound, generator=generator)
            if lin.bias is not None:
                lin.bias.zero_()


def _pairs(sd: Mapping[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """(weight, bias) tensors in file order (NFN's `state_dict_to_tensors` convention)."""
    items = [(k, v) for k, v in sd.items() if isinstance(v, Tensor)
             and (k.endswith("weight") or k.endswith("bias"))]
    pairs = []
    i = 0
    while i < len(items):
        k, w = items[i]
        if not k.endswith("weight") or i + 1 >= len(items) or not items[i + 1][0].endswith("bias"):
            raise ValueError("expected weight/bias pairs in file order, got "
                             f"{[k for k, _ in items]}")
        pairs.append((w, items[i + 1][1]))
        i += 2
    return pairs


def _dims(pairs: Sequence[tuple[Tensor, Tensor]]) -> list[int]:
    dims = [int(pairs[0][0].shape[1])]
    for w, b in pairs:
        if w.dim() != 2 or int(w.shape[1]) != dims[-1] or tuple(b.shape) != (w.shape[0],):
            raise ValueError("not an MLP: weight/bias shapes do not chain")
        dims.append(int(w.shape[0]))
    return dims


class _INRBase(WeightZooDataset):
    layout = "dwsnets"

    def build_model(self, arch: Mapping[str, Any]) -> nn.Module:
        if arch["layout"] == "nfn":
            return NFNSiren(arch["dims"], arch["w0"])
        return DWSNetsINR(arch["dims"], arch["w0"], arch["offset"])

    def _to_flat(self, raw: Mapping[str, Any], arch_extra: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], Tensor]:
        pairs = _pairs(raw)
        arch = {"layout": self.layout, "dims": _dims(pairs), **arch_extra}
        parts = []
        for w, b in pairs:
            parts += [w.reshape(-1).float(), b.reshape(-1).float()]
        return arch, torch.cat(parts)


class INRZoo(_INRBase):
    r"""INR classification data in the DWSNets / Neural Graphs layout: each SIREN (a
    [`DWSNetsINR`][graphspace.data.inr_zoo.DWSNetsINR]) as a parameter graph with its image label as
    `y`.

    `root/raw` holds the splits JSON and the `.pth` files it lists. Paths in the JSON may be
    absolute, relative to `root/raw`, or carry a foreign prefix (the longest suffix that
    exists under `root/raw` is used). Labels come from the JSON, else from the file's
    `"label"` entry, else from an MNIST-style directory name `..._<label>_<index>`.

    Args:
        root: dataset directory.
        split: `"train"`, `"val"` or `"test"`.
        splits_file: the splits JSON inside `root/raw` (`splits.json`; the published ones
            are `mnist_splits.json` / `fmnist_splits.json`).
        w0, offset: the INR's $\omega_0$ and output offset (30, 0.5).
        dataset: `"mnist"` or `"fmnist"` to download the published INRs when missing.
        kernel, kernel_pad, transform, force_reload, log: see
            [`WeightZooDataset`][graphspace.data.WeightZooDataset].
    """

    name = "inr_zoo"
    layout = "dwsnets"

    def __init__(self, root: str, split: str = "train", splits_file: str = "splits.json",
                 w0: float = 30.0, offset: float = 0.5, dataset: str | None = None, *,
                 kernel: str = "edge", kernel_pad: Sequence[int] | None = None,
                 transform: Callable | None = None, force_reload: bool = False,
                 log: bool = False) -> None:
        if dataset is not None and dataset not in DWSNETS_URLS:
            raise ValueError(f"dataset must be one of {sorted(DWSNETS_URLS)}, got {dataset!r}")
        self.splits_file = splits_file
        self.w0 = float(w0)
        self.offset = float(offset)
        self.dataset = dataset
        super().__init__(root, split, kernel=kernel, kernel_pad=kernel_pad, transform=transform,
                         force_reload=force_reload, log=log)

    @property
    def raw_file_names(self) -> list[str]:
        return [self.splits_file]

    def processing_params(self) -> dict[str, Any]:
        p = Path(self.raw_paths[0])
        return {"splits": str(p.resolve()), "size": p.stat().st_size,
                "mtime": p.stat().st_mtime_ns, "w0": self.w0,
                "offset": self.offset}

    def download(self) -> None:
        """Download a published DWSNets INR archive (Dropbox; needs network) and write the
        splits JSON (DWSNets' protocol: the MNIST test images are the test set, 5000 training
        images are held out for validation with seed 0)."""
        if self.dataset is None:
            raise FileNotFoundError(
                f"no {self.splits_file} in {self.raw_dir}: generate a zoo "
                "(graphspace zoo inr) or pass dataset='mnist' / 'fmnist'")
        from torch_geometric.data import download_url, extract_zip

        raw = Path(self.raw_dir)
        archive = download_url(DWSNETS_URLS[self.dataset], str(raw),
                               filename=f"{self.dataset}_inrs.zip")
        extract_zip(archive, str(raw))
        os.unlink(archive)
        if self.dataset == "fmnist":
            src = next(raw.rglob("splits.json"), None)
            if src is None:
                raise FileNotFoundError("splits.json not found in the Fashion-MNIST archive")
            data = json.loads(src.read_text())
            out = {s: {"path": [os.path.relpath(self._resolve(p), raw) for p in data[s]]}
                   for s in SPLITS}
        else:
            files = sorted(raw.rglob("*.pth"))
            train = [f for f in files if "train" in f.relative_to(raw).as_posix()]
            test = [f for f in files if "train" not in f.relative_to(raw).as_posix()]
            g = torch.Generator().manual_seed(0)
            perm = torch.randperm(len(train), generator=g).tolist()
            val_idx = set(perm[:5000])
            out = {"train": {"path": [os.path.relpath(f, raw) for i, f in enumerate(train)
                                      if i not in val_idx]},
                   "val": {"path": [os.path.relpath(train[i], raw) for i in sorted(val_idx)]},
                   "test": {"path": [os.path.relpath(f, raw) for f in test]}}
        from graphspace.data._io import write_file as atomic_write

        atomic_write(raw / self.splits_file, lambda p: Path(p).write_text(json.dumps(out)))

    def _resolve(self, p: str) -> Path:
        raw = Path(self.raw_dir)
        path = Path(p)
        if path.is_absolute() and path.exists():
            return path
        parts = path.parts
        for i in range(len(parts)):
            cand = raw.joinpath(*parts[i:])
            if cand.exists():
                return cand
        raise FileNotFoundError(f"INR file {p!r} not found under {raw}")

    @staticmethod
    def _label_from_path(p: Path) -> int | None:
        for part in reversed(p.parts[:-1]):
            m = re.search(r"_(\d+)_(\d+)$", part)
            if m:
                return int(m.group(1))
        return None

    def read_splits(self) -> dict[str, StoreWriter]:
        spec = json.loads(Path(self.raw_paths[0]).read_text())
        out = {}
        for s in SPLITS:
            entry = spec.get(s, {"path": []})
            paths = entry["path"]
            labels = entry.get("label")
            w = StoreWriter()
            for i, p in enumerate(paths):
                path = self._resolve(p)
                raw = load_checkpoint(path)
                if isinstance(raw, Mapping) and "state_dict" in raw:
                    raw = raw["state_dict"]
                if labels is not None:
                    label = int(labels[i])
                elif isinstance(raw, Mapping) and "label" in raw:
                    label = int(raw["label"])
                else:
                    lab = self._label_from_path(path)
                    if lab is None:
                        raise ValueError(f"no label for {p}")
                    label = lab
                arch, flat = self._to_flat(raw, {"w0": self.w0, "offset": self.offset})
                w.add(arch, label, flat=flat, info={"path": str(p)})
            out[s] = w
        return out

    def published_statistics(self, path: str | os.PathLike, transposed: bool = True
                             ) -> WeightStatistics:
        """Read a DWSNets statistics file (`mnist_statistics.pth`) as
        [`WeightStatistics`][graphspace.data.WeightStatistics] for this zoo's keys."""
        arch = self.architectures[0]
        model = self.build_model(arch)
        sd = model.state_dict()
        n = len(arch["dims"]) - 1
        keys = [(f"seq.{i}.weight", f"seq.{i}.bias") for i in range(n)]
        return WeightStatistics.from_dwsnets(path, keys, {k: v.shape for k, v in sd.items()},
                                             transposed=transposed)


class NFNSirenZoo(_INRBase):
    r"""INR classification data in NFN's layout (`<prefix>_<digit>s/net<idx>.pth`), as
    parameter graphs of [`NFNSiren`][graphspace.data.inr_zoo.NFNSiren] with the digit as `y`.

    Args:
        root: dataset directory; `root/raw` holds the `<prefix>_<d>s` directories (e.g. the
            content of `siren_mnist_wts/`).
        split: `"train"`, `"val"` or `"test"`.
        prefix: directory prefix (`"randinit_smaller"`; NFN's augmented copies are
            `randinit_smaller_aug<i>`).
        split_points: first validation and first test index (NFN's MNIST / Fashion-MNIST:
            `(45000, 50000)`); images are ordered by `idx`.
        w0: $\omega_0$ of the sine layers (30).
        kernel, kernel_pad, transform, force_reload, log: see
            [`WeightZooDataset`][graphspace.data.WeightZooDataset].
    """

    name = "nfn_siren_zoo"
    layout = "nfn"

    def __init__(self, root: str, split: str = "train", prefix: str = "randinit_smaller",
                 split_points: tuple[int, int] = (45000, 50000), w0: float = 30.0, *,
                 kernel: str = "edge", kernel_pad: Sequence[int] | None = None,
                 transform: Callable | None = None, force_reload: bool = False,
                 log: bool = False) -> None:
        self.prefix = prefix
        self.split_points = (int(split_points[0]), int(split_points[1]))
        self.w0 = float(w0)
        super().__init__(root, split, kernel=kernel, kernel_pad=kernel_pad, transform=transform,
                         force_reload=force_reload, log=log)

    @property
    def raw_file_names(self) -> list[str]:
        return [f"{self.prefix}_{d}s" for d in range(10)]

    def download(self) -> None:
        raise FileNotFoundError(
            f"NFN's SIREN datasets are on Google Drive ({NFN_SIREN_URL}); download "
            f"siren_mnist_wts.tar, untar it and put its {self.prefix}_<d>s folders in "
            f"{self.raw_dir}")

    def processing_params(self) -> dict[str, Any]:
        return {"raw": str(Path(self.raw_dir).resolve()), "prefix": self.prefix,
                "split_points": self.split_points, "w0": self.w0,
                "n": len(self._files())}

    def _files(self) -> dict[int, tuple[str, int]]:
        files: dict[int, tuple[str, int]] = {}
        pat = os.path.join(glob.escape(self.raw_dir), f"{glob.escape(self.prefix)}_[0-9]s",
                           "net*.pth")
        for p in glob.glob(pat):
            m = re.search(r"net(\d+)\.pth$", p)
            lab = re.search(r"_(\d)s$", os.path.basename(os.path.dirname(p)))
            if m and lab:
                files[int(m.group(1))] = (p, int(lab.group(1)))
        return files

    def read_splits(self) -> dict[str, StoreWriter]:
        files = self._files()
        order = sorted(files)
        v, t = self.split_points
        ranges = {"train": order[:v], "val": order[v:t], "test": order[t:]}
        out = {}
        for s in SPLITS:
            w = StoreWriter()
            for idx in ranges[s]:
                p, label = files[idx]
                arch, flat = self._to_flat(load_checkpoint(p), {"w0": self.w0})
                w.add(arch, label, flat=flat, fields={"index": idx},
                      info={"path": os.path.relpath(p, self.raw_dir)})
            out[s] = w
        return out
