"""Sorted (CSR) layouts of index vectors, validated once and cached per index tensor.

Every op reduces *edges* into *rows*. A [`CSR`][graphspace.ops.layout.CSR] layout sorts the edges by
their target row (stably, so ties keep input order): `perm` lists the original edge ids in that
order, `ptr` holds the row offsets, `row` the sorted target rows and `col` the matching source rows
(for a plain scatter `col` is `perm` itself: the "source row" of an edge is its row of `src`).

Building a layout sorts `E` integers and checks index ranges (one host sync). Layers call the
ops with the same `edge_index` tensor many times (every layer, forward and backward), so
layouts are cached, keyed by the identity, view geometry and version counter of the index
tensors; an entry dies with its tensor.
[`clear_layout_cache`][graphspace.ops.layout.clear_layout_cache] empties it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: maximum number of cached layouts (least recently used ones are dropped first).
CACHE_SIZE = 16

_lock = threading.Lock()
_cache: OrderedDict[tuple, tuple[tuple, CSR]] = OrderedDict()


@dataclass(eq=False)
class CSR:
    """Edges sorted by target row.

    Attributes:
        ptr: `(num_rows + 1,)` int64 row offsets into the sorted edge list.
        perm: `(E,)` int64 original edge id of each sorted position.
        row: `(E,)` int64 target row of each sorted edge (non-decreasing).
        col: `(E,)` int64 source row of each sorted edge.
        num_rows: number of target rows.
        num_cols: number of source rows.
    """

    ptr: Tensor
    perm: Tensor
    row: Tensor
    col: Tensor
    num_rows: int
    num_cols: int
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_edges(self) -> int:
        return self.perm.numel()

    def counts(self, dtype: torch.dtype = torch.int64) -> Tensor:
        """Edges per target row, `(num_rows,)`."""
        key = ("counts", dtype)
        if key not in self._memo:
            self._memo[key] = (self.ptr[1:] - self.ptr[:-1]).to(dtype)
        return self._memo[key]

    def transpose(self) -> CSR:
        """The same edges sorted by source row (`row` and `col` swap roles)."""
        if "t" not in self._memo:
            keys = self.col.int() if self.num_cols < 2**31 else self.col
            order = torch.sort(keys, stable=True)[1]
            t_row = self.col.index_select(0, order)
            t = CSR(
                ptr=_ptr_from_sorted(t_row, self.num_cols),
                perm=self.perm.index_select(0, order),
                row=t_row,
                col=self.row.index_select(0, order),
                num_rows=self.num_cols,
                num_cols=self.num_rows,
            )
            t._memo["t"] = self
            self._memo["t"] = t
        return self._memo["t"]

    def sparse_ones(self, dtype: torch.dtype) -> Tensor:
        """`torch.sparse_csr` matrix `(num_rows, num_cols)` with all stored values 1."""
        key = ("ones", dtype)
        if key not in self._memo:
            ones = torch.ones(self.num_edges, dtype=dtype, device=self.ptr.device)
            self._memo[key] = self.sparse(ones)
        return self._memo[key]

    def sparse(self, values: Tensor) -> Tensor:
        """`torch.sparse_csr` matrix with `values` (already in sorted order)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                self.ptr, self.col, values, (self.num_rows, self.num_cols),
                check_invariants=False,
            )


@dataclass(eq=False)
class EdgeList:
    """Validated edges in input order (`dst[e]` receives from `src[e]`), for ops that do
    not need them sorted."""

    src: Tensor
    dst: Tensor
    num_rows: int
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_edges(self) -> int:
        return self.dst.numel()

    def counts(self, dtype: torch.dtype = torch.int64) -> Tensor:
        """Edges per target row, `(num_rows,)`."""
        key = ("counts", dtype)
        if key not in self._memo:
            self._memo[key] = torch.bincount(self.dst, minlength=self.num_rows).to(dtype)
        return self._memo[key]


def edge_list(edge_index: Tensor, num_rows: int, num_cols: int) -> EdgeList:
    """Range-check `edge_index` (row 0 sources, row 1 targets) without sorting it."""
    src, dst = edge_index[0].long(), edge_index[1].long()
    check_range(dst, num_rows, "edge_index[1] (targets)")
    check_range(src, num_cols, "edge_index[0] (sources)")
    return EdgeList(src=src, dst=dst, num_rows=num_rows)


def _ptr_from_sorted(sorted_index: Tensor, num_rows: int) -> Tensor:
    ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=sorted_index.device)
    torch.cumsum(torch.bincount(sorted_index, minlength=num_rows), 0, out=ptr[1:])
    return ptr


def check_range(index: Tensor, size: int, what: str) -> None:
    """Raise `IndexError` unless `0 <= index < size` (one host sync)."""
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo_i, hi_i = int(lo), int(hi)
    if lo_i < 0 or hi_i >= size:
        bad = lo_i if lo_i < 0 else hi_i
        raise IndexError(f"{what} holds {bad}, out of range for size {size} "
                         f"(valid: 0 .. {size - 1})")


def build_csr(
    index: Tensor,
    num_rows: int,
    source: Tensor | None = None,
    num_cols: int | None = None,
    index_sorted: bool = False,
    names: tuple[str, str] = ("index", "source index"),
) -> CSR:
    """Validate `index` (and `source`) and sort the edges by `index` (uncached).

    Args:
        index: `(E,)` integer target row of each edge.
        num_rows: number of target rows.
        source: `(E,)` integer source row of each edge; `None` means edge `e` reads row
            `e` (a plain scatter).
        num_cols: number of source rows (default `E` without `source`).
        index_sorted: `index` must already be non-decreasing (checked; an error if not).
            Sorted input is detected either way and not sorted again.
        names: how error messages call `index` and `source`.
    """
    index = index.long()
    check_range(index, num_rows, names[0])
    num_edges = index.numel()
    if source is not None:
        source = source.long()
        assert num_cols is not None
        check_range(source, num_cols, names[1])
    else:
        num_cols = num_edges
    ordered = num_edges < 2 or bool((index[1:] >= index[:-1]).all())
    if index_sorted and not ordered:
        raise ValueError(f"index_sorted=True but {names[0]} is not sorted (non-decreasing)")
    if ordered:  # one comparison pass instead of a sort (a stable sort is the identity)
        row, perm = index, torch.arange(num_edges, device=index.device)
    else:
        # int32 keys halve the radix passes of the CPU sort (and its threading overhead)
        keys = index.int() if num_rows < 2**31 else index
        row, perm = torch.sort(keys, stable=True)
        row = row.long()
    col = perm if source is None else source.index_select(0, perm)
    return CSR(ptr=_ptr_from_sorted(row, num_rows), perm=perm, row=row, col=col,
               num_rows=num_rows, num_cols=num_cols)


def _key(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    base = t._base if t._base is not None else t
    return (id(base), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)


def _cacheable(*ts: Tensor | None) -> bool:
    if CACHE_SIZE <= 0 or torch.compiler.is_compiling():
        return False
    for t in ts:
        if t is None:
            continue
        if t.is_inference() or type(t) is not Tensor:
            return False
    return True


_dead: list[int] = []  # ids of freed index tensors (appended by weakref callbacks)


def _on_free(base_id: int):
    return lambda _ref: _dead.append(base_id)


def _purge_dead() -> None:
    # called with _lock held; weakref callbacks only append (no locking inside GC callbacks)
    while _dead:
        i = _dead.pop()
        for k in [k for k in _cache if k[0][0] == i or (k[1] is not None and k[1][0] == i)]:
            refs, _ = _cache[k]
            if any(r() is None for r in refs):
                del _cache[k]


def get_csr(
    index: Tensor,
    num_rows: int,
    source: Tensor | None = None,
    num_cols: int | None = None,
    index_sorted: bool = False,
    names: tuple[str, str] = ("index", "source index"),
) -> CSR:
    """`build_csr`, cached while `index` and `source` stay alive and unmodified."""
    if not _cacheable(index, source):
        return build_csr(index, num_rows, source, num_cols, index_sorted, names)
    key = (_key(index), _key(source), num_rows, num_cols, bool(index_sorted))
    with _lock:
        _purge_dead()
        hit = _cache.get(key)
        if hit is not None:
            refs, csr = hit
            if all(r() is not None for r in refs):
                _cache.move_to_end(key)
                return csr
            del _cache[key]
    csr = build_csr(index, num_rows, source, num_cols, index_sorted, names)
    refs = []
    for t in (index, source):
        if t is None:
            continue
        base = t._base if t._base is not None else t
        refs.append(weakref.ref(base, _on_free(id(base))))
    with _lock:
        _cache[key] = (tuple(refs), csr)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return csr


def clear_layout_cache() -> None:
    """Drop every cached [`CSR`][graphspace.ops.layout.CSR] layout (and this thread's chunk buffers
    of the `torch` backend)."""
    from graphspace.ops._torch import release_workspace

    with _lock:
        _cache.clear()
        _dead.clear()
    release_workspace()
