r"""Repair after merging: BatchNorm statistics reset and REPAIR (Jordan et al. 2022).

Averaging aligned weights shrinks the variance of hidden pre-activations ("variance
collapse"). Two fixes:

* [`reset_bn_stats`][graphspace.merge.repair.reset_bn_stats] -- for networks with BatchNorm,
  recompute the running mean and variance of every BatchNorm layer on data (cumulative average over
  the loader), so that the merged network normalises with its own statistics.
* [`repair`][graphspace.merge.repair.repair] -- REPAIR ("REnormalizing Permuted Activations for
  Interpolation Repair", Jordan et al. 2022) for networks without BatchNorm: for every hidden neuron
  $i$ of the merged network with pre-activation $z_i$, rescale and shift it to the interpolated
  statistics of the (aligned) endpoints,

    $$
    \mu^\star_i = \sum_k w_k\, \mu^{(k)}_i, \qquad
    \sigma^\star_i = \sum_k w_k\, \sigma^{(k)}_i, \qquad
    z_i \leftarrow \frac{\sigma^\star_i}{\sigma_i}\,(z_i - \mu_i) + \mu^\star_i,
    $$

  where $\mu_i, \sigma_i$ are measured on the merged network after its earlier layers
  were repaired. The affine correction is folded into the producing layer's weight rows and
  bias (a layer without a bias is only rescaled).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graphspace.graphs import ModelAnalysis, analyze
from graphspace.merge._utils import batch_input, iterate, model_device, to_device
from graphspace.merge.activations import activation_statistics
from graphspace.merge.spec import node_lookup
from graphspace.runtime import eval_mode


class _BatchNormTrainView(nn.Module):
    """`model` seen by `torch.optim.swa_utils.update_bn`, which switches the whole model to
    training mode: here only the given BatchNorm layers follow `train()`, everything else
    stays in eval mode (dropout off), as when the merged model is used."""

    def __init__(self, model: nn.Module, bns: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self._bns = bns  # a plain list: they are registered inside `model` already

    def train(self, mode: bool = True) -> _BatchNormTrainView:
        self.training = mode
        self.model.eval()
        for b in self._bns:
            b.train(mode)
        return self

    def forward(self, x: Any) -> Any:
        return self.model(x)


@torch.no_grad()
def reset_bn_stats(model: nn.Module, loader: Iterable, num_batches: int | None = None,
                   inplace: bool = False) -> nn.Module:
    """Recompute the running statistics of every BatchNorm layer of `model` on `loader`.

    PyTorch's `torch.optim.swa_utils.update_bn` (statistics are the cumulative average over
    the batches, `momentum=None`), with the rest of the model in eval mode (dropout off) and
    batches in any form `graphspace.merge` accepts (tensors, `(input, target)` pairs, dicts
    with key `x`), moved to the model's device.

    Args:
        model: the model (not modified unless `inplace`).
        loader: batches of inputs.
        num_batches: use the first `num_batches` batches (all by default).
        inplace: update `model` itself instead of a copy.

    Returns:
        The model with recomputed statistics, in the training mode it had.

    Raises:
        ValueError: the model has no BatchNorm layer, or the loader yields no batch.
    """
    from torch.optim.swa_utils import update_bn

    m = model if inplace else copy.deepcopy(model)
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)
           and b.track_running_stats]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to reset; use REPAIR "
                         "(graphspace.merge.repair) for networks without BatchNorm")
    was = m.training
    dev = model_device(m)
    seen = 0

    def inputs() -> Iterator[tuple[Any]]:
        nonlocal seen
        for batch in iterate(loader, num_batches):
            seen += 1
            yield (to_device(batch_input(batch), dev),)  # update_bn feeds element 0

    view = _BatchNormTrainView(m, bns).eval()
    try:
        update_bn(inputs(), view)
    finally:
        m.train(was)
    if seen == 0:
        raise ValueError("the loader yielded no batches")
    return m


def repairable_sets(model: nn.Module, kinds: Sequence[str] = ("linear", "conv")) -> list[int]:
    """Hidden neuron sets whose pre-activations REPAIR can correct: outputs of a parameterised
    layer (`kinds`) that are permutable (hidden) neurons."""
    a = analyze(model)
    producing = {s for r in a.records if r.kind == "edge" for s in r.dst_sets}
    return [s.id for s in a.sets if s.kind in kinds and s.permutable and s.id in producing]


@torch.no_grad()
def repair(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    loader: Iterable,
    weights: Sequence[float] | None = None,
    *,
    num_batches: int | None = None,
    kinds: Sequence[str] = ("linear", "conv"),
    eps: float = 1e-5,
    inplace: bool = False,
) -> nn.Module:
    r"""REPAIR the merged model towards the interpolated statistics of its endpoints.

    Args:
        merged: the merged model $\sum_k w_k \pi_k(\theta_k)$.
        endpoints: the *aligned* endpoint models $\pi_k(\theta_k)$ (same architecture).
        loader: batches of inputs used to measure statistics.
        weights: the interpolation weights $w_k$ (uniform by default).
        num_batches: use the first `num_batches` batches.
        kinds: neuron-set kinds to correct (outputs of `Linear`/`Conv` layers by default).
        eps: added to the merged standard deviation.
        inplace: modify `merged` instead of a copy.

    Returns:
        the repaired model.
    """
    k = len(endpoints)
    w = [1.0 / k] * k if weights is None else [float(x) for x in weights]
    m = merged if inplace else copy.deepcopy(merged)
    a = analyze(m)
    sets = repairable_sets(m, kinds)
    if not sets:
        raise ValueError(f"{type(merged).__name__} has no hidden layer output to repair")
    target_mean: dict[int, Tensor] = {}
    target_std: dict[int, Tensor] = {}
    for wi, e in zip(w, endpoints):
        with eval_mode(e):
            st = activation_statistics(e, loader, sets, num_batches=num_batches)
        for s in sets:
            target_mean[s] = target_mean.get(s, 0) + wi * st[s].mean_a
            target_std[s] = target_std.get(s, 0) + wi * st[s].std_a
    levels = sorted({a.sets[s].layer for s in sets})
    with eval_mode(m):
        for level in levels:
            todo = [s for s in sets if a.sets[s].layer == level]
            st = activation_statistics(m, loader, todo, num_batches=num_batches, analysis=a)
            state = m.state_dict()
            for s in todo:
                scale = target_std[s] / (st[s].std_a + eps)
                shift = target_mean[s] - scale * st[s].mean_a
                _fold(a, state, s, scale, shift)
            m.load_state_dict(state)
    return m


def _fold(a: ModelAnalysis, state: dict[str, Tensor], s: int, scale: Tensor, shift: Tensor
          ) -> None:
    """`z <- scale * z + shift` for set `s`, folded into its producing weights and bias."""
    nodes = a.sets[s].nodes
    for r in a.records:
        if r.kind == "edge" and s in r.dst_sets:
            assert r.dst is not None
            rows = node_lookup(r.dst, a.num_nodes)[nodes]
            t = state[r.key]
            c = r.to_canonical(t).clone()
            f = scale.to(c.device, c.dtype).view(-1, *([1] * (c.dim() - 1)))
            c[rows.to(c.device)] *= f
            state[r.key] = r.from_canonical(c)
        elif r.kind == "node" and r.column == 0 and s in r.dst_sets:
            assert r.nodes is not None
            idx = node_lookup(r.nodes, a.num_nodes)[nodes].to(state[r.key].device)
            b = state[r.key].reshape(-1).clone()
            b[idx] = b[idx] * scale.to(b) + shift.to(b)
            state[r.key] = b.reshape(state[r.key].shape)

