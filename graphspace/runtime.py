r"""Process-level settings for CPU training runs.

Training a metanetwork on CPU allocates and frees many tensors of 1–30 MB per step (per-edge
activations and their gradients). With glibc's default policy such a block is either served
by `mmap` (when it is larger than the *dynamic* mmap threshold) or carved from the heap
top, which is handed back to the kernel whenever more than `M_TRIM_THRESHOLD` bytes are
free there. Either way the memory returns to the kernel and every page of the next step's
tensors is faulted in and zeroed again: ~14,000 minor page faults per metanetwork layer step
on the Small-CNN-zoo batch, about a fifth of its run time.

[`tune_cpu_allocator`][graphspace.runtime.tune_cpu_allocator] raises both thresholds so freed blocks
stay in the process and are reused, the same reason Intel's PyTorch CPU tuning guide recommends
preloading jemalloc/tcmalloc. The `graphspace` console script applies it on start-up (opt out with
`GRAPHSPACE_MALLOC_TUNING=0`); library imports never change the allocator. The cost is that
the process keeps its peak heap instead of returning it between steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: glibc ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: the largest mmap threshold glibc accepts on 64-bit platforms (``HEAP_MAX_SIZE / 2``)
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free heap-top bytes kept before trimming
TRIM_THRESHOLD = 1024 * 1024 * 1024

#: the environment variable that turns the console script's tuning off (``0``/``false``)
ENV_VAR = "GRAPHSPACE_MALLOC_TUNING"


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD,
                       trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep freed tensor memory in the process (glibc only).

    Sets `M_MMAP_THRESHOLD` (blocks below it come from the heap, not from `mmap`) and
    `M_TRIM_THRESHOLD` (free heap-top bytes kept instead of returned to the kernel) with
    `mallopt(3)`. Setting either disables glibc's dynamic threshold adjustment, so both are
    set together. Returns `True` when both settings were accepted, `False` on other C
    libraries (macOS, Windows, musl) or when `mallopt` refuses a value; nothing changes then.

    Args:
        mmap_threshold (int): bytes; at most 32 MiB on 64-bit glibc.
        trim_threshold (int): bytes.
    """
    if not 0 < mmap_threshold <= MMAP_THRESHOLD or not 0 < trim_threshold < 2**31:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD}] and "
                         f"trim_threshold in (0, 2**31); got {mmap_threshold}, {trim_threshold}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # either call switches glibc's dynamic adjustment of both thresholds off, so a tuning
    # with one of them left at its 128 KiB default would be worse than none
    ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    return ok and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1


def tuning_enabled() -> bool:
    """Whether the console script should call
    [`tune_cpu_allocator`][graphspace.runtime.tune_cpu_allocator] (the `GRAPHSPACE_MALLOC_TUNING`
    environment variable is unset or not `0`/`false`/`no`)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


#: ``madvise(2)`` advice asking for transparent huge pages (``MADV_HUGEPAGE``)
_MADV_HUGEPAGE = 14
_HUGE = 2 * 1024 * 1024
_libc = None


def empty_huge(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(size, dtype=dtype)`, with the kernel asked to back it by transparent
    huge pages before any page is touched (Linux, tensors of 8 MiB and more).

    A parameter graph of a 124M-parameter model writes ~7 GB of fresh edge arrays; faulting
    them in 4 KiB pages costs most of the conversion. `madvise(MADV_HUGEPAGE)` on the fresh
    range (the process-wide alternative is PyTorch's `THP_MEM_ALLOC_ENABLE=1`) cuts that by
    about 4x. Elsewhere, or if the kernel refuses, this is a plain `torch.empty`.
    """
    import torch

    t = torch.empty(size, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes < 4 * _HUGE or not sys.platform.startswith("linux"):
        return t
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        start = t.data_ptr()
        lo = (start + _HUGE - 1) // _HUGE * _HUGE  # whole huge pages inside the tensor
        hi = (start + nbytes) // _HUGE * _HUGE
        if hi > lo:
            _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass
    return t


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put `models` in eval mode inside the block and give every submodule its own mode back.

    `model.train(was)` on the root would set every submodule to the root's mode, so a model
    whose parts are in different modes (a BatchNorm frozen in eval inside a training model, a
    wrapper around a model in eval mode) would come back changed; this restores each module.
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was
