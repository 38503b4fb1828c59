"""Parameter-graph files: tensors in safetensors, the structure re-derived from the model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphspace.graphs.analysis import analyze
from graphspace.graphs.parameter_graph import GraphSpec, ParameterGraph
from graphspace.io import atomic_write

_TENSORS = ("x", "edge_index", "edge_attr", "edge_type", "edge_layer", "edge_pos", "node_type",
            "node_layer", "node_role", "node_pos", "node_act", "node_head")


def save_graph(graph: ParameterGraph, path: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> Path:
    """Write `graph`'s tensors to a safetensors file atomically.

    Only tensors are stored (nothing is pickled); [`load_graph`][graphspace.graphs.io.load_graph]
    rebuilds the mapping back to weights from the architecture.
    """
    from safetensors.torch import save_file

    tensors = {k: getattr(graph, k).contiguous() for k in _TENSORS
               if getattr(graph, k, None) is not None}
    extras = {f"extra.{k}": v.contiguous() for k, v in graph.spec.extras.items()}
    meta = dict(metadata or {})
    meta["graphspace.kernel"] = graph.spec.kernel
    meta["graphspace.kernel_pad"] = json.dumps(graph.spec.kernel_pad)
    return atomic_write(path, lambda p: save_file({**tensors, **extras}, p, metadata=meta))


def load_graph(path: str | os.PathLike, model: nn.Module, example_input: Any = None
               ) -> ParameterGraph:
    """Read a graph written by [`save_graph`][graphspace.graphs.io.save_graph] for an
    architecture like `model`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    a = analyze(model, example_input)
    kernel = meta.get("graphspace.kernel", "edge")
    template = ParameterGraph.from_module(
        model, example_input, kernel=kernel,
        kernel_pad=json.loads(meta.get("graphspace.kernel_pad", "null")), check_finite=False)
    # the structure must be this architecture's, not just the same number of edges
    for k in ("edge_index", "edge_type", "edge_layer", "node_type", "node_layer", "node_role"):
        if k not in tensors:
            raise ValueError(f"'{path}' is not a parameter-graph file: no tensor '{k}'")
        if not torch.equal(tensors[k], getattr(template, k)):
            raise ValueError(f"'{path}' does not hold a graph of {type(model).__name__}: its "
                             f"'{k}' differs from the architecture's")
    for k in ("x", "edge_attr"):
        if k not in tensors or tensors[k].shape != getattr(template, k).shape:
            raise ValueError(f"'{path}' does not hold a graph of {type(model).__name__}: "
                             f"'{k}' is missing or has another shape")
    spec: GraphSpec = template.spec
    spec.analysis = a
    spec.extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    g = ParameterGraph(**{k: v for k, v in tensors.items() if not k.startswith("extra.")},
                       num_nodes=template.num_nodes)
    g.spec = spec
    return g
