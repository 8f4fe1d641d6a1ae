"""The CI ratio gate: each fastnca path keeps its recorded speed-up over the baseline variant.

A committed baseline ``fastnca/bench/baselines/<device kind>.json`` holds the speed-up of every
gated row (the lowest of ``--repeat`` runs). A run passes when every recorded row is present and
keeps ``max(fraction * recorded, 1.0)`` of it: a row missing from the run fails with its name (a
renamed or deselected benchmark is a hole in the gate, not a pass), and a fastnca path never
passes while slower than the baseline.

Speed-ups are recorded per torch thread count (format 2: ``{"speedups": {"1": {row key:
speed-up}, "2": {...}}}``; a CPU baseline holds 1 thread and all cores), because a path fast on one
core can be flat on two. A format-1 file (``{"speedups": {row key: speed-up}}``) is read as
recorded at its ``machine["threads"]`` (1 for the files written before format 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastnca.bench.rows import BenchError, Row, device_kind, is_gated

DEFAULT_FRACTION = 0.5
# Rows recorded below this speed-up are not gated: a ratio near 1 is within a shared machine's noise
MIN_GATED_SPEEDUP = 1.2


def thread_label(threads: int | None) -> str:
    """Baseline key of a thread count: "1", "2", ...; "default" for a run that set none (CUDA)."""
    return str(threads) if threads else "default"


def baseline_threads(baseline: dict) -> list[int | None]:
    """The thread counts a (loaded) baseline was recorded at, in file order."""
    return [None if t == "default" else int(t) for t in baseline.get("speedups", {})]


def make_baseline(
    rows: list[Row], machine: dict, command: str, fraction: float = DEFAULT_FRACTION
) -> dict:
    """Baseline file content: per thread count, the speed-up of every gated row (the lowest of
    repeated runs) that is a speed-up at all (>= MIN_GATED_SPEEDUP); slower rows are listed,
    not gated."""
    speedups: dict[str, dict] = {}
    not_gated: dict[str, dict] = {}
    for r in rows:
        label = thread_label(r.threads)
        speedups.setdefault(label, {})
        not_gated.setdefault(label, {})
        if r.ratio is None or not is_gated(r.variant, r.baseline):
            continue
        low = float(r.extra.get("min speed-up", r.ratio))
        (speedups if low >= MIN_GATED_SPEEDUP else not_gated)[label][r.key] = round(low, 3)
    return {
        "format": 2,
        "device_kind": device_kind(machine),
        "fraction": fraction,
        "min_gated_speedup": MIN_GATED_SPEEDUP,
        "recorded_with": command,
        "machine": machine,
        "speedups": speedups,
        "not_gated": not_gated,
    }


def load_baseline(path: str | Path) -> dict:
    """Read and check a baseline file before any benchmark runs (BenchError says what is wrong)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise BenchError(f"baseline {p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"baseline {p}: not a readable JSON file ({e})") from None
    speedups = data.get("speedups") if isinstance(data, dict) else None
    if isinstance(speedups, dict) and data.get("format", 1) == 1:  # flat: one thread count
        t = (data.get("machine") or {}).get("threads")
        label = thread_label(t if isinstance(t, int) else 1)
        data["speedups"] = speedups = {label: speedups}
        data["not_gated"] = {label: data.get("not_gated") or {}}
    if not isinstance(speedups, dict) or not all(
        isinstance(per, dict) and all(isinstance(v, (int, float)) and v > 0 for v in per.values())
        for per in speedups.values()
    ):
        raise BenchError(
            f"baseline {p}: expected {{'speedups': {{thread count: {{row key: speed-up > 0}}}}}}, "
            f"as written by fastnca bench --write-baseline"
        )
    frac = data.get("fraction", DEFAULT_FRACTION)
    if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise BenchError(f"baseline {p}: fraction must be in (0, 1], got {frac!r}")
    return data


def key_in(by_threads: dict, label: str, key: str) -> bool:
    return key in (by_threads.get(label) or {})


@dataclass
class GateResult:
    ok: bool
    checked: int
    lines: list[str]


def check_gate(rows: list[Row], baseline: dict, fraction: float | None = None) -> GateResult:
    """Every row recorded in ``baseline`` must be in the run and keep ``max(fraction * recorded,
    1.0)`` speed-up. Gated rows the baseline does not know are listed, not gated; a run that
    checks no row fails (a gate that compares nothing is misconfigured, not a pass)."""
    frac = float(baseline.get("fraction", DEFAULT_FRACTION) if fraction is None else fraction)
    recorded = baseline.get("speedups", {})
    by_key = {(thread_label(r.threads), r.key): r for r in rows}
    lines, failed, checked = [], 0, 0
    for label, per in recorded.items():
        at = f"[{label} thr] " if label != "default" else ""
        for key, rec in per.items():
            want = max(frac * float(rec), 1.0)
            r = by_key.get((label, key))
            checked += 1
            if r is None or r.ratio is None:
                failed += 1
                why = "missing from this run" if r is None else "has no speed-up (no baseline)"
                if r is None and not any(thread_label(x.threads) == label for x in rows):
                    why += f" (no run at {label} threads: --threads {label})"
                lines.append(
                    f"  FAIL  {at}{key}: {why} (recorded {float(rec):.2f}x); a renamed or "
                    f"deselected row must be re-recorded with --write-baseline"
                )
                continue
            ok = r.ratio >= want
            failed += not ok
            lines.append(
                f"  {'ok  ' if ok else 'FAIL'}  {at}{key}: {r.ratio:.2f}x, needs >= {want:.2f}x "
                f"(max({frac:g} x recorded {float(rec):.2f}x, 1.0))"
            )
    for r in rows:
        label = thread_label(r.threads)
        if key_in(recorded, label, r.key) or r.ratio is None:
            continue
        if not is_gated(r.variant, r.baseline):
            continue
        why = (
            "recorded below the gated minimum"
            if key_in(baseline.get("not_gated", {}), label, r.key)
            else "not in the baseline"
        )
        at = f"[{label} thr] " if label != "default" else ""
        lines.append(f"  --    {at}{r.key}: {r.ratio:.2f}x ({why}, not gated)")
    if checked == 0:
        lines.append("  FAIL  the baseline records no row: nothing gated")
    ok = failed == 0 and checked > 0
    head = (
        f"ratio gate: {'PASSED' if ok else 'FAILED'} ({checked - failed}/{checked} recorded rows "
        f"present and >= max({frac:g} x recorded, 1.0) speed-up over the baseline variant)"
    )
    return GateResult(ok=ok, checked=checked, lines=[head, *lines])
