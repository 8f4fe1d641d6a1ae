"""CheckpointCB: atomic checkpoints (temp file in the same folder + os.replace) and resume.

A checkpoint is a dict saved with ``torch.save``: ``format``, ``step`` (optimiser steps done),
``model_class``, ``model`` / ``opt`` / ``sched`` / ``scaler`` state dicts (None where absent).
It is read back with ``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from fastnca.learner import Callback, CancelBatchException, CancelEpochException, is_main_process

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
    """``torch.save(state)`` to a temp file beside ``path``, fsync, then ``os.replace``: a killed
    process leaves either the old checkpoint or the new one, never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by CheckpointCB (``weights_only=True``); ValueError if the file
    is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable fastnca checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastnca checkpoint (no format={FORMAT!r} entry)")
    return ckpt


def _check_model_state(path, ckpt: dict, model: nn.Module) -> None:
    want = model.state_dict()
    have = ckpt["model"]
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k}: {tuple(have[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{n} {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
                 for n, v in (("missing:", missing), ("unexpected:", unexpected),
                              ("shape (checkpoint vs model):", shapes)) if v]
        raise ValueError(
            f"checkpoint {path} was written for another model ({ckpt.get('model_class')}, this is "
            f"{type(model).__name__}): " + "; ".join(parts)
            + ". Use another path, or CheckpointCB(..., resume=False) to start afresh.")


class CheckpointCB(Callback):
    """Save a checkpoint to ``path`` every ``every`` optimiser steps (None: only at the end) and
    at the end of each fit; with ``resume=True`` the first fit loads ``path`` if it exists.

    Resume restores model, optimiser, LR scheduler (``learn.sched``), gradient scaler
    (``learn.scaler``) and the step count, then fast-forwards: run the same ``fit`` again and
    already-done training batches are skipped (whole epochs without loading when the loader has a
    length, with their validation) so training continues where it stopped. Resume is exact when
    the data order and the model do not draw random numbers (random-number streams are not
    restored). Only the main process writes; every process reads.
    """

    order = 30  # after the optimiser, scheduler, scaler and Accelerate preparation exist

    def __init__(self, path: str | os.PathLike, every: int | None = None, resume: bool = True):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ValueError(f"every must be an int >= 1 (optimiser steps) or None, got {every!r}")
        self.path, self.every, self.resume = Path(path), every, resume
        self.steps_done = 0
        self._resumed = False
        self._skip = 0

    def state(self, learn) -> dict:
        sched, scaler = learn.sched, learn.scaler
        model = unwrap_model(learn.model)
        return {
            "format": FORMAT,
            "step": self.steps_done,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model": model.state_dict(),
            "opt": learn.opt.state_dict() if learn.opt is not None else None,
            "sched": sched.state_dict() if sched is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def save(self, learn) -> None:
        if is_main_process(learn):
            save_checkpoint(self.state(learn), self.path)

    def load(self, learn) -> None:
        ckpt = load_checkpoint(self.path)
        model = unwrap_model(learn.model)
        _check_model_state(self.path, ckpt, model)
        model.load_state_dict(ckpt["model"])
        for name, obj in (("opt", learn.opt), ("sched", learn.sched), ("scaler", learn.scaler)):
            st = ckpt.get(name)
            if st is None or obj is None:
                if (st is None) != (obj is None):
                    raise ValueError(
                        f"checkpoint {self.path} {'has no' if st is None else 'has a'} {name} "
                        f"state but this fit {'has' if st is None else 'has no'} one; resume with "
                        "the same callbacks (MixedPrecision, schedulers) as the run that wrote it")
                continue
            try:
                obj.load_state_dict(st)
            except (ValueError, KeyError, RuntimeError) as e:
                raise ValueError(f"checkpoint {self.path}: its {name} state does not fit this "
                                 f"fit's {name}: {e}") from e
        self.steps_done = self._skip = int(ckpt["step"])

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

    def __repr__(self):
        return f"CheckpointCB({str(self.path)!r}, every={self.every}, resume={self.resume})"
