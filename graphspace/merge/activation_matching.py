r"""Activation matching (Ainsworth et al. 2023, "Git Re-Basin", sec. 3.1).

For every permutation group $P$, B's neurons are assigned to A's by maximising the
summed cross-correlation of their activations on data,

$$
\pi_P = \arg\max_{\pi} \sum_i \sum_{s \in P}
        \mathrm{corr}\big(a^{(s)}_i,\; b^{(s)}_{\pi(i)}\big),
$$

where $s$ runs over the neuron sets tied in $P$ (a residual stream sums the
correlations of all its members) and activations are taken over every sample, spatial position
and token. Activations do not depend on the permutations of other groups, so each group is one
assignment; groups sharing attention heads use the head-aware block assignment.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from graphspace.merge.activations import ActivationTap, activation_statistics
from graphspace.merge.assignment import LapSolver
from graphspace.merge.spec import AlignmentSpec
from graphspace.merge.weight_matching import MatchResult, solve_unit
from graphspace.runtime import eval_mode


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    *,
    spec: AlignmentSpec | None = None,
    num_batches: int | None = None,
    backend: str | LapSolver = "auto",
    eps: float = 1e-8,
) -> MatchResult:
    """Permutations of B's neurons maximising activation correlation with A.

    Args:
        model_a: reference model.
        model_b: model to align (same architecture).
        loader: iterable of batches (tensors, `(x, y)` pairs or dicts with `"x"`).
        spec: the architecture's
            [`AlignmentSpec`][graphspace.merge.activation_matching.AlignmentSpec] (built if
            omitted).
        num_batches: use only the first `num_batches` batches.
        backend: linear-assignment backend.
        eps: added to the standard deviations in the correlation.

    Models are evaluated in eval mode (their mode is restored afterwards).
    """
    spec = spec or AlignmentSpec(model_a)
    spec.check(model_b.state_dict(), "model B")
    a = spec.analysis
    tap = ActivationTap(model_a, sorted({s for g in spec.groups for s in g.sets}), a,
                        skip_unreadable=True)
    sets = tap.sets  # sets whose activations can be read (RNN gates, e.g., cannot)
    with eval_mode(model_a, model_b):
        stats = activation_statistics(model_a, loader, sets, model_b, num_batches,
                                      analysis=spec.analysis, analysis_b=spec.analysis)
    perms = {}
    for unit in spec.units:
        costs = []
        for gi in unit:
            g = spec.groups[gi]
            c = torch.zeros(g.size, g.size, dtype=torch.float64)
            read = 0
            for s, member in zip(g.sets, g.members):
                if s not in stats:
                    continue
                # the member's neurons within its set (a member may be part of a set, e.g.
                # the q third of a packed projection), in the group's order
                idx = member - a.sets[s].nodes[0]
                c += stats[s].correlation(eps).cpu()[idx][:, idx]
                read += 1
            if not read:
                raise ValueError(f"activation matching: no activations of group {g.name!r} "
                                 "can be read (use weight matching for it)")
            costs.append(c.numpy())
        for gi, p in zip(unit, solve_unit(spec, unit, costs, backend)):
            perms[spec.groups[gi].name] = torch.from_numpy(p)
    return MatchResult(perms=perms, passes=1)
