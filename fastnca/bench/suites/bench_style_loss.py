"""style_loss forward+backward over the VGG16 style layers, side by side in one run.

Workload: random ReLU features of the shapes VGG16 gives at relu1_1, relu2_1, relu3_1, relu4_1,
relu5_1 for a batch of 4 images of S x S (S = 128, 256): (4, 64, S, S), (4, 128, S/2, S/2),
(4, 256, S/4, S/4), (4, 512, S/8, S/8), (4, 512, S/16, S/16); targets are (C, C) Grams of one style
image. Variants: the lesson's batch-summed einsum + MSE (eager, and torch.compile of it), the
per-image bmm + MSE in eager PyTorch (the same maths as fastnca), and fastnca (Triton on CUDA,
the custom-backward composite on CPU), eager and compiled.

Floors (float32, S = 256): features 126 MB; forward+backward must read them twice and write their
gradient once (377 MB). Useful FLOPs (full Gram 2BC²N forward, 4BC²N backward) 9.1 GF forward,
27 GF forward+backward; the symmetric forward needs half the forward. On CUDA the rows report
achieved GB/s against the bytes floor and effective TFLOP/s, and a Gram-forward group compares the
Triton kernel with the card's torch.mm rate measured in the same run, for the same precision.
"""

from __future__ import annotations

import pytest
import torch
from conftest import device, sync

from fastnca import gram, style_loss
from fastnca.lesson import lesson_style_loss

pytestmark = pytest.mark.ops

LAYERS = [(64, 1), (128, 2), (256, 4), (512, 8), (512, 16)]  # (channels, downsampling)
SIZES = [pytest.param(128, marks=pytest.mark.quick), 256]
VARIANTS = ["lesson eager", "lesson compiled", "bmm eager", "fastnca", "fastnca compiled"]


def layer_shapes(S: int, B: int = 4) -> list[tuple[int, int, int, int]]:
    return [(B, C, S // d, S // d) for C, d in LAYERS]


def bmm_style_loss(feats, targets):
    """Per-image Grams with torch.bmm, compared with the broadcast target: fastnca's maths."""
    total = 0.0
    for f, t in zip(feats, targets, strict=True):
        B, C, H, W = f.shape
        m = f.reshape(B, C, H * W)
        total = total + (torch.bmm(m, m.transpose(1, 2)) / (H * W) - t).square().mean()
    return total


def _variants():
    return {
        "lesson eager": lesson_style_loss,
        "lesson compiled": torch.compile(lesson_style_loss),
        "bmm eager": bmm_style_loss,
        "fastnca": style_loss,
        "fastnca compiled": torch.compile(style_loss),
    }


def _inputs(S, dev, dtype):
    shapes = layer_shapes(S)
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = [torch.randn(s, generator=g).relu_().to(dev, dtype).requires_grad_() for s in shapes]
    targets = [gram(torch.randn((1, *s[1:]), generator=g).relu_().to(dev))[0] for s in shapes]
    return feats, targets


def _floors(feats):
    n_bytes = 3 * sum(f.numel() * f.element_size() for f in feats)
    flops = sum(6 * f.shape[0] * f.shape[1] ** 2 * f.shape[2] * f.shape[3] for f in feats)
    return n_bytes, flops


@pytest.mark.parametrize("S", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_style_loss_fwd_bwd(benchmark, S, variant):
    dev = device()
    dtype = torch.float32
    fn = _variants()[variant]
    feats, targets = _inputs(S, dev, dtype)

    def run():
        for f in feats:
            f.grad = None
        loss = fn(feats, targets)
        loss.backward()
        sync(dev)
        return loss

    for _ in range(2):  # warm-up (compilation) outside the timed rounds
        run()
    benchmark.group = f"style_loss fwd+bwd VGG16 relu1-5 B=4 {S}x{S} float32 {dev.type}"
    benchmark.extra_info["variant"] = variant
    # Floor inputs (see the module docstring): 3 passes over the features; 6 B C^2 N FLOPs, at
    # the rate of fp32-accurate dots (3 TF32 products) on a CUDA card.
    benchmark.extra_info["bytes"], benchmark.extra_info["flops"] = _floors(feats)
    benchmark.extra_info["flop_kind"] = "tf32x3"
    benchmark.pedantic(run, rounds=5 if dev.type == "cpu" else 30, iterations=1)
    if dev.type == "cuda":
        n_bytes, flops = _floors(feats)
        t = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(n_bytes / t / 1e9, 1)
        benchmark.extra_info["TFLOP/s"] = round(flops / t / 1e12, 2)


@pytest.mark.skipif(device().type != "cuda", reason="Gram kernel rate vs matmul rate: CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["bmm eager", "fastnca triton"])
def test_gram_forward_rate(benchmark, dtype, variant):
    """Gram forward of the five layers at 256x256: torch.bmm vs the symmetric Triton kernel,
    in effective TFLOP/s (2BC²N per layer) and as a fraction of torch.mm's rate (same dtype)."""
    import triton.testing

    dev = device()
    feats = [torch.randn(s, device=dev).relu_().to(dtype) for s in layer_shapes(256)]

    def bmm_gram(f):
        m = f.flatten(2)
        return torch.bmm(m, m.transpose(1, 2)) / m.shape[-1]

    fn = bmm_gram if variant == "bmm eager" else gram
    a = torch.randn(8192, 8192, device=dev, dtype=dtype)
    mm_rate = 2 * 8192**3 / (triton.testing.do_bench(lambda: a @ a) * 1e-3)

    def run():
        with torch.no_grad():
            out = [fn(f) for f in feats]
        sync(dev)
        return out

    run()
    benchmark.group = f"gram forward VGG16 relu1-5 B=4 256x256 {dtype} cuda"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["baseline"] = "bmm eager"
    flops = sum(2 * f.shape[0] * f.shape[1] ** 2 * f.shape[2] * f.shape[3] for f in feats)
    # Floor: read the features once, write B C^2 per layer; 2 B C^2 N FLOPs per layer.
    benchmark.extra_info["flops"] = flops
    benchmark.extra_info["bytes"] = sum(
        f.numel() * f.element_size() + f.shape[0] * f.shape[1] ** 2 * 4 for f in feats
    )
    benchmark.extra_info["flop_kind"] = "tf32x3" if dtype == torch.float32 else "half"
    benchmark.pedantic(run, rounds=30, iterations=1)
    rate = flops / benchmark.stats.stats.median
    benchmark.extra_info["TFLOP/s"] = round(rate / 1e12, 1)
    benchmark.extra_info["mm TFLOP/s"] = round(mm_rate / 1e12, 1)
    benchmark.extra_info["% of mm"] = round(100 * rate / mm_rate, 1)


def interleaved(sizes=(128, 256), rounds: int = 7) -> None:
    """On a shared, noisy machine: the eager variants timed round by round in one process, so
    load changes hit every variant alike:
    ``python fastnca/bench/suites/bench_style_loss.py [S ...]``."""
    import statistics
    import time

    dev = device()
    fns = {"lesson eager": lesson_style_loss, "bmm eager": bmm_style_loss, "fastnca": style_loss}
    for S in sizes:
        feats, targets = _inputs(S, dev, torch.float32)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds + 1):
            for name, fn in fns.items():
                for f in feats:
                    f.grad = None
                t0 = time.perf_counter()
                fn(feats, targets).backward()
                sync(dev)
                if r:  # round 0 is the warm-up
                    times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["lesson eager"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{S}x{S} {dev.type} {name:<14} {med * 1e3:9.1f} ms  {base / med:5.2f}x")


if __name__ == "__main__":
    import sys

    interleaved(tuple(int(a) for a in sys.argv[1:]) or (128, 256))
