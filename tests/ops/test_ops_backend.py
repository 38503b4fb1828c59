"""Backend dispatch (argument, environment variable, auto), reporting and the layout cache."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch
from ops_reference import random_graph, ref_reduce, ref_weighted

from graphspace import ops
from graphspace.ops import layout

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TORCH_SCATTER = importlib.util.find_spec("torch_scatter") is not None


def test_env_var_forces_backend_and_last_backend_reports_it(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.resolve_backend("cpu", "scatter") == "torch"
    ops.scatter(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 0, 2)
    assert ops.last_backend() == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "no_such_backend")
    with pytest.raises(ValueError, match=ops.ENV_VAR):
        ops.scatter(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 0, 2)
    # the argument wins over the environment variable
    ops.scatter(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 0, 2, backend="torch")
    assert ops.last_backend() == "torch"


def test_auto_resolution(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    cpu_scatter = "torch_scatter" if HAS_TORCH_SCATTER else "torch"
    assert ops.resolve_backend("cpu", "scatter") == cpu_scatter
    # fused ops never pick torch_scatter automatically: it would materialise the messages
    assert ops.resolve_backend("cpu", "weighted_aggregate") == "torch"
    if HAS_TRITON:
        assert ops.resolve_backend("cuda", "scatter") == "triton"
        assert ops.resolve_backend("cuda", "sheaf_aggregate") == "triton"
    assert "torch" in ops.available_backends("cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_forcing_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.weighted_aggregate(torch.randn(3, 2), torch.tensor([[0, 1], [1, 2]]),
                               backend="triton")


@pytest.mark.skipif(HAS_TORCH_SCATTER, reason="torch_scatter is installed")
def test_forcing_missing_torch_scatter_fails_clearly():
    with pytest.raises(RuntimeError, match="not installed"):
        ops.scatter(torch.randn(3, 2), torch.tensor([0, 1, 1]), 0, 2, backend="torch_scatter")


@pytest.mark.skipif(not HAS_TORCH_SCATTER, reason="torch_scatter not installed")
def test_torch_scatter_backend_matches_reference():
    ei = random_graph(9, 11, 40, seed=13)
    x = torch.randn(9, 5, dtype=torch.float64)
    for reduce in ("sum", "mean", "max", "min", "std"):
        src = x[ei[0]]
        torch.testing.assert_close(ops.scatter(src, ei[1], 0, 11, reduce,
                                               backend="torch_scatter"),
                                   ref_reduce(src, ei[1], 11, reduce))
    for reduce in ("sum", "mean", "max", "min"):
        w = torch.randn(ei.size(1), dtype=torch.float64)
        torch.testing.assert_close(
            ops.weighted_aggregate(x, ei, w, 11, reduce, backend="torch_scatter"),
            ref_weighted(x, ei, w, 11, reduce))
        assert ops.last_backend() == "torch_scatter"


def test_layout_cache_reuses_and_invalidates():
    ops.clear_layout_cache()
    ei = random_graph(9, 11, 40, seed=14)
    a = ops.get_csr(ei[1], 11, source=ei[0], num_cols=9)
    b = ops.get_csr(ei[1], 11, source=ei[0], num_cols=9)  # new views of the same storage
    assert a is b
    assert ops.get_csr(ei[1], 12, source=ei[0], num_cols=9) is not a  # other size, other key
    x = torch.randn(9, 3, dtype=torch.float64)
    before = ops.weighted_aggregate(x, ei, None, 11)
    ei[1, 0] = (ei[1, 0] + 1) % 8  # in-place edit bumps the version counter: no stale layout
    assert ops.get_csr(ei[1], 11, source=ei[0], num_cols=9) is not a
    after = ops.weighted_aggregate(x, ei, None, 11)
    torch.testing.assert_close(after, ref_weighted(x, ei, None, 11, "sum"))
    assert not torch.equal(before, after)


def test_layout_cache_entries_die_with_their_tensor():
    ops.clear_layout_cache()
    index = torch.randint(0, 5, (50,))
    ops.scatter(torch.randn(50, 2), index, 0, 5)
    assert len(layout._cache) == 1
    del index
    gc.collect()
    ops.scatter(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), 0, 5)  # purges dead entries
    assert len(layout._cache) == 1


def test_csr_layout_contents():
    index = torch.tensor([2, 0, 2, 1, 0])
    source = torch.tensor([4, 3, 2, 1, 0])
    csr = ops.get_csr(index, 4, source=source, num_cols=5)
    assert csr.ptr.tolist() == [0, 2, 3, 5, 5]
    assert csr.perm.tolist() == [1, 4, 3, 0, 2]  # stable: ties keep input order
    assert csr.row.tolist() == [0, 0, 1, 2, 2]
    assert csr.col.tolist() == [3, 0, 1, 4, 2]
    t = csr.transpose()
    assert t.row.tolist() == sorted(source.tolist())
    assert torch.equal(source[t.perm], t.row) and torch.equal(index[t.perm], t.col)
    assert t.transpose() is csr


@pytest.mark.full
def test_ops_compile_without_graph_breaks():
    ei = random_graph(9, 11, 40, seed=15)
    x = torch.randn(9, 4)
    w = torch.randn(ei.size(1))

    def f(x, w):
        a = ops.weighted_aggregate(x, ei, w, 11, "max")
        b = ops.egnn_coord_aggregate(x[:, :3], ei[:, ei[1] < 9], w[ei[1] < 9], "mean")
        c = ops.scatter(x[ei[0]], ei[1], 0, 11, "std")
        return a + c + torch.nn.functional.pad(b, (0, 1, 0, 2))

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w), atol=1e-5, rtol=1e-5)
