"""The one loss-curve plot of fastnca (training runs, ProgressCB), drawn with Pillow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastnca._io import atomic_path


def plot_losses(
    losses: Sequence[float], path, title: str = "", size=(640, 360), xlabel: str = "iteration"
) -> Path:
    """The loss curve (log scale; raw in light blue, running mean in dark blue) as a PNG, drawn
    with Pillow (no matplotlib needed); non-finite and non-positive values are left out."""

    w, h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 64, w - 16, 28, h - 32
    d.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    d.text((left, 8), f"{title}  loss per {xlabel} (log scale)"[:100], fill="black")
    vals = [float(v) for v in losses if math.isfinite(v) and v > 0]
    if len(vals) >= 1:
        logs = np.log10(np.asarray(vals))
        lo, hi = float(logs.min()), float(logs.max())
        hi = hi if hi > lo else lo + 1.0
        n = len(logs)
        k = max(1, n // 50)
        mean = np.convolve(logs, np.ones(k) / k, mode="valid") if n >= k else logs

        def pts(ys, off):
            den = max(1, n - 1)
            return [
                (
                    left + (right - left) * (i + off) / den,
                    bottom - (bottom - top) * (y - lo) / (hi - lo),
                )
                for i, y in enumerate(ys)
            ]

        if n > 1:
            d.line(pts(logs, 0), fill=(160, 200, 240), width=1)
            d.line(pts(mean, (k - 1) / 2), fill=(20, 60, 160), width=2)
        else:
            x, y = pts(logs, 0)[0]
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 160))
        d.text((4, top), f"{10**hi:.3g}", fill="black")
        d.text((4, bottom - 10), f"{10**lo:.3g}", fill="black")
        d.text((left, bottom + 6), "1", fill="black")
        d.text((right - 40, bottom + 6), f"{n}", fill="black")
        d.text(((left + right) // 2 - 30, bottom + 6), xlabel, fill="black")
    p = Path(path).expanduser()
    with atomic_path(p, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return p
