"""Ahead-of-time compile the Triton kernels for an H100 (sm_90) without a GPU.

The interpreter checks the kernels' arithmetic; this checks that the real compiler accepts them
(Triton front end -> TTGIR -> LLVM -> PTX -> ptxas cubin) for every dtype and specialisation
the launchers use. A fast subset runs by default, the full matrix under ``-m slow``.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed")

_INDEX_ARGS = {"col_ptr", "perm_ptr", "ptr_ptr", "row_ptr"}
# buffers the launchers allocate in the accumulation dtype (inputs keep their own dtype)
_ACC_ARGS = {"out_ptr", "ties_ptr", "g_ptr", "gx_ptr", "gw_ptr", "gea_ptr", "gwt_ptr",
             "gpos_ptr", "gcoef_ptr", "gmaps_ptr"}


def _compile(kernel, dtype: str, consts: dict) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    acc = "fp64" if dtype == "fp64" else "fp32"
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _INDEX_ARGS:
            sig[name] = "*i64"
        elif name in _ACC_ARGS:
            sig[name] = f"*{acc}"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i64"
    triton.compile(ASTSource(kernel, sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _cases(dtypes: list[str], full: bool):
    import triton.language as tl

    from graphspace.ops import _triton as T

    for dtype in dtypes:
        acc = tl.float64 if dtype == "fp64" else tl.float32
        modes = [0, 1, 2, 3] if full else [1, 3]
        for mode, red in itertools.product(modes, [0, 1, 2, 3, 4] if full else [0, 2]):
            if red == 4 and mode != 0:
                continue
            yield T._csr_reduce_kernel, dtype, dict(
                MODE=mode, REDUCE=red, NEED_TIES=red in (2, 3), ACC=acc, BLOCK_E=16,
                BLOCK_F=64, BLOCK_D=16 if mode == 3 else 1)
        for mode, ext in itertools.product(modes, [False, True]):
            yield T._edge_backward_kernel, dtype, dict(
                MODE=mode, EXTREMUM=ext, GX_ATOMIC=ext, NEED_W=mode in (1, 2),
                NEED_EA=mode == 3, NEED_WT=mode == 3, ACC=acc, BLOCK_E=16 if mode == 3 else 32,
                BLOCK_F=64, BLOCK_D=16 if mode == 3 else 1)
        for norm in [False, True]:
            yield T._egnn_forward_kernel, dtype, dict(MEAN=norm, NORMALIZE=norm, ACC=acc,
                                                      BLOCK_E=32, BLOCK_D=4)
            yield T._egnn_backward_kernel, dtype, dict(NORMALIZE=norm, NEED_POS=True,
                                                       NEED_COEF=True, ACC=acc, BLOCK_E=64,
                                                       BLOCK_D=4)
            yield T._sheaf_forward_kernel, dtype, dict(D=3, MEAN=norm, TRANS=norm, ACC=acc,
                                                       BLOCK_E=16, BLOCK_D=4, BLOCK_C=64)
        yield T._sheaf_maps_grad_kernel, dtype, dict(D=3, ACC=acc, BLOCK_E=16, BLOCK_D=4,
                                                     BLOCK_C=32)


def _run(dtypes: list[str], full: bool) -> int:
    n = 0
    for kernel, dtype, consts in _cases(dtypes, full):
        try:
            _compile(kernel, dtype, consts)
        except Exception as err:  # name the failing specialisation
            raise AssertionError(f"{kernel.__name__} {dtype} {consts}: {err}") from err
        n += 1
    return n


def test_kernels_compile_for_sm90():
    assert _run(["fp32"], full=False) > 10


@pytest.mark.slow
def test_all_kernel_specialisations_compile_for_sm90():
    assert _run(["fp32", "fp16", "bf16", "fp64"], full=True) > 150
