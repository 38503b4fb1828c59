"""graphspace.ops.scatter / segment against a float64 reference, on every backend."""

from __future__ import annotations

import pytest
import torch
from ops_reference import BACKEND_DEVICES, grads, leaf, random_graph, ref_reduce

from graphspace import ops

REDUCES = ["sum", "mean", "max", "min", "std"]


@pytest.fixture(params=BACKEND_DEVICES)
def bd(request):
    return request.param


@pytest.mark.parametrize("reduce", REDUCES)
def test_scatter_matches_reference_with_grad(bd, reduce):
    backend, device = bd
    n = 11
    index = random_graph(9, n, 40, seed=1)[1]
    src64 = torch.randn(index.numel(), 6, dtype=torch.float64)
    ref_in = leaf(src64, torch.float64, "cpu")
    ref = ref_reduce(ref_in, index, n, reduce)
    src = leaf(src64, torch.float64, device)
    out = ops.scatter(src, index.to(device), 0, n, reduce, backend=backend)
    assert ops.last_backend() == backend
    assert out.shape == (n, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), ref, atol=1e-10, rtol=1e-10)
    assert torch.all(out[-3:] == 0)  # targets without entries
    (g,) = grads(out, [src])
    (g_ref,) = grads(ref, [ref_in])
    torch.testing.assert_close(g.cpu(), g_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reduce", ["sum", "max", "std"])
def test_scatter_other_dims(bd, reduce):
    backend, device = bd
    index = torch.tensor([2, 0, 2, 1, 0, 2, 4])
    src = torch.randn(3, 7, 2, dtype=torch.float64)
    out = ops.scatter(src.to(device), index.to(device), dim=1, dim_size=5, reduce=reduce,
                      backend=backend)
    ref = ref_reduce(src.movedim(1, 0), index, 5, reduce).movedim(0, 1)
    assert out.shape == (3, 5, 2)
    torch.testing.assert_close(out.cpu(), ref)
    out_neg = ops.scatter(src[:, :, 0].to(device), index.to(device), dim=-1, dim_size=5,
                          reduce=reduce, backend=backend)
    torch.testing.assert_close(out_neg.cpu(), ref[:, :, 0])
    out_1d = ops.scatter(src[0, :, 0].to(device), index.to(device), dim_size=5, reduce=reduce,
                         backend=backend)
    torch.testing.assert_close(out_1d.cpu(), ref[0, :, 0])


def test_scatter_ties_split_gradient_evenly(bd):
    backend, device = bd
    src = torch.tensor([[1.0], [3.0], [3.0], [2.0], [3.0]], dtype=torch.float64, device=device,
                       requires_grad=True)
    index = torch.tensor([0, 0, 0, 1, 0], device=device)
    out = ops.scatter(src, index, 0, 2, "max", backend=backend)
    out.backward(torch.tensor([[6.0], [5.0]], dtype=torch.float64, device=device))
    assert out.detach().cpu().view(-1).tolist() == [3.0, 2.0]
    assert src.grad.cpu().view(-1).tolist() == [0.0, 2.0, 2.0, 5.0, 2.0]


def test_segment_matches_scatter(bd):
    backend, device = bd
    counts = torch.tensor([3, 0, 1, 4, 0, 2])
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    index = torch.repeat_interleave(torch.arange(6), counts)
    src64 = torch.randn(int(counts.sum()), 5, dtype=torch.float64)
    for reduce in REDUCES:
        ref_in = leaf(src64, torch.float64, "cpu")
        ref = ref_reduce(ref_in, index, 6, reduce)
        src = leaf(src64, torch.float64, device)
        out = ops.segment(src, ptr.to(device), reduce, backend=backend)
        torch.testing.assert_close(out.cpu(), ref)
        torch.testing.assert_close(grads(out, [src])[0].cpu(), grads(ref, [ref_in])[0])
        sorted_out = ops.scatter(src64.to(device), index.to(device), 0, 6, reduce,
                                 index_sorted=True, backend=backend)
        torch.testing.assert_close(sorted_out.cpu(), ref.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(bd, dtype):
    backend, device = bd
    # 2560 ones: a float16 (bfloat16) running sum sticks at 2048 (256); float32 gives 2560
    src = torch.ones(2560, 1, dtype=dtype, device=device)
    index = torch.zeros(2560, dtype=torch.long, device=device)
    out = ops.scatter(src, index, 0, 1, "sum", backend=backend)
    assert out.dtype == dtype and out.item() == 2560.0
    idx = random_graph(9, 10, 60, seed=2)[1]
    x = torch.randn(idx.numel(), 4).to(dtype)
    for reduce in REDUCES:
        got = ops.scatter(x.to(device), idx.to(device), 0, 10, reduce, backend=backend)
        ref = ref_reduce(x.double(), idx, 10, reduce)
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), ref, atol=4e-2, rtol=2e-2)


def test_empty_inputs(bd):
    backend, device = bd
    src = torch.zeros(0, 3, device=device, requires_grad=True)
    index = torch.zeros(0, dtype=torch.long, device=device)
    for reduce in REDUCES:
        out = ops.scatter(src, index, 0, 4, reduce, backend=backend)
        assert out.shape == (4, 3) and torch.all(out == 0)
        out.sum().backward()
        assert src.grad.shape == (0, 3)
    assert ops.scatter(src, index, 0, None, "sum", backend=backend).shape == (0, 3)


def test_integer_src_and_int32_index():
    src = torch.tensor([[1], [5], [2], [7]])
    index = torch.tensor([1, 1, 0, 1], dtype=torch.int32)
    assert ops.scatter(src, index, 0, 3, "sum").view(-1).tolist() == [2, 13, 0]
    assert ops.scatter(src, index, 0, 3, "max").view(-1).tolist() == [2, 7, 0]
    with pytest.raises(TypeError, match="floating-point"):
        ops.scatter(src, index, 0, 3, "mean")
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(ops.scatter(x, index, 0, 3, "mean"),
                               ref_reduce(x, index.long(), 3, "mean"))


def test_default_dim_size_and_alias():
    src = torch.randn(5, 2)
    index = torch.tensor([0, 3, 3, 1, 0])
    out = ops.scatter(src, index, reduce="add")
    assert out.shape == (4, 2)
    torch.testing.assert_close(out, ref_reduce(src, index, 4, "sum"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"index": torch.tensor([0, 1, 5])}, IndexError, "out of range"),
        ({"index": torch.tensor([0, -1, 2])}, IndexError, "out of range"),
        ({"index": torch.tensor([0, 1])}, ValueError, "mismatched lengths"),
        ({"index": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "int64 or int32"),
        ({"index": torch.tensor([[0, 1, 2]])}, ValueError, "1-D"),
        ({"reduce": "prod"}, ValueError, "unknown reduce"),
        ({"dim": 2}, ValueError, "out of range"),
        ({"dim_size": -1}, ValueError, "dim_size"),
        ({"dim_size": 2.5}, TypeError, "dim_size"),
        ({"index": torch.tensor([2, 0, 1]), "index_sorted": True}, ValueError, "not sorted"),
        ({"src": torch.randn(3, 2).to(torch.complex64)}, TypeError, "floating-point"),
        ({"backend": "cuda_magic"}, ValueError, "unknown ops backend"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, error, match):
    args = {"src": torch.randn(3, 2), "index": torch.tensor([0, 1, 2]), "dim": 0,
            "dim_size": 3, "reduce": "sum"}
    args.update(kwargs)
    src, index = args.pop("src"), args.pop("index")
    with pytest.raises(error, match=match):
        ops.scatter(src, index, **args)


def test_segment_bad_ptr():
    src = torch.randn(4, 2)
    with pytest.raises(ValueError, match="mismatched lengths"):
        ops.segment(src, torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment(src, torch.tensor([0, 3, 1, 4]))
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.segment(src, torch.tensor([0.0, 4.0]))
