"""Subcommands of the `fastnca` CLI (see fastnca/cli.py): add_parser(sub) and run(args)."""
