"""Safe checkpoint and graph files: `weights_only` loading, safetensors, atomic writes."""

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
    """The process umask, read without changing it where the OS allows (Linux reads it from
    `/proc`; elsewhere it is set and restored, which is not thread-safe but brief)."""
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
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it into place,
    so a crash never leaves a half-written `path`.

    The result gets the mode a plain `open(path, "w")` would give (`0o666 & ~umask`), not
    `mkstemp`'s 0600. The mode is set after `write` ran, because writers such as safetensors'
    `save_file` replace the file and would drop a mode set before.

    Args:
        path: the final file.
        write: writes the whole content to the path it is given.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: missing, empty, truncated, corrupt or mislabelled."""


_ZIP_MAGIC = b"PK\x03\x04"


def _sniff(path: Path) -> str:
    """What the first bytes of a file look like: 'zip' (torch.save), 'pickle' (legacy
    torch.save), 'safetensors' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, Tensor]:
    """Load a state dict from a `.safetensors` file or a `torch.save` checkpoint.

    `torch.load` runs with `weights_only=True`: a checkpoint that needs code to be unpickled
    raises `UntrustedCheckpointError`. Checkpoints that wrap the state dict
    (`{"state_dict": ...}`, `{"model": ...}`, Lightning checkpoints) are unwrapped; `key`
    picks the entry explicitly. Lightning's `model.` prefix is kept as saved.

    Args:
        path: the checkpoint file.
        key: entry of the checkpoint that holds the state dict.

    Returns:
        the state dict (name -> tensor).

    Raises:
        CheckpointError: the file is missing, unreadable, empty, truncated, corrupt, in the
            other format than its suffix says, or holds no state dict; the message names it.
        UntrustedCheckpointError: unpickling would run code.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        kind = _sniff(path)
    except IsADirectoryError:
        raise CheckpointError(f"'{path}' is a directory, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if kind in ("zip", "pickle"):
            raise CheckpointError(
                f"'{path}' is a torch.save file named .safetensors; rename it to .pt (it is "
                "then loaded with weights_only=True)")
        try:
            return load_file(str(path))
        except (SafetensorError, Exception) as e:
            raise CheckpointError(
                f"'{path}' is not a readable safetensors file (truncated or corrupt: "
                f"{_first_line(e)})") from None
    if kind == "safetensors":
        raise CheckpointError(
            f"'{path}' looks like a safetensors file; rename it to .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or \
                "weights_only" in msg:
            raise UntrustedCheckpointError(
                f"refusing to load '{path}': it needs arbitrary code to be unpickled "
                f"({_first_line(e)}). Re-save it as a plain state dict "
                "(torch.save(model.state_dict(), ...)) or as safetensors."
            ) from e
        raise CheckpointError(
            f"'{path}' is not a readable torch.save file (corrupt: {_first_line(e)})") from None
    except Exception as e:  # EOFError, RuntimeError, IndexError, ...: whatever the bytes cause
        raise CheckpointError(
            f"'{path}' is not a readable torch.save file (truncated or corrupt: "
            f"{_first_line(e)})") from None
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(map(str, obj))[:8] if isinstance(obj, dict) else []
            raise CheckpointError(f"'{path}' has no entry {key!r} (entries: {have})")
        obj = obj[key]
    elif isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for k in ("state_dict", "model", "model_state_dict", "module"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors")
    return obj


def save_state_dict(state_dict: dict[str, Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict atomically (safetensors for `.safetensors`, else `torch.save`)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        return atomic_write(path, lambda p: save_file(sd, p, metadata=metadata))
    return atomic_write(path, lambda p: torch.save(sd, p))


def import_object(spec: str) -> Any:
    """Import `"package.module:attribute"` or a dotted class path `"package.module.Class"`
    (the configs' `class_path`)."""
    if ":" in spec:
        mod, attr = spec.split(":", 1)
    elif "." in spec:
        mod, attr = spec.rsplit(".", 1)
    else:
        raise ValueError(f"expected 'package.module.Class' or 'package.module:attribute', "
                         f"got {spec!r}")
    try:
        obj: Any = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and (mod == e.name or mod.startswith(e.name + ".")):
            raise ValueError(f"cannot import {spec!r}: no module named {e.name!r}") from None
        raise
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"cannot import {spec!r}: {mod!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _instantiate(value: Any) -> Any:
    """`{"class_path": ..., "init_args": {...}}` mappings (nested too) -> objects."""
    if isinstance(value, dict) and "class_path" in value:
        extra = set(value) - {"class_path", "init_args"}
        if extra:
            raise ValueError(f"unexpected keys {sorted(extra)} next to class_path "
                             f"{value['class_path']!r} (expected class_path, init_args)")
        args = value.get("init_args") or {}
        if not isinstance(args, dict):
            raise ValueError(f"init_args of {value['class_path']!r} must be a mapping, got "
                             f"{type(args).__name__}")
        return build_model(value["class_path"], args, _check=False)
    if isinstance(value, dict):
        return {k: _instantiate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_instantiate(v) for v in value]
    return value


def build_model(spec: str | dict[str, Any], kwargs: dict[str, Any] | None = None,
                _check: bool = True) -> nn.Module:
    """Instantiate a model the way the configs name it.

    Args:
        spec: a class path (`"package.module.Class"`), a factory (`"package.module:factory"`)
            or a mapping `{"class_path": ..., "init_args": {...}}`; init args may themselves be
            such mappings.
        kwargs: keyword arguments (init args), merged over the mapping's `init_args`.

    Returns:
        the model.

    Raises:
        ValueError: the class path cannot be imported or its arguments do not fit (one line).
        TypeError: the factory returned something other than an `nn.Module`.
    """
    if isinstance(spec, dict):
        if "class_path" not in spec:
            raise ValueError(f"a model mapping needs 'class_path', got keys {sorted(spec)}")
        kwargs = {**(spec.get("init_args") or {}), **(kwargs or {})}
        spec = spec["class_path"]
    factory = import_object(spec)
    if not callable(factory):
        raise ValueError(f"{spec!r} is not a class or factory")
    args = _instantiate(dict(kwargs or {}))
    try:
        model = factory(**args)
    except TypeError as e:
        raise ValueError(f"cannot build {spec!r} with init_args {sorted(args)}: "
                         f"{_first_line(e)}") from None
    if _check and not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model
