"""Backend selection for `graphspace.ops` (one dispatch point for every op).

Three backends implement the ops:

* `"triton"`: Triton kernels (`graphspace.ops._triton`), CUDA tensors only, or any device
  when `TRITON_INTERPRET=1` is set (the Triton interpreter, used by the CPU test-suite).
* `"torch_scatter"`: the `torch_scatter` extension, when it is installed. It has no fused
  kernels, so the fused ops materialise their messages first when this backend is forced.
* `"torch"`: plain PyTorch (`graphspace.ops._torch`): CSR sparse-dense products and
  chunked gather/`index_add_` loops that never hold the whole `E x F` message tensor.

`auto` picks `triton` for CUDA tensors when Triton imports, else `torch_scatter` for the
plain scatter/segment reductions when it is installed, else `torch`. The environment variable
`GRAPHSPACE_OPS_BACKEND` (or the `backend=` argument of each op, which wins) forces one.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from functools import cache

import torch

BACKENDS: tuple[str, ...] = ("torch", "torch_scatter", "triton")
ENV_VAR = "GRAPHSPACE_OPS_BACKEND"

#: ops that ``torch_scatter`` implements natively (the others materialise messages with it).
_TORCH_SCATTER_NATIVE = frozenset({"scatter", "segment"})

_state = threading.local()


@cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_available(name: str, device: torch.device | str | None = None) -> bool:
    """Whether backend `name` can run ops on `device` in this process."""
    if name == "torch":
        return True
    if name == "torch_scatter":
        return _importable("torch_scatter")
    if name == "triton":
        if not _importable("triton"):
            return False
        dev = torch.device(device) if device is not None else None
        return _interpret() or (dev is not None and dev.type == "cuda")
    raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: CPU), best first."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return [b for b in ("triton", "torch_scatter", "torch") if backend_available(b, device)]


def resolve_backend(
    device: torch.device | str, op: str = "scatter", backend: str | None = None
) -> str:
    """The backend that `op` runs on for tensors on `device`.

    Args:
        device: device of the op's inputs.
        op: `"scatter"`, `"segment"` or a fused op name (`"weighted_aggregate"`, ...).
        backend: `None`/`"auto"` to follow `ENV_VAR` (default `auto`), or one of
            `BACKENDS` to force it.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: a forced backend cannot run here (not installed, or Triton on a CPU
            tensor without `TRITON_INTERPRET=1`).
    """
    dev = torch.device(device)
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower() or "auto"
    if choice == "auto":
        if dev.type == "cuda" and backend_available("triton", dev):
            return "triton"
        if op in _TORCH_SCATTER_NATIVE and backend_available("torch_scatter", dev):
            return "torch_scatter"
        return "torch"
    if choice not in BACKENDS:
        raise ValueError(
            f"unknown ops backend {choice!r} (from {'argument' if backend else ENV_VAR}); "
            f"choose from {('auto',) + BACKENDS}"
        )
    if not backend_available(choice, dev):
        if choice == "triton" and _importable("triton"):
            why = f"Triton kernels need CUDA tensors (got {dev.type}); set TRITON_INTERPRET=1 " \
                  "to run them in the Triton interpreter"
        else:
            why = f"the {choice!r} package is not installed"
        raise RuntimeError(f"ops backend {choice!r} was forced but cannot run: {why}")
    return choice


def _record(name: str) -> None:
    _state.last = name


def last_backend() -> str | None:
    """Name of the backend that ran the most recent op in this thread (`None` before any).

    Ops traced by `torch.compile` do not record (they lower to plain torch for Inductor).
    """
    return getattr(_state, "last", None)
