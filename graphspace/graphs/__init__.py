"""Model <-> parameter graph: one torch.export analysis shared by graphs, merging and
augmentation."""

from graphspace.graphs.analysis import (
    ACTIVATIONS,
    EDGE_TYPES,
    NODE_TYPES,
    AnalysisContext,
    ModelAnalysis,
    NeuronSet,
    ParamRecord,
    analyze,
    infer_example_input,
    register_op,
    register_rule,
)
from graphspace.graphs.errors import (
    ArchitectureMismatchError,
    CoverageError,
    GraphConversionError,
    NonFiniteWeightError,
    TraceError,
    UnsupportedModuleError,
    UnsupportedOperationError,
)
from graphspace.graphs.parameter_graph import GraphSpec, ParameterGraph, check_state_dict
from graphspace.graphs.symmetry import (
    PermutationGroup,
    apply_permutation,
    apply_scaling,
    permutation_groups,
    permute_model,
    random_permutation,
    random_scaling,
    scaling_symmetries,
)

__all__ = [
    "ACTIVATIONS",
    "EDGE_TYPES",
    "NODE_TYPES",
    "AnalysisContext",
    "ArchitectureMismatchError",
    "CoverageError",
    "GraphConversionError",
    "GraphSpec",
    "ModelAnalysis",
    "NeuronSet",
    "NonFiniteWeightError",
    "ParamRecord",
    "ParameterGraph",
    "PermutationGroup",
    "TraceError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
    "analyze",
    "apply_permutation",
    "apply_scaling",
    "check_state_dict",
    "infer_example_input",
    "permutation_groups",
    "permute_model",
    "random_permutation",
    "random_scaling",
    "register_op",
    "register_rule",
    "scaling_symmetries",
]
