"""Benchmark rows: one per (workload group, variant), with its speed-up over the group's baseline.

Conventions of every suite (``fastnca/bench/suites/``): ``benchmark.group`` names one workload
(e.g. "perceive fwd+bwd (4,12,128,128)"), ``benchmark.extra_info["variant"]`` the code path
("lesson eager", "lesson compiled", "fastnca", "fastnca compiled", ...). The speed-up of a row is
median(baseline variant) / median(row), both from the same run, so it holds on a noisy machine;
the baseline variant is "lesson eager" unless the group sets ``extra_info["baseline"]``. Rows timed
alternately with their baseline carry a paired speed-up (``PAIRED_KEY``), which is preferred.
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
_HIDDEN_EXTRA = ("variant", "baseline", "speedup_vs_baseline")


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

    @property
    def key(self) -> str:
        return f"{self.group} :: {self.variant}"


def rows_from_pytest_json(data: dict) -> list[Row]:
    """pytest-benchmark's JSON (or its in-session dicts) -> rows in run order, with ratios."""
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
    name = re.sub(r"[^a-z0-9]+", "-", str(machine.get("device_name", "")).lower())
    return "cuda-" + name.strip("-")
