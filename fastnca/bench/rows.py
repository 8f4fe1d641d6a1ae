"""Benchmark rows: one per (workload group, variant), with its speed-up over the group's baseline.

Conventions of every suite (``fastnca/bench/suites/``): ``benchmark.group`` names one workload
(e.g. "perceive fwd+bwd (4,12,128,128)"), ``benchmark.extra_info["variant"]`` the code path
("lesson eager", "lesson compiled", "fastnca", "fastnca compiled", ...). The speed-up of a row is
median(baseline variant) / median(row), both from the same run, so it holds on a noisy machine;
the baseline variant is "lesson eager" unless the group sets ``extra_info["baseline"]``. Rows timed
alternately with their baseline carry a paired speed-up (``PAIRED_KEY``), which is preferred.

Each run (one pytest process) is at one torch thread count; the plugin adds, under the JSON's
``"fastnca"`` key, that count, the rate of ``torch.mm`` (2048 x 2048 float32, lowest time of a few
reps) at that count, and the CUDA card's name. A row whose suite states the FLOPs of one timed call
(``extra_info["flops"]``) reports achieved GFLOP/s and its fraction of that mm rate; on a known
CUDA card (``fastnca.bench.gpu_hw.card_for``) a row stating its bytes (``extra_info["bytes"]``)
and/or FLOPs reports its roofline floor and the % of it the median reaches.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

BASELINE_VARIANT = "lesson eager"
REFERENCE_PREFIXES = ("lesson", "torch", "bmm")
PAIRED_KEY = "paired speed-up"
ENV_SLOWDOWN = "FASTNCA_BENCH_INJECT_SLOWDOWN"
_HIDDEN_EXTRA = (
    "variant",
    "baseline",
    "speedup_vs_baseline",
    "flops",
    "bytes",
    "flop_kind",
    "l2_flush",
)


class BenchError(Exception):
    """Bad input or a run that cannot go on; the CLI turns it into a one-line usage error."""


def is_gated(variant: str, baseline: str) -> bool:
    """A fastnca path (a fastnca op or training strategy): neither the group's baseline nor a
    reference variant (a name starting with one of REFERENCE_PREFIXES: the lesson's code or plain
    torch, eager or compiled)."""
    return variant != baseline and not variant.startswith(REFERENCE_PREFIXES)


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


@dataclass
class Row:
    group: str
    variant: str
    median_s: float
    ratio: float | None  # median(group baseline) / median(this row), same run; None: no baseline
    baseline: str = BASELINE_VARIANT
    extra: dict = field(default_factory=dict)
    rounds: int = 0
    paired: bool = False  # ratio timed interleaved with the baseline (see plugin.paired_speedup)
    threads: int | None = None  # torch intra-op threads of the run that timed it
    flops: float | None = None  # useful FLOPs of one timed call, as the suite counts them
    mm_gflops: float | None = None  # torch.mm 2048^2 float32 GFLOP/s, same run and threads
    floor_s: float | None = None  # roofline floor of one call on this CUDA card (None: unknown)

    @property
    def key(self) -> str:
        return f"{self.group} :: {self.variant}"

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s: the suite's FLOP count of one call / the median time."""
        return self.flops / self.median_s / 1e9 if self.flops and self.median_s > 0 else None

    @property
    def pct_mm(self) -> float | None:
        """Achieved GFLOP/s as % of the machine's torch.mm rate measured in the same run."""
        g = self.gflops
        return 100 * g / self.mm_gflops if g is not None and self.mm_gflops else None

    @property
    def pct_floor(self) -> float | None:
        """% of the roofline floor reached: 100 * floor / median (100 % = at the floor)."""
        return 100 * self.floor_s / self.median_s if self.floor_s and self.median_s > 0 else None


def _floor(ei: dict, run: dict) -> float | None:
    """Roofline floor (s) of one call from the suite's bytes/FLOPs on the run's CUDA card."""
    from fastnca.bench.gpu_hw import card_for, floor_s

    card = card_for(str(run.get("device_name") or "")) if run.get("device") == "cuda" else None
    if card is None or not (ei.get("bytes") or ei.get("flops")):
        return None
    kind = str(ei.get("flop_kind", "ieee"))
    return floor_s(float(ei.get("bytes") or 0), float(ei.get("flops") or 0), card, kind)


def rows_from_pytest_json(data: dict) -> list[Row]:
    """pytest-benchmark's JSON (or its in-session dicts) -> rows in run order, with ratios."""
    rows, run = [], data.get("fastnca") or {}
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
                threads=run.get("threads"),
                flops=float(ei["flops"]) if ei.get("flops") else None,
                mm_gflops=run.get("mm_gflops"),
                floor_s=_floor(ei, run),
            )
        )
    for r in rows:
        base = [b for b in rows if b.group == r.group and b.variant == r.baseline]
        if PAIRED_KEY in r.extra:  # timed interleaved with the baseline: the steadier number
            r.ratio, r.paired = float(r.extra.pop(PAIRED_KEY)), True
        elif base and r.median_s > 0:
            r.ratio = base[0].median_s / r.median_s
    return rows


def combine_runs(runs: list[list[Row]]) -> list[Row]:
    """Rows of several runs of the same suites -> one row each per (thread count, row key): the
    median of the medians and of the speed-ups, with the lowest speed-up kept in
    ``extra["min speed-up"]`` (for baselines). Runs at other thread counts are rows of their own."""
    if len(runs) == 1:
        return runs[0]
    out, seen = [], set()
    for r in (x for run in runs for x in run):
        if (r.threads, r.key) in seen:
            continue
        seen.add((r.threads, r.key))
        same = [x for run in runs for x in run if x.key == r.key and x.threads == r.threads]
        mms = [x.mm_gflops for x in same if x.mm_gflops]
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
                r.threads,
                r.flops,
                statistics.median(mms) if mms else None,
                r.floor_s,
            )
        )
    return out


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), the meaning of ``--threads all``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info(device: str | None = None, threads: int | list[int] | None = None) -> dict:
    """CPU model, cores, torch threads (a list when the run covers several counts), versions and
    the benchmark device (its name on CUDA)."""
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
        "cores": usable_cores(),
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
    name = re.sub(r"[^a-z0-9]+", "-", str(machine.get("device_name", "")).lower())
    return "cuda-" + name.strip("-")
