"""Input checks shared by every graphspace layer, and the adjacency formats they accept.

Every conv and model in `graphspace.nn` calls these at the top of `forward`, so a bad input
fails with one line that names the argument, the expected and the actual shape, before any
kernel runs. The checks are cheap (shape and dtype reads, plus one min/max over the index
tensors); switch them off for speed with `set_validation(False)` or, for a block of code,

```python
with graphspace.nn.validation.validation(False):
    out = model(batch)
```

Adjacency formats follow PyTorch Geometric's conventions: an `edge_index` of shape `(2, E)`
(a plain `Tensor` or PyG's `EdgeIndex`), whose first row holds the sources and second the
targets, or a *transposed* sparse adjacency `adj_t` (`torch.sparse` COO/CSR/CSC, or
`torch_sparse.SparseTensor` where installed) with `adj_t[i, j] != 0` for an edge `j -> i`,
as `GCNConv(x, adj.t())` takes it. `as_edge_index` turns any of them into `(edge_index,
edge_weight)`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "GraphInputError",
    "as_edge_index",
    "check_edge_features",
    "check_edge_index",
    "check_index",
    "check_node_features",
    "has_message_hooks",
    "is_adjacency",
    "is_validation_enabled",
    "set_validation",
    "validation",
]

_ENABLED = True
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class GraphInputError(ValueError):
    """A layer input of the wrong shape, dtype or index range (a `ValueError`)."""


def is_validation_enabled() -> bool:
    """Whether the layers check their inputs (on by default)."""
    return _ENABLED


def set_validation(enabled: bool) -> None:
    """Switch the layers' input checks on or off for the whole process."""
    global _ENABLED
    _ENABLED = bool(enabled)


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that switches the input checks on or off inside a block."""
    global _ENABLED
    before = _ENABLED
    _ENABLED = bool(enabled)
    try:
        yield
    finally:
        _ENABLED = before


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _where(layer: str | None, name: str) -> str:
    return f"{layer}: {name}" if layer else name


def check_node_features(x: object, name: str = "x", *, layer: str | None = None,
                        dim: int | tuple[int, ...] = 2, channels: int | None = None,
                        num_nodes: int | None = None, floating: bool = True) -> Tensor:
    """Check a node (or coordinate) feature tensor.

    Args:
        x: the tensor to check.
        name: its argument name, quoted in the error.
        layer: the layer's class name, quoted in the error.
        dim: the allowed number(s) of dimensions.
        channels: the expected size of the last dimension, if fixed.
        num_nodes: the expected size of the first dimension, if known.
        floating: whether a floating-point dtype is required.

    Returns:
        `x`, unchanged.
    """
    where = _where(layer, name)
    if not isinstance(x, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
    if not _ENABLED:
        return x
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise GraphInputError(f"{where} must be {want}, got shape {_shape(x)}")
    if floating and not x.is_floating_point():
        raise GraphInputError(f"{where} must be a floating-point tensor, got {x.dtype} "
                              f"(cast it, e.g. {name}.float())")
    if channels is not None and x.size(-1) != channels:
        raise GraphInputError(f"{where} must have {channels} channels in its last dimension, "
                              f"got shape {_shape(x)}")
    if num_nodes is not None and x.size(0) != num_nodes:
        raise GraphInputError(f"{where} must have {num_nodes} rows (one per node), got shape "
                              f"{_shape(x)}")
    return x


_LAST_RANGE: tuple[weakref.ref, int, int, int] | None = None


def _index_range(index: Tensor) -> tuple[int, int]:
    """`(min, max)` of `index`, remembered for the last tensor checked: the layers of one
    model all check the same `edge_index`, so only the first pays the pass and the host sync.
    The memo holds a weak reference and the tensor's version counter, so a new tensor or an
    in-place change is always checked again."""
    global _LAST_RANGE
    if index.is_inference():  # no version counter to tell an in-place change: no memo
        lo_t, hi_t = torch.aminmax(index)
        return int(lo_t), int(hi_t)
    last = _LAST_RANGE
    if last is not None and last[0]() is index and last[1] == index._version:
        return last[2], last[3]
    lo_t, hi_t = torch.aminmax(index)
    lo, hi = int(lo_t), int(hi_t)
    try:
        _LAST_RANGE = (weakref.ref(index), index._version, lo, hi)
    except TypeError:  # a tensor type without weak references: no memo
        _LAST_RANGE = None
    return lo, hi


def check_edge_index(edge_index: object, num_nodes: int | None = None, *,
                     name: str = "edge_index", layer: str | None = None) -> Tensor:
    """Check an `edge_index` of shape `(2, E)`: integer dtype, orientation, index range.

    Args:
        edge_index: the tensor to check.
        num_nodes: the number of nodes; indices must lie in `[0, num_nodes)`.
        name: its argument name, quoted in the error.
        layer: the layer's class name, quoted in the error.

    Returns:
        `edge_index`, unchanged.
    """
    where = _where(layer, name)
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor of shape (2, E) or a sparse "
                        f"adjacency, got {type(edge_index).__name__}")
    if not _ENABLED:
        return edge_index
    if edge_index.dtype not in _INT_DTYPES:
        raise GraphInputError(f"{where} must be an integer tensor, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        hint = (" (it looks transposed: pass edge_index.t())"
                if edge_index.dim() == 2 and edge_index.size(1) == 2 else "")
        raise GraphInputError(f"{where} must have shape (2, E), got "
                              f"{_shape(edge_index)}{hint}")
    if edge_index.numel() and num_nodes is not None and not torch.compiler.is_compiling():
        lo, hi = _index_range(edge_index)
        if lo < 0:
            raise GraphInputError(f"{where} holds a negative node index ({lo}); indices must "
                                  f"lie in [0, {num_nodes})")
        if hi >= num_nodes:
            raise GraphInputError(f"{where} refers to node {hi}, but the graph has "
                                  f"{num_nodes} nodes (indices must lie in [0, {num_nodes}))")
    return edge_index


def check_edge_features(edge_attr: object, num_edges: int, *, name: str = "edge_attr",
                        layer: str | None = None, channels: int | None = None,
                        dim: int | tuple[int, ...] = 2, floating: bool = True) -> Tensor:
    """Check a per-edge tensor: one row per edge of `edge_index`.

    Args:
        edge_attr: the tensor to check.
        num_edges: the number of edges `E`.
        name: its argument name, quoted in the error.
        layer: the layer's class name, quoted in the error.
        channels: the expected size of the last dimension, if fixed.
        dim: the allowed number(s) of dimensions.
        floating: whether a floating-point dtype is required.

    Returns:
        `edge_attr`, unchanged.
    """
    check_node_features(edge_attr, name, layer=layer, dim=dim, channels=channels,
                        floating=floating)
    if _ENABLED and edge_attr.size(0) != num_edges:  # type: ignore[union-attr]
        raise GraphInputError(f"{_where(layer, name)} must have {num_edges} rows (one per "
                              f"edge of edge_index), got shape "
                              f"{_shape(edge_attr)}")  # type: ignore[arg-type]
    return edge_attr  # type: ignore[return-value]


def _is_sparse_tensor(adj: object) -> bool:
    try:
        from torch_sparse import SparseTensor  # type: ignore[import-not-found]
    except ImportError:
        return False
    return isinstance(adj, SparseTensor)


def is_adjacency(adj: object) -> bool:
    """Whether `adj` is a sparse adjacency (torch.sparse or SparseTensor), not an edge_index."""
    return (isinstance(adj, Tensor) and adj.layout != torch.strided) or _is_sparse_tensor(adj)


def as_edge_index(adj: object, num_nodes: int | None = None, *, name: str = "edge_index",
                  layer: str | None = None) -> tuple[Tensor, Tensor | None]:
    """Any adjacency format PyG accepts, as `(edge_index, edge_weight)`.

    A dense `(2, E)` tensor or `EdgeIndex` is checked and returned as is (`edge_weight` is
    `None`). A transposed sparse adjacency `adj_t` (`torch.sparse` COO/CSR/CSC, or a
    `torch_sparse.SparseTensor`) gives the edges `j -> i` of its non-zeros `(i, j)`, in
    row-major order, and its values as `edge_weight` (`None` for a SparseTensor without
    values).

    Args:
        adj: the adjacency.
        num_nodes: the number of nodes, checked against the adjacency's size.
        name: its argument name, quoted in the error.
        layer: the layer's class name, quoted in the error.
    """
    where = _where(layer, name)
    if _is_sparse_tensor(adj):
        row, col, value = adj.coo()  # type: ignore[union-attr]
        n_rows, n_cols = adj.sizes()[:2]  # type: ignore[union-attr]
        edge_index, weight = torch.stack([col, row]), value
    elif isinstance(adj, Tensor) and adj.layout != torch.strided:
        if adj.dim() != 2:
            raise GraphInputError(f"{where}: a sparse adjacency must be 2-D, got shape "
                                  f"{_shape(adj)}")
        coo = adj.to_sparse_coo().coalesce()
        idx = coo.indices()
        n_rows, n_cols = adj.shape
        edge_index, weight = idx.flip(0), coo.values()
    else:
        edge_index = check_edge_index(adj, num_nodes, name=name, layer=layer)
        if hasattr(edge_index, "as_tensor") and type(edge_index) is not Tensor:
            edge_index = edge_index.as_tensor()  # PyG EdgeIndex: a plain view of its data
        return edge_index, None
    if _ENABLED and num_nodes is not None and (n_rows != num_nodes or n_cols != num_nodes):
        raise GraphInputError(f"{where}: the sparse adjacency has size ({n_rows}, {n_cols}) "
                              f"but the graph has {num_nodes} nodes")
    if weight is not None and weight.dim() != 1:
        raise GraphInputError(f"{where}: a sparse adjacency must hold one scalar per edge, "
                              f"got values of shape {_shape(weight)}")
    return edge_index, weight


def check_index(index: object, length: int, upper: int | None = None, *, name: str,
                layer: str | None = None) -> Tensor:
    """Check a 1-D integer index vector (e.g. `node_map`, `batch`): one entry per row of the
    features it labels, values in `[0, upper)`.

    Args:
        index: the tensor to check.
        length: the expected number of entries.
        upper: the exclusive upper bound of the values, if known.
        name: its argument name, quoted in the error.
        layer: the layer's class name, quoted in the error.

    Returns:
        `index`, unchanged.
    """
    where = _where(layer, name)
    if not isinstance(index, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(index).__name__}")
    if not _ENABLED:
        return index
    if index.dtype not in _INT_DTYPES:
        raise GraphInputError(f"{where} must be an integer tensor, got {index.dtype}")
    if index.dim() != 1 or index.numel() != length:
        raise GraphInputError(f"{where} must have shape ({length},), got {_shape(index)}")
    if index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0:
            raise GraphInputError(f"{where} holds a negative index ({lo})")
        if upper is not None and hi >= upper:
            raise GraphInputError(f"{where} holds index {hi}, but must lie in [0, {upper})")
    return index


def has_message_hooks(conv: object) -> bool:
    """Whether a PyG `MessagePassing` layer has propagate/message/aggregate/edge-update hooks
    or an explainer attached (then it must run its `message`/`aggregate` reference rather
    than a fused kernel that never forms the messages)."""
    names = ("_propagate_forward_pre_hooks", "_propagate_forward_hooks",
             "_message_forward_pre_hooks", "_message_forward_hooks",
             "_aggregate_forward_pre_hooks", "_aggregate_forward_hooks",
             "_message_and_aggregate_forward_pre_hooks", "_message_and_aggregate_forward_hooks",
             "_edge_update_forward_pre_hooks", "_edge_update_forward_hooks")
    return any(bool(getattr(conv, n, None)) for n in names) or bool(getattr(conv, "_explain",
                                                                            False))
