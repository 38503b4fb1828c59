r"""Weight-space augmentations of parameter graphs (PyG `BaseTransform` callables).

Following Shamsian et al. 2024 ("Improved Generalization of Weight Space Networks via
Augmentations", ICML; "Data Augmentations in Deep Weight Spaces", 2023):

* **function-preserving** -- the augmented graph is another network computing the same function:
  [`RandomNeuronPermutation`][graphspace.data.augment.RandomNeuronPermutation] (hidden-neuron
  permutations from the shared model analysis),
  [`RandomPositiveRescaling`][graphspace.data.augment.RandomPositiveRescaling]
  ($\sigma(sz) = s\sigma(z)$, $s>0$, e.g. ReLU),
  [`RandomSignFlip`][graphspace.data.augment.RandomSignFlip] (odd activations,
  $\sin(-z) = -\sin(z)$) and [`SirenBiasShift`][graphspace.data.augment.SirenBiasShift]
  ($\sin(\omega_0(z + k\pi/\omega_0)) = (-1)^k \sin(\omega_0 z)$: shift the bias by $k\pi/\omega_0$,
  multiply the outgoing weights by $(-1)^k$);
* **perturbations** -- [`GaussianWeightNoise`][graphspace.data.augment.GaussianWeightNoise] (noise
  scaled by each tensor's standard deviation),
  [`WeightDropout`][graphspace.data.augment.WeightDropout];
* **weight-space MixUp** -- [`WeightMixUp`][graphspace.data.augment.WeightMixUp] /
  [`mixup_graphs`][graphspace.data.augment.mixup_graphs]:
  $\theta = \lambda \theta_1 + (1-\lambda)\,\pi(\theta_2)$,
  $\lambda \sim \mathrm{Beta}(\alpha, \alpha)$, with $\pi$ the identity (`"vanilla"`), a random
  hidden-neuron permutation (`"permute"`) or the permutation that aligns $\theta_2$ to $\theta_1$ by
  weight matching (`"align"`, Git Re-Basin, needs [`graphspace.merge`][graphspace.merge]).

Every transform returns a new graph (the input is not modified) whose
[`to_state_dict`][graphspace.graphs.ParameterGraph.to_state_dict] is the augmented
network. Randomness: pass `seed` for a reproducible stream (mixed with the DataLoader worker id),
else the global RNG is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_geometric.transforms import BaseTransform

from graphspace.data.weights import is_weight_record, map_records, set_state_dict
from graphspace.graphs import (
    ModelAnalysis,
    ParameterGraph,
    ParamRecord,
    apply_permutation,
    apply_scaling,
    permutation_groups,
    random_permutation,
    scaling_symmetries,
)

__all__ = [
    "GaussianWeightNoise",
    "RandomNeuronPermutation",
    "RandomPositiveRescaling",
    "RandomSignFlip",
    "SirenBiasShift",
    "WeightDropout",
    "WeightMixUp",
    "mixup_graphs",
    "mixup_state_dicts",
]


def _analysis(graph: ParameterGraph) -> ModelAnalysis:
    a = getattr(graph.spec, "analysis", None)
    if a is None:
        raise ValueError("the graph carries no model analysis (build it with from_module / "
                         "from_state_dict or a zoo dataset)")
    return a


class _Random(BaseTransform):
    """Holds a lazily created, worker-aware random generator."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._cache: dict[tuple[int, str], tuple[ModelAnalysis, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_gen"] = None
        d["_cache"] = {}
        return d

    @property
    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._gen is None:
            info = torch.utils.data.get_worker_info()
            wid = info.id if info is not None else 0
            self._gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + wid)
        return self._gen

    def _cached(self, a: ModelAnalysis, key: str, fn: Any) -> Any:
        k = (id(a), key)
        hit = self._cache.get(k)
        if hit is None or hit[0] is not a:
            hit = (a, fn(a))
            self._cache[k] = hit
        return hit[1]


class RandomNeuronPermutation(_Random):
    """Permute hidden neurons uniformly at random within every permutation group of the graph's
    architecture ([`permutation_groups`][graphspace.graphs.permutation_groups]; residual streams,
    norms, attention heads handled). Function preserving.

    Args:
        seed: seed of this transform's random stream (`None`: global RNG).
    """

    def forward(self, data: ParameterGraph) -> ParameterGraph:
        a = _analysis(data)
        groups = self._cached(a, "groups", permutation_groups)
        if not groups:
            return data
        perms = random_permutation(groups, self.generator)
        return set_state_dict(data, apply_permutation(a, data.to_state_dict(), perms))


class RandomPositiveRescaling(_Random):
    r"""Rescale every hidden neuron with a positively homogeneous activation (ReLU, LeakyReLU)
    by $s \sim \log U(\text{low}, \text{high})$: incoming weights and bias times
    $s$, outgoing weights divided by $s$. Function preserving.

    Args:
        low, high: range of the scales (default 0.5, 2).
        seed: seed of the random stream.
    """

    def __init__(self, low: float = 0.5, high: float = 2.0, seed: int | None = None) -> None:
        super().__init__(seed)
        if not 0 < low <= high:
            raise ValueError("need 0 < low <= high")
        self.low, self.high = low, high

    def forward(self, data: ParameterGraph) -> ParameterGraph:
        a = _analysis(data)
        sets = [s for s, k in self._cached(a, "scal", scaling_symmetries).items()
                if k == "positive"]
        if not sets:
            return data
        lo, hi = math.log(self.low), math.log(self.high)
        scales = {}
        for s in sets:
            u = torch.rand(a.sets[s].size, generator=self.generator, dtype=torch.float64)
            scales[s] = torch.exp(lo + u * (hi - lo))
        return set_state_dict(data, apply_scaling(a, data.to_state_dict(), scales))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(low={self.low}, high={self.high})"


class RandomSignFlip(_Random):
    r"""Flip the sign of hidden neurons with an odd activation ($\tanh$, $\sin$:
    SIRENs): incoming weights, bias and outgoing weights negated. Function preserving.

    Args:
        p: probability of flipping each neuron (default 0.5).
        seed: seed of the random stream.
    """

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__(seed)
        self.p = p

    def forward(self, data: ParameterGraph) -> ParameterGraph:
        a = _analysis(data)
        sets = [s for s, k in self._cached(a, "scal", scaling_symmetries).items() if k == "sign"]
        if not sets:
            return data
        scales = {}
        for s in sets:
            flip = torch.rand(a.sets[s].size, generator=self.generator) < self.p
            scales[s] = 1.0 - 2.0 * flip.double()
        return set_state_dict(data, apply_scaling(a, data.to_state_dict(), scales))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p})"


def _sine_sets(a: ModelAnalysis) -> list[int]:
    sym = scaling_symmetries(a)
    return [s for s, k in sym.items() if k == "sign" and a.set_activation.get(s) == "sin"]


class SirenBiasShift(_Random):
    r"""SIREN bias shift: for hidden sine neurons $\sin(\omega_0 (w^\top x + b))$, add
    $k\pi/\omega_0$ ($k$ uniform in $\{-K, \dots, K\}$) to the bias and
    multiply the outgoing weights by $(-1)^k$. Function preserving.

    Args:
        w0: the SIREN's frequency $\omega_0$ (30 for the standard INR zoos).
        max_shift: $K$ (default 1).
        seed: seed of the random stream.
    """

    def __init__(self, w0: float = 30.0, max_shift: int = 1, seed: int | None = None) -> None:
        super().__init__(seed)
        self.w0 = float(w0)
        self.max_shift = int(max_shift)

    def forward(self, data: ParameterGraph) -> ParameterGraph:
        a = _analysis(data)
        sets = self._cached(a, "sine", _sine_sets)
        if not sets:
            return data
        shift = torch.zeros(a.num_nodes, dtype=torch.float64)
        sign = torch.ones(a.num_nodes, dtype=torch.float64)
        for s in sets:
            nodes = a.sets[s].nodes
            k = torch.randint(-self.max_shift, self.max_shift + 1, (nodes.numel(),),
                              generator=self.generator)
            shift[nodes] = k.double() * math.pi / self.w0
            sign[nodes] = 1.0 - 2.0 * (k.remainder(2)).double()
        has_bias = {int(s) for r in data.spec.records if r.kind == "node" and r.column == 0
                    for s in r.dst_sets}
        if any(s not in has_bias for s in sets):
            raise ValueError("SirenBiasShift needs a bias on every sine neuron")

        def fn(r: ParamRecord, v: Tensor) -> Tensor | None:
            if r.kind == "edge":
                o, il = v.shape[0], v.shape[1]
                sp = int(np.prod(v.shape[2:])) if v.dim() > 2 else 1
                src = r.src_per_edge(o, il, sp)
                f = sign[src].to(v.dtype)
                if bool((f == 1).all()):
                    return None
                return (v.reshape(o, il, sp) * f).reshape(v.shape)
            if r.kind == "node" and r.column == 0:
                assert r.nodes is not None
                return v + shift[r.nodes].to(v.dtype)
            return None

        return map_records(data, fn)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(w0={self.w0}, max_shift={self.max_shift})"


class GaussianWeightNoise(_Random):
    r"""Add Gaussian noise scaled by each tensor's standard deviation:
    $W \leftarrow W + \epsilon\,\mathrm{std}(W)\, \mathcal{N}(0, I)$ (weights, biases of more
    than one entry, norm parameters; buffers untouched). Not function preserving.

    Args:
        scale: $\epsilon$ (default 0.1, as Neural Graphs / DWSNets).
        biases: also perturb biases.
        seed: seed of the random stream.
    """

    def __init__(self, scale: float = 0.1, biases: bool = True, seed: int | None = None) -> None:
        super().__init__(seed)
        self.scale = scale
        self.biases = biases

    def forward(self, data: ParameterGraph) -> ParameterGraph:
        def fn(r: ParamRecord, v: Tensor) -> Tensor | None:
            if not is_weight_record(r) or v.numel() < 2 or (r.kind == "node" and not self.biases):
                return None
            noise = torch.randn(v.shape, generator=self.generator, dtype=v.dtype)
            return v + self.scale * v.std() * noise

        return map_records(data, fn)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(scale={self.scale}, biases={self.biases})"


class WeightDropout(_Random):
    """Zero every weight (and bias) with probability `p`; with `rescale` the kept ones are
    divided by `1 - p` (as `F.dropout`). Not function preserving.

    Args:
        p: drop probability (default 0.01).
        rescale: scale kept weights by `1 / (1 - p)`.
        seed: seed of the random stream.
    """

    def __init__(self, p: float = 0.01, rescale: bool = True, seed: int | None = None) -> None:
        super().__init__(seed)
        if not 0 <= p < 1:
            raise ValueError("need 0 <= p < 1")
        self.p = p
        self.rescale = rescale

    def forward(self, data: ParameterGraph) -> ParameterGraph:
        def fn(r: ParamRecord, v: Tensor) -> Tensor | None:
            if not is_weight_record(r):
                return None
            keep = torch.rand(v.shape, generator=self.generator) >= self.p
            out = v * keep.to(v.dtype)
            return out / (1 - self.p) if self.rescale else out

        return map_records(data, fn)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, rescale={self.rescale})"


# ----------------------------------------------------------------------------------------------
# MixUp
# ----------------------------------------------------------------------------------------------

MIXUP_MODES = ("vanilla", "permute", "align")


def mixup_state_dicts(sd1: dict[str, Tensor], sd2: dict[str, Tensor], lam: float
                      ) -> dict[str, Tensor]:
    r"""$\lambda\,\theta_1 + (1-\lambda)\,\theta_2$ for floating entries; integer entries
    (`num_batches_tracked`) are taken from `sd1`."""
    return {k: (lam * v + (1 - lam) * sd2[k].to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in sd1.items()}


def _weight_matching() -> Any:
    try:
        from graphspace.merge.spec import AlignmentSpec
        from graphspace.merge.weight_matching import weight_matching
    except ImportError as e:  # pragma: no cover - depends on the installed parts
        raise ImportError("mode='align' needs graphspace.merge.weight_matching") from e
    return AlignmentSpec, weight_matching


def mixup_graphs(g1: ParameterGraph, g2: ParameterGraph, lam: float, mode: str = "vanilla",
                 generator: torch.Generator | None = None, num_classes: int | None = None,
                 align_kwargs: dict[str, Any] | None = None, _spec: Any = None
                 ) -> ParameterGraph:
    r"""Weight-space MixUp of two graphs of one architecture (see the module docstring).

    Targets are mixed too: float `y` linearly; with `num_classes` (classification) the graph
    keeps the hard label of the dominant network in `y` and gets soft targets
    `y_soft = lam * onehot(y1) + (1 - lam) * onehot(y2)` of shape `[1, num_classes]`.
    """
    if mode not in MIXUP_MODES:
        raise ValueError(f"mode must be one of {MIXUP_MODES}, got {mode!r}")
    a = _analysis(g1)
    sd1, sd2 = g1.to_state_dict(), g2.to_state_dict()
    if any(k not in sd2 or tuple(sd1[k].shape) != tuple(sd2[k].shape) for k in sd1):
        raise ValueError("mixup needs two networks of the same architecture")
    if mode == "permute":
        groups = permutation_groups(a)
        if groups:
            sd2 = apply_permutation(a, sd2, random_permutation(groups, generator))
    elif mode == "align":
        AlignmentSpec, weight_matching = _weight_matching()
        spec = _spec if _spec is not None else AlignmentSpec(a)
        res = weight_matching(sd1, sd2, spec=spec, device="cpu", **(align_kwargs or {}))
        sd2 = apply_permutation(a, sd2, res.perms)
    out = set_state_dict(g1, mixup_state_dicts(sd1, sd2, lam))
    y1, y2 = getattr(g1, "y", None), getattr(g2, "y", None)
    if y1 is not None and y2 is not None:
        if num_classes is not None:
            oh = torch.zeros(1, num_classes)
            oh[0, int(y1.view(-1)[0])] += lam
            oh[0, int(y2.view(-1)[0])] += 1 - lam
            out.y_soft = oh
            out.y = (y1 if lam >= 0.5 else y2).clone()
        elif y1.is_floating_point():
            out.y = lam * y1 + (1 - lam) * y2.to(y1.dtype)
    out.mix_lambda = torch.tensor([float(lam)])
    return out


class WeightMixUp(_Random):
    r"""Weight-space MixUp with a random partner drawn from `source` (e.g. the training
    dataset), $\lambda \sim \mathrm{Beta}(\alpha, \alpha)$.

    Args:
        source: indexable collection of parameter graphs (a zoo dataset: its `get` is used, so
            the dataset's own transform is not applied to partners).
        alpha: Beta parameter (default 0.4).
        mode: `"vanilla"`, `"permute"` or `"align"` (see
            [`mixup_graphs`][graphspace.data.augment.mixup_graphs]).
        num_classes: for classification targets (adds `y_soft`).
        max_tries: partners drawn until one has the same architecture (heterogeneous zoos);
            the graph is returned unchanged if none is found.
        seed: seed of the random stream.
    """

    def __init__(self, source: Sequence[ParameterGraph] | Any, alpha: float = 0.4,
                 mode: str = "vanilla", num_classes: int | None = None, max_tries: int = 10,
                 seed: int | None = None) -> None:
        super().__init__(seed)
        if mode not in MIXUP_MODES:
            raise ValueError(f"mode must be one of {MIXUP_MODES}, got {mode!r}")
        if mode == "align":
            _weight_matching()
        self.source = source
        self.alpha = alpha
        self.mode = mode
        self.num_classes = num_classes
        self.max_tries = max_tries

    def _partner(self, i: int) -> ParameterGraph:
        get = getattr(self.source, "get", None)
        return get(i) if get is not None and hasattr(self.source, "len") else self.source[i]

    def forward(self, data: ParameterGraph) -> ParameterGraph:
        n = len(self.source)
        shapes = [tuple(r.shape) for r in data.spec.records]
        partner = None
        for _ in range(self.max_tries):
            j = int(torch.randint(n, (1,), generator=self.generator))
            cand = self._partner(j)
            if [tuple(r.shape) for r in cand.spec.records] == shapes and \
                    [r.key for r in cand.spec.records] == [r.key for r in data.spec.records]:
                partner = cand
                break
        if partner is None:
            return data
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        lam = _beta(u, self.alpha)
        spec = None
        if self.mode == "align":
            AlignmentSpec, _ = _weight_matching()
            spec = self._cached(_analysis(data), "align", AlignmentSpec)
        return mixup_graphs(data, partner, lam, self.mode, self.generator, self.num_classes,
                            _spec=spec)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(alpha={self.alpha}, mode={self.mode!r})"


def _beta(u: float, alpha: float) -> float:
    """A Beta(alpha, alpha) draw from a uniform `u` (inverse CDF, via scipy)."""
    from scipy.stats import beta

    return float(beta.ppf(min(max(u, 1e-12), 1 - 1e-12), alpha, alpha))
