"""Deprecated: `graphspace.zoo_cli` is now `graphspace zoo` (`graphspace.cli.zoo`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """`graphspace zoo ...` (`argv` without the `zoo` word); returns the exit status."""
    import sys

    from graphspace.cli import main as cli_main

    warnings.warn("graphspace.zoo_cli is deprecated; run `graphspace zoo` or call "
                  "graphspace.cli.main(['zoo', ...])", DeprecationWarning, stacklevel=2)
    return cli_main(["zoo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
