"""The `fastnca` command: one subcommand per module of this package.

Each command module defines ``add_parser(subparsers)`` (registering its arguments, with the
shared options of ``_common``) and ``run(args) -> int``. A ``UsageError`` (bad input) is one line
on stderr and exit code 2; any other error is one line and exit code 1 (``FASTNCA_DEBUG=1``
shows the traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fastnca.cli._common import UsageError, first_line, one_line_errors

# Subcommands, in the order `fastnca --help` lists them; each is fastnca.cli.<name>.
COMMANDS = ["train", "render", "stylize", "bench", "import", "export", "zoo", "doctor"]

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnca", description="Fast Neural Cellular Automata and neural-style losses."
    )
    one_line_errors(parser, "fastnca")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"fastnca.cli.{name}")
        p = mod.add_parser(sub)
        one_line_errors(p, f"fastnca {name}")
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    prog = f"fastnca {args.command}"
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("FASTNCA_DEBUG") == "1":
            raise
        print(
            f"{prog}: error: {first_line(e)} ({type(e).__name__}; FASTNCA_DEBUG=1 shows the "
            f"traceback)",
            file=sys.stderr,
        )
        return 1
