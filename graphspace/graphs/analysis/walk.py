"""Exporting a model with `torch.export` and walking its ATen graph once."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from graphspace.graphs.analysis.context import (
    AnalysisContext,
    Const,
    InputHolder,
    Raw,
    has_rules,
    rule_for,
)
from graphspace.graphs.analysis.ops import ParamRef, Walker, clean_path
from graphspace.graphs.analysis.records import ModelAnalysis, ParamRecord
from graphspace.graphs.analysis.solve import solve_groups
from graphspace.graphs.analysis.vocab import ACTIVATION
from graphspace.graphs.errors import CoverageError, TraceError

_CACHE: OrderedDict[Any, ModelAnalysis] = OrderedDict()
_CACHE_SIZE = 32
#: inferred example inputs per architecture (the shape probe runs once)
_INFERRED: OrderedDict[Any, list[tuple]] = OrderedDict()


def _attr_key(v: Any) -> Any:
    if isinstance(v, (int, float, bool, str, type(None))):
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_attr_key(u) for u in v)
    if isinstance(v, Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    if dataclasses.is_dataclass(v):
        return repr(v)
    if callable(v):
        return getattr(v, "__qualname__", repr(type(v)))
    return type(v).__qualname__


def _arch_key(model: nn.Module, inputs: tuple) -> Any:
    """What decides the analysis of `model`: module types and attributes, state-dict shapes
    and ties, input shapes. Two models with the same key are analysed once."""
    attrs = []
    for name, m in model.named_modules():
        prim = tuple(sorted((k, _attr_key(v)) for k, v in vars(m).items()
                            if not k.startswith("_") and k != "training"))
        attrs.append((name, type(m).__qualname__, type(m).__module__, prim, m.training))
    sd = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    ties = tuple(first.setdefault(id(v), k) for k, v in sd.items())
    state = tuple((k, tuple(v.shape), v.dtype) for k, v in sd.items()) + ties
    ins = tuple((tuple(x.shape), x.dtype) if isinstance(x, Tensor) else repr(x) for x in inputs)
    return (tuple(attrs), state, ins)


def _export(model: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        # export must not draw from the caller's random stream
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return torch.export.export(model, inputs, strict=False)
    finally:
        for m, t in modes.items():
            m.training = t


_SPATIAL = (32, 28, 16, 8, 64, 224, 24, 12, 48, 96) + tuple(range(1, 12))


def infer_example_input(model: nn.Module) -> list[tuple]:
    """Candidate example inputs for a model whose first layer is `Linear`, `Conv*`,
    `Embedding` or a recurrent layer (tried in order by
    [`analyze`][graphspace.graphs.analysis.walk.analyze])."""
    first = next((m for m in model.modules() if isinstance(
        m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.RNNBase, nn.Bilinear))),
        None)
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if isinstance(first, nn.Linear):
        return [(torch.zeros(2, first.in_features, dtype=dt),)]
    if isinstance(first, nn.modules.conv._ConvNd):
        nd = len(first.kernel_size)
        c = first.in_channels
        for s in _SPATIAL:
            if _runs(model, (torch.zeros(1, c, *([s] * nd), dtype=dt),)):
                return [(torch.zeros(2, c, *([s] * nd), dtype=dt),)]
        return [(torch.zeros(2, c, *([_SPATIAL[0]] * nd), dtype=dt),)]
    if isinstance(first, nn.Embedding):
        return [(torch.zeros(2, t, dtype=torch.long),) for t in (8, 4, 1)]
    if isinstance(first, nn.RNNBase):
        shape = (2, 5, first.input_size) if first.batch_first else (5, 2, first.input_size)
        return [(torch.zeros(*shape, dtype=dt),)]
    if not any(True for _ in model.parameters()):
        return [(torch.zeros(2, 1),)]
    return []


def _runs(model: nn.Module, inputs: tuple) -> bool:
    """Whether `model` accepts `inputs`: one forward in eval mode without gradients (the
    modes are restored; in eval mode no built-in layer changes a buffer)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure means: try another shape
        return False
    finally:
        for m, t in modes.items():
            m.training = t


def analyze(model: nn.Module, example_input: Any = None, leaf_modules: Sequence[type] = (),
            *, cache: bool = True) -> ModelAnalysis:
    """Analyse `model`: neuron sets, parameter records and proved symmetries.

    The model is exported with `torch.export.export(model, args, strict=False)` in eval mode
    (its modes are restored, and nothing else of it is touched: export runs on fake tensors)
    and the ATen graph is walked once. Results are cached per architecture and input shape.

    Args:
        model: any module that `torch.export` can trace (it is not modified).
        example_input: an input tensor or a tuple of inputs. Optional when the first layer is
            `Linear`, `Conv*`, `Embedding` or `nn.RNN`/`LSTM`/`GRU` (an input is
            inferred); required otherwise.
        leaf_modules: accepted for backward compatibility and ignored: modules with a rule are
            read as one region of the exported graph.
        cache: reuse the analysis of an identical architecture and input shape.

    Raises:
        TraceError: the model cannot be exported (the message gives export's reason).
        UnsupportedModuleError: an op acts on neurons in a way no rule covers.
        CoverageError: some state-dict entry would not be represented.
    """
    if example_input is None:
        k0 = _arch_key(model, ()) if cache else None
        try:
            candidates = _INFERRED.get(k0) if k0 is not None else None
        except TypeError:  # an attribute that cannot be hashed: no caching
            k0 = candidates = None
        if candidates is None:
            candidates = infer_example_input(model)
            if k0 is not None and candidates:
                _INFERRED[k0] = candidates
                while len(_INFERRED) > _CACHE_SIZE:
                    _INFERRED.popitem(last=False)
        if not candidates:
            raise TraceError(
                f"cannot infer an example input for {type(model).__name__} (its first layer is "
                "not Linear, Conv*, Embedding or a recurrent layer): pass example_input=...")
    else:
        candidates = [example_input if isinstance(example_input, tuple) else (example_input,)]
    last: Exception | None = None
    for inputs in candidates:
        key = None
        if cache:
            try:
                key = _arch_key(model, inputs)
                hash(key)
            except TypeError:
                key = None
        if key is not None and key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        try:
            ep = _export(model, inputs)
        except Exception as e:  # noqa: BLE001 - re-raised with export's reason
            last = e
            continue
        a = _analyze_program(model, ep, inputs)
        a.program = ep
        if key is not None:
            _CACHE[key] = a
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return a
    assert last is not None
    msg = str(last).strip().splitlines()
    reason = msg[0] if msg else type(last).__name__
    what = "on the inferred example input" if example_input is None else ""
    raise TraceError(f"torch.export could not trace {type(model).__name__} {what}: "
                     f"{type(last).__name__}: {reason}".replace("  ", " ")) from last


def _regions(gm: fx.GraphModule, model: nn.Module) -> dict[fx.Node, tuple[str, str]]:
    """Nodes inside a call of a module that has a registered rule: node -> (call key, path)."""
    out: dict[fx.Node, tuple[str, str]] = {}
    if not has_rules():
        return out
    mods = dict(model.named_modules())
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, (path, _) in stack.items():
            p = clean_path(path)
            m = mods.get(p)
            if m is not None and rule_for(m) is not None and type(m).__module__.split(".")[0] \
                    != "torch":
                out[node] = (key, p)
                break
    return out


def _analyze_program(model: nn.Module, ep: torch.export.ExportedProgram, inputs: tuple
                     ) -> ModelAnalysis:
    ctx = AnalysisContext(model)
    sig = ep.graph_signature
    gm = ep.graph_module
    kinds: dict[str, tuple[str, str | None, bool]] = {}
    for spec in sig.input_specs:
        name = spec.arg.name if hasattr(spec.arg, "name") else None
        if name is None:
            continue
        kinds[name] = (spec.kind.name, spec.target, bool(spec.persistent) if
                       spec.persistent is not None else True)
    walker = Walker(ctx, model)
    env = walker.env
    n_user = 0
    regions = _regions(gm, model)
    done_regions: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind, target, persistent = kinds.get(node.name, ("USER_INPUT", None, True))
            val = node.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, Tensor) else ()
            if kind in ("PARAMETER", "BUFFER") and target in ctx.state and persistent:
                env[node] = ParamRef(target, shape)
            elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                env[node] = Const(shape, what=f"the constant '{target}'")
            elif isinstance(val, Tensor):
                env[node] = Raw(InputHolder(node.name, n_user), shape)
                n_user += 1
            else:
                env[node] = None
                n_user += 1
            continue
        if node.op == "output":
            walker.output(node)
            continue
        if node in regions:
            key, path = regions[node]
            if key not in done_regions:
                done_regions.add(key)
                walker.run_region(gm, node, regions, key, path)
            continue
        walker.call(node)
    return _finish(ctx, model, walker, inputs)


def _aliases(model: nn.Module, recorded: set[str]) -> dict[str, str]:
    """State-dict keys that are the same tensor as a recorded key (tied parameters)."""
    state = model.state_dict(keep_vars=True)
    by_id: dict[int, str] = {}
    for k in recorded:
        if k in state:
            by_id[id(state[k])] = k
    out = {}
    for k, v in state.items():
        if k not in recorded and id(v) in by_id:
            out[k] = by_id[id(v)]
    return out


def _finish(ctx: AnalysisContext, model: nn.Module, walker: Walker, inputs: tuple
            ) -> ModelAnalysis:
    recorded = {r.key for r in ctx.records}
    for k, target in _aliases(model, recorded).items():
        t = ctx.state[k]
        ctx.records.append(ParamRecord(key=k, shape=tuple(t.shape), dtype=t.dtype,
                                       kind="alias", module=k.rsplit(".", 1)[0],
                                       tied_to=target))
        first = next(r for r in ctx.records if r.key == target)
        ctx.no_rescale.update(first.dst_sets)
        ctx.no_rescale.update(first.src_sets)
    covered = {r.key for r in ctx.records}
    missing = [k for k in ctx.state if k not in covered]
    if missing:
        raise CoverageError(
            f"{len(missing)} state-dict entries of {type(model).__name__} are not represented "
            f"by the parameter graph (none is ever dropped silently): {missing[:8]}. They belong "
            "to modules that the exported forward never uses through a supported op.")
    groups, fixed = solve_groups(ctx)
    n = ctx.num_nodes
    in_group = torch.zeros(n, dtype=torch.bool)
    for g in groups:
        for mm in g.members:
            in_group[mm] = True
    for s in ctx.sets:
        s.permutable = bool(in_group[s.nodes].any()) if s.size else False
    for g in groups:
        for sid in g.sets:
            ctx.sets[sid].num_heads = max(ctx.sets[sid].num_heads, g.num_heads)
            if g.head_group is not None:
                ctx.sets[sid].head_group = g.head_group
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
    for nodes, heads in ctx.head_of_node.values():
        node_head[nodes] = heads

    def cat(ts: list[Tensor]) -> Tensor:
        return torch.cat(ts) if ts else torch.zeros(0, dtype=torch.long)

    return ModelAnalysis(
        num_nodes=n, sets=ctx.sets, records=ctx.records, struct_edges=ctx.struct_edges,
        node_type=cat(ctx._node_type), node_layer=cat(ctx._node_layer),
        node_set=cat(ctx._node_set), node_role=node_role, node_pos=node_pos,
        node_act=node_act, node_head=node_head, input_sets=ctx.input_sets,
        output_sets=ctx.output_sets, uses=ctx.uses, set_activation=ctx.set_activation,
        state_keys=list(ctx.state.keys()), groups=groups, tied_records=ctx.tied_records,
        no_rescale=set(ctx.no_rescale), producers=walker.producers,
        example_input=inputs,
    )


__all__ = ["analyze", "infer_example_input"]
