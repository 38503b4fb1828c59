r"""Weight matching: permutation coordinate descent (Ainsworth et al. 2023, "Git Re-Basin", alg. 2).

Model B is permuted towards model A by maximising the inner product of their weights over
all valid permutations $\pi = (\pi_P)_P$,

$$
\max_\pi \; \sum_\ell \langle W^A_\ell,\; \pi(W^B)_\ell \rangle_F .
$$

Holding every permutation but $\pi_P$ fixed, this is a linear assignment problem
$\max_{\pi_P} \sum_i C^P_{i\pi_P(i)}$ with

$$
C^P_{ij} = \sum_{(\ell, \text{axis}) \ni P} \big\langle W^A_\ell[i]_{\text{axis}},\;
           \tilde W^B_\ell[j]_{\text{axis}} \big\rangle ,
$$

the sum running over every slot of [`AlignmentSpec`][graphspace.merge.spec.AlignmentSpec] (weights
whose rows or columns are $P$'s neurons, biases, norm parameters; conv kernels and flattened
spatial positions are part of the inner product), $\tilde W^B$ being B permuted by the
current permutations along its other axes. Groups are visited in a random order; the descent
stops after the first full pass that improves nothing. Attention groups sharing a head
permutation are solved together with
[`head_block_assignment`][graphspace.merge.assignment.head_block_assignment]. Matrix products run on
the GPU when one is available; the assignments on the CPU.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from graphspace.graphs import apply_permutation
from graphspace.merge._utils import resolve_device, state_of, with_state
from graphspace.merge.assignment import LapSolver, head_block_assignment, linear_assignment
from graphspace.merge.spec import AlignmentSpec


class MatchingNotConvergedWarning(UserWarning):
    """Weight matching stopped at `max_passes` while its last pass still improved the
    objective (`MatchResult.converged` is `False`)."""


@dataclass
class MatchResult:
    r"""Permutations aligning B to A (`perms[name][j]`: B's neuron placed at position `j`).

    `passes` counts full passes over all groups (the last one improved nothing);
    `objective` is $\langle \theta_A, \pi(\theta_B) \rangle$ after each pass.
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
    """$C^P$ for group `gi`: `a`, `b` are canonical entries
    ([`AlignmentSpec.canonical`][graphspace.merge.AlignmentSpec.canonical]), `node_map` the
    current permutation of B."""
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


def _is_identity(pos: Tensor) -> bool:
    return bool((pos == torch.arange(pos.numel(), device=pos.device)).all())


def _other_major(c: Tensor, axis: int, index: Tensor, n: int) -> Tensor:
    """`c` (canonical) restricted to `index` along `axis`, as an `[other, rest, n]` view
    (copied only where the restriction needs it): `other` runs over the entry's other axis (1
    for vectors), `rest` over kernel positions, the last axis over the group's neurons."""
    if not (index.numel() == c.shape[axis] and _is_identity(index)):
        c = c.index_select(axis, index)
    if c.dim() == 1:
        c = c.reshape(-1, 1)
    other = c.shape[1 - axis]
    return c.movedim(axis, -1).reshape(other, -1, n)


def _as_matrix(x: Tensor) -> Tensor:
    """`x` (`[other, rest, n]`) itself when it is viewable as `[other * rest, n]`, else a
    contiguous copy (so that every later product and row gather avoids a copy)."""
    try:
        x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.contiguous()
    return x


@dataclass
class _SlotState:
    """One slot whose other axis is permuted, laid out other-axis-major as `[other, rest, n]`
    (`n`: the group's neurons, `rest`: kernel positions), so that the rows a permutation of
    the other axis selects are contiguous blocks and the group's cost is the product
    `X_A^T X_B` over the `other * rest` rows.

    `b` is B's view; `xb` is what the products read: `b` itself, or `b` gathered by the
    other-axis positions of the first full product (`binv[q]`: the row of `xb` holding
    `b[q]`). `pos` are the other-axis positions already folded into the group's cost."""

    key: str
    axis: int
    xa: Tensor
    b: Tensor
    xb: Tensor | None = None
    binv: Tensor | None = None
    pos: Tensor | None = None
    deps: tuple[int, ...] = ()
    seen: int = -1


class _IncrementalCosts:
    r"""The cost matrices $C^P$ of [`group_cost`][graphspace.merge.weight_matching.group_cost], kept
    up to date incrementally.

    $C^P$ depends on the other groups only through the other-axis permutation of each
    slot. When that permutation moved the entries at positions $D$ (old positions
    $p$, new $p'$), the slot's contribution changes by

    $$
    \Delta C^P = X^A_{D}{}^\top \big(X^B_{p'_D} - X^B_{p_D}\big) ,
    $$

    one matrix product over the $|D|$ moved rows of the other-axis-major layout
    (`_SlotState`) instead of all of them. Slots whose other axis no group permutes
    (biases, norm parameters, the input channels of the first layer...) contribute a constant,
    computed once as a single product over all of them. The first request of a group computes
    the full matrix; later requests only add updates, so a group whose neighbours moved few
    neurons costs little, and one whose neighbours did not move at all costs nothing
    (`dirty` tells whether the matrix changed since the group was last solved). Products
    run in `dtype`; the matrices accumulate in float64.
    """

    def __init__(self, spec: AlignmentSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
                 dtype: torch.dtype) -> None:
        self.spec = spec
        self.dtype = dtype
        self.slots: list[list[_SlotState]] = []
        self.static: list[tuple[Tensor, Tensor] | None] = []
        for gi, slots in enumerate(spec.slots):
            n = spec.groups[gi].size
            states, fixed_a, fixed_b = [], [], []
            for s in slots:
                idx = s.index.to(a[s.key].device)
                xa = _other_major(a[s.key], s.axis, idx, n)
                xb = _other_major(b[s.key], s.axis, idx, n)
                deps = spec.axis_groups.get((s.key, 1 - s.axis))
                if deps:
                    states.append(_SlotState(s.key, s.axis, _as_matrix(xa), xb, deps=deps))
                else:
                    fixed_a.append(xa.reshape(-1, n))
                    fixed_b.append(xb.reshape(-1, n))
            self.slots.append(states)
            self.static.append((torch.cat(fixed_a), torch.cat(fixed_b)) if fixed_a else None)
        self.cost: list[Tensor | None] = [None] * len(spec.groups)
        self.dirty = [True] * len(spec.groups)
        self.clock = 0
        self.changed_at = [0] * len(spec.groups)

    def reads(self, unit: list[int]) -> set[int]:
        """The groups whose permutations the costs of `unit`'s groups depend on."""
        return {d for gi in unit for st in self.slots[gi] for d in st.deps}

    def touch(self, gi: int) -> None:
        """Record that group `gi`'s permutation changed (slots depending on it are updated
        at their group's next [`get`][graphspace.data.SmallCNNZoo.get]; the others are skipped
        without any work)."""
        self.clock += 1
        self.changed_at[gi] = self.clock

    def _full(self, st: _SlotState, pos: Tensor, acc: Tensor) -> None:
        """Add the slot's whole contribution under the other-axis positions `pos`."""
        n = acc.shape[0]
        if _is_identity(pos):
            st.xb = _as_matrix(st.b)
        else:  # gathering rows also lays B out contiguously
            st.xb = st.b.index_select(0, pos)
            st.binv = torch.empty_like(pos)
            st.binv[pos] = torch.arange(pos.numel(), device=pos.device)
        acc.addmm_(st.xa.reshape(-1, n).T, st.xb.reshape(-1, n))

    def _update(self, st: _SlotState, moved: Tensor, pos: Tensor, acc: Tensor) -> None:
        """Add the change of the slot's contribution since its positions were `st.pos`
        (`moved`: where `pos` differs from them)."""
        assert st.pos is not None and st.xb is not None
        n = acc.shape[0]
        new, old = pos[moved], st.pos[moved]
        if st.binv is not None:
            new, old = st.binv[new], st.binv[old]
        xa = st.xa if moved.numel() == pos.numel() else st.xa.index_select(0, moved)
        dxb = st.xb.index_select(0, new) - st.xb.index_select(0, old)
        acc.addmm_(xa.reshape(-1, n).T, dxb.reshape(-1, n))

    def get(self, gi: int, node_map: Tensor) -> Tensor:
        """$C^P$ of group `gi` (float64) under the permutations `node_map`."""
        n = self.spec.groups[gi].size
        cost = self.cost[gi]
        if cost is None:  # full products
            acc = torch.zeros(n, n, dtype=self.dtype, device=node_map.device)
            static = self.static[gi]
            if static is not None:
                acc.addmm_(static[0].T, static[1])
            for st in self.slots[gi]:
                pos = self.spec.positions(st.key, 1 - st.axis, node_map)
                assert pos is not None
                self._full(st, pos, acc)
                st.pos, st.seen = pos, self.clock
            self.dirty[gi] = True
            cost = self.cost[gi] = acc.to(torch.float64)
            return cost
        delta = None
        for st in self.slots[gi]:
            if max(self.changed_at[d] for d in st.deps) <= st.seen:
                continue  # no group on its other axis moved since its last update
            st.seen = self.clock
            pos = self.spec.positions(st.key, 1 - st.axis, node_map)
            assert pos is not None and st.pos is not None
            moved = (pos != st.pos).nonzero().squeeze(1)
            if moved.numel():
                if delta is None:
                    delta = torch.zeros(n, n, dtype=self.dtype, device=node_map.device)
                self._update(st, moved, pos, delta)
                st.pos = pos
        if delta is not None:
            cost += delta
            self.dirty[gi] = True
        return cost


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that created it, pool)
#: smallest assignment problem worth a thread (below it thread hand-off costs more than it saves)
PARALLEL_MIN_SIZE = 512


def _independent_runs(units: list[list[int]], reads: Mapping[tuple[int, ...], set[int]],
                      size: int) -> list[list[list[int]]]:
    """Split the pass order into runs of at most `size` consecutive units, none of which
    reads (has costs depending on) a group of an earlier unit of its run: solving a run's
    units together then gives what solving them one after another gives."""
    runs: list[list[list[int]]] = []
    moved: set[int] = set()
    for u in units:
        if runs and len(runs[-1]) < size and not (reads[tuple(u)] & moved):
            runs[-1].append(u)
            moved.update(u)
        else:
            runs.append([u])
            moved = set(u)
    return runs


def _solve_all(spec: AlignmentSpec, todo: list[tuple[list[int], list[np.ndarray]]],
               backend: str | LapSolver) -> list[tuple[list[int], list[np.ndarray],
                                                       list[np.ndarray]]]:
    """Solve the units of one independent run (in threads when there are several)."""
    global _POOL
    if len(todo) < 2 or min(cs[0].shape[0] for _, cs in todo) < PARALLEL_MIN_SIZE:
        return [(u, cs, solve_unit(spec, u, cs, backend)) for u, cs in todo]
    if _POOL is None or _POOL[0] != os.getpid():  # a forked child cannot use its parent's threads
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=4,
                                                 thread_name_prefix="graphspace-lap"))
    pool = _POOL[1]
    futures = [pool.submit(solve_unit, spec, u, cs, backend) for u, cs in todo]
    return [(u, cs, f.result()) for (u, cs), f in zip(todo, futures)]


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
    parallel_solves: int = 2,
) -> MatchResult:
    """Find permutations of B's hidden neurons that bring B's weights closest to A's.

    The cost matrices are maintained incrementally (see `_IncrementalCosts`): after the
    first pass, a group only pays for the neurons its neighbouring groups moved since it was
    last solved, and a group whose cost did not change is not solved again (the solver would
    return the same permutation).

    Args:
        model_a: reference model (or its state dict, with `spec`).
        model_b: model to align (or its state dict).
        spec: the architecture's [`AlignmentSpec`][graphspace.merge.weight_matching.AlignmentSpec]
            (built from `model_a` if omitted).
        max_passes: upper bound on passes over all groups (default 100).
        seed: seed of the random group order.
        init: starting permutations (identity by default); used to warm-start repeated calls.
        backend: linear-assignment backend (see
            [`linear_assignment`][graphspace.merge.linear_assignment]).
        device: where the cost matrices are computed (`"auto"`: CUDA when available).
        dtype: precision of the matrix products (the costs accumulate in float64).
        tol: a pass counts as an improvement when a group's objective grows by more than
            `tol` times its magnitude.
        parallel_solves: how many assignment problems may be solved at once, in threads
            (SciPy's solver releases the GIL). Only runs of consecutive units in the pass
            order whose costs do not depend on each other's permutations are solved together,
            so the result is identical to solving one at a time (`1`); problems smaller than
            `PARALLEL_MIN_SIZE` neurons are always solved in the calling thread.

    Returns:
        [`MatchResult`][graphspace.merge.weight_matching.MatchResult]; apply it with
        [`align_state`][graphspace.merge.weight_matching.align_state] or
        [`graphspace.graphs.apply_permutation`][graphspace.graphs.apply_permutation]. `objective`
        starts from the exact inner product under `init` and adds each accepted assignment's gain.
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
    reads = {tuple(u): costs.reads(u) for u in units}  # groups whose moves change u's costs
    history: list[float] = []
    passes = 0
    converged = not units
    start = value
    for _ in range(max_passes):
        passes += 1
        rng.shuffle(units)
        improved = False
        for batch in _independent_runs(units, reads, max(1, parallel_solves)):
            todo = []
            for unit in batch:
                mats = [costs.get(gi, node_map) for gi in unit]
                if any(costs.dirty[gi] for gi in unit):  # else: same costs, same permutation
                    todo.append((unit, [m.cpu().numpy() for m in mats]))
            for unit, cs, new in _solve_all(spec, todo, backend):
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
                        costs.touch(gi)
                        perms[g.name] = torch.from_numpy(p)
                        pd = perms[g.name].to(dev)
                        for m in g.members:
                            md = m.to(dev)
                            node_map[md] = md[pd]
        history.append(value)
        if not improved:
            converged = True
            break
    if not converged and history:
        last = history[-1] - (history[-2] if len(history) > 1 else start)
        warnings.warn(
            f"weight matching did not converge: {passes} passes (max_passes={max_passes}) and "
            f"the last pass still improved the objective by {last:.6g}; raise max_passes",
            MatchingNotConvergedWarning, stacklevel=2)
    return MatchResult(perms=perms, passes=passes, objective=history, converged=converged)


def _objective(spec: AlignmentSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
               node_map: Tensor) -> float:
    r"""$\langle \theta_A, \pi(\theta_B) \rangle$ over the matched entries: one BLAS dot
    product per entry in the matching `dtype`, summed in float64."""
    total = 0.0
    for key in spec.matched:
        cb = b[key]
        for axis in (0, 1):
            if axis < cb.dim():
                pos = spec.positions(key, axis, node_map)
                if pos is not None and not _is_identity(pos):
                    cb = cb.index_select(axis, pos)
        total += float(torch.dot(a[key].reshape(-1), cb.reshape(-1)))
    return total


def align_state(model_or_spec: nn.Module | AlignmentSpec, state: Mapping[str, Tensor],
                perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` with its neurons permuted by `perms` (a new dict)."""
    spec = model_or_spec if isinstance(model_or_spec, AlignmentSpec) else \
        AlignmentSpec(model_or_spec)
    cpu = {k: v.detach() for k, v in state.items()}
    return apply_permutation(spec.analysis, cpu, {k: torch.as_tensor(v).cpu()
                                                   for k, v in perms.items()})


def permuted_copy(model: nn.Module, perms: Mapping[str, Tensor],
                  spec: AlignmentSpec | None = None) -> nn.Module:
    """A copy of `model` with its neurons permuted by `perms` (`model` is untouched)."""
    spec = spec or AlignmentSpec(model)
    return with_state(model, align_state(spec, state_of(model), perms))
