"""Float64 references and random graphs for the graphspace.ops tests.

The references loop over target nodes and reduce each node's stacked messages with the plain
torch reductions (``sum``, ``mean``, ``amax``, ``amin``); they share no code with
``graphspace.ops``. ``amax``/``amin`` split the gradient evenly between tied maxima, the
convention the ops follow.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

#: (backend, device) pairs every op test runs on. The Triton kernels run on CPU tensors only
#: under TRITON_INTERPRET=1: ``test_ops_triton_interpret.py`` re-runs the ``interpret`` cases in
#: a subprocess with it set.
BACKEND_DEVICES = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpret", marks=pytest.mark.skipif(
        not INTERPRET, reason="run by test_ops_triton_interpret.py with TRITON_INTERPRET=1")),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]


def random_graph(
    n_src: int, n_dst: int, n_edges: int, seed: int, device: str = "cpu"
) -> Tensor:
    """``(2, E)`` edges with a hub, repeated edges, isolated sources and empty targets.

    The last 2 sources have no out-edges and the last 3 targets no in-edges; a quarter of the
    edges point at target 0; the first fifth of the edges appear twice; order is shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, max(n_src - 2, 1), (n_edges,), generator=g)
    dst = torch.randint(0, max(n_dst - 3, 1), (n_edges,), generator=g)
    dst[: n_edges // 4] = 0
    k = n_edges // 5
    src = torch.cat([src, src[:k]])
    dst = torch.cat([dst, dst[:k]])
    order = torch.randperm(src.numel(), generator=g)
    return torch.stack([src[order], dst[order]]).to(device)


def ref_reduce(msgs: Tensor, index: Tensor, dim_size: int, reduce: str) -> Tensor:
    """Reduce rows of ``msgs`` (``(E, *)``) by target ``index``; empty targets give 0."""
    rows = []
    for i in range(dim_size):
        m = msgs[index == i]
        if m.size(0) == 0:
            rows.append(msgs.new_zeros(msgs.shape[1:]))
        elif reduce == "sum":
            rows.append(m.sum(0))
        elif reduce == "mean":
            rows.append(m.mean(0))
        elif reduce == "max":
            rows.append(m.amax(0))
        elif reduce == "min":
            rows.append(m.amin(0))
        elif reduce == "std":
            rows.append((((m - m.mean(0)) ** 2).mean(0) + 1e-12).sqrt())
        else:
            raise ValueError(reduce)
    return torch.stack(rows) if rows else msgs.new_zeros((0,) + tuple(msgs.shape[1:]))


def ref_weighted(x: Tensor, ei: Tensor, w: Tensor | None, n: int, reduce: str) -> Tensor:
    msgs = x[ei[0]]
    if w is not None:
        msgs = msgs * (w[:, None] if w.dim() == 1 else w)
    return ref_reduce(msgs, ei[1], n, reduce)


def ref_egnn(pos: Tensor, ei: Tensor, coef: Tensor, reduce: str, normalize: bool,
             eps: float) -> Tensor:
    diff = pos[ei[1]] - pos[ei[0]]
    if normalize:
        diff = diff / (torch.linalg.vector_norm(diff, dim=1, keepdim=True) + eps)
    return ref_reduce(diff * coef[:, None], ei[1], pos.size(0), reduce)


def ref_sheaf(x: Tensor, ei: Tensor, maps: Tensor, n: int, reduce: str) -> Tensor:
    x3 = x if x.dim() == 3 else x[..., None]
    msgs = torch.stack([maps[e] @ x3[ei[0, e]] for e in range(maps.size(0))]) \
        if maps.size(0) else x3.new_zeros((0,) + tuple(x3.shape[1:]))
    out = ref_reduce(msgs, ei[1], n, reduce)
    return out if x.dim() == 3 else out[..., 0]


def grads(out: Tensor, inputs: list[Tensor], seed: int = 0) -> list[Tensor]:
    """Gradients of ``<out, G>`` for a fixed random ``G`` (zeros where an input is unused)."""
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    got = torch.autograd.grad(out, inputs, cot, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(got, inputs)]


def leaf(t: Tensor, dtype: torch.dtype, device: str) -> Tensor:
    return t.to(device=device, dtype=dtype).detach().requires_grad_(True)
