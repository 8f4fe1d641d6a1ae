"""ProgressCB: a progress bar per epoch with the running loss (no extra dependency).

In a terminal the bar redraws in place (``\\r``, at most every ``refresh`` seconds); anywhere else
(CI logs, files, notebooks' captured output) it prints plain lines, about ``lines`` per epoch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

import torch

from fastnca._checks import check_int
from fastnca._plot import plot_losses
from fastnca.train.callbacks.core import MetricsCB
from fastnca.train.learner import Callback, is_main_process

__all__ = ["ProgressCB"]


class ProgressCB(Callback):
    """Progress per epoch: batches done, running mean loss, batches/s.

    ``plot``: a path; the training loss per batch is saved there as a PNG after every training
    epoch (``fastnca._plot.plot_losses``). With a MetricsCB, its per-epoch dicts are printed as
    table rows. ``self.losses``: the training losses seen (floats). Prints only on
    the main process.
    """

    order = MetricsCB.order + 1

    def __init__(
        self,
        plot: str | os.PathLike | None = None,
        file: TextIO | None = None,
        lines: int = 10,
        refresh: float = 0.2,
    ):
        if isinstance(plot, bool):
            raise TypeError("plot must be a path for the PNG (e.g. 'loss.png') or None, got a bool")
        check_int("lines", lines, 1)
        self.plot, self.file, self.lines, self.refresh = plot, file, lines, refresh
        self.losses: list[float] = []

    # ----- output -----
    @property
    def out(self) -> TextIO:
        return self.file if self.file is not None else sys.stdout

    def _is_tty(self) -> bool:
        isatty = getattr(self.out, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # closed file
            return False

    def _write(self, s: str) -> None:
        if self._main:
            self.out.write(s)
            self.out.flush()

    def _log_row(self, d: dict) -> None:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in d.values()]
        if self._first_row:
            self._clear()
            self._write("  ".join(f"{k:>8}" for k in d) + "\n")
            self._first_row = False
        self._clear()
        self._write("  ".join(f"{c:>8}" for c in cells) + "\n")

    def _clear(self) -> None:
        if self._tty and self._drawn:
            self._write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    # ----- events -----
    def before_fit(self, learn):
        self._main = is_main_process(learn)
        self._tty = self._is_tty()
        self._first_row, self._drawn = True, 0
        self.losses = []
        self._metrics = getattr(learn, "metrics", None)
        if self._metrics is not None:
            self._metrics._log = self._log_row  # MetricsCB rows become table rows

    def before_epoch(self, learn):
        try:
            self._total = len(learn.dl)
        except TypeError:
            self._total = None
        self._every = max(1, (self._total or 50 * self.lines) // self.lines)
        self._n, self._sum, self._t0 = 0, 0.0, time.perf_counter()
        self._last_draw = 0.0
        self._epoch_losses: list[torch.Tensor] = []

    def after_batch(self, learn):
        loss = learn.loss.detach().float()
        self._n += 1
        self._sum = self._sum + loss  # stays on the device: read only when drawn
        if learn.training:
            self._epoch_losses.append(loss)
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= self.refresh or self._n == self._total:
                self._draw(learn, now)
        elif self._n % self._every == 0 or self._n == self._total:
            self._draw(learn, now)

    def _line(self, learn, now: float) -> str:
        phase = "train" if learn.training else "valid"
        rate = self._n / max(now - self._t0, 1e-9)
        if self._total:
            frac = self._n / self._total
            bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
            pos = f"[{bar}] {self._n}/{self._total}"
        else:
            pos = f"{self._n}"
        return (
            f"epoch {learn.epoch} {phase} {pos}  "
            f"loss {float(self._sum) / self._n:.4f}  {rate:.2f} it/s"
        )

    def _draw(self, learn, now: float) -> None:
        self._last_draw = now
        line = self._line(learn, now)
        if self._tty:
            pad = max(0, self._drawn - len(line))
            self._write("\r" + line + " " * pad)
            self._drawn = len(line)
        else:
            self._write(line + "\n")

    def after_epoch(self, learn):
        if self._epoch_losses:
            self.losses.extend(torch.stack(self._epoch_losses).cpu().tolist())
            if self.plot is not None and self._main:
                self.save_plot(self.plot)
        if getattr(learn, "metrics", None) is None and self._n and self._tty:
            # keep the final line of the epoch (no MetricsCB table to summarise it)
            self._write("\n")
            self._drawn = 0

    def cleanup_epoch(self, learn):
        self._clear()

    def cleanup_fit(self, learn):
        self._clear()
        if self._metrics is not None:
            vars(self._metrics).pop("_log", None)  # back to MetricsCB's own printing

    def save_plot(self, path: str | os.PathLike) -> None:
        """Save the training loss per batch as a PNG (log scale, running mean)."""
        plot_losses(self.losses, path, xlabel="training batch")
