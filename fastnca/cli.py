"""The `fastnca` command: one subcommand per module in fastnca/commands/.

Each command module defines ``add_parser(subparsers)`` (registering its arguments) and
``run(args) -> int``. A ``UsageError`` raised anywhere becomes a one-line message on stderr and
exit code 2 (no traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommands, in the order `fastnca --help` lists them; each is fastnca.commands.<name>.
COMMANDS = ["train", "render", "stylize", "bench"]


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnca", description="Fast Neural Cellular Automata and neural-style losses."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"fastnca.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"fastnca.commands.{name}":
                continue  # command not built yet
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"fastnca {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastnca {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m fastnca.cli` runs this file as __main__, a second copy of the module: call the
    # imported fastnca.cli.main so that the UsageError commands raise is the one caught there.
    from fastnca.cli import main as _main

    sys.exit(_main())
