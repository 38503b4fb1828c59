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


def architecture_fingerprint(graph: ParameterGraph) -> str:
    """A short hash of what makes a graph belong to one architecture: the record layout of its
    analysis (state-dict keys and shapes, in order), the kernel and the edge/node structure
    (`edge_index`, edge and node types, layers, roles). Weights do not enter it.

    Args:
        graph: a parameter graph.

    Returns:
        16 hexadecimal digits.
    """
    import hashlib

    h = hashlib.sha256()
    layout = [(r.key, list(r.shape)) for r in graph.spec.records]
    h.update(json.dumps([layout, graph.spec.kernel, graph.spec.kernel_pad]).encode())
    for k in ("edge_index", "edge_type", "edge_layer", "node_type", "node_layer", "node_role"):
        t = getattr(graph, k, None)
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _summary(graph: ParameterGraph) -> str:
    recs = graph.spec.records
    shapes = ", ".join(f"{r.key} {tuple(r.shape)}" for r in recs[:3])
    return f"{len(recs)} tensors: {shapes}{', ...' if len(recs) > 3 else ''}"


def save_graph(graph: ParameterGraph, path: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> Path:
    """Write `graph`'s tensors to a safetensors file atomically.

    Only tensors are stored (nothing is pickled); [`load_graph`][graphspace.graphs.io.load_graph]
    rebuilds the mapping back to weights from the architecture. The file's metadata holds the
    architecture fingerprint
    ([`architecture_fingerprint`][graphspace.graphs.io.architecture_fingerprint]).
    """
    from safetensors.torch import save_file

    tensors = {k: getattr(graph, k).contiguous() for k in _TENSORS
               if getattr(graph, k, None) is not None}
    extras = {f"extra.{k}": v.contiguous() for k, v in graph.spec.extras.items()}
    meta = dict(metadata or {})
    meta["graphspace.kernel"] = graph.spec.kernel
    meta["graphspace.kernel_pad"] = json.dumps(graph.spec.kernel_pad)
    meta["graphspace.arch"] = architecture_fingerprint(graph)
    meta["graphspace.arch_summary"] = _summary(graph)
    return atomic_write(path, lambda p: save_file({**tensors, **extras}, p, metadata=meta))


def load_graph(path: str | os.PathLike, model: nn.Module, example_input: Any = None
               ) -> ParameterGraph:
    """Read a graph written by [`save_graph`][graphspace.graphs.io.save_graph] for an
    architecture like `model`.

    The file's architecture fingerprint (`architecture_fingerprint`, stored by `save_graph`)
    must be `model`'s; files without one (older files) are checked tensor by tensor.

    Raises:
        ValueError: the file is unreadable or holds the graph of another architecture (both
            fingerprints are named).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        lines = str(e).strip().splitlines()
        raise ValueError(f"'{path}' is not a readable parameter-graph file "
                         f"({lines[0] if lines else type(e).__name__})") from None
    a = analyze(model, example_input)
    kernel = meta.get("graphspace.kernel", "edge")
    template = ParameterGraph.from_module(
        model, example_input, kernel=kernel,
        kernel_pad=json.loads(meta.get("graphspace.kernel_pad", "null")), check_finite=False)
    have = meta.get("graphspace.arch")
    if have is not None:
        want = architecture_fingerprint(template)
        if have != want:
            where = meta.get("graphspace.model") or meta.get("graphspace.arch_summary", "")
            raise ValueError(
                f"'{path}' does not hold a graph of {type(model).__name__}: its architecture "
                f"fingerprint is {have}" + (f" ({where})" if where else "")
                + f", {type(model).__name__}'s is {want} ({_summary(template)})")
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
