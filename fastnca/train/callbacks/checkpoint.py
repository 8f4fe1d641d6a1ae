"""CheckpointCB: atomic checkpoints and resume, on the training-state system of
``fastnca.train.checkpoint``.

A checkpoint is a dict saved with ``torch.save``: ``format``, ``model_class``, ``model`` (state
dict) and the Learner state of ``fastnca.train.checkpoint.capture`` (``step`` = optimiser steps
done, ``opt``, ``sched``, ``scaler``, ``rng``, ``extra``). It is read back with
``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from fastnca._checks import check_int
from fastnca._io import atomic_save
from fastnca.train.checkpoint import CheckpointError, capture, load_file, restore, set_rng_state
from fastnca.train.learner import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    is_main_process,
)

__all__ = ["CheckpointCB", "load_checkpoint", "save_checkpoint", "unwrap_model"]

FORMAT = "fastnca-checkpoint-1"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save(state)`` atomically: a killed process leaves either the old checkpoint or the
    new one, never a truncated file (see ``fastnca._io``)."""
    atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by CheckpointCB; ValueError (one line) if the file is not one."""
    try:
        ckpt = load_file(path)
    except CheckpointError as e:
        raise ValueError(f"{path} is not a readable fastnca checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastnca checkpoint (no format={FORMAT!r} entry)")
    return ckpt


def _check_model_state(path, ckpt: dict, model: nn.Module) -> None:
    want = model.state_dict()
    have = ckpt["model"]
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [
        f"{k}: {tuple(have[k].shape)} vs {tuple(want[k].shape)}"
        for k in want
        if k in have and tuple(have[k].shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{n} {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
            for n, v in (
                ("missing:", missing),
                ("unexpected:", unexpected),
                ("shape (checkpoint vs model):", shapes),
            )
            if v
        ]
        raise ValueError(
            f"checkpoint {path} was written for another model ({ckpt.get('model_class')}, this is "
            f"{type(model).__name__}): "
            + "; ".join(parts)
            + ". Use another path, or CheckpointCB(..., resume=False) to start afresh."
        )


class CheckpointCB(Callback):
    """Save a checkpoint to ``path`` every ``every`` optimiser steps (None: only at the end) and
    at the end of each fit; with ``resume=True`` the first fit loads ``path`` if it exists.

    Resume restores model, optimiser, LR scheduler (``learn.sched``), gradient scaler
    (``learn.scaler``) and the step count, then fast-forwards: run the same ``fit`` again and
    already-done training batches are skipped (whole epochs without loading when the loader has a
    length, with their validation) so training continues where it stopped; the random number
    generators are restored at the first batch that runs (a shuffling loader's order is not
    replayed). A fit that ends by ``CancelFitException`` (early stopping) is saved too. Only the
    main process writes; every process reads.
    """

    order = 30  # after the optimiser, scheduler, scaler and Accelerate preparation exist

    def __init__(self, path: str | os.PathLike, every: int | None = None, resume: bool = True):
        if every is not None:
            check_int("every", every, 1)
        self.path, self.every, self.resume = Path(path), every, resume
        self.steps_done = 0
        self._resumed = False
        self._skip = 0
        self._rng = None

    def state(self, learn) -> dict:
        model = unwrap_model(learn.model)
        return {
            "format": FORMAT,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model": model.state_dict(),
            **capture(learn, self.steps_done),
        }

    def save(self, learn) -> None:
        if is_main_process(learn):
            save_checkpoint(self.state(learn), self.path)

    def load(self, learn) -> None:
        ckpt = load_checkpoint(self.path)
        model = unwrap_model(learn.model)
        _check_model_state(self.path, ckpt, model)
        restore(learn, ckpt, self.path)
        model.load_state_dict(ckpt["model"])
        self.steps_done = self._skip = int(ckpt["step"])
        self._rng = ckpt.get("rng")

    # ----- events -----
    def before_fit(self, learn):
        if self.resume and not self._resumed and self.path.exists():
            self.load(learn)
        self._resumed = True
        self._skip_valid = self._pending = False

    def before_epoch(self, learn):
        if not learn.training:
            if self._skip_valid:
                raise CancelEpochException()
            return
        self._skip_valid = False
        if self._skip:
            try:
                n = len(learn.dl)
            except TypeError:
                return
            if n and self._skip >= n:
                self._skip -= n
                self._skip_valid = True
                raise CancelEpochException()

    def before_batch(self, learn):
        if learn.training and self._skip:
            self._skip -= 1
            raise CancelBatchException()
        if self._rng is not None:  # the first batch that runs draws as the unbroken run did
            set_rng_state(self._rng)
            self._rng = None

    def after_step(self, learn):
        self.steps_done += 1
        if self.every is not None and self.steps_done % self.every == 0:
            self._pending = True

    def after_batch(self, learn):
        # saved here, not in after_step: per-batch LR schedulers step in after_batch (order 20)
        if self._pending:
            self._pending = False
            self.save(learn)

    def after_fit(self, learn):
        self.save(learn)

    def after_cancel_fit(self, learn):  # early stopping: keep what was trained
        self.save(learn)

    def __repr__(self):
        return f"CheckpointCB({str(self.path)!r}, every={self.every}, resume={self.resume})"
