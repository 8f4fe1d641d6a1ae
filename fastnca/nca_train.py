"""Texture NCA training: pool training with the Learner, presets, and ``train_texture``.

The recipe (fast.ai lesson / Self-Organising Textures, Niklasson et al. 2021): keep a pool of
``pool`` grids (the seed state, zeros, at first); every iteration sample ``batch`` of them without
replacement, reseed one with a fresh seed grid (every ``seed_every`` iterations, or with
probability ``seed_prob``), run ``n ~ U[min_steps, max_steps)`` NCA steps, and minimise

    loss = overflow(x) + style_weight * style(to_rgb(x)),
    overflow(x) = sum |x - clamp(x, -1, 1)|      (or its mean over elements: overflow_normalise)

with per-parameter gradient normalisation (``GradNormCB``), Adam and a step LR schedule; the final
states go back into the pool (no grad), so the automaton learns to keep the texture alive.

``train_texture`` trains and writes a run directory (``config.json``, ``checkpoint.pt``,
``pool.pt``, ``style.png``, ``pool.png``, ``loss.png``, ``growth.gif``); the run-directory
machinery (input checks, resume, Ctrl-C) is in ``fastnca.nca_run``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastnca.learner import TrainCB
from fastnca.losses import overflow_loss, sliced_wasserstein_loss
from fastnca.ops import StyleLoss
from fastnca.reference import DEFAULT_FILTERS, DISTILL_FILTERS

FILTER_BANKS = {"lesson": DEFAULT_FILTERS, "distill": DISTILL_FILTERS}
LOSSES = ("gram", "swd")
AMP_MODES = ("none", "bf16")

# Presets. "lesson": the fast.ai lesson's NCA notebook; "texture": Self-Organising Textures
# (Distill 2021: 12 channels, 96 hidden, filters /8, lr 1e-3 x0.3 at 2000, reseed every 8);
# "quick": chosen by measurement on a shared 2-core CPU: 64x64 grids, 8 channels, 32 hidden,
# 16-32 steps, 800 iterations, one thread (these small tensors ran ~20x slower on two threads
# of a busy machine), the colourful 'stripes' texture, per-layer relative style loss (the same
# weights work for pretrained VGG and the offline fallback): ~200 s of CPU, 4.5 min wall there.
PRESETS: dict[str, dict] = {
    "quick": dict(size=64, channels=8, hidden=32, filters="distill", pool=64, batch=4,
                  min_steps=16, max_steps=32, style_weight=1.0, lr=2e-3, lr_milestones=(600,),
                  lr_gamma=0.3, iters=800, seed_every=8, seed_prob=0.0, relative_style=True,
                  texture="stripes", threads=1),
    "lesson": dict(size=256, channels=4, hidden=8, filters="lesson", pool=256, batch=4,
                   min_steps=32, max_steps=96, style_weight=0.1, lr=1e-3, lr_milestones=(),
                   lr_gamma=1.0, iters=1200, seed_every=0, seed_prob=1 / 8),
    "texture": dict(size=128, channels=12, hidden=96, filters="distill", pool=256, batch=4,
                    min_steps=32, max_steps=96, style_weight=1.0, lr=1e-3,
                    lr_milestones=(2000,), lr_gamma=0.3, iters=4000, seed_every=8, seed_prob=0.0),
}


@dataclass
class TrainConfig:
    """Everything a run depends on (saved as config.json). See PRESETS for the values."""

    preset: str = "quick"
    size: int = 64  # training grid side (cells); the style image is resized to it
    channels: int = 8
    hidden: int = 32
    filters: str = "distill"  # "lesson" (unscaled) or "distill" (gradients / 8)
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
    relative_style: bool = False  # style loss as a relative error per layer (TextureLoss)
    layers: tuple = (1, 6, 11, 18, 25)  # VGG16 feature indices of the style loss
    weights: str = "auto"  # VGG16 weights: "auto", "imagenet", "random" or a file
    device: str = "auto"
    amp: str = "none"
    compile: bool = False
    threads: int = 0  # torch CPU threads during training (0: leave torch's setting)
    seed: int = 0
    save_every: int = 500  # iterations between checkpoints (0: only at the end)
    style: str | None = None  # the style image file, or None for a built-in texture
    texture: str | None = None  # the built-in texture used when style is None

    def validate(self) -> TrainConfig:
        for k in ("size", "channels", "hidden", "pool", "batch", "min_steps", "max_steps",
                  "iters"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}: expected a positive int, got {v!r}")
        for k in ("seed_every", "save_every", "seed", "threads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k}: expected an int >= 0, got {v!r}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) > max_steps ({self.max_steps}); "
                             f"expected min_steps <= max_steps")
        if self.pool < self.batch:
            raise ValueError(f"pool ({self.pool}) is smaller than batch ({self.batch}); the "
                             f"batch is sampled from the pool without replacement")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.filters not in FILTER_BANKS:
            raise ValueError(f"filters: expected one of {', '.join(FILTER_BANKS)}, got "
                             f"{self.filters!r}")
        for k, lo in (("lr", 0.0), ("style_weight", None), ("lr_gamma", 0.0)):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or (
                    v <= lo if lo is not None else v < 0):
                raise ValueError(f"{k}: expected a {'positive' if lo is not None else '>= 0'} "
                                 f"number, got {v!r}")
        if not 0 < self.fire_rate <= 1:
            raise ValueError(f"fire_rate: expected a number in (0, 1], got {self.fire_rate!r}")
        if not 0 <= self.seed_prob <= 1:
            raise ValueError(f"seed_prob: expected a probability in [0, 1], got {self.seed_prob!r}")
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        self.layers = tuple(self.layers)
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
    return TrainConfig(**values).validate()


def build_model(cfg: TrainConfig):
    """The NCA module of a config (w2 zero-initialised, as in the lesson)."""
    from fastnca.nca import NCA

    return NCA(channels=cfg.channels, hidden=cfg.hidden, fire_rate=cfg.fire_rate,
               filters=FILTER_BANKS[cfg.filters])


class TextureLoss(nn.Module):
    """Style loss of RGB images against one style image, on VGG16 features.

    ``kind="gram"``: ``fastnca.ops.StyleLoss`` (mean squared Gram difference per layer, summed);
    ``kind="swd"``: sliced Wasserstein distance between the feature distributions.
    ``relative``: weight layer l by 1 / (L * mean(T_l²)) (T_l its target Gram, or features for
    swd), so the loss reads as a relative error whatever the features' scale (pretrained VGG or
    the offline fallback). style: (1, 3, H, W) in [0, 1]; forward(rgb: (B, 3, H', W')) -> scalar.
    """

    def __init__(self, style: torch.Tensor, features: nn.Module, kind: str = "gram",
                 relative: bool = False):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"kind: expected one of {', '.join(LOSSES)}, got {kind!r}")
        self.features, self.kind = features, kind
        with torch.no_grad():
            feats = [f.detach().float() for f in features(style)]
        weights = None
        if relative:  # layer l / (L * mean(T_l²)): about 1 far from the target, whatever the scale
            tg = StyleLoss.from_features(feats).targets if kind == "gram" else feats
            weights = [1.0 / (len(tg) * t.square().mean().item() + 1e-12) for t in tg]
        if kind == "gram":
            self.style = StyleLoss.from_features(feats, weights)
        else:
            self.targets, self.weights = feats, weights

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        feats = self.features(rgb)
        if self.kind == "gram":
            return self.style(feats)
        return sliced_wasserstein_loss(feats, [t.to(rgb.device) for t in self.targets],
                                       weights=self.weights)


def training_rgb(x: torch.Tensor) -> torch.Tensor:
    """The image the style loss sees: ``x[:, :3] + 0.5``, not clipped (the lesson's to_rgb), so
    cells pushed past [0, 1] still get a style gradient; the overflow term bounds them."""
    return x[:, :3] + 0.5


class NCACB(TrainCB):
    """Pool training of an NCA (``learn.model``) with the Learner and ``dummy_dls``.

    ``learn.loss_func(rgb)`` is the style term (e.g. a TextureLoss). The pool is created in
    ``before_fit`` on the model's device from ``model.seed(pool_size, size)`` unless ``pool`` is
    given. Attributes: ``pool`` (P, C, H, W), ``iteration`` (iterations done), ``losses`` (one
    float per iteration), ``last_idx`` (the pool indices of the last batch), ``n_reseeds``.
    ``compile_step``: ``torch.compile(model, **compile_kwargs)`` for the single NCA step, called
    ``n`` times per rollout (compiling the unrolled rollout instead would compile a graph per
    ``n``, each far slower to build).
    """

    order = 0

    def __init__(self, pool_size: int = 256, size: int = 128, batch_size: int = 4,
                 min_steps: int = 32, max_steps: int = 96, style_weight: float = 0.1,
                 seed_every: int = 0, seed_prob: float = 1 / 8, overflow_normalise: bool = False,
                 compile_step: bool = False, pool: torch.Tensor | None = None,
                 iteration: int = 0, losses: list | None = None,
                 compile_kwargs: dict | None = None):
        super().__init__()
        cfg = TrainConfig(size=size, pool=pool_size, batch=batch_size, min_steps=min_steps,
                          max_steps=max_steps, style_weight=style_weight, seed_every=seed_every,
                          seed_prob=seed_prob)
        cfg.validate()  # the same checks and messages as the CLI
        self.pool_size, self.size, self.batch_size = pool_size, size, batch_size
        self.min_steps, self.max_steps, self.style_weight = min_steps, max_steps, style_weight
        self.seed_every, self.seed_prob = seed_every, seed_prob
        self.overflow_normalise, self.compile_step = overflow_normalise, compile_step
        self.compile_kwargs = dict(compile_kwargs or {})
        if pool is not None and pool.shape[0] != pool_size:
            raise ValueError(f"pool: expected {pool_size} grids, got shape {tuple(pool.shape)}")
        self.pool = pool
        self.iteration, self.losses = iteration, list(losses or [])
        self.n_reseeds, self.last_idx, self.last_steps = 0, None, 0
        self._step = None

    def before_fit(self, learn):
        model = learn.model
        dev = next(model.parameters()).device
        if self.pool is None:
            with torch.no_grad():
                self.pool = model.seed(self.pool_size, self.size).to(dev)
        self.pool = self.pool.to(dev)
        self._step = torch.compile(model, **self.compile_kwargs) if self.compile_step else model

    def reseed_due(self) -> bool:
        """Whether this iteration reseeds a sample (every seed_every, or with seed_prob)."""
        if self.seed_every and self.iteration % self.seed_every == 0:
            return True
        return bool(self.seed_prob) and torch.rand(()).item() < self.seed_prob

    def n_steps(self) -> int:
        if self.max_steps <= self.min_steps:
            return self.min_steps
        return int(torch.randint(self.min_steps, self.max_steps, ()).item())

    def rollout(self, x: torch.Tensor, n: int) -> torch.Tensor:
        for _ in range(n):
            x = self._step(x)
        return x

    def predict(self, learn):
        idx = torch.randperm(self.pool_size)[: self.batch_size].to(self.pool.device)
        x = self.pool[idx].clone()
        if self.reseed_due():
            x[:1] = learn.model.seed(1, self.size).to(x)
            self.n_reseeds += 1
        self.last_idx, self.last_steps = idx, self.n_steps()
        # The state is a float32 residual sum over many steps and nca_step computes in float32:
        # mixed precision (MixedPrecision's autocast) applies to the style loss only.
        with torch.autocast(x.device.type, enabled=False):
            x = self.rollout(x, self.last_steps)
        with torch.no_grad():
            self.pool[idx] = x.detach().to(self.pool.dtype)
        learn.preds = x

    def get_loss(self, learn):
        x = learn.preds
        overflow = overflow_loss(x.float(), normalise=self.overflow_normalise)
        style = learn.loss_func(training_rgb(x))
        learn.loss = overflow + self.style_weight * style.float()

    def after_step(self, learn):
        self.iteration += 1
        self.losses.append(float(learn.loss.detach()))

    def after_loss(self, learn):
        if learn.training and not torch.isfinite(learn.loss.detach()).item():
            raise TrainingDiverged(f"training diverged at iteration {self.iteration + 1} (loss "
                                   f"{float(learn.loss.detach())}); no checkpoint was written "
                                   f"for it: try a lower lr")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: the run stops before the optimiser step, nothing is saved."""


def train_texture(style=None, out_dir=None, preset: str = "quick", *, resume=None,
                  progress: bool = True, gif_frames: int = 48, gif_steps_per_frame: int = 8,
                  **overrides):
    """Train a texture NCA and write a run directory (see the module docstring).

    style: an image file, a built-in texture name, a (1, 3, H, W) tensor, or None (the built-in
    default texture). out_dir: the run directory (must not hold a run already). preset: "quick",
    "lesson" or "texture"; ``overrides``: any TrainConfig field (size=, iters=, lr=, amp="bf16",
    compile=True, ...). resume: a run directory to continue (its config, pool and optimiser;
    only ``iters``, ``device``, ``amp``, ``compile``, ``save_every`` may change), appending to
    the same loss curve. Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt. Every input
    is checked before anything is written (ValueError); a diverging run raises TrainingDiverged
    and writes no checkpoint. Returns a ``fastnca.nca_run.TrainResult``.
    """
    from fastnca.nca_run import TrainingRun

    plan = TrainingRun(style, out_dir, preset, resume=resume, **overrides)
    return plan.run(progress=progress, gif_frames=gif_frames,
                    gif_steps_per_frame=gif_steps_per_frame)
