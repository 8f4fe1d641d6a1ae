"""Texture-NCA training runs: checked inputs, one run directory, exact resume, graceful stops.

``TrainingRun(style, out_dir, preset, resume=..., **overrides)`` checks every input (config, style
image, run directory, device, feature weights) and writes nothing; ``.run()`` locks the directory,
trains with the Learner (NCACB, GradNormCB, a step LR schedule, optional MixedPrecision and
progress) and writes ``config.json``, ``checkpoint.pt`` (weights + config + the whole resume
state: optimiser, scheduler, RNG, loss curve and sample pool, in one atomic file), ``style.png``,
``pool.png``, ``loss.png`` and ``growth.gif``. Checkpoints are written at iteration boundaries
only: every ``save_every`` iterations, at the end, and when SIGINT/SIGTERM stops the run, so a
resume continues the loss curve bit for bit (CPU, eager).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fastnca._device import resolve_device
from fastnca.nca.checkpoint import CHECKPOINT_NAME
from fastnca.nca.config import TrainConfig, make_config, min_grid_size
from fastnca.nca.recipe import NCACB, TextureLoss, build_model
from fastnca.nca.rundir import (
    CONFIG_NAME,
    STYLE_NAME,
    GracefulStop,
    RunLock,
    TrainingStopped,
    check_new_run_dir,
    load_run,
)
from fastnca.style.images import check_min_side
from fastnca.train.checkpoint import capture, restore, set_rng_state
from fastnca.train.learner import Callback, CancelFitException, Learner


def resolve_style(style, size: int, texture: str | None = None) -> tuple[torch.Tensor, str]:
    """The style image as (1, 3, H, W) in [0, 1], quantised to 8 bits (what style.png stores),
    and a description. ``style``: None (the built-in ``texture``), ``builtin:NAME``, a file, or a
    tensor. Files larger than ``size`` are shrunk to it (longest side)."""
    from fastnca.style.textures import BUILTIN_PREFIX, DEFAULT_TEXTURE, image_source

    if isinstance(style, torch.Tensor):
        img, what = style.detach().float().cpu(), "a given tensor"
        if img.dim() == 3:
            img = img[None]
        if img.dim() != 4 or img.shape[:2] != (1, 3):
            raise ValueError(f"style: expected a (1, 3, H, W) image tensor, got {tuple(img.shape)}")
    else:
        spec = str(style) if style is not None else BUILTIN_PREFIX + (texture or DEFAULT_TEXTURE)
        img = image_source(spec, max(size, 8), "style image")
        if Path(spec).exists():
            what = f"style image {spec!r}"
        else:
            what = f"built-in texture {spec.removeprefix(BUILTIN_PREFIX)!r}"
    return (img.clamp(0, 1) * 255).round() / 255, what


class _RunStateCB(Callback):
    """Restores the resume state (optimiser/scheduler after BatchSchedCB built ``learn.sched``, the
    RNG at the first batch), saves every ``every`` iterations, and ends the fit at the iteration
    boundary after a stop signal."""

    order = 30

    def __init__(self, save, every: int, state: dict | None, stop: GracefulStop):
        self.save, self.every, self.state, self.stop = save, every, state, stop

    def before_fit(self, learn):
        if self.state:
            restore(learn, self.state, "of the run being resumed")

    def before_batch(self, learn):
        # RNG last: after the DataLoader iterator drew its base seed, as in an unbroken run.
        s, self.state = self.state, None
        if s:
            set_rng_state(s["rng"])

    def after_batch(self, learn):
        nca = next(cb for cb in learn.cbs if isinstance(cb, NCACB))
        if self.stop.signum is not None:
            self.save(learn)
            raise CancelFitException()
        if self.every and nca.iteration % self.every == 0:
            self.save(learn)

    def after_fit(self, learn):  # inside the fit: the scheduler still exists
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

    def __init__(
        self, style=None, out_dir=None, preset: str = "quick", *, resume=None, **overrides
    ):
        from fastnca.style.features import VGG16Features

        self.ckpt = self.pool = None
        if resume is not None:
            cfg, self.ckpt, self.pool = load_run(resume, overrides)
            run = Path(resume).expanduser()
            self.done, self.losses = self.ckpt.iteration, self.ckpt.losses
            if self.done >= cfg.iters:
                raise ValueError(
                    f"iters: the run in {str(run)!r} already has {self.done} "
                    f"iterations; pass a larger iters to train longer"
                )
            style = run / STYLE_NAME
        else:
            if out_dir is None:
                raise ValueError("out_dir: expected a run directory to write, got None")
            run = Path(out_dir).expanduser()
            check_new_run_dir(run)
            src = None if style is None or isinstance(style, torch.Tensor) else str(style)
            cfg = make_config(preset, style=src, **overrides)
            self.done, self.losses = 0, []
        self.cfg, self.run_dir, self.resumed = cfg, run, resume is not None
        self.device = resolve_device(cfg.device)
        self.style_img, self.style_what = resolve_style(style, cfg.size, cfg.texture)
        h, w = self.style_img.shape[-2:]  # a file already smaller than the features can use
        check_min_side(self.style_what, w, h, None, min_side=min_grid_size(cfg.layers))
        self.features = VGG16Features(cfg.layers, weights=cfg.weights)

    def _learner(self, model, nca: NCACB, save, stop: GracefulStop) -> Learner:
        from fastnca.train.callbacks import BatchSchedCB, GradNormCB, MixedPrecision, ProgressCB
        from fastnca.train.data import dummy_dls

        cfg = self.cfg
        loss_func = TextureLoss(
            self.style_img.to(self.device),
            self.features.to(self.device),
            cfg.loss,
            cfg.relative_style,
        )
        if cfg.compile:
            loss_func = torch.compile(loss_func)
        state = self.ckpt.train if self.ckpt is not None else None
        cbs = [nca, GradNormCB(), _RunStateCB(save, cfg.save_every, state, stop)]
        if cfg.lr_milestones:
            cbs.append(
                BatchSchedCB(
                    partial(
                        torch.optim.lr_scheduler.MultiStepLR,
                        milestones=list(cfg.lr_milestones),
                        gamma=cfg.lr_gamma,
                    )
                )
            )
        if cfg.amp == "bf16":
            cbs.append(MixedPrecision(torch.bfloat16))
        if self._progress:
            cbs.append(ProgressCB())
        return Learner(
            model,
            dummy_dls(cfg.iters - self.done),
            loss_func,
            lr=cfg.lr,
            cbs=cbs,
            opt_func=torch.optim.Adam,
        )

    def run(
        self, progress: bool = True, gif_frames: int = 48, gif_steps_per_frame: int = 8
    ) -> TrainResult:
        # SIGINT/SIGTERM are handled from the lock to the last file: a stop before, during or after
        # the iterations always ends at a consistent state with a one-line message.
        with RunLock(self.run_dir), GracefulStop() as stop:
            return self._run(progress, gif_frames, gif_steps_per_frame, stop)

    def _run(self, progress, gif_frames, gif_steps_per_frame, stop: GracefulStop) -> TrainResult:
        from fastnca._io import atomic_write_json
        from fastnca.nca.checkpoint import model_config, save_checkpoint
        from fastnca.nca.render import grow, plot_losses, pool_image, write_animation
        from fastnca.style.images import save_image

        cfg, run, dev, done = self.cfg, self.run_dir, self.device, self.done
        self._progress = progress
        torch.manual_seed(cfg.seed)
        model = (self.ckpt.build_model() if self.ckpt is not None else build_model(cfg)).to(dev)
        nca = NCACB(cfg, state=self.pool, iteration=done, losses=self.losses)
        if self.ckpt is not None:  # reseeds so far, so the count continues across a resume
            nca.n_reseeds = int(self.ckpt.train["extra"].get("n_reseeds", 0))
        files = {
            k: run / v
            for k, v in dict(
                config=CONFIG_NAME,
                checkpoint=CHECKPOINT_NAME,
                style=STYLE_NAME,
                pool_png="pool.png",
                loss_png="loss.png",
                gif="growth.gif",
            ).items()
        }
        info = {
            "train": cfg.to_dict(),
            "model": model_config(model, cfg.preset),
            "style": self.style_what,
            "features": self.features.source,
            "device": str(dev),
            "torch": torch.__version__,
            "iterations": done,
        }

        def save(learn):  # at an iteration boundary: weights, optimiser, RNG and pool agree
            extra = {
                "iteration": nca.iteration,
                "losses": list(nca.losses),
                "n_reseeds": nca.n_reseeds,
                "pool": nca.pool.detach().cpu(),
            }
            save_checkpoint(
                files["checkpoint"],
                model,
                {"preset": cfg.preset, "train_config": cfg.to_dict()},
                capture(learn, nca.iteration, extra),
            )

        learn = self._learner(model, nca, save, stop)
        atomic_write_json(info, files["config"])
        if not self.resumed:
            save_image(self.style_img, files["style"])
        threads = torch.get_num_threads()
        if cfg.threads and dev.type == "cpu":
            torch.set_num_threads(cfg.threads)
        resume = f"continue with: fastnca train --resume {run}"
        if stop.signum is not None:  # before the first iteration: nothing new to save
            what = "the run is unchanged; " + resume if self.resumed else "nothing was trained"
            raise TrainingStopped(stop.signum, f"stopped before training; {what}")
        t0 = time.perf_counter()
        try:
            learn.fit(1, train=True, valid=False)
        finally:
            seconds = time.perf_counter() - t0
            torch.set_num_threads(threads)
        if stop.signum is not None:
            raise TrainingStopped(
                stop.signum,
                f"stopped after {nca.iteration} iterations; saved {files['checkpoint']}; {resume}",
            )
        model.eval()
        with torch.no_grad():
            save_image(pool_image(model.to_rgb(nca.pool[:16]).float()), files["pool_png"])
        plot_losses(nca.losses, files["loss_png"], title=f"{cfg.preset}: {self.style_what}")
        frames = grow(model, cfg.size, frames=gif_frames, steps_per_frame=gif_steps_per_frame)
        write_animation(frames, files["gif"], scale=max(1, 256 // cfg.size))
        info.update(
            iterations=nca.iteration,
            final_loss=nca.losses[-1] if nca.losses else None,
            seconds_this_session=round(seconds, 2),
            seconds_per_iteration=round(seconds / max(1, nca.iteration - done), 4),
        )
        atomic_write_json(info, files["config"])
        if stop.signum is not None:  # during the final images: the checkpoint is complete
            raise TrainingStopped(
                stop.signum,
                f"stopped after {nca.iteration} iterations (all of them); saved "
                f"{files['checkpoint']}; {resume} with a larger --iters",
            )
        return TrainResult(model, cfg, nca.losses, run, seconds, files)


def train_texture(
    style=None,
    out_dir=None,
    preset: str = "quick",
    *,
    resume=None,
    progress: bool = True,
    gif_frames: int = 48,
    gif_steps_per_frame: int = 8,
    **overrides,
):
    """Train a texture NCA and write a run directory (see the module docstring).

    style: an image file, ``builtin:NAME``, a (1, 3, H, W) tensor, or None (the preset's built-in
    texture). out_dir: the run directory (new or empty). preset: "quick", "lesson" or "texture";
    ``overrides``: any TrainConfig field (size=, iters=, lr=, amp="bf16", compile=True, ...).
    resume: a run directory to continue (only ``iters``, ``device``, ``amp``, ``compile``,
    ``save_every``, ``threads`` may change), appending to the same loss curve. SIGINT/SIGTERM
    finish the current iteration, save, and raise ``TrainingStopped`` (a KeyboardInterrupt).
    Every input is checked before anything is written (ValueError); a diverging run raises
    TrainingDiverged and writes no checkpoint. Returns a :class:`TrainResult`.
    """
    plan = TrainingRun(style, out_dir, preset, resume=resume, **overrides)
    return plan.run(
        progress=progress, gif_frames=gif_frames, gif_steps_per_frame=gif_steps_per_frame
    )
