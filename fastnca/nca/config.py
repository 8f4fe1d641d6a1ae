"""Texture-NCA training presets and the run configuration, each defined once.

``ARCHITECTURES``: the model shapes (``NCA.fastai()`` is "lesson", ``NCA.texture()`` "texture").
``PRESETS``: full training recipes; "quick" is the :class:`TrainConfig` defaults. ``make_config``
gives a validated config from a preset and overrides, within the limits of a texture run (grid
side >= 16 for relu5_1, channels >= 3, iters <= 10^6, seed < 2^63, and an estimated memory use
within half of this machine's RAM: ``memory_parts``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fastnca._checks import check_int
from fastnca._memory import check_memory
from fastnca.reference import DEFAULT_FILTERS, DISTILL_FILTERS

FILTER_BANKS = {"lesson": DEFAULT_FILTERS, "distill": DISTILL_FILTERS}

# Model architectures, defined once: NCA.fastai() / NCA.texture() and the training presets use them.
ARCHITECTURES: dict[str, dict] = {
    "lesson": dict(channels=4, hidden=8, filters="lesson"),  # the fast.ai lesson's SimpleCA
    "texture": dict(channels=12, hidden=96, filters="distill"),  # Self-Organising Textures
    "quick": dict(channels=8, hidden=32, filters="distill"),  # small enough for 2 CPU cores
}
LOSSES = ("gram", "swd")


def architecture(name: str) -> dict:
    """NCA constructor arguments of ``ARCHITECTURES[name]`` (the filter bank as a tensor)."""
    arch = dict(ARCHITECTURES[name])
    arch["filters"] = FILTER_BANKS[arch["filters"]]
    return arch


AMP_MODES = ("none", "bf16")

# Presets. "lesson": the fast.ai lesson's NCA notebook; "texture": Self-Organising Textures
# (Distill 2021: 12 channels, 96 hidden, filters /8, lr 1e-3 x0.3 at 2000, reseed every 8);
# "quick": chosen by measurement on a 2-core CPU: 64x64 grids, 8 channels, 32 hidden,
# 16-32 steps, 800 iterations, every core (threads=0: torch's own count; `fastnca train --iters
# 60 --threads 1|2` with the C++ CPU kernels: 0.22-0.25 s per iteration on one thread, 0.14-0.19
# s on two), the colourful 'stripes' texture, per-layer relative style loss (the same
# weights work for pretrained VGG and the offline fallback): 2.5 min wall there (800 iterations).
PRESETS: dict[str, dict] = {
    "quick": {},  # the TrainConfig defaults below
    "lesson": dict(
        **ARCHITECTURES["lesson"],
        size=256,
        pool=256,
        batch=4,
        min_steps=32,
        max_steps=96,
        style_weight=0.1,
        lr=1e-3,
        lr_milestones=(),
        lr_gamma=1.0,
        iters=1200,
        seed_every=0,
        seed_prob=1 / 8,
        relative_style=False,
        texture=None,
        threads=0,
    ),
    "texture": dict(
        **ARCHITECTURES["texture"],
        size=128,
        pool=256,
        batch=4,
        min_steps=32,
        max_steps=96,
        style_weight=1.0,
        lr=1e-3,
        lr_milestones=(2000,),
        lr_gamma=0.3,
        iters=4000,
        seed_every=8,
        seed_prob=0.0,
        relative_style=False,
        texture=None,
        threads=0,
    ),
}


# Upper bounds, each with its reason (in the error message).
VGG_POOLS = (4, 9, 16, 23, 30)  # vgg16().features indices of the max pools
MAX_ITERS = 10**6
ITERS_WHY = " (the loss curve keeps one number per iteration in memory and in checkpoint.pt)"
MAX_SEED = 2**63 - 1
SEED_WHY = " (torch.manual_seed takes a 64-bit integer)"
VGG_FLOATS_PER_PIXEL = 600  # float32 activations kept for backward per input pixel, relu1_1..5_1


def min_grid_size(layers) -> int:
    """Smallest grid side (and style-image side) for style features at VGG16 ``layers``:
    2^(max pools before the deepest one), 16 for relu5_1 (index 25)."""
    return 2 ** sum(max(layers) >= i for i in VGG_POOLS)


def memory_parts(cfg: TrainConfig) -> dict[str, float]:
    """Bytes of the large buffers of one training iteration (float32), by part.

    pool: (pool, C, S, S); rollout: what backward keeps per NCA step, the state and a 1-byte
    mask, (batch, C, S, S) * 4 + (batch, 1, S, S), times max_steps; step: one step's perception
    and hidden activations, (batch, 4C + hidden, S, S); features: the style network's activations
    kept for backward, about VGG_FLOATS_PER_PIXEL floats per pixel of the batch.
    """
    px = float(cfg.size) ** 2
    return {
        "pool": 4 * cfg.pool * cfg.channels * px,
        "rollout": cfg.max_steps * cfg.batch * (4 * cfg.channels + 1) * px,
        "step": 4 * cfg.batch * (4 * cfg.channels + cfg.hidden) * px,
        "features": 4 * cfg.batch * VGG_FLOATS_PER_PIXEL * px,
    }


@dataclass
class TrainConfig:
    """Everything a run depends on (saved as config.json). The defaults are the "quick" preset;
    PRESETS holds the other presets' values."""

    preset: str = "quick"
    size: int = 64  # training grid side (cells); the style image is resized to it
    channels: int = ARCHITECTURES["quick"]["channels"]
    hidden: int = ARCHITECTURES["quick"]["hidden"]
    filters: str = ARCHITECTURES["quick"]["filters"]  # "lesson" (unscaled) or "distill" (/ 8)
    fire_rate: float = 0.5
    pool: int = 64
    batch: int = 4
    min_steps: int = 16
    max_steps: int = 32  # steps per iteration ~ U[min_steps, max_steps) (min when equal)
    style_weight: float = 1.0
    lr: float = 2e-3
    lr_milestones: tuple = (600,)  # the lr is multiplied by lr_gamma at each (in iterations)
    lr_gamma: float = 0.3
    iters: int = 800
    seed_every: int = 8  # reseed one sample every k iterations (0: off)
    seed_prob: float = 0.0  # ... or with this probability per iteration
    loss: str = "gram"  # "gram" (style loss) or "swd" (sliced Wasserstein)
    overflow_normalise: bool = False
    relative_style: bool = True  # style loss as a relative error per layer (TextureLoss)
    layers: tuple = (1, 6, 11, 18, 25)  # VGG16 feature indices of the style loss
    weights: str = "auto"  # VGG16 weights: "auto", "imagenet", "random" or a file
    device: str = "auto"
    amp: str = "none"
    compile: bool = False
    threads: int = 0  # torch CPU threads during training (0: leave torch's setting, every core)
    seed: int = 0
    save_every: int = 500  # iterations between checkpoints (0: only at the end)
    style: str | None = None  # the style image file, or None for a built-in texture
    texture: str | None = "stripes"  # the built-in texture used when style is None

    def validate(self) -> TrainConfig:
        for k in ("size", "channels", "hidden", "pool", "batch", "min_steps", "max_steps"):
            v = getattr(self, k)
            check_int(k, v, 1)
        check_int("iters", self.iters, 1, MAX_ITERS, why=ITERS_WHY)
        check_int("seed", self.seed, 0, MAX_SEED, why=SEED_WHY)
        for k in ("seed_every", "save_every", "threads"):
            v = getattr(self, k)
            check_int(k, v, 0)
        if self.min_steps > self.max_steps:
            raise ValueError(
                f"min_steps ({self.min_steps}) > max_steps ({self.max_steps}); "
                f"expected min_steps <= max_steps"
            )
        if self.pool < self.batch:
            raise ValueError(
                f"pool ({self.pool}) is smaller than batch ({self.batch}); the "
                f"batch is sampled from the pool without replacement"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.filters not in FILTER_BANKS:
            raise ValueError(
                f"filters: expected one of {', '.join(FILTER_BANKS)}, got {self.filters!r}"
            )
        for k, lo in (("lr", 0.0), ("style_weight", None), ("lr_gamma", 0.0)):
            v = getattr(self, k)
            if (
                not isinstance(v, (int, float))
                or not math.isfinite(v)
                or (v <= lo if lo is not None else v < 0)
            ):
                raise ValueError(
                    f"{k}: expected a {'positive' if lo is not None else '>= 0'} number, got {v!r}"
                )
        if not 0 < self.fire_rate <= 1:
            raise ValueError(f"fire_rate: expected a number in (0, 1], got {self.fire_rate!r}")
        if not 0 <= self.seed_prob <= 1:
            raise ValueError(f"seed_prob: expected a probability in [0, 1], got {self.seed_prob!r}")
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        self.layers = tuple(self.layers)
        return self

    def check_texture_run(self) -> TrainConfig:
        """The limits of a texture-training run (beyond :meth:`validate`, which unit tests of the
        NCA callback also use with toy sizes): RGB needs channels >= 3, the style features need
        a grid of at least 2^(poolings before the deepest layer) cells (16 for relu5_1), and the
        job must fit in memory (``memory_parts``)."""
        check_int("channels", self.channels, 3, why=" (RGB is read from channels 0..2)")
        need = min_grid_size(self.layers)
        check_int(
            "size",
            self.size,
            need,
            why=f" (the style features at VGG16 index {max(self.layers)} come after "
            f"{need.bit_length() - 1} 2x2 poolings: {need} cells -> 1)",
        )
        check_memory(
            f"training {self.size}x{self.size} grids (pool {self.pool}, batch "
            f"{self.batch}, {self.channels} channels, {self.hidden} hidden, up to "
            f"{self.max_steps} steps)",
            memory_parts(self),
            "lower size, pool, batch, max_steps, channels or hidden",
        )
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"], d["layers"] = list(self.lr_milestones), list(self.layers)
        return d


def make_config(preset: str = "quick", **overrides) -> TrainConfig:
    """A validated TrainConfig: ``PRESETS[preset]`` with ``overrides`` (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; expected some of {sorted(fields)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).validate().check_texture_run()
