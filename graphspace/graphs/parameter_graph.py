r"""`ParameterGraph`: a neural network as a PyG graph whose edges are its parameters.

Nodes are neurons (model inputs, every output of a `Linear`/`Conv`, normalised copies of
channels, residual sums, attention `Q`/`K`/`V` neurons); edges are parameters. The graph
converts back to the exact same state dict (bit for bit), so a graph can be edited and loaded
into a model again.

Node features (`x`, float, `[num_nodes, 3]`): bias (or norm shift `beta`), BatchNorm
running mean, BatchNorm running variance (zero where absent). Integer node attributes:
`node_type` (`NODE_TYPES`), `node_layer` (depth),
`node_role` (0 hidden, 1 input, 2 output), `node_pos` (input/output position, -1 hidden),
`node_act` (activation applied to the neuron, `ACTIVATIONS`),
`node_head` (attention head, -1 otherwise).

Edge features: `edge_attr` holds weights. With `kernel="edge"` (Graph Metanetworks,
Lim et al. 2024) every kernel entry is its own edge, `edge_attr` is `[E, 1]` and
`edge_pos` `[E, 3]` gives the entry's spatial offset (for a `Linear` after a flatten:
the flattened spatial position). `edge_pos` is stored as `int16` (`int32` for offsets
beyond 32767) to keep an 11M-edge graph small: call `.long()` before an embedding lookup.
With `kernel="channel"` (Neural Graphs, Kofinas et al. 2024) there is one edge per channel
pair and `edge_attr` is `[E, prod(kernel_pad)]`: the kernel zero-padded (centred) to
`kernel_pad`. `edge_type` (`EDGE_TYPES`) and
`edge_layer` are integer edge attributes. Non-parameter edges (residual sums, products,
attention `q -> k` links) come after all parameter edges.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from graphspace.graphs.analysis import ModelAnalysis, ParamRecord, analyze
from graphspace.graphs.errors import ArchitectureMismatchError, NonFiniteWeightError
from graphspace.runtime import empty_huge

KERNEL_MODES = ("edge", "channel")


@dataclass
class GraphSpec:
    """What a graph needs to go back to a state dict (kept per graph, survives batching)."""

    records: list[ParamRecord]
    ranges: dict[str, tuple[int, int]]
    extras: dict[str, Tensor]
    kernel: str
    kernel_pad: tuple[int, ...] | None
    pad_index: dict[str, Tensor] = field(default_factory=dict)
    num_param_edges: int = 0
    analysis: ModelAnalysis | None = None
    #: edges repeating a tied parameter: ``key -> [(start, end)]`` (after the parameter edges)
    tied_ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: for each tied range ``(key, start)``: the position in ``key``'s edges of every repeat
    tied_index: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    #: dtypes of entries whose state dict differed from the analysed model's (e.g. float64)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def scalar_column(self) -> int:
        """Column of `edge_attr` holding per-edge scalars (norm scales, struct weights)."""
        if self.kernel == "edge":
            return 0
        return int(_pad_positions((), self.kernel_pad)[0])  # type: ignore[arg-type]

    def __repr__(self) -> str:  # keep Data/Batch reprs short
        return f"GraphSpec({len(self.records)} entries, kernel={self.kernel!r})"


def _spatial_pad(records: Sequence[ParamRecord]) -> tuple[int, ...]:
    nd = max([len(r.spatial) for r in records if r.kind == "edge"] + [1])
    pad = [1] * nd
    for r in records:
        if r.kind != "edge":
            continue
        sp = (1,) * (nd - len(r.spatial)) + tuple(r.spatial)
        pad = [max(a, b) for a, b in zip(pad, sp)]
    return tuple(pad)


def _pad_positions(spatial: Sequence[int], pad: Sequence[int]) -> Tensor:
    """Flat indices, in a `pad` grid, of a centred kernel of shape `spatial`."""
    nd = len(pad)
    sp = (1,) * (nd - len(spatial)) + tuple(spatial)
    if any(s > p for s, p in zip(sp, pad)):
        raise ValueError(f"kernel of shape {tuple(spatial)} does not fit kernel_pad={tuple(pad)}")
    grids = torch.meshgrid(
        *[torch.arange(s) + (p - s) // 2 for s, p in zip(sp, pad)], indexing="ij"
    )
    strides = [math.prod(pad[i + 1:]) for i in range(nd)]
    flat = sum(g.reshape(-1) * st for g, st in zip(grids, strides))
    return flat if isinstance(flat, Tensor) else torch.zeros(1, dtype=torch.long)





def _repeat_index(first: ParamRecord, r: ParamRecord) -> Tensor:
    """For each canonical entry of `r` (a repeated use of a tied tensor), its position among
    the edges of the tensor's first use `first` (cached on `r`: it depends on the
    architecture only)."""
    idx = getattr(r, "_repeat_index", None)
    if idx is None:
        # lay the first use's edge positions out in the stored shape, read them as ``r`` does
        if first.stored_transposed:  # its edges are listed in stored order already
            pos = torch.arange(first.numel).view(first.shape)
        else:
            pos = first.from_canonical(torch.arange(first.numel).view(first.canonical_shape))
        idx = r.to_canonical(pos).reshape(-1)
        object.__setattr__(r, "_repeat_index", idx)
    return idx


def non_finite_keys(state_dict: dict[str, Tensor]) -> list[str]:
    """Keys of `state_dict` whose floating-point tensors hold NaN or Inf."""
    return [k for k, v in state_dict.items() if not _all_finite(v)]


def _all_finite(t: Tensor) -> bool:
    """No NaN or Inf in `t`. A finite sum proves it in one pass without a temporary (NaN and
    Inf propagate through a sum); only a non-finite sum, which may be overflow, is checked
    element by element."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _float_dtype(state: dict[str, Tensor], records: Sequence[ParamRecord]) -> torch.dtype:
    dt = None
    for r in records:
        if r.kind in ("extra", "alias"):
            continue
        t = state[r.key]
        if t.is_floating_point():
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    if dt is None or dt in (torch.float16, torch.bfloat16):
        return torch.float32
    return dt


class ParameterGraph(Data):
    """A PyG graph of a network's parameters that converts back to the exact weights.

    Build one with [`from_module`][graphspace.graphs.parameter_graph.ParameterGraph.from_module] (or
    [`from_state_dict`][graphspace.graphs.parameter_graph.ParameterGraph.from_state_dict] to reuse
    one analysis for many checkpoints of an architecture), go back with
    [`to_state_dict`][graphspace.graphs.parameter_graph.ParameterGraph.to_state_dict] or
    [`load_into`][graphspace.graphs.parameter_graph.ParameterGraph.load_into]. Works with
    `torch_geometric.data.Batch`, including batches of different architectures
    (`batch.to_data_list()` gives back graphs that convert back).
    """

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        example_input: Any = None,
        *,
        kernel: str = "edge",
        kernel_pad: Sequence[int] | None = None,
        leaf_modules: Sequence[type] = (),
        check_finite: bool = True,
        dtype: torch.dtype | None = None,
    ) -> ParameterGraph:
        """Convert `model` (not modified) into a parameter graph.

        Args:
            model: a module that `torch.export` can trace.
            example_input: an example input (a tensor or tuple); optional when the first layer
                is `Linear`, `Conv*`, `Embedding` or recurrent (an input is inferred).
            kernel: `"edge"` (one edge per kernel entry, Graph Metanetworks) or
                `"channel"` (one edge per channel pair with the padded kernel, Neural
                Graphs).
            kernel_pad: with `kernel="channel"`, the spatial shape kernels are padded to
                (default: the largest kernel of this model; fix it to batch models).
            leaf_modules: ignored (kept for backward compatibility; see
                [`register_rule`][graphspace.graphs.register_rule]).
            check_finite: raise `NonFiniteWeightError` on NaN/Inf weights.
            dtype: float dtype of the graph (default: the widest parameter dtype, at least
                float32, so the round trip is exact).
        """
        analysis = analyze(model, example_input, leaf_modules)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return cls.from_state_dict(state, analysis, kernel=kernel, kernel_pad=kernel_pad,
                                   check_finite=check_finite, dtype=dtype)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Tensor],
        analysis: ModelAnalysis,
        *,
        kernel: str = "edge",
        kernel_pad: Sequence[int] | None = None,
        check_finite: bool = True,
        dtype: torch.dtype | None = None,
    ) -> ParameterGraph:
        """Build the graph of `state_dict` for an architecture analysed once with
        [`graphspace.graphs.analyze`][graphspace.graphs.analyze]."""
        if kernel not in KERNEL_MODES:
            raise ValueError(f"kernel must be one of {KERNEL_MODES}, got {kernel!r}")
        check_state_dict(state_dict, analysis)
        records = analysis.records
        if check_finite:
            bad = [r.key for r in records if not _all_finite(state_dict[r.key])]
            if bad:
                raise NonFiniteWeightError(f"non-finite (NaN or Inf) values in {bad}")
        dt = dtype or _float_dtype(state_dict, records)
        pad = None
        if kernel == "channel":
            pad = tuple(kernel_pad) if kernel_pad is not None else _spatial_pad(records)
        # edge counts
        sizes: list[int] = []
        for r in records:
            if r.kind == "edge":
                c = r.canonical_shape
                sizes.append(c[0] * c[1] * (math.prod(c[2:]) if kernel == "edge" else 1))
            elif r.kind == "diag":
                sizes.append(r.numel)
            else:
                sizes.append(0)
        n_param = sum(sizes)
        tied = list(analysis.tied_records)
        if tied and kernel == "channel" and any(r.spatial for r in tied):
            raise ValueError("kernel='channel' does not support tied convolution kernels")
        n_tied = sum(math.prod(r.canonical_shape) for r in tied)
        n_struct = sum(int(s.src.numel()) for s in analysis.struct_edges)
        e = n_param + n_tied + n_struct
        width = 1 if kernel == "edge" else math.prod(pad or (1,))
        # fresh multi-GB arrays: huge pages make first touch ~4x cheaper (Linux)
        edge_index = empty_huge((2, e), dtype=torch.long)
        # every entry is written in edge mode; channel mode pads kernels with zeros
        edge_attr = empty_huge((e, width), dtype=dt) if kernel == "edge" else torch.zeros(
            e, width, dtype=dt)
        edge_type = empty_huge((e,), dtype=torch.long)
        edge_layer = empty_huge((e,), dtype=torch.long)
        edge_pos = None
        if kernel == "edge":
            max_sp = max([max(r.spatial, default=0) for r in records if r.kind == "edge"] + [0])
            pos_dtype = torch.int16 if max_sp <= torch.iinfo(torch.int16).max else torch.int32
            edge_pos = empty_huge((e, 3), dtype=pos_dtype).zero_()
        x = torch.zeros(analysis.num_nodes, 3, dtype=dt)
        ranges: dict[str, tuple[int, int]] = {}
        extras: dict[str, Tensor] = {}
        pad_index: dict[str, Tensor] = {}
        a = 0
        for r, n in zip(records, sizes):
            t = state_dict[r.key]
            if r.kind == "edge":
                c = r.to_canonical(t)
                o, il = c.shape[0], c.shape[1]
                sp = tuple(c.shape[2:])
                s = math.prod(sp)
                if r.stored_transposed:  # edges in the stored tensor's order: no transpose
                    b = a + n
                    assert r.dst is not None and r.src is not None and r.view_shape is not None
                    col = 0 if kernel == "edge" else int(_pad_positions((), pad)[0])  # type: ignore
                    if kernel == "channel":
                        pad_index[r.key] = _pad_positions((), pad)  # type: ignore[arg-type]
                    vs = r.view_shape  # (in, out): entry (i, j) is the edge src[i] -> dst[j]
                    edge_index[1, a:b].view(vs).copy_(r.dst.view(1, o).expand(vs))
                    edge_index[0, a:b].view(vs).copy_(r.src.view(il, 1).expand(vs))
                    edge_attr[a:b, col].view(vs).copy_(t.reshape(vs))
                elif kernel == "edge":
                    b = a + n
                    assert r.dst is not None
                    edge_index[1, a:b].view(o, il, s).copy_(r.dst.view(o, 1, 1).expand(o, il, s))
                    edge_index[0, a:b].view(o, il, s).copy_(r.src_per_edge(o, il, s))
                    edge_attr[a:b, 0].view(c.shape).copy_(c)
                    assert edge_pos is not None
                    if len(sp) > 3:
                        raise ValueError(f"'{r.key}': more than 3 spatial dimensions")
                    if sp:
                        grid = torch.stack(torch.meshgrid(*[torch.arange(k) for k in sp],
                                                          indexing="ij"), -1).view(s, len(sp))
                        edge_pos[a:b, : len(sp)].view(o, il, s, len(sp)).copy_(
                            grid.view(1, 1, s, len(sp)).expand(o, il, s, len(sp)))
                else:
                    b = a + n
                    assert r.dst is not None
                    edge_index[1, a:b].view(o, il).copy_(r.dst.view(o, 1).expand(o, il))
                    edge_index[0, a:b].view(o, il).copy_(r.src_per_edge(o, il, 1)[..., 0])
                    idx = _pad_positions(sp, pad)  # type: ignore[arg-type]
                    pad_index[r.key] = idx
                    edge_attr[a:b][:, idx] = c.reshape(o * il, s).to(dt)
            elif r.kind == "diag":
                b = a + n
                assert r.dst is not None and r.src is not None
                edge_index[1, a:b] = r.dst
                edge_index[0, a:b] = r.src
                col = 0 if kernel == "edge" else int(_pad_positions((), pad)[0])  # type: ignore
                edge_attr[a:b, col] = t.reshape(-1).to(dt)
            elif r.kind == "node":
                b = a
                assert r.nodes is not None
                for nodes in [r.nodes, *r.repeat_nodes]:  # a bias used twice: on both uses
                    x[nodes, r.column] = t.reshape(-1).to(dt)
            elif r.kind == "alias":
                b = a
            else:
                b = a
                extras[r.key] = t.clone()
            if r.kind in ("edge", "diag"):
                edge_type[a:b] = r.edge_type
                edge_layer[a:b] = r.layer
                ranges[r.key] = (a, b)
            a = b
        tied_ranges: dict[str, list[tuple[int, int]]] = {}
        tied_index: dict[tuple[str, int], Tensor] = {}
        by_key = {r.key: r for r in records}
        for r in tied:
            assert r.tied_to is not None and r.dst is not None
            first = by_key[r.tied_to]
            c = r.canonical_shape
            o, il, sp = c[0], c[1], math.prod(c[2:])
            b = a + o * il * sp
            edge_index[1, a:b].view(o, il, sp).copy_(r.dst.view(o, 1, 1).expand(o, il, sp))
            edge_index[0, a:b].view(o, il, sp).copy_(r.src_per_edge(o, il, sp))
            # where each entry sits among the first use's edges: lay those positions out in
            # the stored shape, then read them in this use's canonical order
            idx = _repeat_index(first, r)
            fa, _ = ranges[first.key]
            col = 0 if kernel == "edge" else int(_pad_positions((), pad)[0])  # type: ignore
            edge_attr[a:b, col] = edge_attr[fa:fa + first.numel, col][idx]
            edge_type[a:b] = r.edge_type
            edge_layer[a:b] = r.layer
            tied_ranges.setdefault(first.key, []).append((a, b))
            tied_index[(first.key, a)] = idx
            a = b
        for se in analysis.struct_edges:
            b = a + int(se.src.numel())
            edge_index[0, a:b] = se.src
            edge_index[1, a:b] = se.dst
            col = 0 if kernel == "edge" else int(_pad_positions((), pad)[0])  # type: ignore
            edge_attr[a:b, col] = se.weight
            edge_type[a:b] = se.edge_type
            edge_layer[a:b] = se.layer
            a = b
        spec = GraphSpec(records=records, ranges=ranges, extras=extras, kernel=kernel,
                         kernel_pad=pad, pad_index=pad_index, num_param_edges=n_param,
                         analysis=analysis, tied_ranges=tied_ranges, tied_index=tied_index,
                         dtypes={r.key: state_dict[r.key].dtype for r in records
                                 if state_dict[r.key].dtype != r.dtype})
        g = cls(
            x=x,
            edge_index=edge_index,
            edge_attr=edge_attr,
            edge_type=edge_type,
            edge_layer=edge_layer,
            node_type=analysis.node_type.clone(),
            node_layer=analysis.node_layer.clone(),
            node_role=analysis.node_role.clone(),
            node_pos=analysis.node_pos.clone(),
            node_act=analysis.node_act.clone(),
            node_head=analysis.node_head.clone(),
            num_nodes=analysis.num_nodes,
        )
        if edge_pos is not None:
            g.edge_pos = edge_pos
        g.spec = spec
        return g

    # -- back to weights ----------------------------------------------------------------------
    def to_state_dict(self) -> dict[str, Tensor]:
        """The state dict this graph represents (exact: the original dtypes and values)."""
        spec: GraphSpec = self.spec
        if isinstance(spec, list):
            raise ValueError("this is a batch: call batch.to_data_list() and convert each graph")
        out: dict[str, Tensor] = {}
        for r in spec.records:
            if r.kind == "alias":
                continue
            if r.kind == "extra":
                out[r.key] = spec.extras[r.key].clone()
                continue
            # a fresh tensor (never a view of the graph), huge-page backed when large
            t = empty_huge(tuple(r.shape), dtype=spec.dtypes.get(r.key, r.dtype))
            out[r.key] = r.from_canonical(r.read(self), out=t)
        for r in spec.records:
            if r.kind == "alias":
                assert r.tied_to is not None
                src = out[r.tied_to]
                out[r.key] = empty_huge(tuple(src.shape), dtype=src.dtype).copy_(src)
        keys = spec.analysis.state_keys if spec.analysis is not None else list(out)
        return {k: out[k] for k in keys}

    def load_into(self, model: nn.Module, strict: bool = True) -> nn.Module:
        """Load this graph's weights into `model` (in place) and return it.

        Raises `ArchitectureMismatchError` naming the first differing tensor.
        """
        sd = self.to_state_dict()
        target = model.state_dict()
        for k, v in target.items():
            if k not in sd:
                if strict:
                    raise ArchitectureMismatchError(f"the graph has no tensor '{k}'")
                continue
            if tuple(v.shape) != tuple(sd[k].shape):
                raise ArchitectureMismatchError(
                    f"tensor '{k}' has shape {tuple(sd[k].shape)} in the graph but "
                    f"{tuple(v.shape)} in the model"
                )
        extra = [k for k in sd if k not in target]
        if extra and strict:
            raise ArchitectureMismatchError(f"the model has no tensor '{extra[0]}'")
        model.load_state_dict(sd, strict=strict)
        return model

    def to_module(self, model: nn.Module) -> nn.Module:
        """A deep copy of `model` holding this graph's weights (`model` is untouched)."""
        return self.load_into(copy.deepcopy(model))

    @property
    def num_param_edges(self) -> int:
        """Number of edges that carry a parameter entry (the rest are structural)."""
        return int(self.spec.num_param_edges)

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        return super().__inc__(key, value, *args, **kwargs)


def check_state_dict(state_dict: dict[str, Tensor], analysis: ModelAnalysis) -> None:
    """Raise `ArchitectureMismatchError` naming the first tensor that differs."""
    for r in analysis.records:
        if r.key not in state_dict:
            raise ArchitectureMismatchError(f"missing tensor '{r.key}'")
        if tuple(state_dict[r.key].shape) != r.shape:
            raise ArchitectureMismatchError(
                f"tensor '{r.key}' has shape {tuple(state_dict[r.key].shape)}, expected {r.shape}"
            )
    known = {r.key for r in analysis.records}
    for k in state_dict:
        if k not in known:
            raise ArchitectureMismatchError(f"unexpected tensor '{k}'")
