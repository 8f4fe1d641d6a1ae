"""`fastnca render`: grow a trained NCA from a seed on any grid size and write an animation.

Examples:
    fastnca render runs/quick -o grow.gif                     # 60 frames, 8 steps apart
    fastnca render runs/quick/checkpoint.pt -o big.mp4 --size 320x200 --steps 1200
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastnca.cli._common import (
    UsageError,
    add_common,
    device_of,
    first_line,
    nonneg_int,
    positive_float,
    positive_int,
    set_threads,
)
from fastnca.cli._paths import writable_file

DEFAULT_FRAMES, DEFAULT_STEPS_PER_FRAME = 60, 8


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        hw = [int(v) for v in parts]
    except ValueError:
        raise UsageError(f"--size: expected N or HxW (e.g. 128 or 200x320), got {text!r}") from None
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise UsageError(f"--size: expected positive N or HxW (e.g. 128 or 200x320), got {text!r}")
    return hw[0], hw[1]


def frame_plan(steps: int | None, frames: int | None, spf: int | None) -> tuple[int, int]:
    """(frames, steps_per_frame) from any of --steps, --frames, --steps-per-frame."""
    for name, v in (("--steps", steps), ("--frames", frames), ("--steps-per-frame", spf)):
        if v is not None and v < 1:
            raise UsageError(f"{name}: expected a positive int, got {v}")
    if steps is None:
        return frames or DEFAULT_FRAMES, spf or DEFAULT_STEPS_PER_FRAME
    if frames is not None and spf is not None:
        if frames * spf != steps:
            raise UsageError(
                f"--steps {steps} != --frames {frames} x --steps-per-frame {spf}; "
                f"give two of the three"
            )
        return frames, spf
    if frames is not None:
        if frames > steps:
            raise UsageError(f"--frames {frames} is more than --steps {steps}")
        return frames, -(-steps // frames)
    if spf is not None:
        if spf > steps:
            raise UsageError(f"--steps-per-frame {spf} is more than --steps {steps}")
        return -(-steps // spf), spf
    frames = min(DEFAULT_FRAMES, steps)
    return frames, -(-steps // frames)


def add_parser(sub):
    p = sub.add_parser(
        "render",
        help="grow a trained NCA on any grid size: GIF/MP4 + final PNG",
        description="Grow the NCA of a checkpoint (or a `fastnca train` run directory, or a "
        "lesson state dict) from a seed grid of any size and write an animation: GIF with "
        "Pillow, MP4 with imageio-ffmpeg. The last frame is also saved as OUT with suffix .png. "
        "Checked before the rollout: OUT's folder is writable, the model's weights are finite, "
        f"--steps <= {10**6}, a GIF side (size x scale) <= 65535 px, and the frames fit in half "
        "of this machine's RAM.",
    )
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    add_common(p, "the animation to write: OUT.gif or OUT.mp4", out_required=True)
    p.add_argument("--size", default="128", help="grid size in cells: N or HxW (default 128)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"total NCA steps (default {DEFAULT_FRAMES * DEFAULT_STEPS_PER_FRAME})",
    )
    p.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        help=f"frames in the animation (default {DEFAULT_FRAMES})",
    )
    p.add_argument(
        "--steps-per-frame",
        type=positive_int,
        default=None,
        help=f"NCA steps between frames (default {DEFAULT_STEPS_PER_FRAME})",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed of the update masks")
    p.add_argument(
        "--fps", type=positive_float, default=20.0, help="frames per second (default 20)"
    )
    p.add_argument(
        "--scale",
        type=positive_int,
        default=None,
        help="upscale each cell to SCALE x SCALE pixels (default: to >= 256 px)",
    )
    return p


MAX_STEPS = 10**6  # every step runs the model on the whole grid: beyond this, hours per render
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer


def run(args) -> int:
    from fastnca.nca.render import ANIMATION_SUFFIXES, MissingDependencyError, render

    set_threads(args.threads)
    size = _size(args.size)
    frames, spf = frame_plan(args.steps, args.frames, args.steps_per_frame)
    if frames * spf > MAX_STEPS:
        raise UsageError(
            f"--steps: {frames * spf} steps is more than {MAX_STEPS} (every step runs "
            f"the model on the whole grid; such a render would take hours)"
        )
    if args.seed > MAX_SEED:
        raise UsageError(f"--seed: expected at most {MAX_SEED} (a 64-bit integer), got {args.seed}")
    if Path(args.out).suffix.lower() not in ANIMATION_SUFFIXES:
        raise UsageError(f"-o: expected a .gif or .mp4 file name, got {args.out!r}")
    out = writable_file(args.out, "-o")  # before the rollout, not after it
    writable_file(out.with_suffix(".png"), "-o")
    scale = args.scale if args.scale is not None else max(1, -(-256 // max(size)))
    device = device_of(args)
    try:
        res = render(
            args.checkpoint,
            args.out,
            size=size,
            frames=frames,
            steps_per_frame=spf,
            seed=args.seed,
            fps=args.fps,
            scale=scale,
            device=device,
        )
    except (ValueError, TypeError, MissingDependencyError) as e:
        raise UsageError(first_line(e)) from None
    h, w = res["size"]
    print(
        f"fastnca render: {res['frames']} frames ({res['steps']} steps), {w}x{h} px -> "
        f"{res['animation']} and {res['png']}",
        file=sys.stderr,
    )
    return 0
