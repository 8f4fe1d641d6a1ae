"""Watch a trained NCA grow: roll it out from a seed on any grid size and write an animation.

The automaton is local and resolution-free (3x3 perception with circular wrap, per-cell MLP), so a
model trained on 64x64 grids grows the same texture on 300x200. ``grow`` returns the frames;
``write_animation`` writes a GIF (Pillow) or an MP4 (needs ``imageio-ffmpeg``: without it a
``MissingDependencyError`` says how to install it or to use .gif); ``render`` does both from a
checkpoint and saves the last frame as a PNG beside the animation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastnca._checks import check_int
from fastnca._io import atomic_path
from fastnca._memory import check_memory
from fastnca._plot import plot_losses  # noqa: F401 (part of this module's API)
from fastnca.style.images import save_image, to_uint8

ANIMATION_SUFFIXES = (".gif", ".mp4")


class MissingDependencyError(RuntimeError):
    """An optional package is needed for what was asked; the message says how to get it."""


def _grid_size(size) -> tuple[int, int]:
    """An int N (N x N) or (H, W) -> (H, W), all positive."""
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    else:
        hw = tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
        raise ValueError(f"size: expected a positive int or (height, width), got {size!r}")
    return hw


def _positive(name: str, v) -> int:
    check_int(name, v, 1)
    return v


def seed_grid(model, size, device=None) -> torch.Tensor:
    """The seed state for one grid of ``size`` (int or (H, W)): ``(1, C, H, W)``, the same seed the
    trainer uses to (re)seed its pool."""
    h, w = _grid_size(size)
    x = model.seed(1, (h, w))
    return x.to(device) if device is not None else x


@torch.no_grad()
def grow(
    model,
    size=128,
    frames: int = 60,
    steps_per_frame: int = 8,
    seed: int | None = 0,
    device=None,
    x: torch.Tensor | None = None,
) -> list[np.ndarray]:
    """Roll ``model`` out from a seed (or from ``x``) and grab one frame every ``steps_per_frame``.

    Returns ``frames`` RGB arrays (H, W, 3) uint8; frame k shows the grid after
    ``(k + 1) * steps_per_frame`` steps. ``seed`` fixes the random update masks (the global RNG
    is left as it was).
    """
    frames, steps_per_frame = (
        _positive("frames", frames),
        _positive("steps_per_frame", steps_per_frame),
    )
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    devices = [dev] if dev.type == "cuda" else []
    out = []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        state = seed_grid(model, size, dev) if x is None else x.to(dev)
        for _ in range(frames):
            state = model(state, steps=steps_per_frame)
            out.append(to_uint8(getattr(model, "image", model.to_rgb)(state[:1]).float()))
    return out


def _upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame if scale == 1 else frame.repeat(scale, axis=0).repeat(scale, axis=1)


def write_animation(frames: Sequence[np.ndarray], path, fps: float = 20.0, scale: int = 1) -> Path:
    """Write (H, W, 3) uint8 ``frames`` as a looping GIF or an MP4 (by ``path``'s suffix).

    Frames are upscaled ``scale`` times (nearest neighbour). Written to a temporary file and
    moved into place. MP4 needs ``imageio-ffmpeg`` (``MissingDependencyError`` otherwise). In a
    GIF, Pillow merges identical consecutive frames into one (their durations add).
    """
    p = Path(path).expanduser()
    ext = p.suffix.lower()
    if ext not in ANIMATION_SUFFIXES:
        raise ValueError(f"path: expected a .gif or .mp4 file name, got {str(p)!r}")
    if not frames:
        raise ValueError("frames: expected at least one frame, got none")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    scale = _positive("scale", scale)
    ims = [_upscale(np.ascontiguousarray(f, dtype=np.uint8), scale) for f in frames]
    if ext == ".mp4":
        try:
            import imageio_ffmpeg
        except ImportError:
            raise MissingDependencyError(
                f"writing {p.name} needs imageio-ffmpeg (pip install imageio-ffmpeg); or write a "
                f".gif instead"
            ) from None
    with atomic_path(p, suffix=p.suffix) as tmp:
        if ext == ".gif":
            pil = [Image.fromarray(f) for f in ims]
            pil[0].save(
                tmp,
                format="GIF",
                save_all=True,
                append_images=pil[1:],
                duration=max(20, round(1000 / fps)),
                loop=0,
                optimize=False,
            )
        else:
            h, w = ims[0].shape[:2]
            ph, pw = h + h % 2, w + w % 2  # yuv420p needs even sides: pad by edge replication
            writer = imageio_ffmpeg.write_frames(
                tmp,
                (pw, ph),
                fps=fps,
                codec="libx264",
                pix_fmt_out="yuv420p",
                macro_block_size=1,
                quality=8,
            )
            writer.send(None)  # start the ffmpeg process
            for f in ims:
                writer.send(np.pad(f, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge"))
            writer.close()
    return p


GIF_MAX_SIDE = 65535  # GIF stores widths and heights as 16-bit numbers


def check_render(model, size, frames: int, scale: int, suffix: str = ".gif") -> None:
    """Refuse, before the rollout, a model with NaN/inf weights (it would render a black
    animation) and a render that cannot be written or would not fit in memory."""
    bad = [
        n
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise ValueError(
            f"checkpoint: the model's {', '.join(bad[:3])} hold NaN or inf values "
            f"(a diverged run?); nothing to render"
        )
    h, w = _grid_size(size)
    scale = _positive("scale", scale)
    if suffix == ".gif" and max(h, w) * scale > GIF_MAX_SIDE:
        raise ValueError(
            f"size x scale: {h * scale}x{w * scale} px is larger than a GIF can be "
            f"({GIF_MAX_SIDE} px a side, 16-bit); lower size or scale"
        )
    c = getattr(model, "channels", 16)
    hidden = getattr(model, "hidden", 128)
    check_memory(
        f"rendering {frames} frames of {h}x{w} cells at scale {scale}",
        {
            "frames": frames * h * w * 3 * (1 + 2 * scale * scale),  # raw + upscaled + PIL
            "rollout": 4 * h * w * (3 * c + 4 * c + hidden),
        },  # state, perception, hidden
        "lower --size, --scale or --frames",
    )


def render(
    checkpoint,
    out,
    size=128,
    frames: int = 60,
    steps_per_frame: int = 8,
    seed: int | None = 0,
    fps: float = 20.0,
    scale: int = 1,
    device=None,
) -> dict:
    """Grow the NCA of ``checkpoint`` (file, run directory or lesson state dict) and write ``out``
    (.gif or .mp4) plus ``out`` with suffix .png (the last frame). Returns the paths and counts."""
    from fastnca.nca.checkpoint import load_nca

    p = Path(out).expanduser()
    if p.suffix.lower() not in ANIMATION_SUFFIXES:
        raise ValueError(f"out: expected a .gif or .mp4 file name, got {str(p)!r}")
    _grid_size(size)
    if p.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401  (fail before the rollout, not after)
        except ImportError:
            raise MissingDependencyError(
                f"writing {p.name} needs imageio-ffmpeg (pip install imageio-ffmpeg); or write a "
                f".gif instead"
            ) from None
    model = load_nca(checkpoint, device=device or "cpu").eval()
    check_render(model, size, frames, scale, p.suffix.lower())
    ims = grow(model, size, frames=frames, steps_per_frame=steps_per_frame, seed=seed)
    anim = write_animation(ims, p, fps=fps, scale=scale)
    png = save_image(
        torch.from_numpy(_upscale(ims[-1], scale)).permute(2, 0, 1).float() / 255,
        p.with_suffix(".png"),
    )
    h, w = ims[0].shape[:2]
    return {
        "animation": anim,
        "png": png,
        "frames": len(ims),
        "size": (h * scale, w * scale),
        "steps": frames * steps_per_frame,
    }


def pool_image(rgb: torch.Tensor, min_side: int = 256) -> torch.Tensor:
    """A grid of pool samples ``rgb`` (N, 3, H, W) as one (3, H', W') image in [0, 1], upscaled
    (nearest) so that its shorter side is at least ``min_side`` pixels."""
    from fastnca.style.images import image_grid

    grid = image_grid(rgb.detach().float().cpu().clamp(0, 1))
    k = max(1, -(-min_side // min(grid.shape[1:])))
    return grid.repeat_interleave(k, 1).repeat_interleave(k, 2)
