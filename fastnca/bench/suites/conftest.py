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


@pytest.fixture
def bench_device() -> torch.device:
    return device()
