"""The walker: applies the op table to every call of the exported graph."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

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
from graphspace.graphs.analysis.ops.table import (
    OPS,
    WEIGHT_OPS,
    ParamRef,
    _flatten_vals,
    _is_neuron,
    _is_param,
    _op_name,
    _path,
    _shape,
    _shapes,
)
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedOperationError


class Walker:
    """Walks an exported graph, applying `OPS` to every call."""

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
        """`ref` as a value: ids are the parameter's flat indices."""
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

        With `partial`, a use of part of the parameter (`in_proj_weight.chunk(3)`) is
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
            name = _op_name(node)
            fn = OPS.get(name)
            if name not in WEIGHT_OPS:
                args, kwargs = self._as_values((args, kwargs))
            if fn is None:
                out = self.unknown(node, name, args, kwargs)
            else:
                out = fn(self, node, args, kwargs)
            if target._schema.is_mutable and node.args and isinstance(node.args[0], fx.Node):
                # an in-place op (relu_, add_): later uses of its input see the new value
                self.env[node.args[0]] = out
        else:
            args, kwargs = self._as_values((args, kwargs))
            out = self.unknown(node, getattr(target, "__name__", str(target)), args, kwargs)
        self.env[node] = out
        if _is_neuron(out):
            self._producer(node, out)

    def _as_values(self, x: Any) -> Any:
        """`x` with every `ParamRef` turned into its `Act`."""
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
            # sets are ranges of node ids: where each of the set's nodes sits in ``ids``
            start, size = int(self.ctx.sets[s].nodes[0]), self.ctx.sets[s].size
            where = torch.nonzero((ids >= start) & (ids < start + size)).view(-1)
            if where.numel() != size:
                continue  # part of the set only, or a node repeated
            pos = torch.full((size,), -1, dtype=torch.long)
            pos[ids[where] - start] = where
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
        """A new neuron per distinct tuple of nodes in `parts` (broadcast ids), with struct
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
