"""Errors raised while analysing a model or converting it to a parameter graph."""

from __future__ import annotations


class GraphConversionError(Exception):
    """Base class of every error raised by `graphspace.graphs`."""


class UnsupportedModuleError(GraphConversionError):
    """A module (or functional op) has no rule that can represent it.

    The message names the module's qualified path in the model and its type.
    """

    def __init__(self, path: str, kind: str, reason: str = "") -> None:
        self.path = path
        self.kind = kind
        msg = f"cannot represent {kind} at '{path}' in a parameter graph"
        if reason:
            msg += f": {reason}"
        msg += (
            ". Register a rule with graphspace.graphs.register_rule(<type>) "
            "(see docs/extending.md) or replace the module."
        )
        super().__init__(msg)


class UnsupportedOperationError(UnsupportedModuleError):
    """A call in the traced graph acts on a neuron axis in a way no rule covers."""


class TraceError(GraphConversionError):
    """torch.fx could not trace the model."""


class CoverageError(GraphConversionError):
    """Some state-dict entry is not represented by the graph (never dropped silently)."""


class NonFiniteWeightError(GraphConversionError):
    """The model holds NaN or Inf weights."""


class ArchitectureMismatchError(GraphConversionError):
    """A graph or state dict does not match the target model's architecture."""
