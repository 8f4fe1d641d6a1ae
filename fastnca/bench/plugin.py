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
its ``pedantic`` call (how the tests check that every baseline row still exists).
"""

from __future__ import annotations

import functools
import os
import statistics
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
ENV_QUICK = "FASTNCA_BENCH_QUICK"
ENV_THREADS = "FASTNCA_BENCH_THREADS"
ENV_PAIRED = "FASTNCA_BENCH_PAIRED"
ENV_SUMMARY = "FASTNCA_BENCH_SUMMARY"
ENV_DRY = "FASTNCA_BENCH_DRY"


def _slowed(fn, factor: float):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        time.sleep((factor - 1.0) * (time.perf_counter() - t0))
        return out

    return run


def pytest_configure(config):
    import torch

    threads = os.environ.get(ENV_THREADS)
    if threads:
        torch.set_num_threads(int(threads))
    if os.environ.get(ENV_DRY):  # a dry run times nothing, so it compiles nothing either
        torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda m: m)


def paired_speedup(baseline_call, row_call, rounds: int) -> float:
    """Median over ``rounds`` of t(baseline) / t(row), the two timed back to back (order
    alternating), so a change of machine load hits both sides of each ratio alike."""
    ratios = []
    for i in range(max(1, rounds)):
        t = {}
        for name, fn in (("b", baseline_call), ("r", row_call))[:: 1 if i % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
        ratios.append(t["b"] / max(t["r"], 1e-12))
    return statistics.median(ratios)


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
        if is_gated(variant, base):
            for name, factor in slow.items():
                if name in group.lower() and factor > 1:
                    target = _slowed(target, factor)
                    ei["injected_slowdown"] = factor
                    break
        out = original(target, args, kwargs, setup=setup, teardown=teardown, rounds=rounds,
                       warmup_rounds=warmup_rounds, iterations=iterations)  # fmt: skip
        if setup is None and os.environ.get(ENV_PAIRED, "1") == "1":
            call = functools.partial(target, *args, **(kwargs or {}))
            if variant == base:
                _BASELINE_CALLS[group] = call
            elif is_gated(variant, base) and group in _BASELINE_CALLS and _pair(bm):
                ratio = paired_speedup(_BASELINE_CALLS[group], call, rounds)
                ei[PAIRED_KEY] = round(ratio, 3)
        return out

    bm.pedantic = pedantic
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Each row's speed-up over its group's baseline, in the saved JSON too."""
    for b, r in zip(output_json["benchmarks"], rows_from_pytest_json(output_json), strict=True):
        if r.ratio is not None:
            b["extra_info"]["speedup_vs_baseline"] = round(r.ratio, 3)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if os.environ.get(ENV_SUMMARY) == "0" or bs is None or not bs.benchmarks:
        return
    from fastnca.bench.report import format_table

    data = {"benchmarks": [b.as_dict(include_data=False) for b in bs.benchmarks if not b.has_error]}
    terminalreporter.section("fastnca: median time and speed-up over the baseline (same run)")
    terminalreporter.write_line(format_table(rows_from_pytest_json(data)))
