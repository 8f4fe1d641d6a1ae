"""Growing NCA training (Mordvintsev et al., Distill 2020) on the Learner: targets, presets, the
pool callback ``GrowCB`` and ``train_grow`` (a run directory).

The recipe: a 16-channel NCA (RGBA + 12 hidden, 128 hidden units, zero padding, identity/sobel
filters / 8, alive masking on alpha > 0.1) grows from one seed cell (channels 3.. = 1) on a grid
of the target plus ``padding`` cells each side. A pool of ``pool`` grids (all seeds at first):
every iteration samples ``batch`` of them, sorts them by loss, reseeds the worst, damages the
``damage`` best with random discs (the "regenerating" experiment), runs ``n ~ U[min_steps,
max_steps]`` steps and minimises

    loss = mean((x[:, :4] - target)²)      target: premultiplied RGBA (1, 4, H, W), padded

with per-parameter gradient normalisation (``GradNormCB``), Adam and lr x0.1 at ``lr_drop``; the
final states go back into the pool.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fastnca.nca.model import NCA
from fastnca.reference import DISTILL_FILTERS
from fastnca.train.learner import TrainCB

TARGETS = ("heart", "ring", "smiley")


@dataclass
class GrowConfig:
    """A growing-NCA run. The defaults are the "grow-quick" preset (2 CPU cores)."""

    preset: str = "grow-quick"
    target_size: int = 24  # the target's longest side (cells)
    padding: int = 6  # empty cells around the target
    channels: int = 16
    hidden: int = 64
    pool: int = 128
    batch: int = 4
    min_steps: int = 32
    max_steps: int = 48
    damage: int = 0  # samples damaged per iteration (the regenerating experiment: 3)
    lr: float = 2e-3
    lr_drop: int = 800  # lr x0.1 from this iteration
    iters: int = 1000
    seed: int = 0
    threads: int = 1  # torch CPU threads during training (0: leave torch's setting)

    def validate(self) -> GrowConfig:
        for f in (
            "target_size",
            "channels",
            "hidden",
            "pool",
            "batch",
            "min_steps",
            "max_steps",
            "iters",
        ):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f}: expected a positive int, got {v!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(
                f"threads: expected an int >= 0 (0: torch's default), got {self.threads!r}"
            )
        if self.channels < 4:
            raise ValueError(
                f"channels: a growing NCA needs RGBA + hidden, >= 4, got {self.channels}"
            )
        if self.padding < 0 or self.damage < 0 or self.damage >= self.batch:
            raise ValueError(
                f"padding and damage must be >= 0 and damage < batch, got padding="
                f"{self.padding}, damage={self.damage}, batch={self.batch}"
            )
        if self.batch > self.pool or self.max_steps < self.min_steps:
            raise ValueError(
                f"need batch <= pool and min_steps <= max_steps, got batch="
                f"{self.batch}, pool={self.pool}, steps {self.min_steps}.."
                f"{self.max_steps}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        return self


# "grow": the article's regenerating experiment (40x40 emoji + 16 padding, 128 hidden, pool 1024,
# batch 8, 64-96 steps, lr 2e-3 x0.1 at 2000, 8000 iterations, 3 damaged per batch).
PRESETS = {
    "grow-quick": {},
    "grow": dict(
        target_size=40,
        padding=16,
        hidden=128,
        pool=1024,
        batch=8,
        min_steps=64,
        max_steps=96,
        damage=3,
        lr=2e-3,
        lr_drop=2000,
        iters=8000,
        threads=0,
    ),
}


def make_grow_config(preset: str = "grow-quick", **overrides) -> GrowConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    bad = [k for k in overrides if k not in {f.name for f in dataclasses.fields(GrowConfig)}]
    if bad:
        raise ValueError(f"unknown grow settings {bad}")
    return GrowConfig(**{**PRESETS[preset], "preset": preset, **overrides}).validate()


def growing_nca(channels: int = 16, hidden: int = 128, **kwargs) -> NCA:
    """A new growing NCA: the authors' architecture (both biases, last layer zero)."""
    return NCA(
        **{
            "channels": channels,
            "hidden": hidden,
            "fire_rate": 0.5,
            "filters": DISTILL_FILTERS[:3],
            "bias1": True,
            "bias2": True,
            "padding": "zeros",
            "alive_threshold": 0.1,
            "alive_channel": 3,
            **kwargs,
        }
    )


# --------------------------------------------------------------------------------- targets


def builtin_target(name: str, size: int = 40) -> torch.Tensor:
    """A target drawn by code, (1, 4, size, size) premultiplied RGBA in [0, 1]."""
    s = 4 * size  # drawn 4x larger, then downsampled (antialiased edges)
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    if name == "heart":
        r = s * 0.24
        for cx in (s * 0.30, s * 0.70):
            d.ellipse([cx - r, s * 0.34 - r, cx + r, s * 0.34 + r], fill=(220, 30, 60, 255))
        d.polygon(
            [(s * 0.08, s * 0.42), (s * 0.92, s * 0.42), (s * 0.5, s * 0.92)],
            fill=(220, 30, 60, 255),
        )
    elif name == "ring":
        d.ellipse([s * 0.08, s * 0.08, s * 0.92, s * 0.92], fill=(30, 110, 220, 255))
        d.ellipse([s * 0.32, s * 0.32, s * 0.68, s * 0.68], fill=(0, 0, 0, 0))
        d.ellipse([s * 0.40, s * 0.02, s * 0.60, s * 0.22], fill=(250, 200, 30, 255))
    elif name == "smiley":
        d.ellipse([s * 0.06, s * 0.06, s * 0.94, s * 0.94], fill=(250, 200, 40, 255))
        for cx in (s * 0.35, s * 0.65):
            d.ellipse([cx - s * 0.06, s * 0.30, cx + s * 0.06, s * 0.46], fill=(60, 40, 20, 255))
        d.chord([s * 0.25, s * 0.40, s * 0.75, s * 0.78], 0, 180, fill=(60, 40, 20, 255))
    else:
        raise ValueError(
            f"target: unknown built-in target {name!r}; expected one of "
            f"{', '.join(TARGETS)} or an image file"
        )
    return _premultiplied(img.resize((size, size), Image.Resampling.LANCZOS))


def _premultiplied(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img.convert("RGBA"), np.float32) / 255).permute(2, 0, 1)
    a[:3] *= a[3:]
    return a[None].clamp(0, 1)


def load_target(target, size: int) -> tuple[torch.Tensor, str]:
    """(premultiplied RGBA (1, 4, h, w), description): ``target`` is a built-in name or an image
    file, resized so its longest side is ``size``. An image without alpha is taken as drawn on
    white: alpha = 1 - min(r, g, b), rgb = rgb - min(r, g, b) (shown on white it is unchanged)."""
    if target is None or (
        isinstance(target, str) and target in TARGETS and not Path(target).exists()
    ):
        name = target or TARGETS[0]
        return builtin_target(name, size), f"built-in target {name!r}"
    p = Path(str(target)).expanduser()
    if not p.is_file():
        raise ValueError(
            f"target: {str(p)!r} is not an image file or a built-in target ({', '.join(TARGETS)})"
        )
    try:
        img = Image.open(p)
        img.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(
            f"target: {str(p)!r} is not a readable image ({type(e).__name__})"
        ) from None
    w, h = img.size
    k = size / max(w, h)
    if "A" not in img.getbands() and "transparency" not in img.info:
        rgb = np.asarray(img.convert("RGB"), np.float32) / 255
        a = 1 - rgb.min(-1, keepdims=True)
        img = Image.fromarray(
            (np.concatenate([rgb - (1 - a), a], -1) * 255).round().astype(np.uint8), "RGBA"
        )
        img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[
            None
        ], f"image {str(p)!r} on white"
    img = img.convert("RGBA").resize(
        (max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.LANCZOS
    )
    return _premultiplied(img), f"image {str(p)!r}"


def pad_target(t: torch.Tensor, padding: int) -> torch.Tensor:
    return F.pad(t, (padding,) * 4)


def circle_masks(n: int, h: int, w: int, generator=None) -> torch.Tensor:
    """(n, 1, h, w) float: 0 inside a random disc (centre in the middle half, radius 0.1-0.4 of
    the half-side, as the article's ``make_circle_masks``), 1 elsewhere."""
    c = torch.rand(n, 2, generator=generator) - 0.5
    r = torch.rand(n, generator=generator) * 0.3 + 0.1
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    d2 = (xs[None, None] - c[:, 0, None, None]) ** 2 + (
        ys[None, :, None] - c[:, 1, None, None]
    ) ** 2
    return (d2 >= r[:, None, None] ** 2).float()[:, None]


# -------------------------------------------------------------------------------- callback


class GrowCB(TrainCB):
    """Pool training of a growing NCA (``learn.model``) towards ``target`` (1, 4, H, W), the
    premultiplied RGBA already padded to the grid. Attributes: ``pool``, ``losses`` (one per
    iteration), ``iteration``."""

    order = 0

    def __init__(self, target: torch.Tensor, config: GrowConfig | None = None, **overrides):
        super().__init__()
        self.cfg = dataclasses.replace(config or GrowConfig(), **overrides).validate()
        self.target = target
        self.pool, self.losses, self.iteration = None, [], 0

    def before_fit(self, learn):
        dev = next(learn.model.parameters()).device
        self.target = self.target.to(dev)
        with torch.no_grad():
            self.pool = learn.model.seed(self.cfg.pool, tuple(self.target.shape[-2:])).to(dev)

    def sample_loss(self, x):
        return (x[:, :4] - self.target).square().mean((1, 2, 3))

    def predict(self, learn):
        cfg, model = self.cfg, learn.model
        idx = torch.randperm(cfg.pool)[: cfg.batch].to(self.pool.device)
        with torch.no_grad():
            idx = idx[self.sample_loss(self.pool[idx]).argsort(descending=True)]
            x = self.pool[idx].clone()
            x[:1] = model.seed(1, tuple(x.shape[-2:])).to(x)  # the worst: reseeded
            if cfg.damage:
                x[-cfg.damage :] *= circle_masks(cfg.damage, *x.shape[-2:]).to(x)
        n = int(torch.randint(cfg.min_steps, cfg.max_steps + 1, ()).item())
        with torch.autocast(x.device.type, enabled=False):
            x = model(x, steps=n)
        with torch.no_grad():
            self.pool[idx] = x.detach()
        learn.preds = x

    def get_loss(self, learn):
        learn.loss = self.sample_loss(learn.preds).mean()

    def after_step(self, learn):
        self.iteration += 1
        self.losses.append(float(learn.loss.detach()))
        if self.iteration == self.cfg.lr_drop:
            for g in learn.opt.param_groups:
                g["lr"] *= 0.1


@torch.no_grad()
def growth_mse(model, target: torch.Tensor, steps: int, n: int = 4, seed: int = 0) -> float:
    """Mean squared error of ``n`` grids grown from the seed for ``steps`` steps against the
    padded premultiplied ``target`` (1, 4, H, W): the quality of growth, independent of the pool."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = model(model.seed(n, tuple(target.shape[-2:])), steps=steps)
    return float((x[:, :4] - target.to(x)).square().mean())


@torch.no_grad()
def regrow_frames(model, target_hw, frames=48, steps_per_frame=4, damage_at=24, seed=0):
    """Frames (H, W, 3) uint8 of growth from the seed, a disc cut out of the middle at frame
    ``damage_at``, and the regrowth (the regeneration GIF)."""
    from fastnca.style.images import to_uint8

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = model.seed(1, target_hw)
        out = []
        for k in range(frames):
            if k == damage_at:
                h, w = target_hw
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                hole = ((ys - h * 0.5) ** 2 + (xs - w * 0.62) ** 2) < (min(h, w) * 0.18) ** 2
                x[:, :, hole] = 0
            x = model(x, steps=steps_per_frame)
            out.append(to_uint8(model.image(x).float()))
    return out


def train_grow(
    target=None, out_dir=None, preset: str = "grow-quick", progress: bool = False, **overrides
) -> dict:
    """Train a growing NCA and write ``out_dir`` (None: write nothing): checkpoint.pt,
    config.json, target.png, loss.png, growth.gif and regenerate.gif. ``target``: a built-in
    name (default "heart"), an RGBA image or an image on white. Returns a dict: model, config,
    losses, seconds, target, mse (``growth_mse`` after ``max_steps`` steps) and files."""
    from fastnca._io import atomic_write_json
    from fastnca.nca.checkpoint import save_checkpoint
    from fastnca.nca.render import plot_losses, write_animation
    from fastnca.style.images import save_image
    from fastnca.train.callbacks import GradNormCB, ProgressCB
    from fastnca.train.data import dummy_dls
    from fastnca.train.learner import Learner

    cfg = make_grow_config(preset, **overrides)
    tgt, what = load_target(target, cfg.target_size)
    run = None if out_dir is None else Path(out_dir).expanduser()
    if run is not None and run.exists() and not run.is_dir():
        raise ValueError(f"out_dir: {str(run)!r} exists and is not a directory")
    padded = pad_target(tgt, cfg.padding)
    torch.manual_seed(cfg.seed)
    model = growing_nca(cfg.channels, cfg.hidden)
    cb = GrowCB(padded, cfg)
    cbs = [cb, GradNormCB()] + ([ProgressCB()] if progress else [])
    learn = Learner(
        model, dummy_dls(cfg.iters), lambda *a: None, lr=cfg.lr, cbs=cbs, opt_func=torch.optim.Adam
    )
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        learn.fit(1, train=True, valid=False)
    finally:
        seconds = time.perf_counter() - t0
        torch.set_num_threads(threads)
    model.eval()
    mse = growth_mse(model, padded, cfg.max_steps)
    result = {
        "mse": mse,
        "model": model,
        "config": cfg,
        "losses": cb.losses,
        "seconds": seconds,
        "target": what,
        "files": {},
    }
    if run is None:
        return result
    run.mkdir(parents=True, exist_ok=True)
    hw = tuple(padded.shape[-2:])
    files = {
        k: run / v
        for k, v in dict(
            checkpoint="checkpoint.pt",
            config="config.json",
            target="target.png",
            loss="loss.png",
            gif="growth.gif",
            regen="regenerate.gif",
        ).items()
    }
    save_checkpoint(
        files["checkpoint"], model, {"preset": cfg.preset, "grow_config": dataclasses.asdict(cfg)}
    )
    save_image(NCA.image(model, padded), files["target"])
    plot_losses(cb.losses, files["loss"], title=f"{cfg.preset}: {what}")
    scale = max(1, 256 // max(hw))
    frames = regrow_frames(model, hw, frames=48, steps_per_frame=4, damage_at=10**9)
    write_animation(frames, files["gif"], scale=scale)
    write_animation(regrow_frames(model, hw), files["regen"], scale=scale)
    atomic_write_json(
        {
            "grow": dataclasses.asdict(cfg),
            "target": what,
            "iterations": cb.iteration,
            "final_loss": cb.losses[-1] if cb.losses else None,
            "growth_mse": mse,
            "seconds": round(seconds, 2),
        },
        files["config"],
    )
    result["files"] = files
    return result


__all__ = [
    "PRESETS",
    "TARGETS",
    "GrowCB",
    "GrowConfig",
    "builtin_target",
    "circle_masks",
    "growing_nca",
    "load_target",
    "make_grow_config",
    "train_grow",
]
