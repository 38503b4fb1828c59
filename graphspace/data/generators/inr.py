r"""A zoo of SIRENs fitted to images, written in the DWSNets / Neural Graphs INR layout.

Every image of the source (train and test images) gets one
[`DWSNetsINR`][graphspace.data.DWSNetsINR] (default $2 \to 32 \to 32 \to 1$, $\omega_0 = 30$, output
offset 0.5) fitted to its pixels (grayscale in $[0, 1]$) at coordinates on the $[-1, 1]^2$ grid by
full-batch Adam on the mean squared error. A chunk of images is fitted at once:
`torch.func.vmap` over `torch.func.grad` of the module's `functional_call` gives every
SIREN's gradient in one batched pass, and a batched Adam updates them.

Output in `<out>/raw`: `inrs/<split>/model_<index>.pth` (the state dict and `"label"`),
`splits.json` (`path`, `label` and the reconstruction `psnr` per split; test = the
source's test images, val = a seeded `val_fraction` of its training images) and
`statistics.pth` (DWSNets format, training split only), readable with `INRZoo(out)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from graphspace.data._io import save_torch
from graphspace.data._io import write_file as atomic_write
from graphspace.data.generators.cnn import member_seed
from graphspace.data.generators.runner import Chunk, ZooJob, register_job, run_zoo
from graphspace.data.generators.sources import ImageSource, load_source
from graphspace.data.inr_zoo import DWSNetsINR, siren_init_

__all__ = ["INRZooJob", "fit_sirens", "generate_inr_zoo", "image_grid"]


def image_grid(h: int, w: int) -> Tensor:
    """Pixel coordinates in $[-1, 1]^2$, row-major (`[h * w, 2]`, (row, column))."""
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def fit_sirens(images: Tensor, seeds: Sequence[int], dims: Sequence[int] = (2, 32, 32, 1),
               w0: float = 30.0, offset: float = 0.5, steps: int = 500, lr: float = 1e-3
               ) -> tuple[dict[str, Tensor], Tensor]:
    """Fit one [`DWSNetsINR`][graphspace.data.DWSNetsINR] per image (`[N, C, H, W]` in `[0, 1]`).

    Returns the stacked state dicts (every tensor `[N, *shape]`) and the final PSNR per image.
    """
    n, c, h, w = images.shape
    if dims[0] != 2 or dims[-1] != c:
        raise ValueError(f"dims must go from 2 to {c} channels, got {tuple(dims)}")
    model = DWSNetsINR(dims, w0, offset)
    keys = list(model.state_dict())
    stacked: dict[str, list[Tensor]] = {k: [] for k in keys}
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        m = DWSNetsINR(dims, w0, offset)
        siren_init_(list(m.seq)[:-1], w0, generator=g)
        last = m.seq[-1]
        bound = 1.0 / math.sqrt(last.in_features)  # nn.Linear's default initialisation
        with torch.no_grad():
            last.weight.uniform_(-bound, bound, generator=g)
            last.bias.uniform_(-bound, bound, generator=g)
        for k, v in m.state_dict().items():
            stacked[k].append(v)
    params = {k: torch.stack(v) for k, v in stacked.items()}
    coords = image_grid(h, w)
    target = images.reshape(n, c, h * w).transpose(1, 2).contiguous()  # [N, P, C]

    def loss(p: dict[str, Tensor], t: Tensor) -> Tensor:
        pred = torch.func.functional_call(model, p, (coords,))
        return ((pred - t) ** 2).mean()

    grad_fn = torch.func.vmap(torch.func.grad_and_value(loss))
    m1 = {k: torch.zeros_like(v) for k, v in params.items()}
    m2 = {k: torch.zeros_like(v) for k, v in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        grads, _ = grad_fn(params, target)
        with torch.no_grad():
            for k in params:
                m1[k].mul_(b1).add_(grads[k], alpha=1 - b1)
                m2[k].mul_(b2).addcmul_(grads[k], grads[k], value=1 - b2)
                mh = m1[k] / (1 - b1 ** t)
                vh = m2[k] / (1 - b2 ** t)
                params[k] = params[k] - lr * mh / (vh.sqrt() + eps)
    with torch.no_grad():
        _, mse = grad_fn(params, target)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
    return params, psnr


@register_job
class INRZooJob(ZooJob):
    """Recipe, plan and output of a SIREN zoo (see
    [`generate_inr_zoo`][graphspace.data.generators.inr.generate_inr_zoo])."""

    kind = "inr"

    def __init__(self, source: ImageSource, seed: int, num_images: int | None,
                 dims: Sequence[int], w0: float, offset: float, steps: int, lr: float,
                 chunk_size: int, val_fraction: float, image_size: int | None = None) -> None:
        self.source = source
        self.image_size = None if image_size is None else int(image_size)
        self.seed = int(seed)
        self.num_images = num_images
        self.dims = [int(d) for d in dims]
        self.w0, self.offset = float(w0), float(offset)
        self.steps, self.lr = int(steps), float(lr)
        self.chunk_size = int(chunk_size)
        self.val_fraction = float(val_fraction)
        self._images: Tensor | None = None

    def recipe(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": "dwsnets", "seed": self.seed,
                "num_images": self.num_images, "dims": self.dims, "w0": self.w0,
                "offset": self.offset, "steps": self.steps, "lr": self.lr,
                "chunk_size": self.chunk_size, "val_fraction": self.val_fraction,
                "image_size": self.image_size, "data": self.source.describe()}

    @classmethod
    def plan_from_recipe(cls, recipe: dict[str, Any]) -> list[Chunk]:
        d = recipe["data"]
        n_tr, n_te = int(d["n_train"]), int(d["n_test"])
        total = n_tr + n_te
        rng = np.random.default_rng(member_seed(int(recipe["seed"]), 7))
        if recipe["num_images"] is not None and int(recipe["num_images"]) < total:
            chosen = sorted(rng.choice(total, int(recipe["num_images"]), replace=False).tolist())
        else:
            chosen = list(range(total))
        train = [i for i in chosen if i < n_tr]
        n_val = int(round(float(recipe["val_fraction"]) * len(train)))
        val = set(np.random.default_rng(member_seed(int(recipe["seed"]), 8))
                  .permutation(train)[:n_val].tolist()) if train else set()
        split = {i: ("test" if i >= n_tr else "val" if i in val else "train") for i in chosen}
        cs = int(recipe["chunk_size"])
        return [Chunk(j, chosen[s:s + cs], {"split": [split[i] for i in chosen[s:s + cs]]})
                for j, s in enumerate(range(0, len(chosen), cs))]

    def _all_images(self) -> Tensor:
        if self._images is None:
            tr, te = self.source.scaled(0.0, 1.0, grayscale=self.dims[-1] == 1,
                                        size=self.image_size)
            self._images = torch.cat([tr, te])
        return self._images

    def run_chunk(self, chunk: Chunk) -> dict[str, Any]:
        imgs = self._all_images()[torch.tensor(chunk.members)]
        labels = torch.cat([self.source.y_train, self.source.y_test])[torch.tensor(chunk.members)]
        seeds = [member_seed(self.seed, i) for i in chunk.members]
        params, psnr = fit_sirens(imgs, seeds, self.dims, self.w0, self.offset, self.steps,
                                  self.lr)
        return {"params": params, "psnr": psnr, "labels": labels}

    @classmethod
    def finalize(cls, out: Path, recipe: dict[str, Any], plan: Sequence[Chunk],
                 results: Sequence[dict[str, Any]]) -> None:
        raw = out / "raw"
        n_tr = int(recipe["data"]["n_train"])
        splits: dict[str, dict[str, list[Any]]] = {
            s: {"path": [], "label": [], "psnr": [], "image": []} for s in ("train", "val", "test")}
        train_params: list[dict[str, Tensor]] = []
        for chunk, res in zip(plan, results):
            for j, (img, split) in enumerate(zip(chunk.members, chunk.payload["split"])):
                sd = {k: v[j].clone() for k, v in res["params"].items()}
                label = int(res["labels"][j])
                rel = f"inrs/{split}/model_{img:05d}.pth"
                obj = {**sd, "label": label}
                save_torch(raw / rel, obj)
                e = splits[split]
                e["path"].append(rel)
                e["label"].append(label)
                e["psnr"].append(round(float(res["psnr"][j]), 4))
                e["image"].append(int(img) if img < n_tr else int(img) - n_tr)
                if split == "train":
                    train_params.append(sd)
        text = json.dumps(splits)
        atomic_write(raw / "splits.json", lambda p: Path(p).write_text(text))
        if train_params:
            stats = dwsnets_statistics(train_params)
            save_torch(raw / "statistics.pth", stats)


def dwsnets_statistics(state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
    """Per-layer, per-entry mean and std in the DWSNets statistics format (weights transposed to
    `(in, out, 1)`, biases `(out, 1)`)."""
    keys = list(state_dicts[0])
    wk = [k for k in keys if k.endswith("weight")]
    bk = [k for k in keys if k.endswith("bias")]
    out: dict[str, Any] = {"weights": {"mean": [], "std": []}, "biases": {"mean": [], "std": []}}
    for name, ks, tr in (("weights", wk, True), ("biases", bk, False)):
        for k in ks:
            st = torch.stack([sd[k] for sd in state_dicts])
            if tr:
                st = st.transpose(1, 2)
            st = st.unsqueeze(-1)
            out[name]["mean"].append(st.mean(0))
            out[name]["std"].append(st.std(0) if len(state_dicts) > 1 else torch.ones_like(st[0]))
    return out


def generate_inr_zoo(
    out: str | Path,
    seed: int = 0,
    data: str | ImageSource | None = "digits",
    num_images: int | None = None,
    dims: Sequence[int] = (2, 32, 32, 1),
    w0: float = 30.0,
    offset: float = 0.5,
    steps: int = 300,
    lr: float = 1e-3,
    chunk_size: int = 256,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    shard: str | tuple[int, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Any:
    r"""Fit a SIREN to every image (or `num_images` of them) and write an INR zoo in the
    DWSNets / Neural Graphs layout to `out/raw` (read it with `INRZoo(out)`).

    Args:
        out: output directory.
        seed: zoo seed (image subset, validation split, initialisations).
        data: `"digits"` (scikit-learn, offline: 1797 images), an `ImageSource` or a
            tensor file.
        num_images: fit a seeded subset of this size (default: all).
        dims: SIREN widths (input 2, output = image channels).
        w0, offset: the SIREN's $\omega_0$ and output offset.
        steps, lr: full-batch Adam iterations and learning rate.
        chunk_size: SIRENs fitted together (vmap batch; resume granularity).
        val_fraction: share of the training images used for validation.
        image_size: resize the images to `image_size` x `image_size` (bilinear) before
            fitting, e.g. 28 to fit scikit-learn's 8x8 digits at MNIST resolution (default: as
            they are). Small images make the fit under-determined: a 2-32-32-1 SIREN
            (1,185 parameters) reproduces 64 pixels with tiny moves from its random
            initialisation, and the resulting weights carry almost no class signal.
        shard, workers, progress: see `run_zoo`.
    """
    src = load_source(data)
    job = INRZooJob(src, seed, num_images, dims, w0, offset, steps, lr, chunk_size, val_fraction,
                     image_size)
    return run_zoo(job, out, shard=shard, workers=workers, progress=progress)
