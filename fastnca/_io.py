"""Atomic file writes, written once: every file fastnca writes goes through ``atomic_path``.

A temporary file is made in the target's directory, filled, fsynced, given the usual file mode
(``0666 & ~umask``; ``mkstemp`` makes 0600) and moved over the target with ``os.replace``. A killed
process leaves either the old file or the new one, never a truncated one; on any error the
temporary file is removed. A full disk is reported as "no space left on device at PATH".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix: str = TMP_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    ``with atomic_path("a.png") as tmp: image.save(tmp)``. Parent directories are created.
    """
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device at {p}") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_save(obj, path) -> Path:
    """``torch.save(obj, path)`` atomically (see :func:`atomic_path`)."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch reports a full disk as a write failure of its zip writer
            if _disk_full(tmp):
                raise OSError(errno.ENOSPC, str(e)) from None
            raise
    return Path(path).expanduser()


def atomic_write_json(obj, path) -> Path:
    """``json.dump(obj)`` (indent 2, a final newline) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path).expanduser()


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def remove_stale_temps(directory) -> list[Path]:
    """Delete temporary files a killed writer left in ``directory`` (``.NAME.*.tmp``)."""
    removed = []
    d = Path(directory)
    if d.is_dir():
        for f in d.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    return removed
