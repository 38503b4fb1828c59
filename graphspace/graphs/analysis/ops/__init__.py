"""Per-ATen-op rules of the walk: the op table (`table`), the walker, and one module per
family of ops. Importing this package registers every built-in rule."""

from graphspace.graphs.analysis.ops import (  # noqa: F401  (register the rules)
    attention,
    elementwise,
    layers,
    recurrent,
    reduce,
    shape,
)
from graphspace.graphs.analysis.ops.table import OPS, WEIGHT_OPS, ParamRef, clean_path, op
from graphspace.graphs.analysis.ops.walker import Walker

__all__ = ["OPS", "WEIGHT_OPS", "ParamRef", "Walker", "clean_path", "op"]
