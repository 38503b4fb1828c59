"""`merge(models, method=...)`: align every model to the first, average, optionally repair."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from graphspace.graphs import NonFiniteWeightError
from graphspace.graphs.parameter_graph import non_finite_keys
from graphspace.merge._utils import state_of, weighted_average, with_state
from graphspace.merge.spec import AlignmentSpec
from graphspace.merge.weight_matching import MatchResult, align_state

METHODS = ("weight_matching", "activation_matching", "ste", "ot_fusion", "average")
REPAIRS = (None, "none", "bn_reset", "repair")


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    method: str = "weight_matching",
    *,
    loader: Iterable | None = None,
    spec: AlignmentSpec | None = None,
    num_batches: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[nn.Module, MatchResult]:
    """Permute `model_b`'s neurons towards `model_a`; returns `(aligned copy, result)`.

    `method` is `"weight_matching"`, `"activation_matching"` or `"ste"` (the last two
    need `loader`). Extra keyword arguments go to the matching function.
    """
    spec = spec or AlignmentSpec(model_a)
    spec.check(state_of(model_b), "model B")
    if method == "weight_matching":
        from graphspace.merge.weight_matching import weight_matching

        res = weight_matching(model_a, model_b, spec=spec, seed=seed, **kwargs)
    elif method == "activation_matching":
        from graphspace.merge.activation_matching import activation_matching

        _need(loader, method)
        assert loader is not None
        res = activation_matching(model_a, model_b, loader, spec=spec,
                                  num_batches=num_batches, **kwargs)
    elif method == "ste":
        from graphspace.merge.ste import ste_matching

        _need(loader, method)
        assert loader is not None
        res = ste_matching(model_a, model_b, loader, seed=seed, num_batches=num_batches,
                           **kwargs)
    else:
        raise ValueError(f"align() supports weight_matching, activation_matching and ste, "
                         f"not {method!r}")
    aligned = with_state(model_b, align_state(spec, state_of(model_b), res.perms))
    return aligned, res


def _need(loader: Iterable | None, what: str) -> None:
    if loader is None:
        raise ValueError(f"{what} needs data: pass loader=<iterable of batches>")


def merge(
    models: Sequence[nn.Module],
    method: str = "weight_matching",
    *,
    weights: Sequence[float] | None = None,
    loader: Iterable | None = None,
    repair: str | None = None,
    num_batches: int | None = None,
    seed: int = 0,
    allow_nonfinite: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Merge two or more models into a new one (the inputs are never modified).

    Args:
        models: models of one architecture (for `"ot_fusion"` widths may differ; the result
            has the shape of the first model).
        method: `"weight_matching"` (Git Re-Basin weight matching), `"activation_matching"`,
            `"ste"` (straight-through estimator), `"ot_fusion"` (Singh & Jaggi 2020) or
            `"average"` (naive weight averaging, no alignment).
        weights: averaging weights (uniform by default).
        loader: data for activation matching, STE, activation-based OT and repair.
        repair: `None`, `"bn_reset"` (recompute BatchNorm statistics) or `"repair"`
            (REPAIR, Jordan et al. 2022, for networks without BatchNorm).
        num_batches: limit the batches used from `loader`.
        seed: seed of randomised steps (weight-matching group order).
        allow_nonfinite: skip the NaN/Inf check of the inputs (a method that cannot handle
            them, such as weight matching, still refuses them).
        **kwargs: passed to the method (e.g. `max_passes`, `backend`, `solver`, `reg`,
            `marginals`, `cost`, `epochs`, `lr`).

    Returns:
        the merged model.
    """
    if len(models) < 2:
        raise ValueError("merge() needs at least two models")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if repair not in REPAIRS:
        raise ValueError(f"unknown repair {repair!r}; choose None, 'bn_reset' or 'repair'")
    if repair in ("bn_reset", "repair"):
        _need(loader, f"repair={repair!r}")
    for i, m in enumerate(models):  # NaN would spread through averages and OT plans
        if allow_nonfinite:
            break
        bad = non_finite_keys(m.state_dict())
        if bad:
            raise NonFiniteWeightError(f"model {i}: NaN or Inf in {bad[:3]}")
    base = models[0]
    if method == "ot_fusion":
        from graphspace.merge.ot_fusion import ot_fusion

        merged = ot_fusion(models, weights=weights, loader=loader, num_batches=num_batches,
                           **kwargs).model
        endpoints: list[nn.Module] = []
        if repair == "repair":
            raise ValueError("repair='repair' needs aligned endpoints of the target's shape; "
                             "with ot_fusion use repair='bn_reset' or None")
    else:
        spec = AlignmentSpec(base)
        for i, m in enumerate(models[1:], start=1):
            spec.check(state_of(m), f"model {i}")
        endpoints = [base]
        for m in models[1:]:
            if method == "average":
                endpoints.append(m)
            else:
                aligned, _ = align(base, m, method, loader=loader, spec=spec,
                                   num_batches=num_batches, seed=seed, **kwargs)
                endpoints.append(aligned)
        merged = with_state(base, weighted_average([state_of(e) for e in endpoints], weights))
    if repair == "bn_reset":
        from graphspace.merge.repair import reset_bn_stats

        assert loader is not None
        merged = reset_bn_stats(merged, loader, num_batches, inplace=True)
    elif repair == "repair":
        from graphspace.merge.repair import repair as repair_fn

        assert loader is not None
        merged = repair_fn(merged, endpoints, loader, weights, num_batches=num_batches,
                           inplace=True)
    return merged
