"""`fastnca train --task grow`: the growing-NCA recipe (fastnca.nca.grow) behind `fastnca train`.

    fastnca train --task grow -o runs/heart                    # built-in target, grow-quick
    fastnca train --task grow lizard.png -o runs/liz --preset grow

``run_grow(args)`` takes the parsed `fastnca train` arguments: STYLE_IMAGE is the target (an
RGBA image, an image on white, or a built-in target name), ``--size`` the target's longest side,
``--preset`` quick (-> grow-quick) or grow, and the shared numeric options; the texture-only
options are refused with a one-line error.
"""

from __future__ import annotations

import sys

from fastnca.cli._common import UsageError, first_line

# fastnca train option -> GrowConfig field
_MAP = {
    "iters": "iters",
    "size": "target_size",
    "batch": "batch",
    "pool": "pool",
    "channels": "channels",
    "hidden": "hidden",
    "min_steps": "min_steps",
    "max_steps": "max_steps",
    "lr": "lr",
    "seed": "seed",
    "threads": "threads",
}
_TEXTURE_ONLY = ("resume", "loss", "texture", "weights", "amp", "compile", "style_weight")


def run_grow(args) -> int:
    from fastnca.nca.grow import PRESETS, train_grow

    given = [f"--{k.replace('_', '-')}" for k in _TEXTURE_ONLY if getattr(args, k, None)]
    if given:
        raise UsageError(f"{', '.join(given)}: not used by --task grow (texture training only)")
    if getattr(args, "out", None) is None:
        raise UsageError("give -o RUN_DIR (a new run directory)")
    preset = {"quick": "grow-quick"}.get(args.preset, args.preset)
    if preset not in PRESETS:
        raise UsageError(
            f"--preset: --task grow has presets {', '.join(PRESETS)} (quick = "
            f"grow-quick), got {args.preset!r}"
        )
    overrides = {f: getattr(args, k) for k, f in _MAP.items() if getattr(args, k, None) is not None}
    if getattr(args, "device", "auto") not in (None, "auto", "cpu"):
        raise UsageError("--device: --task grow trains on the CPU for now")
    try:
        res = train_grow(
            args.style,
            args.out,
            preset,
            progress=not getattr(args, "no_progress", False),
            **overrides,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(first_line(e)) from None
    n = len(res["losses"])
    print(
        f"fastnca train --task grow: {res['target']}, {n} iterations in {res['seconds']:.1f} s, "
        f"final loss {res['losses'][-1]:.4g}, growth MSE {res['mse']:.4g}; wrote "
        f"{', '.join(p.name for p in res['files'].values())} in {args.out}",
        file=sys.stderr,
    )
    return 0
