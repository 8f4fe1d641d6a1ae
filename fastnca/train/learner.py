"""The Learner: a training loop whose every step is a callback event (fast.ai miniai, course22p2).

A fit is three nested scopes, each wrapped by ``with_cbs``: ``before_X`` callbacks, the body,
then ``after_X``; ``cleanup_X`` always runs (also after an error or a cancel). ``CancelXException``
raised anywhere inside scope X (fit, epoch or batch) ends that scope early: ``after_X`` is skipped,
``after_cancel_X`` runs, then ``cleanup_X``, and the enclosing loop carries on. Events, in order::

    before_fit
      per epoch: train (if train=True), then valid under torch.no_grad (if valid=True)
        before_epoch
          per batch: before_batch, predict, after_predict, get_loss, after_loss,
                     [training only: backward, after_backward, step, after_step, zero_grad],
                     after_batch, cleanup_batch
        after_epoch, cleanup_epoch
    after_fit, cleanup_fit

``predict``, ``get_loss``, ``backward``, ``step`` and ``zero_grad`` are callback events too: a
training callback (``TrainCB`` or a subclass overriding ``predict``/``get_loss``) implements them.
When no callback implements ``predict``, a ``TrainCB`` is used for that fit, so
``cbs=[MixedPrecision()]`` trains like the lesson's.

Callbacks run sorted by their ``order`` (ties keep list order); each method takes the learner.

Learner attributes callbacks read and write:
    model, dls, loss_func, lr, opt_func, cbs   as given (``model`` may be replaced, e.g. by
                                               AccelerateCB with its wrapped model during a fit)
    opt          the optimiser, built by ``fit`` from ``opt_func(model.parameters(), lr)``
    n_epochs, epochs   the fit's epoch count and its ``range`` (a callback may wrap ``epochs``)
    epoch        current epoch index;  iter: batch index within the epoch
    dl           the loader of the running epoch (``dls.train`` or ``dls.valid``)
    batch        the current batch, as the loader yielded it (DeviceCB moves it)
    preds        the model's output (set in ``predict``);  loss: the loss tensor (``get_loss``)
    training     True in training epochs (``model.training``)
    scaler       a ``torch.amp.GradScaler`` while MixedPrecision(float16) runs, else None
    accelerator  the ``accelerate.Accelerator`` while AccelerateCB runs, else None
    sched        the LR scheduler while BatchSchedCB/EpochSchedCB runs, else None
    device       set by DeviceCB;  metrics: the MetricsCB, set by it

``TrainCB.backward``/``TrainCB.step`` go through ``learn.accelerator``/``learn.scaler`` when they
are set, so a training callback that subclasses TrainCB and overrides only ``predict``/``get_loss``
works with every precision strategy.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn

from fastnca._checks import check_int

__all__ = [
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "Callback",
    "DataLoaders",
    "Learner",
    "TrainCB",
    "check_world_size",
    "is_main_process",
    "run_cbs",
    "with_cbs",
]


class DataLoaders:
    """The train and valid loaders of a Learner: ``DataLoaders(train_dl, valid_dl)``."""

    def __init__(self, *dls):
        if len(dls) < 2:
            raise ValueError(
                f"DataLoaders needs a train and a valid loader, got {len(dls)} loader(s)"
            )
        self.train, self.valid = dls[:2]


class CancelFitException(Exception):
    """Raise in a callback to stop the fit: skips after_fit, runs cleanup_fit."""


class CancelEpochException(Exception):
    """Raise in a callback to end the epoch: skips after_epoch, runs cleanup_epoch."""


class CancelBatchException(Exception):
    """Raise in a callback to drop the rest of the batch: skips after_batch, runs cleanup_batch."""


_CANCEL = {"fit": CancelFitException, "epoch": CancelEpochException, "batch": CancelBatchException}


class Callback:
    """Base class: define any of the event methods (``before_fit(self, learn)``, ...).

    Every attribute named like an event (``step``, ``predict``, ``after_batch``, ...) is called
    as one, so do not use those names for data attributes."""

    order = 0

    def __repr__(self):
        return f"{type(self).__name__}()"


def run_cbs(cbs: Iterable[Callback], method_nm: str, learn=None) -> None:
    """Call ``method_nm(learn)`` on every callback that has it, sorted by ``order``."""
    for cb in sorted(cbs, key=attrgetter("order")):
        method = getattr(cb, method_nm, None)
        if method is not None:
            method(learn)


class with_cbs:
    """Decorator: run ``before_nm``, the body, ``after_nm``; ``cleanup_nm`` always (miniai)."""

    def __init__(self, nm: str):
        self.nm = nm

    def __call__(self, f):
        nm, cancel = self.nm, _CANCEL[self.nm]

        @functools.wraps(f)
        def _f(o, *args, **kwargs):
            try:
                o.callback(f"before_{nm}")
                f(o, *args, **kwargs)
                o.callback(f"after_{nm}")
            except cancel:
                o.callback(f"after_cancel_{nm}")
            finally:
                o.callback(f"cleanup_{nm}")

        return _f


def _n_inp_ok(n_inp) -> int:
    check_int("n_inp", n_inp, 1)
    return n_inp


class TrainCB(Callback):
    """The default training step. A batch is ``(*inputs, *targets)`` with ``n_inp`` inputs:
    ``preds = model(*batch[:n_inp])``; ``loss = loss_func(preds, *batch[n_inp:])``."""

    def __init__(self, n_inp: int = 1):
        self.n_inp = _n_inp_ok(n_inp)

    def predict(self, learn):
        learn.preds = learn.model(*learn.batch[: self.n_inp])

    def get_loss(self, learn):
        learn.loss = learn.loss_func(learn.preds, *learn.batch[self.n_inp :])

    def backward(self, learn):
        if learn.accelerator is not None:
            learn.accelerator.backward(learn.loss)
        elif learn.scaler is not None:
            learn.scaler.scale(learn.loss).backward()
        else:
            learn.loss.backward()

    def step(self, learn):
        if learn.scaler is not None and learn.accelerator is None:
            learn.scaler.step(learn.opt)  # skipped when the scaled gradients hold inf/nan
            learn.scaler.update()
        else:
            learn.opt.step()

    def zero_grad(self, learn):
        learn.opt.zero_grad()

    def __repr__(self):
        return f"{type(self).__name__}(n_inp={self.n_inp})"


def is_main_process(learn=None) -> bool:
    """True on the process that should print and write files (rank 0, or the only one)."""
    acc = getattr(learn, "accelerator", None)
    if acc is not None:
        return bool(acc.is_main_process)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def requested_world_size() -> int | None:
    """How many processes the launcher asked for, from the environment (None: no launcher).

    torchrun and ``accelerate launch --multi_gpu`` set WORLD_SIZE. ``accelerate launch
    --num_processes N`` without a multi-process mode runs ONE process but still sets
    MASTER_ADDR/MASTER_PORT (and ACCELERATE_*): that is reported as 2 (several, count unknown).
    """
    ws = os.environ.get("WORLD_SIZE")
    if ws is not None:
        try:
            return int(ws)
        except ValueError:
            return None
    if "MASTER_PORT" in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ:
        return 2
    return None


def actual_world_size(learn=None) -> int:
    """Processes this training really spans: the Accelerator's, else torch.distributed's, else 1."""
    acc = getattr(learn, "accelerator", None)
    if acc is not None:
        return int(acc.num_processes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def check_world_size(learn=None) -> str | None:
    """Warn loudly (RuntimeWarning) when a launcher asked for several processes but this training
    runs alone, e.g. ``accelerate launch --cpu --num_processes 2`` or torchrun without AccelerateCB.
    Returns the message, or None when all is well."""
    want, have = requested_world_size(), actual_world_size(learn)
    if want is None or want <= 1 or have > 1:
        return None
    msg = (
        "\n" + "!" * 78 + "\n"
        f"fastnca: the launcher asked for several processes (WORLD_SIZE="
        f"{os.environ.get('WORLD_SIZE', 'unset')}, MASTER_PORT={os.environ.get('MASTER_PORT')}) "
        f"but this training runs in {have} process: gradients are NOT synchronised and each "
        "process trains alone.\nUse AccelerateCB and launch with `torchrun --nproc_per_node N` "
        "or `accelerate launch --multi_gpu --num_processes N` (also on a CPU-only machine, where "
        "AccelerateCB forms a gloo group); `accelerate launch --cpu --num_processes N` starts "
        "only one process.\n" + "!" * 78
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


class Learner:
    """``Learner(model, dls, loss_func, lr, cbs, opt_func)``; train with ``fit``. See the module
    docstring for the events and the attributes callbacks use."""

    def __init__(
        self,
        model: nn.Module,
        dls,
        loss_func: Callable = F.mse_loss,
        lr: float = 0.1,
        cbs: Iterable[Callback] | None = None,
        opt_func: Callable | None = torch.optim.SGD,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (hasattr(dls, "train") and hasattr(dls, "valid")):
            raise TypeError(
                f"dls must have .train and .valid iterables, got {type(dls).__name__}; wrap your "
                "loaders with fastnca.train.learner.DataLoaders(train_dl, valid_dl)"
            )
        if not callable(loss_func):
            raise TypeError(f"loss_func must be callable, got {type(loss_func).__name__}")
        self.model, self.dls, self.loss_func, self.lr, self.opt_func = (
            model,
            dls,
            loss_func,
            lr,
            opt_func,
        )
        self.cbs = self._check_cbs(cbs)
        self.opt = None
        self.scaler = None
        self.accelerator = None
        self.sched = None
        self.epoch = self.iter = 0

    @staticmethod
    def _check_cbs(cbs) -> list:
        cbs = [] if cbs is None else [cbs] if isinstance(cbs, Callback) else list(cbs)
        for cb in cbs:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"cbs must hold fastnca.train.learner.Callback instances, got "
                    f"{type(cb).__name__} (did you pass the class, not an instance?)"
                )
        return cbs

    # ----- the loop -----
    @with_cbs("batch")
    def _one_batch(self):
        self.predict()
        self.callback("after_predict")
        self.get_loss()
        self.callback("after_loss")
        if self.training:
            self.backward()
            self.callback("after_backward")
            self.step()
            self.callback("after_step")
            self.zero_grad()

    @with_cbs("epoch")
    def _one_epoch(self):
        for i, b in enumerate(self.dl):
            self.iter, self.batch = i, b
            self._one_batch()

    def one_epoch(self, training: bool):
        self.model.train(training)
        self.dl = self.dls.train if training else self.dls.valid
        self._one_epoch()

    @with_cbs("fit")
    def _fit(self, train: bool, valid: bool):
        check_world_size(self)
        for epoch in self.epochs:
            self.epoch = epoch
            if train:
                self.one_epoch(True)
            if valid:
                with torch.no_grad():
                    self.one_epoch(False)

    def fit(self, n_epochs: int = 1, train: bool = True, valid: bool = True, cbs=None, lr=None):
        """Train ``n_epochs``; ``cbs`` are added for this fit only; ``lr`` overrides ``self.lr``."""
        check_int("n_epochs", n_epochs, 0)
        cbs = self._check_cbs(cbs)
        if not any(hasattr(cb, "predict") for cb in self.cbs + cbs):
            n_inp = next((cb.n_inp for cb in self.cbs + cbs if hasattr(cb, "n_inp")), 1)
            cbs.append(TrainCB(n_inp))
        self.cbs.extend(cbs)
        try:
            self.n_epochs = n_epochs
            self.epochs = range(n_epochs)
            if self.opt_func is not None:
                self.opt = self.opt_func(self.model.parameters(), self.lr if lr is None else lr)
            self._fit(train, valid)
        finally:
            for cb in cbs:
                self.cbs.remove(cb)

    def __getattr__(self, name):
        if name in ("predict", "get_loss", "backward", "step", "zero_grad"):
            return functools.partial(self.callback, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def callback(self, method_nm: str) -> None:
        run_cbs(self.cbs, method_nm, self)

    @property
    def training(self) -> bool:
        return self.model.training
