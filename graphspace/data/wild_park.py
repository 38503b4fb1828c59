r"""The CNN Wild Park format (Kofinas et al. 2024, "Graph Neural Networks for Learning Equivariant
Representations of Neural Networks"): heterogeneous CNNs.

Every checkpoint is a `torch.save` dict with `"model"` (the state dict: `layers.{i}.weight`
/ `bias` convolutions, `fc.weight` / `bias`) and `"config"`, the architecture:

```python
{"n_layers": 3, "n_classes": 10, "channels": [3, 16, 8, 32], "kernel_size": [3, 5, 7],
 "stride": [1, 1, 1], "padding": [1, 2, 3], "residual": [-1, -1, 0],
 "activation": ["relu", "gelu", "none"]}
```

Layer $i$ computes $h_i = \sigma_i(\mathrm{conv}_i(h_{i-1}) + r_i)$ where, when
`residual[i] = j >= 0`, $r_i$ adds layer $j$'s output to the first
$\min(c_j, c_i)$ channels; the head is global average pooling and `fc`. The splits JSON
holds `{"train": {"path": [...], "score": [...], "step": [...]}, ...}` (paths relative to the
dataset directory, `score` = test accuracy, `step` = epoch).

graphspace's heterogeneous zoo generator writes this format and may add an optional
`"norm"` entry (per layer `"none"` or `"batch"`; BatchNorm after the convolution, keys
`norms.{i}.*`) and `"in_channels"`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphspace.data.zoo_dataset import SPLITS, StoreWriter, WeightZooDataset, load_checkpoint

__all__ = ["CNNWildPark", "ChannelResidual", "WildParkCNN", "WILD_PARK_ACTIVATIONS"]

ZENODO_RECORD = "https://zenodo.org/api/records/12797219"
_ARCH_KEYS = ("n_layers", "n_classes", "channels", "kernel_size", "stride", "padding", "residual",
              "activation", "norm", "in_channels")

#: activation names of the Wild Park configs
WILD_PARK_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU, "none": nn.Identity,
}


class ChannelResidual(nn.Module):
    """`x` with `res` added to its first `channels` channels (`x[:, :c] += res[:, :c]`).

    The analysis reads its ops (slice, add, cat): the added channels are tied to the residual
    and permute only among themselves, the other channels separately.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: Tensor, res: Tensor) -> Tensor:
        c = self.channels
        return torch.cat([x[:, :c] + res[:, :c], x[:, c:]], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class WildParkCNN(nn.Module):
    """A CNN of the Wild Park family built from its config (see the module docstring).

    State-dict keys match the published checkpoints (`layers.{i}`, `fc`; `norms.{i}` for
    the optional BatchNorm layers).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = dict(config)
        n = int(cfg["n_layers"])
        ch = [int(c) for c in cfg["channels"]]
        if len(ch) != n + 1:
            raise ValueError(f"channels must have n_layers + 1 = {n + 1} entries")
        ks = [int(k) for k in cfg["kernel_size"]]
        st = [int(s) for s in cfg.get("stride", [1] * n)]
        pad = [int(p) for p in cfg.get("padding", [k // 2 for k in ks])]
        res = [int(r) for r in cfg.get("residual", [-1] * n)]
        acts = [str(a) for a in cfg.get("activation", ["relu"] * n)]
        norms = [str(x) for x in cfg.get("norm", ["none"] * n)]
        for i, r in enumerate(res):
            if r >= 0 and not r < i - 1:
                raise ValueError(f"layer {i}: residual from {r} must come from a layer before "
                                 f"the preceding one")
        self.config = cfg
        self.residual = res
        self.layers = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], ks[i], stride=st[i],
                                              padding=pad[i]) for i in range(n))
        if any(x != "none" for x in norms):
            self.norms = nn.ModuleList(nn.BatchNorm2d(ch[i + 1]) if norms[i] == "batch"
                                       else nn.Identity() for i in range(n))
            if any(x not in ("none", "batch") for x in norms):
                raise ValueError(f"unknown norm in {norms}")
        else:
            self.norms = None
        for a in acts:
            if a not in WILD_PARK_ACTIVATIONS:
                raise ValueError(f"unknown activation {a!r}")
        self.acts = nn.ModuleList(WILD_PARK_ACTIVATIONS[a]() for a in acts)
        adds: dict[str, nn.Module] = {}
        for i, r in enumerate(res):
            if r >= 0 and not (ch[r + 1] == ch[i + 1]):
                adds[str(i)] = ChannelResidual(min(ch[r + 1], ch[i + 1]))
        self.partial_adds = nn.ModuleDict(adds)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(ch[-1], int(cfg["n_classes"]))

    def forward(self, x: Tensor) -> Tensor:
        saved: dict[int, Tensor] = {}
        keep = {r for r in self.residual if r >= 0}
        for i, conv in enumerate(self.layers):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[i](x)
            r = self.residual[i]
            if r >= 0:
                if str(i) in self.partial_adds:
                    x = self.partial_adds[str(i)](x, saved[r])
                else:
                    x = x + saved[r]
            x = self.acts[i](x)
            if i in keep:
                saved[i] = x
        return self.fc(self.flatten(self.global_pool(x)))


def reference_wild_park_forward(state: Mapping[str, Tensor], config: Mapping[str, Any],
                                x: Tensor) -> Tensor:
    """The Wild Park forward pass written as in the original sampler (in-place channel slices;
    no BatchNorm), used to check [`WildParkCNN`][graphspace.data.wild_park.WildParkCNN]."""
    res = [int(r) for r in config["residual"]]
    fns = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
           "leaky_relu": F.leaky_relu, "none": lambda t: t}
    ch = config["channels"]
    saved = {}
    for i in range(int(config["n_layers"])):
        x = F.conv2d(x, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"],
                     stride=config["stride"][i], padding=config["padding"][i])
        if res[i] > -1:
            c = min(ch[res[i] + 1], ch[i + 1])
            x = x.clone()
            x[:, :c] += saved[res[i]][:, :c]
        x = fns[config["activation"][i]](x)
        if i in res:
            saved[i] = x
    x = x.mean((2, 3))
    return F.linear(x, state["fc.weight"], state["fc.bias"])


def _plain(obj: Any) -> Any:
    """OmegaConf / mapping configs -> plain JSON-able Python."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    return obj


class CNNWildPark(WeightZooDataset):
    r"""Heterogeneous CNNs in the CNN Wild Park format, as parameter graphs with `y` = score
    (test accuracy) and attribute `step`.

    Networks are loaded lazily from their checkpoints (the published park is large); only paths,
    architectures and targets are cached in `root/processed`.

    Args:
        root: dataset directory; `root/raw` holds the splits JSON and the checkpoints.
        split: `"train"`, `"val"` or `"test"`.
        splits_file: splits JSON inside `root/raw` (`"splits.json"`; the published one is
            `cnn_park_splits.json`).
        epochs: `"all"` checkpoints (as Neural Graphs), `"final"` (the largest `step`
            of each run), an epoch or a list of epochs.
        trusted: allow full unpickling of checkpoints (the published ones store OmegaConf
            configs and need it; graphspace's generator writes plain dicts).
        in_memory: keep all weights in the processed file instead (fast for small zoos).
        download: fetch the published park from Zenodo when raw files are missing.
        kernel, kernel_pad, transform, force_reload, log: see
            [`WeightZooDataset`][graphspace.data.WeightZooDataset].
    """

    name = "cnn_wild_park"

    def __init__(self, root: str, split: str = "train", splits_file: str = "splits.json",
                 epochs: int | Sequence[int] | str = "all", trusted: bool = False,
                 in_memory: bool = False, download: bool = False, *, kernel: str = "edge",
                 kernel_pad: Sequence[int] | None = None, transform: Callable | None = None,
                 force_reload: bool = False, log: bool = False) -> None:
        if isinstance(epochs, str) and epochs not in ("final", "all"):
            raise ValueError(f"epochs must be 'final', 'all', an int or a list, got {epochs!r}")
        self.splits_file = splits_file
        self.epochs = epochs if isinstance(epochs, (str, int)) else [int(e) for e in epochs]
        self.trusted = trusted
        self.in_memory = in_memory
        self.allow_download = download
        super().__init__(root, split, kernel=kernel, kernel_pad=kernel_pad, transform=transform,
                         force_reload=force_reload, log=log)

    @property
    def raw_file_names(self) -> list[str]:
        return [self.splits_file]

    def processing_params(self) -> dict[str, Any]:
        p = Path(self.raw_paths[0])
        return {"splits": str(p.resolve()), "size": p.stat().st_size,
                "mtime": p.stat().st_mtime_ns, "epochs": self.epochs,
                "in_memory": self.in_memory}

    def download(self) -> None:
        """Download every file of the CNN Wild Park Zenodo record (needs network; large)."""
        if not self.allow_download:
            raise FileNotFoundError(
                f"no {self.splits_file} in {self.raw_dir}: generate a zoo (graphspace zoo "
                "hetero) or pass download=True for the published CNN Wild Park")
        import urllib.request

        from torch_geometric.data import download_url, extract_tar, extract_zip

        with urllib.request.urlopen(ZENODO_RECORD) as r:  # noqa: S310 - fixed https URL
            record = json.load(r)
        raw = Path(self.raw_dir)
        for f in record.get("files", []):
            url = f["links"]["self"]
            path = download_url(url, str(raw), filename=f["key"])
            if path.endswith(".zip"):
                extract_zip(path, str(raw))
            elif ".tar" in path:
                extract_tar(path, str(raw), mode="r:*")
        if not (raw / self.splits_file).exists():
            found = next(raw.rglob("*splits*.json"), None)
            if found is not None:
                os.replace(found, raw / self.splits_file)

    def build_model(self, arch: Mapping[str, Any]) -> nn.Module:
        return WildParkCNN(arch)

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
        raise FileNotFoundError(f"checkpoint {p!r} not found under {raw}")

    def _load(self, path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
        ckpt = load_checkpoint(path, trusted=self.trusted)
        if not isinstance(ckpt, Mapping) or "model" not in ckpt or "config" not in ckpt:
            raise ValueError(f"{path} is not a Wild Park checkpoint (needs 'model' and "
                             "'config')")
        cfg = {k: v for k, v in _plain(ckpt["config"]).items() if k in _ARCH_KEYS}
        if "in_channels" in cfg:
            cfg["channels"] = [int(cfg["in_channels"])] + list(cfg["channels"])[1:]
        sd = {k: v for k, v in ckpt["model"].items() if isinstance(v, Tensor)}
        return cfg, sd

    def load_state_dict(self, path: str, arch: Mapping[str, Any]) -> dict[str, Tensor]:
        return self._load(self._resolve(path))[1]

    @staticmethod
    def _run_of(p: str) -> str:
        parent = Path(p).parent
        if re.match(r"(checkpoint|epoch)[_-]?\d+$", parent.name):
            parent = parent.parent
        return parent.as_posix()

    def read_splits(self) -> dict[str, StoreWriter]:
        spec = json.loads(Path(self.raw_paths[0]).read_text())
        out = {}
        for s in SPLITS:
            entry = spec.get(s, {"path": [], "score": []})
            paths = list(entry["path"])
            scores = [float(v) for v in entry["score"]]
            steps = [int(v) for v in entry.get("step", [-1] * len(paths))]
            runs = list(entry.get("run", [self._run_of(p) for p in paths]))
            if self.epochs == "final":
                last: dict[str, int] = {}
                for r, st in zip(runs, steps):
                    last[r] = max(last.get(r, st), st)
                keep = [st == last[r] for r, st in zip(runs, steps)]
            elif self.epochs == "all":
                keep = [True] * len(paths)
            else:
                wanted = {self.epochs} if isinstance(self.epochs, int) else set(self.epochs)
                keep = [st in wanted for st in steps]
            w = StoreWriter()
            for p, y, st, r, k in zip(paths, scores, steps, runs, keep):
                if not k:
                    continue
                cfg, sd = self._load(self._resolve(p))
                if self.in_memory:
                    flat = self._flat(cfg, sd)
                    w.add(cfg, y, flat=flat, fields={"step": st}, info={"path": p, "run": str(r)})
                else:
                    w.add(cfg, y, path=p, fields={"step": st}, info={"path": p, "run": str(r)})
            out[s] = w
        return out

    def _flat(self, cfg: Mapping[str, Any], sd: Mapping[str, Tensor]) -> Tensor:
        model = WildParkCNN(cfg)
        keys = list(model.state_dict())
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ValueError(f"checkpoint lacks {missing[:3]}")
        return torch.cat([sd[k].detach().reshape(-1).float() for k in keys])
