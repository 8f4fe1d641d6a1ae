"""Which implementation an op runs on a device: the Triton kernels or the torch composite.

    FASTNCA_BACKEND=auto    (default) Triton on CUDA devices whose compute capability the static
                            GPU report compiles and checks (sm_80, sm_90, sm_100; see
                            docs/gpu_static.md) when Triton imports; the torch composite
                            everywhere else, with one warning per reason saying why.
    FASTNCA_BACKEND=triton  Triton on every CUDA device (an error naming what to install when
                            Triton does not import); on CPU only under TRITON_INTERPRET=1, where
                            CPU tensors go through the real launchers and interpreted kernels.
    FASTNCA_BACKEND=torch   the torch composite everywhere.

``set_backend("torch")`` (or "auto"/"triton"; None: back to the environment variable) switches in
Python. Nothing here imports Triton until a CUDA (or interpreted) call asks for it, so
``import fastnca`` and every CPU path work without Triton installed.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "torch")
# Compute capabilities compiled and checked by fastnca.bench.gpu_static (its ARCHS): sm_80, sm_90,
# sm_100.
COVERED = ((8, 0), (9, 0), (10, 0))

_override: str | None = None
_warned: set[str] = set()


def set_backend(name: str | None) -> None:
    """Python-level switch: "auto", "triton", "torch", or None to follow FASTNCA_BACKEND again."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _override = name
    _decide.cache_clear()


def reset() -> None:
    """Forget cached decisions and given warnings (after changing the environment)."""
    _decide.cache_clear()
    getattr(triton_status, "cache_clear", lambda: None)()
    _warned.clear()


def get_backend() -> str:
    """The requested backend: set_backend's, else FASTNCA_BACKEND, else "auto"."""
    if _override is not None:
        return _override
    name = os.environ.get("FASTNCA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTNCA_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@functools.lru_cache(maxsize=1)
def triton_status() -> str | None:
    """None when Triton imports (with its launch helpers), else the one-line reason it does not."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return f"Triton does not import ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@dataclass(frozen=True)
class Decision:
    triton: bool
    reason: str
    warn: bool = False  # a fallback the user did not ask for: warn once


def decide(device: torch.device) -> Decision:
    """Which path ``device`` takes under the current backend setting, and why."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _decide(get_backend(), device.type, index, _interpreting())


@functools.lru_cache(maxsize=64)
def _decide(backend: str, dtype_: str, index: int | None, interpret: bool) -> Decision:
    if backend == "torch":
        return Decision(False, "FASTNCA_BACKEND=torch")
    if dtype_ == "cuda":
        missing = triton_status()
        if missing is not None:
            if backend == "triton":
                raise RuntimeError(
                    f"FASTNCA_BACKEND=triton but {missing}: pip install triton "
                    "(a version matching your torch), or use FASTNCA_BACKEND=auto"
                )
            return Decision(
                False,
                f"{missing}; the torch composite runs on CUDA (pip install "
                "triton for the fused kernels)",
                warn=True,
            )
        if torch.version.hip is not None and backend == "auto":
            return Decision(
                False,
                "ROCm devices are not covered by the static GPU report; the "
                "torch composite runs (FASTNCA_BACKEND=triton to force)",
                warn=True,
            )
        cap = _capability(index)
        if cap not in COVERED and backend == "auto":
            return Decision(
                False,
                f"cuda:{index} has compute capability {cap[0]}.{cap[1]}, "
                f"which the static GPU report does not cover (sm_80, sm_90, "
                "sm_100); the torch composite runs (FASTNCA_BACKEND=triton "
                "to force)",
                warn=True,
            )
        return Decision(True, f"Triton kernels (sm_{cap[0]}{cap[1]}, FASTNCA_BACKEND={backend})")
    if dtype_ == "cpu" and backend == "triton":
        if interpret and triton_status() is None:
            return Decision(True, "Triton interpreter (FASTNCA_BACKEND=triton, TRITON_INTERPRET=1)")
        why = triton_status() or "TRITON_INTERPRET=1 is not set"
        return Decision(
            False,
            f"FASTNCA_BACKEND=triton on CPU needs the Triton interpreter ("
            f"{why}); the torch composite runs",
            warn=True,
        )
    return Decision(False, f"torch composite on {dtype_}")


@torch.compiler.assume_constant_result  # decided once at trace time, not traced into
def use_triton(device: torch.device) -> bool:
    """True when the op should run its Triton kernels on ``device`` (warns once on a fallback)."""
    d = decide(device)
    if d.warn and d.reason not in _warned:
        _warned.add(d.reason)
        warnings.warn(f"fastnca: {d.reason}", RuntimeWarning, stacklevel=3)
    return d.triton
