"""NCA rollouts with the Distill step options, forward+backward: a lesson-style eager step with the
same features against fastnca's ``nca_step`` (options path), side by side in one run.

Workloads: the growing NCA (C=16, F=3, HID=128, zero padding, alive masking on alpha > 0.1) and the
clipped texture NCA (C=12, F=4, HID=96, perception/hidden/update/state clipped). Each row reports
the bytes autograd keeps per cell and step: fastnca keeps the state, the update mask and (alive
masking) the alive mask, 4*C + 2 = 66 B for the growing NCA in float32; the eager step keeps
every intermediate. FLOPs per cell and step forward + backward: ``conftest.nca_step_flops``
(the matmuls and the stencil; clamps and alive max-pools not counted).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import device, nca_step_flops, sync
from torch import nn

from fastnca.nca.distill import GROWING, TEXTURE
from fastnca.nca.model import NCA, saved_tensor_bytes

pytestmark = pytest.mark.ops
VARIANTS = ["lesson eager", "fastnca"]
# (architecture, batch, size, steps); the quick one is small enough for `fastnca bench --quick`.
WORKLOADS = [
    ("growing", 8, 72, 32),
    ("texture", 4, 128, 32),
    pytest.param(("growing", 2, 40, 8), marks=pytest.mark.quick),
]


class LessonStyleStep(nn.Module):
    """The lesson's SimpleCA step written eagerly with the Distill options of ``model``: padded
    conv2d perception, 1x1 convs, ``(rand + rate).floor()`` mask, clamps, alive max-pools."""

    def __init__(self, model: NCA):
        super().__init__()
        self.m = model

    def forward(self, x):
        m, (b, ch, h, w) = self.m, x.shape
        clip = m.clip or {}

        def c(t, key):
            return t.clamp(*clip[key]) if key in clip else t

        def alive(t):  # max_pool2d pads with -inf: the padding never wins
            return (
                F.max_pool2d(t[:, m.alive_channel : m.alive_channel + 1], 3, 1, 1)
                > m.alive_threshold
            )

        mode = "constant" if m.padding == "zeros" else "circular"
        y = F.pad(x.reshape(b * ch, 1, h, w), [1, 1, 1, 1], mode)
        y = c(F.conv2d(y, m.filters[:, None].to(x.dtype)).reshape(b, -1, h, w), "perception")
        y = c(m.w2(c(torch.relu(m.w1(y)), "hidden")), "update")
        mask = (torch.rand(b, 1, h, w, device=x.device) + m.fire_rate).floor()
        new = c(x + y * mask, "state")
        if m.alive_threshold is None:
            return new
        return new * (alive(x) & alive(new)).to(x.dtype)


def _model(arch, dev):
    torch.manual_seed(0)
    m = NCA(**{**(GROWING if arch == "growing" else TEXTURE), "zero_init": False})
    nn.init.normal_(m.w2.weight, std=0.02)
    return m.to(dev)


def _seed(m, B, S):
    if m.alive_threshold is None:
        return m.seed(B, S, random=True) * 0.2
    x = m.seed(B, S)  # a grown blob: alive cells in the middle third, dead elsewhere
    x[:, 3:, S // 3 : 2 * S // 3, S // 3 : 2 * S // 3] = 0.5
    return x


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: "{}-b{}-{}px-{}steps".format(*w))
@pytest.mark.parametrize("variant", VARIANTS)
def test_rollout_options_fwd_bwd(benchmark, workload, variant):
    dev = device()
    arch, B, S, steps = workload
    m = _model(arch, dev)
    step = LessonStyleStep(m) if variant == "lesson eager" else m.step
    x0 = _seed(m, B, S)
    params = list(m.parameters())

    def rollout(x):
        for _ in range(steps):
            x = step(x)
        return x

    def run():
        for p in params:
            p.grad = None
        rollout(x0).square().mean().backward()
        sync(dev)

    out, info = saved_tensor_bytes(rollout, x0, exclude=[*params, m.filters])
    out.square().mean().backward()
    del out
    benchmark.group = f"nca {arch} rollout {steps} steps fwd+bwd (B={B}, {S}x{S}) {dev.type}"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["saved B/cell/step"] = round(info["saved"] / (B * S * S * steps), 1)
    benchmark.extra_info["flops"] = nca_step_flops(
        B * S * S * steps, m.channels, m.n_filters, m.hidden
    )
    benchmark.pedantic(run, rounds=3 if dev.type == "cpu" else 10, iterations=1)
