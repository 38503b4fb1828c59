"""Elementwise ops: activations, constants, and binary ops between neurons, constants and
parameters (layer scales, free biases, position embeddings)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphspace.graphs.analysis import layout as L
from graphspace.graphs.analysis.context import (
    Act,
    Const,
    Opaque,
    Raw,
    Scores,
    TupleOut,
)
from graphspace.graphs.analysis.ops.table import (
    _is_neuron,
    _is_param,
    _op_name,
    _path,
    _prod,
    _shape,
    _shapes,
    op,
)
from graphspace.graphs.analysis.ops.walker import Walker
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedOperationError

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
    name = _op_name(node)
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
    name = _op_name(node)
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
    """`x * gamma` (layer scale), `x + b` (a free bias), `x + pos_embed`."""
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



@op("add", "sub", "mul", "div", "rsub", "true_divide", "maximum", "minimum", "fmod",
    "remainder", "atan2", "hypot", "floor_divide", "eq", "ne", "lt", "gt", "le", "ge",
    "logical_and", "logical_or", "bitwise_and", "bitwise_or", "mul_", "add_")
def _binary_op(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    name = _op_name(node)
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
# no-ops on values
# ---------------------------------------------------------------------------------------------


@op("_assert_async", "_assert_scalar", "sym_constrain_range_for_size", "_local_scalar_dense",
    "item", "sym_size", "_functional_assert_async", "_assert_tensor_metadata", "size",
    "dim", "sym_numel", "is_nonzero", "_assert_tensor_metadata")
def _noop(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    return None
