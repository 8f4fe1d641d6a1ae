"""The VGG16 weights download of :mod:`fastnca.style.features`, never hanging: a connect and
every read give up after ``timeout`` seconds, the whole download after ``deadline`` seconds
(``FASTNCA_DOWNLOAD_DEADLINE``, default 600); a progress line goes to stderr; the partial
``.part`` file is removed on any failure, and stale ones of killed downloads on the next try.
``FASTNCA_OFFLINE=1`` means fastnca downloads nothing (see :func:`offline`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def _urlopen(url: str, timeout: float):
    """urlopen whose whole connect (DNS lookup included, which socket timeouts do not cover) ends
    within ``timeout`` seconds; reads after that time out per call through the socket timeout."""
    box: dict = {}

    def connect():
        try:
            box["r"] = urllib.request.urlopen(url, timeout=timeout)
        except Exception as e:  # handed to the caller's thread
            box["e"] = e

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no connection to {url} within {timeout:g}s")
    if "e" in box:
        raise box["e"]
    return box["r"]


DEFAULT_DEADLINE = 600.0  # seconds for the whole VGG16 download (528 MB)
OFFLINE_ENV, DEADLINE_ENV = "FASTNCA_OFFLINE", "FASTNCA_DOWNLOAD_DEADLINE"


def offline() -> bool:
    """True when ``FASTNCA_OFFLINE`` is set to anything but "" or "0": fastnca downloads nothing."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def _default_deadline() -> float:
    try:
        v = float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE))
    except ValueError:
        v = DEFAULT_DEADLINE
    return v if v > 0 else DEFAULT_DEADLINE


def _remove_stale_parts(dest: Path, older_than: float) -> None:
    """Partial files of downloads that were killed (``.NAME.*.part`` untouched for a while)."""
    now = time.time()
    for f in dest.parent.glob(f".{dest.name}.*.part"):
        with contextlib.suppress(OSError):
            if now - f.stat().st_mtime > older_than:
                f.unlink()


class _Progress:
    """One progress line on stderr: rewritten in place on a terminal, else a line every 10 s."""

    def __init__(self, verbose: bool, total: int | None, what: str):
        self.verbose, self.total, self.what = verbose, total, what
        self.tty = verbose and sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.verbose or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        mb = f"{done / 2**20:.0f}"
        frac = (
            f"/{self.total / 2**20:.0f} MB ({100 * done / self.total:.0f}%)"
            if self.total
            else " MB"
        )
        end = ("\n" if final else "") if self.tty else "\n"
        print(
            f"{chr(13) if self.tty else ''}fastnca.style.features: {self.what}: {mb}{frac}",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def download_weights(
    url: str, dest: Path, timeout: float = 5.0, deadline: float | None = None, verbose: bool = False
) -> Path:
    """Download ``url`` to ``dest`` (temp ``.part`` file + os.replace), never hanging.

    ``timeout`` bounds the connect and every read, ``deadline`` (default ``DEFAULT_DEADLINE`` s or
    ``$FASTNCA_DOWNLOAD_DEADLINE``) the whole download, so a dead or trickling network fails
    instead of hanging. With ``verbose`` a progress line goes to stderr. On any failure (timeout,
    deadline, hash mismatch, Ctrl-C) the partial file is removed. A file name of the torchvision
    form ``name-<sha256 prefix>.pth`` is hash-checked.
    """
    deadline = _default_deadline() if deadline is None else float(deadline)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(dest, older_than=deadline + 60)
    end = time.monotonic() + deadline
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        sha = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, _urlopen(url, min(timeout, deadline)) as r:
            size = r.headers.get("Content-Length") if hasattr(r, "headers") else None
            total = int(size) if size and size.isdigit() else None
            show, done = _Progress(verbose, total, f"downloading {dest.name}"), 0
            read = getattr(r, "read1", r.read)  # one socket read at a time: the deadline holds
            while chunk := read(1 << 16):
                sha.update(chunk)
                f.write(chunk)
                done += len(chunk)
                show(done)
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"download of {url} not finished within {deadline:g}s "
                        f"({done / 2**20:.1f} MB received); set "
                        f"{DEADLINE_ENV}=SECONDS to allow longer"
                    )
            show(done, final=True)
        prefix = dest.stem.rsplit("-", 1)[-1] if "-" in dest.stem else ""
        if len(prefix) >= 8 and not sha.hexdigest().startswith(prefix):
            raise OSError(f"downloaded {url} has sha256 {sha.hexdigest()[:8]}, expected {prefix}")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest
