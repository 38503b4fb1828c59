r"""OT fusion (Singh & Jaggi 2020, "Model Fusion via Optimal Transport").

Layer by layer, from the input to the output, the neurons of a model $k$ are softly
aligned to the neurons of the target model by optimal transport. For a layer with incoming
weights $W^{(k)}_\ell$ (`[n_k, m_k, *spatial]`) and the previous layer's transport
$\hat T_{\ell-1}$ (`[m_k, m]`),

1. align the incoming edges: $\hat W^{(k)}_\ell = W^{(k)}_\ell\, \hat T_{\ell-1}$;
2. ground cost between neuron $i$ of model $k$ and neuron $j$ of the target:
   weight-based $C_{ij} = \lVert [\hat W^{(k)}_{\ell, i}, b^{(k)}_i] -
   [W_{\ell, j}, b_j] \rVert^2$, or activation-based $C_{ij} = E[(a^{(k)}_i - a_j)^2]$
   over the data;
3. transport $T_\ell = \arg\min_{T \in \Pi(\alpha, \beta)} \langle T, C\rangle$ (exact EMD
   or entropic Sinkhorn) between the marginals $\alpha$ (model $k$) and
   $\beta$ (target), uniform or proportional to neuron importance (the $\ell_1$ norm
   of incoming weights);
4. normalise by the target marginal, $\hat T_\ell = T_\ell\, \mathrm{diag}(1/\beta)$, and
   map the layer onto the target's neurons: $\tilde W^{(k)}_\ell = \hat T_\ell^\top \hat
   W^{(k)}_\ell$ (biases and norm parameters the same way).

The fused model is $\sum_k w_k \tilde W^{(k)}$. With uniform marginals, equal widths and
exact EMD, $n\,T_\ell$ is a permutation matrix and fusion reduces to permutation alignment.
Models may have different widths: the result has the target's shape.

Supported are sequential chains (MLPs, CNNs, with norms following their channels and flattens
before linear layers); residual connections, attention and depthwise convolutions tie several
layers to one transport and raise
[`UnsupportedFusionError`][graphspace.merge.ot_fusion.UnsupportedFusionError].
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from graphspace.graphs import ModelAnalysis, ParamRecord, analyze, permutation_groups
from graphspace.graphs.errors import ArchitectureMismatchError
from graphspace.merge._utils import state_of, weighted_average
from graphspace.merge.activations import activation_statistics
from graphspace.runtime import eval_mode


class UnsupportedFusionError(ValueError):
    """The model's structure is outside what layer-wise OT fusion handles."""


@dataclass
class FusionResult:
    """The fused model and, per fused model, the transport map of every group
    (`transports[k][name]`: `[n_k, n_target]`, rows summing to the model's marginal)."""

    model: nn.Module
    transports: list[dict[str, Tensor]] = field(default_factory=list)


@dataclass
class _Chain:
    analysis: ModelAnalysis
    records: dict[str, ParamRecord]
    group_of_set: dict[int, str]
    producer: dict[str, ParamRecord]  # group name -> its Linear/Conv weight record
    order: list[str]  # group names, input to output
    sizes: dict[str, int]


def _chain(model: nn.Module) -> _Chain:
    a = analyze(model)
    groups = permutation_groups(a)
    group_of_set: dict[int, str] = {}
    producer: dict[str, ParamRecord] = {}
    depth: dict[str, int] = {}
    for g in groups:
        kinds = [a.sets[s].kind for s in g.sets]
        layers = [s for s in g.sets if a.sets[s].kind in ("linear", "conv")]
        if g.num_heads or len(layers) != 1 or any(k not in ("linear", "conv", "norm")
                                                  for k in kinds):
            what = ", ".join(f"{a.sets[s].kind} {a.sets[s].name!r}" for s in g.sets)
            raise UnsupportedFusionError(
                f"OT fusion supports sequential chains (MLP/CNN layers with norms following their "
                f"channels); permutation group {g.name!r} ties [{what}] (a residual connection, "
                "attention or a depthwise convolution). Use method='weight_matching' or "
                "'activation_matching' for this architecture.")
        for s in g.sets:
            group_of_set[s] = g.name
        rec = [r for r in a.records if r.kind == "edge" and r.dst_sets == layers]
        if len(rec) != 1:
            raise UnsupportedFusionError(f"group {g.name!r} has no single producing weight")
        producer[g.name] = rec[0]
        depth[g.name] = a.sets[layers[0]].layer
    for r in a.records:
        if r.kind == "edge" and r.groups > 1 and any(s in group_of_set for s in r.dst_sets):
            raise UnsupportedFusionError(f"grouped convolution '{r.key}' is not supported")
    order = sorted(producer, key=lambda n: depth[n])
    return _Chain(a, {r.key: r for r in a.records}, group_of_set, producer, order,
                  {g.name: g.size for g in groups})


def _row_map(ch: _Chain, r: ParamRecord, maps: dict[str, Tensor], axis: int,
             n_target: int) -> Tensor | None:
    """The `[n_k, n_target]` map of a record's rows (axis 0) or columns (axis 1)."""
    sets = r.dst_sets if axis == 0 else r.src_sets
    blocks = []
    for s in sets:
        name = ch.group_of_set.get(s)
        size = ch.analysis.sets[s].size
        if name is None:
            blocks.append(torch.eye(size, dtype=torch.float64))
        elif name in maps:
            blocks.append(maps[name])
        else:
            return None
    m = torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0]
    if m.shape[1] != n_target:
        raise ArchitectureMismatchError(
            f"'{r.key}': {m.shape[0]} -> {n_target} neurons along axis {axis} cannot be "
            "aligned (model inputs and outputs must have the same size)")
    return m


def _transform(ch: _Chain, key: str, t: Tensor, target_shape: tuple[int, ...],
               maps: dict[str, Tensor], rows: bool = True) -> Tensor:
    """Entry `key` of model `k` mapped onto the target's neurons: columns always, rows when
    `rows` (then in the target's tensor layout; otherwise the canonical layout is returned)."""
    r = ch.records[key]
    x = t.detach().double()
    if r.kind == "extra":
        return t
    if r.kind in ("diag", "node"):
        name = ch.group_of_set.get(r.dst_sets[0]) if r.dst_sets else None
        if name is None:
            return x
        return (maps[name].T @ x.reshape(-1)).reshape(target_shape)
    c = r.to_canonical(x)
    tview = _target_view(r, target_shape)
    assert r.perm is not None
    tcanon = tuple(tview[p] for p in r.perm)
    if r.groups == 1:
        mc = _row_map(ch, r, maps, 1, tcanon[1])
        assert mc is not None
        c = torch.einsum("oi...,ij->oj...", c, mc)
    if not rows:
        return c
    mr = _row_map(ch, r, maps, 0, tcanon[0])
    assert mr is not None
    c = torch.einsum("oi...,oj->ji...", c, mr)
    tr = copy.copy(r)
    tr.shape = target_shape
    tr.view_shape = tview
    return tr.from_canonical(c)


def _target_view(r: ParamRecord, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The record's `view_shape` for a model of another width (spatial factors are kept)."""
    assert r.view_shape is not None
    if len(r.view_shape) == len(r.shape):
        return target_shape
    # a Linear after a flatten: (out, c, s) or (out, s, c) with s fixed
    out, rest = target_shape[0], target_shape[1]
    o_view = list(r.view_shape)
    if r.perm == (0, 1, 2):
        s = o_view[2]
        return (out, rest // s, s)
    s = o_view[1]
    return (out, s, rest // s)


def _marginal(kind: str, weights: Tensor) -> np.ndarray:
    n = weights.shape[0]
    if kind == "uniform":
        return np.full(n, 1.0 / n)
    if kind == "importance":
        imp = weights.reshape(n, -1).abs().sum(1).double().numpy() + 1e-12
        return imp / imp.sum()
    raise ValueError(f"unknown marginals {kind!r}; use 'uniform' or 'importance'")


def _solve(a: np.ndarray, b: np.ndarray, cost: np.ndarray, solver: str, reg: float
           ) -> np.ndarray:
    try:
        import ot
    except ImportError as e:
        raise ImportError("OT fusion needs POT: pip install pot "
                          "(or graphspace-weights[merge])") from e
    if solver == "emd":
        return ot.emd(a, b, cost)
    if solver == "sinkhorn":
        scale = float(cost.max()) or 1.0
        return ot.sinkhorn(a, b, cost / scale, reg)
    raise ValueError(f"unknown solver {solver!r}; use 'emd' or 'sinkhorn'")


def ot_fusion(
    models: Sequence[nn.Module],
    *,
    target: int = 0,
    weights: Sequence[float] | None = None,
    cost: str = "weight",
    solver: str = "emd",
    reg: float = 1e-2,
    marginals: str = "uniform",
    loader: Iterable | None = None,
    num_batches: int | None = None,
) -> FusionResult:
    """Fuse `models` into the shape of `models[target]` by layer-wise optimal transport.

    Args:
        models: two or more models of one sequential architecture (widths may differ).
        target: index of the model whose neurons (and shape) the others are transported onto.
        weights: fusion weights (uniform by default).
        cost: `"weight"` (incoming weights and bias) or `"activation"` (needs `loader`).
        solver: `"emd"` (exact) or `"sinkhorn"` (entropic, regularisation `reg` on the
            cost normalised to a maximum of 1).
        marginals: `"uniform"` or `"importance"` (proportional to incoming-weight norms).
        loader: batches for activation costs.
        num_batches: use the first `num_batches` batches.

    Returns:
        [`FusionResult`][graphspace.merge.ot_fusion.FusionResult] (the fused model is a new module
        shaped like the target).

    Raises:
        UnsupportedFusionError: residual connections, attention, depthwise convolutions.
    """
    if len(models) < 2:
        raise ValueError("fusion needs at least two models")
    if cost == "activation" and loader is None:
        raise ValueError("cost='activation' needs a loader")
    if cost not in ("weight", "activation"):
        raise ValueError(f"unknown cost {cost!r}; use 'weight' or 'activation'")
    chains = [_chain(m) for m in models]
    tgt = chains[target]
    for i, ch in enumerate(chains):
        if ch.order != tgt.order or set(ch.records) != set(tgt.records):
            raise ArchitectureMismatchError(
                f"model {i} does not have the structure of the target (groups {ch.order} vs "
                f"{tgt.order})")
    states = [{k: v.cpu() for k, v in state_of(m).items()} for m in models]  # OT runs on CPU
    ts = states[target]
    fused_states, transports = [], []
    for k, (ch, st) in enumerate(zip(chains, states)):
        if k == target:
            fused_states.append(ts)
            transports.append({n: torch.eye(s, dtype=torch.float64) / s
                               for n, s in tgt.sizes.items()})
            continue
        stats = None
        if cost == "activation":
            with eval_mode(models[k], models[target]):
                sets = [tgt.producer[n].dst_sets[0] for n in tgt.order]
                stats = activation_statistics(models[k], loader, sets, models[target],
                                              num_batches, ch.analysis, tgt.analysis)
        maps: dict[str, Tensor] = {}
        raw: dict[str, Tensor] = {}
        for name in tgt.order:
            r = ch.producer[name]
            w_hat = _transform(ch, r.key, st[r.key], tuple(ts[r.key].shape), maps, rows=False)
            ck = w_hat.reshape(w_hat.shape[0], -1)
            ct = tgt.records[r.key].to_canonical(ts[r.key].double())
            ct = ct.reshape(ct.shape[0], -1)
            bias = _bias_key(ch, r)
            if bias is not None:
                ck = torch.cat([ck, st[bias].double().reshape(-1, 1)], 1)
                ct = torch.cat([ct, ts[bias].double().reshape(-1, 1)], 1)
            if cost == "weight":
                c = torch.cdist(ck, ct) ** 2
            else:
                assert stats is not None
                c = stats[r.dst_sets[0]].squared_distance().cpu()
            alpha = _marginal(marginals, r.to_canonical(st[r.key].double()))
            beta = _marginal(marginals, ct)
            t = torch.from_numpy(_solve(alpha, beta, c.numpy(), solver, reg))
            raw[name] = t
            maps[name] = t / torch.from_numpy(beta)[None, :]
        out = {key: _transform(ch, key, st[key], tuple(ts[key].shape), maps).to(ts[key].dtype)
               if ch.records[key].kind != "extra" else ts[key] for key in ts}
        fused_states.append(out)
        transports.append(raw)
    fused = copy.deepcopy(models[target])
    fused.load_state_dict(weighted_average(fused_states, weights))
    return FusionResult(fused, transports)


def _bias_key(ch: _Chain, r: ParamRecord) -> str | None:
    for rb in ch.analysis.records:
        if rb.kind == "node" and rb.column == 0 and rb.dst_sets == r.dst_sets:
            return rb.key
    return None
