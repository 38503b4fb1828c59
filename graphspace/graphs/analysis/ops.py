"""Per-ATen-op rules of the walk (the op table) and the walker that applies them."""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from graphspace.graphs.analysis import layout as L
from graphspace.graphs.analysis.context import (
    Act,
    AnalysisContext,
    Const,
    Opaque,
    Raw,
    Scores,
    TupleOut,
    rule_for,
)
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedModuleError, UnsupportedOperationError

OpFn = Callable[["Walker", fx.Node, tuple, dict], Any]
OPS: dict[str, OpFn] = {}
#: ops whose rules read parameters as weights (they receive :class:`ParamRef` as is)
WEIGHT_OPS: set[str] = set()


def op(*names: str, weights: bool = False) -> Callable[[OpFn], OpFn]:
    """Register a rule for the ATen ops ``names`` (packet names). With ``weights``, parameter
    arguments arrive as :class:`ParamRef` (read them with :meth:`Walker.weight`); otherwise as
    an :class:`Act` whose ids are the parameter's flat indices."""

    def deco(fn: OpFn) -> OpFn:
        for n in names:
            OPS[n] = fn
            if weights:
                WEIGHT_OPS.add(n)
        return fn

    return deco


@dataclasses.dataclass
class ParamRef:
    """A parameter (or persistent buffer) as the exported graph passes it: its key and shape.
    It becomes an :class:`Act` of flat indices only when an op uses it as a value."""

    param: str
    shape: tuple[int, ...]


ACT_OPS = {
    "relu": "relu", "relu_": "relu", "gelu": "gelu", "silu": "silu", "tanh": "tanh",
    "sigmoid": "sigmoid", "sin": "sin", "cos": "cos", "elu": "elu", "selu": "selu",
    "celu": "celu", "softplus": "softplus", "relu6": "relu6", "hardtanh": "hardtanh",
    "hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "mish": "mish",
    "log_sigmoid_forward": "logsigmoid", "log_sigmoid": "logsigmoid",
    "leaky_relu": "leaky_relu", "softsign": "softsign",
}
ELEMENTWISE_OPS = {"exp", "log", "sqrt", "rsqrt", "abs", "reciprocal", "erf", "square",
                   "clamp", "clamp_min", "clamp_max", "pow", "log1p", "expm1", "sign", "floor",
                   "ceil", "round", "logical_not", "bitwise_not", "isnan", "isinf", "sgn",
                   "nan_to_num", "trunc", "frac", "atan", "asin", "acos", "sinh", "cosh",
                   "exp2", "log2", "log10", "erfc", "erfinv"}
IDENTITY_OPS = {"clone", "contiguous", "alias", "detach", "_to_copy", "to", "lift_fresh_copy",
                "type_as", "_assert_tensor_metadata", "view_as", "copy"}
DROPOUT_OPS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}
CONST_OPS = {"arange", "zeros", "ones", "full", "empty", "zeros_like", "ones_like",
             "full_like", "empty_like", "rand", "randn", "rand_like", "randn_like", "eye",
             "tril", "triu", "scalar_tensor", "new_zeros", "new_ones", "new_full",
             "new_empty", "linspace", "logspace", "randint", "bernoulli", "tensor"}
UNIFORM_CONST = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros",
                 "new_ones", "new_full", "scalar_tensor"}


def _shape(node: fx.Node) -> tuple[int, ...]:
    v = node.meta.get("val")
    if isinstance(v, Tensor):
        return tuple(int(s) for s in v.shape)
    return ()


def _shapes(node: fx.Node) -> list[tuple[int, ...]]:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return [tuple(int(s) for s in t.shape) if isinstance(t, Tensor) else () for t in v]
    return [_shape(node)]


def _is_neuron(v: Any) -> bool:
    return isinstance(v, Act) and v.param is None


def _is_param(v: Any) -> bool:
    return isinstance(v, ParamRef) or (isinstance(v, Act) and v.param is not None)


class Walker:
    """Walks an exported graph, applying :data:`OPS` to every call."""

    def __init__(self, ctx: AnalysisContext, model: nn.Module) -> None:
        self.ctx = ctx
        self.model = model
        self.env: dict[fx.Node, Any] = {}
        self.producers: dict[int, tuple[str, Tensor, Tensor]] = {}
        self.node: fx.Node | None = None
        #: every parameter used as a value, as stored
        self._param_acts: dict[str, Act] = {}
        #: pieces of packed weights waiting for their other rows
        self.pending: dict[str, list[Any]] = {}

    # -- values --------------------------------------------------------------------------
    def param_act(self, ref: ParamRef) -> Act:
        """``ref`` as a value: ids are the parameter's flat indices."""
        if ref.param not in self._param_acts:
            shape = ref.shape
            n = 1
            for s in shape:
                n *= s
            ids = torch.arange(n).view(shape) if shape else torch.zeros((), dtype=torch.long)
            self._param_acts[ref.param] = Act(ids, tuple(s > 1 for s in shape), shape,
                                              param=ref.param)
        return self._param_acts[ref.param]

    def weight(self, v: Any, path: str, what: str = "weight", partial: bool = False
               ) -> tuple[str, Tensor | None]:
        """State-dict key of a weight argument and its gather index (None: as stored).

        With ``partial``, a use of part of the parameter (``in_proj_weight.chunk(3)``) is
        accepted and its flat indices returned."""
        if not _is_param(v):
            raise UnsupportedOperationError(path, f"a computed {what}",
                                            "weights must be parameters of the model")
        if isinstance(v, ParamRef) or v is self._param_acts.get(v.param):  # used as stored
            return v.param, None
        t = self.ctx.state[v.param]
        full = v.full()
        flat = full.reshape(-1)
        if partial and flat.numel() < t.numel() and torch.unique(flat).numel() == flat.numel():
            return v.param, full
        if flat.numel() != t.numel() or not torch.equal(torch.sort(flat).values,
                                                         torch.arange(t.numel())):
            raise UnsupportedOperationError(
                path, f"a partial use of parameter '{v.param}'",
                "only whole parameters (possibly reshaped or transposed) can become edges")
        if torch.equal(flat, torch.arange(t.numel())):
            return v.param, None
        return v.param, full

    # -- walking -------------------------------------------------------------------------
    def call(self, node: fx.Node) -> None:
        self.node = node
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        target = node.target
        if target is operator.getitem:
            x, i = args
            out = x.items[i] if isinstance(x, TupleOut) else (
                x[i] if isinstance(x, (list, tuple)) else None)
        elif isinstance(target, torch._ops.OpOverload):
            name = target._overloadpacket.__name__
            fn = OPS.get(name)
            if name not in WEIGHT_OPS:
                args, kwargs = self._as_values((args, kwargs))
            if fn is None:
                out = self.unknown(node, name, args, kwargs)
            else:
                out = fn(self, node, args, kwargs)
        else:
            args, kwargs = self._as_values((args, kwargs))
            out = self.unknown(node, getattr(target, "__name__", str(target)), args, kwargs)
        self.env[node] = out
        if _is_neuron(out):
            self._producer(node, out)

    def _as_values(self, x: Any) -> Any:
        """``x`` with every :class:`ParamRef` turned into its :class:`Act`."""
        if isinstance(x, ParamRef):
            return self.param_act(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self._as_values(v) for v in x)
        if isinstance(x, dict):
            return {k: self._as_values(v) for k, v in x.items()}
        return x

    def _producer(self, node: fx.Node, a: Act) -> None:
        dims = [d for d in range(a.ndim) if a.ids.shape[d] > 1]
        if not dims:  # a single neuron
            dims = [d for d in range(a.ndim) if a.mat[d]][:1]
        if len(dims) != 1:
            return
        d = dims[0]
        ids = a.ids.movedim(d, -1).reshape(-1)
        if (ids < 0).any():
            return
        for s in self.ctx.sets_of(ids):
            if s in self.producers:
                continue
            nodes = self.ctx.sets[s].nodes
            lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
            lookup[ids] = torch.arange(ids.numel())
            if int(nodes.max()) >= lookup.numel():
                continue
            pos = lookup[nodes]
            if bool((pos >= 0).all()):
                self.producers[s] = (node.name, torch.tensor([d % a.ndim]).long(), pos)

    def unknown(self, node: fx.Node, name: str, args: tuple, kwargs: dict) -> Any:
        vals = _flatten_vals((args, kwargs))
        if any(_is_neuron(v) or isinstance(v, Scores) for v in vals):
            raise UnsupportedOperationError(
                _path(node), f"op {name}", "no rule says how it acts on neurons (register one "
                "with graphspace.graphs.register_op, see docs/extending.md)")
        if any(_is_param(v) for v in vals):
            raise UnsupportedOperationError(_path(node), f"op {name} on a parameter")
        if any(isinstance(v, Raw) for v in vals):
            return Raw(next(v for v in vals if isinstance(v, Raw)).holder, _shape(node))
        shp = _shapes(node)
        if len(shp) > 1 or isinstance(node.meta.get("val"), (tuple, list)):
            return TupleOut([Const(s) for s in shp])
        return Const(_shape(node), invariant=any(isinstance(v, Const) and v.invariant
                                                 for v in vals))

    def output(self, node: fx.Node) -> None:
        vals = _flatten_vals(fx.node.map_arg(node.args, lambda n: self.env[n]))
        for v in vals:
            if isinstance(v, Scores):
                self.ctx.fix_act(v)
                continue
            if not _is_neuron(v):
                continue
            self.ctx.fix_nodes(v.ids)
            self.ctx.add_use(v, Use("other", v.chain, "output"))
            for s in self.ctx.sets_of(v.ids.reshape(-1)):
                if s not in self.ctx.output_sets:
                    self.ctx.output_sets.append(s)

    def run_region(self, gm: fx.GraphModule, first: fx.Node, regions: dict, key: str,
                   path: str) -> None:
        nodes = [n for n in gm.graph.nodes if regions.get(n, (None,))[0] == key]
        inside = set(nodes)
        ins: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in ins:
                    v = self.env.get(a)
                    if _is_param(v) or (isinstance(v, Const) and a.op == "placeholder"):
                        continue
                    ins.append(a)
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        mod = self.model.get_submodule(path)
        rule = rule_for(mod)
        assert rule is not None
        res = rule(self.ctx, mod, path, tuple(self.env[a] for a in ins), {})
        items = res.items if isinstance(res, TupleOut) else [res] * len(outs)
        for n, v in zip(outs, items):
            self.env[n] = v
        for n in nodes:
            self.env.setdefault(n, Opaque(f"an internal value of '{path}'"))

    # -- helpers used by op rules -----------------------------------------------------------
    def merge(self, parts: list[Tensor], shape: tuple[int, ...], mat: tuple[bool, ...],
              kind: str, weights: list[float], depth: int, path: str) -> Act:
        """A new neuron per distinct tuple of nodes in ``parts`` (broadcast ids), with struct
        edges and ties from every part."""
        ctx = self.ctx
        flat = torch.stack([p.reshape(-1) for p in parts], 1)
        uniq, inv = torch.unique(flat, dim=0, return_inverse=True)
        sid = ctx.new_set(uniq.shape[0], kind, path, depth)
        out = ctx.sets[sid].nodes
        for j, w in enumerate(weights):
            src = uniq[:, j]
            ctx.add_struct_edges(src, out, w, kind, depth)
            keep = src >= 0
            if bool(keep.any()):
                ctx.tie_nodes(src[keep], out[keep])
        ids = out[inv].view(parts[0].shape)
        return Act(ids, mat, shape, depth)


def clean_path(path: str) -> str:
    """A module path of ``nn_module_stack`` as in ``named_modules()`` (``layers.0.fc``)."""
    p = path.replace("L['self'].", "").replace("L['self']", "")
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    p = re.sub(r"\['([^']+)'\]", r".\1", p)
    return p.lstrip(".")


def _path(node: fx.Node) -> str:
    """Where ``node`` sits in the model, for error messages: ``module.path (node name)``."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        p = list(stack.values())[-1][0]
        return f"{clean_path(p) or '<model>'} ({node.name})"
    return node.name


def _flatten_vals(x: Any) -> list[Any]:
    out: list[Any] = []

    def visit(v: Any) -> None:
        if isinstance(v, (list, tuple)):
            for u in v:
                visit(u)
        elif isinstance(v, dict):
            for u in v.values():
                visit(u)
        elif isinstance(v, TupleOut):
            for u in v.items:
                visit(u)
        else:
            out.append(v)

    visit(x)
    return out


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# ---------------------------------------------------------------------------------------------
# elementwise unary
# ---------------------------------------------------------------------------------------------


def _unary(w: Walker, x: Any, tag: str, shape: tuple[int, ...], act: bool = False) -> Any:
    if isinstance(x, Act):
        if x.param is None and act:
            return w.ctx.activation(x.replace(shape=shape), tag)
        return x.replace(chain=x.chain + (tag,), shape=shape)
    if isinstance(x, Raw):
        return Raw(x.holder, shape, x.chain + (tag,))
    if isinstance(x, Const):
        return Const(shape, x.invariant, x.what)
    if isinstance(x, Scores):
        return x
    return x


@op(*ACT_OPS)
def _act_op(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    return _unary(w, args[0], ACT_OPS[name], _shape(node), act=True)


@op(*ELEMENTWISE_OPS)
def _elementwise(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if len(args) > 1 and isinstance(args[1], (Act, Const, Raw)):
        return _binary(w, node, args[0], args[1], "other")
    if isinstance(x, (int, float)):
        return Const(_shape(node))
    return _unary(w, x, "elementwise", _shape(node))


@op(*IDENTITY_OPS)
def _identity(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if isinstance(x, Act):
        return x.replace(shape=_shape(node) or x.shape)
    if isinstance(x, Raw):
        return Raw(x.holder, _shape(node), x.chain)
    return x if not isinstance(x, Const) else Const(_shape(node), x.invariant, x.what)


@op(*DROPOUT_OPS)
def _dropout(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _unary(w, args[0], "dropout", _shape(node))


@op("native_dropout")
def _native_dropout(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return TupleOut([_unary(w, args[0], "dropout", _shapes(node)[0]), Const(_shapes(node)[1])])


@op(*CONST_OPS)
def _const(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    x = args[0] if args else None
    if name in ("tril", "triu") and isinstance(x, Act):
        raise UnsupportedOperationError(_path(node), name, "masks a neuron tensor")
    return Const(_shape(node), what=f"a constant ({name})") if name not in UNIFORM_CONST else \
        Const(_shape(node), what="a uniform constant")


@op("neg")
def _neg(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _unary(w, args[0], "negscale", _shape(node))


@op("softmax", "_softmax", "log_softmax", "_log_softmax")
def _softmax(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _unary(w, args[0], "softmax", _shape(node), act=True)


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------


def _layout(w: Walker, node: fx.Node, x: Any, fn: Callable[[Act], Act]) -> Any:
    shape = _shape(node)
    if isinstance(x, Act):
        return fn(x)
    if isinstance(x, Raw):
        return Raw(x.holder, shape, x.chain)
    if isinstance(x, Const):
        return Const(shape, x.invariant, x.what)
    if isinstance(x, Scores):
        return Opaque(f"reshaped attention weights at {_path(node)}")
    return x


@op("view", "_unsafe_view", "reshape", "unflatten", "flatten", "view_copy", "_reshape_alias")
def _view(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    shape = _shape(node)
    return _layout(w, node, args[0], lambda x: L.reshape(x, shape))


@op("permute", "permute_copy")
def _permute(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _layout(w, node, args[0], lambda x: L.permute(x, args[1]))


@op("transpose", "swapaxes", "swapdims")
def _transpose(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if isinstance(x, Scores):
        return Opaque("transposed attention weights")
    return _layout(w, node, x, lambda a: L.transpose(a, args[1], args[2]))


@op("t", "numpy_T")
def _t(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _layout(w, node, args[0], lambda a: L.transpose(a, 0, -1) if a.ndim == 2 else a)


@op("unsqueeze")
def _unsqueeze(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _layout(w, node, args[0], lambda a: L.unsqueeze(a, args[1]))


@op("squeeze")
def _squeeze(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    d = args[1] if len(args) > 1 else None
    dims = None if d is None else ([d] if isinstance(d, int) else list(d))
    return _layout(w, node, args[0], lambda a: L.squeeze(a, dims))


@op("expand", "expand_copy", "expand_as", "broadcast_to")
def _expand(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    shape = _shape(node)
    return _layout(w, node, args[0], lambda a: L.expand(a, shape))


def _select_cell(w: Walker, x: Act, dim: int, index: Tensor) -> None:
    """Selecting part of a neuron dimension: the selected neurons form a cell."""
    if x.param is not None or not (x.ids.shape[dim] > 1):
        return
    part = x.ids.index_select(dim, index)
    w.ctx.cell(part)
    rest = torch.ones(x.ids.shape[dim], dtype=torch.bool)
    rest[index] = False
    if bool(rest.any()):
        w.ctx.cell(x.ids.index_select(dim, torch.nonzero(rest).view(-1)))


@op("select")
def _select(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, dim, i = args[0], args[1], args[2]
    if isinstance(x, Scores):
        return Opaque("a slice of attention weights")

    def fn(a: Act) -> Act:
        d = dim % a.ndim
        idx = torch.tensor([i % a.shape[d]])
        if a.ids.shape[d] > 1:
            _select_cell(w, a, d, idx)
            return L.index_dim(a, d, idx, False, _shape(node))
        return L.index_dim(a, d, torch.tensor([0]), False, _shape(node))

    return _layout(w, node, x, fn)


def _slice_index(size: int, start: Any, end: Any, step: Any) -> Tensor:
    return torch.arange(size)[slice(start, end, step or 1)]


@op("slice", "narrow")
def _slice(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim", 0)
    if name == "narrow":
        start, length = args[2], args[3]
        start_end = (start, start + length, 1)
    else:
        start_end = (_arg(args, kwargs, 2, "start"), _arg(args, kwargs, 3, "end"),
                     _arg(args, kwargs, 4, "step", 1))
    if isinstance(x, Scores):
        return Opaque("a slice of attention weights")

    def fn(a: Act) -> Act:
        d = dim % a.ndim
        size = a.shape[d]
        idx = _slice_index(size, *start_end)
        if a.ids.shape[d] > 1:
            if idx.numel() == size and torch.equal(idx, torch.arange(size)):
                return a.replace(shape=_shape(node))
            _select_cell(w, a, d, idx)
            out = L.index_dim(a, d, idx, True, _shape(node))
            return out.replace(chain=out.chain + ("slice",))
        return L.index_dim(a, d, idx, True, _shape(node))

    return _layout(w, node, x, fn)


@op("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split")
def _split(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    x = args[0]
    shapes = _shapes(node)
    dim = _arg(args, kwargs, 2 if name not in ("unbind",) else 1, "dim", 0)
    if name == "unbind":
        dim = _arg(args, kwargs, 1, "dim", 0)
    if isinstance(x, Raw):
        return TupleOut([Raw(x.holder, s, x.chain) for s in shapes])
    if isinstance(x, Const):
        return TupleOut([Const(s, x.invariant, x.what) for s in shapes])
    if not isinstance(x, Act):
        return TupleOut([Opaque(f"a split of {getattr(x, 'what', 'a value')}")
                         for _ in shapes])
    d = dim % x.ndim
    out = []
    start = 0
    for s in shapes:
        if name == "unbind":
            idx = torch.tensor([start])
            size = 1
        else:
            size = s[d]
            idx = torch.arange(start, start + size)
        if x.ids.shape[d] > 1:
            _select_cell(w, x, d, idx)
            part = L.index_dim(x, d, idx, name != "unbind", s)
        else:
            part = L.index_dim(x, d, torch.tensor([0]), name != "unbind", s)
        out.append(part)
        start += size
    return TupleOut(out)


@op("cat", "concat", "concatenate")
def _cat(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return _concat(w, node, list(args[0]), _arg(args, kwargs, 1, "dim", 0))


@op("stack")
def _stack(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """``stack`` is ``cat`` of the parts unsqueezed at ``dim``."""
    d = _arg(args, kwargs, 1, "dim", 0) % len(_shape(node))
    parts = [L.unsqueeze(p, d) if isinstance(p, Act) else dataclasses.replace(
        p, shape=p.shape[:d] + (1,) + p.shape[d:]) if isinstance(p, (Raw, Const)) else p
        for p in args[0]]
    return _concat(w, node, parts, d)


def _concat(w: Walker, node: fx.Node, parts: list, dim: int) -> Any:
    shape = _shape(node)
    nd = len(shape)
    d = dim % nd
    if not any(_is_neuron(p) for p in parts) and not any(_is_param(p) for p in parts):
        raw = next((p for p in parts if isinstance(p, Raw)), None)
        if raw is not None:
            return Raw(raw.holder, shape, raw.chain)
        return Const(shape)
    acts: list[Act] = []
    for p in parts:
        if _is_neuron(p):
            acts.append(p)
        elif _is_param(p):
            acts.append(_free_set(w, p, node))
        elif isinstance(p, Const):
            if "uniform" not in p.what:
                raise UnsupportedOperationError(
                    _path(node), "cat", f"concatenates neurons with {p.what}")
            acts.append(Act(torch.full([1] * nd, -1, dtype=torch.long), (False,) * nd, p.shape))
        elif isinstance(p, Raw):
            # the model input joins neurons along this axis: it needs input nodes
            ref = next(a for a in parts if _is_neuron(a))
            md = [k for k in range(nd) if ref.ids.shape[k] > 1]
            if len(md) != 1 or md[0] == d:
                raise UnsupportedOperationError(_path(node), "cat", "of a raw model input")
            acts.append(w.ctx.resolve(p, p.shape[md[0]], _path(node), md[0]))
        else:
            raise UnsupportedOperationError(_path(node), "cat", "of a non-tensor value")
    varies = any(a.ids.shape[d] > 1 for a in acts) or any(a.mat[d] for a in acts)
    depth = max(a.depth for a in acts)
    if varies:
        out = L.cat(acts, d, shape)
        for a in acts:
            w.ctx.add_use(a, Use("other", a.chain, "cat"))
        return out.replace(depth=depth, chain=())
    # along a non-neuron axis (tokens): parts must hold the same neurons
    mat = [False] * nd
    for a in acts:
        for k in range(nd):
            if a.ids.shape[k] > 1:
                mat[k] = True
    target = [shape[k] if mat[k] and k != d else 1 for k in range(nd)]
    ids = [a.ids.expand([t if a.ids.shape[k] == 1 else a.ids.shape[k]
                         for k, t in enumerate(target)]) for a in acts]
    ids = [i.expand(target) for i in ids]
    if all(torch.equal(ids[0], i) for i in ids[1:]):
        return acts[0].replace(ids=ids[0], shape=shape, depth=depth)
    for a in acts:
        w.ctx.add_use(a, Use("other", a.chain, "cat"))
    return w.merge(ids, shape, tuple(mat), "residual", [1.0] * len(ids), depth, _path(node))


@op("roll", "flip")
def _roll(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """``roll``/``flip`` move entries along their dims: applied to the ids where they vary."""
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]

    def fn(a: Act) -> Act:
        if name == "flip":
            dims = [d % a.ndim for d in args[1] if a.ids.shape[d % a.ndim] > 1]
            ids = a.ids.flip(dims) if dims else a.ids
            return a.replace(ids=ids, shape=_shape(node))
        shifts = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = _arg(args, kwargs, 2, "dims", [])
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if not dims:
            if any(s_ > 1 for s_ in a.ids.shape):
                raise UnsupportedOperationError(_path(node), "roll of the flattened neurons")
            return a.replace(shape=_shape(node))
        moved = [(sh, d % a.ndim) for sh, d in zip(shifts, dims) if a.ids.shape[d % a.ndim] > 1]
        ids = torch.roll(a.ids, [m[0] for m in moved], [m[1] for m in moved]) if moved else a.ids
        return a.replace(ids=ids, shape=_shape(node))

    return _layout(w, node, args[0], fn)


@op("constant_pad_nd", "pad")
def _pad(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    pads = list(args[1])
    value = _arg(args, kwargs, 2, "value", 0.0)

    def fn(a: Act) -> Act:
        ids = a.ids
        for k in range(len(pads) // 2):
            dd = a.ndim - 1 - k
            lo, hi = pads[2 * k], pads[2 * k + 1]
            if ids.shape[dd] > 1 and (lo or hi):
                if lo < 0 or hi < 0:
                    raise UnsupportedOperationError(_path(node), "negative padding of neurons")
                if value not in (0, 0.0, None):
                    raise UnsupportedOperationError(_path(node), "non-zero padding of neurons")
                shp = list(ids.shape)
                shp[dd] = lo
                left = torch.full(shp, -1, dtype=torch.long)
                shp[dd] = hi
                right = torch.full(shp, -1, dtype=torch.long)
                ids = torch.cat([left, ids, right], dd)
        return a.replace(ids=ids, shape=_shape(node), chain=a.chain + ("pad",))

    return _layout(w, node, x, fn)


@op("repeat")
def _repeat(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    def fn(a: Act) -> Act:
        reps = list(args[1])
        lead = len(reps) - a.ndim
        ids = a.ids.reshape((1,) * lead + tuple(a.ids.shape))
        if any(r > 1 and ids.shape[k] > 1 for k, r in enumerate(reps)):
            raise UnsupportedOperationError(_path(node), "repeat along a neuron axis")
        return a.replace(ids=ids, mat=(False,) * lead + a.mat, shape=_shape(node))

    return _layout(w, node, args[0], fn)


# ---------------------------------------------------------------------------------------------
# elementwise binary
# ---------------------------------------------------------------------------------------------


def _varies_along_neurons(a: Act, other_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    nd = len(shape)
    ids = a.ids.reshape((1,) * (nd - a.ids.dim()) + tuple(a.ids.shape))
    osh = (1,) * (nd - len(other_shape)) + tuple(other_shape)
    return any(ids.shape[k] > 1 and osh[k] > 1 for k in range(nd))


def _binary(w: Walker, node: fx.Node, a: Any, b: Any, op_name: str) -> Any:
    ctx = w.ctx
    shape = _shape(node)
    path = _path(node)
    if isinstance(a, Scores) or isinstance(b, Scores):
        s, o = (a, b) if isinstance(a, Scores) else (b, a)
        if isinstance(o, Act) and o.param is None:
            raise UnsupportedOperationError(path, op_name, "combines attention weights with "
                                            "neurons")
        if _is_param(o):
            ctx.add_extra(o.param, path)
            s.head_dependent = True
        elif isinstance(o, Const):
            lead = s.q.ids.shape[:-2]
            osh = (1,) * (len(shape) - len(o.shape)) + tuple(o.shape)
            if any(lead[k] > 1 and osh[k] > 1 for k in range(len(lead))):
                s.head_dependent = True
        return Scores(s.q, s.k, shape, s.head_dependent)
    na, nb = _is_neuron(a), _is_neuron(b)
    if na and nb:
        ia, ib, mat = L.broadcast(a.ids, a.mat, b.ids, b.mat, shape)
        if torch.equal(ia, ib) and op_name in ("mul", "add", "maximum", "minimum"):
            # x * x, x + x: elementwise in the same neurons
            ctx.add_use(a, Use("other", a.chain, path))
            return Act(ia, mat, shape, max(a.depth, b.depth))
        kind = "residual" if op_name in ("add", "sub") else "product"
        wts = [1.0, -1.0 if op_name == "sub" else 1.0]
        ctx.add_use(a, Use("other", a.chain, path))
        ctx.add_use(b, Use("other", b.chain, path))
        return w.merge([ia, ib], shape, mat, kind, wts, max(a.depth, b.depth), path)
    if (na or nb) and (isinstance(a, Raw) or isinstance(b, Raw)):
        x, r = (a, b) if na else (b, a)
        md = [k for k in range(x.ndim) if x.ids.shape[k] > 1]
        if len(md) != 1:
            raise UnsupportedOperationError(path, op_name, "combines a raw model input")
        d = md[0] - x.ndim
        ra = ctx.resolve(r, r.shape[d], path, d)
        return _binary(w, node, ra if r is a else a, ra if r is b else b, op_name)
    if na or nb:
        x, o = (a, b) if na else (b, a)
        if _is_param(o):
            return _param_elementwise(w, node, x, o, op_name)
        if isinstance(o, Const):
            if _varies_along_neurons(x, o.shape, shape):
                ctx.fix_act(x)
                return x.replace(shape=shape, chain=x.chain + ("elementwise",))
            # x * c and x / c with a constant c are linear in x; 1 / x and data-dependent
            # (permutation-invariant) factors such as a norm's 1 / std are not
            if op_name in ("mul", "div") and not o.invariant and not (op_name == "div"
                                                                      and x is b):
                tag = "linear_const"
            else:
                tag = "shift" if op_name in ("add", "sub") else "elementwise"
            return x.replace(shape=shape, chain=x.chain + (tag,))
        if isinstance(o, (int, float, bool)) or o is None:
            if op_name in ("mul", "div") and isinstance(o, (int, float)) and not (
                    op_name == "div" and x is b):
                tag = "scale" if o > 0 else ("negscale" if o < 0 else "elementwise")
            elif op_name in ("add", "sub") and o == 0:
                tag = "identity"
            elif op_name in ("add", "sub"):
                tag = "shift"
            else:
                tag = "elementwise"
            return x.replace(shape=shape, chain=x.chain + (tag,))
        if isinstance(o, Opaque):
            raise UnsupportedOperationError(path, op_name, f"combines neurons with {o.what}")
        raise UnsupportedOperationError(path, op_name, "combines neurons with an untraced value")
    # no neurons involved
    if _is_param(a) or _is_param(b):
        p, o = (a, b) if _is_param(a) else (b, a)
        if _is_param(o):
            raise UnsupportedOperationError(path, op_name, "of two parameters")
        if isinstance(o, (Const, int, float)) or o is None:
            if isinstance(o, Const):
                ids, _, mat = L.broadcast(p.ids, p.mat, torch.zeros([1] * len(o.shape),
                                                                    dtype=torch.long),
                                          (False,) * len(o.shape), shape)
                return p.replace(ids=ids, mat=mat, shape=shape, chain=p.chain + (op_name,))
            return p.replace(shape=shape, chain=p.chain + (op_name,))
        if isinstance(o, Raw):
            raise UnsupportedOperationError(path, op_name, "of a parameter and a raw model "
                                            "input (add a layer first)")
        raise UnsupportedOperationError(path, op_name, "of a parameter")
    if isinstance(a, Raw) or isinstance(b, Raw):
        r = a if isinstance(a, Raw) else b
        return Raw(r.holder, shape, r.chain)
    inv = any(isinstance(v, Const) and v.invariant for v in (a, b))
    uni = all(not isinstance(v, Const) or "uniform" in v.what for v in (a, b))
    return Const(shape, inv, "a uniform constant" if uni else "a constant")


def _free_set(w: Walker, p: Act, node: fx.Node) -> Act:
    """A parameter used as activations (a class token): one free neuron per entry, the entry
    stored as the neuron's bias."""
    ctx = w.ctx
    key, _ = p.param, None
    t = ctx.state[key]
    sid = ctx.new_set(t.numel(), "free", key, p.depth)
    nodes = ctx.sets[sid].nodes
    ctx.add_node_param(key, nodes, 0, key.rsplit(".", 1)[0], p.depth, sets=[sid])
    return Act(nodes[p.ids], p.mat, p.shape, p.depth)


def _param_elementwise(w: Walker, node: fx.Node, x: Act, p: Act, op_name: str) -> Act:
    """``x * gamma`` (layer scale), ``x + b`` (a free bias), ``x + pos_embed``."""
    ctx = w.ctx
    shape = _shape(node)
    path = _path(node)
    key = p.param
    assert key is not None
    if ctx.is_recorded(key):
        raise UnsupportedOperationError(path, f"{op_name} with parameter '{key}'",
                                        "the parameter is used more than once")
    xi, pi, mat = L.broadcast(x.ids, x.mat, p.ids, p.mat, shape)
    nd = len(shape)
    # position dims: the parameter varies there, the neurons do not
    xv = x.ids.reshape((1,) * (nd - x.ids.dim()) + tuple(x.ids.shape))
    pv = p.ids.reshape((1,) * (nd - p.ids.dim()) + tuple(p.ids.shape))
    pos_dims = [k for k in range(nd) if pv.shape[k] > 1 and xv.shape[k] == 1]
    neu_dims = [k for k in range(nd) if k not in pos_dims]
    numel = ctx.state[key].numel()
    xs = xi.permute(neu_dims + pos_dims).reshape(-1, _prod([xi.shape[k] for k in pos_dims]))
    ps = pi.permute(neu_dims + pos_dims).reshape(xs.shape)
    if xs.shape[1] == 1 and not pos_dims:
        xs, ps = xs.reshape(-1), ps.reshape(-1)
        pairs = torch.unique(torch.stack([xs, ps], 1), dim=0)
        nodes, pidx = pairs[:, 0], pairs[:, 1]
        if nodes.numel() != numel or torch.unique(nodes).numel() != numel or (
                torch.unique(pidx).numel() != numel) or bool((nodes < 0).any()):
            raise UnsupportedOperationError(
                path, f"{op_name} with parameter '{key}'",
                "the parameter does not match the neurons one to one")
        order = torch.argsort(pidx)
        src = nodes[order]
        depth = x.depth + 1
        kind = "custom" if op_name in ("mul", "div") else "residual"
        sid = ctx.new_set(numel, kind, path.split(" (")[0] or key, depth)
        dst = ctx.sets[sid].nodes
        ctx.tie_nodes(src, dst)
        lookup = torch.full((int(src.max()) + 1,), -1, dtype=torch.long)
        lookup[src] = dst
        ids = lookup[xi]
        if op_name in ("mul", "div"):
            ctx.add_diag_param(key, dst, src, depth, path, [sid], ctx.sets_of(src))
        else:
            ctx.add_struct_edges(src, dst, 1.0 if op_name != "rsub" else -1.0, "residual",
                                 depth)
            ctx.add_node_param(key, dst, 0, path, depth, sets=[sid])
        ctx.add_use(x, Use("other", x.chain, path))
        return Act(ids, mat, shape, depth)
    if op_name not in ("add", "sub"):
        raise UnsupportedOperationError(path, f"{op_name} with parameter '{key}'",
                                        "multiplies neurons by a position-dependent parameter")
    # x + pos_embed: a position node per position, an edge position -> feature per entry
    rows_x = xs[:, 0]
    if not bool((xs == xs[:, :1]).all()):
        raise UnsupportedOperationError(path, f"add of '{key}'", "neurons vary with position")
    uniq, inv = torch.unique(rows_x, return_inverse=True)
    if bool((uniq < 0).any()):
        raise UnsupportedOperationError(path, f"add of '{key}'", "constant features")
    n_pos = xs.shape[1]
    table = torch.full((uniq.numel(), n_pos), -1, dtype=torch.long)
    table[inv] = ps
    flat = table.reshape(-1)
    if bool((flat < 0).any()) or flat.numel() != numel or torch.unique(flat).numel() != numel:
        raise UnsupportedOperationError(path, f"add of '{key}'",
                                        "the parameter does not match neurons x positions")
    depth = x.depth + 1
    sid = ctx.new_set(uniq.numel(), "residual", path.split(" (")[0] or key, depth)
    dst = ctx.sets[sid].nodes
    pos_sid = ctx.new_set(n_pos, "input", f"{key}.positions", 0, permutable=False)
    ctx.tie_nodes(uniq, dst)
    ctx.add_struct_edges(uniq, dst, 1.0, "residual", depth)
    ctx.add_edge_param(key, dst, ctx.sets[pos_sid].nodes, "free", depth, path,
                       view_shape=(uniq.numel(), n_pos), index=flat,
                       dst_sets=[sid], src_sets=[pos_sid])
    lookup = torch.full((int(uniq.max()) + 1,), -1, dtype=torch.long)
    lookup[uniq] = dst
    ctx.add_use(x, Use("other", x.chain, path))
    return Act(lookup[xi], mat, shape, depth)


def _prod(xs: Any) -> int:
    p = 1
    for v in xs:
        p *= int(v)
    return p


@op("add", "sub", "mul", "div", "rsub", "true_divide", "maximum", "minimum", "fmod",
    "remainder", "atan2", "hypot", "floor_divide", "eq", "ne", "lt", "gt", "le", "ge",
    "logical_and", "logical_or", "bitwise_and", "bitwise_or", "mul_", "add_")
def _binary_op(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__.rstrip("_")  # type: ignore[union-attr]
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    if name in ("add", "sub") and alpha != 1 and _is_neuron(b):
        raise UnsupportedOperationError(_path(node), f"{name} with alpha={alpha}")
    if name == "rsub":
        a, b, name = b, a, "sub"
    if name == "true_divide":
        name = "div"
    if name in ("eq", "ne", "lt", "gt", "le", "ge", "logical_and", "logical_or",
                "bitwise_and", "bitwise_or"):
        if _is_neuron(a) or _is_neuron(b):
            raise UnsupportedOperationError(_path(node), f"comparison {name} of neurons")
        return _binary(w, node, a, b, "other")
    return _binary(w, node, a, b, name)


@op("where")
def _where(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    cond, a, b = args[0], args[1], args[2]
    if _is_neuron(cond):
        raise UnsupportedOperationError(_path(node), "where with a neuron condition")
    out = _binary(w, node, a, b, "where")
    if isinstance(cond, Const) and isinstance(out, Act) and out.param is None and \
            _varies_along_neurons(out, cond.shape, _shape(node)):
        w.ctx.fix_act(out)
    return out


@op("masked_fill")
def _masked_fill(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, mask = args[0], args[1]
    mshape = mask.shape if isinstance(mask, (Const, Raw)) else ()
    if _is_neuron(mask):
        raise UnsupportedOperationError(_path(node), "masked_fill with a neuron mask")
    return _binary(w, node, x, Const(tuple(mshape)), "masked_fill")


# ---------------------------------------------------------------------------------------------
# reductions and pooling
# ---------------------------------------------------------------------------------------------


@op("mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod",
    "var_mean", "std_mean", "linalg_vector_norm", "all", "any", "argmax", "argmin", "nansum",
    "nanmean")
def _reduce(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    x = args[0]
    overload = node.target._overloadname  # type: ignore[union-attr]
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], (Act, Const, Raw)):
        return _binary(w, node, args[0], args[1], "maximum")
    if name in ("norm", "linalg_vector_norm"):
        dim = _arg(args, kwargs, 2, "dim")
    elif name in ("var", "std", "var_mean", "std_mean") and overload == "correction":
        dim = _arg(args, kwargs, 1, "dim")
    else:
        dim = _arg(args, kwargs, 1, "dim")
    keep = bool(_arg(args, kwargs, 2 if name not in ("norm", "linalg_vector_norm") else 3,
                     "keepdim", False))
    shapes = _shapes(node)
    tuple_out = isinstance(node.meta.get("val"), (tuple, list))
    shape = shapes[0]
    if not isinstance(x, Act):
        if isinstance(x, Scores):
            return Opaque("a reduction of attention weights")
        if isinstance(x, Raw):
            r = Raw(x.holder, shape, x.chain)
            return TupleOut([r, Const(shapes[-1])]) if tuple_out else r
        c = Const(shape, getattr(x, "invariant", False))
        return TupleOut([c, Const(shapes[-1])]) if tuple_out else c
    nd = x.ndim
    dims = list(range(nd)) if dim is None or dim == [] else (
        [dim] if isinstance(dim, int) else list(dim))
    dims = sorted({d % nd for d in dims})
    over_neurons = [d for d in dims if x.ids.shape[d] > 1 or x.mat[d]]
    if x.param is not None:
        raise UnsupportedOperationError(_path(node), f"{name} of a parameter")
    if over_neurons:
        others = [d for d in range(nd) if d not in dims and x.ids.shape[d] > 1]
        if others:
            w.ctx.fix_act(x)
        w.ctx.add_use(x, Use("other", x.chain, _path(node)))
        c = Const(shape, invariant=True, what=f"a reduction over neurons ({name})")
        return TupleOut([c, Const(shapes[-1])]) if tuple_out else c
    tag = {"mean": "avgpool", "sum": "sumpool", "amax": "maxpool", "max": "maxpool",
           "nansum": "sumpool", "nanmean": "avgpool"}.get(name, "elementwise")
    if name in ("argmax", "argmin"):
        return Opaque(f"{name} indices")
    ids = x.ids
    mat = list(x.mat)
    if not keep:
        for d in reversed(dims):
            ids = ids.squeeze(d) if ids.dim() > d else ids
            del mat[d]
    out = x.replace(ids=ids, mat=tuple(mat), shape=shape, chain=x.chain + (tag,))
    return TupleOut([out, Const(shapes[-1])]) if tuple_out else out


POOL_OPS = {
    "max_pool1d": "maxpool", "max_pool2d": "maxpool", "max_pool3d": "maxpool",
    "max_pool2d_with_indices": "maxpool", "max_pool3d_with_indices": "maxpool",
    "max_pool1d_with_indices": "maxpool",
    "avg_pool1d": "avgpool", "avg_pool2d": "avgpool", "avg_pool3d": "avgpool",
    "adaptive_avg_pool1d": "avgpool", "adaptive_avg_pool2d": "avgpool",
    "adaptive_avg_pool3d": "avgpool", "_adaptive_avg_pool2d": "avgpool",
    "adaptive_max_pool1d": "maxpool", "adaptive_max_pool2d": "maxpool",
    "adaptive_max_pool3d": "maxpool",
    "upsample_nearest1d": "upsample", "upsample_nearest2d": "upsample",
    "upsample_nearest3d": "upsample", "upsample_bilinear2d": "upsample_linear",
    "upsample_linear1d": "upsample_linear", "upsample_trilinear3d": "upsample_linear",
    "upsample_bicubic2d": "upsample_linear", "_upsample_nearest_exact2d": "upsample",
    "pixel_shuffle": "shuffle", "pixel_unshuffle": "shuffle",
}


@op(*POOL_OPS)
def _pool(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    tag = POOL_OPS[name]
    x = args[0]
    shapes = _shapes(node)
    tuple_out = isinstance(node.meta.get("val"), (tuple, list))
    if isinstance(x, Raw):
        r = Raw(x.holder, shapes[0], x.chain)
        return TupleOut([r, Const(shapes[-1])]) if tuple_out else r
    if not isinstance(x, Act) or x.param is not None:
        return _unary(w, x, tag, shapes[0])
    if tag == "shuffle" or any(x.ids.shape[d] > 1 for d in range(2, x.ndim)):
        raise UnsupportedOperationError(_path(node), name, "mixes the channel axis")
    out = x.replace(shape=shapes[0], chain=x.chain + (tag if tag != "upsample" else
                                                        "avgpool",))
    return TupleOut([out, Const(shapes[-1])]) if tuple_out else out


# ---------------------------------------------------------------------------------------------
# parameterised layers
# ---------------------------------------------------------------------------------------------


def _flat_src(ids: Tensor, path: str, what: str) -> tuple[Tensor, tuple[int, ...],
                                                           tuple[int, ...], int]:
    """Source nodes of a dense layer's input features: ``(src, view_tail, perm_tail, s)``
    where a flattened ``(C, S)`` or ``(S, C)`` input gives ``C`` sources, ``S`` positions."""
    n = ids.numel()
    if bool((ids < 0).any()):
        raise UnsupportedModuleError(path, what, "some input features carry no neuron "
                                     "(padding)")
    u = torch.unique(ids)
    if u.numel() == n:
        return ids, (n,), (1,), 1
    c = u.numel()
    if n % c == 0:
        s = n // c
        major = ids.view(c, s)
        if bool((major == major[:, :1]).all()):
            return major[:, 0], (c, s), (1, 2), s
        minor = ids.view(s, c)
        if bool((minor == minor[:1]).all()):
            return minor[0], (s, c), (2, 1), s
    raise UnsupportedModuleError(path, what, "its input features repeat neurons in an order "
                                 "that is neither channel-major nor channel-minor")


def _dense(w: Walker, node: fx.Node, x: Any, wt: Any, bias: Any, out_features: int,
           in_features: int, w_layout: str, kind: str = "linear", edge_type: str = "linear"
           ) -> Act:
    """``y = x W^T + b`` for any dense weight (``w_layout``: ``"oi"`` for ``(out, in)``,
    ``"io"`` for ``(in, out)`` as in ``x @ W``)."""
    ctx = w.ctx
    path = _path(node)
    shape = _shape(node)
    x = ctx.resolve(x, in_features, path, -1, kind)
    key, full = w.weight(wt, path, partial=True)
    if full is not None and full.numel() < ctx.state[key].numel():
        return _dense_piece(w, node, x, wt, bias, key, full, out_features, in_features,
                            w_layout)
    src_ids = x.along(-1, path, kind)
    src, vt, pt, s = _flat_src(src_ids, path, kind)
    c = src.numel()
    o = out_features
    if w_layout == "oi":  # (out, in) -> (out, c[, s])
        view, perm = (o,) + vt, (0,) + pt
    else:  # (in, out), as in x @ W or HF Conv1D -> (out, c[, s])
        view, perm = vt + (o,), (len(vt),) + tuple(p - 1 for p in pt)
    index = None
    if full is not None:  # a reshaped or transposed parameter: gather
        pid = full.t() if w_layout == "io" else full
        index = pid.reshape(o, in_features).reshape((o,) + vt).permute((0,) + pt).reshape(-1)
    depth = x.depth + 1
    mod = path.split(" (")[0]
    sid = ctx.new_set(o, "linear", mod if mod != "<model>" else key.rsplit(".", 1)[0], depth)
    out = ctx.sets[sid].nodes
    cshape = (o, c) + ((s,) if s > 1 else ())
    if index is None:
        ctx.add_edge_param(key, out, src, edge_type, depth, mod, view, perm, dst_sets=[sid],
                           src_sets=ctx.sets_of(src))
    else:
        ctx.add_edge_param(key, out, src, edge_type, depth, mod, cshape, index=index,
                           dst_sets=[sid], src_sets=ctx.sets_of(src))
    if bias is not None:
        bkey, bfull = w.weight(bias, path, "bias")
        if bfull is not None:
            raise UnsupportedOperationError(path, "a permuted bias")
        ctx.add_node_param(bkey, out, 0, mod, depth, sets=[sid])
    ctx.add_use(x, Use("param", x.chain, key))
    return ctx.new_act(sid, shape, -1, depth)


def _dense_piece(w: Walker, node: fx.Node, x: Act, wt: Act, bias: Any, key: str, full: Tensor,
                 o: int, i: int, w_layout: str) -> Act:
    """A dense layer using rows of a packed weight (``in_proj_weight.chunk(3)``): the piece's
    neurons are created now; the record is written once every row of the weight is used."""
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    src = x.along(-1, path, "linear")
    if bool((src < 0).any()) or torch.unique(src).numel() != src.numel():
        raise UnsupportedOperationError(path, f"a partial use of '{key}'",
                                        "on flattened or padded features")
    pid = full.t() if w_layout == "io" else full
    pid = pid.reshape(o, i)
    depth = x.depth + 1
    sid = ctx.new_set(o, "linear", mod, depth)
    out = ctx.sets[sid].nodes
    pend = w.pending.setdefault(key, [])
    bpiece = None
    if bias is not None:
        bkey, bfull = w.weight(bias, path, "bias", partial=True)
        bpiece = (bkey, bfull.reshape(-1) if bfull is not None else torch.arange(o))
    pend.append((pid, out, src, sid, bpiece, depth, mod))
    total = ctx.state[key].numel()
    if sum(p[0].numel() for p in pend) == total:
        pend.sort(key=lambda p: int(p[0].min()))
        srcs = [p[2] for p in pend]
        if any(not torch.equal(srcs[0], s_) for s_ in srcs[1:]):
            raise UnsupportedOperationError(
                path, f"rows of '{key}' applied to different inputs",
                "a packed weight whose pieces read different neurons (cross-attention with "
                "kdim == vdim == embed_dim) cannot become one set of edges")
        index = torch.cat([p[0] for p in pend]).reshape(-1)
        dst = torch.cat([p[1] for p in pend])
        sets = [p[3] for p in pend]
        ctx.add_edge_param(key, dst, srcs[0], "linear", max(p[5] for p in pend), mod,
                           (dst.numel(), srcs[0].numel()),
                           index=None if torch.equal(index, torch.arange(total)) else index,
                           dst_sets=sets, src_sets=ctx.sets_of(srcs[0]))
        if all(p[4] is not None for p in pend):
            bkeys = {p[4][0] for p in pend}
            bidx = torch.cat([p[4][1] for p in pend])
            if len(bkeys) != 1 or not torch.equal(bidx, torch.arange(bidx.numel())):
                raise UnsupportedOperationError(path, f"the bias pieces of '{key}'")
            ctx.add_node_param(bkeys.pop(), dst, 0, mod, max(p[5] for p in pend), sets=sets)
        del w.pending[key]
    ctx.add_use(x, Use("param", x.chain, key))
    return ctx.new_act(sid, _shape(node), -1, depth)


@op("linear", weights=True)
def _linear(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, wt = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias")
    if not _is_param(wt):
        raise UnsupportedOperationError(_path(node), "linear with a computed weight")
    o, i = wt.shape
    return _dense(w, node, x, wt, b, o, i, "oi")


@op("addmm", weights=True)
def _addmm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    b, x, wt = args[0], args[1], args[2]
    if not _is_param(wt):
        raise UnsupportedOperationError(_path(node), "addmm with a computed weight")
    i, o = wt.shape
    return _dense(w, node, x, wt, b, o, i, "io")


@op("matmul", "mm", "bmm", weights=True)
def _matmul(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    a, b = args[0], args[1]
    path = _path(node)
    if _is_param(b) and len(b.shape) == 2 and not _is_param(a):
        i, o = b.shape
        return _dense(w, node, a, b, None, o, i, "io")
    if _is_neuron(a) and _is_neuron(b):
        # q @ k^T: contraction over the last axis of q and axis -2 of k^T
        k = L.transpose(b, -1, -2)
        return Scores(a, k, _shape(node))
    if isinstance(a, Scores) and _is_neuron(b):
        return _attention(w, node, a.q, a.k, b, a.head_dependent)
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(_shape(node))
    if isinstance(a, Raw) or isinstance(b, Raw):
        if not (_is_neuron(a) or _is_neuron(b) or _is_param(a) or _is_param(b)):
            r = a if isinstance(a, Raw) else b
            return Raw(r.holder, _shape(node))
    raise UnsupportedOperationError(path, "matmul", "of this combination of operands")


def _head_nodes(x: Act, path: str) -> Tensor:
    """``(*lead, E)`` nodes of an attention operand ``(*lead, L, E)`` (constant along L)."""
    if x.ids.dim() < 2:
        raise UnsupportedOperationError(path, "attention", "operands need a sequence axis")
    if x.ids.shape[-2] > 1:
        raise UnsupportedOperationError(path, "attention", "neurons vary along the sequence")
    ids = x.ids.select(-2, 0)
    return ids.expand(*ids.shape[:-1], x.shape[-1])


def _attention(w: Walker, node: fx.Node, q: Act, k: Act, v: Act, dependent: bool) -> Act:
    ctx = w.ctx
    path = _path(node)
    shape = _shape(node)
    qn, kn, vn = _head_nodes(q, path), _head_nodes(k, path), _head_nodes(v, path)
    lead = torch.broadcast_shapes(qn.shape[:-1], kn.shape[:-1], vn.shape[:-1])
    qn = qn.expand(*lead, qn.shape[-1]).reshape(-1, qn.shape[-1])
    kn = kn.expand(*lead, kn.shape[-1]).reshape(-1, kn.shape[-1])
    vn = vn.expand(*lead, vn.shape[-1]).reshape(-1, vn.shape[-1])
    if qn.shape[-1] != kn.shape[-1]:
        raise UnsupportedOperationError(path, "attention", "query and key widths differ")
    for t in (qn, kn, vn):
        if bool((t < 0).any()):
            raise UnsupportedOperationError(path, "attention", "padded head features")
    ctx.tie_nodes(qn, kn)
    trip = torch.cat([qn, kn, vn], 1)
    uniq = torch.unique(trip, dim=0)
    e = qn.shape[-1]
    hq, hk, hv = uniq[:, :e], uniq[:, e:2 * e], uniq[:, 2 * e:]
    cells = []
    for part in (hq, hk, hv):
        for row in part:
            ctx.cell(row, "head")
            cells.append(len(ctx.cells) - 1)
    heads = hq.shape[0]
    if heads > 1 and not dependent:
        ctx.heads.append(dict(H=heads, q=list(hq), k=list(hk), v=list(hv), cells=set(cells)))
    for h in range(heads):
        for part in (hq, hk, hv):
            ctx.head_of_node[int(part[h][0])] = (part[h], torch.full_like(part[h], h))
    ctx.add_struct_edges(uniq[:, :e].reshape(-1), uniq[:, e:2 * e].reshape(-1), 1.0,
                         "attn_qk", max(q.depth, k.depth))
    for a in (q, k, v):
        ctx.add_use(a, Use("other", a.chain, path))
    # output: v's neurons at every query position
    nd = len(shape)
    vids = v.ids.select(-2, 0).unsqueeze(-2)
    vids = vids.reshape((1,) * (nd - vids.dim()) + tuple(vids.shape))
    mat = tuple(vids.shape[d] > 1 for d in range(nd))
    return Act(vids, mat, shape, v.depth)


@op("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", weights=True)
def _sdpa(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    q, k, v = args[0], args[1], args[2]
    mask = _arg(args, kwargs, 3, "attn_mask")
    if kwargs.get("enable_gqa"):
        raise UnsupportedOperationError(_path(node), "grouped-query attention")
    for x in (q, k, v):
        if not _is_neuron(x):
            raise UnsupportedOperationError(_path(node), "attention",
                                            "q, k and v must come from layers")
    dependent = False
    if _is_neuron(mask):
        raise UnsupportedOperationError(_path(node), "attention with a neuron mask")
    if _is_param(mask):
        w.ctx.add_extra(mask.param, _path(node))
        dependent = True
    if isinstance(mask, Const):
        lead = q.ids.shape[:-2]
        msh = (1,) * (len(q.shape) - len(mask.shape)) + tuple(mask.shape)
        dependent = any(lead[d] > 1 and msh[d] > 1 for d in range(len(lead)))
    out = _attention(w, node, q, k, v, dependent)
    if isinstance(node.meta.get("val"), (tuple, list)):
        return TupleOut([out] + [Const(s) for s in _shapes(node)[1:]])
    return out


@op("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "_convolution", weights=True)
def _conv(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    x, wt = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias")
    if name in ("convolution", "_convolution"):
        transposed = bool(args[6])
        groups = int(args[8])
    elif name.startswith("conv_transpose"):
        transposed = True
        groups = int(_arg(args, kwargs, 6, "groups", 1))
    else:
        transposed = False
        groups = int(_arg(args, kwargs, 6, "groups", 1))
    if not _is_param(wt):
        raise UnsupportedOperationError(path, name, "the weight is computed")
    wshape = wt.shape
    if transposed:
        cin, opg = wshape[0], wshape[1]
        cout = opg * groups
    else:
        cout, ipg = wshape[0], wshape[1]
        cin = ipg * groups
    x = ctx.resolve(x, cin, path, 1, name)
    src = x.along(1, path, name)
    if bool((src < 0).any()):
        raise UnsupportedModuleError(path, name, "some input channels carry no neuron")
    key, full = w.weight(wt, path)
    k = tuple(wshape[2:])
    cshape = (cout, cin // groups) + k
    view, perm, index = tuple(wshape), tuple(range(len(wshape))), None
    if transposed and groups == 1 and full is None:  # (in, out, *k) -> (out, in, *k)
        perm = (1, 0) + perm[2:]
    elif transposed or full is not None:  # a gather into (out, in_per_group, *k)
        pid = full if full is not None else torch.arange(ctx.state[key].numel()).view(wshape)
        if transposed:
            ipg = cin // groups
            pid = pid.view(groups, ipg, opg, *k).transpose(1, 2)
        index = pid.reshape(-1)
        view, perm = cshape, tuple(range(len(cshape)))
    depth = x.depth + 1
    sid = ctx.new_set(cout, "conv", mod, depth)
    out = ctx.sets[sid].nodes
    ctx.add_edge_param(key, out, src, "conv", depth, mod, view, perm, groups=groups,
                       dst_sets=[sid], src_sets=ctx.sets_of(src), index=index)
    if b is not None:
        bkey, bfull = w.weight(b, path, "bias")
        ctx.add_node_param(bkey, out, 0, mod, depth, sets=[sid])
    ctx.add_use(x, Use("param", x.chain, key))
    y = ctx.new_act(sid, _shape(node), 1, depth)
    if groups > 1:
        if groups == cin == cout:
            ctx.tie_nodes(src, out)
        else:
            ctx.fix_nodes(src)
            ctx.fix_nodes(out)
    return y


def _norm(w: Walker, node: fx.Node, x: Act, dim: int, weight: Any, bias: Any,
          stats: tuple[Any, Any] | None, extra: Any = None, groups: int = 1,
          kind: str = "norm") -> Act:
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    src = x.along(dim, path, kind)
    if bool((src < 0).any()):
        raise UnsupportedModuleError(path, kind, "some features carry no neuron")
    n = src.numel()
    depth = x.depth + 1
    sid = ctx.new_set(n, "norm", mod, depth)
    dst = ctx.sets[sid].nodes
    ctx.tie_nodes(src, dst)
    if weight is not None:
        key, full = w.weight(weight, path)
        if full is not None:
            raise UnsupportedOperationError(path, "a permuted norm weight")
        ctx.add_diag_param(key, dst, src, depth, mod, [sid], ctx.sets_of(src))
    else:
        ctx.add_struct_edges(src, dst, 1.0, "norm", depth)
    if bias is not None:
        bkey, _ = w.weight(bias, path, "bias")
        ctx.add_node_param(bkey, dst, 0, mod, depth, sets=[sid])
    if stats is not None:
        for col, s in ((1, stats[0]), (2, stats[1])):
            if _is_param(s):
                ctx.add_node_param(s.param, dst, col, mod, depth, sets=[sid])
        prefix = stats[0].param.rsplit(".", 1)[0] if _is_param(stats[0]) else None
        if prefix is not None and f"{prefix}.num_batches_tracked" in ctx.state:
            ctx.add_extra(f"{prefix}.num_batches_tracked", mod)
    if 1 < groups < n:
        for g in range(groups):
            ctx.cell(src.view(groups, -1)[g], "group")
    ctx.add_use(x, Use("other", x.chain, path))
    return ctx.new_act(sid, _shape(node), dim, depth)


def _channel_input(w: Walker, x: Any, size: int, path: str, dim: int) -> Act:
    return w.ctx.resolve(x, size, path, dim, "norm")


@op("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
    "_native_batch_norm_legit", "instance_norm", "cudnn_batch_norm", weights=True)
def _batch_norm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, wt, b, rm, rv = args[0], args[1], args[2], args[3], args[4]
    c = None
    for t in (wt, b, rm, rv):
        if _is_param(t):
            c = t.shape[0]
    if c is None:
        c = (x.shape if isinstance(x, (Act, Raw)) else ())[1]
    x = _channel_input(w, x, c, _path(node), 1)
    stats = (rm, rv) if (_is_param(rm) or _is_param(rv)) else None
    out = _norm(w, node, x, 1, wt, b, stats)
    if isinstance(node.meta.get("val"), (tuple, list)):  # native_* variants return stats too
        return TupleOut([out] + [Const(s) for s in _shapes(node)[1:]])
    return out


@op("layer_norm", "rms_norm", "native_layer_norm", weights=True)
def _layer_norm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    x, ns = args[0], list(args[1])
    wt = _arg(args, kwargs, 2, "weight")
    b = _arg(args, kwargs, 3, "bias") if name != "rms_norm" else None
    path = _path(node)
    if not isinstance(x, (Act, Raw)):
        raise UnsupportedOperationError(path, name, "of a value without neurons")
    shape = x.shape
    nd = len(shape)
    ndims = list(range(nd - len(ns), nd))
    if len(ns) != 1:
        if isinstance(x, Act) and any(x.ids.shape[d] > 1 for d in ndims[:-1]):
            raise UnsupportedOperationError(path, name, "normalises several neuron axes")
        if wt is not None or b is not None:
            raise UnsupportedOperationError(path, name, "over several axes with an affine "
                                            "weight")
        return _unary(w, x, "norm", _shape(node))
    x = _channel_input(w, x, ns[0], path, -1)
    out = _norm(w, node, x, -1, wt, b, None)
    if name == "native_layer_norm":
        return TupleOut([out] + [Const(s) for s in _shapes(node)[1:]])
    return out


@op("group_norm", "native_group_norm", weights=True)
def _group_norm(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    x, g = args[0], int(args[1])
    wt, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    c = x.shape[1]
    x = _channel_input(w, x, c, _path(node), 1)
    return _norm(w, node, x, 1, wt, b, None, groups=g)


@op("embedding", weights=True)
def _embedding(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    ctx = w.ctx
    wt, idx = args[0], args[1]
    path = _path(node)
    mod = path.split(" (")[0]
    key, full = w.weight(wt, path)
    if full is not None:
        raise UnsupportedOperationError(path, "embedding with a reshaped table")
    v, d = wt.shape
    if isinstance(idx, Raw):
        h = idx.holder
        if h.set_id is None:
            h.set_id = ctx.new_set(v, "input", h.name, 0, permutable=False)
            ctx.input_sets.append(h.set_id)
        elif ctx.sets[h.set_id].size != v:
            raise UnsupportedOperationError(path, "embedding", f"input '{h.name}' indexes "
                                            "tables of different sizes")
        tok = ctx.sets[h.set_id].nodes
    elif isinstance(idx, Const):
        sid = ctx.new_set(v, "input", f"{key}.indices", 0, permutable=False)
        tok = ctx.sets[sid].nodes
    else:
        raise UnsupportedOperationError(path, "embedding", "its indices are computed from "
                                        "neurons")
    sid = ctx.new_set(d, "embedding", mod, 1)
    ctx.add_edge_param(key, ctx.sets[sid].nodes, tok, "embedding", 1, mod, (v, d), (1, 0),
                       dst_sets=[sid], src_sets=ctx.sets_of(tok))
    return ctx.new_act(sid, _shape(node), -1, 1)


# ---------------------------------------------------------------------------------------------
# recurrent layers
# ---------------------------------------------------------------------------------------------

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@op("lstm", "gru", "rnn_tanh", "rnn_relu", weights=True)
def _rnn(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """LSTM/GRU/RNN: per layer and direction, a gate set (``gates x H`` neurons: rows of
    ``weight_ih``/``weight_hh``, biases in columns 0 and 1) and a hidden set of ``H`` neurons
    (struct edges gate -> hidden). A hidden unit's gate rows and recurrence move together."""
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    x, _, params, has_b, layers, _, _, bidir, _ = args[:9]
    gates = _GATES[name]
    ndir = 2 if bidir else 1
    per = 4 if has_b else 2
    params = list(params)
    if len(params) != layers * ndir * per:
        raise UnsupportedOperationError(path, name, "projections (proj_size) are not supported")
    shapes = _shapes(node)
    out_shape = shapes[0]
    h = params[1].shape[1]
    cur: Act | None = None
    inp = x
    depth = x.depth if isinstance(x, Act) else 0
    hidden_sets: list[list[int]] = []
    for layer in range(layers):
        in_size = params[layer * ndir * per].shape[1]
        if layer == 0:
            xa = ctx.resolve(inp, in_size, path, -1, name)
            src = xa.along(-1, path, name)
            ctx.add_use(xa, Use("param", xa.chain, params[0].param or ""))
        else:
            assert cur is not None
            src = cur.ids.reshape(-1)
        hs = []
        for d in range(ndir):
            base = (layer * ndir + d) * per
            w_ih, w_hh = params[base], params[base + 1]
            dep = depth + 1 + layer
            tag = f"{mod}.l{layer}{'_reverse' if d else ''}"
            gid = ctx.new_set(gates * h, "recurrent", f"{tag}.gates", dep)
            hid = ctx.new_set(h, "recurrent", tag, dep)
            gn, hn = ctx.sets[gid].nodes, ctx.sets[hid].nodes
            k_ih, f_ih = w.weight(w_ih, path)
            k_hh, f_hh = w.weight(w_hh, path)
            if f_ih is not None or f_hh is not None:
                raise UnsupportedOperationError(path, name, "reshaped recurrent weights")
            ctx.add_edge_param(k_ih, gn, src, "linear", dep, mod, dst_sets=[gid],
                               src_sets=ctx.sets_of(src))
            ctx.add_edge_param(k_hh, gn, hn, "recurrent", dep, mod, dst_sets=[gid],
                               src_sets=[hid])
            if has_b:
                for col, bp in ((0, params[base + 2]), (1, params[base + 3])):
                    bk, _ = w.weight(bp, path, "bias")
                    ctx.add_node_param(bk, gn, col, mod, dep, sets=[gid])
            gv = gn.view(gates, h)
            for g in range(gates):
                ctx.cell(gv[g], "gate")
                ctx.tie_nodes(gv[g], hn)
                ctx.add_struct_edges(gv[g], hn, 1.0, "recurrent", dep)
            hs.append(hn)
            hidden_sets.append([hid])
            ctx.uses.setdefault(hid, []).append(Use("other", (), path))
        allh = torch.cat(hs)
        cur = Act(allh, (True,), (allh.numel(),), depth + 1 + layer)
    assert cur is not None
    # outputs: (B, T, D*H) and final states (L*D, B, H)
    nd = len(out_shape)
    ids = cur.ids.view((1,) * (nd - 1) + (-1,))
    out = Act(ids, (False,) * (nd - 1) + (True,), out_shape, cur.depth)
    states = []
    allh = torch.stack([ctx.sets[s[0]].nodes for s in hidden_sets])  # (L*D, H)
    for shp in shapes[1:]:
        states.append(Act(allh.view(allh.shape[0], 1, allh.shape[1]), (True, False, True),
                          shp, cur.depth))
    return TupleOut([out] + states)


# ---------------------------------------------------------------------------------------------
# no-ops on values
# ---------------------------------------------------------------------------------------------


@op("_assert_async", "_assert_scalar", "sym_constrain_range_for_size", "_local_scalar_dense",
    "item", "sym_size", "_functional_assert_async", "_assert_tensor_metadata", "size",
    "dim", "sym_numel", "is_nonzero", "_assert_tensor_metadata")
def _noop(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return None
