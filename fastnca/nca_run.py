"""Run directories of texture-NCA training: checked inputs, outputs, resume, Ctrl-C.

``TrainingRun(style, out_dir, preset, resume=..., **overrides)`` checks every input (config, style
image, run directory, device, feature weights) and writes nothing; ``.run()`` trains with the
Learner (NCACB, GradNormCB, a step LR schedule, optional MixedPrecision and progress) and writes
``config.json``, ``checkpoint.pt`` (fastnca.checkpoint: weights + config + resume state),
``pool.pt``, ``style.png``, ``pool.png``, ``loss.png`` and ``growth.gif``. Resuming restores the
optimiser, the scheduler, the pool and the RNG, so the loss curve continues exactly (CPU, eager).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fastnca.learner import Callback, Learner
from fastnca.nca_train import NCACB, TextureLoss, TrainConfig, build_model, make_config

CONFIG_NAME, POOL_NAME, STYLE_NAME = "config.json", "pool.pt", "style.png"
RESUMABLE = {"iters", "device", "amp", "compile", "save_every", "threads"}  # may change on resume


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
        name = str(style) if style is not None else (texture or DEFAULT_TEXTURE)
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
        threads = torch.get_num_threads()
        if cfg.threads and dev.type == "cpu":
            torch.set_num_threads(cfg.threads)
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
        finally:
            seconds = time.perf_counter() - t0
            torch.set_num_threads(threads)
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


