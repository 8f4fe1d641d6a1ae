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
