"""Deprecated: `graphspace.merge.cli` is now `graphspace merge` (`graphspace.cli.merge`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """`graphspace merge ...` (`argv` without the `merge` word); returns the exit status."""
    import sys

    from graphspace.cli import main as cli_main

    warnings.warn("graphspace.merge.cli is deprecated; run `graphspace merge` or call "
                  "graphspace.cli.main(['merge', ...])", DeprecationWarning, stacklevel=2)
    return cli_main(["merge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
