"""Training strategies through the Learner: samples/s of one workload, one callback changed per row.

One timed round = ``learn.fit(1, valid=False)`` = ``steps`` optimiser steps of ``batch`` samples
(data loading, forward, loss, backward, Adam step), after one untimed warm-up fit (compilation,
Accelerate setup). ``extra_info["samples/s"] = steps * batch / median``.

Rows (group "train <workload> <device>"; baseline "lesson eager" = fp32 eager, the lesson's loop):
  lesson eager            fp32, the workload's training callback only
  MixedPrecision(bf16)    torch.autocast(bfloat16) around predict + loss
  MixedPrecision(fp16)    torch.autocast(float16) + GradScaler (CUDA only: skipped on CPU)
  AccelerateCB(fp32)      HuggingFace Accelerate, mixed_precision="no", one process
  AccelerateCB(bf16)      HuggingFace Accelerate, mixed_precision="bf16", one process
  CompileCB               torch.compile of the model (inductor)
  CompileCB + bf16        both
Group "train <workload> slow loader <ms> ms/batch <device>" (workloads with a data loader): every
loaded batch costs ``slow_ms`` of busy CPU work in the collate (standing for heavy augmentation
on few CPU cores):
  lesson eager            fp32 eager over that loader
  MultDL(2), MultDL(4)    the same loader wrapped in MultDL(dl, k): each batch trains k times, so
                          1/k as many batches are loaded for the same number of steps

Workloads are entries of WORKLOADS (name -> builder(device) -> Workload); each test is
parametrised by ``workload``:
  ddpm   the DDPM UNet on 32x32 SyntheticShapes through ddpm_collate
  nca    one texture-NCA training iteration per step: NCACB pool sampling, a rollout of fused
         nca_steps, overflow + Gram style loss on VGG16 features (real architecture, random
         weights: the FLOPs of the pretrained net, no download), GradNormCB, Adam; the model is
         the NCA, so CompileCB compiles the step (the rollout calls it ``nca_steps`` times)
FASTNCA_BENCH_QUICK=1 (``fastnca bench --quick``) shrinks both workloads on CPU.
Threads: torch's default; on a shared machine pin with OMP_NUM_THREADS=1 and say so
(``fastnca bench --threads 1``, the default with ``--quick``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import device, sync
from torch.utils.data import DataLoader, default_collate

from fastnca.demos.ddpm import SyntheticShapes, UNet, ddpm_collate, ddpm_schedule, linear_betas
from fastnca.train.callbacks import AccelerateCB, CompileCB, DeviceCB, GradNormCB, MixedPrecision
from fastnca.train.data import MultDL, dummy_dls
from fastnca.train.learner import Callback, DataLoaders, Learner

pytestmark = pytest.mark.train
QUICK = os.environ.get("FASTNCA_BENCH_QUICK") == "1"


def spin(ms: float) -> None:
    """Busy CPU work for ``ms`` milliseconds (not a sleep: it occupies a core like real work)."""
    end = time.perf_counter() + ms / 1e3
    x = 0
    while time.perf_counter() < end:
        x += 1


def slow_collate(batch, collate=default_collate, ms: float = 0.0):
    spin(ms)
    return collate(batch)


@dataclass
class Workload:
    """What a strategy row trains. ``make_dls(n_batches, slow_ms)`` returns DataLoaders whose
    train loader yields ``n_batches`` batches, each collate costing ``slow_ms`` of CPU."""

    name: str
    make_model: callable
    make_dls: callable
    loss_func: callable
    batch: int
    steps: int
    lr: float = 1e-3
    slow_ms: float = 0.0
    # extra callbacks (e.g. a workload's training CB), or a function making fresh ones per Learner
    cbs: list | callable = field(default_factory=list)
    info: dict = field(default_factory=dict)


def ddpm_workload(dev: torch.device) -> Workload:
    """The DDPM UNet on 32x32 SyntheticShapes, noised by ddpm_collate. CPU: a reduced UNet and
    batch (bf16 convolutions are slow on CPUs without native bf16)."""
    cuda = dev.type == "cuda"
    nfs, batch, steps = ((32, 64, 128), 128, 20) if cuda else ((16, 32, 64), 16, 4)
    if QUICK and not cuda:
        nfs, batch = (8, 16, 32), 8
    slow_ms = float(os.environ.get("FASTNCA_BENCH_SLOW_MS", 25 if cuda else 100 if QUICK else 250))
    alphabar = ddpm_schedule(linear_betas()).alphabar
    collate = partial(ddpm_collate, alphabar=alphabar)

    def make_dls(n_batches: int, ms: float) -> DataLoaders:
        ds = SyntheticShapes(n_batches * batch, size=32)
        dl = DataLoader(
            ds, batch, shuffle=True, collate_fn=partial(slow_collate, collate=collate, ms=ms)
        )
        return DataLoaders(dl, dl)

    def make_model():
        torch.manual_seed(0)
        return UNet(1, nfs=nfs)

    params = sum(p.numel() for p in make_model().parameters())
    return Workload(
        "ddpm-unet-32x32",
        make_model,
        make_dls,
        F.mse_loss,
        batch,
        steps,
        slow_ms=slow_ms,
        info={"nfs": "x".join(map(str, nfs)), "params": params},
    )


def nca_workload(dev: torch.device) -> Workload:
    """Texture-NCA training (the ``texture`` preset: 12 channels, 96 hidden, distill filters, batch
    4 from a pool): one Learner step = one NCACB iteration. CUDA: 128x128 grids, 64 steps per
    rollout; CPU: 64x64, 16 steps (quick: 32x32, 8 steps, one iteration per round)."""
    from torchvision.models import vgg16

    from fastnca.nca.config import make_config
    from fastnca.nca.recipe import NCACB, TextureLoss, build_model
    from fastnca.style.features import VGG16Features
    from fastnca.style.textures import builtin_texture

    cuda = dev.type == "cuda"
    size, nca_steps, iters = (128, 64, 5) if cuda else (32, 8, 1) if QUICK else (64, 16, 3)
    cfg = make_config("texture", size=size, min_steps=nca_steps, max_steps=nca_steps, pool=32)
    torch.manual_seed(0)
    vgg = vgg16(weights=None).features.state_dict()
    feats = VGG16Features((1, 6, 11, 18, 25), weights=vgg, verbose=False)
    loss = TextureLoss(builtin_texture("scales", size), feats, "gram").to(dev)

    def make_model():
        torch.manual_seed(0)
        return build_model(cfg)

    def make_dls(n_batches: int, ms: float) -> DataLoaders:
        return dummy_dls(n_batches)  # NCACB samples its pool: the loader only counts steps

    def cbs():  # fresh per Learner: NCACB holds the pool
        nca = NCACB(cfg, size=size, min_steps=nca_steps, max_steps=nca_steps, compile=False)
        return [nca, GradNormCB()]

    params = sum(p.numel() for p in make_model().parameters())
    name = f"nca-texture-{size}x{size}-{nca_steps}steps"
    return Workload(
        name,
        make_model,
        make_dls,
        loss,
        cfg.batch,
        iters,
        lr=cfg.lr,
        cbs=cbs,
        info={"params": params},
    )


WORKLOADS = {"ddpm": ddpm_workload, "nca": nca_workload}
WITH_LOADER = ["ddpm"]  # workloads whose data loader the slow-loader rows slow down

STRATEGIES = {
    "lesson eager": lambda: [],
    "MixedPrecision(bf16)": lambda: [MixedPrecision(torch.bfloat16)],
    "MixedPrecision(fp16)": lambda: [MixedPrecision(torch.float16)],
    "AccelerateCB(fp32)": lambda: [AccelerateCB("no")],
    "AccelerateCB(bf16)": lambda: [AccelerateCB("bf16")],
    "CompileCB": lambda: [CompileCB()],
    "CompileCB + bf16": lambda: [CompileCB(), MixedPrecision(torch.bfloat16)],
}
CUDA_ONLY = {"MixedPrecision(fp16)"}  # fp16 autocast + GradScaler: no fp16 training on CPU
SLOW = {"lesson eager": 1, "MultDL(2)": 2, "MultDL(4)": 4}


class SyncCB(Callback):
    """Wait for the device at the end of the fit, so the host clock covers all queued work."""

    order = 100

    def after_fit(self, learn):
        sync(device())


def _fit_fn(wl: Workload, cbs: list, mult: int, slow_ms: float):
    """A no-argument function running one timed round (one fit of ``wl.steps`` steps)."""
    dev = device()
    dls = wl.make_dls(wl.steps // mult, slow_ms)
    if mult > 1:
        dls.train = MultDL(dls.train, mult)
    extra = wl.cbs() if callable(wl.cbs) else wl.cbs
    learn = Learner(
        wl.make_model(),
        dls,
        wl.loss_func,
        lr=wl.lr,
        cbs=[DeviceCB(dev), *extra, *cbs, SyncCB()],
        opt_func=torch.optim.Adam,
    )
    return partial(learn.fit, 1, valid=False)


def _run(benchmark, wl: Workload, group: str, variant: str, cbs: list, mult: int, slow_ms: float):
    dev = device()
    fit = _fit_fn(wl, cbs, mult, slow_ms)
    fit()  # warm-up: compilation, Accelerate preparation, allocator
    benchmark.group = group
    benchmark.extra_info["variant"] = variant
    benchmark.pedantic(fit, rounds=3 if dev.type == "cpu" else 5, iterations=1)
    med = benchmark.stats.stats.median
    benchmark.extra_info["samples/s"] = round(wl.steps * wl.batch / med, 1)
    benchmark.extra_info["steps"] = wl.steps
    benchmark.extra_info["batch"] = wl.batch
    benchmark.extra_info.update(wl.info)


@pytest.mark.parametrize("workload", [pytest.param(w, marks=pytest.mark.quick) for w in WORKLOADS])
@pytest.mark.parametrize("variant", list(STRATEGIES))
def test_strategy(benchmark, workload, variant):
    if variant in CUDA_ONLY and device().type != "cuda":
        pytest.skip(f"{variant}: CUDA only")
    wl = WORKLOADS[workload](device())
    _run(
        benchmark,
        wl,
        f"train {wl.name} {device().type}",
        variant,
        STRATEGIES[variant](),
        mult=1,
        slow_ms=0.0,
    )


@pytest.mark.parametrize(
    "workload", [pytest.param(w, marks=pytest.mark.quick) for w in WITH_LOADER]
)
@pytest.mark.parametrize("variant", list(SLOW))
def test_slow_loader(benchmark, workload, variant):
    wl = WORKLOADS[workload](device())
    group = f"train {wl.name} slow loader {wl.slow_ms:g} ms/batch {device().type}"
    _run(benchmark, wl, group, variant, [], mult=SLOW[variant], slow_ms=wl.slow_ms)
    benchmark.extra_info["slow_ms"] = wl.slow_ms


def main(argv=None) -> int:
    """Interleaved timing: every variant's rounds alternate (round r of all rows, then r+1), so a
    change of machine load hits all rows alike:
    ``python fastnca/bench/suites/bench_strategies.py``."""
    import argparse
    import statistics

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--workload", default="ddpm", choices=sorted(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    wl = WORKLOADS[args.workload](device())
    dev = device().type
    runnable = [v for v in STRATEGIES if v not in CUDA_ONLY or dev == "cuda"]
    rows = [(f"{v}", STRATEGIES[v](), 1, 0.0) for v in runnable]
    if args.workload in WITH_LOADER:
        rows += [(f"slow loader: {v}", [], m, wl.slow_ms) for v, m in SLOW.items()]
    fits = {}
    for name, cbs, mult, ms in rows:
        fits[name] = _fit_fn(wl, cbs, mult, ms)
        fits[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fits}
    for _ in range(args.rounds):
        for name, fit in fits.items():
            t0 = time.perf_counter()
            fit()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{wl.name} on {device().type}: {wl.steps} steps x batch {wl.batch} per round, "
        f"median of {args.rounds} interleaved rounds, slow loader {wl.slow_ms:g} ms/batch"
    )
    print("| variant | median s/round | samples/s | vs fp32 eager |\n|---|---:|---:|---:|")
    for name in fits:
        base = med["slow loader: lesson eager" if name.startswith("slow") else "lesson eager"]
        print(
            f"| {name} | {med[name]:.3f} | {wl.steps * wl.batch / med[name]:.1f} | "
            f"{base / med[name]:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
