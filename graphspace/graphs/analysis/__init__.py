r"""One analysis of a PyTorch model, shared by parameter graphs, merging and augmentation.

[`analyze`][graphspace.graphs.analysis.analyze] exports the model with `torch.export` (non-strict,
eval mode, fake tensors) and walks the ATen graph once. Every value that carries neurons is an `Act`
whose node ids follow the value through every layout operation; rules per ATen op
(`ops`) record each state-dict entry
([`ParamRecord`][graphspace.graphs.analysis.ParamRecord]) and the constraints that permutations of
hidden neurons must meet. `solve` turns those constraints into the permutation groups
the model provably has. From this one pass we read off

* the nodes and edges of the parameter graph (`graphspace.graphs.parameter_graph`),
* the permutation symmetry groups (`graphspace.graphs.symmetry`), used by model merging
  and weight-space augmentation,
* the per-neuron rescaling / sign-flip symmetries of positively homogeneous and odd activations.

Package layout: `vocab` (stored vocabularies), `records` (what is recorded), `context`
(values and the rule API), `layout` (ids through views), `ops` (the op table), `solve`
(groups from constraints), `walk` (export, the walk, the cache).
"""

from graphspace.graphs.analysis.context import (
    Act,
    AnalysisContext,
    Const,
    Opaque,
    Raw,
    Scores,
    TupleOut,
    register_rule,
)
from graphspace.graphs.analysis.ops import OPS, op
from graphspace.graphs.analysis.records import (
    ModelAnalysis,
    NeuronSet,
    ParamRecord,
    PermutationGroup,
    StructEdges,
    Use,
)
from graphspace.graphs.analysis.vocab import (
    ACTIVATION,
    ACTIVATIONS,
    EDGE_TYPE,
    EDGE_TYPES,
    NODE_TYPE,
    NODE_TYPES,
    ODD,
    POSITIVE_HOMOGENEOUS,
)
from graphspace.graphs.analysis.walk import analyze, infer_example_input

#: register a rule for an ATen op (by its packet name, e.g. ``"my_op"``)
register_op = op

__all__ = [
    "ACTIVATION", "ACTIVATIONS", "Act", "AnalysisContext", "Const", "EDGE_TYPE", "EDGE_TYPES",
    "PermutationGroup", "ModelAnalysis", "NODE_TYPE", "NODE_TYPES", "NeuronSet", "ODD", "OPS",
    "Opaque", "POSITIVE_HOMOGENEOUS", "ParamRecord", "Raw", "Scores", "StructEdges",
    "TupleOut", "Use", "analyze", "infer_example_input", "register_op", "register_rule",
]
