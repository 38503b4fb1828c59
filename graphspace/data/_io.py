"""Atomic writes of files meant to be shared (mode from the umask, not mkstemp's 0600)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from graphspace.io import atomic_write


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """:func:`graphspace.io.atomic_write` whose result gets the default file mode
    (``0o666 & ~umask``)."""
    mode = 0o666 & ~_umask()

    def inner(tmp: str) -> None:
        write(tmp)
        os.chmod(tmp, mode)

    return atomic_write(path, inner)


def save_torch(path: str | os.PathLike, obj: object) -> Path:
    """``torch.save`` ``obj`` atomically; the bytes do not depend on the (temporary) file name,
    so equal objects give identical files."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write_file(path, write)
