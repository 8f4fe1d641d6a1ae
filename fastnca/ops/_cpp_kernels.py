"""The C++ CPU kernels (``kernels/*_cpu.cpp``), compiled on first use and cached.

The first use on a machine builds them with its C++ compiler and ninja
(``torch.utils.cpp_extension.load``) into ``~/.cache/fastnca/cpu_kernels/<name>``
(``FASTNCA_CPU_KERNELS_CACHE`` overrides the folder): about 40-50 s once (a line on stderr says
so). The name carries a hash of the sources, torch's version and the flags, so a changed source
or another torch builds anew; a built module is imported directly (milliseconds). The flags
include ``-march=native``: the cache belongs to the machine that built it. Where no compiler or
ninja is found, or the build fails, the CPU ops keep their pure-torch paths (one warning says
why); ``FASTNCA_CPU_KERNELS=0`` asks for those paths outright.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

_SOURCES = ("nca_step_cpu.cpp", "perceive_cpu.cpp")
_HEADERS = ("stencil_cpu.h",)
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_state: dict = {}  # "module" (or None) once tried, "why" when not available
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build


def enabled() -> bool:
    """False when FASTNCA_CPU_KERNELS asks for the pure-torch CPU paths."""
    return os.environ.get("FASTNCA_CPU_KERNELS", "1").strip().lower() not in ("0", "off", "no")


def _sources(names=_SOURCES) -> list[Path]:
    import fastnca.kernels

    return [Path(fastnca.kernels.__file__).parent / s for s in names]


def _name() -> str:
    import torch

    h = hashlib.sha256(f"{torch.__version__} {sys.version_info[:2]} {_FLAGS}".encode())
    for src in _sources() + _sources(_HEADERS):
        h.update(src.read_bytes())
    return f"fastnca_cpu_{h.hexdigest()[:12]}"


def _cache() -> Path:
    d = os.environ.get("FASTNCA_CPU_KERNELS_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "fastnca" / "cpu_kernels"


def _build():
    import torch

    name = _name()
    build_dir = _cache() / name
    built = build_dir / f"{name}.so"
    if not built.exists():
        _compile(name, build_dir)
    torch.ops.load_library(str(built))  # registers the ops torch.ops.fastnca_cpu.*
    return torch.ops.fastnca_cpu


def _compile(name: str, build_dir: Path) -> None:
    # torch.utils.cpp_extension warns about CUDA_HOME on import; these kernels are CPU-only.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # else torch waits on it forever
    print("fastnca: compiling the C++ CPU kernels (once, about 45 s)...", file=sys.stderr)
    cpp_extension.load(
        name,
        sources=[str(s) for s in _sources()],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,  # the sources register torch ops (TORCH_LIBRARY_FRAGMENT)
        verbose=False,
    )


def kernels():
    """``torch.ops.fastnca_cpu`` (nca_forward/backward, perceive_forward/backward) once the
    kernels are built and loaded, or None (disabled, or the build failed: warned once)."""
    if not enabled():
        return None
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                try:
                    _state["module"] = _build()
                except Exception as e:  # no compiler, no ninja, a failed build: torch paths
                    lines = str(e).strip().splitlines() or [""]
                    _state["why"] = f"{type(e).__name__}: {lines[-1][:200]}"
                    _state["module"] = None
                    warnings.warn(
                        "fastnca: the C++ CPU kernels could not be built "
                        f"({_state['why']}); the CPU ops use their slower pure-torch paths",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    return _state["module"]


def status() -> str:
    """One line for `fastnca doctor`: built, disabled, not built yet, or why not."""
    if not enabled():
        return "off (FASTNCA_CPU_KERNELS=0): pure-torch paths"
    if "module" in _state:
        return "compiled" if _state["module"] is not None else f"unavailable ({_state['why']})"
    built = (_cache() / _name() / f"{_name()}.so").exists()
    return "built, not loaded yet" if built else "not built yet (the first CPU step builds them)"
