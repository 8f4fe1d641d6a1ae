"""Texture NCA training: pool training with the Learner, presets, and ``train_texture``.

The recipe (fast.ai lesson / Self-Organising Textures, Niklasson et al. 2021): keep a pool of
``pool`` grids (the seed state, zeros, at first); every iteration sample ``batch`` of them without
replacement, reseed one with a fresh seed grid (every ``seed_every`` iterations, or with
probability ``seed_prob``), run ``n ~ U[min_steps, max_steps)`` NCA steps, and minimise

    loss = overflow(x) + style_weight * style(to_rgb(x)),
    overflow(x) = sum |x - clamp(x, -1, 1)|      (or its mean over elements: overflow_normalise)

with per-parameter gradient normalisation (``GradNormCB``), Adam and a step LR schedule; the final
states go back into the pool (no grad), so the automaton learns to keep the texture alive.

``train_texture`` writes a run directory: ``config.json``, ``checkpoint.pt`` (weights + config +
resume state, see fastnca.checkpoint), ``pool.pt`` (the pool, for --resume), ``style.png``,
``pool.png`` (pool samples), ``loss.png`` (the loss curve), ``growth.gif`` (+ ``growth.png``,
grown from a seed grid).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fastnca.learner import Callback, Learner, TrainCB
from fastnca.losses import overflow_loss, sliced_wasserstein_loss
from fastnca.ops import StyleLoss
from fastnca.reference import DEFAULT_FILTERS, DISTILL_FILTERS

FILTER_BANKS = {"lesson": DEFAULT_FILTERS, "distill": DISTILL_FILTERS}
LOSSES = ("gram", "swd")
AMP_MODES = ("none", "bf16")

# Presets. "lesson": the fast.ai lesson's NCA notebook; "texture": Self-Organising Textures
# (Distill 2021: 12 channels, 96 hidden, filters /8, lr 1e-3 x0.3 at 2000, reseed every 8);
# "quick": a small run that finishes in minutes on 2 CPU cores (sizes chosen by measurement).
PRESETS: dict[str, dict] = {
    "quick": dict(size=64, channels=8, hidden=32, filters="lesson", pool=64, batch=4,
                  min_steps=16, max_steps=48, style_weight=1.0, lr=2e-3, lr_milestones=(200,),
                  lr_gamma=0.3, iters=300, seed_every=8, seed_prob=0.0),
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
    filters: str = "lesson"  # "lesson" (unscaled) or "distill" (gradients / 8)
    fire_rate: float = 0.5
    pool: int = 64
    batch: int = 4
    min_steps: int = 16
    max_steps: int = 48  # steps per iteration ~ U[min_steps, max_steps) (min when equal)
    style_weight: float = 1.0
    lr: float = 2e-3
    lr_milestones: tuple = ()
    lr_gamma: float = 0.3
    iters: int = 300
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
        for k in ("seed_every", "save_every", "seed"):
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


# ----- run directories -----
CONFIG_NAME, POOL_NAME, STYLE_NAME = "config.json", "pool.pt", "style.png"
RESUMABLE = {"iters", "device", "amp", "compile", "save_every"}  # may change on --resume


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA device is available; use "
                         f"--device cpu")
    return dev


def resolve_style(style, size: int, texture: str | None = None) -> tuple[torch.Tensor, str]:
    """The style image as (1, 3, H, W) in [0, 1], quantised to 8 bits (what style.png stores),
    and a description. ``style``: None (built-in ``texture``), a file, a built-in texture name,
    or a tensor. Files larger than ``size`` are shrunk to it (longest side)."""
    from fastnca.images import ImageError, load_image
    from fastnca.textures import DEFAULT_TEXTURE, builtin_texture, list_textures

    if isinstance(style, torch.Tensor):
        img, what = style.detach().float().cpu(), "a given tensor"
        if img.dim() == 3:
            img = img[None]
        if img.dim() != 4 or img.shape[:2] != (1, 3):
            raise ValueError(f"style: expected a (1, 3, H, W) image tensor, got {tuple(img.shape)}")
    elif style is None or (not Path(str(style)).exists() and str(style) in list_textures()):
        name = texture or (DEFAULT_TEXTURE if style is None else str(style))
        if name not in list_textures():
            raise ValueError(f"texture: unknown built-in texture {name!r}; expected one of "
                             f"{', '.join(list_textures())}")
        img, what = builtin_texture(name, max(size, 8)), f"built-in texture {name!r}"
    else:
        try:
            img = load_image(style, size=size)
        except ImageError as e:
            hint = f" (built-in textures: {', '.join(list_textures())})" if not Path(
                str(style)).exists() else ""
            raise ImageError(f"style image: {e}{hint}") from None
        what = f"style image {str(style)!r}"
    return (img.clamp(0, 1) * 255).round() / 255, what


def _load_run(run_dir, overrides: dict):
    """(config, Checkpoint, pool or None) of a run directory to resume."""
    from fastnca.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_file

    run = Path(run_dir).expanduser()
    if not run.is_dir() or not (run / CHECKPOINT_NAME).is_file():
        raise ValueError(f"resume: {str(run)!r} is not a run directory of `fastnca train` (no "
                         f"{CHECKPOINT_NAME} in it)")
    ckpt = load_checkpoint(run)
    saved = ckpt.config.get("train_config")
    if not isinstance(saved, dict) or ckpt.train is None:
        raise CheckpointError(f"{str(run / CHECKPOINT_NAME)!r} holds weights only (no training "
                              f"state), so it cannot be resumed")
    changed = sorted(k for k, v in overrides.items()
                     if v is not None and k not in RESUMABLE and saved.get(k) != v)
    if changed:
        raise ValueError(f"resume: {', '.join(changed)} cannot change when resuming (the run "
                         f"has {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); only "
                         f"{', '.join(sorted(RESUMABLE))} can")
    cfg = TrainConfig(**{**saved, **{k: v for k, v in overrides.items()
                                     if v is not None and k in RESUMABLE}}).validate()
    pool = None
    if (run / POOL_NAME).is_file():
        p = load_file(run / POOL_NAME)
        if isinstance(p, dict) and p.get("iteration") == ckpt.train.get("iteration"):
            pool = p.get("pool")
    if pool is None:
        print(f"fastnca train: {POOL_NAME} missing or from another iteration: resuming with a "
              f"fresh pool", file=sys.stderr)
    return cfg, ckpt, pool


class _RunStateCB(Callback):
    """Restores optimiser/scheduler/RNG state on resume (after BatchSchedCB built learn.sched)
    and saves the run every ``every`` iterations."""

    order = 30

    def __init__(self, save, every: int, state: dict | None):
        self.save, self.every, self.state = save, every, state

    def before_fit(self, learn):
        s = self.state
        if s:
            learn.opt.load_state_dict(s["optimizer"])
            if s.get("scheduler") is not None and getattr(learn, "sched", None) is not None:
                learn.sched.load_state_dict(s["scheduler"])

    def before_batch(self, learn):
        # RNG last: after the DataLoader iterator drew its base seed, as in an unbroken run.
        s, self.state = self.state, None
        if s:
            torch.set_rng_state(s["rng"])
            if s.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(s["cuda_rng"])

    def after_batch(self, learn):
        nca = next(cb for cb in learn.cbs if isinstance(cb, NCACB))
        if self.every and nca.iteration % self.every == 0:
            self.save(learn)


@dataclass
class TrainResult:
    """What ``train_texture`` returns: the trained module, its config, the loss per iteration,
    the run directory, wall seconds of the training loop, and the files written."""

    model: nn.Module
    config: TrainConfig
    losses: list
    run_dir: Path
    seconds: float
    files: dict


class TrainingRun:
    """A checked training run: every input validated (config, style image, run directory,
    device, feature weights) and nothing written yet; ``run()`` trains and writes the run
    directory. ``train_texture(...)`` is ``TrainingRun(...).run(...)``."""

    def __init__(self, style=None, out_dir=None, preset: str = "quick", *, resume=None,
                 **overrides):
        from fastnca.checkpoint import CHECKPOINT_NAME
        from fastnca.features import VGG16Features

        self.ckpt = self.pool = None
        if resume is not None:
            cfg, self.ckpt, self.pool = _load_run(resume, overrides)
            run = Path(resume).expanduser()
            self.done, self.losses = int(self.ckpt.train["iteration"]), list(
                self.ckpt.train["losses"])
            if self.done >= cfg.iters:
                raise ValueError(f"iters: the run in {str(run)!r} already has {self.done} "
                                 f"iterations; pass a larger iters to train longer")
            style = run / STYLE_NAME
        else:
            if out_dir is None:
                raise ValueError("out_dir: expected a run directory to write, got None")
            run = Path(out_dir).expanduser()
            if run.exists() and not run.is_dir():
                raise ValueError(f"out_dir: {str(run)!r} exists and is not a directory")
            if (run / CHECKPOINT_NAME).exists():
                raise ValueError(f"out_dir: {str(run)!r} already holds a trained NCA; continue "
                                 f"it with resume (--resume) or choose another directory")
            src = None if style is None or isinstance(style, torch.Tensor) else str(style)
            cfg = make_config(preset, style=src, **overrides)
            self.done, self.losses = 0, []
        self.cfg, self.run_dir, self.resumed = cfg, run, resume is not None
        self.device = _device(cfg.device)
        self.style_img, self.style_what = resolve_style(style, cfg.size, cfg.texture)
        self.features = VGG16Features(cfg.layers, weights=cfg.weights)

    def run(self, progress: bool = True, gif_frames: int = 48,
            gif_steps_per_frame: int = 8) -> TrainResult:
        from fastnca.callbacks import BatchSchedCB, GradNormCB, MixedPrecision, ProgressCB
        from fastnca.checkpoint import (
            CHECKPOINT_NAME,
            atomic_save,
            atomic_write_json,
            model_config,
            save_checkpoint,
        )
        from fastnca.data import dummy_dls
        from fastnca.images import save_image
        from fastnca.render import grow, plot_losses, pool_image, write_animation

        cfg, run, dev, ckpt, done = self.cfg, self.run_dir, self.device, self.ckpt, self.done
        torch.manual_seed(cfg.seed)
        model = (ckpt.build_model() if ckpt is not None else build_model(cfg)).to(dev)
        loss_func = TextureLoss(self.style_img.to(dev), self.features.to(dev), cfg.loss,
                                cfg.relative_style)
        if cfg.compile:
            loss_func = torch.compile(loss_func)
        nca = NCACB(cfg.pool, cfg.size, cfg.batch, cfg.min_steps, cfg.max_steps,
                    cfg.style_weight, cfg.seed_every, cfg.seed_prob, cfg.overflow_normalise,
                    compile_step=cfg.compile, pool=self.pool, iteration=done,
                    losses=self.losses)
        files = {k: run / v for k, v in dict(
            config=CONFIG_NAME, checkpoint=CHECKPOINT_NAME, pool=POOL_NAME, style=STYLE_NAME,
            pool_png="pool.png", loss_png="loss.png", gif="growth.gif").items()}
        info = {"train": cfg.to_dict(), "model": model_config(model, cfg.preset),
                "style": self.style_what, "features": self.features.source,
                "device": str(dev), "torch": torch.__version__, "iterations": done}

        def save(learn):
            atomic_save({"pool": nca.pool.detach().cpu(), "iteration": nca.iteration},
                         files["pool"])
            sched = getattr(learn, "sched", None)
            train = {"iteration": nca.iteration, "losses": list(nca.losses),
                     "optimizer": learn.opt.state_dict(),
                     "scheduler": None if sched is None else sched.state_dict(),
                     "rng": torch.get_rng_state(), "n_reseeds": nca.n_reseeds,
                     "cuda_rng": torch.cuda.get_rng_state_all() if dev.type == "cuda" else None}
            save_checkpoint(files["checkpoint"], model,
                            {"preset": cfg.preset, "train_config": cfg.to_dict()}, train)

        cbs = [nca, GradNormCB(), _RunStateCB(save, cfg.save_every, ckpt.train if ckpt else None)]
        if cfg.lr_milestones:
            cbs.append(BatchSchedCB(partial(torch.optim.lr_scheduler.MultiStepLR,
                                            milestones=list(cfg.lr_milestones),
                                            gamma=cfg.lr_gamma)))
        if cfg.amp == "bf16":
            cbs.append(MixedPrecision(torch.bfloat16))
        if progress:
            cbs.append(ProgressCB())
        learn = Learner(model, dummy_dls(cfg.iters - done), loss_func, lr=cfg.lr, cbs=cbs,
                        opt_func=torch.optim.Adam)
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(info, files["config"])
        if not self.resumed:
            save_image(self.style_img, files["style"])
        t0 = time.perf_counter()
        try:
            learn.fit(1, train=True, valid=False)
        except KeyboardInterrupt:
            if nca.iteration > done:
                save(learn)
                print(f"\nfastnca train: interrupted after {nca.iteration} iterations; saved "
                      f"{files['checkpoint']}; continue with: fastnca train --resume {run}",
                      file=sys.stderr)
            raise
        seconds = time.perf_counter() - t0
        save(learn)
        model.eval()
        with torch.no_grad():
            save_image(pool_image(model.to_rgb(nca.pool[:16]).float()), files["pool_png"])
        plot_losses(nca.losses, files["loss_png"], title=f"{cfg.preset}: {self.style_what}")
        frames = grow(model, cfg.size, frames=gif_frames, steps_per_frame=gif_steps_per_frame)
        write_animation(frames, files["gif"], scale=max(1, 256 // cfg.size))
        info.update(iterations=nca.iteration, final_loss=nca.losses[-1] if nca.losses else None,
                    seconds_this_session=round(seconds, 2),
                    seconds_per_iteration=round(seconds / max(1, nca.iteration - done), 4))
        atomic_write_json(info, files["config"])
        return TrainResult(model, cfg, nca.losses, run, seconds, files)


def train_texture(style=None, out_dir=None, preset: str = "quick", *, resume=None,
                  progress: bool = True, gif_frames: int = 48, gif_steps_per_frame: int = 8,
                  **overrides) -> TrainResult:
    """Train a texture NCA and write a run directory (see the module docstring).

    style: an image file, a built-in texture name, a (1, 3, H, W) tensor, or None (the built-in
    default texture). out_dir: the run directory (must not hold a run already). preset: "quick",
    "lesson" or "texture"; ``overrides``: any TrainConfig field (size=, iters=, lr=, amp="bf16",
    compile=True, ...). resume: a run directory to continue (its config, pool and optimiser;
    only ``iters``, ``device``, ``amp``, ``compile``, ``save_every`` may change), appending to
    the same loss curve. Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt. Every input
    is checked before anything is written (ValueError); a diverging run raises TrainingDiverged
    and writes no checkpoint.
    """
    plan = TrainingRun(style, out_dir, preset, resume=resume, **overrides)
    return plan.run(progress=progress, gif_frames=gif_frames,
                    gif_steps_per_frame=gif_steps_per_frame)
