r"""Solving the collected constraints into proved permutation groups.

Nodes tied by the walk form *classes* (they must move together). Every neuron set is split into
*atoms* by the cells that a permutation must map onto themselves, and every fixed node is an
atom of its own. Two classes can be exchanged when they meet the same atoms, each exactly once:
their nodes then sit at interchangeable positions of every constraint. A group is a maximal
family of such classes; a class that meets an atom twice, or contains a fixed node, is fixed.
Attention heads (cells recorded at `scaled_dot_product_attention` or `softmax(q k^T) v`)
may in addition move as whole blocks when no other constraint tells heads apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from graphspace.graphs.analysis.records import PermutationGroup

_RNG = np.random.default_rng(12345)
_K_SET = np.uint64(0x9E3779B97F4A7C15)
_K_NODE = np.uint64(0xC2B2AE3D27D4EB4F)


def _rand64(n: int) -> np.ndarray:
    return _RNG.integers(1, np.iinfo(np.int64).max, size=n, dtype=np.int64).astype(np.uint64)


def solve_groups(ctx: Any) -> tuple[list[PermutationGroup], np.ndarray]:
    """Permutation groups of the analysed model and the per-node fixed mask."""
    n = ctx.num_nodes
    if n == 0:
        return [], np.zeros(0, dtype=bool)
    node_set = torch.cat(ctx._node_set).numpy() if ctx._node_set else np.zeros(0, np.int64)
    fixed = np.zeros(n, dtype=bool)
    for f in ctx.fixed:
        fixed[f.numpy()] = True
    for s in ctx.input_sets + ctx.output_sets:
        fixed[ctx.sets[s].nodes.numpy()] = True
    # classes: connected components of the tie graph
    if ctx.tie_pairs:
        a = np.concatenate([p[0].numpy() for p in ctx.tie_pairs])
        b = np.concatenate([p[1].numpy() for p in ctx.tie_pairs])
        m = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
        _, cls = connected_components(m, directed=False)
    else:
        cls = np.arange(n)
    # cell signature of every node (xor of random 64-bit keys of the cells holding it)
    cell_hash = np.zeros(n, dtype=np.uint64)
    if ctx.cells:
        keys = _rand64(len(ctx.cells))
        for k, (nodes, _) in enumerate(ctx.cells):
            cell_hash[nodes.numpy()] ^= keys[k]
    for _ in range(8):
        # a class holding a fixed node is fixed
        bad_cls = np.unique(cls[fixed])
        fixed |= np.isin(cls, bad_cls)
        # atoms: (set, cells, node if fixed)
        # one 64-bit key per (set, cells, node if fixed): random odd multipliers make a
        # collision of two different atoms a 2**-64 event
        with np.errstate(over="ignore"):
            atom_key = (node_set.astype(np.uint64) * _K_SET) ^ cell_hash ^ np.where(
                fixed, (np.arange(n, dtype=np.uint64) + np.uint64(1)) * _K_NODE, np.uint64(0))
        _, atom = np.unique(atom_key, return_inverse=True)
        # number atoms in the order of their first node (deterministic member order)
        first_node = np.full(int(atom.max()) + 1, n, dtype=np.int64)
        np.minimum.at(first_node, atom, np.arange(n))
        rank = np.empty_like(first_node)
        rank[np.argsort(first_node, kind="stable")] = np.arange(first_node.size)
        atom = rank[atom]
        atom = atom.reshape(-1)
        # a class meeting an atom twice is fixed
        free = ~fixed
        pair = cls[free].astype(np.int64) * (atom.max() + 1) + atom[free]
        _, cnt = np.unique(pair, return_counts=True)
        if (cnt > 1).any():
            dup = np.unique(pair)[cnt > 1] // (atom.max() + 1)
            newly = np.isin(cls, dup) & ~fixed
            if newly.any():
                fixed |= newly
                continue
        break
    free = np.flatnonzero(~fixed)
    if free.size == 0:
        return [], fixed
    akeys = _rand64(int(atom.max()) + 1)
    sig = np.zeros(int(cls.max()) + 1, dtype=np.uint64)
    np.bitwise_xor.at(sig, cls[free], akeys[atom[free]])
    size = np.bincount(cls[free], minlength=sig.size)
    first = np.full(sig.size, n, dtype=np.int64)
    np.minimum.at(first, cls[free], free)
    # order free nodes by (class signature, atom, first node of the class)
    order = np.lexsort((first[cls[free]], atom[free], size[cls[free]], sig[cls[free]]))
    nodes = free[order]
    g_sig, g_size = sig[cls[nodes]], size[cls[nodes]]
    groups: list[PermutationGroup] = []
    start = 0
    total = nodes.size
    while start < total:
        end = start + 1
        while end < total and g_sig[end] == g_sig[start] and g_size[end] == g_size[start]:
            end += 1
        block = nodes[start:end]
        k = int(g_size[start])  # atoms per class
        m = block.size // k
        if m > 1 and block.size == k * m:
            members = [torch.from_numpy(block[j * m:(j + 1) * m].copy()) for j in range(k)]
            if all(np.unique(atom[mm.numpy()]).size == 1 for mm in members):
                sets = [int(node_set[int(mm[0])]) for mm in members]
                groups.append(PermutationGroup(name=ctx.sets[sets[0]].name, size=m, sets=sets,
                                        members=members))
        start = end
    groups = _merge_heads(ctx, groups)
    groups.sort(key=lambda g: int(g.members[0].min()))
    seen: dict[str, int] = {}
    for g in groups:  # names are keys of permutation dicts: make them unique
        k = seen.get(g.name, -1) + 1
        seen[g.name] = k
        if k:
            g.name = f"{g.name}#{k}"
    return groups, fixed


def _merge_heads(ctx: Any, groups: list[PermutationGroup]) -> list[PermutationGroup]:
    """Let heads of one attention move as blocks when nothing tells them apart."""
    if not ctx.heads:
        return groups
    by_node: dict[int, int] = {}
    for i, g in enumerate(groups):
        for mm in g.members:
            by_node[int(mm[0])] = i
    node_cells: dict[int, list[int]] = {}
    for ci, (nodes, _) in enumerate(ctx.cells):
        node_cells.setdefault(int(nodes[0]), []).append(ci)
    remove: set[int] = set()
    added: list[PermutationGroup] = []
    for hg, spec in enumerate(ctx.heads):
        if spec.get("dependent"):
            continue
        merged = []
        ok = True
        for roles in (("q", "k"), ("v",)):
            per_head = []
            for h in range(spec["H"]):
                want = [spec[r][h] for r in roles]
                gi = by_node.get(int(want[0][0]))
                if gi is None:
                    ok = False
                    break
                g = groups[gi]
                have = sorted(tuple(sorted(mm.tolist())) for mm in g.members)
                if have != sorted(tuple(sorted(w.tolist())) for w in want):
                    ok = False
                    break
                # members ordered by role
                mem = []
                for w in want:
                    s = set(w.tolist())
                    mem.append(next(mm for mm in g.members if int(mm[0]) in s))
                per_head.append((gi, mem))
            if not ok:
                break
            merged.append(per_head)
        if not ok or not _heads_indistinguishable(ctx, spec):
            continue
        for per_head in merged:
            gis = [gi for gi, _ in per_head]
            if len(set(gis)) != len(gis):
                ok = False
        if not ok:
            continue
        for per_head in merged:
            k = len(per_head[0][1])
            members = [torch.cat([mem[j] for _, mem in per_head]) for j in range(k)]
            g0 = groups[per_head[0][0]]
            added.append(PermutationGroup(name=g0.name, size=int(members[0].numel()),
                                   sets=g0.sets, members=members, num_heads=spec["H"],
                                   head_group=hg))
            remove.update(gi for gi, _ in per_head)
    return [g for i, g in enumerate(groups) if i not in remove] + added


def _heads_indistinguishable(ctx: Any, spec: dict) -> bool:
    """Every cell that meets the heads' nodes holds all heads of a role or none."""
    role_nodes = {r: set(torch.cat(list(spec[r])).tolist()) for r in ("q", "k", "v")}
    head_cells = spec["cells"]
    for ci, (nodes, _) in enumerate(ctx.cells):
        if ci in head_cells:
            continue
        s = set(nodes.tolist())
        for rn in role_nodes.values():
            inter = len(s & rn)
            if inter and inter != len(rn):
                return False
    return True
