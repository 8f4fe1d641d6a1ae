"""Texture NCA training recipe: the pool-training callback ``NCACB`` and the style term.

The recipe (fast.ai lesson / Self-Organising Textures, Niklasson et al. 2021): keep a pool of
``pool`` grids (the seed state, zeros, at first); every iteration sample ``batch`` of them without
replacement, reseed one with a fresh seed grid (every ``seed_every`` iterations, or with
probability ``seed_prob``), run ``n ~ U[min_steps, max_steps)`` NCA steps, and minimise

    loss = overflow(x) + style_weight * style(to_rgb(x)),
    overflow(x) = sum |x - clamp(x, -1, 1)|      (or its mean over elements: overflow_normalise)

with per-parameter gradient normalisation (``GradNormCB``), Adam and a step LR schedule; the final
states go back into the pool (no grad), so the automaton learns to keep the texture alive.

Presets and the run configuration are in ``fastnca.nca.config``; ``fastnca.nca.run.train_texture``
trains and writes a run directory.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastnca.losses import overflow_loss, sliced_wasserstein_loss
from fastnca.nca.config import FILTER_BANKS, LOSSES, TrainConfig
from fastnca.nca.model import NCA
from fastnca.ops import StyleLoss
from fastnca.train.learner import TrainCB


def build_model(cfg: TrainConfig) -> NCA:
    """The NCA module of a config (w2 zero-initialised, as in the lesson)."""
    return NCA(
        channels=cfg.channels,
        hidden=cfg.hidden,
        fire_rate=cfg.fire_rate,
        filters=FILTER_BANKS[cfg.filters],
    )


class TextureLoss(nn.Module):
    """Style loss of RGB images against one style image, on VGG16 features.

    ``kind="gram"``: ``fastnca.ops.StyleLoss`` (mean squared Gram difference per layer, summed);
    ``kind="swd"``: sliced Wasserstein distance between the feature distributions.
    ``relative``: weight layer l by 1 / (L * mean(T_l²)) (T_l its target Gram, or features for
    swd), so the loss reads as a relative error whatever the features' scale (pretrained VGG or
    the offline fallback). style: (1, 3, H, W) in [0, 1]; forward(rgb: (B, 3, H', W')) -> scalar.
    """

    def __init__(
        self, style: torch.Tensor, features: nn.Module, kind: str = "gram", relative: bool = False
    ):
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
        return sliced_wasserstein_loss(
            feats, [t.to(rgb.device) for t in self.targets], weights=self.weights
        )


def training_rgb(x: torch.Tensor) -> torch.Tensor:
    """The image the style loss sees: ``x[:, :3] + 0.5``, not clipped (the lesson's to_rgb), so
    cells pushed past [0, 1] still get a style gradient; the overflow term bounds them."""
    return x[:, :3] + 0.5


class NCACB(TrainCB):
    """Pool training of an NCA (``learn.model``) with the Learner and ``dummy_dls``.

    ``config``: a :class:`TrainConfig` (default: the "quick" preset), with any of its fields
    overridden by keyword (``NCACB(pool=8, size=16, batch=2)``); the fields used here are
    ``pool, size, batch, min_steps, max_steps, style_weight, seed_every, seed_prob,
    overflow_normalise, compile``. ``learn.loss_func(rgb)`` is the style term (e.g. a
    TextureLoss). The pool is created in ``before_fit`` on the model's device from
    ``model.seed(pool, size)`` unless ``state`` (P, C, H, W) is given. Attributes: ``pool``
    (P, C, H, W), ``iteration`` (iterations done), ``losses`` (one float per iteration),
    ``last_idx`` (the pool indices of the last batch), ``n_reseeds``. With ``compile``, the single
    NCA step is ``torch.compile(model, **compile_kwargs)``, called ``n`` times per rollout
    (compiling the unrolled rollout would build one graph per ``n``, each far slower).
    """

    order = 0

    def __init__(
        self,
        config: TrainConfig | None = None,
        *,
        state: torch.Tensor | None = None,
        iteration: int = 0,
        losses: list | None = None,
        compile_kwargs: dict | None = None,
        **overrides,
    ):
        super().__init__()
        cfg = dataclasses.replace(config or TrainConfig(), **overrides).validate()
        self.config = cfg
        self.pool_size, self.size, self.batch_size = cfg.pool, cfg.size, cfg.batch
        self.min_steps, self.max_steps, self.style_weight = (
            cfg.min_steps,
            cfg.max_steps,
            cfg.style_weight,
        )
        self.seed_every, self.seed_prob = cfg.seed_every, cfg.seed_prob
        self.overflow_normalise, self.compile_step = cfg.overflow_normalise, cfg.compile
        self.compile_kwargs = dict(compile_kwargs or {})
        if state is not None and state.shape[0] != cfg.pool:
            raise ValueError(f"state: expected {cfg.pool} grids, got shape {tuple(state.shape)}")
        self.pool = state
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
            raise TrainingDiverged(
                f"training diverged at iteration {self.iteration + 1} (loss "
                f"{float(learn.loss.detach())}); no checkpoint was written "
                f"for it: try a lower lr"
            )


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: the run stops before the optimiser step, nothing is saved."""
