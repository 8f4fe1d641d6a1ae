"""Input validation for the public ops: errors name the argument, what came, what is wanted."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: int | None = None, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}; convert it with .float()"
        )


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; move both to one device"
        )


def check_filters(filters: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor("filters", filters)
    if filters.dim() != 3 or tuple(filters.shape[1:]) != (3, 3) or filters.shape[0] < 1:
        raise ValueError(
            f"filters must have shape (F, 3, 3) with F >= 1, got {tuple(filters.shape)}"
        )
    check_same_device("filters", filters, "x", x)


def check_real_device(name: str, t: torch.Tensor, op: str) -> None:
    """Refuse tensors without data (the meta device): the op computes values, not only shapes."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device (a tensor without data), which {op} "
            f"cannot compute with; materialise it first (e.g. module.to_empty("
            f"device='cpu') and load weights, or build it on cpu/cuda)"
        )


def check_channels(name: str, t: torch.Tensor) -> None:
    """(B, C, H, W) with B >= 1 and C >= 1: an empty batch or no channels would give NaN or
    empty results silently."""
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(
            f"{name} must have batch B >= 1 and channels C >= 1, got shape {tuple(t.shape)}"
        )


def check_loss_weight(name: str, w, device: torch.device) -> None:
    """A per-layer loss weight: a finite real number >= 0, or a 0-d / 1-element floating tensor
    on ``device`` with such a value (checked outside torch.compile tracing only)."""
    import math
    import numbers

    if isinstance(w, torch.Tensor):
        if w.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got shape {tuple(w.shape)}"
            )
        if not w.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {w.dtype}")
        if w.device != device:
            raise ValueError(
                f"{name} is on {w.device} but the features are on {device}; move "
                f"the weights to {device} (or pass Python numbers)"
            )
        if torch.compiler.is_compiling():
            return
        v = float(w.detach().reshape(()).item())
    elif isinstance(w, numbers.Real) and not isinstance(w, bool):
        v = float(w)
    else:
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(w).__name__}")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
