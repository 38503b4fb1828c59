"""Atomic writes of zoo files (one implementation: `graphspace.io.atomic_write`)."""

from __future__ import annotations

import os
from pathlib import Path

from graphspace.io import atomic_write

# the zoo code's historical name; the mode (`0o666 & ~umask`) is set by `atomic_write` itself
write_file = atomic_write


def save_torch(path: str | os.PathLike, obj: object) -> Path:
    """`torch.save` `obj` atomically; the bytes do not depend on the (temporary) file name,
    so equal objects give identical files."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)
