r"""A Small CNN Zoo made locally, in the Small CNN Zoo's hyper-parameter space and file format.

Every network is `SmallCNN` (three 3x3 stride-2 `valid`
convolutions of 16 channels, global average pooling, a dense layer; 4970 parameters for
1-channel inputs) trained with cross-entropy and the hyper-parameters of Unterthiner et al.
(2020), each drawn independently per network:

- activation: relu, tanh
- w_init: glorot_normal, glorot_uniform, he_normal, orthogonal, RandomNormal, TruncatedNormal (Keras
  initialisers; biases start at zero)
- init_std: log-uniform [1e-3, 0.5] (std of RandomNormal / TruncatedNormal)
- optimizer: sgd, adam, rmsprop (Keras defaults: no momentum, eps 1e-7)
- learning_rate: log-uniform [5e-4, 5e-2]
- l2reg: log-uniform [1e-8, 1e-2] (`l2 * sum(W^2)` on kernels, as Keras)
- dropout: uniform [0, 0.7] (after every convolution's activation)
- train_fraction: 0.1, 0.25, 0.5, 1.0 (a random subset of the training images)

Inputs are grayscale in `[-1, 1]` (as the original training script); scikit-learn's 8x8 digits
are resized to 16x16 so that three stride-2 convolutions fit. Checkpoints are taken after the
listed epochs (epoch 0 = initialisation) and evaluated on the network's training subset and the
test set (losses include the L2 term, as Keras' `evaluate`).

Training is batched over the networks of a chunk (grouped convolutions: network $m$'s
images travel in input channel $m$), so a zoo of 160 networks trains in about a minute on
two CPU cores. Each network has its own initialisation, data subset and shuffling seeds. Chunks
group networks with the same
train fraction (equal steps per epoch) and activation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graphspace.data.generators.runner import Chunk, ZooJob, register_job, run_zoo
from graphspace.data.generators.sources import ImageSource, load_source
from graphspace.data.small_cnn_zoo import (
    METRIC_COLUMNS,
    small_cnn_layout,
    state_dicts_to_rows,
    write_small_cnn_zoo,
)

__all__ = ["DEFAULT_CHECKPOINTS", "PAPER_CHECKPOINTS", "SMALL_CNN_SPACE", "CNNZooJob",
           "generate_cnn_zoo", "keras_init_", "sample_config"]

#: the hyper-parameter space (``choice`` / ``uniform`` / ``loguniform``)
SMALL_CNN_SPACE: dict[str, dict[str, list[Any]]] = {
    "activation": {"choice": ["relu", "tanh"]},
    "w_init": {"choice": ["glorot_normal", "glorot_uniform", "he_normal", "orthogonal",
                          "RandomNormal", "TruncatedNormal"]},
    "init_std": {"loguniform": [1e-3, 0.5]},
    "optimizer": {"choice": ["sgd", "adam", "rmsprop"]},
    "learning_rate": {"loguniform": [5e-4, 5e-2]},
    "l2reg": {"loguniform": [1e-8, 1e-2]},
    "dropout": {"uniform": [0.0, 0.7]},
    "train_fraction": {"choice": [0.1, 0.25, 0.5, 1.0]},
}
#: the published zoo's checkpoint epochs (86 epochs)
PAPER_CHECKPOINTS = (0, 1, 2, 3, 20, 40, 60, 80, 86)
#: graphspace's default for digits (fast; the same structure, 30 epochs)
DEFAULT_CHECKPOINTS = (0, 1, 2, 3, 10, 20, 30)

_ACTS = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "selu": F.selu,
         "elu": F.elu, "linear": lambda t: t}
_TRUNC = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def member_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from the zoo seed and non-negative `keys` (e.g. a network
    index)."""
    ss = np.random.SeedSequence([int(seed), *(int(k) for k in keys)])
    return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))


def sample_config(space: Mapping[str, Mapping[str, Sequence[Any]]], seed: int) -> dict[str, Any]:
    """Draw one configuration from `space` (keys in sorted order, numpy RNG `seed`)."""
    rng = np.random.default_rng(seed)
    cfg: dict[str, Any] = {}
    for k in sorted(space):
        (kind, vals), = space[k].items()
        if kind == "choice":
            v = vals[int(rng.integers(len(vals)))]
            cfg[k] = v.item() if hasattr(v, "item") else v
        elif kind == "uniform":
            cfg[k] = float(rng.uniform(vals[0], vals[1]))
        elif kind == "loguniform":
            cfg[k] = float(math.exp(rng.uniform(math.log(vals[0]), math.log(vals[1]))))
        else:
            raise ValueError(f"unknown distribution {kind!r} for {k!r}")
    return cfg


def keras_init_(w: Tensor, name: str, std: float, generator: torch.Generator) -> Tensor:
    """Initialise a PyTorch-layout kernel `w` (`[out, in, *k]`) like the Keras initialiser
    `name` (fans computed as Keras: receptive field times channels)."""
    rf = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    fan_in, fan_out = w.shape[1] * rf, w.shape[0] * rf
    with torch.no_grad():
        if name in ("glorot_uniform", "GlorotUniform"):
            lim = math.sqrt(6.0 / (fan_in + fan_out))
            w.uniform_(-lim, lim, generator=generator)
        elif name in ("glorot_normal", "GlorotNormal", "he_normal", "HeNormal", "lecun_normal"):
            n = {"glorot_normal": (fan_in + fan_out) / 2, "GlorotNormal": (fan_in + fan_out) / 2,
                 "he_normal": fan_in / 2, "HeNormal": fan_in / 2, "lecun_normal": fan_in}[name]
            s = math.sqrt(1.0 / n) / _TRUNC
            torch.nn.init.trunc_normal_(w, 0.0, s, -2 * s, 2 * s, generator=generator)
        elif name in ("RandomNormal", "random_normal"):
            w.normal_(0.0, std, generator=generator)
        elif name in ("TruncatedNormal", "truncated_normal"):
            torch.nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=generator)
        elif name in ("orthogonal", "Orthogonal"):
            flat = torch.empty(w.shape[0], fan_in, dtype=w.dtype)
            torch.nn.init.orthogonal_(flat, generator=generator)
            w.copy_(flat.reshape(w.shape))
        else:
            raise ValueError(f"unknown initialiser {name!r}")
    return w


# ----------------------------------------------------------------------------------------------
# Batched training of one chunk
# ----------------------------------------------------------------------------------------------

_KEYS = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias",
         "fc.weight", "fc.bias")


class _Batched:
    """M Small CNNs trained in lock-step with grouped convolutions. All parameters live in one
    buffer (block `k` = parameter `_KEYS[k]` of all networks, `[M, *shape]` contiguous)
    so that optimiser updates are a handful of elementwise ops."""

    def __init__(self, configs: Sequence[Mapping[str, Any]], seeds: Sequence[int], cin: int,
                 channels: int, num_classes: int) -> None:
        m = len(configs)
        self.m, self.c = m, channels
        self.shapes = [(channels, cin, 3, 3), (channels,), (channels, channels, 3, 3),
                       (channels,), (channels, channels, 3, 3), (channels,),
                       (num_classes, channels), (num_classes,)]
        sizes = [math.prod(s) for s in self.shapes]
        self.bounds = [(m * sum(sizes[:i]), m * sum(sizes[:i + 1])) for i in range(len(sizes))]
        buf = torch.zeros(m * sum(sizes))
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        for k in (0, 2, 4, 6):
            a, b = self.bounds[k]
            block = buf[a:b].view(m, *self.shapes[k])
            for j, cfg in enumerate(configs):
                keras_init_(block[j], cfg["w_init"], float(cfg["init_std"]), self.gens[j])
        self.buf = buf.requires_grad_(True)
        owner = torch.cat([torch.arange(m).repeat_interleave(n) for n in sizes])
        self.owner = owner
        acts = {c["activation"] for c in configs}
        if len(acts) != 1:
            raise ValueError("networks of one chunk must share the activation")
        self.act = acts.pop()
        if self.act not in _ACTS:
            raise ValueError(f"unknown activation {self.act!r}")
        self.p_drop = torch.tensor([float(c["dropout"]) for c in configs])
        p_chan = self.p_drop.repeat_interleave(channels).view(1, -1, 1, 1)
        self.p_chan = p_chan
        self.drop_scale = 1.0 / (1.0 - p_chan)
        self.lr = torch.tensor([float(c["learning_rate"]) for c in configs])
        self.l2 = torch.tensor([float(c["l2reg"]) for c in configs])
        opt_ids = {"sgd": 0, "adam": 1, "rmsprop": 2}
        for c in configs:
            if c["optimizer"] not in opt_ids:
                raise ValueError(f"unknown optimizer {c['optimizer']!r}")
        opt = torch.tensor([opt_ids[c["optimizer"]] for c in configs])[owner]
        self.is_sgd, self.is_adam = opt == 0, opt == 1
        self.mom = torch.zeros_like(buf)
        self.vel = torch.zeros_like(buf)
        self.ms = torch.zeros_like(buf)
        self.t = 0
        self.alive = torch.ones(m, dtype=torch.bool)

    def param(self, k: int) -> Tensor:
        a, b = self.bounds[k]
        return self.buf[a:b].view(self.m, *self.shapes[k])

    def forward(self, x: Tensor, train: bool, gen: torch.Generator | None = None) -> Tensor:
        """`x`: `[B, M * cin, H, W]` -> logits `[B, M, classes]`."""
        m, c = self.m, self.c
        h = x
        act = _ACTS[self.act]
        dropout = train and bool((self.p_drop > 0).any())
        for i in range(3):
            w, b = self.param(2 * i), self.param(2 * i + 1)
            if i == 0:  # few input channels: im2col + batched matmul beats grouped convolution
                bs, _, hh, ww = h.shape
                cin = w.shape[2]
                ho, wo = (hh - 3) // 2 + 1, (ww - 3) // 2 + 1
                cols = F.unfold(h, 3, stride=2).view(bs, m, cin * 9, ho * wo)
                cols = cols.permute(1, 2, 0, 3).reshape(m, cin * 9, bs * ho * wo)
                h = torch.baddbmm(b.view(m, c, 1), w.reshape(m, c, cin * 9), cols)
                h = h.view(m, c, bs, ho, wo).permute(2, 0, 1, 3, 4).reshape(bs, m * c, ho, wo)
            else:
                h = F.conv2d(h, w.reshape(m * c, *w.shape[2:]), b.reshape(m * c), stride=2,
                             groups=m)
            h = act(h)
            if dropout:
                with torch.no_grad():
                    mask = torch.rand(h.shape, generator=gen).ge_(self.p_chan)
                    mask.mul_(self.drop_scale)
                h = h * mask
        h = h.mean((2, 3)).view(x.shape[0], m, c)
        return torch.einsum("bmc,moc->bmo", h, self.param(6)) + self.param(7)

    def penalty(self) -> Tensor:
        """Per-network `l2 * sum(kernel^2)`."""
        sq = sum(self.param(k).reshape(self.m, -1).pow(2).sum(1) for k in (0, 2, 4, 6))
        return self.l2 * sq  # type: ignore[operator]

    def losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy per network; `y`: `[B, M]`."""
        b, m, k = logits.shape
        ce = F.cross_entropy(logits.reshape(b * m, k), y.reshape(b * m), reduction="none")
        return ce.view(b, m).mean(0)

    @torch.no_grad()
    def step(self, g: Tensor) -> None:
        """One Keras-style SGD / Adam / RMSprop update per network (its own learning rate).
        A network whose gradient is not finite stops training (`alive` False)."""
        self.t += 1
        b1, b2, rho, eps = 0.9, 0.999, 0.9, 1e-7
        for k in range(len(self.shapes)):
            a, b = self.bounds[k]
            self.alive &= g[a:b].view(self.m, -1).isfinite().all(1)
        alive = self.alive[self.owner]
        g = torch.where(alive, g, torch.zeros_like(g))
        t = self.t
        self.mom.mul_(b1).add_(g, alpha=1 - b1)
        g2 = g * g
        self.vel.mul_(b2).add_(g2, alpha=1 - b2)
        self.ms.mul_(rho).add_(g2, alpha=1 - rho)
        lr_t = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        upd = torch.where(self.is_sgd, g, torch.where(
            self.is_adam, lr_t * self.mom / (self.vel.sqrt() + eps),
            g / (self.ms.sqrt() + eps)))
        self.buf.sub_((self.lr * self.alive)[self.owner] * upd)

    def weights(self) -> Tensor:
        """`[M, P]`: every network's parameters flattened in `_KEYS` order."""
        with torch.no_grad():
            return torch.cat([self.param(k).reshape(self.m, -1) for k in range(len(self.shapes))],
                             1)


def _evaluate(net: _Batched, x: Tensor, idx: Tensor, y: Tensor, chunk: int = 512
              ) -> tuple[Tensor, Tensor]:
    """Accuracy and loss (with the L2 term) of every network on its images `x[idx[m]]`."""
    m, n = idx.shape
    correct = torch.zeros(m)
    loss = torch.zeros(m)
    with torch.no_grad():
        for s in range(0, n, chunk):
            ii = idx[:, s:s + chunk]
            xb = x[ii].transpose(0, 1).reshape(ii.shape[1], -1, *x.shape[2:])
            yb = y[ii].t()
            logits = net.forward(xb, train=False)
            correct += (logits.argmax(-1) == yb).float().sum(0)
            b, mm, k = logits.shape
            ce = F.cross_entropy(logits.reshape(b * mm, k), yb.reshape(-1), reduction="none")
            loss += ce.view(b, mm).sum(0)
        return correct / n, loss / n + net.penalty()


def train_chunk(configs: Sequence[Mapping[str, Any]], seeds: Sequence[int], x_train: Tensor,
                y_train: Tensor, x_test: Tensor, y_test: Tensor, checkpoints: Sequence[int],
                batch_size: int = 32, channels: int = 16, dropout_seed: int = 0
                ) -> dict[str, Any]:
    """Train the networks of one chunk (equal `train_fraction`) and return their checkpoints:
    `weights` `[M, K, P]` (PyTorch-layout state dicts flattened in `_KEYS` order) and the
    metrics `[M, K]` per checkpoint."""
    fracs = {float(c["train_fraction"]) for c in configs}
    if len(fracs) != 1:
        raise ValueError("networks of one chunk must share train_fraction")
    m = len(configs)
    n_train = len(x_train)
    n_sub = max(1, int(n_train * fracs.pop()))
    b = min(batch_size, n_sub)
    steps = max(1, n_sub // b)
    cin = x_train.shape[1]
    ncls = int(max(int(y_train.max()), int(y_test.max())) + 1)
    net = _Batched(configs, seeds, cin, channels, ncls)
    subsets = torch.stack([torch.randperm(n_train, generator=g)[:n_sub] for g in net.gens])
    drop_gen = torch.Generator().manual_seed(dropout_seed)
    test_idx = torch.arange(len(x_test)).expand(m, -1)
    last = max(checkpoints)
    ckpts = sorted(set(int(c) for c in checkpoints))
    weights, metrics = [], []
    for epoch in range(last + 1):
        if epoch in ckpts:
            tr_acc, tr_loss = _evaluate(net, x_train, subsets, y_train)
            te_acc, te_loss = _evaluate(net, x_test, test_idx, y_test)
            weights.append(net.weights())
            metrics.append(torch.stack([te_acc, te_loss, tr_acc, tr_loss]))
        if epoch == last:
            break
        order = torch.stack([sub[torch.randperm(n_sub, generator=g)]
                             for sub, g in zip(subsets, net.gens)])
        for s in range(steps):
            ii = order[:, s * b:(s + 1) * b]  # [M, B]
            xb = x_train[ii].transpose(0, 1).reshape(b, m * cin, *x_train.shape[2:])
            yb = y_train[ii].t()
            logits = net.forward(xb, train=True, gen=drop_gen)
            loss = net.losses(logits, yb) + net.penalty()
            (grad,) = torch.autograd.grad(loss.sum(), [net.buf])
            net.step(grad)
    return {"weights": torch.stack(weights, 1).contiguous(),  # [M, K, P]
            "metrics": torch.stack(metrics, 0).permute(2, 0, 1).contiguous(),  # [M, K, 4]
            "diverged": (~net.alive).tolist(), "steps_per_epoch": steps}


# ----------------------------------------------------------------------------------------------
# The zoo job
# ----------------------------------------------------------------------------------------------


@register_job
class CNNZooJob(ZooJob):
    """Recipe, plan and output of a Small-CNN-Zoo-format zoo (see
    [`generate_cnn_zoo`][graphspace.data.generators.cnn.generate_cnn_zoo])."""

    kind = "cnn"

    def __init__(self, source: ImageSource, num_models: int, seed: int,
                 checkpoints: Sequence[int], batch_size: int, chunk_size: int,
                 space: Mapping[str, Any], image_size: int | None) -> None:
        self.source = source
        self.num_models = int(num_models)
        self.seed = int(seed)
        self.checkpoints = sorted({int(c) for c in checkpoints})
        self.batch_size = int(batch_size)
        self.chunk_size = int(chunk_size)
        self.space = {k: dict(v) for k, v in space.items()}
        self.image_size = image_size
        self._data: tuple[Tensor, Tensor] | None = None

    def recipe(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": "small_cnn_zoo", "seed": self.seed,
                "num_models": self.num_models, "checkpoints": self.checkpoints,
                "batch_size": self.batch_size, "chunk_size": self.chunk_size,
                "space": self.space, "image_size": self.image_size, "channels": 16,
                "data": self.source.describe()}

    @classmethod
    def plan_from_recipe(cls, recipe: dict[str, Any]) -> list[Chunk]:
        seed = int(recipe["seed"])
        configs = []
        for i in range(int(recipe["num_models"])):
            s = member_seed(seed, i)
            cfg = sample_config(recipe["space"], s)
            cfg["random_seed"] = s
            configs.append(cfg)
        groups: dict[tuple[float, str], list[int]] = {}
        for i, c in enumerate(configs):
            groups.setdefault((float(c["train_fraction"]), str(c["activation"])), []).append(i)
        chunks = []
        cs = int(recipe["chunk_size"])
        for key in sorted(groups):
            members = groups[key]
            for s in range(0, len(members), cs):
                mem = members[s:s + cs]
                chunks.append(Chunk(len(chunks), mem, {"configs": [configs[i] for i in mem]}))
        return chunks

    def chunk_cost(self, chunk: Chunk) -> float:
        # training steps scale with the train fraction (and every chunk evaluates)
        return len(chunk.members) * (0.05 + float(chunk.payload["configs"][0]["train_fraction"]))

    def _tensors(self) -> tuple[Tensor, Tensor]:
        if self._data is None:
            self._data = self.source.scaled(-1.0, 1.0, grayscale=True, size=self.image_size)
        return self._data

    def run_chunk(self, chunk: Chunk) -> dict[str, Any]:
        x_tr, x_te = self._tensors()
        cfgs = chunk.payload["configs"]
        return train_chunk(cfgs, [int(c["random_seed"]) for c in cfgs], x_tr,
                           self.source.y_train, x_te, self.source.y_test, self.checkpoints,
                           self.batch_size, 16,
                           dropout_seed=member_seed(self.seed, 2**31, chunk.index))

    @classmethod
    def finalize(cls, out: Path, recipe: dict[str, Any], plan: Sequence[Chunk],
                 results: Sequence[dict[str, Any]]) -> None:
        n = int(recipe["num_models"])
        ckpts = list(recipe["checkpoints"])
        k = len(ckpts)
        data = recipe["data"]
        cin = 1
        layout = small_cnn_layout(cin, 16, int(data["num_classes"]))
        p = max(r.end for r in layout)
        weights = torch.zeros(n, k, p)
        mets = torch.zeros(n, k, 4)
        cfg: list[dict[str, Any]] = [{}] * n
        diverged = [False] * n
        for chunk, res in zip(plan, results):
            for j, mem in enumerate(chunk.members):
                weights[mem] = res["weights"][j]
                mets[mem] = res["metrics"][j]
                cfg[mem] = chunk.payload["configs"][j]
                diverged[mem] = bool(res["diverged"][j])
        # PyTorch layout -> TF rows
        flat = weights.reshape(n * k, p)
        sd, off = {}, 0
        shapes = {"conv1.weight": (16, cin, 3, 3), "conv1.bias": (16,),
                  "conv2.weight": (16, 16, 3, 3), "conv2.bias": (16,),
                  "conv3.weight": (16, 16, 3, 3), "conv3.bias": (16,),
                  "fc.weight": (int(data["num_classes"]), 16),
                  "fc.bias": (int(data["num_classes"]),)}
        for key in _KEYS:
            size = math.prod(shapes[key])
            sd[key] = flat[:, off:off + size].reshape(n * k, *shapes[key])
            off += size
        rows = state_dicts_to_rows(sd, layout)
        cols: dict[str, list[Any]] = {}

        def add(name: str, fn: Any) -> None:
            cols[name] = [fn(i, e) for i in range(n) for e in range(k)]

        add("config.activation", lambda i, e: cfg[i]["activation"])
        add("config.b_init", lambda i, e: "zeros")
        add("config.dataset", lambda i, e: data["name"])
        add("config.dnn_architecture", lambda i, e: "cnn")
        add("config.dropout", lambda i, e: cfg[i]["dropout"])
        add("config.epochs", lambda i, e: ckpts[-1])
        add("config.epochs_between_checkpoints", lambda i, e: 0)
        add("config.init_std", lambda i, e: cfg[i]["init_std"])
        add("config.l2reg", lambda i, e: cfg[i]["l2reg"])
        add("config.learning_rate", lambda i, e: cfg[i]["learning_rate"])
        add("config.num_layers", lambda i, e: 3)
        add("config.num_units", lambda i, e: 16)
        add("config.optimizer", lambda i, e: cfg[i]["optimizer"])
        add("config.random_seed", lambda i, e: cfg[i]["random_seed"])
        add("config.train_fraction", lambda i, e: cfg[i]["train_fraction"])
        add("config.w_init", lambda i, e: cfg[i]["w_init"])
        add("modeldir", lambda i, e: f"member_{i:05d}")
        add("step", lambda i, e: ckpts[e])
        for c, name in enumerate(METRIC_COLUMNS):
            add(name, lambda i, e, c=c: float(mets[i, e, c]))
        add("status", lambda i, e: "diverged" if diverged[i] else "ok")
        perm = np.random.default_rng(int(recipe["seed"])).permutation(n * k)
        write_small_cnn_zoo(out / "raw", rows, cols, layout, perm)


def generate_cnn_zoo(
    out: str | Path,
    num_models: int = 160,
    seed: int = 0,
    data: str | ImageSource | None = "digits",
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
    batch_size: int = 32,
    chunk_size: int = 16,
    space: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    shard: str | tuple[int, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Any:
    """Generate (or resume) a zoo of Small CNNs in the Small CNN Zoo file format.

    The result lands in `out/raw` (`weights.npy`, `metrics.csv.gz`, `layout.csv`,
    `split.csv`), readable with `SmallCNNZoo(out)`.

    Args:
        out: output directory.
        num_models: number of networks (default 160: about a minute on 2 cores for digits).
        seed: zoo seed (hyper-parameters, initialisations, data subsets, row permutation).
        data: `"digits"` (scikit-learn, offline), an `ImageSource` or a tensor file
            (see `load_source`).
        checkpoints: epochs at which to save (0 = initialisation; the last one is the final
            checkpoint). `PAPER_CHECKPOINTS` reproduces the published schedule.
        batch_size: minibatch size (32).
        chunk_size: networks trained together (and the resume granularity).
        space: hyper-parameter space (default `SMALL_CNN_SPACE`; entries override).
        image_size: resize images to this size (default: 16 for inputs smaller than 15 pixels,
            which three stride-2 convolutions need).
        shard: `"i/n"` to build one shard (e.g. a cluster array job); merge shards with
            [`merge_zoo`][graphspace.data.generators.merge_zoo].
        workers: worker processes (default: all cores).
        progress: show a progress bar.

    Returns:
        `ZooStatus`.
    """
    src = load_source(data)
    if image_size is None and min(src.x_train.shape[2:]) < 15:
        image_size = 16
    sp = {k: dict(v) for k, v in SMALL_CNN_SPACE.items()}
    sp.update({k: dict(v) for k, v in (space or {}).items()})
    job = CNNZooJob(src, num_models, seed, checkpoints, batch_size, chunk_size, sp, image_size)
    return run_zoo(job, out, shard=shard, workers=workers, progress=progress)
