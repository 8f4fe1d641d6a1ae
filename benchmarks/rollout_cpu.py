"""The texture preset's 64-step rollout on CPU: the lesson's module (eager and torch.compile)
against fastnca's NCA (eager and torch.compile), forward+backward and forward only, at each
thread count.

    python benchmarks/rollout_cpu.py                 # 1 thread and all cores, 3 rounds each
    python benchmarks/rollout_cpu.py --threads 2 --rounds 5 --steps 16

Rounds are interleaved (round r runs every variant once, in the same order), so a change of load
hits every variant; each cell is the lowest of the rounds (and the median beside it). GFLOP/s
counts the useful work of the lesson's dense step on every cell, per cell and step:
2*HID*(F*C + C) forward (the MLP) + 2*9*F*C (the stencil), and three times that for
forward+backward; fastnca runs the MLP on the fired cells only, so its GFLOP/s is "work avoided
included" and can pass the machine's rate. The machine's rate is torch.mm of 2048x2048 float32
at the same thread count, lowest of 3 calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from fastnca import NCA
from fastnca.lesson import LessonCA


def mm_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,all", help="comma list of counts; 'all' = every core")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = [cores if t == "all" else int(t) for t in args.threads.split(",")]

    torch.manual_seed(0)
    m = NCA.texture(zero_init=False)
    torch.nn.init.normal_(m.w2.weight, std=0.02)  # a rollout that changes the state
    lesson = LessonCA(m.channels, m.hidden, m.filters, zero_w2=False)
    lesson.load_state_dict({k: v for k, v in m.state_dict().items() if k != "filters"})
    x0 = torch.rand(args.batch, m.channels, args.size, args.size)
    C, F, HID = m.channels, m.filters.shape[0], m.hidden
    flop_fwd = (2 * HID * (F * C + C) + 2 * 9 * F * C) * x0[:, 0].numel() * args.steps
    variants = {
        "lesson eager": lesson,
        "lesson compiled": torch.compile(lesson),
        "fastnca eager": m.step,
        "fastnca compiled": torch.compile(m.step, fullgraph=True),
    }

    def run(step, backward):
        x = x0
        if backward:
            for _ in range(args.steps):
                x = step(x)
            x.square().mean().backward()
        else:
            with torch.no_grad():
                for _ in range(args.steps):
                    x = step(x)

    print(
        f"# {platform.processor() or platform.machine()}, {cores} cores, "
        f"torch {torch.__version__}; "
        f"{args.steps}-step rollout, texture preset (C={C}, HID={HID}, F={F}), "
        f"batch {args.batch}, {args.size}x{args.size}, float32, {args.rounds} interleaved rounds"
    )
    print("| threads | pass | variant | lowest | median | vs lesson eager | GFLOP/s (% of mm) |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for n in counts:
        torch.set_num_threads(n)
        rate = mm_rate()
        for backward in (True, False):
            times = {k: [] for k in variants}
            for step in variants.values():  # warm-up (and compile)
                run(step, backward)
            for _ in range(args.rounds):
                for k, step in variants.items():
                    times[k].append(_timed(lambda s=step, b=backward: run(s, b)))
            base = min(times["lesson eager"])
            flop = flop_fwd * (3 if backward else 1)
            for k, ts in times.items():
                lo = min(ts)
                gf = flop / lo / 1e9
                print(
                    f"| {n} | {'fwd+bwd' if backward else 'fwd'} | {k} | {lo:.3f} s | "
                    f"{statistics.median(ts):.3f} s | {base / lo:.2f}x | "
                    f"{gf:.1f} ({100 * gf / rate:.0f}% of {rate:.1f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
