"""Device names, resolved once for every command and callback: ``auto``, ``cpu``, ``cuda[:N]``,
``mps``. One rule, one error message."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def default_device() -> torch.device:
    """CUDA when present, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``None``/``"auto"`` -> :func:`default_device`; otherwise the named device, checked to exist.

    Raises ValueError naming what was asked and what to use instead.
    """
    if name is None or name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {str(name)!r} requested but CUDA is not available on this "
                f"machine; use cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {str(name)!r} does not exist ({torch.cuda.device_count()} CUDA device(s))"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device: {str(name)!r} requested but MPS is not available on this machine; use cpu"
            )
    elif dev.type != "cpu":
        raise ValueError(
            f"device: {str(name)!r} is not supported; expected auto, cpu, cuda, cuda:N or mps"
        )
    return dev
