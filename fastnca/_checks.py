"""Argument checks shared by every layer: one rule and one message each.

``check_int("iters", v, lo=1)`` accepts a Python int (not a bool) in ``[lo, hi]`` and returns it;
anything else raises ``ValueError("iters: expected an int >= 1, got ...")``.
"""

from __future__ import annotations

import numbers

import torch


def check_int(name: str, v, lo: int | None = 1, hi: int | None = None, why: str = "") -> int:
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if ok and (lo is None or v >= lo) and (hi is None or v <= hi):
        return int(v)
    if lo == 1 and hi is None:
        want = "a positive int"
    elif hi is None:
        want = f"an int >= {lo}"
    elif lo is None:
        want = f"an int <= {hi}"
    else:
        want = f"an int in [{lo}, {hi}]"
    raise ValueError(f"{name}: expected {want}{why}, got {v!r}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of every fastnca op: float64 for float64 inputs, else float32 (half
    inputs are computed in float32 and rounded once, to nearest even, on output)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
