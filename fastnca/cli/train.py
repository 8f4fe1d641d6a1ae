"""`fastnca train`: train a texture NCA on a style image (or a built-in texture).

Examples:
    fastnca train -o runs/quick                       # built-in texture, quick preset (CPU minutes)
    fastnca train bricks.jpg -o runs/bricks --preset texture --compile --amp bf16
    fastnca train --resume runs/bricks --iters 6000   # continue the same run and loss curve
"""

from __future__ import annotations

import sys

from fastnca.cli._common import (
    UsageError,
    add_common,
    first_line,
    nonneg_int,
    positive_float,
    positive_int,
)
from fastnca.cli._paths import writable_dir

# CLI option -> TrainConfig field (None: not given, the preset's value is used).
_OPTIONS = (
    "iters",
    "size",
    "batch",
    "pool",
    "channels",
    "hidden",
    "min_steps",
    "max_steps",
    "lr",
    "style_weight",
    "loss",
    "weights",
    "device",
    "amp",
    "seed",
    "texture",
    "threads",
)


def add_parser(sub):
    from fastnca.nca.config import LOSSES, PRESETS

    p = sub.add_parser(
        "train",
        help="train a texture NCA (outputs: checkpoint, pool.png, loss.png, growth.gif)",
        description="Train a Neural Cellular Automaton that grows and keeps the texture of "
        "STYLE_IMAGE (default: a texture built into fastnca, so it needs no files). Writes "
        "RUN_DIR/config.json, checkpoint.pt (weights and the whole resume state), style.png, "
        "pool.png, loss.png and growth.gif. Ctrl-C or SIGTERM finishes the iteration, saves and "
        "exits (130/143); --resume RUN_DIR continues exactly. Network: with --weights auto "
        "(default) the ImageNet VGG16 weights come from the torch hub cache, else are downloaded "
        "once (528 MB, progress on stderr, at most FASTNCA_DOWNLOAD_DEADLINE seconds, default "
        "600), else the offline fallback features are used; FASTNCA_OFFLINE=1, --weights random "
        "or --weights FILE never download. Limits, checked before any work: --size >= 16, a "
        "style image whose shorter side falls under 16 px when shrunk to --size is refused, "
        "--channels >= 3, --iters <= 1000000, and the estimated memory within half of this "
        "machine's RAM.",
    )
    p.add_argument(
        "style",
        nargs="?",
        metavar="STYLE_IMAGE",
        help="style image file (PNG/JPEG) or builtin:NAME (default: --texture, else "
        "the preset's: 'stripes' for quick, 'scales' otherwise)",
    )
    add_common(p, "run directory to create (RUN_DIR)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument(
        "--task",
        choices=("texture", "grow"),
        default="texture",
        help="texture (default) or grow: a growing NCA of an RGBA target "
        "(STYLE_IMAGE or a built-in target: heart, ring, smiley); presets quick "
        "(= grow-quick) and grow",
    )
    p.add_argument(
        "--preset",
        default="quick",
        metavar="|".join(PRESETS),
        help="quick (CPU, minutes), lesson (fast.ai lesson), texture (Distill "
        "Self-Organising Textures); default quick",
    )
    for name, typ, what in (
        ("iters", positive_int, "training iterations"),
        ("size", positive_int, "grid side in cells"),
        ("batch", positive_int, "grids per iteration"),
        ("pool", positive_int, "grids in the pool"),
        ("channels", positive_int, "state channels"),
        ("hidden", positive_int, "hidden units"),
        ("min-steps", positive_int, "fewest NCA steps per iteration"),
        ("max-steps", positive_int, "most NCA steps per iteration (exclusive)"),
        ("lr", positive_float, "Adam learning rate"),
        ("style-weight", float, "weight of the style term"),
    ):
        p.add_argument(f"--{name}", type=typ, default=None, help=f"{what} (default: preset's)")
    p.add_argument(
        "--loss",
        default=None,
        metavar="|".join(LOSSES),
        help="style loss: gram (Gram matrices) or swd (sliced Wasserstein)",
    )
    p.add_argument("--texture", default=None, help="built-in texture to use without STYLE_IMAGE")
    p.add_argument(
        "--weights",
        default=None,
        metavar="auto|imagenet|random|FILE",
        help="VGG16 weights (default auto: torchvision cache, else a download unless "
        "FASTNCA_OFFLINE=1, else the offline fallback features)",
    )
    p.add_argument("--amp", default=None, metavar="none|bf16", help="mixed precision")
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the NCA step (once) and the style loss",
    )
    p.add_argument("--seed", type=nonneg_int, default=None, help="random seed (default 0)")
    p.add_argument(
        "--gif-frames",
        type=positive_int,
        default=48,
        help="frames of growth.gif, 8 steps apart (default 48)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _refuse_if_locked(run_dir) -> None:
    """A run directory held by a running `fastnca train` is refused at once, naming its pid
    (probed with a shared lock that conflicts with the owner's exclusive one; writes nothing)."""
    import fcntl
    from pathlib import Path

    from fastnca.nca.rundir import LOCK_NAME

    lock = Path(run_dir).expanduser() / LOCK_NAME
    if not lock.is_file():
        return
    try:
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = f.read().strip() or "?"
                raise UsageError(
                    f"{str(lock.parent)!r} is in use by another fastnca train (pid "
                    f"{pid}); wait for it or choose another directory"
                ) from None
    except OSError:
        return  # unreadable lock file: RunLock decides when the run starts


def run(args) -> int:
    if args.task == "grow":
        from fastnca.cli._grow import run_grow

        return run_grow(args)
    from fastnca.nca.recipe import TrainingDiverged
    from fastnca.nca.render import MissingDependencyError
    from fastnca.nca.run import TrainingRun
    from fastnca.nca.rundir import RunDirBusy, TrainingStopped

    if args.resume is None and args.out is None:
        raise UsageError("give -o RUN_DIR (a new run directory) or --resume RUN_DIR")
    if args.resume is not None and (args.out is not None or args.style is not None):
        raise UsageError("--resume RUN_DIR continues that run: drop -o and STYLE_IMAGE")
    _refuse_if_locked(args.out or args.resume)
    if args.out is not None:
        writable_dir(args.out, "-o")  # before any work: a read-only place or a file in the way
    overrides = {k: getattr(args, k) for k in _OPTIONS}
    overrides["compile"] = args.compile
    try:
        plan = TrainingRun(args.style, args.out, args.preset, resume=args.resume, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(first_line(e)) from None
    except KeyboardInterrupt:  # while checking the inputs: nothing was written
        if args.resume is None:
            raise
        print(
            f"fastnca train: interrupted before training; {args.resume} is unchanged; continue "
            f"with: fastnca train --resume {args.resume}",
            file=sys.stderr,
        )
        return 130
    cfg = plan.cfg
    print(
        f"fastnca train: {cfg.preset} preset, {cfg.size}x{cfg.size} grids, {cfg.channels} "
        f"channels, {cfg.hidden} hidden, {plan.style_what}, {plan.device}, iterations "
        f"{plan.done + 1}..{cfg.iters} -> {plan.run_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        res = plan.run(progress=not args.no_progress, gif_frames=args.gif_frames)
    except TrainingStopped as e:
        print(f"fastnca train: {e}", file=sys.stderr)
        return e.exit_code
    except (RunDirBusy, TrainingDiverged, MissingDependencyError) as e:
        raise UsageError(first_line(e)) from None
    n = len(res.losses) - plan.done
    print(
        f"fastnca train: {n} iterations in {res.seconds:.1f} s "
        f"({res.seconds / max(1, n):.3f} s/iteration), final loss {res.losses[-1]:.4g}; wrote "
        f"{', '.join(p.name for p in res.files.values())} in {res.run_dir}",
        file=sys.stderr,
    )
    return 0
