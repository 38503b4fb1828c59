r"""The permutation structure that matching needs, derived from the shared model analysis.

[`AlignmentSpec`][graphspace.merge.spec.AlignmentSpec] reads
[`graphspace.graphs.permutation_groups`][graphspace.graphs.permutation_groups] and the parameter
records of [`graphspace.graphs.analyze`][graphspace.graphs.analyze] and lists, for every permutation
group $P$, each axis of each state-dict entry that $P$ indexes (a *slot*): the rows of a weight
whose output neurons are in $P$, the columns of a weight consuming $P$ (also after a
flatten: the canonical layout `(out, in_per_group, *spatial)` keeps the channel axis), biases,
norm scales and shifts. Nothing is written per architecture: a residual stream, a BatchNorm or
an attention projection is whatever the analysis tied together.

Slots are index vectors into the canonical layout: `index[k]` is the row (or column) of the
group's `k`-th neuron in one member set. A record may hold several member sets of a group
(e.g. the `Q` and `K` rows of a packed `in_proj_weight`); each is its own slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from graphspace.graphs import (
    ModelAnalysis,
    ParamRecord,
    PermutationGroup,
    analyze,
    check_state_dict,
    permutation_groups,
)


@dataclass
class Slot:
    """Axis `axis` (0 rows / vector entries, 1 columns) of entry `key` at `index`."""

    key: str
    axis: int
    index: Tensor


def node_lookup(nodes: Tensor, num_nodes: int) -> Tensor:
    """`inv[v]`: the position of node `v` in `nodes` (-1 where absent)."""
    inv = torch.full((num_nodes,), -1, dtype=torch.long)
    inv[nodes] = torch.arange(nodes.numel())
    return inv


class AlignmentSpec:
    """Permutation groups of an architecture and the state-dict axes each one indexes.

    Args:
        model: a module or a `ModelAnalysis`.
        example_input: optional input used by the analysis to check shapes.
        include_buffers: also use BatchNorm running statistics in matching costs (they are
            permuted either way).
    """

    def __init__(self, model: nn.Module | ModelAnalysis, example_input: Any = None,
                 include_buffers: bool = False) -> None:
        self.analysis = model if isinstance(model, ModelAnalysis) else analyze(model,
                                                                               example_input)
        a = self.analysis
        self.groups: list[PermutationGroup] = permutation_groups(a)
        self.index = {g.name: i for i, g in enumerate(self.groups)}
        self.records: dict[str, ParamRecord] = {r.key: r for r in a.records}
        n = a.num_nodes
        # bookkeeping in NumPy: hundreds of tiny index operations, each far cheaper than in torch
        node_group = np.full(n, -1, dtype=np.int64)
        member_of = np.full(n, -1, dtype=np.int64)  # global member id of every grouped node
        members: list[tuple[int, np.ndarray]] = []
        for gi, g in enumerate(self.groups):
            for m in g.members:
                mn = m.numpy()
                node_group[mn] = gi
                member_of[mn] = len(members)
                members.append((gi, mn))
        sizes = np.array([m.size for _, m in members], dtype=np.int64)
        self.node_group = torch.from_numpy(node_group)
        self._inv: dict[tuple[str, int], Tensor] = {}
        #: ``(key, axis)`` -> the groups with neurons on that axis (absent: not permuted)
        self.axis_groups: dict[tuple[str, int], tuple[int, ...]] = {}
        self._device_cache: dict[tuple[str, int, torch.device], tuple[Tensor, Tensor]] = {}
        self.slots: list[list[Slot]] = [[] for _ in self.groups]
        self.matched: list[str] = []
        for r in a.records:
            if r.kind in ("extra", "alias") or (r.kind == "node" and r.column != 0
                                                and not include_buffers):
                continue
            self.matched.append(r.key)
            axes = [(0, r.dst if r.kind in ("edge", "diag") else r.nodes)]
            if r.kind == "edge" and r.groups == 1:
                axes.append((1, r.src))
            for axis, nodes in axes:
                assert nodes is not None
                nn_ = nodes.numpy()
                inv = np.full(n, -1, dtype=np.int64)
                inv[nn_] = np.arange(nn_.size)
                self._inv[(r.key, axis)] = torch.from_numpy(inv)
                grouped = member_of[nn_] >= 0
                if not grouped.any():
                    continue
                mids = member_of[nn_][grouped]
                self.axis_groups[(r.key, axis)] = tuple(
                    np.unique(node_group[nn_][grouped]).tolist())
                # a member indexes this axis when all of its nodes lie on it
                full = np.flatnonzero(np.bincount(mids, minlength=sizes.size) == sizes)
                for mid in full.tolist():
                    gi, mn = members[mid]
                    self.slots[gi].append(Slot(r.key, axis, torch.from_numpy(inv[mn])))
        # matching units: a group alone, or all groups sharing an attention head permutation
        units: dict[Any, list[int]] = {}
        for gi, g in enumerate(self.groups):
            key = ("heads", g.head_group) if g.num_heads and g.head_group is not None else gi
            units.setdefault(key, []).append(gi)
        self.units: list[list[int]] = list(units.values())

    # ------------------------------------------------------------------------------------------
    def check(self, state: Mapping[str, Tensor], name: str = "model") -> None:
        """Raise `ArchitectureMismatchError` naming the first
        tensor of `state` that does not fit this architecture."""
        from graphspace.graphs import ArchitectureMismatchError

        try:
            check_state_dict(dict(state), self.analysis)
        except ArchitectureMismatchError as e:
            raise ArchitectureMismatchError(f"{name}: {e}") from None

    def canonical(self, state: Mapping[str, Tensor], device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The matched entries of `state` in canonical layout (vectors as `[n, 1]`)."""
        out = {}
        for key in self.matched:
            r = self.records[key]
            t = state[key].detach()
            t = t.to(device=device, dtype=dtype or (t.dtype if t.is_floating_point()
                                                     else torch.float32))
            out[key] = r.to_canonical(t) if r.kind == "edge" else t.reshape(-1, 1)
        return out

    def identity(self) -> dict[str, Tensor]:
        return {g.name: torch.arange(g.size) for g in self.groups}

    def node_map(self, perms: Mapping[str, Tensor], device: torch.device | None = None
                 ) -> Tensor:
        """`node_map[v]`: the (old) node whose values new node `v` takes under `perms`."""
        nm = torch.arange(self.analysis.num_nodes)
        for g in self.groups:
            p = perms.get(g.name)
            if p is None:
                continue
            p = torch.as_tensor(p, dtype=torch.long).cpu()
            for m in g.members:
                nm[m] = m[p]
        return nm.to(device) if device is not None else nm

    def positions(self, key: str, axis: int, node_map: Tensor) -> Tensor | None:
        """Indices that apply `node_map` along `axis` of `key` (`None`: not permuted)."""
        ck = (key, axis, node_map.device)
        cached = self._device_cache.get(ck)
        if cached is None:
            inv = self._inv.get((key, axis))
            if inv is None:
                return None
            r = self.records[key]
            nodes = (r.dst if r.kind in ("edge", "diag") else r.nodes) if axis == 0 else r.src
            assert nodes is not None
            cached = self._device_cache[ck] = (inv.to(node_map.device),
                                               nodes.to(node_map.device))
        inv, nodes = cached
        return inv[node_map[nodes]]


def invert(perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse permutation of every group."""
    return {k: torch.argsort(torch.as_tensor(p)) for k, p in perms.items()}
