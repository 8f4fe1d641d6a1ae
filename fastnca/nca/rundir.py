"""Run directories of `fastnca train`: exclusive ownership, the resume state, graceful stops.

- :class:`RunLock`: an ``fcntl.flock`` on ``RUN_DIR/.lock`` held for the whole run, so a second
  process on the same directory fails at once with the holder's pid (the lock dies with its
  process: a killed run never leaves the directory locked).
- :func:`check_new_run_dir`: ``-o`` must be a new or empty directory (or a run to --resume).
- :func:`load_run`: the config, checkpoint and pool of a run to resume (both checkpoint formats).
- :class:`GracefulStop`: SIGINT (Ctrl-C) and SIGTERM ask the run to stop at the next iteration
  boundary, where it saves and raises :class:`TrainingStopped`; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from fastnca._io import remove_stale_temps
from fastnca.nca.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from fastnca.nca.config import TrainConfig
from fastnca.train.checkpoint import load_file

CONFIG_NAME, STYLE_NAME, LEGACY_POOL_NAME, LOCK_NAME = (
    "config.json",
    "style.png",
    "pool.pt",
    ".lock",
)
RESUMABLE = {"iters", "device", "amp", "compile", "save_every", "threads"}  # may change on resume
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunDirBusy(ValueError):
    """Another process holds the run directory."""


class RunLock:
    """Exclusive ownership of a run directory for the life of this process's run."""

    def __init__(self, run_dir: Path):
        self.path, self._f = Path(run_dir) / LOCK_NAME, None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open while the run lasts)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise RunDirBusy(
                f"out_dir: {str(self.path.parent)!r} is in use by another fastnca "
                f"train (pid {pid}); wait for it or choose another directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._f = f
        remove_stale_temps(self.path.parent)  # temp files of a writer that was killed
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing drops the flock
            self._f = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_new_run_dir(run: Path) -> None:
    if run.exists() and not run.is_dir():
        raise ValueError(f"out_dir: {str(run)!r} exists and is not a directory")
    if (run / CHECKPOINT_NAME).exists():
        raise ValueError(
            f"out_dir: {str(run)!r} already holds a trained NCA; continue it with "
            f"resume (--resume) or choose another directory"
        )
    if run.is_dir():
        others = sorted(p.name for p in run.iterdir() if p.name != LOCK_NAME)
        if others:
            raise ValueError(
                f"out_dir: {str(run)!r} is not empty ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}) and is not a fastnca run; "
                f"choose a new or empty directory"
            )


def load_run(run_dir, overrides: dict):
    """(config, Checkpoint, pool or None) of a run directory to resume; writes nothing."""
    run = Path(run_dir).expanduser()
    if not run.is_dir() or not (run / CHECKPOINT_NAME).is_file():
        raise ValueError(
            f"resume: {str(run)!r} is not a run directory of `fastnca train` (no "
            f"{CHECKPOINT_NAME} in it)"
        )
    ckpt = load_checkpoint(run)
    saved = ckpt.config.get("train_config")
    if not isinstance(saved, dict) or ckpt.train is None:
        raise CheckpointError(
            f"{str(run / CHECKPOINT_NAME)!r} holds weights only (no training "
            f"state), so it cannot be resumed"
        )
    changed = sorted(
        k
        for k, v in overrides.items()
        if v is not None
        and k not in RESUMABLE
        and saved.get(k) != (list(v) if isinstance(v, tuple) else v)
    )
    if changed:
        raise ValueError(
            f"resume: {', '.join(changed)} cannot change when resuming (the run "
            f"has {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); only "
            f"{', '.join(sorted(RESUMABLE))} can"
        )
    try:
        cfg = TrainConfig(
            **{**saved, **{k: v for k, v in overrides.items() if v is not None and k in RESUMABLE}}
        ).validate()
    except TypeError as e:
        raise CheckpointError(
            f"{str(run / CHECKPOINT_NAME)!r}: its training config does not fit this fastnca ({e})"
        ) from None
    pool = ckpt.train["extra"].get("pool")
    if pool is None and (run / LEGACY_POOL_NAME).is_file():  # version-1 run directories
        p = load_file(run / LEGACY_POOL_NAME)
        if isinstance(p, dict) and p.get("iteration") == ckpt.iteration:
            pool = p.get("pool")
    if pool is None:
        print(
            "fastnca train: no pool saved with this checkpoint: resuming with a fresh pool",
            file=sys.stderr,
        )
    else:
        want = (cfg.pool, cfg.channels, cfg.size, cfg.size)
        if tuple(pool.shape) != want:
            raise CheckpointError(
                f"{str(run)!r}: its pool has shape {tuple(pool.shape)}, the "
                f"config wants {want}; the run directory is damaged"
            )
    return cfg, ckpt, pool


class TrainingStopped(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM at an iteration boundary, after saving."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, EXIT_CODES.get(signum, 130)


class GracefulStop:
    """While active, SIGINT/SIGTERM set :attr:`signum` (the run saves at the next iteration
    boundary and stops); a second SIGINT raises KeyboardInterrupt at once. Outside the main
    thread signals cannot be caught and nothing changes."""

    def __init__(self):
        self.signum, self._old = None, {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without saving
        self.signum = signum
        print(
            f"\nfastnca train: {signal.Signals(signum).name} received: finishing this "
            f"iteration and saving (Ctrl-C again to stop at once, unsaved)",
            file=sys.stderr,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, old)
        self._old.clear()
