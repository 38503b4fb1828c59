r"""Symmetries of a network read off the shared model analysis.

**Permutations.** Hidden neurons of a layer can be reordered, with the rows of the producing
weights and the columns of the consuming weights, without changing the function. Neuron sets
tied by residual adds, norms, depthwise convolutions and attention form one
[`PermutationGroup`][graphspace.graphs.symmetry.PermutationGroup]; model inputs and outputs are
never permuted. Attention sets are head-structured: a permutation of `Q`/`K` (shared) and of `V`
must permute heads as blocks (the same head permutation for `Q`, `K` and `V`) and may permute
coordinates inside each head.

**Rescaling and sign flips** (Godfrey et al. 2022 "On the symmetries of deep learning models
and their internal representations"; Grigsby et al. 2023 "Hidden symmetries of ReLU networks";
Kalogeropoulos et al. 2024 "Scale Equivariant Graph Metanetworks"): for a hidden neuron whose
pre-activation $z = w^\top x + b$ only feeds positively homogeneous activations
($\sigma(sz) = s\sigma(z)$ for $s > 0$, e.g. ReLU) and then linear consumers, scaling
its incoming weights and bias by $s$ and its outgoing weights by $1/s$ keeps the
function; for odd activations ($\sigma(-z) = -\sigma(z)$, e.g. tanh, sin) the same holds
with $s = \pm 1$.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graphspace.graphs.analysis import (
    ACTIVATIONS,
    ODD,
    POSITIVE_HOMOGENEOUS,
    ModelAnalysis,
    ParamRecord,
    PermutationGroup,
    analyze,
)


def _analysis(obj: Any, example_input: Any = None) -> ModelAnalysis:
    if isinstance(obj, ModelAnalysis):
        return obj
    if isinstance(obj, nn.Module):
        return analyze(obj, example_input)
    spec = getattr(obj, "spec", None)
    if spec is not None and getattr(spec, "analysis", None) is not None:
        return spec.analysis
    raise TypeError(f"expected a model, a ModelAnalysis or a ParameterGraph, got {type(obj)}")


def permutation_groups(model: Any, example_input: Any = None) -> list[PermutationGroup]:
    """The permutation symmetry groups of `model` (a module, analysis or parameter graph).

    Only groups that the analysis proved are returned: permuting every member block of a group
    by one permutation (heads as blocks where `num_heads > 0`) leaves the function unchanged.
    """
    a = _analysis(model, example_input)
    return [dataclasses.replace(g, sets=list(g.sets), members=list(g.members))
            for g in a.groups]


def random_permutation(
    groups: Sequence[PermutationGroup], generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A uniformly random valid permutation for every group (head-aware for attention)."""
    perms: dict[str, Tensor] = {}
    head_perms: dict[int, Tensor] = {}
    for g in groups:
        if g.num_heads > 0:
            h = g.num_heads
            d = g.size // h
            key = g.head_group if g.head_group is not None else -1 - len(head_perms)
            if key not in head_perms:
                head_perms[key] = torch.randperm(h, generator=generator)
            hp = head_perms[key]
            within = torch.stack([torch.randperm(d, generator=generator) for _ in range(h)])
            perms[g.name] = (hp.view(h, 1) * d + within[hp]).reshape(-1)
        else:
            perms[g.name] = torch.randperm(g.size, generator=generator)
    return perms


def _node_map(a: ModelAnalysis, groups: Sequence[PermutationGroup],
              perms: dict[str, Tensor]) -> Tensor:
    node_map = torch.arange(a.num_nodes)
    names = {g.name for g in groups}
    unknown = [k for k in perms if k not in names]
    if unknown:
        raise KeyError(f"no permutation group named {unknown[0]!r}; groups: {sorted(names)}")
    for g in groups:
        p = perms.get(g.name)
        if p is None:
            continue
        p = torch.as_tensor(p, dtype=torch.long)
        if p.numel() != g.size or not torch.equal(torch.sort(p).values, torch.arange(g.size)):
            raise ValueError(f"permutation for group {g.name!r} is not a permutation of "
                             f"{g.size} elements")
        for nodes in g.members:
            node_map[nodes] = nodes[p]
    return node_map


def _positions(nodes: Tensor, node_map: Tensor, n: int, device: torch.device) -> Tensor:
    """Index (on `device`) that gathers a parameter's entries into the permuted order."""
    nodes, node_map = nodes.cpu(), node_map.cpu()
    tmp = torch.full((n,), -1, dtype=torch.long)
    tmp[nodes] = torch.arange(nodes.numel())
    idx = tmp[node_map[nodes]]
    if bool((idx < 0).any()):
        raise ValueError("permutation maps a neuron outside its parameter's neuron list")
    return idx.to(device)


def _transform(
    a: ModelAnalysis, state_dict: dict[str, Tensor], fn_edge: Any, fn_vec: Any
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for r in a.records:
        t = state_dict[r.key]
        if r.kind == "edge":
            out[r.key] = r.from_canonical(fn_edge(r, r.to_canonical(t))).clone()
        elif r.kind in ("diag", "node"):
            out[r.key] = fn_vec(r, t).clone()
        elif r.kind != "alias":
            out[r.key] = t.clone()
    for r in a.records:
        if r.kind == "alias":
            assert r.tied_to is not None
            out[r.key] = out[r.tied_to].clone()
    return {k: out[k] for k in state_dict}


def apply_permutation(
    model_or_analysis: Any, state_dict: dict[str, Tensor], perms: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Permute the neurons of `state_dict` (a new dict; the input is not modified).

    `perms[name]` is a permutation `p` of group `name`: new neuron `j` of each of the
    group's sets is old neuron `p[j]`.
    """
    a = _analysis(model_or_analysis)
    groups = permutation_groups(a)
    node_map = _node_map(a, groups, perms)
    n = a.num_nodes

    def edge(r: ParamRecord, c: Tensor) -> Tensor:
        assert r.dst is not None and r.src is not None
        c = c.index_select(0, _positions(r.dst, node_map, n, c.device))
        if r.groups == 1:
            c = c.index_select(1, _positions(r.src, node_map, n, c.device))
        return c

    def vec(r: ParamRecord, t: Tensor) -> Tensor:
        nodes = r.dst if r.kind == "diag" else r.nodes
        assert nodes is not None
        return t.reshape(-1)[_positions(nodes, node_map, n, t.device)].reshape(t.shape)

    return _transform(a, state_dict, edge, vec)


def permute_model(
    model: nn.Module,
    perms: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    example_input: Any = None,
) -> tuple[nn.Module, dict[str, Tensor]]:
    """A functionally identical copy of `model` with permuted hidden neurons.

    Returns `(permuted_copy, perms)`; `perms` defaults to
    [`random_permutation`][graphspace.graphs.symmetry.random_permutation].
    """
    a = analyze(model, example_input)
    if perms is None:
        perms = random_permutation(permutation_groups(a), generator)
    sd = apply_permutation(a, {k: v.detach() for k, v in model.state_dict().items()}, perms)
    new = copy.deepcopy(model)
    new.load_state_dict(sd)
    return new, perms


_CHAIN_OK = {"identity", "dropout", "avgpool", "sumpool", "flatten", "scale", "linear_const"}


def scaling_symmetries(model: Any, example_input: Any = None) -> dict[int, str]:
    """Neuron sets with a rescaling symmetry: `{set_id: "positive" | "sign"}`."""
    a = _analysis(model, example_input)
    out: dict[int, str] = {}
    outputs = set(a.output_sets)
    for s in a.sets:
        if s.kind not in ("linear", "conv") or s.id in outputs or s.id in a.no_rescale:
            continue
        uses = a.uses.get(s.id, [])
        if not uses or any(u.kind != "param" for u in uses):
            continue
        kinds = {"positive", "sign"}
        for u in uses:
            acts = [c for c in u.chain if c in ACTIVATIONS and c != "identity"]
            others = [c for c in u.chain if c not in ACTIVATIONS or c == "identity"]
            if len(acts) > 1:
                kinds.clear()
                break
            act = acts[0] if acts else "identity"
            pos_ok = act in POSITIVE_HOMOGENEOUS and all(
                c in _CHAIN_OK or c == "maxpool" for c in others)
            sign_ok = act in ODD and all(c in _CHAIN_OK or c == "negscale" for c in others)
            if not pos_ok:
                kinds.discard("positive")
            if not sign_ok:
                kinds.discard("sign")
        if "positive" in kinds:
            out[s.id] = "positive"
        elif "sign" in kinds:
            out[s.id] = "sign"
    return out


def apply_scaling(
    model_or_analysis: Any, state_dict: dict[str, Tensor], scales: dict[int, Tensor]
) -> dict[str, Tensor]:
    """Scale hidden neurons: `scales[set_id]` multiplies the incoming weights and bias of each
    neuron of that set and divides its outgoing weights (a new dict is returned)."""
    a = _analysis(model_or_analysis)
    allowed = scaling_symmetries(a)
    node_scale = torch.ones(a.num_nodes, dtype=torch.float64)
    for sid, s in scales.items():
        if sid not in allowed:
            raise ValueError(f"neuron set {sid} ({a.sets[sid].name}) has no rescaling symmetry")
        s = torch.as_tensor(s, dtype=torch.float64)
        if allowed[sid] == "sign" and not bool((s.abs() == 1).all()):
            raise ValueError(f"set {a.sets[sid].name}: odd activation allows only +-1 scales")
        if allowed[sid] == "positive" and not bool((s > 0).all()):
            raise ValueError(f"set {a.sets[sid].name}: scales must be positive")
        node_scale[a.sets[sid].nodes] = s

    def edge(r: ParamRecord, c: Tensor) -> Tensor:
        assert r.dst is not None
        o, il = c.shape[0], c.shape[1]
        s = math.prod(c.shape[2:])
        f = node_scale[r.dst].view(o, 1, 1) / node_scale[r.src_per_edge(o, il, s)]
        return (c.reshape(o, il, s).double() * f).to(c.dtype).reshape(c.shape)

    def vec(r: ParamRecord, t: Tensor) -> Tensor:
        if r.kind == "node" and r.column == 0:
            assert r.nodes is not None
            return (t.reshape(-1).double() * node_scale[r.nodes]).to(t.dtype).reshape(t.shape)
        return t

    return _transform(a, state_dict, edge, vec)


def random_scaling(
    model: Any, generator: torch.Generator | None = None, low: float = 0.5, high: float = 2.0
) -> dict[int, Tensor]:
    """Random scales for every rescalable set: log-uniform in `[low, high]` for positively
    homogeneous activations, random signs for odd ones."""
    a = _analysis(model)
    out: dict[int, Tensor] = {}
    for sid, kind in scaling_symmetries(a).items():
        n = a.sets[sid].size
        if kind == "positive":
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            out[sid] = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        else:
            out[sid] = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return out
