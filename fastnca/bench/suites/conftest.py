"""Shared benchmark conventions.

Every benchmark sets ``benchmark.group`` (one workload, e.g. "perceive fwd+bwd (4,12,128,128)") and
``benchmark.extra_info["variant"]`` (e.g. "lesson eager", "lesson compiled", "fastnca",
"fastnca compiled"); the plugin ``fastnca.bench.plugin`` adds each row's speed-up over its group's
baseline variant ("lesson eager" unless ``extra_info["baseline"]`` names another), measured in the
same run (see ``fastnca.bench.rows``).
"""

from __future__ import annotations

import os

import pytest
import torch


def device() -> torch.device:
    """Benchmark device: FASTNCA_BENCH_DEVICE, else CUDA when present, else CPU."""
    return torch.device(
        os.environ.get("FASTNCA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    )


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# FLOP counts of one timed call, for the rows' GFLOP/s and % of the run's torch.mm rate
# (``benchmark.extra_info["flops"]``). Useful FLOPs only, counted densely (every cell, fired or
# not; a multiply-add is 2 FLOPs; biases, ReLU, masks and clamps left out), and the same count for
# every variant of a group: a path that skips work gets credit for it, one that recomputes does
# not pay for it.


def perceive_flops(cells: int, channels: int, n_filters: int, backward: bool) -> int:
    """perceive: each of C channels x F 3x3 filters per cell, 9 multiply-adds:
    forward 2 * 9 * F * C per cell; the input gradient is the transposed stencil, the same count
    (the filter bank is fixed, so no weight gradient)."""
    return cells * 18 * n_filters * channels * (2 if backward else 1)


def nca_step_flops(cells: int, channels: int, n_filters: int, hidden: int) -> int:
    """One NCA step forward + backward per cell, C channels, F filters, HID hidden:
    forward   perceive 18*F*C, w1 (HID x F*C) 2*HID*F*C, w2 (C x HID) 2*C*HID;
    backward  dw2 and dh 2*2*C*HID, dw1 and dP 2*2*HID*F*C, dx (transposed stencil) 18*F*C;
    total     3 * 2*HID*(F*C + C) + 2 * 18*F*C   (texture preset C=12, F=4, HID=96: 36,288)."""
    C, F, H = channels, n_filters, hidden
    return cells * (3 * 2 * H * (F * C + C) + 2 * 18 * F * C)


@pytest.fixture
def bench_device() -> torch.device:
    return device()
