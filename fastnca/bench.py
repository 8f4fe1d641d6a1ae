"""Benchmark runner behind `fastnca bench`, its pytest plugin, and the ratio gate.

The suites are pytest-benchmark files in ``benchmarks/`` (see ``benchmarks/conftest.py`` for the
conventions: ``benchmark.group``, ``extra_info["variant"]``, baseline variant "lesson eager").
:func:`run_suites` runs them in a subprocess (pytest + this module as a plugin) and returns one row
per benchmark: group, variant, median seconds and the speed-up over the group's baseline variant
measured in the same run (median(baseline) / median(row)), so it holds on a noisy machine.

The plugin (``-p fastnca.bench``, set in ``benchmarks/pytest.ini``) reads two environment variables:
``FASTNCA_BENCH_QUICK=1`` caps every ``benchmark.pedantic`` at :data:`QUICK_ROUNDS` rounds, and
``FASTNCA_BENCH_INJECT_SLOWDOWN=perceive:3[,gram:2]`` makes every gated row (a fastnca path: not
the baseline, not a reference variant "lesson ...", "torch ...", "bmm ...") of a group whose name
contains ``perceive`` take 3x its time inside the timed region (it sleeps 2x the measured call),
which is how the tests prove that the gate fails.

Gate (layer a): a committed baseline ``benchmarks/baselines/<device kind>.json`` holds the speed-up
of every gated row; a run passes when each gated row keeps at least ``fraction`` (default 0.5) of
its recorded speed-up. Layer (b), pytest-benchmark's ``--benchmark-compare-fail=median:PCT`` against
a ``--save``\\ d run, is wired by the command line in ``fastnca/commands/bench.py``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BASELINE_VARIANT = "lesson eager"
SUITES = {"ops": "ops", "train": "train", "all": "ops or train"}
QUICK_ROUNDS = 5
REFERENCE_PREFIXES = ("lesson", "torch", "bmm")
DEFAULT_FRACTION = 0.5
# Rows recorded below this speed-up are not gated: a ratio near 1 is within a shared machine's noise
MIN_GATED_SPEEDUP = 1.2
ENV_QUICK = "FASTNCA_BENCH_QUICK"
ENV_DEVICE = "FASTNCA_BENCH_DEVICE"
ENV_SLOWDOWN = "FASTNCA_BENCH_INJECT_SLOWDOWN"
ENV_THREADS = "FASTNCA_BENCH_THREADS"
ENV_PAIRED = "FASTNCA_BENCH_PAIRED"
PAIRED_KEY = "paired speed-up"
PAIR_BELOW_S = 1.0
_HIDDEN_EXTRA = ("variant", "baseline", "speedup_vs_baseline")
_PYTEST_TALLY = re.compile(r"^\d+ (passed|failed|error|deselected|skipped)")


class BenchError(Exception):
    """Bad input or a run that cannot go on; the CLI turns it into a one-line usage error."""


# ----------------------------------------------------------------------------- pytest plugin


def parse_slowdown(spec: str | None) -> dict[str, float]:
    """ "perceive:3,gram:2" -> {"perceive": 3.0, "gram": 2.0} (group-name substring -> factor)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, factor = part.rpartition(":")
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not sep or not name or not value >= 1:
            raise BenchError(
                f"{ENV_SLOWDOWN} must look like 'perceive:3' (group substring:factor "
                f">= 1, comma-separated), got {part!r}"
            )
        out[name.lower()] = value
    return out


def is_gated(variant: str, baseline: str) -> bool:
    """A fastnca path (a fastnca op or training strategy): neither the group's baseline nor a
    reference variant (a name starting with one of REFERENCE_PREFIXES: the lesson's code or plain
    torch, eager or compiled)."""
    return variant != baseline and not variant.startswith(REFERENCE_PREFIXES)


def _slowed(fn, factor: float):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        time.sleep((factor - 1.0) * (time.perf_counter() - t0))
        return out

    return run


def pytest_configure(config):
    """FASTNCA_BENCH_THREADS=N: torch's intra-op threads for every benchmark of the session."""
    threads = os.environ.get(ENV_THREADS)
    if threads:
        import torch

        torch.set_num_threads(int(threads))


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
    each gated row paired with its group's baseline (``extra_info["paired speed-up"]``; off with
    FASTNCA_BENCH_PAIRED=0)."""
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


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    group: str
    variant: str
    median_s: float
    ratio: float | None  # median(group baseline) / median(this row), same run; None: no baseline
    baseline: str = BASELINE_VARIANT
    extra: dict = field(default_factory=dict)
    rounds: int = 0
    paired: bool = False  # ratio timed interleaved with the baseline (see paired_speedup)

    @property
    def key(self) -> str:
        return f"{self.group} :: {self.variant}"


def rows_from_pytest_json(data: dict) -> list[Row]:
    """pytest-benchmark's JSON -> rows in run order, ratios computed per group."""
    rows = []
    for b in data.get("benchmarks", []):
        ei = dict(b.get("extra_info") or {})
        rows.append(
            Row(
                group=str(b.get("group") or b["name"]),
                variant=str(ei.get("variant", b["name"])),
                median_s=float(b["stats"]["median"]),
                ratio=None,
                baseline=str(ei.get("baseline", BASELINE_VARIANT)),
                extra={k: v for k, v in ei.items() if k not in _HIDDEN_EXTRA},
                rounds=int(b["stats"].get("rounds", 0)),
            )
        )
    for r in rows:
        base = [b for b in rows if b.group == r.group and b.variant == r.baseline]
        if PAIRED_KEY in r.extra:  # timed interleaved with the baseline: the steadier number
            r.ratio, r.paired = float(r.extra.pop(PAIRED_KEY)), True
        elif base and r.median_s > 0:
            r.ratio = base[0].median_s / r.median_s
    return rows


def machine_info(device: str | None = None, threads: int | None = None) -> dict:
    """CPU model, cores, torch threads, versions and the benchmark device (its name on CUDA)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": dev,
    }
    if dev == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    return info


def device_kind(machine: dict) -> str:
    """Baseline file stem: "cpu", or "cuda-" + the card's name slug (cuda-nvidia-h100-80gb-hbm3)."""
    if machine.get("device") != "cuda":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", str(machine.get("device_name", "")).lower()).strip(
        "-"
    )


# ----------------------------------------------------------------------------- ratio gate


def combine_runs(runs: list[list[Row]]) -> list[Row]:
    """Rows of several runs of the same suites -> one row each: the median of the medians and of
    the speed-ups, with the lowest speed-up kept in ``extra["min speed-up"]`` (for baselines)."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for r in runs[0]:
        same = [x for run in runs for x in run if x.key == r.key]
        ratios = [x.ratio for x in same if x.ratio is not None]
        extra = dict(r.extra)
        if ratios and len(ratios) == len(same):
            extra["min speed-up"] = round(min(ratios), 3)
        out.append(
            Row(
                r.group,
                r.variant,
                statistics.median(x.median_s for x in same),
                statistics.median(ratios) if ratios else None,
                r.baseline,
                extra,
                sum(x.rounds for x in same),
                r.paired,
            )
        )
    return out


def make_baseline(
    rows: list[Row], machine: dict, command: str, fraction: float = DEFAULT_FRACTION
) -> dict:
    """Baseline file content: the speed-up of every gated row (the lowest of repeated runs)
    that is a speed-up at all (>= MIN_GATED_SPEEDUP); slower rows are listed, not gated."""
    speedups, not_gated = {}, {}
    for r in rows:
        if r.ratio is None or not is_gated(r.variant, r.baseline):
            continue
        low = float(r.extra.get("min speed-up", r.ratio))
        (speedups if low >= MIN_GATED_SPEEDUP else not_gated)[r.key] = round(low, 3)
    return {
        "device_kind": device_kind(machine),
        "fraction": fraction,
        "min_gated_speedup": MIN_GATED_SPEEDUP,
        "recorded_with": command,
        "machine": machine,
        "speedups": speedups,
        "not_gated": not_gated,
    }


@dataclass
class GateResult:
    ok: bool
    checked: int
    lines: list[str]


def check_gate(rows: list[Row], baseline: dict, fraction: float | None = None) -> GateResult:
    """Each gated row recorded in ``baseline`` must keep ``fraction`` of its recorded speed-up.

    Rows the baseline does not know are listed but not gated; a run that checks no row fails
    (a gate that compares nothing is a misconfigured gate, not a pass).
    """
    frac = float(baseline.get("fraction", DEFAULT_FRACTION) if fraction is None else fraction)
    recorded = baseline.get("speedups", {})
    lines, failed, checked = [], 0, 0
    for r in rows:
        if r.ratio is None or not is_gated(r.variant, r.baseline):
            continue
        if r.key not in recorded:
            why = (
                "recorded below the gated minimum"
                if r.key in baseline.get("not_gated", {})
                else "not in the baseline"
            )
            lines.append(f"  --    {r.key}: {r.ratio:.2f}x ({why}, not gated)")
            continue
        want = frac * float(recorded[r.key])
        checked += 1
        ok = r.ratio >= want
        failed += not ok
        lines.append(
            f"  {'ok  ' if ok else 'FAIL'}  {r.key}: {r.ratio:.2f}x, needs >= {want:.2f}x "
            f"({frac:g} of recorded {float(recorded[r.key]):.2f}x)"
        )
    if checked == 0:
        lines.append("  FAIL  no benchmark of this run is recorded in the baseline: nothing gated")
    ok = failed == 0 and checked > 0
    head = (
        f"ratio gate: {'PASSED' if ok else 'FAILED'} ({checked - failed}/{checked} rows keep "
        f">= {frac:g} of their recorded speed-up over the baseline variant)"
    )
    return GateResult(ok=ok, checked=checked, lines=[head, *lines])


# ----------------------------------------------------------------------------- runner


def find_bench_dir(bench_dir: str | Path | None = None) -> Path:
    """The benchmarks/ folder of a source checkout (next to the package, else under the cwd)."""
    candidates = (
        [Path(bench_dir)]
        if bench_dir
        else [Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"]
    )
    for c in candidates:
        if (c / "pytest.ini").is_file():
            return c
    raise BenchError(
        f"benchmark suites not found (looked for pytest.ini in "
        f"{', '.join(map(str, candidates))}); run from a fastnca source checkout "
        f"installed with pip install -e ."
    )


def saved_runs(storage: Path, name: str) -> list[Path]:
    """pytest-benchmark files saved with --benchmark-save=NAME (NNNN_NAME.json), oldest first."""
    return sorted(storage.glob(f"*/[0-9][0-9][0-9][0-9]_{name}.json"), key=lambda p: p.name)


def build_pytest_command(
    bench_dir: Path,
    markexpr: str,
    json_out: Path,
    keyword: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-c",
        str(bench_dir / "pytest.ini"),
        "--rootdir",
        str(bench_dir),
        "-p",
        "fastnca.bench",
        "-p",
        "no:cacheprovider",
        "-m",
        markexpr,
        "-q",
        "-rs",
        "--benchmark-quiet",
        "--benchmark-json",
        str(json_out),
    ]
    if keyword:
        cmd += ["-k", keyword]
    return cmd + list(extra_args)


def run_suites(
    suite: str = "all",
    quick: bool = False,
    device: str | None = None,
    threads: int | None = None,
    keyword: str | None = None,
    bench_dir: str | Path | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict | None = None,
    echo=print,
) -> tuple[list[Row], int]:
    """Run the chosen suites through pytest-benchmark; return (rows, pytest exit code)."""
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    bench_dir = find_bench_dir(bench_dir)
    markexpr = f"({SUITES[suite]})" + (" and quick" if quick else "")
    run_env = dict(os.environ if env is None else env)
    run_env.pop("TRITON_INTERPRET", None)  # benchmarks time the real kernels
    parse_slowdown(run_env.get(ENV_SLOWDOWN))  # fail early on a malformed spec
    run_env[ENV_QUICK] = "1" if quick else "0"
    if device:
        run_env[ENV_DEVICE] = device
    if threads:
        run_env[ENV_THREADS] = run_env["OMP_NUM_THREADS"] = run_env["MKL_NUM_THREADS"] = str(
            threads
        )
    with tempfile.TemporaryDirectory(prefix="fastnca-bench-") as tmp:
        json_out = Path(tmp) / "pytest-benchmark.json"
        cmd = build_pytest_command(bench_dir, markexpr, json_out, keyword, extra_args)
        echo(f"fastnca bench: pytest {' '.join(cmd[3:])}")
        proc = subprocess.Popen(
            cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        hide = False  # the conftest's own summary repeats our table: not shown
        for line in proc.stdout:
            if line.startswith("=") or _PYTEST_TALLY.match(line):
                hide = "fastnca: median time" in line
            if not hide:
                echo(line.rstrip("\n"))
        rc = proc.wait()
        data = json.loads(json_out.read_text()) if json_out.is_file() else {}
    return rows_from_pytest_json(data), rc
