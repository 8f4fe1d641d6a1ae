"""What every `fastnca` subcommand shares: the usage error, argument types, and the common
options ``-o/--out``, ``--device auto|cpu|cuda[:N]|mps`` and ``--threads``."""

from __future__ import annotations

import argparse
import math
import sys


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def one_line_errors(parser: argparse.ArgumentParser, prog: str) -> None:
    """argparse errors as one line (``prog: error: ...``) and exit code 2, no usage dump."""

    def error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error


def _number(s: str, kind):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def positive_int(s: str) -> int:
    v = _number(s, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    v = _number(s, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = _number(s, float)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    v = _number(s, float)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def add_common(
    p: argparse.ArgumentParser,
    out_help: str | None,
    out_required: bool = False,
    device: bool = True,
) -> None:
    """``-o/--out`` (unless ``out_help`` is None), ``--device`` and ``--threads``."""
    if out_help is not None:
        p.add_argument(
            "-o", "--out", required=out_required, default=None, metavar="PATH", help=out_help
        )
    if device:
        p.add_argument(
            "--device",
            default="auto",
            metavar="auto|cpu|cuda|mps",
            help="auto (default: cuda when present, then mps, else cpu), cpu, cuda, cuda:N or mps",
        )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: the command's own choice)",
    )


def device_of(args):
    """The torch.device of ``--device`` (a UsageError when it does not exist here)."""
    from fastnca._device import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)
