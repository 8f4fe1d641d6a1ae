"""Texture-NCA training: seconds per training iteration, the lesson's code vs fastnca, one run.

Workload (the ``texture`` preset): NCA of 12 channels, 96 hidden, 4 filters; a batch of 4 grids of
128 x 128 sampled from a pool of 256; a rollout of 64 steps; loss = overflow + style (Gram) on
VGG16 features relu1_1..relu5_1 of to_rgb(x); backward through all 64 steps, per-parameter
gradient normalisation, Adam step. VGG16 runs with random weights of the real architecture (the
FLOPs of the pretrained network; no download), the same module in every row.

Variants:
  lesson eager             the lesson's SimpleCA (F.pad circular + conv2d perception, 1x1
                           convs, random update mask) and StyleLossToTarget (layer loop over
                           vgg16.features, batch-summed einsum Grams, MSE), eager
  fastnca eager            fastnca.nca.NCA (fused nca_step) + NCACB + TextureLoss (fastnca
                           style_loss), eager
  fastnca compiled         the same with the NCA step compiled once and the style loss compiled
  fastnca compiled + bf16  the same under torch.autocast(bfloat16)

Memory, in extra_info for every row (one extra untimed iteration):
  saved_MB       bytes saved for backward during one iteration (fastnca.nca.saved_tensor_bytes:
                 saved_tensors_hooks, deduplicated by storage): what the 64-step rollout and the
                 loss keep alive until backward
  peak_rss_MB    CPU only (Linux/glibc): growth of the process's peak resident set (VmHWM, reset
                 through /proc/self/clear_refs) over the iteration, measured with every large
                 allocation mmapped (mallopt) so that freed memory leaves the RSS
  peak_cuda_MB   CUDA only: torch.cuda.max_memory_allocated growth over the iteration
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import device, sync
from torchvision.models import vgg16

from fastnca.lesson import LessonCA, LessonStyleLoss, lesson_iteration
from fastnca.nca.config import make_config
from fastnca.nca.model import saved_tensor_bytes
from fastnca.nca.recipe import NCACB, TextureLoss, build_model
from fastnca.style.features import VGG16Features
from fastnca.style.textures import builtin_texture
from fastnca.train.callbacks import GradNormCB

pytestmark = pytest.mark.train

LAYERS = (1, 6, 11, 18, 25)
VARIANTS = ["lesson eager", "fastnca eager", "fastnca compiled", "fastnca compiled + bf16"]
# fastnca bench --quick (FASTNCA_BENCH_QUICK=1) runs the small workload at 32x32, 8 steps.
_S, _N = (32, 8) if os.environ.get("FASTNCA_BENCH_QUICK") == "1" else (64, 16)
WORKLOADS = [
    pytest.param((_S, _N), marks=pytest.mark.quick, id=f"{_S}x{_S}-{_N}steps"),
    pytest.param((128, 64), id="128x128-64steps"),
]


# ----- the runs -----
def _vgg_state():
    torch.manual_seed(0)
    return vgg16(weights=None).features.state_dict()


def make_run(variant: str, dev: torch.device, size: int, steps: int):
    cfg = make_config("texture", size=size, min_steps=steps, max_steps=steps, seed=0)
    style = builtin_texture("scales", size).to(dev)
    torch.manual_seed(0)
    if variant == "lesson eager":
        vgg = vgg16(weights=None).features.to(dev).requires_grad_(False).eval()
        vgg.load_state_dict(_vgg_state())
        model = LessonCA(cfg.channels, cfg.hidden, build_model(cfg).filters.clone()).to(dev)
        loss_fn = LessonStyleLoss(vgg, style)
        pool = torch.zeros(cfg.pool, cfg.channels, size, size, device=dev)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

        def run():
            loss = lesson_iteration(model, loss_fn, pool, opt, cfg.batch, steps)
            sync(dev)
            return loss

        return run
    compiled, bf16 = "compiled" in variant, "bf16" in variant
    model = build_model(cfg).to(dev)
    feats = VGG16Features(LAYERS, weights=_vgg_state(), verbose=False).to(dev)
    loss_func = TextureLoss(style, feats, "gram")
    if compiled:
        loss_func = torch.compile(loss_func)
    cb = NCACB(cfg, size=size, min_steps=steps, max_steps=steps, compile=compiled)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    learn = SimpleNamespace(
        model=model, loss_func=loss_func, training=True, opt=opt, scaler=None, accelerator=None
    )
    cb.before_fit(learn)
    gradnorm = GradNormCB()

    def run():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            cb.predict(learn)
            cb.get_loss(learn)
        learn.loss.backward()
        gradnorm.after_backward(learn)
        opt.step()
        opt.zero_grad()
        sync(dev)
        return learn.loss

    return run


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _glibc():
    """glibc's malloc controls (None elsewhere). Freed large CPU tensors stay in the heap under
    glibc's dynamic mmap threshold, so RSS would not show a later iteration's peak; measuring
    with a small fixed threshold (every large tensor its own mmap, unmapped when freed) after a
    malloc_trim does."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3


def measure_memory(run, dev: torch.device) -> dict:
    """saved_MB (bytes saved for backward, by storage) and the peak growth of one iteration."""
    out = {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        libc = _glibc()
        base = None
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
            libc.malloc_trim(0)
            base = _rss_kb("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
            except OSError:
                base = None
    try:
        _, saved = saved_tensor_bytes(run)
    finally:
        if dev.type == "cpu" and libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's usual threshold after warm-up
    if dev.type == "cuda":
        out["peak_cuda_MB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    elif base is not None:
        out["peak_rss_MB"] = round((_rss_kb("VmHWM") - base) / 1024, 1)
    out["saved_MB"] = round((saved["saved"] + saved["excluded"]) / 2**20, 1)
    return out


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nca_train_iteration(benchmark, variant, workload):
    dev = device()
    size, steps = workload
    run = make_run(variant, dev, size, steps)
    for _ in range(2 if "compiled" in variant else 1):  # warm-up / compilation, untimed
        run()
    mem = measure_memory(run, dev)
    benchmark.group = (
        f"NCA training iteration, texture preset, (4,12,{size},{size}), {steps} steps, {dev.type}"
    )
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info.update(mem)
    benchmark.pedantic(run, rounds=3 if dev.type == "cpu" else 10, iterations=1)
    benchmark.extra_info["s_per_iter"] = round(benchmark.stats.stats.median, 3)
