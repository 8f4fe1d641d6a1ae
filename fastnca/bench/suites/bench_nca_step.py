"""NCA rollout forward+backward: the lesson's module, torch.compile of it, fastnca (nca_step) eager
and compiled, side by side in one run; on CUDA also one step's forward against its floor.

Workload (the texture preset: C=12 channels, F=4 filters, HID=96 hidden): ``steps`` updates from a
random state, loss = mean(out^2), backward through every step. Each row also reports the bytes
autograd keeps per cell and step (counted with saved_tensors_hooks, storages deduplicated, shared
weights left out): fastnca keeps the state and the bool mask, 4*C + 1 = 49 B in float32.

Floor of one step per cell (float32): forward moves x in + out (2*4*C) + mask (1) = 97 B and runs
2*HID*(F*C + C) + 2*9*F*C = 11.9 kFLOP; the fused backward reads x, mask and the output gradient,
writes dx (145 B) plus its dP scratch (2*4*F*C = 384 B) and recomputes the forward (~35 kFLOP).
The rollout rows count 3 * 2*HID*(F*C + C) + 2 * 18*F*C = 36.3 kFLOP per cell and step forward +
backward (``conftest.nca_step_flops``) and report GFLOP/s and its % of the run's torch.mm rate.
On CUDA the fastnca rows report achieved GB/s and GFLOP/s and, for known cards
(``fastnca.bench.gpu_hw``), the % of the floor.
"""

from __future__ import annotations

import pytest
import torch
from conftest import device, nca_step_flops, sync

from fastnca import NCA
from fastnca.lesson import LessonCA
from fastnca.nca.model import saved_tensor_bytes
from fastnca.ops.nca_step import update_mask
from fastnca.reference import nca_step_ref

pytestmark = pytest.mark.ops
VARIANTS = ["lesson eager", "lesson compiled", "fastnca", "fastnca compiled"]
# (batch, size, steps, dtype): the texture preset's rollout; bfloat16 with fewer steps (the lesson's
# bfloat16 convolutions are slow on CPUs without native bfloat16); a small one for --quick.
WORKLOADS = [
    (4, 128, 64, torch.float32),
    (4, 128, 16, torch.bfloat16),
    pytest.param((1, 64, 16, torch.float32), marks=pytest.mark.quick),
]


def _models(dev, dtype):
    torch.manual_seed(0)
    m = NCA.texture(zero_init=False)
    torch.nn.init.normal_(m.w2.weight, std=0.02)  # a rollout that changes the state
    lesson = LessonCA(m.channels, m.hidden, m.filters, zero_w2=False)
    lesson.load_state_dict({k: v for k, v in m.state_dict().items() if k != "filters"})
    return m.to(dev, dtype), lesson.to(dev, dtype)


def _rollout(variant, m, lesson):
    """A function x -> state after `steps` updates, for one variant."""
    if variant.startswith("lesson"):
        step = torch.compile(lesson) if variant.endswith("compiled") else lesson
    else:
        step = torch.compile(m.step, fullgraph=True) if variant.endswith("compiled") else m.step

    def rollout(x, steps):
        for _ in range(steps):
            x = step(x)
        return x

    return rollout


def _check_cuda_step(m, x):
    """On a GPU: the Triton step and its gradients against nca_step_ref (float64), before timing."""
    mask = update_mask(x, m.fire_rate)
    w = (m.w1.weight.flatten(1), m.w1.bias, m.w2.weight.flatten(1))
    ref = [t.detach().double().requires_grad_() for t in (x, *w)]
    want = nca_step_ref(*ref, None, mask, m.filters.double())
    g = torch.randn_like(want)
    want.backward(g)
    xs = x.detach().requires_grad_()
    got = m.step(xs, mask)
    got.backward(g.to(got.dtype))
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-4)
    grads = (xs.grad, m.w1.weight.grad.flatten(1), m.w1.bias.grad, m.w2.weight.grad.flatten(1))
    for name, a, r in zip(("x", "w1", "b1", "w2"), grads, ref, strict=True):
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(
            a.double(),
            r.grad,
            rtol=1e-4,
            atol=1e-4 * scale,
            msg=lambda s, n=name: f"CUDA nca_step grad {n}: {s}",
        )
    m.zero_grad(set_to_none=True)


def _workload_id(w):
    return "b{}-{}px-{}steps-{}".format(*w[:3], str(w[3]).replace("torch.", ""))


@pytest.mark.parametrize("workload", WORKLOADS, ids=_workload_id)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rollout_fwd_bwd(benchmark, workload, variant):
    dev = device()
    B, S, steps, dtype = workload
    m, lesson = _models(dev, dtype)
    rollout = _rollout(variant, m, lesson)
    x0 = m.seed(B, S, random=True) * 0.2
    params = list(lesson.parameters() if variant.startswith("lesson") else m.parameters())

    def backward(out):
        out.float().square().mean().backward()
        sync(dev)

    def run():
        for p in params:
            p.grad = None
        backward(rollout(x0, steps))

    # Warm-up (compilation) outside the timed rounds, counting the bytes kept for backward.
    out, info = saved_tensor_bytes(rollout, x0, steps, exclude=[*params, m.filters, lesson.filters])
    backward(out)
    del out
    benchmark.group = (
        f"nca rollout {steps} steps fwd+bwd (B={B}, C=12, {S}x{S}) "
        f"{str(dtype).replace('torch.', '')} {dev.type}"
    )
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["saved B/cell/step"] = round(info["saved"] / (B * S * S * steps), 1)
    benchmark.extra_info["flop_kind"] = "half" if dtype == torch.bfloat16 else "ieee"
    benchmark.extra_info["flops"] = nca_step_flops(
        B * S * S * steps, m.channels, m.n_filters, m.hidden
    )
    rounds = (3 if dtype == torch.float32 else 2) if dev.type == "cpu" else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1)


@pytest.mark.skipif(device().type != "cuda", reason="the floor comparison is for CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_fwd_cuda(benchmark, variant):
    dev = device()
    B, S, C, HID, NF = 4, 128, 12, 96, 4
    m, lesson = _models(dev, torch.float32)
    x = m.seed(B, S, random=True) * 0.2
    if variant == "fastnca":
        _check_cuda_step(m, x)
    rollout = _rollout(variant, m, lesson)

    def run():
        with torch.no_grad():
            rollout(x, 1)
        sync(dev)

    for _ in range(3):
        run()
    benchmark.group = f"nca step fwd (B={B}, C={C}, {S}x{S}) float32 cuda"
    benchmark.extra_info["variant"] = variant
    # Floor of one step per cell: x in + out (2*4*C B) + mask (1 B); 2*HID*(F*C + C) + 18*F*C
    # FLOPs on the FP32 units (gpu_hw.card_for / floor_s turn these into the % of floor column).
    cells = B * S * S
    benchmark.extra_info["bytes"] = cells * (2 * 4 * C + 1)
    benchmark.extra_info["flops"] = cells * (2 * HID * (NF * C + C) + 18 * NF * C)
    benchmark.pedantic(run, rounds=50, iterations=1)
    if variant.startswith("fastnca"):
        t = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(benchmark.extra_info["bytes"] / t / 1e9, 1)
