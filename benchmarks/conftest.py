"""Shared benchmark conventions.

Every benchmark sets ``benchmark.group`` (one workload, e.g. "perceive fwd+bwd (4,12,128,128)") and
``benchmark.extra_info["variant"]`` (e.g. "lesson eager", "lesson compiled", "fastnca",
"fastnca compiled", "fastnca triton"). At the end of the session each row gets
``extra_info["speedup_vs_baseline"]`` = median(baseline variant) / median(row) for its group, where
the baseline variant is "lesson eager" unless the group sets another with
``extra_info["baseline"]``. Ratios are computed within one run, so they hold on a noisy machine.
"""

from __future__ import annotations

import os

import pytest
import torch

BASELINE_VARIANT = "lesson eager"


def device() -> torch.device:
    """Benchmark device: FASTNCA_BENCH_DEVICE, else CUDA when present, else CPU."""
    return torch.device(os.environ.get("FASTNCA_BENCH_DEVICE") or
                        ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def bench_device() -> torch.device:
    return device()


def _ratios(benchmarks):
    groups: dict[str, list] = {}
    for b in benchmarks:
        groups.setdefault(b["group"], []).append(b)
    for rows in groups.values():
        want = rows[0]["extra_info"].get("baseline", BASELINE_VARIANT)
        base = [r for r in rows if r["extra_info"].get("variant") == want]
        for r in rows:
            if base:
                r["extra_info"]["speedup_vs_baseline"] = round(
                    base[0]["stats"]["median"] / r["stats"]["median"], 3)
    return groups


def pytest_benchmark_update_json(config, benchmarks, output_json):
    _ratios(output_json["benchmarks"])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    rows = [b.as_dict(include_data=False) for b in bs.benchmarks if b.has_error is False]
    groups = _ratios(rows)
    tr = terminalreporter
    tr.section("fastnca: median time and speed-up over the lesson's eager code (same run)")
    for g, rs in groups.items():
        tr.write_line(g)
        for r in rs:
            ei = r["extra_info"]
            extra = "".join(f"  {k}={v}" for k, v in ei.items()
                            if k not in ("variant", "speedup_vs_baseline", "baseline"))
            ratio = ei.get("speedup_vs_baseline")
            ratio_s = f"{ratio:6.2f}x" if ratio is not None else "    n/a"
            tr.write_line(f"  {ei.get('variant', r['name']):<24} {r['stats']['median'] * 1e3:10.2f} ms"
                          f"  {ratio_s}{extra}")
