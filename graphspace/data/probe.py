r"""Probe features: what each neuron computes on a few fixed inputs, as node features.

Neural Graphs (Kofinas et al., "Graph Neural Networks for Learning Equivariant Representations
of Neural Networks", ICLR 2024, Sec. 3) add *probe features* to the parameter graph: the
network is evaluated on $P$ probe inputs $p_1, \dots, p_P$ and every neuron
$v$ gets the values it takes on them,

$$
\mathbf{f}_v = \big(z_v(p_1), \dots, z_v(p_P)\big) \in \mathbb{R}^P,
$$

appended to its node features. Input neurons get the probe coordinates themselves. Here
$z_v$ is the neuron's *pre-activation* (the output of the layer that produces it, before
its nonlinearity), which is exact and architecture-independent. The output neurons' features
are the network's outputs on the probes; for an INR that is the encoded image sampled at
$P$ points.

The features are equivariant to every function-preserving hidden-neuron permutation (they move
with their neuron). Under a sign flip of an odd activation
([`RandomSignFlip`][graphspace.data.RandomSignFlip]) the flipped neuron's features change sign, so
apply this transform *after* the augmentations, as
[`WeightSpaceDataModule`][graphspace.data.datamodules.WeightSpaceDataModule] does with its
`transforms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.transforms import BaseTransform

from graphspace.graphs import ParameterGraph

__all__ = ["ProbeFeatures"]


def _per_channel(t: Tensor) -> Tensor:
    """`[P, C, *spatial]` -> `[P, C]` (mean over space); `[P, C]` as it is."""
    return t.flatten(2).mean(-1) if t.dim() > 2 else t.reshape(t.shape[0], -1)


class ProbeFeatures(BaseTransform):
    r"""Append each neuron's values on $P$ fixed probe inputs to `x` (Neural Graphs'
    probe features; see the module docstring for the definition).

    The graph is turned back into weights
    ([`to_state_dict`][graphspace.graphs.ParameterGraph.to_state_dict]) and evaluated with
    `torch.func.functional_call` on `model`, the architecture template (its own weights are not used
    and never modified). Forward hooks on the modules that own an edge-weight record collect their
    outputs; spatial dimensions (convolutions) are averaged. Nodes that no such module produces
    (e.g. residual sums) get zeros.

    Args:
        model: a module of the graphs' architecture (e.g.
            [`DWSNetsINR`][graphspace.data.DWSNetsINR]).
        points: probe inputs `[P, *input_shape]`; default: `num_points` points drawn
            uniformly from `[low, high]^d` with `seed`, where `d` is the number of input
            neurons (2 for an image INR).
        num_points, low, high, seed: the default probes.
        scale: multiply the features by this factor (default 1).
        normalize: divide each layer's features by their root mean square over a training
            set, set by [`fit`][graphspace.data.probe.ProbeFeatures.fit] (default `True`; before
            [`fit`][graphspace.data.probe.ProbeFeatures.fit] is called the features are only
            multiplied by `scale`). Probe values differ in magnitude by an order of magnitude or
            more between layers (e.g. 0.05 to 0.5 in the digits SIRENs), and small raw values are
            drowned by the encoder's embeddings. One scalar per layer keeps the features equivariant
            to hidden-neuron permutations and sign flips (no centring).
            [`WeightSpaceDataModule`][graphspace.data.datamodules.WeightSpaceDataModule] calls
            [`fit`][graphspace.data.probe.ProbeFeatures.fit] on its training split.

    Examples:
        >>> from graphspace.data import DWSNetsINR
        >>> from graphspace.graphs import ParameterGraph
        >>> inr = DWSNetsINR()
        >>> g = ProbeFeatures(inr, num_points=16)(ParameterGraph.from_module(inr))
        >>> g.x.shape  # 3 bias/scale channels + 16 probe values per neuron
        torch.Size([67, 19])
    """

    def __init__(self, model: nn.Module, points: Tensor | Sequence[Sequence[float]] | None = None,
                 num_points: int = 16, low: float = -1.0, high: float = 1.0, seed: int = 0,
                 scale: float = 1.0, normalize: bool = True) -> None:
        if points is None and num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.model = model
        self.points = None if points is None else torch.as_tensor(points, dtype=torch.float32)
        self.num_points = int(num_points if points is None else self.points.shape[0])
        self.low, self.high, self.seed, self.scale = float(low), float(high), int(seed), scale
        self.normalize = normalize
        #: ``layer -> 1 / RMS`` of the raw features on the data :meth:`fit` saw
        self.layer_scale: dict[int, float] = {}
        self._plans: dict[int, tuple[Any, list[tuple[str, Tensor]], Tensor]] = {}
        self._modules = dict(model.named_modules())

    @property
    def out_channels(self) -> int:
        """Number of feature channels appended to `x` (`P`)."""
        return self.num_points

    def _probes(self, d: int) -> Tensor:
        if self.points is None:
            g = torch.Generator().manual_seed(self.seed)
            self.points = torch.rand(self.num_points, d, generator=g) * (
                self.high - self.low) + self.low
        return self.points

    def _plan(self, graph: ParameterGraph) -> tuple[list[tuple[str, Tensor]], Tensor]:
        analysis = getattr(graph.spec, "analysis", None)
        if analysis is None:
            raise ValueError("ProbeFeatures needs a graph built by ParameterGraph.from_module "
                             "or a zoo dataset (its spec carries the model analysis)")
        cached = self._plans.get(id(analysis))
        if cached is not None and cached[0] is analysis:
            return cached[1], cached[2]
        hooked: list[tuple[str, Tensor]] = []
        for r in analysis.records:
            if r.kind == "edge" and r.dst is not None:
                if r.module not in self._modules:
                    raise ValueError(f"ProbeFeatures: the graph's module '{r.module}' (tensor "
                                     f"'{r.key}') is not in {type(self.model).__name__}")
                hooked.append((r.module, r.dst))
        inputs = [analysis.sets[s].nodes for s in analysis.input_sets]
        if len(inputs) != 1:
            raise ValueError(f"ProbeFeatures supports models with one input, got {len(inputs)}")
        self._plans[id(analysis)] = (analysis, hooked, inputs[0])
        return hooked, inputs[0]

    def features(self, data: Any) -> Tensor:
        """The raw probe features `[num_nodes, P]` of one graph (no scaling)."""
        if not isinstance(data, ParameterGraph) or isinstance(getattr(data, "spec", None), list):
            raise TypeError("ProbeFeatures is applied to single parameter graphs, not batches")
        hooked, input_nodes = self._plan(data)
        points = self._probes(int(input_nodes.numel()))
        outputs: dict[str, Tensor] = {}
        handles = []
        for name in {m for m, _ in hooked}:
            def hook(_mod: nn.Module, _inp: Any, out: Tensor, name: str = name) -> None:
                outputs[name] = out
            handles.append(self._modules[name].register_forward_hook(hook))
        try:
            sd = {k: v.float() for k, v in data.to_state_dict().items()}
            with torch.no_grad():
                torch.func.functional_call(self.model, sd, (points,), strict=False)
        finally:
            for h in handles:
                h.remove()
        feats = torch.zeros(int(data.num_nodes), points.shape[0], dtype=data.x.dtype)
        feats[input_nodes] = _per_channel(points).T.to(feats.dtype)
        for name, dst in hooked:
            feats[dst] = _per_channel(outputs[name]).T.to(feats.dtype)
        return feats

    def fit(self, dataset: Sequence[Any], max_graphs: int = 512) -> ProbeFeatures:
        r"""Set the per-layer scales $1 / \sqrt{\mathbb E[f^2]}$ from (the first
        `max_graphs`) graphs of `dataset` (the training split: statistics never come from
        evaluation data). Returns `self`."""
        if not self.normalize:
            return self
        sq: dict[int, float] = {}
        cnt: dict[int, int] = {}
        for i in range(min(len(dataset), max_graphs)):
            g = dataset[i]
            f = self.features(g).double()
            layer = g.node_layer
            for lv in layer.unique().tolist():
                fl = f[layer == lv]
                sq[lv] = sq.get(lv, 0.0) + float((fl * fl).sum())
                cnt[lv] = cnt.get(lv, 0) + fl.numel()
        self.layer_scale = {lv: (cnt[lv] / sq[lv]) ** 0.5 if sq[lv] > 0 else 1.0 for lv in sq}
        return self

    def forward(self, data: Any) -> Any:
        feats = self.features(data) * self.scale
        if self.normalize and self.layer_scale:
            lut = torch.ones(int(data.node_layer.max()) + 1, dtype=feats.dtype)
            for lv, sc in self.layer_scale.items():
                if lv < lut.numel():
                    lut[lv] = sc
            feats = feats * lut[data.node_layer].unsqueeze(1)
        out = data.clone()
        out.x = torch.cat([data.x, feats], dim=1)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.model).__name__}, "
                f"num_points={self.num_points})")
