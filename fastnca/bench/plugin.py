"""pytest plugin of the benchmark suites (``-p fastnca.bench.plugin``); the only module of
fastnca that imports pytest.

Environment variables it reads (set by :func:`fastnca.bench.runner.run_suites`):
``FASTNCA_BENCH_QUICK=1`` caps every ``benchmark.pedantic`` at ``QUICK_ROUNDS`` rounds;
``FASTNCA_BENCH_INJECT_SLOWDOWN=perceive:3[,gram:2]`` makes every gated row of a group whose name
contains ``perceive`` take 3x its time inside the timed region (it sleeps 2x the measured call),
which is how the tests prove that the gate fails; ``FASTNCA_BENCH_THREADS=N`` sets torch's
intra-op threads; ``FASTNCA_BENCH_PAIRED=0`` turns paired timing off; ``FASTNCA_BENCH_SUMMARY=0``
drops the terminal summary (the runner prints its own table); ``FASTNCA_BENCH_DRY=PATH`` times
nothing: each benchmark appends its ``"group :: variant"`` key to the file PATH and is skipped at
its ``pedantic`` call (how the tests check that every baseline row still exists);
``FASTNCA_BENCH_MALLOC=default`` keeps glibc's own trimming (see :func:`steady_allocator`);
``FASTNCA_BENCH_MM=N`` measures the run's matmul rate on N x N (default 2048; 0: not at all).

How a row is timed (the same for its own rounds and for the paired rounds, so the two speed-ups
measure the same thing): the call's result is dropped before the next call (pytest-benchmark's
``pedantic`` would keep it alive across the next round); on CPU with ``time.perf_counter``; on
CUDA with CUDA events (:func:`choose_timer`), the L2 cache flushed before every call by zeroing a
buffer twice its size, outside the timed region (a suite may set ``extra_info["l2_flush"] =
False`` for a compute-bound row). A row whose calls take minor page faults (more than
``FAULTS_SHOWN``, the median per call) reports ``page faults/call``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import statistics
import sys
import time

import pytest

from fastnca.bench.rows import (
    BASELINE_VARIANT,
    ENV_SLOWDOWN,
    PAIRED_KEY,
    is_gated,
    parse_slowdown,
    rows_from_pytest_json,
)

QUICK_ROUNDS = 5
PAIR_BELOW_S = 1.0
FAULTS_SHOWN = 16  # pages (64 KiB): a few faults per call are the allocator's noise
ENV_QUICK = "FASTNCA_BENCH_QUICK"
ENV_THREADS = "FASTNCA_BENCH_THREADS"
ENV_PAIRED = "FASTNCA_BENCH_PAIRED"
ENV_SUMMARY = "FASTNCA_BENCH_SUMMARY"
ENV_DRY = "FASTNCA_BENCH_DRY"
ENV_MALLOC = "FASTNCA_BENCH_MALLOC"
ENV_MM = "FASTNCA_BENCH_MM"
MM_N = 2048  # torch.mm of MM_N x MM_N float32: the run's matmul rate
_RUN: dict = {}  # what this pytest process adds to the JSON under "fastnca" (see rows.py)


def _slowed(fn, factor: float):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        time.sleep((factor - 1.0) * (time.perf_counter() - t0))
        return out

    return run


def steady_allocator() -> str:
    """glibc only: never trim the heap nor serve large buffers by mmap. With glibc's defaults a
    freed buffer of a few MB goes back to the OS and the next call faults it in again page by
    page (zeroed by the kernel), and whether that happens depends on what ran before, not on the
    op: benchmarks/paired_vs_unpaired.py measured 12,000 faults per call and 2x the time for one
    variant in one timing order and none in another. Returns the allocator mode recorded."""
    if os.environ.get(ENV_MALLOC) == "default" or not sys.platform.startswith("linux"):
        return "default"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default"
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers (malloc.h)
    ok = libc.mallopt(m_trim_threshold, 2**30)
    # glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit) on some versions
    ok = ok and (libc.mallopt(m_mmap_threshold, 2**30) or libc.mallopt(m_mmap_threshold, 2**25))
    return "no-trim" if ok else "default"


def pytest_configure(config):
    import torch

    threads = os.environ.get(ENV_THREADS)
    if threads:
        torch.set_num_threads(int(threads))
    if os.environ.get(ENV_DRY):  # a dry run times nothing, so it compiles nothing either
        torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda m: m)
        return
    _RUN.update(
        threads=int(threads) if threads else None,  # None: the run set no thread count
        torch_threads=torch.get_num_threads(),
        malloc=steady_allocator(),
    )


class _EventStamp:
    """One CUDA event recorded now; ``later - earlier`` waits for ``later`` and gives seconds."""

    def __init__(self, cuda):
        self.event = cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: _EventStamp) -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1e3  # elapsed_time is in ms


def choose_timer(device_type: str, cuda=None):
    """(name, timer) for ``device_type``: CUDA events on "cuda" (GPU time between two points of
    the stream, no host clock), ``time.perf_counter`` elsewhere. ``end - start`` of two timer()
    values is seconds either way, so pytest-benchmark's runner and :func:`time_call` use both."""
    if device_type == "cuda":
        if cuda is None:
            import torch

            cuda = torch.cuda
        return "cuda events", functools.partial(_EventStamp, cuda)
    return "perf_counter", lambda: time.perf_counter()


def l2_flush(device) -> object:
    """A call that zeroes a CUDA buffer twice the L2 size (at least 64 MiB): each timed call then
    starts with its data out of L2, the state the roofline floor assumes."""
    import torch

    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    buf = torch.empty(max(2 * l2, 64 * 2**20), dtype=torch.int8, device=device)

    def flush() -> None:  # None: pytest-benchmark reads a setup's return value as arguments
        buf.zero_()

    flush.nbytes = buf.numel()
    return flush


def time_call(fn, timer=None, flush=None) -> float:
    """Seconds of one ``fn()``; ``flush()`` first, outside the timed region."""
    timer = timer or (lambda: time.perf_counter())
    if flush is not None:
        flush()
    start = timer()
    fn()
    return timer() - start


def mm_gflops(device_type: str = "cpu", n: int = MM_N, reps: int = 3, timer=None) -> float:
    """GFLOP/s of torch.mm on (n, n) float32: 2 n^3 FLOPs (n^2 outputs of n multiply-adds each),
    over the lowest time of ``reps`` calls after one warm-up, at the current torch threads."""
    import torch

    a, b = (torch.randn(n, n, device=device_type) for _ in range(2))
    out = torch.empty(n, n, device=device_type)

    def call():
        torch.mm(a, b, out=out)
        if device_type == "cuda":
            torch.cuda.synchronize()

    call()
    best = min(time_call(call, timer) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _bench_device() -> str:
    import torch

    dev = os.environ.get("FASTNCA_BENCH_DEVICE")
    return dev or ("cuda" if torch.cuda.is_available() else "cpu")


def run_info() -> dict:
    """This process's thread count, mm rate and device, measured once (before the first row)."""
    if "mm_gflops" not in _RUN:
        import torch

        dev = _bench_device().split(":")[0]
        _RUN.setdefault("threads", None)
        _RUN.setdefault("torch_threads", torch.get_num_threads())
        _RUN.update(device=dev, timer=choose_timer(dev)[0])
        if dev == "cuda":
            _RUN["device_name"] = torch.cuda.get_device_name()
        n = int(os.environ.get(ENV_MM) or MM_N)
        _RUN["mm_gflops"] = round(mm_gflops(dev, n, timer=choose_timer(dev)[1]), 2) if n else None
        _RUN["mm_n"] = n
    return _RUN


def paired_speedup(baseline_call, row_call, rounds: int, timer=None, flush=None) -> float:
    """Median over ``rounds`` of t(baseline) / t(row), the two timed back to back (order
    alternating), so a change of machine load hits both sides of each ratio alike. Each call is
    timed like the rows' own rounds: same timer, same flush before it, result dropped."""
    ratios = []
    for i in range(max(1, rounds)):
        t = {}
        for name, fn in (("b", baseline_call), ("r", row_call))[:: 1 if i % 2 == 0 else -1]:
            t[name] = time_call(fn, timer, flush)
        ratios.append(t["b"] / max(t["r"], 1e-12))
    return statistics.median(ratios)


def _dropping(fn, faults: list):
    """``fn`` that returns nothing (its result freed before the next call) and appends the minor
    page faults each call took to ``faults``."""

    def run(*args, **kwargs):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn(*args, **kwargs)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    return run


def _pair(bm) -> bool:
    """Pair rows whose rounds are short (< PAIR_BELOW_S): a long round already averages the load
    over its own length, and pairing it would double a slow benchmark's time."""
    return bm.stats is not None and bm.stats.stats.median < PAIR_BELOW_S


_BASELINE_CALLS: dict[str, object] = {}  # group -> the baseline variant's timed call (this file)
_BASELINE_MODULE: list = [None]


@pytest.fixture(autouse=True)
def _fastnca_bench_pedantic(request):
    """Wrap ``benchmark.pedantic``: quick-mode round cap, the injected slowdown, and the speed-up of
    each gated row paired with its group's baseline (``extra_info["paired speed-up"]``)."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    if _BASELINE_MODULE[0] is not request.module:  # groups live in one file: free the last one's
        _BASELINE_CALLS.clear()
        _BASELINE_MODULE[0] = request.module
    bm = request.getfixturevalue("benchmark")
    original = bm.pedantic
    slow = parse_slowdown(os.environ.get(ENV_SLOWDOWN))

    def pedantic(target, args=(), kwargs=None, setup=None, teardown=None, rounds=1,
                 warmup_rounds=0, iterations=1):  # fmt: skip
        if os.environ.get(ENV_QUICK) == "1":
            rounds = min(rounds, QUICK_ROUNDS)
        ei, group = bm.extra_info, str(bm.group)
        variant, base = str(ei.get("variant", "")), ei.get("baseline", BASELINE_VARIANT)
        if os.environ.get(ENV_DRY):
            with open(os.environ[ENV_DRY], "a") as f:
                f.write(f"{group} :: {variant}\t{base}\n")
            pytest.skip("dry run: the row's key was recorded, nothing timed")
        info = run_info()
        _, timer = choose_timer(info["device"])
        flush = None
        if info["device"] == "cuda":
            bm._timer = timer  # pytest-benchmark's runner: end - start of two timer() values
            if ei.get("l2_flush", True) and setup is None and iterations == 1:
                flush = setup = l2_flush(_bench_device())
            ei["l2_flush"] = flush is not None
        faults: list[int] = []
        target = _dropping(target, faults)
        if is_gated(variant, base):
            for name, factor in slow.items():
                if name in group.lower() and factor > 1:
                    target = _slowed(target, factor)
                    ei["injected_slowdown"] = factor
                    break
        out = original(target, args, kwargs, setup=setup, teardown=teardown, rounds=rounds,
                       warmup_rounds=warmup_rounds, iterations=iterations)  # fmt: skip
        flt = statistics.median(faults) if faults else 0
        if flt > FAULTS_SHOWN:
            ei["page faults/call"] = round(flt)
        if (setup is None or setup is flush) and os.environ.get(ENV_PAIRED, "1") == "1":
            call = functools.partial(target, *args, **(kwargs or {}))
            if variant == base:
                _BASELINE_CALLS[group] = call
            elif is_gated(variant, base) and group in _BASELINE_CALLS and _pair(bm):
                t = timer if info["device"] == "cuda" else None
                ratio = paired_speedup(_BASELINE_CALLS[group], call, rounds, t, flush)
                ei[PAIRED_KEY] = round(ratio, 3)
        return out

    bm.pedantic = pedantic
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Each row's speed-up over its group's baseline, in the saved JSON too, and this run's
    thread count, mm rate and device under "fastnca"."""
    if _RUN:
        output_json["fastnca"] = dict(_RUN)
    for b, r in zip(output_json["benchmarks"], rows_from_pytest_json(output_json), strict=True):
        if r.ratio is not None:
            b["extra_info"]["speedup_vs_baseline"] = round(r.ratio, 3)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if os.environ.get(ENV_SUMMARY) == "0" or bs is None or not bs.benchmarks:
        return
    from fastnca.bench.report import format_table

    data = {"benchmarks": [b.as_dict(include_data=False) for b in bs.benchmarks if not b.has_error]}
    data["fastnca"] = dict(_RUN)
    terminalreporter.section("fastnca: median time and speed-up over the baseline (same run)")
    terminalreporter.write_line(format_table(rows_from_pytest_json(data)))
