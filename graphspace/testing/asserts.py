"""Reusable assertions for weight-space code: round trips, symmetry (in)variance, isomorphism."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from graphspace.graphs import (
    ParameterGraph,
    analyze,
    apply_permutation,
    permutation_groups,
    random_permutation,
)


def assert_round_trip(model: nn.Module, **graph_kwargs: Any) -> ParameterGraph:
    """`model -> ParameterGraph -> state_dict` is bit-exact (values, dtypes, keys, order)."""
    g = ParameterGraph.from_module(model, **graph_kwargs)
    sd = g.to_state_dict()
    ref = model.state_dict()
    assert list(sd) == list(ref), "state-dict keys differ"
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype, f"{k}: dtype {sd[k].dtype} != {v.dtype}"
        assert sd[k].shape == v.shape, f"{k}: shape differs"
        assert torch.equal(sd[k], v), f"{k}: values differ after the round trip"
    return g


def _outputs(model: nn.Module, inputs: Any) -> Tensor:
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def assert_permutation_invariant(
    model: nn.Module,
    inputs: Any,
    atol: float = 1e-10,
    generator: torch.Generator | None = None,
    negative_control: bool = True,
) -> None:
    """A random permutation of the hidden neurons keeps the function (`atol`, relative to the
    output's scale when that exceeds 1), and, as a negative control, permuting the *input*
    neurons of the first layer changes it."""
    a = analyze(model, inputs)
    groups = permutation_groups(a)
    perms = random_permutation(groups, generator)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(a, sd, perms))
    ref = _outputs(model, inputs)
    out = _outputs(permuted, inputs)
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= atol * max(1.0, scale), \
        f"hidden-neuron permutation changed the output by {err} (output scale {scale:.3g})"
    if groups and all(torch.equal(sd[k], v) for k, v in permuted.state_dict().items()):
        raise AssertionError("the permutation did not change any weight (vacuous test)")
    if negative_control:
        wrong = swap_io_neurons(model, inputs)
        err = (_outputs(wrong, inputs) - ref).abs().max().item()
        # relative to the output's scale too (freshly initialised nets can output ~1e-10)
        assert err > min(1e3 * atol, 1e-3 * scale), \
            "permuting input neurons did not change the output"


def swap_io_neurons(model: nn.Module, example_input: Any = None) -> nn.Module:
    """A copy of `model` with two *input* neurons of its first layer swapped (or, when that
    layer has a single input, two *output* neurons of its last layer): an uncoupled permutation
    that is not a symmetry, used as a negative control."""

    a = analyze(model, example_input)
    wrong = copy.deepcopy(model)
    sd = {k: v.detach().clone() for k, v in wrong.state_dict().items()}
    edges = [r for r in a.records if r.kind == "edge"]
    first = edges[0]
    if first.canonical_shape[1] >= 2:
        c = first.to_canonical(sd[first.key])
        c[:, [0, 1]] = c[:, [1, 0]]
        sd[first.key] = first.from_canonical(c)
    else:
        last = edges[-1]
        c = last.to_canonical(sd[last.key])
        c[[0, 1]] = c[[1, 0]]
        sd[last.key] = last.from_canonical(c)
    wrong.load_state_dict(sd)
    return wrong


def to_networkx(graph: ParameterGraph, decimals: int = 8) -> nx.DiGraph:
    """A networkx view with string labels (node: type/role/position/features; edge: the sorted
    labels type/weight/offset of all parameter edges between the two neurons).

    Not PyG's `torch_geometric.utils.to_networkx`: a parameter graph has parallel edges (one
    per kernel entry between two channels), and the Weisfeiler-Lehman hash in `wl_hash` needs
    them folded into one labelled edge, which a `DiGraph` from PyG would overwrite and a
    `MultiDiGraph` would keep apart."""
    g = nx.DiGraph()
    x = graph.x.tolist()
    types, roles, poss = (graph.node_type.tolist(), graph.node_role.tolist(),
                          graph.node_pos.tolist())
    for i in range(graph.num_nodes):
        pos = poss[i] if roles[i] != 0 else -1
        g.add_node(i, label=f"{types[i]}|{roles[i]}|{pos}|{[round(v, decimals) for v in x[i]]}")
    src, dst = graph.edge_index.tolist()
    et = graph.edge_type.tolist()
    ea = graph.edge_attr.tolist()
    ep = graph.edge_pos.tolist() if getattr(graph, "edge_pos", None) is not None else None
    labels: dict[tuple[int, int], list[str]] = {}
    for e in range(len(src)):
        lab = f"{et[e]}|{[round(v, decimals) for v in ea[e]]}"
        if ep is not None:
            lab += f"|{ep[e]}"
        labels.setdefault((src[e], dst[e]), []).append(lab)
    for (u, v), labs in labels.items():
        g.add_edge(u, v, label=";".join(sorted(labs)))
    return g


def wl_hash(graph: ParameterGraph, iterations: int = 4) -> str:
    """Weisfeiler-Lehman hash of a parameter graph with node and edge labels."""
    return nx.weisfeiler_lehman_graph_hash(
        to_networkx(graph), node_attr="label", edge_attr="label", iterations=iterations
    )


def assert_equivariant(
    fn: Callable[[Tensor], Tensor], x: Tensor, perm: Tensor, dim: int = 0, atol: float = 1e-6
) -> None:
    """`fn(x[perm]) == fn(x)[perm]` along `dim`."""
    a = fn(x.index_select(dim, perm))
    b = fn(x).index_select(dim, perm)
    err = (a - b).abs().max().item()
    assert err <= atol, f"not equivariant: max error {err}"
