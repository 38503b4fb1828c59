"""Safe checkpoint and graph files: ``weights_only`` loading, safetensors, atomic writes."""

from __future__ import annotations

import importlib
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint would need arbitrary code to be unpickled; it is refused."""


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into
    place, so a crash never leaves a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp creates the file 0600; give the result the usual umask-derived mode
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, Tensor]:
    """Load a state dict from a ``.safetensors`` file or a ``torch.save`` checkpoint.

    ``torch.load`` runs with ``weights_only=True``: a checkpoint that needs code to be
    unpickled raises :class:`UntrustedCheckpointError`. Checkpoints that wrap the state dict
    (``{"state_dict": ...}``, ``{"model": ...}``, Lightning checkpoints) are unwrapped; ``key``
    picks the entry explicitly. Lightning's ``model.`` prefix is kept as saved.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"refusing to load '{path}': it needs arbitrary code to be unpickled "
            f"({str(e).splitlines()[0]}). Re-save it as a plain state dict "
            "(torch.save(model.state_dict(), ...)) or as safetensors."
        ) from e
    if key is not None:
        obj = obj[key]
    elif isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for k in ("state_dict", "model", "model_state_dict", "module"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' does not hold a state dict of tensors")
    return obj


def save_state_dict(state_dict: dict[str, Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict atomically (safetensors for ``.safetensors``, else ``torch.save``)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        return atomic_write(path, lambda p: save_file(sd, p, metadata=metadata))
    return atomic_write(path, lambda p: torch.save(sd, p))


def import_object(spec: str) -> Any:
    """Import ``"package.module:attribute"`` (e.g. a model factory)."""
    if ":" not in spec:
        raise ValueError(f"expected 'package.module:attribute', got {spec!r}")
    mod, attr = spec.split(":", 1)
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a model from ``"package.module:Factory"``."""
    factory = import_object(spec)
    model = factory(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model
