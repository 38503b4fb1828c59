r"""Weight matching: permutation coordinate descent (Ainsworth et al. 2023, "Git Re-Basin", alg. 2).

Model B is permuted towards model A by maximising the inner product of their weights over
all valid permutations :math:`\pi = (\pi_P)_P`,

.. math::
    \max_\pi \; \sum_\ell \langle W^A_\ell,\; \pi(W^B)_\ell \rangle_F .

Holding every permutation but :math:`\pi_P` fixed, this is a linear assignment problem
:math:`\max_{\pi_P} \sum_i C^P_{i\pi_P(i)}` with

.. math::
    C^P_{ij} = \sum_{(\ell, \text{axis}) \ni P} \big\langle W^A_\ell[i]_{\text{axis}},\;
               \tilde W^B_\ell[j]_{\text{axis}} \big\rangle ,

the sum running over every slot of :class:`~graphspace.merge.spec.AlignmentSpec` (weights whose
rows or columns are :math:`P`'s neurons, biases, norm parameters; conv kernels and flattened
spatial positions are part of the inner product), :math:`\tilde W^B` being B permuted by the
current permutations along its other axes. Groups are visited in a random order; the descent
stops after the first full pass that improves nothing. Attention groups sharing a head
permutation are solved together with :func:`~graphspace.merge.assignment.head_block_assignment`.
Matrix products run on the GPU when one is available; the assignments on the CPU.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from graphspace.graphs import apply_permutation
from graphspace.merge._utils import resolve_device, state_of, with_state
from graphspace.merge.assignment import LapSolver, head_block_assignment, linear_assignment
from graphspace.merge.spec import AlignmentSpec


@dataclass
class MatchResult:
    """Permutations aligning B to A (``perms[name][j]``: B's neuron placed at position ``j``).

    ``passes`` counts full passes over all groups (the last one improved nothing);
    ``objective`` is :math:`\\langle \\theta_A, \\pi(\\theta_B) \\rangle` after each pass.
    """

    perms: dict[str, Tensor]
    passes: int = 0
    objective: list[float] = field(default_factory=list)
    converged: bool = True


def _spec(model: Any, spec: AlignmentSpec | None) -> AlignmentSpec:
    if spec is not None:
        return spec
    if not isinstance(model, nn.Module):
        raise TypeError("pass modules, or state dicts together with spec=AlignmentSpec(model)")
    return AlignmentSpec(model)


def group_cost(spec: AlignmentSpec, gi: int, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
               node_map: Tensor) -> Tensor:
    """:math:`C^P` for group ``gi``: ``a``, ``b`` are canonical entries
    (:meth:`AlignmentSpec.canonical`), ``node_map`` the current permutation of B."""
    n = spec.groups[gi].size
    cost = torch.zeros(n, n, dtype=next(iter(a.values())).dtype, device=node_map.device)
    cache: dict[tuple[str, int], Tensor] = {}
    for s in spec.slots[gi]:
        ca = a[s.key]
        ck = (s.key, s.axis)
        if ck not in cache:  # B permuted along its *other* axis by the current permutations
            cb = b[s.key]
            other = spec.positions(s.key, 1 - s.axis, node_map) if cb.dim() > 1 else None
            if other is not None:
                cb = cb.index_select(1 - s.axis, other)
            cache[ck] = cb
        cb = cache[ck]
        idx = s.index.to(node_map.device)
        if s.axis == 0:
            xa = ca.index_select(0, idx).reshape(n, -1)
            xb = cb.index_select(0, idx).reshape(n, -1)
        else:
            xa = ca.index_select(1, idx).transpose(0, 1).reshape(n, -1)
            xb = cb.index_select(1, idx).transpose(0, 1).reshape(n, -1)
        cost += xa @ xb.T
    return cost


def solve_unit(spec: AlignmentSpec, unit: list[int], costs: list[np.ndarray],
               backend: str | LapSolver = "auto") -> list[np.ndarray]:
    """Assignments for one matching unit (a group, or the groups sharing attention heads)."""
    g0 = spec.groups[unit[0]]
    if g0.num_heads > 1:
        return head_block_assignment(costs, g0.num_heads, backend)
    return [linear_assignment(c, backend) for c in costs]


@dataclass
class _SlotState:
    """One slot laid out as ``[n, other, rest]``: row ``k`` belongs to the group's ``k``-th
    neuron, ``other`` runs over the entry's other axis (1 for vectors), ``rest`` over kernel
    positions. ``pos`` are the other-axis positions of B already folded into the group's cost
    (``None``: the other axis is not permuted)."""

    key: str
    axis: int
    xa: Tensor
    xb: Tensor
    pos: Tensor | None = None


def _slot_view(c: Tensor, axis: int, index: Tensor, n: int) -> Tensor:
    """``c`` (canonical) restricted to ``index`` along ``axis``, as a contiguous ``[n, o, r]``."""
    if not (index.numel() == c.shape[axis]
            and bool((index == torch.arange(index.numel(), device=index.device)).all())):
        c = c.index_select(axis, index)
    if axis == 1:
        c = c.transpose(0, 1)
    o = c.shape[1] if c.dim() > 1 else 1
    return c.reshape(n, o, -1).contiguous()


def _is_identity(pos: Tensor) -> bool:
    return bool((pos == torch.arange(pos.numel(), device=pos.device)).all())


class _IncrementalCosts:
    r"""The cost matrices :math:`C^P` of :func:`group_cost`, kept up to date incrementally.

    :math:`C^P` depends on the other groups only through the other-axis permutation of each
    slot. When that permutation moved the entries at positions :math:`D` (old positions
    :math:`p`, new :math:`p'`), the slot's contribution changes by

    .. math::
        \Delta C^P = X^A_{:, D} \big(X^B_{:, p'_D} - X^B_{:, p_D}\big)^\top ,

    one matrix product over :math:`|D|` instead of all columns. The first request of a group
    computes it in full; later requests only add such updates, so a group whose neighbours
    moved few neurons costs little, and one whose neighbours did not move at all costs
    nothing (:attr:`dirty` tells whether the matrix changed since the group was last solved).
    Products run in ``dtype``; the matrices accumulate in float64.
    """

    def __init__(self, spec: AlignmentSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
                 dtype: torch.dtype) -> None:
        self.spec = spec
        self.dtype = dtype
        self.slots: list[list[_SlotState]] = []
        for gi, slots in enumerate(spec.slots):
            n = spec.groups[gi].size
            states = []
            for s in slots:
                idx = s.index.to(a[s.key].device)
                states.append(_SlotState(s.key, s.axis, _slot_view(a[s.key], s.axis, idx, n),
                                         _slot_view(b[s.key], s.axis, idx, n)))
            self.slots.append(states)
        self.cost: list[Tensor | None] = [None] * len(spec.groups)
        self.dirty = [True] * len(spec.groups)

    def _other(self, st: _SlotState, node_map: Tensor) -> Tensor | None:
        return self.spec.positions(st.key, 1 - st.axis, node_map)

    def get(self, gi: int, node_map: Tensor) -> Tensor:
        """:math:`C^P` of group ``gi`` (float64) under the permutations ``node_map``."""
        n = self.spec.groups[gi].size
        cost = self.cost[gi]
        acc = torch.zeros(n, n, dtype=self.dtype, device=node_map.device) if cost is None \
            else None
        touched = False
        for st in self.slots[gi]:
            pos = self._other(st, node_map)
            if cost is None:  # full product
                xb = st.xb if pos is None or _is_identity(pos) else st.xb.index_select(1, pos)
                acc.addmm_(st.xa.reshape(n, -1), xb.reshape(n, -1).T)
                touched = True
            elif pos is not None:
                assert st.pos is not None
                moved = (pos != st.pos).nonzero().squeeze(1)
                if moved.numel():
                    if acc is None:
                        acc = torch.zeros(n, n, dtype=self.dtype, device=node_map.device)
                    xa = st.xa if moved.numel() == pos.numel() else st.xa.index_select(1, moved)
                    dxb = st.xb.index_select(1, pos[moved]) - st.xb.index_select(1,
                                                                                 st.pos[moved])
                    acc.addmm_(xa.reshape(n, -1), dxb.reshape(n, -1).T)
                    touched = True
            st.pos = pos
        if cost is None:
            assert acc is not None
            cost = self.cost[gi] = acc.to(torch.float64)
        elif acc is not None:
            cost += acc
        self.dirty[gi] = self.dirty[gi] or touched
        return cost


def weight_matching(
    model_a: nn.Module | Mapping[str, Tensor],
    model_b: nn.Module | Mapping[str, Tensor],
    *,
    spec: AlignmentSpec | None = None,
    max_passes: int = 100,
    seed: int = 0,
    init: Mapping[str, Tensor] | None = None,
    backend: str | LapSolver = "auto",
    device: str | torch.device | None = "auto",
    dtype: torch.dtype = torch.float32,
    tol: float = 1e-7,
) -> MatchResult:
    """Find permutations of B's hidden neurons that bring B's weights closest to A's.

    The cost matrices are maintained incrementally (see :class:`_IncrementalCosts`): after the
    first pass, a group only pays for the neurons its neighbouring groups moved since it was
    last solved, and a group whose cost did not change is not solved again (the solver would
    return the same permutation).

    Args:
        model_a: reference model (or its state dict, with ``spec``).
        model_b: model to align (or its state dict).
        spec: the architecture's :class:`AlignmentSpec` (built from ``model_a`` if omitted).
        max_passes: upper bound on passes over all groups (default 100).
        seed: seed of the random group order.
        init: starting permutations (identity by default); used to warm-start repeated calls.
        backend: linear-assignment backend (see :func:`~graphspace.merge.linear_assignment`).
        device: where the cost matrices are computed (``"auto"``: CUDA when available).
        dtype: precision of the matrix products (the costs accumulate in float64).
        tol: a pass counts as an improvement when a group's objective grows by more than
            ``tol`` times its magnitude.

    Returns:
        :class:`MatchResult`; apply it with :func:`align_state` or
        :func:`graphspace.graphs.apply_permutation`. ``objective`` starts from the exact
        inner product under ``init`` and adds each accepted assignment's gain.
    """
    spec = _spec(model_a, spec)
    sa, sb = state_of(model_a), state_of(model_b)
    spec.check(sa, "model A")
    spec.check(sb, "model B")
    dev = resolve_device(device)
    a = spec.canonical(sa, dev, dtype)
    b = spec.canonical(sb, dev, dtype)
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    if init is not None:
        perms.update({k: torch.as_tensor(v, dtype=torch.long).cpu() for k, v in init.items()})
    node_map = spec.node_map(perms, dev)
    costs = _IncrementalCosts(spec, a, b, dtype)
    value = _objective(spec, a, b, node_map)
    del a, b  # the slot layouts hold what matching needs
    rng = random.Random(seed)
    units = list(spec.units)
    history: list[float] = []
    passes = 0
    converged = not units
    for _ in range(max_passes):
        passes += 1
        rng.shuffle(units)
        improved = False
        for unit in units:
            mats = [costs.get(gi, node_map) for gi in unit]
            if not any(costs.dirty[gi] for gi in unit):
                continue  # same costs as at its last solve: same permutation, no gain
            cs = [m.cpu().numpy() for m in mats]
            new = solve_unit(spec, unit, cs, backend)
            for gi in unit:
                costs.dirty[gi] = False
            old = [perms[spec.groups[gi].name].numpy() for gi in unit]
            rows = np.arange(cs[0].shape[0])
            old_v = sum(c[rows, p].sum() for c, p in zip(cs, old))
            new_v = sum(c[rows, p].sum() for c, p in zip(cs, new))
            if new_v - old_v > tol * max(abs(old_v), abs(new_v), 1e-30):
                improved = True
                value += float(new_v - old_v)
                for gi, p in zip(unit, new):
                    g = spec.groups[gi]
                    perms[g.name] = torch.from_numpy(p)
                    pd = perms[g.name].to(dev)
                    for m in g.members:
                        md = m.to(dev)
                        node_map[md] = md[pd]
        history.append(value)
        if not improved:
            converged = True
            break
    return MatchResult(perms=perms, passes=passes, objective=history, converged=converged)


def _objective(spec: AlignmentSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
               node_map: Tensor) -> float:
    total = 0.0
    for key in spec.matched:
        cb = b[key]
        for axis in (0, 1):
            if axis < cb.dim():
                pos = spec.positions(key, axis, node_map)
                if pos is not None and not _is_identity(pos):
                    cb = cb.index_select(axis, pos)
        total += float((a[key] * cb).sum(dtype=torch.float64))
    return total


def align_state(model_or_spec: nn.Module | AlignmentSpec, state: Mapping[str, Tensor],
                perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with its neurons permuted by ``perms`` (a new dict)."""
    spec = model_or_spec if isinstance(model_or_spec, AlignmentSpec) else \
        AlignmentSpec(model_or_spec)
    cpu = {k: v.detach() for k, v in state.items()}
    return apply_permutation(spec.analysis, cpu, {k: torch.as_tensor(v).cpu()
                                                   for k, v in perms.items()})


def permuted_copy(model: nn.Module, perms: Mapping[str, Tensor],
                  spec: AlignmentSpec | None = None) -> nn.Module:
    """A copy of ``model`` with its neurons permuted by ``perms`` (``model`` is untouched)."""
    spec = spec or AlignmentSpec(model)
    return with_state(model, align_state(spec, state_of(model), perms))
