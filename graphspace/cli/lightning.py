"""`graphspace fit|validate|test|predict`: LightningCLI over graphspace's tasks.

`--config` takes a file or the name of a bundled example config (`graphspace configs
list`). The LightningCLI itself lives in `graphspace.tasks.cli`, imported only when a verb runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from graphspace.cli.configs import resolve


def resolve_configs(argv: Sequence[str]) -> list[str]:
    """Replace bundled config names after `--config`/`-c` by their paths."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + resolve(a.split("=", 1)[1])
    return out


def run(argv: Sequence[str], debug: bool = False) -> int:
    """Run LightningCLI with `argv` (the verb first)."""
    argv = resolve_configs(argv)
    from graphspace.tasks.cli import main

    # LightningCLI warns when it gets `args` while sys.argv holds arguments too: it gets them
    # only through `args`
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return int(main(argv, exit_on_error=False) or 0)
    finally:
        sys.argv = saved
