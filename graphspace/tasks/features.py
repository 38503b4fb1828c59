r"""Hand-crafted weight features for the baselines of generalization prediction.

* **StatNN** (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights"): for
  every weight and bias tensor, its mean, variance and the 0/25/50/75/100 % quantiles.
* **Weight norms** (a layer-norm / "layer rotation"-style baseline, cf. Jiang et al. 2020
  "Fantastic Generalization Measures"): per tensor $\log \|W\|_F$, plus the log of the
  product of weight norms (a path-norm proxy).
* **Flat weights**: all parameters concatenated (fixed-architecture zoos only).

Tensors are taken in state-dict order and zero-padded / truncated to `max_tensors`, so zoos of
different architectures give vectors of one size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_QUANTILES = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
STAT_FEATURES = 7


def _param_tensors(state_dict: dict[str, Tensor]) -> list[Tensor]:
    keys = [k for k, v in state_dict.items() if v.is_floating_point()
            and not k.endswith(("running_mean", "running_var"))]
    return [state_dict[k].detach().double().reshape(-1) for k in keys]


def statnn_features(state_dict: dict[str, Tensor], max_tensors: int = 16) -> Tensor:
    """`[max_tensors * 7]` StatNN features (mean, var, 5 quantiles per tensor)."""
    out = torch.zeros(max_tensors, STAT_FEATURES, dtype=torch.float64)
    for i, t in enumerate(_param_tensors(state_dict)[:max_tensors]):
        q = torch.quantile(t, _QUANTILES.to(t.dtype)) if t.numel() > 0 else torch.zeros(5)
        var = t.var(unbiased=False) if t.numel() > 1 else torch.zeros((), dtype=t.dtype)
        out[i, 0], out[i, 1], out[i, 2:] = t.mean(), var, q
    return out.reshape(-1).float()


def norm_features(state_dict: dict[str, Tensor], max_tensors: int = 16) -> Tensor:
    """`[max_tensors + 1]`: per-tensor log Frobenius norms and the log norm product."""
    out = torch.zeros(max_tensors + 1, dtype=torch.float64)
    logs = [torch.log(t.norm() + 1e-12) for t in _param_tensors(state_dict)]
    for i, v in enumerate(logs[:max_tensors]):
        out[i] = v
    out[-1] = sum(logs) if logs else 0.0
    return out.float()


def flat_features(state_dict: dict[str, Tensor]) -> Tensor:
    """All floating-point parameters concatenated (running statistics excluded)."""
    return torch.cat(_param_tensors(state_dict)).float()


class AttachWeightFeatures:
    """Transform for [`ParameterGraph`][graphspace.graphs.ParameterGraph]: attaches `stats`
    (StatNN), `norms` and optionally `flat` as `[1, F]` tensors so they batch to `[B, F]`."""

    def __init__(self, max_tensors: int = 16, flat: bool = False) -> None:
        self.max_tensors = max_tensors
        self.flat = flat

    def __call__(self, graph: Any) -> Any:
        sd = graph.to_state_dict()
        graph.stats = statnn_features(sd, self.max_tensors).unsqueeze(0)
        graph.norms = norm_features(sd, self.max_tensors).unsqueeze(0)
        if self.flat:
            graph.flat = flat_features(sd).unsqueeze(0)
        return graph

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(max_tensors={self.max_tensors}, flat={self.flat})"
