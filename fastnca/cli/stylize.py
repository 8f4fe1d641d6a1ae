"""`fastnca stylize`: style transfer by pixel optimisation (content image + style image -> PNG).

Examples:
    fastnca stylize --demo                                 # built-in images, < 2 min on 2 CPUs
    fastnca stylize photo.jpg painting.png -o out.png --steps 300 --size 384
    fastnca stylize photo.jpg builtin:scales -o out.png   # a built-in texture as the style
"""

from __future__ import annotations

import time
from pathlib import Path

from fastnca.cli._common import (
    UsageError,
    add_common,
    device_of,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    set_threads,
)
from fastnca.cli._paths import writable_file

DEMO = dict(
    content="builtin:landscape", style="builtin:dots", size=128, steps=80, out="stylize_demo.png"
)


def add_parser(sub):
    p = sub.add_parser(
        "stylize",
        help="style transfer: optimise an image's pixels to match a content and a style image",
        description="Optimise the pixels of an image so that its VGG16 features match CONTENT and "
        "its Gram matrices match STYLE (Gatys et al.), with Adam through the fastnca Learner. "
        "Images: PNG/JPEG paths, or builtin:NAME for the images drawn by fastnca.style.textures "
        "(landscape, checker, dots, scales, stripes). Weights: torchvision's ImageNet VGG16 from "
        "the torch hub cache (or downloaded once, 528 MB, progress on stderr, at most "
        "FASTNCA_DOWNLOAD_DEADLINE seconds, default 600; FASTNCA_OFFLINE=1 never downloads), "
        "--weights PATH, else an offline fallback (random multi-scale features); the choice is "
        "printed. Images whose shorter side is under 16 px after resizing to --size are refused.",
    )
    p.add_argument("content", nargs="?", help="content image (path or builtin:NAME)")
    p.add_argument("style", nargs="?", help="style image (path or builtin:NAME)")
    add_common(
        p,
        "output PNG (directories are created; an existing file is replaced "
        "atomically). Default: stylized.png, or stylize_demo.png with --demo",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"run on built-in images ({DEMO['content']} + {DEMO['style']}, "
        f"{DEMO['size']} px, {DEMO['steps']} steps); also writes <output>_grid.png "
        "(content | style | result)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"optimisation steps (default 150; {DEMO['steps']} with --demo)",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help=f"longest side in pixels; larger images are resized (default 256; "
        f"{DEMO['size']} with --demo)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=0.05, help="Adam learning rate (default 0.05)"
    )
    p.add_argument(
        "--style-weight",
        type=nonneg_float,
        default=10.0,
        help="weight of the style loss against the content loss (default 10)",
    )
    p.add_argument(
        "--content-weight",
        type=nonneg_float,
        default=1.0,
        help="weight of the content loss (default 1)",
    )
    p.add_argument(
        "--init",
        choices=("content", "random"),
        default="content",
        help="start from the content image or from noise (default content)",
    )
    p.add_argument(
        "--weights",
        default="auto",
        metavar="auto|imagenet|random|PATH",
        help="VGG16 weights: auto (torchvision cache, download, else fallback), "
        "imagenet (require them), random (the offline fallback) or a state-dict file",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: autocast the feature extractor and losses to "
        "--amp-dtype (on CPUs without bf16 instructions this is slower)",
    )
    p.add_argument(
        "--amp-dtype",
        choices=("bf16", "fp16"),
        default="bf16",
        help="autocast dtype for --amp (default bf16; fp16 uses a gradient scaler)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the loss (features + Grams); pays a compile time first",
    )
    p.add_argument(
        "--log-every",
        type=positive_int,
        default=None,
        metavar="N",
        help="save a grid of the image every N steps to <output>_progress.png",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed for --init random (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    return p


def _image(spec: str, what: str, size: int, verbose: bool):
    from fastnca.style.images import ImageError
    from fastnca.style.textures import image_source

    try:
        return image_source(spec, size, what, verbose=verbose)
    except ImageError as e:
        raise UsageError(str(e)) from None


def _output(path: str) -> Path:
    from PIL import Image

    out = Path(path).expanduser()
    if out.is_dir():
        raise UsageError(f"--out: {str(out)!r} is a directory; give a file name like out.png")
    ext = out.suffix.lower()
    if ext and (Image.registered_extensions().get(ext) not in Image.SAVE):
        raise UsageError(f"--out: cannot write {ext!r} images; use .png or .jpg")
    return writable_file(out, "--out")  # before the optimisation, not after it


# float32 values per pixel of the image being optimised: VGG16 activations kept for backward
# (~600, relu1_1..relu5_1) and their gradients, plus the image, its gradient and Adam's state.
STYLIZE_FLOATS_PER_PIXEL = 1300
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer


def _check_size(size: int) -> None:
    from fastnca._memory import check_memory

    try:
        check_memory(
            f"--size {size}: stylizing a {size}x{size} image",
            {"features": 4 * STYLIZE_FLOATS_PER_PIXEL * size * size},
            "lower --size",
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args) -> int:
    verbose = not args.quiet
    if args.demo:
        if args.content or args.style:
            raise UsageError("--demo uses built-in images; give either --demo or CONTENT STYLE")
        args.content, args.style = DEMO["content"], DEMO["style"]
    elif not (args.content and args.style):
        raise UsageError("CONTENT and STYLE images are required (or --demo for built-in ones)")
    size = args.size or (DEMO["size"] if args.demo else 256)
    steps = args.steps or (DEMO["steps"] if args.demo else 150)
    out = _output(args.out or (DEMO["out"] if args.demo else "stylized.png"))
    if size < 16:
        raise UsageError(f"--size: expected at least 16 pixels, got {size}")
    _check_size(size)
    if args.seed > MAX_SEED:
        raise UsageError(f"--seed: expected at most {MAX_SEED} (a 64-bit integer), got {args.seed}")
    dev = device_of(args)
    set_threads(args.threads)
    if args.amp:
        import torch

        from fastnca.train.callbacks import check_autocast

        try:
            check_autocast(dev.type, torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16)
        except ValueError as e:
            raise UsageError(f"--amp: {e}") from None
    content = _image(args.content, "CONTENT", size, verbose)
    style = _image(args.style, "STYLE", size, verbose)

    import torch.nn.functional as F

    from fastnca.style.features import VGG16Features
    from fastnca.style.images import image_grid, save_image
    from fastnca.style.stylize import CONTENT_LAYERS, STYLE_LAYERS, feature_layers, stylize

    try:
        feats = VGG16Features(
            feature_layers(CONTENT_LAYERS, STYLE_LAYERS), weights=args.weights, verbose=verbose
        )
    except (ValueError, TypeError) as e:
        raise UsageError(f"--weights: {e}") from None
    log_path = out.with_name(f"{out.stem}_progress.png") if args.log_every else None
    t0 = time.perf_counter()
    img = stylize(
        content,
        style,
        steps=steps,
        lr=args.lr,
        style_weight=args.style_weight,
        content_weight=args.content_weight,
        init=args.init,
        size=None,
        features=feats,
        device=dev,
        amp=args.amp_dtype if args.amp else False,
        compile=args.compile,
        progress=verbose,
        log_every=args.log_every,
        log_path=log_path,
        seed=args.seed,
        verbose=verbose,
    )
    secs = time.perf_counter() - t0
    try:
        save_image(img, out)
        written = [out]
        if args.demo:
            grid = out.with_name(f"{out.stem}_grid.png")
            style_view = F.interpolate(style, content.shape[-2:], mode="bilinear", antialias=True)
            save_image(image_grid([content, style_view, img], ncols=3), grid)
            written.append(grid)
    except OSError as e:
        raise UsageError(f"--out: cannot write {str(out)!r} ({e.strerror or e})") from None
    if log_path is not None:
        written.append(log_path)
    if verbose:
        print(
            f"fastnca stylize: {steps} steps at {img.shape[-1]}x{img.shape[-2]} in {secs:.1f} s "
            f"({feats.source}); wrote {', '.join(map(str, written))}"
        )
    return 0
