"""`graphspace configs`: the example experiment configs that ship with graphspace."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from graphspace.cli._common import CLIError, Parser

NAME = "configs"
HELP = "list the bundled example configs or copy one to edit (fit --config NAME runs one)"


def bundled_dir() -> Path | None:
    """Where the example configs are: `graphspace/configs/` in an installed wheel, the
    repository's `experiments/` in a checkout or an editable install."""
    pkg = Path(__file__).resolve().parents[1]
    for d in (pkg / "configs", pkg.parent / "experiments"):
        if d.is_dir() and any(d.glob("*.yaml")):
            return d
    return None


def names() -> list[str]:
    d = bundled_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d is not None else []


def resolve(value: str) -> str:
    """A `--config` value: an existing file as given, else the bundled config of that name
    (with or without `.yaml`); anything else is a one-line `CLIError`."""
    if os.path.exists(value):
        return value
    d = bundled_dir()
    stem = value[:-5] if value.endswith(".yaml") else value
    stem = os.path.basename(stem) if os.path.dirname(stem) in ("experiments", "") else None
    if d is not None and stem is not None and (d / f"{stem}.yaml").is_file():
        return str(d / f"{stem}.yaml")
    raise CLIError(f"--config {value!r}: no such file and no bundled config of that name "
                   f"(bundled: {', '.join(names()) or 'none'})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    sub.add_parser("list", help="list the bundled configs")
    c = sub.add_parser("copy", help="copy a bundled config to DEST (a file or directory)")
    c.add_argument("name", help="config name, e.g. generalization_digits")
    c.add_argument("dest", nargs="?", default=".", help="destination (default: .)")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    s = sub.add_parser("path", help="print the path of a bundled config")
    s.add_argument("name")


def run(a: argparse.Namespace) -> int:
    if a.action == "list":
        d = bundled_dir()
        for n in names():
            first = (d / f"{n}.yaml").read_text().splitlines()[:1]
            about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
            print(f"{n:32s} {about}".rstrip())
        return 0
    src = Path(resolve(a.name))
    if a.action == "path":
        print(src)
        return 0
    dest = Path(a.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not a.force:
        raise CLIError(f"{str(dest)!r} exists; pass --force to overwrite it")
    from graphspace.io import atomic_write

    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    print(f"copied {src.name} -> {dest}")
    return 0
