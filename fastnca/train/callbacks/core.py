"""Core callbacks: DeviceCB, MetricsCB, GradNormCB and the LR-scheduler callbacks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastnca._device import resolve_device
from fastnca.train.data import batch_size_of, to_device
from fastnca.train.learner import Callback, is_main_process

__all__ = ["BatchSchedCB", "DeviceCB", "EpochSchedCB", "GradNormCB", "MetricsCB"]


class DeviceCB(Callback):
    """Move the model (before_fit) and every batch (before_batch) to ``device`` (default: cuda,
    then mps, then cpu). Sets ``learn.device``."""

    order = 0

    def __init__(self, device: str | torch.device | None = None):
        self.device = resolve_device(device)

    def before_fit(self, learn):
        learn.model.to(self.device)
        learn.device = self.device

    def before_batch(self, learn):
        learn.batch = to_device(learn.batch, self.device, non_blocking=self.device.type == "cuda")

    def __repr__(self):
        return f"DeviceCB({str(self.device)!r})"


class MetricsCB(Callback):
    """Per epoch: the loss averaged over samples (each batch weighted by its size) and each metric
    ``f(preds, target) -> scalar`` (a batch mean) averaged the same way.

    ``MetricsCB(accuracy, mae=my_mae)``: positional metrics are named by ``__name__``. After each
    epoch a dict ``{"epoch", "train": "train"|"eval", "loss", <metric>...}`` (floats) is appended to
    ``self.log`` and passed to ``self._log`` (prints; ProgressCB replaces it with table rows).
    Sums stay on the device until the epoch ends (no per-batch synchronisation). Sets
    ``learn.metrics = self``. In multi-process runs the numbers are this process's.
    """

    order = 0

    def __init__(self, *ms: Callable, **metrics: Callable):
        for m in ms:
            metrics[getattr(m, "__name__", type(m).__name__)] = m
        for k, m in metrics.items():
            if not callable(m):
                raise TypeError(
                    f"metric {k!r} must be callable f(preds, target), got {type(m).__name__}"
                )
        self.metrics = metrics
        self.log: list[dict] = []

    def _log(self, d: dict) -> None:
        print(
            "  ".join(
                v if k == "train" else f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in d.items()
            ),
            flush=True,
        )

    def before_fit(self, learn):
        learn.metrics = self
        self._main = is_main_process(learn)

    def before_epoch(self, learn):
        self._sums = {k: 0.0 for k in ["loss", *self.metrics]}
        self._n = 0

    def after_batch(self, learn):
        n = batch_size_of(learn.batch)
        self._n += n
        self._sums["loss"] = self._sums["loss"] + learn.loss.detach().float() * n
        if self.metrics:
            y = (
                learn.batch[1]
                if isinstance(learn.batch, (list, tuple)) and len(learn.batch) > 1
                else None
            )
            preds = learn.preds.detach() if isinstance(learn.preds, torch.Tensor) else learn.preds
            for k, m in self.metrics.items():
                v = m(preds, y)
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                self._sums[k] = self._sums[k] + v * n

    def after_epoch(self, learn):
        d = {"epoch": learn.epoch, "train": "train" if learn.training else "eval"}
        for k, s in self._sums.items():
            d[k] = float(s) / self._n if self._n else float("nan")
        self.log.append(d)
        if self._main:
            self._log(d)


class GradNormCB(Callback):
    """The NCA lesson's gradient normalisation: after backward, each parameter's gradient is
    divided by its own L2 norm, ``g <- g / (||g|| + eps)``. Gradients scaled for float16 are
    unscaled first, so the optimiser sees the normalised true gradient."""

    order = 0

    def __init__(self, eps: float = 1e-8):
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)

    def after_backward(self, learn):
        if learn.accelerator is not None and learn.accelerator.scaler is not None:
            learn.accelerator.unscale_gradients()
        elif learn.scaler is not None:
            learn.scaler.unscale_(learn.opt)
        grads = [p.grad for p in learn.model.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        torch._foreach_add_(norms, self.eps)
        torch._foreach_div_(grads, norms)


class BatchSchedCB(Callback):
    """Step an LR scheduler after every training batch. ``sched`` builds it from the optimiser,
    e.g. ``partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=n)`` or
    ``partial(MultiStepLR, milestones=[500, 1000], gamma=0.3)`` (milestones in batches).
    The scheduler is ``learn.sched`` during the fit (CheckpointCB saves and restores it)."""

    order = 20  # after AccelerateCB prepared the optimiser

    def __init__(self, sched: Callable):
        if not callable(sched):
            raise TypeError(
                "sched must be a callable opt -> LR scheduler (e.g. a functools."
                f"partial of OneCycleLR), got {type(sched).__name__}"
            )
        self.sched = sched

    def before_fit(self, learn):
        self.schedo = self.sched(learn.opt)
        learn.sched = self.schedo

    def _step(self, learn):
        if learn.training:
            self.schedo.step()

    def after_batch(self, learn):
        self._step(learn)

    def cleanup_fit(self, learn):
        learn.sched = None


class EpochSchedCB(BatchSchedCB):
    """Step an LR scheduler after every training epoch (milestones in epochs)."""

    def after_batch(self, learn):
        pass

    def after_epoch(self, learn):
        self._step(learn)
