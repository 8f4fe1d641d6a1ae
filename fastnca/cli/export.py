"""`fastnca export`: one self-contained HTML page that runs a trained NCA live in the browser.

Examples:
    fastnca export zoo:stripes -o stripes.html            # a model shipped with fastnca
    fastnca export runs/quick -o nca.html --size 192       # a `fastnca train` run directory
    fastnca export model.pt -o nca.html --steps-per-frame 4
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastnca.cli._common import UsageError, first_line, positive_int

DISPLAYS = ("auto", "rgb", "rgb/2", "premultiplied")
SEEDS = ("auto", "zeros", "centre", "noise")


def _size(text: str) -> tuple[int, int]:
    try:
        hw = [int(v) for v in text.lower().split("x")]
    except ValueError:
        hw = []
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or not all(1 <= v <= 1024 for v in hw):
        raise UsageError(f"--size: expected N or HxW with 1..1024 cells a side, got {text!r}")
    return hw[0], hw[1]


def load_source(source: str):
    """(model, name) of a checkpoint file, a run directory or ``zoo:NAME`` (UsageError if not)."""
    from fastnca.nca.checkpoint import load_checkpoint
    from fastnca.nca.zoo import is_zoo_name, zoo_path

    try:
        path = zoo_path(source) if is_zoo_name(source) else source
        ckpt = load_checkpoint(path)
        model = ckpt.build_model()
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
        raise UsageError(first_line(e)) from None
    p = Path(source)
    name = source[len("zoo:") :] if is_zoo_name(source) else p.name if p.is_dir() else p.stem
    return model, name


def add_parser(sub):
    p = sub.add_parser(
        "export",
        help="a self-contained HTML page (WebGL2) that runs a trained NCA live",
        description="Write one HTML file that runs the NCA of a checkpoint, a `fastnca train` run "
        "directory or zoo:NAME (see `fastnca zoo`) in the browser with WebGL2: no network, no "
        "other files (the weights are inside). Controls: play/pause, steps per frame, reset to "
        "a seed, a brush that erases cells, zoom and grid size.",
    )
    p.add_argument("source", metavar="CKPT|RUN_DIR|zoo:NAME")
    p.add_argument("-o", "--out", required=True, metavar="OUT.html", help="the page to write")
    p.add_argument("--size", default="128", help="initial grid in cells: N or HxW (default 128)")
    p.add_argument(
        "--steps-per-frame",
        type=positive_int,
        default=1,
        help="NCA steps per animation frame at start (default 1; 1..64)",
    )
    p.add_argument(
        "--display",
        choices=DISPLAYS,
        default="auto",
        help="auto (default: the model's own; growing models premultiplied RGBA on white), "
        "rgb (x[:3] + 0.5), rgb/2 (x[:3] / 2 + 0.5) or premultiplied",
    )
    p.add_argument(
        "--seed-state",
        choices=SEEDS,
        default="auto",
        help="state after reset: auto (default: centre cell for growing models, else "
        "zeros), zeros, centre or noise",
    )
    p.add_argument("--name", default=None, help="title shown on the page (default: the source)")
    return p


def run(args) -> int:
    from fastnca.nca.export import export_html

    size = _size(args.size)
    model, name = load_source(args.source)
    try:
        path = export_html(
            model,
            args.out,
            name=args.name or name,
            grid=size,
            display=args.display,
            seed=args.seed_state,
            steps_per_frame=args.steps_per_frame,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(first_line(e)) from None
    kb = path.stat().st_size / 1024
    print(
        f"fastnca export: {args.source} -> {path} ({kb:.0f} KB, {model.channels} channels, "
        f"{model.hidden} hidden); open it in a browser",
        file=sys.stderr,
    )
    return 0
