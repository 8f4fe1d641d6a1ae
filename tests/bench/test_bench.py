"""`fastnca bench`: CLI errors, table/JSON/markdown/plot, and the ratio gate.

The gate is proven twice: on synthetic pytest-benchmark JSON, and on a real run of a tiny fake suite
(sleep-based, so its speed-up is known) where FASTNCA_BENCH_INJECT_SLOWDOWN must make it fail.
"""

import json
import sys
import textwrap

import pytest
import torch

from fastnca.bench import gate, plugin, runner
from fastnca.bench import report as bench_report
from fastnca.bench.rows import (
    BenchError,
    combine_runs,
    device_kind,
    is_gated,
    parse_slowdown,
    rows_from_pytest_json,
)
from fastnca.cli import main


def _pytest_json(medians: dict, group="perceive fwd (4, 12, 128, 128) float32 cpu", baseline=None):
    """pytest-benchmark-shaped JSON: one benchmark per {variant: median seconds}."""
    out = []
    for variant, median in medians.items():
        ei = {"variant": variant, "GB/s": 1.5} if variant == "fastnca" else {"variant": variant}
        if baseline:
            ei["baseline"] = baseline
        out.append(
            {
                "group": group,
                "name": f"test[{variant}]",
                "extra_info": ei,
                "stats": {"median": median, "rounds": 5},
            }
        )
    return {"benchmarks": out}


MEDIANS = {
    "lesson eager": 0.030,
    "lesson compiled": 0.020,
    "bmm eager": 0.025,
    "fastnca": 0.010,
    "fastnca compiled": 0.015,
    "fastnca triton": 0.028,
}


def test_rows_ratios_and_custom_baseline():
    rows = rows_from_pytest_json(_pytest_json(MEDIANS))
    assert [r.variant for r in rows] == list(MEDIANS)
    assert [round(r.ratio, 6) for r in rows] == [1.0, 1.5, 1.2, 3.0, 2.0, round(30 / 28, 6)]
    assert rows[3].extra == {"GB/s": 1.5} and rows[3].rounds == 5
    strat = rows_from_pytest_json(
        _pytest_json(
            {"fp32 eager": 2.0, "MixedPrecision bf16": 1.0}, group="ddpm", baseline="fp32 eager"
        )
    )
    assert [r.ratio for r in strat] == [1.0, 2.0]
    # A group without its baseline variant has no ratio (and is never gated).
    alone = rows_from_pytest_json(_pytest_json({"fastnca": 1.0}))
    assert alone[0].ratio is None


def test_gate_fails_on_slowdown_and_passes_without():
    rows = rows_from_pytest_json(_pytest_json(MEDIANS))
    machine = {"device": "cpu", "cpu": "test", "cores": 2}
    base = gate.make_baseline(rows, machine, "fastnca bench --quick")
    # Only fastnca paths are gated (not the baseline, the lesson's compiled code or another
    # reference variant), and only where there is a speed-up to keep (>= 1.2x when recorded).
    g = "perceive fwd (4, 12, 128, 128) float32 cpu :: "
    # (speed-ups per thread count: "default" for rows of a run that set none)
    assert base["speedups"] == {"default": {g + "fastnca": 3.0, g + "fastnca compiled": 2.0}}
    assert base["not_gated"] == {"default": {g + "fastnca triton": round(30 / 28, 3)}}
    assert base["device_kind"] == "cpu" and base["fraction"] == 0.5
    ok = gate.check_gate(rows, base)
    assert ok.ok and ok.checked == 2 and "PASSED" in ok.lines[0]
    # Noise: the fastnca row 1.8x slower still keeps > 50 % of its 3x speed-up.
    noisy = rows_from_pytest_json(_pytest_json({**MEDIANS, "fastnca": 0.018}))
    assert gate.check_gate(noisy, base).ok
    # Injected slowdown: 3x slower keeps only 1/3 of the speed-up -> FAIL naming the row.
    slow = rows_from_pytest_json(_pytest_json({**MEDIANS, "fastnca": 0.030}))
    res = gate.check_gate(slow, base)
    assert not res.ok and "FAILED" in res.lines[0]
    assert any(
        line.startswith("  FAIL")
        and line.endswith("x recorded 3.00x, 1.0))")
        and ":: fastnca:" in line
        for line in res.lines
    )
    # A stricter fraction fails the noisy run.
    assert not gate.check_gate(noisy, base, fraction=0.9).ok
    # Blind spot 1: recorded rows missing from the run (renamed, deselected) fail, by name.
    other = rows_from_pytest_json(_pytest_json(MEDIANS, group="gram (8, 64, 32, 32)"))
    res = gate.check_gate(other, base)
    assert not res.ok and res.checked == 2
    assert sum("missing from this run" in x and x.startswith("  FAIL") for x in res.lines) == 2
    assert any("not in the baseline" in x for x in res.lines)
    partial = [r for r in rows if r.variant != "fastnca compiled"]
    res = gate.check_gate(partial, base)
    assert not res.ok and any(g + "fastnca compiled: missing" in x for x in res.lines)
    # Blind spot 2: a low fraction never lets a fastnca path pass while slower than the baseline.
    slower = rows_from_pytest_json(_pytest_json({**MEDIANS, "fastnca": 0.040}))  # 0.75x
    res = gate.check_gate(slower, base, fraction=0.2)  # 0.2 x 3.0 = 0.6x would have passed
    assert not res.ok and any("needs >= 1.00x" in x and x.startswith("  FAIL") for x in res.lines)
    assert any(
        "fastnca triton: " in x and "below the gated minimum" in x
        for x in gate.check_gate(rows, base).lines
    )


def test_paired_speedup_preferred(monkeypatch):
    """A row timed alternately with its baseline reports that ratio (steadier under load)."""
    clock, order = [0.0], []

    def call(name, cost):
        def run():
            order.append(name)
            clock[0] += cost

        return run

    monkeypatch.setattr(plugin.time, "perf_counter", lambda: clock[0])  # a clock the calls move
    ratio = plugin.paired_speedup(call("base", 6.0), call("row", 2.0), rounds=3)
    assert ratio == 3.0 and order == ["base", "row", "row", "base", "base", "row"]
    data = _pytest_json(MEDIANS)
    data["benchmarks"][3]["extra_info"]["paired speed-up"] = 2.5
    rows = rows_from_pytest_json(data)
    assert rows[3].ratio == 2.5 and rows[3].paired and "paired speed-up" not in rows[3].extra
    assert not rows[4].paired and rows[4].ratio == pytest.approx(2.0)
    assert "    2.50x*" in bench_report.format_table(rows)


def test_combine_runs_median_and_min():
    runs = [
        rows_from_pytest_json(_pytest_json({**MEDIANS, "fastnca": m}))
        for m in (0.010, 0.015, 0.006)
    ]
    rows = combine_runs(runs)
    fast = rows[3]
    assert fast.median_s == pytest.approx(0.010) and fast.ratio == pytest.approx(3.0)
    assert fast.extra["min speed-up"] == 2.0 and fast.rounds == 15
    # The baseline records the lowest speed-up of the repeats: not a lucky run.
    base = gate.make_baseline(rows, {"device": "cpu"}, "cmd")
    assert (
        base["speedups"]["default"]["perceive fwd (4, 12, 128, 128) float32 cpu :: fastnca"] == 2.0
    )
    assert combine_runs(runs[:1]) is runs[0]


def test_device_kind_and_slowdown_spec():
    assert is_gated("fastnca compiled", "lesson eager")
    assert is_gated("MultDL(2)", "lesson eager")  # a strategy is a fastnca path
    for ref in ("lesson eager", "lesson compiled", "bmm eager", "torch.mm"):
        assert not is_gated(ref, "lesson eager")
    assert not is_gated("fp32 eager", "fp32 eager")
    assert device_kind({"device": "cpu"}) == "cpu"
    kind = device_kind({"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"})
    assert kind == "cuda-nvidia-h100-80gb-hbm3"
    assert parse_slowdown("perceive:3, Gram:1.5") == {"perceive": 3.0, "gram": 1.5}
    assert parse_slowdown("") == {}
    for bad in ("perceive", "perceive:x", "perceive:0.5", ":3"):
        with pytest.raises(BenchError, match="FASTNCA_BENCH_INJECT_SLOWDOWN"):
            parse_slowdown(bad)


def test_table_markdown_json_plot(tmp_path):
    rows = rows_from_pytest_json(_pytest_json(MEDIANS))
    table = bench_report.format_table(rows)
    assert "perceive fwd (4, 12, 128, 128) float32 cpu   [baseline: lesson eager]" in table
    assert any(
        line.split()[:4] == ["fastnca", "10.00", "ms", "3.00x"] for line in table.splitlines()
    )
    assert "GB/s=1.5" in table
    machine = {
        "cpu": "Test CPU",
        "cores": 2,
        "threads": 1,
        "torch": "2.x",
        "triton": "3.x",
        "python": "3.x",
        "device": "cpu",
    }
    md = bench_report.format_markdown(rows, machine, "fastnca bench --quick")
    assert "`fastnca bench --quick`" in md and "Test CPU (2 cores, 1 torch threads)" in md
    assert "| lesson eager | 30.00 ms | 1.00x |  |  | (baseline) |" in md
    data = bench_report.results_json(rows, machine, "cmd")
    path = bench_report.write_json(tmp_path / "sub" / "r.json", data)
    back = json.loads(path.read_text())
    assert back["device_kind"] == "cpu" and back["rows"][3]["speedup"] == pytest.approx(3.0)
    png = bench_report.plot_ratios(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    rows = rows_from_pytest_json(_pytest_json(MEDIANS))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(BenchError, match=r"pip install 'fastnca\[plot\]'"):
        bench_report.plot_ratios(rows, tmp_path / "r.png")
    assert main(["bench", "--plot", str(tmp_path / "x.png")]) == 2


def _one_line_error(capsys, argv, match):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastnca bench: error: ")
    assert match in err, err


def test_cli_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, ["--suite", "gpu"], "unknown suite 'gpu'; expected one of ops, train")
    _one_line_error(capsys, ["--device", "tpu"], "--device: 'tpu' cannot be benchmarked")
    _one_line_error(capsys, ["--fail-above", "5"], "--fail-above needs --compare NAME")
    _one_line_error(capsys, ["--compare", "main", "--fail-above", "-1"], "percentage > 0")
    _one_line_error(capsys, ["--gate", "--min-fraction", "2"], "--min-fraction must be in (0, 1]")
    _one_line_error(capsys, ["--repeat", "0"], "--repeat: expected a positive integer, got '0'")
    _one_line_error(
        capsys, ["--threads", "0"], "--threads: expected a positive integer or 'all', got '0'"
    )
    _one_line_error(capsys, ["--compare", "nosuch"], "no run saved as 'nosuch'")
    _one_line_error(
        capsys, ["--gate", "--baseline", "missing.json"], "no baseline file missing.json"
    )
    _one_line_error(capsys, ["--bench-dir", str(tmp_path)], "benchmark suites not found")
    (tmp_path / "bad.json").write_text('{"speedups": {"x :: fastnca": "fast"}}')
    _one_line_error(capsys, ["--gate", "--baseline", "bad.json"], "--gate: baseline bad.json")
    monkeypatch.setenv("FASTNCA_BENCH_INJECT_SLOWDOWN", "perceive=3")
    _one_line_error(capsys, ["--quick"], "must look like 'perceive:3'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["--device", "cuda"], "CUDA is not available on this machine")


FAKE_SUITE = """
import time

import pytest

pytestmark = pytest.mark.ops
DELAY = {"lesson eager": 0.012, "lesson compiled": 0.012, "fastnca": 0.002}


@pytest.mark.parametrize("size", [pytest.param("small", marks=pytest.mark.quick), "big"])
@pytest.mark.parametrize("variant", list(DELAY))
def test_fake(benchmark, variant, size):
    benchmark.group = f"fake op {size}"
    benchmark.extra_info["variant"] = variant
    benchmark.pedantic(time.sleep, args=(DELAY[variant],), rounds=9, iterations=1)
"""


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    suite = tmp_path / "benchmarks"
    suite.mkdir()
    (suite / "bench_fake.py").write_text(textwrap.dedent(FAKE_SUITE))
    ini = (runner.find_bench_dir() / "pytest.ini").read_text()
    (suite / "pytest.ini").write_text(ini)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTNCA_BENCH_INJECT_SLOWDOWN", raising=False)
    monkeypatch.setenv("FASTNCA_BENCH_MM", "128")  # a small matmul rate: the path, not the number
    return suite


def test_real_run_gate_and_compare(fake_suite, tmp_path, capsys, monkeypatch):
    """Record a baseline + saved run, pass the gate, then fail both layers on a 4x slowdown."""
    common = [
        "bench",
        "--bench-dir",
        str(fake_suite),
        "--quick",
        "--suite",
        "ops",
        "--device",
        "cpu",
        "--baseline",
        "base.json",
    ]
    argv = [*common, "--write-baseline", "--repeat", "2", "--save", "ref", "--json", "a.json"]
    argv += ["--threads", "1"]  # (without it: 1 thread and all cores, tests/bench/test_threads.py)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fake op small   [1 thread; baseline: lesson eager]" in out and "fake op big" not in out
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["speedups"] == {"1": {"fake op small :: fastnca": pytest.approx(6, rel=0.5)}}
    assert base["format"] == 2  # quick subset, gated row only, at 1 thread; 12 ms / 2 ms
    assert base["recorded_with"].startswith("fastnca bench --quick --write-baseline --suite ops")
    assert "--threads 1 --repeat 2 --device cpu" in base["recorded_with"]
    a = json.loads((tmp_path / "a.json").read_text())
    # 9 rounds capped to 5 in quick mode, twice (--repeat 2); the lowest speed-up is kept.
    assert [r["rounds"] for r in a["rows"]] == [2 * plugin.QUICK_ROUNDS] * 3
    assert a["rows"][2]["extra"]["min speed-up"] <= a["rows"][2]["speedup"]
    assert a["machine"]["cores"] >= 1 and a["gate"] is None
    assert a["machine"]["threads"] == 1  # --quick runs on one torch thread unless told
    assert len(runner.saved_runs(tmp_path / ".benchmarks", "ref")) == 1  # saved once, last run

    assert main([*common, "--gate", "--compare", "ref", "--fail-above", "300"]) == 0
    out = capsys.readouterr().out
    assert "ratio gate: PASSED (1/1 recorded rows" in out

    monkeypatch.setenv("FASTNCA_BENCH_INJECT_SLOWDOWN", "fake op:4")
    rc = main([*common, "--gate", "--compare", "ref", "--fail-above", "150", "--json", "b.json"])
    out = capsys.readouterr().out
    assert rc == 1
    assert (
        "ratio gate: FAILED (0/1 recorded rows" in out
        and "FAIL  [1 thr] fake op small :: fastnca" in out
    )
    assert "Performance has regressed" in out  # pytest-benchmark's median:150% check
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["gate"]["ok"] is False
    fast = next(r for r in b["rows"] if r["variant"] == "fastnca")
    assert fast["extra"]["injected_slowdown"] == 4.0
    assert fast["paired"] and fast["speedup"] < 2  # timed alternately with lesson eager
    lesson = next(r for r in b["rows"] if r["variant"] == "lesson compiled")
    assert "injected_slowdown" not in lesson["extra"]  # the lesson's rows are never slowed
    assert not lesson["paired"]


def test_no_benchmark_matched(fake_suite, capsys):
    argv = ["--bench-dir", str(fake_suite), "--quick", "--suite", "train"]
    _one_line_error(capsys, argv, "no benchmark matched (suite train, quick)")


def test_every_baseline_row_exists_and_every_op_is_gated(tmp_path):
    """The committed baselines name rows the suites still produce (a dry run of the quick ops
    suite records each benchmark's key without timing it), every op has a recorded row, and the
    ops whose speed-up on this CPU clears the gated minimum are gated."""
    import os
    import subprocess

    keys_file = tmp_path / "keys.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTNCA_BENCH_DRY=str(keys_file), FASTNCA_BENCH_QUICK="1", OMP_NUM_THREADS="1")
    suites = runner.find_bench_dir()
    cmd = runner.build_pytest_command(suites, "ops and quick", tmp_path / "b.json")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    produced = dict(line.split("\t") for line in keys_file.read_text().splitlines())
    gated = {k for k, base in produced.items() if is_gated(k.split(" :: ")[1], base)}
    baselines = sorted(runner.BASELINES_DIR.glob("*.json"))
    assert baselines, "no committed baseline"
    for path in baselines:
        base = gate.load_baseline(path)
        cpu = base["device_kind"] == "cpu"
        if cpu:  # a CPU baseline is recorded at 1 thread and at all cores (format 2)
            assert "1" in base["speedups"] and len(base["speedups"]) >= 2, path.name
        all_gated = set()
        for threads, per in base["speedups"].items():
            recorded = set(per) | set(base.get("not_gated", {}).get(threads, {}))
            all_gated |= set(per)
            if cpu:
                missing = sorted(recorded - set(produced))
                assert not missing, f"{path.name} records rows no suite produces: {missing}"
                for op in ("perceive", "nca rollout", "nca growing", "style_loss"):
                    assert any(op in k for k in recorded), f"{path.name} {threads}: no {op} row"
            assert set(per) <= gated | {k for k in recorded if "cuda" in k}
        if cpu:
            for op in ("nca growing", "style_loss"):  # gated: recorded at >= 1.2x, lowest of 3
                assert any(op in k for k in all_gated), f"{path.name}: no gated {op} row"
