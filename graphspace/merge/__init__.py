"""Model merging: Git Re-Basin alignment, OT fusion, repair and interpolation curves.

The permutation structure comes from the shared model analysis
([`graphspace.graphs.permutation_groups`][graphspace.graphs.permutation_groups]), so every
architecture the analysis supports can be aligned without a hand-written specification.

* [`merge`][graphspace.merge.merge] -- align all models to the first (`weight_matching`,
  `activation_matching`, `ste`), fuse them (`ot_fusion`) or average them naively (`average`), then
  optionally repair (`bn_reset`, `repair`);
* [`weight_matching`][graphspace.merge.weight_matching],
  [`activation_matching`][graphspace.merge.activation_matching],
  [`STEMatching`][graphspace.merge.ste.STEMatching] /
  [`ste_matching`][graphspace.merge.ste.ste_matching] (Ainsworth et al. 2023),
  [`ot_fusion`][graphspace.merge.ot_fusion] (Singh & Jaggi 2020);
* [`reset_bn_stats`][graphspace.merge.reset_bn_stats], [`repair`][graphspace.merge.repair] (Jordan
  et al. 2022);
* [`interpolation_curve`][graphspace.merge.interpolation_curve],
  [`loss_barrier`][graphspace.merge.loss_barrier], [`plot_curves`][graphspace.merge.plot_curves].
"""

from typing import Any

from graphspace.merge.activation_matching import activation_matching
from graphspace.merge.activations import ActivationTap, SetStatistics, activation_statistics
from graphspace.merge.api import METHODS, align, merge
from graphspace.merge.assignment import (
    available_backends,
    head_block_assignment,
    linear_assignment,
    register_lap_backend,
)
from graphspace.merge.interpolation import (
    InterpolationCurve,
    evaluate,
    interpolate_state,
    interpolation_curve,
    loss_barrier,
    plot_curves,
)
from graphspace.merge.ot_fusion import FusionResult, UnsupportedFusionError, ot_fusion
from graphspace.merge.repair import repair, repairable_sets, reset_bn_stats
from graphspace.merge.spec import AlignmentSpec, invert
from graphspace.merge.weight_matching import (
    MatchResult,
    align_state,
    permuted_copy,
    weight_matching,
)

_LAZY = {
    "STEMatching": "graphspace.merge.ste",
    "ste_matching": "graphspace.merge.ste",
    "DigitsDataModule": "graphspace.merge.digits",
    "MergeEvaluation": "graphspace.merge.task",
    "train_classifier": "graphspace.merge.digits",
}


def __getattr__(name: str) -> Any:  # Lightning-based parts are imported on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphspace.merge' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "ActivationTap",
    "AlignmentSpec",
    "DigitsDataModule",
    "MergeEvaluation",
    "FusionResult",
    "InterpolationCurve",
    "MatchResult",
    "STEMatching",
    "SetStatistics",
    "UnsupportedFusionError",
    "activation_matching",
    "activation_statistics",
    "align",
    "align_state",
    "available_backends",
    "evaluate",
    "head_block_assignment",
    "interpolate_state",
    "interpolation_curve",
    "invert",
    "linear_assignment",
    "loss_barrier",
    "merge",
    "ot_fusion",
    "permuted_copy",
    "plot_curves",
    "register_lap_backend",
    "repair",
    "repairable_sets",
    "reset_bn_stats",
    "ste_matching",
    "train_classifier",
    "weight_matching",
]
