"""What the analysis records: neuron sets, parameter records, structural edges, the result.

A [`ParamRecord`][graphspace.graphs.analysis.records.ParamRecord] is the one owner of a state-dict
entry's layout in a parameter graph:
[`ParamRecord.to_canonical`][graphspace.graphs.analysis.records.ParamRecord.to_canonical] and
[`ParamRecord.from_canonical`][graphspace.graphs.analysis.records.ParamRecord.from_canonical] move a
tensor between its state-dict shape and the canonical layout `(out, in_per_group, *spatial)` whose
entries are the graph's edges, and
[`ParamRecord.src_per_edge`][graphspace.graphs.analysis.records.ParamRecord.src_per_edge] names the
source neuron of every canonical entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class NeuronSet:
    """A set of neurons (graph nodes) produced together, e.g. the outputs of one `Linear`."""

    id: int
    nodes: Tensor
    kind: str
    name: str
    layer: int
    permutable: bool = True
    #: attention: number of heads when the set is head-structured (0 otherwise)
    num_heads: int = 0
    #: id shared by the Q/K and V sets of one attention module (their heads move together)
    head_group: int | None = None

    @property
    def size(self) -> int:
        return int(self.nodes.numel())


@dataclass
class ParamRecord:
    """How one state-dict entry is represented in the graph.

    `kind` is one of

    * `"edge"`: a weight whose entries are edges. The tensor is brought to its canonical
      layout `(out, in_per_group, *spatial)` by `reshape(view_shape)` then
      `permute(perm)` (or, when `index` is set, by gathering `t.reshape(-1)[index]`);
      edges enumerate that layout in row-major order.
    * `"diag"`: a per-channel scale (norm weight); one edge from `src[c]` to `dst[c]`.
    * `"node"`: a per-neuron vector stored in column `column` of the node features.
    * `"extra"`: kept verbatim (e.g. `num_batches_tracked`).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    module: str = ""
    layer: int = 0
    edge_type: int = 0
    dst: Tensor | None = None
    src: Tensor | None = None
    view_shape: tuple[int, ...] | None = None
    perm: tuple[int, ...] | None = None
    groups: int = 1
    spatial: tuple[int, ...] = ()
    nodes: Tensor | None = None
    #: for a bias used more than once (a module called twice): the nodes of its further uses,
    #: which carry the same values
    repeat_nodes: list[Tensor] = field(default_factory=list)
    column: int = 0
    dst_sets: list[int] = field(default_factory=list)
    src_sets: list[int] = field(default_factory=list)
    #: flat gather index into the state-dict tensor giving the canonical layout (optional)
    index: Tensor | None = None
    #: for a second use of a tied parameter: the key of the parameter it repeats
    tied_to: str | None = None

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        if self.kind in ("diag", "node", "extra"):
            return self.shape
        assert self.view_shape is not None and self.perm is not None
        return tuple(self.view_shape[p] for p in self.perm)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_transposed(self) -> bool:
        """Whether a graph keeps this weight's edges in the state dict's own memory order.

        True for a transposed 2-D weight (Hugging Face's `Conv1D`, stored `(in, out)`; an
        embedding table, `(tokens, features)`). Its edges are the same as in the canonical
        order, only listed row by row of the stored tensor, so converting either way is a
        plain copy instead of a transpose. `read` and `write` still speak the canonical layout.
        """
        return (self.kind == "edge" and self.index is None and self.tied_to is None
                and self.groups == 1
                and not self.spatial and self.perm is not None and self.view_shape is not None
                and len(self.perm) == 2 and tuple(self.perm) == (1, 0))

    def _stored_view(self, flat: Tensor) -> Tensor:
        """The canonical view of this record's edge values, listed in stored order."""
        if self.stored_transposed:
            assert self.view_shape is not None and self.perm is not None
            return flat.view(self.view_shape).permute(self.perm)
        return flat.reshape(self.canonical_shape)

    # -- layout --------------------------------------------------------------------------------
    def to_canonical(self, t: Tensor) -> Tensor:
        """`t` (state-dict shape) in the canonical layout `(out, in_per_group, *spatial)`."""
        if self.kind != "edge":
            return t
        if self.index is not None:
            return t.reshape(-1)[self.index.to(t.device)].view(self.canonical_shape)
        assert self.view_shape is not None and self.perm is not None
        return t.reshape(self.view_shape).permute(self.perm)

    def from_canonical(self, c: Tensor, out: Tensor | None = None) -> Tensor:
        """Inverse of [`to_canonical`][graphspace.graphs.analysis.records.ParamRecord.to_canonical]:
        a contiguous tensor of the state-dict shape (written into `out` when given)."""
        if out is None:
            out = torch.empty(self.shape, dtype=c.dtype, device=c.device)
        if self.kind != "edge":
            out.copy_(c.reshape(self.shape))
        elif self.index is not None:
            out.view(-1)[self.index.to(c.device)] = c.reshape(-1).to(out.dtype)
        else:
            assert self.view_shape is not None and self.perm is not None
            out.view(self.view_shape).permute(self.perm).copy_(c)
        return out

    def src_per_edge(self, o: int, i_local: int, s: int) -> Tensor:
        """Source node of every canonical entry, as an `(o, i_local, s)` tensor."""
        assert self.src is not None
        if self.groups == 1:
            return self.src.view(1, i_local, 1).expand(o, i_local, s)
        g = self.groups
        return self.src.view(g, 1, i_local, 1).expand(g, o // g, i_local, s).reshape(o, i_local, s)

    # -- values on a graph -----------------------------------------------------------------
    def read(self, graph: Any) -> Tensor:
        """This entry's values on `graph` (a [`ParameterGraph`][graphspace.graphs.ParameterGraph]):
        the canonical layout for `"edge"` records, a vector (one value per neuron) for `"diag"`
        and `"node"` records, the stored tensor for `"extra"`. A view where possible."""
        spec = graph.spec
        if self.kind == "edge":
            a, b = spec.ranges[self.key]
            if spec.kernel == "edge":
                return self._stored_view(graph.edge_attr[a:b, 0])
            vals = graph.edge_attr[a:b][:, spec.pad_index[self.key]]
            if self.stored_transposed:  # no spatial axes: one column
                return self._stored_view(vals.reshape(-1))
            return vals.reshape(self.canonical_shape)
        if self.kind == "diag":
            a, b = spec.ranges[self.key]
            return graph.edge_attr[a:b, spec.scalar_column]
        if self.kind == "node":
            assert self.nodes is not None
            return graph.x[self.nodes, self.column]
        return spec.extras[self.key]

    def write(self, graph: Any, values: Tensor) -> None:
        """Write `values` (as returned by
        [`read`][graphspace.graphs.analysis.records.ParamRecord.read]) into `graph` in place."""
        spec = graph.spec
        if self.kind == "edge":
            a, b = spec.ranges[self.key]
            c = self.canonical_shape
            if self.stored_transposed:
                col = 0 if spec.kernel == "edge" else int(spec.pad_index[self.key][0])
                self._stored_view(graph.edge_attr[a:b, col]).copy_(values.reshape(c))
            elif spec.kernel == "edge":
                graph.edge_attr[a:b, 0] = values.reshape(-1).to(graph.edge_attr.dtype)
            else:
                graph.edge_attr[a:b, spec.pad_index[self.key]] = values.reshape(
                    c[0] * c[1], -1).to(graph.edge_attr.dtype)
            for ta, tb in spec.tied_ranges.get(self.key, []):  # repeated edges of a tied weight
                graph.edge_attr[ta:tb] = graph.edge_attr[a:b][spec.tied_index[(self.key, ta)]]
        elif self.kind == "diag":
            a, b = spec.ranges[self.key]
            graph.edge_attr[a:b, spec.scalar_column] = values.reshape(-1).to(
                graph.edge_attr.dtype)
        elif self.kind == "node":
            assert self.nodes is not None
            for nodes in [self.nodes, *self.repeat_nodes]:
                graph.x[nodes, self.column] = values.reshape(-1).to(graph.x.dtype)
        else:
            spec.extras[self.key] = values.clone()


@dataclass
class StructEdges:
    """Edges that carry no parameter (residual adds, products, attention q-k links)."""

    src: Tensor
    dst: Tensor
    weight: float
    edge_type: int
    layer: int


@dataclass
class Use:
    """How a neuron set is consumed: by a parameterised layer (`param`) or anything else."""

    kind: str  # "param" or "other"
    chain: tuple[str, ...] = ()
    key: str = ""


@dataclass
class PermutationGroup:
    """A proved permutation symmetry of `size` elements.

    `members[j]` are the node ids (in the model's parameter graph) of one aligned block:
    position `k` of every block moves together. `num_heads > 0` marks attention: a valid
    permutation maps heads to heads (blocks of `size // num_heads`), and groups with the same
    `head_group` use the same head permutation. `sets` are the neuron sets of the blocks.
    """

    name: str
    size: int
    sets: list[int]
    members: list[Tensor]
    num_heads: int = 0
    head_group: int | None = None


@dataclass
class ModelAnalysis:
    """Result of [`analyze`][graphspace.graphs.analyze]: neurons, parameter records, symmetries."""

    num_nodes: int
    sets: list[NeuronSet]
    records: list[ParamRecord]
    struct_edges: list[StructEdges]
    node_type: Tensor
    node_layer: Tensor
    node_set: Tensor
    node_role: Tensor
    node_pos: Tensor
    node_act: Tensor
    node_head: Tensor
    input_sets: list[int]
    output_sets: list[int]
    uses: dict[int, list[Use]]
    set_activation: dict[int, str]
    state_keys: list[str]
    groups: list[PermutationGroup] = field(default_factory=list)
    #: second (third, ...) uses of tied parameters: edges repeated in the graph
    tied_records: list[ParamRecord] = field(default_factory=list)
    #: sets whose incoming or outgoing weights are tied elsewhere (no rescaling)
    no_rescale: set[int] = field(default_factory=set)
    #: the exported program's node that carries each set: ``set -> (node, gather index)``
    producers: dict[int, tuple[str, Tensor, Tensor]] = field(default_factory=dict)
    #: the example input the analysis traced with (shape-specialised)
    example_input: tuple | None = None
    #: the ``torch.export.ExportedProgram`` that was walked (for activation taps)
    program: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # the exported program is a cache for activation taps: not pickled with graphs
        state = dict(self.__dict__)
        state["program"] = None
        return state

    def record(self, key: str) -> ParamRecord:
        for r in self.records:
            if r.key == key:
                return r
        raise KeyError(key)

    @property
    def ties(self) -> dict[str, list[str]]:
        """Tied parameters: `key -> [keys or uses that repeat it]`."""
        out: dict[str, list[str]] = {}
        for r in self.tied_records:
            assert r.tied_to is not None
            out.setdefault(r.tied_to, []).append(r.module)
        return out
