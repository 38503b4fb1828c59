"""The `graphspace` command: one root parser, one subcommand per module of this package.

Each subcommand module defines `NAME`, `HELP` (its one-line description), `add_arguments(p)`
and `run(args) -> int`; the root parser imports them without importing torch, so
`graphspace --help` answers quickly. The Lightning verbs (`fit`, `validate`, `test`,
`predict`) hand their arguments to LightningCLI (`graphspace.cli.lightning`).

Errors are reported the same way by every subcommand: one line
`graphspace <cmd>: error: ...` on stderr and exit status 1 (2 for usage errors); `--debug`
(anywhere on the command line) prints the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

from graphspace import __version__
from graphspace.cli._common import CLIError, Parser, missing_extra_message

# subcommand modules, in the order `--help` lists them
COMMANDS = ("convert", "info", "merge", "zoo", "configs")
LIGHTNING_VERBS = {
    "fit": "train a task from a config (LightningCLI), then test the best checkpoint",
    "validate": "run a task's validation loop from a config (LightningCLI)",
    "test": "test a task from a config (LightningCLI); prints and saves its results table",
    "predict": "run a task's predict loop from a config (LightningCLI)",
}

__all__ = ["CLIError", "main"]


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="graphspace",
               description="Learning on neural-network weights: parameter graphs, model zoos, "
                           "merging and Lightning tasks.",
               epilog="`graphspace COMMAND --help` shows a command's options; --debug prints "
                      "tracebacks.")
    p.add_argument("--version", action="version", version=f"graphspace {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f"graphspace.cli.{name}")
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    for verb, text in LIGHTNING_VERBS.items():
        sub.add_parser(verb, help=text, description=text, add_help=False)
    return p


def report_error(cmd: str, e: BaseException, debug: bool) -> int:
    """Print `e` as one line (and its traceback with `debug`); return the exit status."""
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__)
    msg = None
    # a bad input: the traceback would not help
    plain = isinstance(e, (CLIError, argparse.ArgumentError))
    if isinstance(e, ModuleNotFoundError) and e.name:
        msg = missing_extra_message(e.name)
        plain = msg is not None
        msg = msg or f"no module named {e.name!r}"
    if msg is None:
        lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
        msg = lines[0] if lines else type(e).__name__
        if not isinstance(e, (CLIError, OSError, ValueError, KeyError,
                              argparse.ArgumentError)) and \
                type(e).__name__ not in msg:
            msg = f"{type(e).__name__}: {msg}"
    prog = f"graphspace {cmd}" if cmd else "graphspace"
    print(f"{prog}: error: {msg}" + ("" if debug or plain else " (--debug shows the traceback)"),
          file=sys.stderr)
    return 1


def run_command(cmd: str, fn: Callable[[], int | None], debug: bool) -> int:
    """Run one subcommand with the shared error reporting."""
    try:
        return int(fn() or 0)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(f"graphspace {cmd}: error: {e.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"graphspace {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error is one line; --debug for the traceback
        return report_error(cmd, e, debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `graphspace` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    if debug:
        argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < end)]
    from graphspace.runtime import tune_cpu_allocator, tuning_enabled

    if tuning_enabled():  # a launcher-level setting: see graphspace.runtime
        tune_cpu_allocator()
    if argv and argv[0] in LIGHTNING_VERBS:
        from graphspace.cli import lightning

        return run_command(argv[0], lambda: lightning.run(argv, debug=debug), debug)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version or a usage error (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(args.command, lambda: args.func(args), debug)


if __name__ == "__main__":
    raise SystemExit(main())
