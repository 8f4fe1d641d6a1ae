"""perceive: the lesson's eager code, torch.compile of it, and fastnca, side by side in one run.

Bytes that must move (float32): forward reads x once and writes F*x; forward+backward adds reading
the F*x gradient and writing dx. FLOPs: 2 * 9 * F * C per cell forward, the same again for dx
(``conftest.perceive_flops``). Every row reports GFLOP/s and its % of the run's torch.mm rate; on
CUDA the rows also report achieved GB/s and the % of the roofline floor of a known card.
"""

from __future__ import annotations

import pytest
import torch
from conftest import device, perceive_flops, sync

from fastnca import DEFAULT_FILTERS, perceive
from fastnca.lesson import lesson_perceive

SHAPES = [pytest.param((4, 12, 128, 128), marks=pytest.mark.quick), (8, 16, 256, 256)]
pytestmark = pytest.mark.ops


def _variants(dev):
    v = {
        "lesson eager": lesson_perceive,
        "lesson compiled": torch.compile(lesson_perceive),
        "fastnca": perceive,
        "fastnca compiled": torch.compile(perceive),
    }
    return v


VARIANTS = ["lesson eager", "lesson compiled", "fastnca", "fastnca compiled"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_perceive(benchmark, shape, mode, variant):
    dev = device()
    fn = _variants(dev)[variant]
    k = DEFAULT_FILTERS.to(dev)
    x = torch.randn(shape, device=dev, requires_grad=(mode == "fwd+bwd"))
    B, C, H, W = shape
    n_bytes = x.numel() * 4 * (1 + k.shape[0]) * (2 if mode == "fwd+bwd" else 1)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(x, k)
        else:
            out = fn(x, k)
            out.backward(torch.ones_like(out))
        sync(dev)
        return out

    for _ in range(2):  # warm-up (compilation) outside the timed rounds
        run()
    benchmark.group = f"perceive {mode} {shape} float32 {dev.type}"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["bytes"] = n_bytes
    benchmark.extra_info["flops"] = perceive_flops(B * H * W, C, k.shape[0], mode == "fwd+bwd")
    benchmark.pedantic(run, rounds=7 if dev.type == "cpu" else 50, iterations=1)
    if dev.type == "cuda" and variant.startswith("fastnca"):
        gbs = n_bytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["GB/s"] = round(gbs, 1)
