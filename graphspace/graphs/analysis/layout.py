"""Layout operations applied to the node ids of an `Act`.

Each function takes the value's ids and returns those of the result; the result's shape comes
from the exported graph (`meta["val"]`), so only the *grouping* of dimensions has to be
worked out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from graphspace.graphs.analysis.context import Act


def view_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up dimensions of a contiguous reshape `src -> dst` into groups with equal
    products. A size-1 dimension on one side only forms a group of its own."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n, m = len(src), len(dst)
    while i < n or j < m:
        if i < n and src[i] == 1 and (j >= m or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < m and dst[j] == 1 and (i >= n or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n or j >= m:
            raise ValueError(f"cannot view {tuple(src)} as {tuple(dst)}")
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < n:
                gi.append(i)
                pi *= src[i]
                i += 1
            elif pj < pi and j < m:
                gj.append(j)
                pj *= dst[j]
                j += 1
            else:
                raise ValueError(f"cannot view {tuple(src)} as {tuple(dst)}")
        groups.append((gi, gj))
    return groups


def reshape(x: Act, shape: Sequence[int]) -> Act:
    """`x.reshape(shape)` on the ids (neuron dimensions stay materialised)."""
    shape = tuple(int(s) for s in shape)
    if shape == x.shape:
        return x
    groups = view_groups(x.shape, shape)
    expand_dims: list[int] = []
    new_ids_shape = [1] * len(shape)
    new_mat = [False] * len(shape)
    for gi, gj in groups:
        if any(x.mat[d] or x.ids.shape[d] > 1 for d in gi):
            expand_dims.extend(gi)
            for d in gj:
                new_ids_shape[d] = shape[d]
                new_mat[d] = True
    ids = x.full(expand_dims).reshape(new_ids_shape)
    return x.replace(ids=ids, mat=tuple(new_mat), shape=shape)


def permute(x: Act, dims: Sequence[int]) -> Act:
    dims = [d % x.ndim for d in dims]
    return x.replace(ids=x.ids.permute(dims), mat=tuple(x.mat[d] for d in dims),
                     shape=tuple(x.shape[d] for d in dims))


def transpose(x: Act, a: int, b: int) -> Act:
    dims = list(range(x.ndim))
    a, b = a % x.ndim, b % x.ndim
    dims[a], dims[b] = dims[b], dims[a]
    return permute(x, dims)


def unsqueeze(x: Act, d: int) -> Act:
    d = d % (x.ndim + 1)
    mat = list(x.mat)
    mat.insert(d, False)
    shape = list(x.shape)
    shape.insert(d, 1)
    return x.replace(ids=x.ids.unsqueeze(d), mat=tuple(mat), shape=tuple(shape))


def squeeze(x: Act, dims: Sequence[int] | None) -> Act:
    if dims is None:
        dims = [d for d in range(x.ndim) if x.shape[d] == 1]
    dims = sorted({d % x.ndim for d in dims if x.shape[d % x.ndim] == 1}, reverse=True)
    ids, mat, shape = x.ids, list(x.mat), list(x.shape)
    for d in dims:
        ids = ids.squeeze(d)
        del mat[d]
        del shape[d]
    return x.replace(ids=ids, mat=tuple(mat), shape=tuple(shape))


def expand(x: Act, shape: Sequence[int]) -> Act:
    shape = tuple(int(s) for s in shape)
    lead = len(shape) - x.ndim
    ids = x.ids.reshape((1,) * lead + tuple(x.ids.shape))
    mat = (False,) * lead + x.mat
    target = list(ids.shape)
    for d in range(len(shape)):
        if mat[d] and ids.shape[d] == 1 and shape[d] != 1:
            target[d] = shape[d]
    return x.replace(ids=ids.expand(target), mat=mat, shape=shape)


def index_dim(x: Act, dim: int, index: Tensor, keep: bool, shape: Sequence[int]) -> Act:
    """Select positions `index` along `dim` (`keep=False`: a single position, dropped)."""
    dim = dim % x.ndim
    if not x.mat[dim]:
        ids = x.ids if keep else x.ids.squeeze(dim)
        mat = x.mat if keep else x.mat[:dim] + x.mat[dim + 1:]
        return x.replace(ids=ids, mat=mat, shape=tuple(shape))
    ids = x.ids.index_select(dim, index)
    if not keep:
        ids = ids.squeeze(dim)
        mat = x.mat[:dim] + x.mat[dim + 1:]
    else:
        mat = x.mat
    return x.replace(ids=ids, mat=mat, shape=tuple(shape))


def cat(parts: Sequence[Act], dim: int, shape: Sequence[int]) -> Act:
    """Concatenate along a neuron dimension (every part materialised along `dim`)."""
    nd = len(shape)
    dim = dim % nd
    mat = [any(p.mat[d] for p in parts) for d in range(nd)]
    mat[dim] = True
    full = []
    for p in parts:
        target = [p.shape[d] if mat[d] else 1 for d in range(nd)]
        full.append(p.ids.expand([t if p.ids.shape[d] == 1 else p.ids.shape[d]
                                  for d, t in enumerate(target)]))
    return parts[0].replace(ids=torch.cat(full, dim), mat=tuple(mat), shape=tuple(shape))


def broadcast(a: Tensor, a_mat: Sequence[bool], b: Tensor, b_mat: Sequence[bool],
              shape: Sequence[int]) -> tuple[Tensor, Tensor, tuple[bool, ...]]:
    """Two ids tensors broadcast to the common materialisation of `shape`."""
    nd = len(shape)
    a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (nd - b.dim()) + tuple(b.shape))
    am = (False,) * (nd - len(a_mat)) + tuple(a_mat)
    bm = (False,) * (nd - len(b_mat)) + tuple(b_mat)
    mat = tuple(x or y for x, y in zip(am, bm))
    target = [shape[d] if mat[d] else 1 for d in range(nd)]
    return a.expand(target), b.expand(target), mat
