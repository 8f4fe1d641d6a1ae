"""`fastnca import`: the NCAs published with the Distill articles as fastnca checkpoints.

Examples:
    fastnca import models.json -o textures/                  # 66 texture NCAs, one .pt each
    fastnca import ex3_1f98e_lizard.json -o lizard/           # the regenerating lizard
    fastnca import models.json -o some/ --name bubbly_0101 --name dotted_0201
"""

from __future__ import annotations

import sys

from fastnca.cli._common import UsageError, add_common, first_line


def add_parser(sub):
    p = sub.add_parser(
        "import",
        help="convert published Distill NCA models into fastnca checkpoints",
        description="Read the Self-Organising Textures models.json (66 models) or a Growing NCA "
        "exN_<code>_<name>.json and write one fastnca checkpoint per model into OUT (a "
        "directory), configured as the authors' architecture: `fastnca render` and the "
        "exporter take them.",
    )
    p.add_argument("path", metavar="MODEL_FILE")
    add_common(p, "directory to write NAME.pt files into", out_required=True, device=False)
    p.add_argument(
        "--name",
        action="append",
        default=None,
        metavar="NAME",
        help="import only this model (repeatable; default: all in the file)",
    )
    return p


def run(args) -> int:
    from fastnca.nca.distill import import_distill, save_distill

    try:
        models = import_distill(args.path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(first_line(e)) from None
    if args.name:
        unknown = [n for n in args.name if n not in models]
        if unknown:
            raise UsageError(
                f"--name: {', '.join(unknown)} not in {args.path} (it holds "
                f"{', '.join(list(models)[:6])}{', ...' if len(models) > 6 else ''})"
            )
        models = {n: models[n] for n in args.name}
    try:
        paths = save_distill(models, args.out, source=str(args.path))
    except ValueError as e:
        raise UsageError(first_line(e)) from None
    print(f"fastnca import: {len(paths)} model(s) -> {args.out}", file=sys.stderr)
    return 0
