"""Style transfer: seconds per optimisation step (Learner + ImageOptCB + Adam) at 256x256.

One step = features of the image (one forward through the extractor for content + style layers),
content loss at relu4_1, Gram style loss at relu1_1..relu5_1, backward to the pixels, Adam step,
clamp. Variants: fp32 eager (the baseline), bf16 (MixedPrecision autocast), compiled
(torch.compile of the loss, fullgraph), compiled + bf16. Two extractors: "fallback" (the offline
random multi-scale features) and "vgg16" (the VGG16 architecture with random weights: the same cost
as torchvision's pretrained weights, which this benchmark does not need).

Work per step, float32, 256x256 (multiply-accumulates): Grams 1.1 G forward, ~3x with backward;
fallback features 2.6 G forward (27 * C_l * H * W per layer), ~2x with the input gradient (its
weights are buffers); VGG16 to relu5_1 about 19 G forward, ~3x with backward. On CPUs without
bf16 instructions (AVX512-BF16/AMX) bf16 is emulated and much slower than float32.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import device, sync

from fastnca.style.features import VGG16Features
from fastnca.style.stylize import (
    CONTENT_LAYERS,
    STYLE_LAYERS,
    ImageOptCB,
    StyleTransferLoss,
    TensorModel,
    feature_layers,
)
from fastnca.style.textures import builtin_content, builtin_texture
from fastnca.train.callbacks import MixedPrecision
from fastnca.train.data import dummy_dls
from fastnca.train.learner import Learner

pytestmark = pytest.mark.train

SIZE = 64 if os.environ.get("FASTNCA_BENCH_QUICK") == "1" else 256  # fastnca bench --quick: 64
VARIANTS = ["fp32 eager", "bf16", "compiled", "compiled+bf16"]
EXTRACTORS = [pytest.param("fallback", marks=pytest.mark.quick), "vgg16"]


def _features(kind: str, dev) -> VGG16Features:
    layers = feature_layers(CONTENT_LAYERS, STYLE_LAYERS)
    if kind == "fallback":
        return VGG16Features(layers, weights="random", verbose=False).to(dev)
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    sd = make_layers(cfgs["D"]).state_dict()  # random weights, pretrained VGG16's shapes and cost
    return VGG16Features(layers, weights=sd, verbose=False).to(dev)


@pytest.mark.parametrize("extractor", EXTRACTORS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_stylize_step(benchmark, extractor, variant):
    dev = device()
    feats = _features(extractor, dev)
    content = builtin_content("landscape", SIZE).to(dev)
    style = builtin_texture("scales", SIZE).to(dev)
    loss = StyleTransferLoss(
        feats, content, style, CONTENT_LAYERS, STYLE_LAYERS, style_weight=10.0
    ).to(dev)
    loss_func = torch.compile(loss, fullgraph=True) if variant.startswith("compiled") else loss
    cbs = [ImageOptCB()] + ([MixedPrecision("bf16")] if variant.endswith("bf16") else [])
    model = TensorModel(content).to(dev)
    learn = Learner(
        model, dummy_dls(1), loss_func=loss_func, lr=0.05, cbs=cbs, opt_func=torch.optim.Adam
    )

    def run():  # one optimisation step through the Learner
        learn.fit(1, valid=False)
        sync(dev)
        return learn.loss

    for _ in range(2):  # warm-up and compilation outside the timed rounds
        run()
    benchmark.group = f"stylize step {SIZE}x{SIZE} {extractor} {dev.type}"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["baseline"] = "fp32 eager"
    rounds = 30 if dev.type == "cuda" else (5 if extractor == "fallback" else 3)
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert torch.isfinite(learn.loss)
