"""Small helpers shared by the merging modules (batches, devices, state dicts)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`"auto"`/`None` -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def batch_input(batch: Any) -> Any:
    """The model input of a batch: a tensor, the first item of a tuple/list, or `batch["x"]`."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        for k in ("x", "input", "inputs", "image", "images"):
            if k in batch:
                return batch[k]
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}; "
                    "use tensors, (input, target) pairs or dicts with key 'x'")


def batch_target(batch: Any) -> Tensor | None:
    """The target of a batch (second item of a tuple/list or `batch["y"]`), if any."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, Mapping):
        for k in ("y", "target", "targets", "label", "labels"):
            if k in batch:
                return batch[k]
    return None


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def iterate(loader: Iterable, num_batches: int | None) -> Iterator:
    """The first `num_batches` batches of `loader` (all when `None`)."""
    if loader is None:
        raise ValueError("this merging step needs data: pass a loader of input batches")
    return iter(loader) if num_batches is None else itertools.islice(loader, num_batches)


def model_device(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def state_of(model_or_sd: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detached state dict (the model is not touched)."""
    if isinstance(model_or_sd, nn.Module):
        return {k: v.detach() for k, v in model_or_sd.state_dict().items()}
    return {k: v.detach() for k, v in model_or_sd.items()}


def weighted_average(states: Sequence[Mapping[str, Tensor]],
                     weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    r"""$\sum_k w_k \theta_k$ for floating-point entries; integer entries (e.g.
    `num_batches_tracked`) are taken from the first state dict."""
    k = len(states)
    w = [1.0 / k] * k if weights is None else [float(x) for x in weights]
    if len(w) != k:
        raise ValueError(f"{len(w)} weights for {k} models")
    out: dict[str, Tensor] = {}
    for key, t0 in states[0].items():
        if t0.is_floating_point():
            acc = torch.zeros_like(t0, dtype=torch.float64)
            for wi, s in zip(w, states):
                acc += wi * s[key].to(acc.device, torch.float64)
            out[key] = acc.to(t0.dtype)
        else:
            out[key] = t0.clone()
    return out


def with_state(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of `template` holding `state` (`template` is not modified)."""
    new = copy.deepcopy(template)
    new.load_state_dict(dict(state))
    return new
