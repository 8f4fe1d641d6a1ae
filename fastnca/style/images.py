"""Image files in and out: load as (1, 3, H, W) float in [0, 1], save PNG atomically, grids.

Every problem with an input file (missing, a directory, a FIFO/device/socket, unreadable, not an
image, truncated, too large, too small for the style features after resizing) raises ``ImageError``
(a ``ValueError``) with a one-line message naming the file, so the CLI can print it and exit 2.

Small images are refused, not upscaled: when ``load_image`` shrinks an image to ``size`` (images
for the VGG16 features of train and stylize), the shorter side after resizing must be at least
``MIN_SIDE`` = 16 px (relu5_1 is 1/16 of the input), and the message says which ``size`` would do.
(An image already small on disk is loaded as it is; ``stylize`` checks its inputs' final size.)
"""

from __future__ import annotations

import math
import stat
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastnca._checks import check_int
from fastnca._io import atomic_path


class ImageError(ValueError):
    """An image file that cannot be used; the message is one line and names the file."""


MIN_SIDE = 16  # smallest image side the style features take: relu5_1 is 1/16 of the input


def check_min_side(
    name: str, w: int, h: int, size: int | None, orig=None, min_side: int = MIN_SIDE
) -> None:
    """Refuse a (w x h) image whose shorter side is under ``min_side`` px (default MIN_SIDE, for
    features up to relu5_1); ``orig``: its (w, h) before resizing. One line, says what to do."""
    if min(w, h) >= min_side:
        return
    ow, oh = orig or (w, h)
    if min(ow, oh) < min_side:
        fix = f"use an image at least {min_side} px on each side"
    else:
        need = math.ceil(min_side * max(ow, oh) / min(ow, oh))
        fix = f"crop it nearer to square or use a size of at least {need}"
    when = f" after resizing to size {size}" if size is not None and (w, h) != (ow, oh) else ""
    raise ImageError(
        f"{name} is {w}x{h} px{when}: its shorter side is under {min_side} px, the "
        f"smallest the style features take (VGG16 pools before them); {fix}"
    )


def _to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency (RGBA, LA, palette with transparency) is composited over
    ``background``; 16-bit and float grayscale are rescaled to 8 bits instead of clipped."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = float(a.max(initial=0))
        if img.mode == "F":
            hi = max(top, 1.0)  # float images: [0, 1] unless they go beyond
        else:
            hi = 65535.0 if img.mode.startswith("I;16") or top > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, (*background, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def load_image(path, size: int | None = None, *, verbose: bool = True) -> torch.Tensor:
    """Read an image file (PNG, JPEG, anything Pillow reads) as a (1, 3, H, W) float32 in [0, 1].

    Grayscale, palette, CMYK and RGBA become RGB (alpha over white); JPEG EXIF rotation is applied.
    If ``size`` is given and the longer side exceeds it, the image is resized (Lanczos, aspect kept)
    so that the longer side is ``size``, and a message says so; the shorter side must then be at
    least ``MIN_SIDE`` px (``ImageError`` otherwise). Only regular files are
    opened: a FIFO, device or socket is refused before opening (reading it could block forever).
    """
    p = Path(path).expanduser()
    if size is not None:
        check_int("size", size, 1)
    if not p.exists():
        raise ImageError(f"{str(p)!r}: no such file")
    if p.is_dir():
        raise ImageError(f"{str(p)!r} is a directory, expected an image file (PNG or JPEG)")
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise ImageError(f"{str(p)!r}: cannot stat ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ImageError(
            f"{str(p)!r} is not a regular file (a FIFO, device or socket); expected "
            f"an image file (PNG or JPEG)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                if size is not None and img.format == "JPEG":
                    img.draft("RGB", (size, size))  # decode JPEG at a reduced scale when possible
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(
            f"{str(p)!r} is not an image file Pillow can read (expected PNG or JPEG)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{str(p)!r} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except PermissionError:
        raise ImageError(f"{str(p)!r}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(
            f"{str(p)!r} could not be decoded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'corrupt'})"
        ) from None
    w, h = rgb.size
    if size is not None and max(w, h) > size:
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        check_min_side(repr(str(p)), nw, nh, size, (w, h))
        rgb = rgb.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0)
        if verbose:
            print(
                f"fastnca: resized {p.name} from {w}x{h} to {nw}x{nh} (size {size})",
                file=sys.stderr,
                flush=True,
            )
    a = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float().div_(255.0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W), (1, 3, H, W), (H, W) or (1, H, W) float in [0, 1] -> (H, W, 3) or (H, W) uint8."""
    t = img.detach().float().cpu()
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(
                f"img: expected a single image, got a batch of {t.shape[0]}; use image_grid() first"
            )
        t = t[0]
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3 and t.shape[0] == 3:
        t = t.permute(1, 2, 0)
    elif t.dim() != 2:
        raise ValueError(f"img: expected (3, H, W), (1, 3, H, W) or (H, W), got {tuple(img.shape)}")
    t = torch.nan_to_num(t, nan=0.0)
    return (t.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def save_image(img: torch.Tensor, path) -> Path:
    """Save an image tensor in [0, 1] (clamped) to ``path``; the format follows the suffix (PNG if
    none). Parent directories are created; the file is written to a temporary name in the same
    directory and moved over ``path`` with os.replace, so readers never see a partial file."""
    p = Path(path).expanduser()
    ext = p.suffix.lower()
    fmt = Image.registered_extensions().get(ext) if ext else "PNG"
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"path: cannot save images as {ext!r}; use .png or .jpg")
    if p.is_dir():
        raise ValueError(f"path: {str(p)!r} is a directory, expected an image file name")
    pil = Image.fromarray(to_uint8(img))
    with atomic_path(p) as tmp:
        pil.save(tmp, format=fmt)
    return p


def image_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    ncols: int | None = None,
    pad: int = 2,
    pad_value: float = 1.0,
) -> torch.Tensor:
    """Tile images into one (3, H', W') image: a (N, 3, H, W) tensor or a list of (3, H, W) /
    (1, 3, H, W) images of one size, ``ncols`` per row (default: about sqrt(N)), ``pad`` pixels of
    ``pad_value`` between and around them."""
    if isinstance(images, torch.Tensor):
        batch = images if images.dim() == 4 else images[None]
    else:
        ims = [t[0] if t.dim() == 4 else t for t in images]
        if not ims:
            raise ValueError("images: expected at least one image, got none")
        if len({tuple(t.shape) for t in ims}) != 1:
            raise ValueError(
                f"images: all images must have one shape, got "
                f"{sorted({tuple(t.shape) for t in ims})}"
            )
        batch = torch.stack([t.detach().float().cpu() for t in ims])
    if batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, 3, H, W), got {tuple(batch.shape)}")
    batch = batch.detach().float().cpu().expand(-1, 3, -1, -1)
    n, _, h, w = batch.shape
    ncols = ncols or max(1, int(np.ceil(np.sqrt(n))))
    nrows = -(-n // ncols)
    grid = torch.full((3, pad + nrows * (h + pad), pad + ncols * (w + pad)), float(pad_value))
    for k in range(n):
        r, c = divmod(k, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = batch[k]
    return grid
