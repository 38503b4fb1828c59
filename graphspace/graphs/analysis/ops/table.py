"""The op table: how rules are registered, and helpers that every rule uses."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import Tensor

from graphspace.graphs.analysis.context import Act, TupleOut

if TYPE_CHECKING:
    from graphspace.graphs.analysis.ops.walker import Walker

OpFn = Callable[["Walker", fx.Node, tuple, dict], Any]
OPS: dict[str, OpFn] = {}
#: ops whose rules read parameters as weights (they receive :class:`ParamRef` as is)
WEIGHT_OPS: set[str] = set()


def op(*names: str, weights: bool = False) -> Callable[[OpFn], OpFn]:
    """Register a rule for the ATen ops `names` (packet names). With `weights`, parameter
    arguments arrive as `ParamRef` (read them with `Walker.weight`); otherwise as
    an `Act` whose ids are the parameter's flat indices."""

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
    It becomes an `Act` of flat indices only when an op uses it as a value."""

    param: str
    shape: tuple[int, ...]



def _op_name(node: fx.Node) -> str:
    """The op's packet name; an in-place variant (`silu_`) is named after its functional op
    when only that has a rule."""
    name = node.target._overloadpacket.__name__  # type: ignore[union-attr]
    if name not in OPS and name.endswith("_") and name[:-1] in OPS:
        return name[:-1]
    return name


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



def clean_path(path: str) -> str:
    """A module path of `nn_module_stack` as in `named_modules()` (`layers.0.fc`)."""
    p = path.replace("L['self'].", "").replace("L['self']", "")
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    p = re.sub(r"\['([^']+)'\]", r".\1", p)
    return p.lstrip(".")


def _path(node: fx.Node) -> str:
    """Where `node` sits in the model, for error messages: `module.path (node name)`."""
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



def _prod(xs: Any) -> int:
    p = 1
    for v in xs:
        p *= int(v)
    return p
