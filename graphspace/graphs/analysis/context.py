r"""The values that flow through the walk of an exported graph, and the analysis context.

Every traced tensor that carries neurons is an `Act`. Its `ids` tensor has the same
number of dimensions as the value; along a *neuron dimension* (`mat[d]` true) it holds the
graph node of every index, along any other dimension it has size 1 (the value does not vary in
neuron identity there). Layout operations (`view`, `permute`, `split`, `cat`, ...) are
applied to `ids` exactly as they are to the value, so attention heads split out of a feature
axis, channels-last norms and packed `q, k, v` projections are followed without any pattern
matching. `-1` marks entries that carry no neuron (e.g. zero padding).

Constraints collected on the way (`AnalysisContext`) are node-level: *ties* (two nodes
must be permuted identically), *fixed* nodes and *cells* (node subsets that a permutation must
map onto themselves, e.g. the three thirds of a packed `q, k, v` output). The permutation
groups are solved from them once the walk ends (`graphspace.graphs.analysis.solve`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from graphspace.graphs.analysis.records import NeuronSet, ParamRecord, StructEdges, Use
from graphspace.graphs.analysis.vocab import EDGE_TYPE, NODE_TYPE
from graphspace.graphs.errors import CoverageError, UnsupportedModuleError


@dataclass
class Act:
    """A traced value that carries neurons (see the module docstring).

    Attributes:
        ids: node ids, full size along neuron dimensions and 1 elsewhere; -1: no neuron.
        mat: which dimensions are neuron dimensions.
        shape: the value's full shape.
        depth: layer depth of the value (number of parameterised layers before it).
        chain: ops applied since the neurons were produced (for rescaling symmetries).
        param: for a parameter used as a value (not as a weight): its state-dict key; `ids`
            then holds flat indices into the parameter instead of nodes.
    """

    ids: Tensor
    mat: tuple[bool, ...]
    shape: tuple[int, ...]
    depth: int = 0
    chain: tuple[str, ...] = ()
    param: str | None = None

    def replace(self, **kw: Any) -> Act:
        return replace(self, **kw)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def full(self, dims: Sequence[int] | None = None) -> Tensor:
        """`ids` expanded to the full size along `dims` (default: every dimension)."""
        target = list(self.ids.shape)
        for d in range(self.ndim) if dims is None else dims:
            target[d] = self.shape[d]
        return self.ids.expand(target)

    def along(self, dim: int, path: str, what: str) -> Tensor:
        """The node of every index along `dim`; the value must not vary elsewhere."""
        dim = dim % self.ndim
        ids = self.ids.movedim(dim, -1)
        n = self.shape[dim]
        if ids.shape[-1] == 1 and n != 1:
            ids = ids.expand(*ids.shape[:-1], n)
        flat = ids.reshape(-1, n)
        if flat.shape[0] > 1 and not bool((flat == flat[:1]).all()):
            raise UnsupportedModuleError(
                path, what, "its input holds different neurons at different positions of a "
                "non-feature axis (e.g. a concatenation of different tensors along tokens)")
        return flat[0]

    def nodes(self) -> Tensor:
        """The distinct nodes in this value (`-1` excluded)."""
        u = torch.unique(self.ids)
        return u[u >= 0]


@dataclass
class Raw:
    """A model input (or a value computed from inputs only) that no layer has read yet."""

    holder: InputHolder
    shape: tuple[int, ...]
    chain: tuple[str, ...] = ()


@dataclass
class InputHolder:
    name: str
    index: int
    set_id: int | None = None


@dataclass
class Const:
    """A tensor that carries no neurons: a constant, a non-persistent buffer, or a value
    computed from neurons that is invariant to their permutation (`invariant`)."""

    shape: tuple[int, ...]
    invariant: bool = False
    what: str = "a constant"


@dataclass
class Opaque:
    """A tensor computed from neurons that no longer carries a neuron axis (e.g. a reduction
    over the features of several heads). Reading it in a parameterised layer fails."""

    what: str


@dataclass
class Scores:
    """Attention logits `q @ k^T` (scaled, masked, softmaxed), waiting for `@ v`."""

    q: Act
    k: Act
    shape: tuple[int, ...]
    head_dependent: bool = False


@dataclass
class TupleOut:
    items: list[Any] = field(default_factory=list)


RuleFn = Callable[["AnalysisContext", nn.Module, str, tuple, dict], Any]
_RULES: dict[type, RuleFn] = {}


def register_rule(module_type: type) -> Callable[[RuleFn], RuleFn]:
    """Register how a module type is represented (a decorator).

    The rule is called as `rule(ctx, module, path, args, kwargs)`: `args` are the analysed
    values that enter the module's region of the exported graph (an `Act` for every input
    that carries neurons), in order of first use. It returns the analysed output (a
    `TupleOut` for several outputs). Built-in layers need no rule: the analysis reads
    their ATen ops. See `docs/extending.md`.
    """

    def deco(fn: RuleFn) -> RuleFn:
        _RULES[module_type] = fn
        return fn

    return deco


def rule_for(mod: nn.Module) -> RuleFn | None:
    for t in type(mod).__mro__:
        if t in _RULES:
            return _RULES[t]
    return None


def has_rules() -> bool:
    return bool(_RULES)


class AnalysisContext:
    """Mutable state of one analysis; the API that layer rules use."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.sets: list[NeuronSet] = []
        self.records: list[ParamRecord] = []
        self.tied_records: list[ParamRecord] = []
        self.struct_edges: list[StructEdges] = []
        self.num_nodes = 0
        self._node_type: list[Tensor] = []
        self._node_layer: list[Tensor] = []
        self._node_set: list[Tensor] = []
        self._node_set_cache: Tensor | None = None
        self._set_starts: list[int] = []
        self.tie_pairs: list[tuple[Tensor, Tensor]] = []
        self.fixed: list[Tensor] = []
        self.cells: list[tuple[Tensor, str]] = []
        self.heads: list[dict[str, Any]] = []
        self.uses: dict[int, list[Use]] = {}
        self.set_activation: dict[int, str] = {}
        self.input_sets: list[int] = []
        self.output_sets: list[int] = []
        self.no_rescale: set[int] = set()
        self.head_of_node: dict[int, tuple[Tensor, Tensor]] = {}
        #: per used key, the node ids along each axis of the tensor (for tied weights)
        self.key_axes: dict[str, list[Tensor | None]] = {}

    # -- neuron sets ---------------------------------------------------------------------
    def new_set(self, size: int, kind: str, name: str, layer: int, permutable: bool = True
                ) -> int:
        """Create `size` new nodes forming one neuron set; returns the set id."""
        sid = len(self.sets)
        self._set_starts.append(self.num_nodes)
        nodes = torch.arange(self.num_nodes, self.num_nodes + size)
        self.num_nodes += size
        self.sets.append(NeuronSet(sid, nodes, kind, name, layer))
        self._node_type.append(torch.full((size,), NODE_TYPE[kind], dtype=torch.long))
        self._node_layer.append(torch.full((size,), layer, dtype=torch.long))
        self._node_set.append(torch.full((size,), sid, dtype=torch.long))
        if not permutable:
            self.fixed.append(nodes)
        return sid

    def node_set(self, nodes: Tensor) -> Tensor:
        """The neuron set of every node in `nodes` (sets are consecutive ranges of ids)."""
        if self._node_set_cache is None or self._node_set_cache.numel() != len(self.sets):
            self._node_set_cache = torch.tensor(self._set_starts, dtype=torch.long)
        return torch.searchsorted(self._node_set_cache, nodes, right=True) - 1

    def sets_of(self, nodes: Tensor) -> list[int]:
        """The neuron sets that `nodes` belong to (sorted)."""
        nodes = nodes[nodes >= 0]
        if nodes.numel() == 0:
            return []
        return torch.unique(self.node_set(nodes)).tolist()

    def set_nodes(self, segs: Sequence[int]) -> Tensor:
        return torch.cat([self.sets[s].nodes for s in segs]) if segs else torch.zeros(
            0, dtype=torch.long)

    def new_act(self, sid: int, shape: Sequence[int], dim: int, depth: int,
                chain: tuple[str, ...] = ()) -> Act:
        """An `Act` of `shape` whose neuron dimension `dim` holds set `sid`."""
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        dim = dim % nd
        view = [1] * nd
        view[dim] = shape[dim]
        mat = tuple(d == dim for d in range(nd))
        return Act(self.sets[sid].nodes.view(view), mat, shape, depth, chain)

    # -- constraints ---------------------------------------------------------------------
    def tie_nodes(self, a: Tensor, b: Tensor) -> None:
        """Nodes `a[i]` and `b[i]` must be permuted identically (`-1` ignored)."""
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if bool(keep.any()):
            self.tie_pairs.append((a[keep], b[keep]))
        lone = (a >= 0) ^ (b >= 0)
        if bool(lone.any()):
            self.fix_nodes(torch.where(a >= 0, a, b)[lone])

    def tie(self, a: int, b: int) -> None:
        """Declare that sets `a` and `b` (same size) must be permuted identically."""
        if self.sets[a].size != self.sets[b].size:
            raise ValueError("cannot tie neuron sets of different sizes")
        self.tie_nodes(self.sets[a].nodes, self.sets[b].nodes)

    def fix_nodes(self, nodes: Tensor) -> None:
        nodes = nodes.reshape(-1)
        nodes = nodes[nodes >= 0]
        if nodes.numel():
            self.fixed.append(nodes)

    def fix(self, sets: Sequence[int]) -> None:
        """Declare sets that may not be permuted (model inputs/outputs, unsupported structure)."""
        for s in sets:
            self.fixed.append(self.sets[s].nodes)

    def fix_act(self, x: Any) -> None:
        if isinstance(x, Act) and x.param is None:
            self.fix_nodes(x.ids)
        elif isinstance(x, Scores):
            self.fix_act(x.q)
            self.fix_act(x.k)

    def cell(self, nodes: Tensor, origin: str = "slice") -> None:
        """`nodes` must be mapped onto themselves by every permutation."""
        nodes = torch.unique(nodes.reshape(-1))
        nodes = nodes[nodes >= 0]
        if nodes.numel():
            self.cells.append((nodes, origin))

    def add_use(self, act: Any, use: Use) -> None:
        if not isinstance(act, Act) or act.param is not None:
            return
        for s in self.sets_of(act.ids.reshape(-1)):
            self.uses.setdefault(s, []).append(use)

    def activation(self, act: Act, name: str) -> Act:
        for s in self.sets_of(act.ids.reshape(-1)):
            self.set_activation.setdefault(s, name)
        return act.replace(chain=act.chain + (name,))

    # -- inputs --------------------------------------------------------------------------
    def input_set(self, h: InputHolder, size: int, path: str, kind: str = "layer") -> int:
        """The neuron set of model input `h` (`size` nodes, created on first read)."""
        if h.set_id is None:
            h.set_id = self.new_set(size, "input", h.name, 0, permutable=False)
            self.input_sets.append(h.set_id)
        elif self.sets[h.set_id].size != size:
            raise UnsupportedModuleError(
                path, kind, f"model input '{h.name}' is read with {size} features here but "
                f"with {self.sets[h.set_id].size} elsewhere")
        return h.set_id

    def resolve(self, x: Any, size: int, path: str, dim: int = -1, kind: str = "layer") -> Act:
        """Make sure `x` carries neurons along `dim` (creating input nodes for a model
        input); returns an `Act`."""
        if isinstance(x, Raw):
            h = x.holder
            self.input_set(h, size, path, kind)
            if not x.shape:
                raise UnsupportedModuleError(path, kind, "its input is a scalar")
            return self.new_act(h.set_id, x.shape, dim, 0, x.chain)
        if isinstance(x, Opaque):
            raise UnsupportedModuleError(path, kind, f"its input is {x.what}, which has no "
                                         "neuron axis")
        if isinstance(x, Scores):
            raise UnsupportedModuleError(path, kind, "its input is attention weights")
        if isinstance(x, Const):
            raise UnsupportedModuleError(path, kind, f"its input is {x.what} (no neurons)")
        if not isinstance(x, Act) or x.param is not None:
            raise UnsupportedModuleError(path, kind, "its input is not a traced neuron tensor")
        return x

    # -- records -------------------------------------------------------------------------
    def check_key(self, key: str, path: str) -> Tensor:
        if key not in self.state:
            raise CoverageError(f"no state-dict entry '{key}' (used at '{path}')")
        return self.state[key]

    def is_recorded(self, key: str) -> bool:
        return key in self.key_axes

    def add_edge_param(
        self, key: str, dst: Tensor, src: Tensor, edge_type: str, layer: int, module: str,
        view_shape: Sequence[int] | None = None, perm: Sequence[int] | None = None,
        groups: int = 1, dst_sets: Sequence[int] = (), src_sets: Sequence[int] = (),
        index: Tensor | None = None,
    ) -> ParamRecord:
        """Record a weight tensor whose entries become edges `src -> dst`.

        After `reshape(view_shape).permute(perm)` (or the flat gather `index`) the tensor
        has the canonical layout `(len(dst), len(src) // groups, *spatial)`. A key that is
        already recorded (a tied weight) becomes a *tied use*: its edges are repeated in the
        graph and the neurons along each tensor axis are tied to those of the first use.
        """
        t = self.check_key(key, module)
        shape = tuple(t.shape)
        if index is not None:
            canon = tuple(view_shape) if view_shape is not None else shape
            view_shape, perm = canon, tuple(range(len(canon)))
        else:
            view_shape = tuple(view_shape) if view_shape is not None else shape
            perm = tuple(perm) if perm is not None else tuple(range(len(view_shape)))
            canon = tuple(view_shape[p] for p in perm)
        if canon[0] != dst.numel() or canon[1] * groups != src.numel():
            raise UnsupportedModuleError(
                module, "a parameter", f"'{key}' of shape {shape} does not match its neurons")
        rec = ParamRecord(
            key=key, shape=shape, dtype=t.dtype, kind="edge", module=module, layer=layer,
            edge_type=EDGE_TYPE[edge_type], dst=dst, src=src, view_shape=view_shape,
            perm=perm, groups=groups, spatial=tuple(canon[2:]), dst_sets=list(dst_sets),
            src_sets=list(src_sets), index=index,
        )
        if key in self.key_axes:
            first = next(r for r in self.records if r.key == key)
            if first.kind != "edge":
                raise UnsupportedModuleError(module, "a shared parameter", f"'{key}' is used "
                                             f"as a weight here and as a {first.kind} before")
            if not self.key_axes[key]:
                self.key_axes[key] = self._axes_of(first)
            self._tie_uses(key, self._axes_of(rec), module)
            rec.tied_to = key
            self.tied_records.append(rec)
            self.no_rescale.update(rec.dst_sets)
            self.no_rescale.update(rec.src_sets)
            self.no_rescale.update(first.dst_sets)
            self.no_rescale.update(first.src_sets)
            return rec
        self.key_axes[key] = []  # node axes: computed if the weight is used again (a tie)
        self.records.append(rec)
        return rec

    def _axes_of(self, rec: ParamRecord) -> list[Tensor | None]:
        """Node of every index along each axis of an edge record's state-dict tensor (None: the
        axis does not index neurons, e.g. a kernel offset)."""
        assert rec.dst is not None and rec.src is not None
        nd = len(rec.shape)
        if rec.index is None and rec.view_shape == rec.shape and rec.groups == 1:
            # canonical axis j is stored axis perm[j]: rows are dst, columns src
            assert rec.perm is not None
            out: list[Tensor | None] = [None] * nd
            out[rec.perm[0]] = rec.dst
            out[rec.perm[1]] = rec.src
            return out
        c = rec.canonical_shape
        o, il = c[0], c[1]
        s = 1
        for v in c[2:]:
            s *= v
        dst = rec.dst.view(o, 1, 1).expand(o, il, s).reshape(c)
        src = rec.src_per_edge(o, il, s).reshape(c)
        flat_dst, flat_src = rec.from_canonical(dst), rec.from_canonical(src)
        return [self._axis_nodes(flat_dst, flat_src, ax) for ax in range(nd)]

    @staticmethod
    def _axis_nodes(dst: Tensor, src: Tensor, ax: int) -> Tensor | None:
        for t in (dst, src):
            m = t.movedim(ax, 0).reshape(t.shape[ax], -1)
            if bool((m == m[:, :1]).all()):
                return m[:, 0]
        return None

    def _tie_uses(self, key: str, axes: list[Tensor | None], module: str) -> None:
        first = self.key_axes[key]
        for a, b in zip(first, axes):
            if a is None and b is None:
                continue
            if a is None or b is None:
                self.fix_nodes(a if a is not None else b)  # type: ignore[arg-type]
                continue
            self.tie_nodes(a, b)

    def add_diag_param(self, key: str, dst: Tensor, src: Tensor, layer: int, module: str,
                       dst_sets: Sequence[int] = (), src_sets: Sequence[int] = ()
                       ) -> ParamRecord:
        t = self.check_key(key, module)
        if key in self.key_axes:
            raise UnsupportedModuleError(module, "a shared scale",
                                         f"'{key}' is used more than once as a scale")
        rec = ParamRecord(key=key, shape=tuple(t.shape), dtype=t.dtype, kind="diag",
                          module=module, layer=layer, edge_type=EDGE_TYPE["norm"], dst=dst,
                          src=src, dst_sets=list(dst_sets), src_sets=list(src_sets))
        self.key_axes[key] = [None]
        self.records.append(rec)
        return rec

    def add_node_param(self, key: str, nodes: Tensor, column: int, module: str, layer: int,
                       sets: Sequence[int] = ()) -> ParamRecord:
        t = self.check_key(key, module)
        if t.numel() != nodes.numel():
            raise UnsupportedModuleError(module, "a parameter", f"'{key}' does not match")
        if key in self.key_axes:
            first = self.key_axes[key]
            if len(first) != 1 or first[0] is None:
                raise UnsupportedModuleError(module, "a shared bias",
                                             f"'{key}' is used both as a bias and otherwise")
            # a tied bias (a module called twice): its neurons move with the first use's
            self.tie_nodes(first[0], nodes.reshape(-1))
            self.no_rescale.update(sets)
            self.no_rescale.update(self.sets_of(first[0]))
            rec = next(r for r in self.records if r.key == key)
            rec.repeat_nodes.append(nodes.reshape(-1))
            return rec
        rec = ParamRecord(key=key, shape=tuple(t.shape), dtype=t.dtype, kind="node",
                          module=module, layer=layer, nodes=nodes, column=column,
                          dst_sets=list(sets))
        self.key_axes[key] = [nodes.reshape(-1)]
        self.records.append(rec)
        return rec

    def add_extra(self, key: str, module: str) -> None:
        t = self.check_key(key, module)
        if key in self.key_axes:
            return
        self.key_axes[key] = []
        self.records.append(ParamRecord(key=key, shape=tuple(t.shape), dtype=t.dtype,
                                        kind="extra", module=module))

    def add_struct_edges(self, src: Tensor, dst: Tensor, weight: float, edge_type: str,
                         layer: int) -> None:
        keep = (src >= 0) & (dst >= 0)
        self.struct_edges.append(StructEdges(src[keep], dst[keep], weight,
                                             EDGE_TYPE[edge_type], layer))
