"""Module-level rules.

Built-in layers need no module rule: the analysis reads their ATen ops
(`graphspace.graphs.analysis.ops`). A rule registered here with
[`graphspace.graphs.register_rule`][graphspace.graphs.register_rule] replaces the walk of a module's
region of the exported graph, for modules whose ops no op rule covers.
"""

from graphspace.graphs.analysis.context import register_rule

__all__ = ["register_rule"]
