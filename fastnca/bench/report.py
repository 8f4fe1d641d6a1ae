"""Reporting for `fastnca bench`: the terminal table, markdown, JSON and the bar-chart PNG.

Rows come from :func:`fastnca.bench.rows.rows_from_pytest_json`; every speed-up is median(baseline
variant) / median(row) within one run (one thread count). Rows with a FLOP count also show achieved
GFLOP/s and its % of the run's torch.mm rate; CUDA rows on a known card their % of the roofline
floor (``fastnca.bench.gpu_hw``); an unknown card is named as having no floor.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from fastnca._io import atomic_path
from fastnca.bench.rows import BenchError, Row, device_kind, is_gated


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:8.3f} s "
    if s >= 1e-3:
        return f"{s * 1e3:8.2f} ms"
    return f"{s * 1e6:8.1f} us"


def _fmt_extra(extra: dict) -> str:
    return "  ".join(f"{k}={v}" for k, v in extra.items())


def threads_text(t) -> str:
    """machine["threads"]: 1 -> "1", [1, 2] -> "1 and 2"."""
    if isinstance(t, (list, tuple)):
        return ", ".join(map(str, t[:-1])) + f" and {t[-1]}" if len(t) > 1 else str(t[0])
    return str(t)


def _threads(t: int | None) -> str:
    return f"{t} thread{'s' * (t != 1)}" if t else ""


def _groups(rows: list[Row]) -> dict[tuple[str, int | None], list[Row]]:
    """Rows by (group, thread count), in run order."""
    groups: dict[tuple[str, int | None], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.group, r.threads), []).append(r)
    return groups


def _rate(r: Row) -> str:
    """ "12.3 GFLOP/s (45% mm)" where the suite gave the row's FLOPs."""
    if r.gflops is None:
        return ""
    pct = f" ({r.pct_mm:.0f}% mm)" if r.pct_mm is not None else ""
    return f"{r.gflops:.1f} GFLOP/s{pct}"


def _floor(r: Row) -> str:
    return f"{r.pct_floor:.0f}% of floor" if r.pct_floor is not None else ""


def rate_notes(rows: list[Row], machine: dict | None = None) -> list[str]:
    """Lines saying what the rate columns compare with: the mm rate per thread count, the card."""
    out = []
    mm = {r.threads: r.mm_gflops for r in rows if r.mm_gflops}
    if mm:
        what = "GPU" if (machine or {}).get("device") == "cuda" else "float32"
        per = ", ".join(f"{v:.1f} GFLOP/s" + (f" at {_threads(t)}" if t else "")
                        for t, v in mm.items())  # fmt: skip
        out.append(f"torch.mm 2048x2048 {what} in this run (lowest of 3): {per}")
    if (machine or {}).get("device") == "cuda":
        from fastnca.bench.gpu_hw import card_for

        name = str(machine.get("device_name", ""))
        card = card_for(name)
        out.append(
            f"roofline floors: {card.name} peaks (fastnca/bench/gpu_hw.py); CUDA events, L2 "
            "flushed before every call"
            if card
            else f"no roofline floor: {name!r} is not a card in fastnca/bench/gpu_hw.py"
        )
    return out


def format_table(rows: list[Row], machine: dict | None = None) -> str:
    """One readable table: per group and thread count, each variant's median, speed-up over the
    baseline, and where known GFLOP/s (% of the run's mm rate) and % of the roofline floor."""
    if not rows:
        return "(no benchmarks ran)"
    width = max(24, *(len(r.variant) + 2 for r in rows))
    lines = [
        f"{'group / variant':<{width}}  {'median':>11}  {'speed-up':>9}  (vs baseline, same run; "
        "* = timed alternately with the baseline)",
        *rate_notes(rows, machine),
    ]
    for (group, threads), rs in _groups(rows).items():
        at = f"{_threads(threads)}; " if threads else ""
        lines.append(f"{group}   [{at}baseline: {rs[0].baseline}]")
        for r in rs:
            ratio = f"{r.ratio:7.2f}x" if r.ratio is not None else "     n/a"
            ratio += "*" if r.paired else " "
            extra = "  ".join(filter(None, (_rate(r), _floor(r), _fmt_extra(r.extra))))
            lines.append(
                f"  {r.variant:<{width - 2}}  {_fmt_time(r.median_s):>11}  {ratio}"
                + (f"  {extra}" if extra else "")
            )
    return "\n".join(lines)


def format_markdown(rows: list[Row], machine: dict, command: str) -> str:
    """Markdown: the machine and the command that produced it, then one table row per benchmark."""
    dev = machine.get("device_name") or machine.get("device")
    out = [
        f"Measured with `{command}` on {machine['cpu']} ({machine['cores']} cores, "
        f"{threads_text(machine.get('threads', '?'))} torch threads), device "
        f"{dev}; torch {machine['torch']}, triton {machine['triton']}, Python {machine['python']}.",
        "Speed-up = median time of the group's baseline / the row's, in the same run; * = the "
        "row's rounds and the baseline's were timed alternately (paired), so machine load hits "
        "both alike.",
        *(line + "." for line in rate_notes(rows, machine)),
        "",
        "| group | threads | variant | median | speed-up vs baseline | GFLOP/s (% of mm) "
        "| % of floor | notes |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for (group, threads), rs in _groups(rows).items():
        for i, r in enumerate(rs):
            ratio = (f"{r.ratio:.2f}x" if r.ratio is not None else "n/a") + "*" * r.paired
            note = _fmt_extra(r.extra) + (" (baseline)" if r.variant == r.baseline else "")
            out.append(
                f"| {group if i == 0 else ''} | {threads or ''} | {r.variant} "
                f"| {_fmt_time(r.median_s).strip()} | {ratio} | {_rate(r).replace(' GFLOP/s', '')} "
                f"| {_floor(r).replace(' of floor', '')} | {note.strip()} |"
            )
    return "\n".join(out) + "\n"


def results_json(rows: list[Row], machine: dict, command: str, gate: dict | None = None) -> dict:
    return {
        "fastnca_bench": 1,
        "command": command,
        "machine": machine,
        "device_kind": device_kind(machine),
        "rows": [
            {
                "group": r.group,
                "variant": r.variant,
                "median_s": r.median_s,
                "speedup": r.ratio,
                "baseline": r.baseline,
                "rounds": r.rounds,
                "paired": r.paired,
                "threads": r.threads,
                "gflops": r.gflops,
                "mm_gflops": r.mm_gflops,
                "pct_of_mm": r.pct_mm,
                "floor_s": r.floor_s,
                "pct_of_floor": r.pct_floor,
                "extra": r.extra,
            }
            for r in rows
        ],
        "gate": gate,
    }


def plot_ratios(rows: list[Row], path: str | Path, title: str = "") -> Path:
    """Bar chart PNG of each row's speed-up over its group's baseline (1.0 = baseline)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state
    except ImportError as e:
        raise BenchError(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'fastnca[plot]' (or pip install matplotlib)"
        ) from e
    groups = _groups([r for r in rows if r.ratio is not None])
    if not groups:
        raise BenchError("nothing to plot: no group had its baseline variant in this run")
    heights = [0.35 * len(rs) + 0.7 for rs in groups.values()]
    fig = Figure(figsize=(8, sum(heights) + 0.6))
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, ((group, threads), rs) in zip(axes[:, 0], groups.items(), strict=True):
        ratios = [r.ratio for r in rs]
        colors = [
            "0.6"
            if r.variant == r.baseline
            else ("tab:orange" if is_gated(r.variant, r.baseline) else "tab:blue")
            for r in rs
        ]
        ax.barh(range(len(rs)), ratios, color=colors)
        ax.set_yticks(range(len(rs)), [r.variant for r in rs], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        for i, v in enumerate(ratios):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
        ax.set_xlim(0, max(ratios) * 1.25)
        ax.set_title(group + (f" [{_threads(threads)}]" if threads else ""), fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel(
        "speed-up over the group's baseline (same run; higher is faster)\n"
        "grey: baseline, blue: reference code (lesson, torch), orange: fastnca paths",
        fontsize=8,
    )
    if title:
        title = textwrap.fill(title, 110)
        fig.suptitle(title, fontsize=8)
    top = 1 - (0.25 + 0.15 * title.count("\n")) / (sum(heights) + 0.6) if title else 1
    fig.tight_layout(rect=(0, 0, 1, top))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)


def write_json(path: str | Path, content: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=1, default=_json_default) + "\n")
    return Path(path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
