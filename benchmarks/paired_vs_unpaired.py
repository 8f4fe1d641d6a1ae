"""Why a row's speed-up from two separately timed medians and its paired speed-up disagree.

Users saw `fastnca bench --quick` report perceive forward at 2.0x over the lesson from the two
rows' medians and 1.03x paired (the plugin's alternating rounds). This script times the lesson's
``perceive`` and fastnca's side by side under one hypothesis at a time and prints, per condition,
each variant's median, the ratio lesson/fastnca and the minor page faults per call
(``resource.getrusage``):

  blocks keep      pytest-benchmark's way: all rounds of one variant, then the other's, and the
                   previous round's result still alive while the next round runs (pedantic keeps
                   ``result``), so each call must find room for a new output beside the old one
  blocks drop      the same with each result freed before the next call
  blocks drop rev  order: fastnca's block first
  alternating keep / drop   the two variants round by round (the plugin's paired timing drops)
  blocks flush     a 64 MB write before every call, outside the timing (cold caches)
  blocks gap       2 ms of idle before every call (thread-pool wake-up, frequency)
and the whole set again in a process whose glibc never trims or mmaps (``mallopt``), which
removes the page faults of fresh large buffers without changing anything else; at more than one
thread, once more with ``OMP_WAIT_POLICY=PASSIVE`` too (OpenMP workers sleep at once after a
parallel region instead of spinning into the next call, whoever makes it: the thread-pool
hypothesis; fastnca's CPU ops run their parts on a Python thread pool, not on OpenMP).

    .venv/bin/python benchmarks/paired_vs_unpaired.py                 # 1 thread and all cores
    .venv/bin/python benchmarks/paired_vs_unpaired.py --threads 1 --rounds 21 --mode fwd

About two minutes on 2 cores. On a shared machine absolute times move with the load: compare the
ratios and fault counts within one run, and rerun it on a quiet machine before quoting it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPE = (4, 12, 128, 128)  # the quick suite's perceive shape


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _no_trim() -> None:
    """glibc: never return freed heap memory to the OS and never serve a buffer by mmap, so a
    large buffer freed and allocated again is reused instead of faulted in page by page."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers (malloc.h)
    libc.mallopt(m_trim_threshold, 2**30)
    if not libc.mallopt(m_mmap_threshold, 2**30):  # some glibc cap it at 32 MiB
        libc.mallopt(m_mmap_threshold, 2**25)


def worker(threads: int, rounds: int, modes: list[str], no_trim: bool) -> dict:
    if no_trim:
        _no_trim()
    import torch

    torch.set_num_threads(threads)
    flush_buf = torch.empty(64 * 2**20 // 4)  # larger than any L2/L3 slice of these machines
    out = {}
    for mode in modes:
        out.update(_mode(mode, rounds, flush_buf))
    return out


def _mode(mode: str, rounds: int, flush_buf) -> dict:
    import torch

    from fastnca import DEFAULT_FILTERS, perceive
    from fastnca.lesson import lesson_perceive

    out = {}
    x = torch.randn(SHAPE, requires_grad=mode == "fwd+bwd")
    k = DEFAULT_FILTERS

    def make(fn):
        def run():
            if mode == "fwd":
                with torch.no_grad():
                    return fn(x, k)
            y = fn(x, k)
            y.backward(torch.ones_like(y))
            return y

        return run

    fns = {"lesson": make(lesson_perceive), "fastnca": make(perceive)}

    def timed(name, keep, flush=False, gap=0.0):
        if flush:
            flush_buf.fill_(1.0)
        if gap:
            time.sleep(gap)
        f0, t0 = _minflt(), time.perf_counter()
        y = fns[name]()
        t = time.perf_counter() - t0
        faults = _minflt() - f0
        if keep:
            keep.append(y)  # alive during the next call, freed after it (like pedantic)
            del keep[:-1]
        return t, faults

    def blocks(order, keep=False, **kw):
        res = {}
        for name in order:
            held = [None] if keep else None
            for _ in range(2):  # warm-up, as the suites do
                timed(name, held, **kw)
            res[name] = [timed(name, held, **kw) for _ in range(rounds)]
        return res

    def alternating(keep=False):
        res = {n: [] for n in fns}
        held = [None] if keep else None
        for i in range(rounds + 2):
            for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
                t = timed(name, held)
                if i >= 2:
                    res[name].append(t)
        pair = [a[0] / b[0] for a, b in zip(res["lesson"], res["fastnca"], strict=True)]
        return res, statistics.median(pair)

    conds = {
        "blocks keep": (blocks(["lesson", "fastnca"], keep=True), None),
        "blocks drop": (blocks(["lesson", "fastnca"]), None),
        "blocks drop rev": (blocks(["fastnca", "lesson"]), None),
        "alternating keep": alternating(keep=True),
        "alternating drop": alternating(),
        "blocks flush": (blocks(["lesson", "fastnca"], flush=True), None),
        "blocks gap": (blocks(["lesson", "fastnca"], gap=0.002), None),
    }
    for cond, (res, paired) in conds.items():
        med = {n: statistics.median(t for t, _ in r) for n, r in res.items()}
        flt = {n: statistics.median(f for _, f in r) for n, r in res.items()}
        out[f"{mode} | {cond}"] = {
            "lesson ms": med["lesson"] * 1e3,
            "fastnca ms": med["fastnca"] * 1e3,
            "ratio of medians": med["lesson"] / med["fastnca"],
            "paired ratio": paired,
            "faults/call lesson": flt["lesson"],
            "faults/call fastnca": flt["fastnca"],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,all", help="comma list; 'all' = every usable core")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--mode", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    modes = a.mode.split(",")
    if a.worker:
        print(json.dumps(worker(int(a.threads), a.rounds, modes, a.no_trim)))
        return 0
    cores = len(os.sched_getaffinity(0))
    counts = sorted({cores if t == "all" else int(t) for t in a.threads.split(",")})
    load = os.getloadavg()[0]
    print(f"perceive {SHAPE} float32, {a.rounds} rounds, {cores} cores, load average {load:.2f}")
    wait = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"OMP_WAIT_POLICY: {wait} unless the row says passive")
    print(f"{'condition':<42} {'lesson':>9} {'fastnca':>9} {'ratio':>6} {'paired':>6}  faults/call")
    report = {}
    for threads in counts:
        for no_trim, passive in ((False, False), (True, False), (True, True)):
            if passive and threads == 1:
                continue
            cmd = [sys.executable, __file__, "--worker", "--threads", str(threads)]
            cmd += ["--rounds", str(a.rounds), "--mode", a.mode] + ["--no-trim"] * no_trim
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            if passive:
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            res = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True,
                                            check=True).stdout.splitlines()[-1])  # fmt: skip
            tag = f"{threads} thr{' no-trim' if no_trim else ''}{' passive' if passive else ''}"
            for cond, r in res.items():
                report[f"{tag} | {cond}"] = r
                paired = f"{r['paired ratio']:5.2f}x" if r["paired ratio"] else "      "
                print(
                    f"{tag + ' | ' + cond:<42} {r['lesson ms']:7.2f}ms {r['fastnca ms']:7.2f}ms "
                    f"{r['ratio of medians']:5.2f}x {paired}  "
                    f"{r['faults/call lesson']:.0f} / {r['faults/call fastnca']:.0f}"
                )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cores": cores, "load": load, "rows": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
