r"""One analysis of a PyTorch model, shared by parameter graphs, merging and augmentation.

:func:`analyze` traces a model with :mod:`torch.fx` and walks the traced graph once. Every
activation that carries a *neuron axis* (the feature axis of a ``Linear`` output, the channel
axis of a convolution output, ...) is described by the list of neuron sets it is made of. Every
entry of the model's state dict is recorded with the neuron sets its axes index
(:class:`ParamRecord`), and neuron sets that must be permuted together are tied with a
union-find structure. From this one pass we read off

* the nodes and edges of the parameter graph (:mod:`graphspace.graphs.parameter_graph`),
* the permutation symmetry groups of the model (:mod:`graphspace.graphs.symmetry`), used by model
  merging and weight-space augmentation,
* the per-neuron rescaling / sign-flip symmetries of positively homogeneous and odd activations.

Rules for module types live in :mod:`graphspace.graphs.rules`; new module types are supported
with :func:`graphspace.graphs.register_rule`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from graphspace.graphs.errors import (
    CoverageError,
    TraceError,
    UnsupportedModuleError,
    UnsupportedOperationError,
)

# ----------------------------------------------------------------------------------------------
# Vocabularies (stable integer ids stored in graphs)
# ----------------------------------------------------------------------------------------------

NODE_TYPES: tuple[str, ...] = (
    "input",
    "linear",
    "conv",
    "norm",
    "embedding",
    "residual",
    "product",
    "attn_q",
    "attn_k",
    "attn_v",
    "custom",
)
EDGE_TYPES: tuple[str, ...] = (
    "linear",
    "conv",
    "norm",
    "embedding",
    "attn_in",
    "residual",
    "product",
    "attn_qk",
    "custom",
)
ACTIVATIONS: tuple[str, ...] = (
    "identity",
    "relu",
    "leaky_relu",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "sin",
    "cos",
    "elu",
    "selu",
    "celu",
    "softplus",
    "relu6",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "mish",
    "softsign",
    "logsigmoid",
    "softmax",
    "other",
)
NODE_TYPE = {n: i for i, n in enumerate(NODE_TYPES)}
EDGE_TYPE = {n: i for i, n in enumerate(EDGE_TYPES)}
ACTIVATION = {n: i for i, n in enumerate(ACTIVATIONS)}

#: activations with :math:`\sigma(s x) = s \sigma(x)` for :math:`s > 0`
POSITIVE_HOMOGENEOUS = frozenset({"relu", "leaky_relu", "identity"})
#: activations with :math:`\sigma(-x) = -\sigma(x)`
ODD = frozenset({"tanh", "sin", "softsign", "identity"})


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass
class NeuronSet:
    """A set of neurons (graph nodes) produced together, e.g. the outputs of one ``Linear``."""

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

    ``kind`` is one of

    * ``"edge"``: a weight whose entries are edges. The tensor is brought to its canonical
      layout ``(out, in_per_group, *spatial)`` by ``reshape(view_shape)`` then
      ``permute(perm)``; edges enumerate that layout in row-major order.
    * ``"diag"``: a per-channel scale (norm weight); one edge from ``src[c]`` to ``dst[c]``.
    * ``"node"``: a per-neuron vector stored in column ``column`` of the node features.
    * ``"extra"``: kept verbatim (e.g. ``num_batches_tracked``).
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
    column: int = 0
    dst_sets: list[int] = field(default_factory=list)
    src_sets: list[int] = field(default_factory=list)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        if self.kind == "diag":
            return self.shape
        assert self.view_shape is not None and self.perm is not None
        return tuple(self.view_shape[p] for p in self.perm)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
    """How a neuron set is consumed: by a parameterised layer (``param``) or anything else."""

    kind: str  # "param" or "other"
    chain: tuple[str, ...] = ()
    key: str = ""


@dataclass
class ModelAnalysis:
    """Result of :func:`analyze`: neurons, parameter records, ties and uses."""

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
    parent: list[int]
    producers: dict[int, list[tuple[str, int]]]
    uses: dict[int, list[Use]]
    set_activation: dict[int, str]
    state_keys: list[str]

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def record(self, key: str) -> ParamRecord:
        for r in self.records:
            if r.key == key:
                return r
        raise KeyError(key)


# ----------------------------------------------------------------------------------------------
# Values flowing through the traced graph
# ----------------------------------------------------------------------------------------------


class _InputHolder:
    """A model input whose neuron count is learnt from its first parameterised consumer."""

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.set_id: int | None = None
        self.ndim: int | None = None


@dataclass
class Act:
    """A traced value that carries a neuron axis.

    ``segs`` lists the neuron sets concatenated along the neuron axis; ``cdim`` is the neuron
    axis (1 = channels first as in ``NCHW``, -1 = features last); ``flat`` is ``None`` for an
    unflattened value or ``"major"``/``"minor"`` once spatial positions were flattened into the
    feature axis (channel-major ``c * S + s`` from ``NCHW``, channel-minor ``s * C + c`` from
    ``(B, L, C)``).
    """

    segs: list[int] | None
    cdim: int
    depth: int
    ndim: int | None = None
    flat: str | None = None
    chain: tuple[str, ...] = ()
    holder: _InputHolder | None = None

    def replace(self, **kw: Any) -> Act:
        d = dict(
            segs=self.segs,
            cdim=self.cdim,
            depth=self.depth,
            ndim=self.ndim,
            flat=self.flat,
            chain=self.chain,
            holder=self.holder,
        )
        d.update(kw)
        return Act(**d)


class _Opaque:
    """A tensor computed from neurons that no longer carries a neuron axis (e.g. attention
    weights, a reduction over the neuron axis). Consuming it in a parameterised layer fails."""

    def __init__(self, what: str) -> None:
        self.what = what


class _TupleOut:
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)


# ----------------------------------------------------------------------------------------------
# The tracer
# ----------------------------------------------------------------------------------------------

RuleFn = Callable[["AnalysisContext", nn.Module, str, tuple, dict], Any]
_RULES: dict[type, RuleFn] = {}


def register_rule(module_type: type) -> Callable[[RuleFn], RuleFn]:
    """Register how a module type is represented (a decorator).

    The rule is called as ``rule(ctx, module, path, args, kwargs)`` where ``args``/``kwargs``
    hold analysed values (:class:`Act` for neuron-carrying inputs) and must return the analysed
    output. See ``docs/extending.md`` and :mod:`graphspace.graphs.rules` for examples.
    Modules with a rule are leaves of the trace.
    """

    def deco(fn: RuleFn) -> RuleFn:
        _RULES[module_type] = fn
        return fn

    return deco


def _rule_for(mod: nn.Module) -> RuleFn | None:
    for t in type(mod).__mro__:
        if t in _RULES:
            return _RULES[t]
    return None


class GraphspaceTracer(fx.Tracer):
    """fx tracer whose leaves are exactly the modules that have a rule (plus user leaves)."""

    def __init__(self, leaf_modules: Sequence[type] = ()) -> None:
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        if _rule_for(m) is not None:
            return True
        # Parameter-free torch.nn modules (pooling, flatten, activations) stay leaves.
        if type(m).__module__.startswith("torch.nn") and not isinstance(
            m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        ):
            return True
        return False


def _trace_graph(model: nn.Module, leaf_modules: Sequence[type] = ()) -> fx.Graph:
    tracer = GraphspaceTracer(leaf_modules)
    try:
        return tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - re-raised with guidance
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. "
            "Data-dependent Python control flow cannot be traced: move it into a submodule, "
            "pass that submodule's type in `leaf_modules=[...]` and register a rule for it with "
            "graphspace.graphs.register_rule (see docs/extending.md)."
        ) from e


def trace(model: nn.Module, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Trace ``model`` with :class:`GraphspaceTracer`, turning fx failures into
    :class:`~graphspace.graphs.errors.TraceError`."""
    return fx.GraphModule(model, _trace_graph(model, leaf_modules), type(model).__name__)


# ----------------------------------------------------------------------------------------------
# Analysis context: what rules use
# ----------------------------------------------------------------------------------------------


_UNARY_ACT_FUNCS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.elu: "elu",
    F.selu: "selu",
    torch.selu: "selu",
    F.celu: "celu",
    F.softplus: "softplus",
    F.hardtanh: "hardtanh",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.softsign: "softsign",
    F.logsigmoid: "logsigmoid",
    F.tanh: "tanh",
    torch.tanh: "tanh",
    F.sigmoid: "sigmoid",
    torch.sigmoid: "sigmoid",
    torch.sin: "sin",
    torch.cos: "cos",
}
_UNARY_ACT_METHODS: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "sin": "sin",
    "sin_": "sin",
    "cos": "cos",
    "cos_": "cos",
}
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.Softplus: "softplus",
    nn.Hardtanh: "hardtanh",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Softsign: "softsign",
    nn.LogSigmoid: "logsigmoid",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "softmax",
    nn.PReLU: "other",
}
# identity-like ops: (chain tag, keeps the neuron axis unchanged)
_IDENTITY_FUNCS: dict[Any, str] = {
    F.dropout: "dropout",
    F.dropout1d: "dropout",
    F.dropout2d: "dropout",
    F.dropout3d: "dropout",
    F.alpha_dropout: "dropout",
    torch.clone: "identity",
}
_IDENTITY_METHODS = {"contiguous": "identity", "clone": "identity", "float": "identity",
                     "double": "identity", "half": "identity", "to": "identity",
                     "type_as": "identity", "detach": "identity"}
_IDENTITY_MODULES: dict[type, str] = {
    nn.Identity: "identity",
    nn.Dropout: "dropout",
    nn.Dropout1d: "dropout",
    nn.Dropout2d: "dropout",
    nn.Dropout3d: "dropout",
    nn.AlphaDropout: "dropout",
}
_POOL_MODULES: dict[type, str] = {
    nn.MaxPool1d: "maxpool",
    nn.MaxPool2d: "maxpool",
    nn.MaxPool3d: "maxpool",
    nn.AvgPool1d: "avgpool",
    nn.AvgPool2d: "avgpool",
    nn.AvgPool3d: "avgpool",
    nn.AdaptiveAvgPool1d: "avgpool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.AdaptiveAvgPool3d: "avgpool",
    nn.AdaptiveMaxPool1d: "maxpool",
    nn.AdaptiveMaxPool2d: "maxpool",
    nn.AdaptiveMaxPool3d: "maxpool",
}
_POOL_FUNCS: dict[Any, str] = {
    F.max_pool1d: "maxpool",
    F.max_pool2d: "maxpool",
    F.max_pool3d: "maxpool",
    F.avg_pool1d: "avgpool",
    F.avg_pool2d: "avgpool",
    F.avg_pool3d: "avgpool",
    F.adaptive_avg_pool1d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool",
    F.adaptive_avg_pool3d: "avgpool",
    F.adaptive_max_pool1d: "maxpool",
    F.adaptive_max_pool2d: "maxpool",
    F.adaptive_max_pool3d: "maxpool",
}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_DIV_FUNCS = {operator.truediv, operator.itruediv, torch.div}
_BIN_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul",
                "mul_": "mul", "div": "div", "div_": "div", "__add__": "add", "__radd__": "add",
                "__mul__": "mul", "__rmul__": "mul"}


class AnalysisContext:
    """Mutable state of one analysis; the API that layer rules use."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.sets: list[NeuronSet] = []
        self.records: list[ParamRecord] = []
        self.struct_edges: list[StructEdges] = []
        self.num_nodes = 0
        self._node_type: list[Tensor] = []
        self._node_layer: list[Tensor] = []
        self._node_set: list[Tensor] = []
        self.parent: list[int] = []
        self.fixed: set[int] = set()
        self.producers: dict[int, list[tuple[str, int]]] = {}
        self.uses: dict[int, list[Use]] = {}
        self.set_activation: dict[int, str] = {}
        self.node_act = {}  # set id -> activation name applied to it
        self.head_of_node: dict[int, Tensor] = {}
        self.called_modules: set[str] = set()
        self.input_sets: list[int] = []
        self.output_sets: list[int] = []
        self._head_groups = 0

    # -- neuron sets ------------------------------------------------------------------------
    def new_set(
        self, size: int, kind: str, name: str, layer: int, permutable: bool = True
    ) -> int:
        """Create ``size`` new nodes forming one neuron set; returns the set id."""
        sid = len(self.sets)
        nodes = torch.arange(self.num_nodes, self.num_nodes + size)
        self.num_nodes += size
        self.sets.append(NeuronSet(sid, nodes, kind, name, layer, permutable))
        self._node_type.append(torch.full((size,), NODE_TYPE[kind], dtype=torch.long))
        self._node_layer.append(torch.full((size,), layer, dtype=torch.long))
        self._node_set.append(torch.full((size,), sid, dtype=torch.long))
        self.parent.append(sid)
        if not permutable:
            self.fixed.add(sid)
        return sid

    def set_nodes(self, segs: Sequence[int]) -> Tensor:
        if len(segs) == 1:
            return self.sets[segs[0]].nodes
        return torch.cat([self.sets[s].nodes for s in segs])

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def tie(self, a: int, b: int) -> None:
        """Declare that sets ``a`` and ``b`` (same size) must be permuted identically."""
        if self.sets[a].size != self.sets[b].size:
            raise ValueError("cannot tie neuron sets of different sizes")
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def fix(self, sets: Sequence[int]) -> None:
        """Declare sets that may not be permuted (model inputs/outputs, unsupported structure)."""
        self.fixed.update(sets)

    def tie_acts(self, a: Act, b: Act) -> None:
        """Tie two neuron-carrying values position by position (fixing them if unalignable)."""
        sa = [self.sets[s].size for s in a.segs or []]
        sb = [self.sets[s].size for s in b.segs or []]
        if a.segs is not None and b.segs is not None and sa == sb:
            for x, y in zip(a.segs, b.segs):
                self.tie(x, y)
        else:
            self.fix(list(a.segs or []) + list(b.segs or []))

    def add_use(self, act: Act, use: Use) -> None:
        for s in act.segs or []:
            self.uses.setdefault(s, []).append(use)

    # -- inputs -----------------------------------------------------------------------------
    def resolve(self, act: Any, size: int, path: str, cdim: int | None = None) -> Act:
        """Make sure ``act`` carries neurons (creating input nodes for a model input)."""
        if isinstance(act, _Opaque):
            raise UnsupportedOperationError(
                path, "input", f"its input is {act.what}, which has no neuron axis"
            )
        if not isinstance(act, Act):
            raise UnsupportedOperationError(path, "input", "its input is not a traced tensor")
        if act.segs is None:
            h = act.holder
            assert h is not None
            if h.set_id is None:
                h.set_id = self.new_set(size, "input", h.name, 0, permutable=False)
                self.input_sets.append(h.set_id)
            act = act.replace(segs=[h.set_id])
        n = sum(self.sets[s].size for s in act.segs)
        if act.flat is None and n != size:
            raise UnsupportedOperationError(
                path, "input", f"expects {size} input neurons but receives {n}"
            )
        return act

    # -- records ----------------------------------------------------------------------------
    def _check_key(self, key: str) -> Tensor:
        if key not in self.state:
            raise CoverageError(f"no state-dict entry '{key}'")
        if any(r.key == key for r in self.records):
            raise UnsupportedModuleError(
                key.rsplit(".", 1)[0],
                "a shared module",
                f"parameter '{key}' is used more than once in forward (weight sharing cannot be "
                "represented by a parameter graph whose edges are the parameters)",
            )
        return self.state[key]

    def add_edge_param(
        self,
        key: str,
        dst: Tensor,
        src: Tensor,
        edge_type: str,
        layer: int,
        module: str,
        view_shape: Sequence[int] | None = None,
        perm: Sequence[int] | None = None,
        groups: int = 1,
        dst_sets: Sequence[int] = (),
        src_sets: Sequence[int] = (),
    ) -> ParamRecord:
        """Record a weight tensor whose entries become edges ``src -> dst``.

        After ``reshape(view_shape).permute(perm)`` the tensor has the canonical layout
        ``(len(dst), len(src) // groups, *spatial)``.
        """
        t = self._check_key(key)
        shape = tuple(t.shape)
        view_shape = tuple(view_shape) if view_shape is not None else shape
        perm = tuple(perm) if perm is not None else tuple(range(len(view_shape)))
        canon = tuple(view_shape[p] for p in perm)
        if canon[0] != dst.numel() or canon[1] * groups != src.numel():
            raise UnsupportedModuleError(
                module, "a parameter", f"'{key}' of shape {shape} does not match its neurons"
            )
        rec = ParamRecord(
            key=key,
            shape=shape,
            dtype=t.dtype,
            kind="edge",
            module=module,
            layer=layer,
            edge_type=EDGE_TYPE[edge_type],
            dst=dst,
            src=src,
            view_shape=view_shape,
            perm=perm,
            groups=groups,
            spatial=tuple(canon[2:]),
            dst_sets=list(dst_sets),
            src_sets=list(src_sets),
        )
        self.records.append(rec)
        return rec

    def add_diag_param(
        self, key: str, dst: Tensor, src: Tensor, layer: int, module: str,
        dst_sets: Sequence[int] = (), src_sets: Sequence[int] = (),
    ) -> ParamRecord:
        t = self._check_key(key)
        rec = ParamRecord(key=key, shape=tuple(t.shape), dtype=t.dtype, kind="diag",
                          module=module, layer=layer, edge_type=EDGE_TYPE["norm"], dst=dst,
                          src=src, dst_sets=list(dst_sets), src_sets=list(src_sets))
        self.records.append(rec)
        return rec

    def add_node_param(
        self, key: str, nodes: Tensor, column: int, module: str, layer: int,
        sets: Sequence[int] = (),
    ) -> ParamRecord:
        t = self._check_key(key)
        if t.numel() != nodes.numel():
            raise UnsupportedModuleError(module, "a parameter", f"'{key}' does not match")
        rec = ParamRecord(key=key, shape=tuple(t.shape), dtype=t.dtype, kind="node",
                          module=module, layer=layer, nodes=nodes, column=column,
                          dst_sets=list(sets))
        self.records.append(rec)
        return rec

    def add_extra(self, key: str, module: str) -> None:
        t = self._check_key(key)
        self.records.append(ParamRecord(key=key, shape=tuple(t.shape), dtype=t.dtype,
                                        kind="extra", module=module))

    def add_struct_edges(
        self, src: Tensor, dst: Tensor, weight: float, edge_type: str, layer: int
    ) -> None:
        self.struct_edges.append(StructEdges(src, dst, weight, EDGE_TYPE[edge_type], layer))

    def new_head_group(self) -> int:
        self._head_groups += 1
        return self._head_groups - 1

    def producer(self, sid: int, key: str, axis: int) -> None:
        self.producers.setdefault(sid, []).append((key, axis))


# ----------------------------------------------------------------------------------------------
# Walking the traced graph
# ----------------------------------------------------------------------------------------------


def _map(x: Any, fn: Callable[[fx.Node], Any]) -> Any:
    return fx.node.map_arg(x, fn)


def _acts_in(x: Any) -> list[Any]:
    out: list[Any] = []

    def visit(v: Any) -> None:
        if isinstance(v, (Act, _Opaque, _TupleOut)):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for u in v:
                visit(u)
        elif isinstance(v, dict):
            for u in v.values():
                visit(u)

    visit(x)
    return out


def _norm_dim(d: int, ndim: int | None) -> int:
    if ndim is not None and d < 0:
        return d + ndim
    return d


def _same_dim(d: int, cdim: int, ndim: int | None) -> bool:
    if d == cdim:
        return True
    if ndim is None:
        return False
    return _norm_dim(d, ndim) == _norm_dim(cdim, ndim)


def _activation(ctx: AnalysisContext, act: Act, name: str) -> Act:
    for s in act.segs or []:
        ctx.set_activation.setdefault(s, name)  # the activation applied right after the neuron
    return act.replace(chain=act.chain + (name,))


class _Walker:
    def __init__(self, ctx: AnalysisContext, model: nn.Module, graph: fx.Graph,
                 example_inputs: tuple | None) -> None:
        self.ctx = ctx
        self.graph = graph
        self.modules = dict(model.named_modules())
        self.env: dict[fx.Node, Any] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        if example_inputs is not None:
            from torch.fx.passes.shape_prop import ShapeProp

            # a GraphModule (code generation) only when the graph has to run
            gm = fx.GraphModule(model, graph, type(model).__name__)
            self.graph = gm.graph

            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(*example_inputs)
            except Exception as e:  # noqa: BLE001
                raise TraceError(f"running the model on example_input failed: {e}") from e
            for n in gm.graph.nodes:
                tm = n.meta.get("tensor_meta")
                if tm is not None and hasattr(tm, "shape"):
                    self.shapes[n] = tuple(tm.shape)

    def run(self) -> None:
        n_inputs = 0
        for node in self.graph.nodes:
            if node.op == "placeholder":
                h = _InputHolder(node.target, n_inputs)
                n_inputs += 1
                shp = self.shapes.get(node)
                self.env[node] = Act(None, cdim=-1, depth=0, holder=h,
                                     ndim=len(shp) if shp else None)
            elif node.op == "get_attr":
                self.env[node] = ("attr", node.target)
            elif node.op == "output":
                self._output(node)
            else:
                args = _map(node.args, lambda n: self.env[n])
                kwargs = _map(node.kwargs, lambda n: self.env[n])
                out = self._call(node, args, kwargs)
                if isinstance(out, Act) and node in self.shapes:
                    out = out.replace(ndim=len(self.shapes[node]))
                self.env[node] = out

    # -- outputs ----------------------------------------------------------------------------
    def _output(self, node: fx.Node) -> None:
        vals = _acts_in(_map(node.args, lambda n: self.env[n]))
        pos = 0
        for v in vals:
            if isinstance(v, _TupleOut):
                vals.extend(_acts_in(v.items))
                continue
            if isinstance(v, Act) and v.segs is not None:
                self.ctx.fix(v.segs)
                self.ctx.add_use(v, Use("other", v.chain, "output"))
                for s in v.segs:
                    if s not in self.ctx.output_sets:
                        self.ctx.output_sets.append(s)
                pos += 1

    # -- calls ------------------------------------------------------------------------------
    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        ctx = self.ctx
        if node.op == "call_module":
            path = str(node.target)
            mod = self.modules[path]
            rule = _rule_for(mod)
            if rule is not None:
                if path in ctx.called_modules and any(
                    True for _ in mod.parameters(recurse=True)
                ):
                    raise UnsupportedModuleError(
                        path, type(mod).__name__,
                        "the module is called more than once in forward (shared weights)",
                    )
                ctx.called_modules.add(path)
                return rule(ctx, mod, path, args, kwargs)
            t = type(mod)
            if t in _ACT_MODULES:
                return self._unary(args[0], _ACT_MODULES[t], path, act=True)
            if t in _IDENTITY_MODULES:
                return self._unary(args[0], _IDENTITY_MODULES[t], path)
            if t in _POOL_MODULES:
                return self._pool(args[0], _POOL_MODULES[t], path)
            if isinstance(mod, nn.Flatten):
                return self._flatten(args[0], mod.start_dim, mod.end_dim, path, node)
            if any(True for _ in mod.parameters(recurse=False)) or any(
                True for _ in mod.buffers(recurse=False)
            ):
                raise UnsupportedModuleError(path, type(mod).__name__)
            if not _acts_in(args) and not _acts_in(kwargs):
                return None
            raise UnsupportedModuleError(path, type(mod).__name__)
        target = node.target
        name = node.name
        if node.op == "call_function":
            if target in _UNARY_ACT_FUNCS:
                return self._unary(args[0], _UNARY_ACT_FUNCS[target], name, act=True)
            if target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
                return self._unary(args[0], "softmax", name, act=True)
            if target in _IDENTITY_FUNCS:
                return self._unary(args[0], _IDENTITY_FUNCS[target], name)
            if target in _POOL_FUNCS:
                return self._pool(args[0], _POOL_FUNCS[target], name)
            if target is torch.flatten:
                start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
                end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
                return self._flatten(args[0], start, end, name, node)
            if target in _ADD_FUNCS:
                sub = target in (operator.sub, operator.isub, torch.sub)
                return self._binary(args[0], args[1], "sub" if sub else "add", name)
            if target in _MUL_FUNCS:
                return self._binary(args[0], args[1], "mul", name)
            if target in _DIV_FUNCS:
                return self._binary(args[0], args[1], "div", name)
            if target is operator.neg or target is torch.neg:
                return self._unary(args[0], "neg", name)
            if target in (torch.cat, torch.concat, torch.concatenate):
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                return self._cat(list(args[0]), dim, name)
            if target is operator.getitem:
                return self._getitem(args[0], args[1], name)
            if target in (torch.mean, torch.sum, torch.amax, torch.amin):
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                return self._reduce(args[0], dim, name)
            if not _acts_in(args) and not _acts_in(kwargs):
                return None
            raise UnsupportedOperationError(name, f"function {getattr(target, '__name__', target)}")
        if node.op == "call_method":
            m = str(target)
            x = args[0]
            if m in _UNARY_ACT_METHODS:
                return self._unary(x, _UNARY_ACT_METHODS[m], name, act=True)
            if m in ("softmax", "log_softmax"):
                return self._unary(x, "softmax", name, act=True)
            if m in _IDENTITY_METHODS:
                return self._unary(x, _IDENTITY_METHODS[m], name)
            if m in ("size", "dim", "numel"):
                return None
            if m == "flatten":
                start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
                end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
                return self._flatten(x, start, end, name, node)
            if m in ("view", "reshape"):
                shape = args[1:] if len(args) > 2 or not isinstance(args[1:][0] if args[1:]
                                                                    else None, (tuple, list)) \
                    else args[1]
                return self._view(x, tuple(shape), name, node)
            if m in _BIN_METHODS:
                return self._binary(x, args[1], _BIN_METHODS[m], name)
            if m in ("mean", "sum", "amax", "amin"):
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                return self._reduce(x, dim, name)
            if m in ("neg",):
                return self._unary(x, "neg", name)
            if m in ("transpose",):
                return self._transpose(x, args[1], args[2], name)
            if m in ("squeeze", "unsqueeze"):
                return self._squeeze(x, m, args[1] if len(args) > 1 else kwargs.get("dim"),
                                     name)
            if not isinstance(x, (Act, _Opaque, _TupleOut)):
                return None
            raise UnsupportedOperationError(name, f"method .{m}()")
        raise UnsupportedOperationError(name, node.op)

    # -- op handlers ------------------------------------------------------------------------
    def _unary(self, x: Any, tag: str, path: str, act: bool = False) -> Any:
        if not isinstance(x, Act):
            return x if isinstance(x, _Opaque) else None
        if act and x.segs is not None:
            return _activation(self.ctx, x, tag)
        return x.replace(chain=x.chain + (tag,))

    def _pool(self, x: Any, tag: str, path: str) -> Any:
        if not isinstance(x, Act):
            return None
        if x.cdim != 1 and x.segs is not None:
            raise UnsupportedOperationError(path, "pooling", "the neuron axis is not dim 1")
        if x.holder is not None and x.segs is None:
            x = x.replace(cdim=1)
        return x.replace(chain=x.chain + (tag,))

    def _flatten(self, x: Any, start: int, end: int, path: str, node: fx.Node) -> Any:
        if not isinstance(x, Act):
            return None if not isinstance(x, _Opaque) else x
        if end not in (-1,) and not (x.ndim is not None and _norm_dim(end, x.ndim) == x.ndim - 1):
            raise UnsupportedOperationError(path, "flatten", "only flatten(start_dim, -1)")
        if x.segs is None:  # flattening a raw input: every flattened feature is an input neuron
            return x.replace(cdim=-1, ndim=start + 1 if start >= 0 else None, flat=None)
        if x.ndim is not None and _norm_dim(start, x.ndim) == x.ndim - 1:
            return x
        if start != 1:
            raise UnsupportedOperationError(path, "flatten", "only start_dim=1 is supported")
        if x.ndim == 2:
            return x
        if x.flat is not None:
            return x
        order = "major" if x.cdim == 1 else "minor"
        return x.replace(cdim=-1, ndim=2, flat=order, chain=x.chain + ("flatten",))

    def _view(self, x: Any, shape: tuple, path: str, node: fx.Node) -> Any:
        if not isinstance(x, Act):
            return None
        if len(shape) == 2 and (shape[1] == -1 or isinstance(shape[1], int)):
            if shape[1] == -1 or x.segs is None:
                return self._flatten(x, 1, -1, path, node)
        raise UnsupportedOperationError(
            path, f"view/reshape to {shape}",
            "only flattening views (batch, -1) of a neuron-carrying tensor are supported",
        )

    def _reduce(self, x: Any, dim: Any, path: str) -> Any:
        if not isinstance(x, Act):
            return None
        if dim is None:
            return _Opaque(f"a full reduction at {path}")
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        if x.segs is None:
            return x
        if any(_same_dim(d, x.cdim, x.ndim) for d in dims):
            return _Opaque(f"a reduction over the neuron axis at {path}")
        if x.cdim == -1 and x.ndim is None and any(d in (1, -2) for d in dims):
            # (B, L, C) reduced over L; if the value was 2-D this would hit the neuron axis
            pass
        nd = x.ndim - len(dims) if x.ndim is not None else None
        if x.cdim == 1 and (nd == 2 or (nd is None and len(dims) >= 1)):
            # (B, C, *spatial) reduced over all spatial dims -> (B, C)
            return x.replace(cdim=-1, ndim=nd, chain=x.chain + ("avgpool",))
        return x.replace(ndim=nd, chain=x.chain + ("avgpool",))

    def _transpose(self, x: Any, a: int, b: int, path: str) -> Any:
        if not isinstance(x, Act) or x.segs is None:
            return x if isinstance(x, Act) else None
        if _same_dim(a, x.cdim, x.ndim) or _same_dim(b, x.cdim, x.ndim):
            raise UnsupportedOperationError(path, "transpose", "moves the neuron axis")
        return x

    def _squeeze(self, x: Any, m: str, d: Any, path: str) -> Any:
        if not isinstance(x, Act) or x.segs is None:
            return x if isinstance(x, Act) else None
        if d is None or (x.cdim == 1 and d in (0, 1)):
            raise UnsupportedOperationError(path, m, "may move the neuron axis")
        nd = None if x.ndim is None else x.ndim + (1 if m == "unsqueeze" else -1)
        return x.replace(ndim=nd)

    def _getitem(self, x: Any, idx: Any, path: str) -> Any:
        if isinstance(x, _TupleOut):
            return x.items[idx]
        if isinstance(x, (tuple, list)):
            return x[idx]
        if not isinstance(x, Act):
            return None
        if x.segs is None:
            raise UnsupportedOperationError(path, "indexing of a model input")
        items = idx if isinstance(idx, tuple) else (idx,)
        if x.cdim == -1:
            if Ellipsis in items:
                if items[-1] is Ellipsis or (items[-1] == slice(None)):
                    return x
                raise UnsupportedOperationError(path, "indexing", "indexes the neuron axis")
            if x.ndim is not None and len(items) >= x.ndim and items[-1] != slice(None):
                raise UnsupportedOperationError(path, "indexing", "indexes the neuron axis")
            if x.ndim is None and len(items) >= 2 and items[-1] != slice(None):
                raise UnsupportedOperationError(path, "indexing", "may index the neuron axis")
            dropped = sum(1 for i in items if isinstance(i, int))
            return x.replace(ndim=None if x.ndim is None else x.ndim - dropped)
        if len(items) >= 2 and items[1] != slice(None) or Ellipsis in items:
            raise UnsupportedOperationError(path, "indexing", "indexes the neuron axis")
        if isinstance(items[0], int):
            raise UnsupportedOperationError(path, "indexing", "indexes the batch axis")
        return x

    def _cat(self, xs: list, dim: int, path: str) -> Any:
        acts = [v for v in xs if isinstance(v, Act)]
        if not acts:
            return None
        if len(acts) != len(xs) or any(a.segs is None for a in acts):
            raise UnsupportedOperationError(
                path, "cat", "concatenates a tensor that carries no neurons (e.g. a parameter)"
            )
        a0 = acts[0]
        if all(_same_dim(dim, a.cdim, a.ndim) for a in acts) and all(
            a.cdim == a0.cdim and a.flat is None for a in acts
        ):
            segs = [s for a in acts for s in a.segs]
            for a in acts:
                self.ctx.add_use(a, Use("other", a.chain, path))
            return Act(segs, a0.cdim, max(a.depth for a in acts), a0.ndim)
        # concatenation along a non-neuron axis: all parts must be the same neurons
        for a in acts[1:]:
            self.ctx.tie_acts(a0, a)
        return a0.replace(chain=a0.chain + ("cat",), depth=max(a.depth for a in acts))

    def _binary(self, a: Any, b: Any, op: str, path: str) -> Any:
        ctx = self.ctx
        a_act, b_act = isinstance(a, Act), isinstance(b, Act)
        if isinstance(a, tuple) and a and a[0] == "attr" or isinstance(b, tuple) and b and \
                b[0] == "attr":
            attr = a if not a_act else b
            key = attr[1]
            if key in ctx.state and isinstance(ctx.state[key], nn.Parameter):
                raise UnsupportedOperationError(
                    path, f"{op} with parameter '{key}'",
                    "a free-standing parameter combined elementwise has no neurons to live on",
                )
        if a_act and b_act:
            if a.segs is None or b.segs is None:
                raise UnsupportedOperationError(path, op, "combines a raw model input")
            if op == "div":
                raise UnsupportedOperationError(path, "division of two neuron tensors")
            kind = "product" if op == "mul" else "residual"
            n_a = sum(ctx.sets[s].size for s in a.segs)
            n_b = sum(ctx.sets[s].size for s in b.segs)
            if n_a != n_b:
                raise UnsupportedOperationError(path, op, "operands have different widths")
            depth = max(a.depth, b.depth)
            sid = ctx.new_set(n_a, kind, path, depth)
            out_nodes = ctx.sets[sid].nodes
            ctx.add_struct_edges(ctx.set_nodes(a.segs), out_nodes, 1.0, kind, depth)
            w = -1.0 if op == "sub" else 1.0
            ctx.add_struct_edges(ctx.set_nodes(b.segs), out_nodes, w, kind, depth)
            ctx.add_use(a, Use("other", a.chain, path))
            ctx.add_use(b, Use("other", b.chain, path))
            out = Act([sid], a.cdim, depth, a.ndim or b.ndim)
            ctx.tie_acts(a, b)
            ctx.tie_acts(a, out)
            return out
        x = a if a_act else b
        if not isinstance(x, Act):
            if isinstance(a, _Opaque) or isinstance(b, _Opaque):
                return a if isinstance(a, _Opaque) else b
            return None
        other = b if a_act else a
        scalar = isinstance(other, (int, float))
        if op in ("mul", "div") and scalar:
            tag = "scale" if (other > 0 if op == "mul" else other > 0) else "negscale"
        elif op in ("add", "sub") and scalar and other == 0:
            tag = "identity"
        else:
            tag = "shift" if op in ("add", "sub") else "elementwise"
        return x.replace(chain=x.chain + (tag,))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def analyze(
    model: nn.Module,
    example_input: Any = None,
    leaf_modules: Sequence[type] = (),
) -> ModelAnalysis:
    """Analyse ``model``: neuron sets, parameter records, symmetry ties.

    Args:
        model: any ``torch.fx``-traceable module (it is not modified).
        example_input: optional input (a tensor or tuple of tensors); when given, shapes are
            propagated so that channel axes and flatten sizes are checked exactly.
        leaf_modules: extra module types to keep as leaves of the trace (they need a rule).

    Raises:
        TraceError: the model cannot be traced.
        UnsupportedModuleError: a module or op has no rule; the message names its path.
        CoverageError: some state-dict entry would not be represented.
    """
    from graphspace.graphs import rules  # noqa: F401  (registers the built-in rules)

    graph = _trace_graph(model, leaf_modules)
    ctx = AnalysisContext(model)
    if example_input is not None and not isinstance(example_input, tuple):
        example_input = (example_input,)
    _Walker(ctx, model, graph, example_input).run()

    covered = {r.key for r in ctx.records}
    missing = [k for k in ctx.state if k not in covered]
    if missing:
        raise CoverageError(
            f"{len(missing)} state-dict entries of {type(model).__name__} are not represented "
            f"by the parameter graph (none is ever dropped silently): {missing[:8]}. They belong "
            "to modules that the traced forward never calls through a supported rule."
        )

    # fixed sets make their whole tie class fixed
    fixed_roots = {ctx.find(s) for s in ctx.fixed}
    for s in ctx.sets:
        s.permutable = ctx.find(s.id) not in fixed_roots

    n = ctx.num_nodes
    node_role = torch.zeros(n, dtype=torch.long)
    node_pos = torch.full((n,), -1, dtype=torch.long)
    for sids, role in ((ctx.input_sets, 1), (ctx.output_sets, 2)):
        pos = 0
        for s in sids:
            nodes = ctx.sets[s].nodes
            node_role[nodes] = role
            node_pos[nodes] = torch.arange(pos, pos + nodes.numel())
            pos += nodes.numel()
    node_act = torch.zeros(n, dtype=torch.long)
    for s, a in ctx.set_activation.items():
        node_act[ctx.sets[s].nodes] = ACTIVATION.get(a, ACTIVATION["other"])
    node_head = torch.full((n,), -1, dtype=torch.long)
    for nodes_heads in ctx.head_of_node.values():
        nodes, heads = nodes_heads
        node_head[nodes] = heads

    def cat(ts: list[Tensor]) -> Tensor:
        return torch.cat(ts) if ts else torch.zeros(0, dtype=torch.long)

    return ModelAnalysis(
        num_nodes=n,
        sets=ctx.sets,
        records=ctx.records,
        struct_edges=ctx.struct_edges,
        node_type=cat(ctx._node_type),
        node_layer=cat(ctx._node_layer),
        node_set=cat(ctx._node_set),
        node_role=node_role,
        node_pos=node_pos,
        node_act=node_act,
        node_head=node_head,
        input_sets=ctx.input_sets,
        output_sets=ctx.output_sets,
        parent=[ctx.find(i) for i in range(len(ctx.sets))],
        producers=ctx.producers,
        uses=ctx.uses,
        set_activation=ctx.set_activation,
        state_keys=list(ctx.state.keys()),
    )
