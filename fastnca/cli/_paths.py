"""Output paths checked before any work: a probe file is created and removed in the directory
that will hold the output, so an unwritable place (read-only, under a regular file, no
permission) is a one-line usage error (exit 2) before a rollout, a training run or a benchmark,
not a traceback after it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fastnca.cli._common import UsageError


def _nearest_existing(p: Path) -> Path:
    a = p
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def probe_dir(d: Path, flag: str, target: Path) -> None:
    """Create and remove a probe file in ``d`` (or in its nearest existing ancestor, where the
    missing folders will be made); UsageError naming ``flag`` when that fails."""
    a = _nearest_existing(d)
    if not a.is_dir():
        raise UsageError(
            f"{flag}: cannot write {str(target)!r}: {str(a)!r} is a file, not a directory"
        )
    try:
        fd, tmp = tempfile.mkstemp(dir=a, prefix=".fastnca-probe.", suffix=".tmp")
    except OSError as e:
        raise UsageError(
            f"{flag}: cannot write {str(target)!r}: cannot create files in {str(a)!r} "
            f"({e.strerror or e})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def writable_file(path, flag: str) -> Path:
    """``path`` as an output file that can be written: not a directory, its folder writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag}: {str(p)!r} is a directory; give a file name")
    probe_dir(p.parent, flag, p)
    return p


def writable_dir(path, flag: str) -> Path:
    """``path`` as an output directory that can be created (or exists) and written."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag}: {str(p)!r} exists and is not a directory")
    probe_dir(p, flag, p)
    return p
