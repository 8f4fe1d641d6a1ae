"""Images built into the package, drawn by code (no files, no downloads).

Textures (style targets; the NCA trainer's default style) are colourful, structured and tile
seamlessly: every pattern repeats a whole number of times across the image, so circular padding sees
no seam. Content images are simple scenes for the stylize demo.

    builtin_texture("scales", 128)   # (1, 3, 128, 128) float32 in [0, 1]
    builtin_content("landscape", (96, 128))
    list_textures(), list_content()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_TEXTURE = "scales"
DEFAULT_CONTENT = "landscape"

# RGB in [0, 1]
_PALETTE = torch.tensor(
    [
        [0.95, 0.30, 0.25],  # red
        [0.98, 0.75, 0.20],  # amber
        [0.25, 0.75, 0.45],  # green
        [0.20, 0.55, 0.95],  # blue
        [0.70, 0.35, 0.90],  # violet
        [0.98, 0.50, 0.70],  # pink
    ]
)


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates y, x in [0, 1), each (h, w)."""
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return torch.meshgrid(y, x, indexing="ij")


def _smooth(d: torch.Tensor, edge: float) -> torch.Tensor:
    """1 where d < -edge, 0 where d > edge, linear between: an anti-aliased inside test."""
    return ((edge - d) / (2 * edge)).clamp(0, 1)


def _mix(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """a where m == 0, b where m == 1; a, b: (3, h, w) or (3, 1, 1), m: (h, w)."""
    return a + (b - a) * m


def _palette(k: torch.Tensor) -> torch.Tensor:
    """Colour per integer cell index k: (h, w) -> (3, h, w)."""
    return _PALETTE[k.long() % len(_PALETTE)].permute(2, 0, 1)


def _dots(h: int, w: int) -> torch.Tensor:
    """Polka dots on a staggered (hexagonal) lattice, 8 x 8 cells, colour by cell, navy ground."""
    y, x = _grid(h, w)
    n = 8
    row = torch.floor(y * n)
    xs = x * n + 0.5 * (row % 2)  # odd rows shifted half a cell (8 rows: still tiles)
    col = torch.floor(xs)
    d = torch.hypot(xs - col - 0.5, y * n - row - 0.5) - 0.34
    ground = torch.tensor([0.08, 0.10, 0.25])[:, None, None]
    dot = _palette((col % n) * 2 + row * 3)  # col n is col 0 again
    ring = _smooth(d.abs() - 0.04, 0.03)  # a light rim around every dot
    img = _mix(ground.expand(3, h, w), dot, _smooth(d, 0.03))
    return _mix(img, torch.ones(3, 1, 1), 0.6 * ring)


def _stripes(h: int, w: int) -> torch.Tensor:
    """Wavy diagonal stripes cycling through the palette, dark seams between stripes."""
    y, x = _grid(h, w)
    phase = 6 * (x + y) + 0.35 * torch.sin(2 * math.pi * 3 * y)  # 6 stripes, 3 waves: tiles
    k = torch.floor(phase)
    f = phase - k
    img = _palette(k)
    shade = 0.75 + 0.25 * torch.sin(math.pi * f)  # rounded, tube-like shading
    seam = _smooth(torch.minimum(f, 1 - f) - 0.05, 0.03)
    return _mix(img * shade, torch.full((3, 1, 1), 0.05), seam)


def _scales(h: int, w: int) -> torch.Tensor:
    """Dragon (fish) scales: discs of radius half a cell in rows half a cell apart, odd rows shifted
    half a cell, each row drawn over the one above; bright centres, dark rims, the colour going
    teal -> gold -> teal down the image. 8 columns, 16 rows."""
    y, x = _grid(h, w)
    n = 8
    img = torch.zeros(3, h, w)
    teal, gold = torch.tensor([0.10, 0.55, 0.55]), torch.tensor([0.95, 0.70, 0.20])
    edge = 0.03
    for r in range(-2, 2 * n + 2):  # unwrapped rows beyond both edges: the tiling is exact
        cy = (r + 0.5) / (2 * n)
        xs = x * n + 0.5 * (r % 2)
        dx = xs - torch.floor(xs) - 0.5
        d = torch.hypot(dx, (y - cy) * n)  # distance to the nearest disc centre of row r, cells
        t = 0.5 - 0.5 * math.cos(2 * math.pi * (r % (2 * n)) / (2 * n))  # periodic in r
        base = (teal * (1 - t) + gold * t)[:, None, None]
        shade = 1.0 - 0.6 * (d / 0.5).clamp(0, 1) ** 2 + 0.25 * _smooth(d - 0.12, 0.1)
        scale = _mix(base * shade, torch.full((3, 1, 1), 0.04), _smooth(0.46 - d, edge))
        img = _mix(img, scale, _smooth(d - 0.5, edge))
    return img


def _checker(h: int, w: int) -> torch.Tensor:
    """A checkerboard rotated 45 degrees (diamonds), two colour pairs alternating by diagonal band,
    with a small white square in the middle of every diamond."""
    y, x = _grid(h, w)
    n = 6
    u, v = n * (x + y), n * (x - y)  # diamond coordinates; integer n on both axes: tiles
    iu, iv = torch.floor(u), torch.floor(v)
    parity = (iu + iv) % 2
    band = torch.floor(u / 3) % 2  # u wraps by 6: bands repeat
    c0 = _mix(
        torch.tensor([0.95, 0.40, 0.20])[:, None, None],
        torch.tensor([0.20, 0.45, 0.90])[:, None, None],
        band,
    )
    c1 = _mix(
        torch.tensor([0.98, 0.85, 0.35])[:, None, None],
        torch.tensor([0.15, 0.15, 0.20])[:, None, None],
        band,
    )
    img = _mix(c0, c1, parity)
    d = torch.maximum((u - iu - 0.5).abs(), (v - iv - 0.5).abs()) - 0.12
    return _mix(img, torch.ones(3, 1, 1), _smooth(d, 0.03))


def _landscape(h: int, w: int) -> torch.Tensor:
    """Content for the stylize demo: sky, sun, two mountain ranges, a lake, a house with a red roof.
    (Not a texture: it does not tile.)"""
    y, x = _grid(h, w)
    sky_top, sky_low = torch.tensor([0.25, 0.50, 0.90]), torch.tensor([0.80, 0.90, 1.00])
    img = _mix(sky_top[:, None, None], sky_low[:, None, None], (y / 0.6).clamp(0, 1))
    edge = 1.5 / min(h, w)
    m = min(h, w)
    sun = torch.hypot((x - 0.75) * w / m, (y - 0.20) * h / m) - 0.09  # round on any aspect
    img = _mix(img, torch.tensor([1.0, 0.85, 0.25])[:, None, None], _smooth(sun, edge))
    tau = 2 * math.pi
    far = 0.45 - 0.12 * torch.sin(tau * (1.3 * x + 0.1)) - 0.05 * torch.sin(tau * 4.1 * x)
    img = _mix(img, torch.tensor([0.45, 0.40, 0.65])[:, None, None], _smooth(far - y, edge))
    near = 0.60 - 0.08 * torch.sin(tau * (0.8 * x + 0.6)) - 0.03 * torch.sin(tau * 5.3 * x)
    img = _mix(img, torch.tensor([0.20, 0.55, 0.25])[:, None, None], _smooth(near - y, edge))
    lake = torch.hypot((x - 0.30) / 0.22, (y - 0.82) / 0.08) - 1.0
    img = _mix(img, torch.tensor([0.15, 0.35, 0.75])[:, None, None], _smooth(lake, 0.05))
    # house: walls x 0.58..0.78, y 0.62..0.80; roof triangle apex (0.68, 0.48), base y = 0.62
    walls = torch.maximum((x - 0.68).abs() - 0.10, (y - 0.71).abs() - 0.09)
    img = _mix(img, torch.tensor([0.95, 0.92, 0.80])[:, None, None], _smooth(walls, edge))
    roof = torch.maximum((x - 0.68).abs() - (y - 0.48) * 0.13 / 0.14, y - 0.62)
    img = _mix(img, torch.tensor([0.80, 0.15, 0.10])[:, None, None], _smooth(roof, edge))
    door = torch.maximum((x - 0.68).abs() - 0.025, (y - 0.75).abs() - 0.05)
    return _mix(img, torch.tensor([0.30, 0.18, 0.10])[:, None, None], _smooth(door, edge))


TEXTURES: dict[str, Callable[[int, int], torch.Tensor]] = {
    "dots": _dots,
    "stripes": _stripes,
    "scales": _scales,
    "checker": _checker,
}
CONTENT: dict[str, Callable[[int, int], torch.Tensor]] = {"landscape": _landscape}


def _size(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in size)
    ):
        raise ValueError(f"size: expected an int >= 8 or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _render(fn, size) -> torch.Tensor:
    """Draw at 2x and average 2x2 blocks (anti-aliasing) -> (1, 3, H, W) float32 in [0, 1]."""
    h, w = _size(size)
    img = fn(2 * h, 2 * w)
    return F.avg_pool2d(img[None], 2).clamp(0, 1).contiguous()


def list_textures() -> list[str]:
    """Names accepted by builtin_texture."""
    return sorted(TEXTURES)


def list_content() -> list[str]:
    """Names accepted by builtin_content."""
    return sorted(CONTENT)


def builtin_texture(name: str = DEFAULT_TEXTURE, size=128) -> torch.Tensor:
    """A tileable texture drawn by code: (1, 3, H, W) float32 in [0, 1]; size: int or (H, W)."""
    if name not in TEXTURES:
        raise ValueError(
            f"name: unknown texture {name!r}; built-in textures: {', '.join(list_textures())}"
        )
    return _render(TEXTURES[name], size)


def builtin_content(name: str = DEFAULT_CONTENT, size=128) -> torch.Tensor:
    """A content image for style transfer drawn by code: (1, 3, H, W) float32 in [0, 1]."""
    if name not in CONTENT:
        raise ValueError(
            f"name: unknown content image {name!r}; built-in: {', '.join(list_content())}"
        )
    return _render(CONTENT[name], size)


BUILTIN_PREFIX = "builtin:"


def image_source(spec: str, size: int, what: str = "image", verbose: bool = True) -> torch.Tensor:
    """The one image syntax of every command: ``builtin:NAME`` (a texture or content image drawn
    by this module at ``size``), else a file path (loaded, longer side shrunk to ``size``). A bare
    built-in name with no such file is taken as ``builtin:NAME``. Returns (1, 3, H, W) in [0, 1];
    bad input raises ``ImageError`` (a ValueError) naming ``what``."""
    from fastnca.style.images import ImageError, load_image

    spec = str(spec)
    builtin = list_textures() + list_content()
    name = spec[len(BUILTIN_PREFIX) :] if spec.startswith(BUILTIN_PREFIX) else None
    if name is None and spec in builtin and not Path(spec).exists():
        name = spec
    if name is not None:
        if name not in builtin:
            raise ImageError(
                f"{what}: unknown built-in image {name!r}; built-in: {', '.join(builtin)}"
            )
        return (builtin_texture if name in list_textures() else builtin_content)(name, size)
    try:
        return load_image(spec, size=size, verbose=verbose)
    except ImageError as e:
        hint = "" if Path(spec).exists() else f" (built-in: builtin:{', builtin:'.join(builtin)})"
        raise ImageError(f"{what}: {e}{hint}") from None
