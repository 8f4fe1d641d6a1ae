"""`fastnca bench` per thread count (format-2 baselines), GFLOP/s against the run's mm rate, and
the CUDA timing logic (timer choice, L2 flush, card floors) on CPU with a faked device and timer.
No timing assertions: the fake suite sleeps, and only its structure is checked."""

import json

import pytest

from fastnca.bench import gate, gpu_hw, plugin, runner
from fastnca.bench import report as bench_report
from fastnca.bench.rows import BenchError, Row, combine_runs, rows_from_pytest_json
from fastnca.cli import main


def _data(threads=None, run=None, **ei):
    """pytest-benchmark-shaped JSON of one group: lesson eager 30 ms, fastnca 10 ms."""
    rows = [
        {"group": "g", "name": "a", "extra_info": {"variant": "lesson eager", **ei},
         "stats": {"median": 0.030, "rounds": 3}},
        {"group": "g", "name": "b", "extra_info": {"variant": "fastnca", **ei},
         "stats": {"median": 0.010, "rounds": 3}},
    ]  # fmt: skip
    return {"benchmarks": rows, "fastnca": {"threads": threads, **(run or {})}}


def test_resolve_threads():
    assert runner.resolve_threads("1,2", 4) == [1, 2]
    assert runner.resolve_threads("all", 4) == [4]
    assert runner.resolve_threads("1, all", 1) == [1]  # one core: 1 and all are one run
    assert runner.resolve_threads("2,1,2", 4) == [2, 1]
    for bad in ("0", "x", "1,-2", ",", ""):
        with pytest.raises(BenchError, match="--threads"):
            runner.resolve_threads(bad, 4)


def test_rows_per_thread_count_and_format2_baseline(tmp_path):
    runs = [
        rows_from_pytest_json(_data(1)) + rows_from_pytest_json(_data(2)),
        rows_from_pytest_json(_data(1)) + rows_from_pytest_json(_data(2)),
    ]
    rows = combine_runs(runs)
    assert [(r.threads, r.variant) for r in rows] == [
        (1, "lesson eager"), (1, "fastnca"), (2, "lesson eager"), (2, "fastnca"),
    ]  # fmt: skip
    base = gate.make_baseline(rows, {"device": "cpu", "threads": [1, 2]}, "cmd")
    assert base["format"] == 2 and base["speedups"] == {"1": {"g :: fastnca": 3.0},
                                                        "2": {"g :: fastnca": 3.0}}  # fmt: skip
    path = bench_report.write_json(tmp_path / "b.json", base)
    loaded = gate.load_baseline(path)
    assert gate.baseline_threads(loaded) == [1, 2]
    res = gate.check_gate(rows, loaded)
    assert (
        res.ok and res.checked == 2 and any("[2 thr] g :: fastnca: 3.00x" in x for x in res.lines)
    )
    # Only 1-thread rows in the run: the 2-thread rows are holes, named with what to run.
    res = gate.check_gate([r for r in rows if r.threads == 1], loaded)
    assert not res.ok and any("no run at 2 threads: --threads 2" in x for x in res.lines)
    table = bench_report.format_table(rows)
    assert "g   [1 thread; baseline: lesson eager]" in table
    assert "g   [2 threads; baseline: lesson eager]" in table
    assert bench_report.threads_text([1, 2]) == "1 and 2" and bench_report.threads_text(1) == "1"


def test_format1_baseline_is_read_as_its_thread_count(tmp_path):
    old = {"speedups": {"g :: fastnca": 2.0}, "not_gated": {"g :: x": 1.0},
           "machine": {"threads": 1}}  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    base = gate.load_baseline(tmp_path / "old.json")
    assert base["speedups"] == {"1": {"g :: fastnca": 2.0}}
    assert base["not_gated"] == {"1": {"g :: x": 1.0}}
    assert gate.check_gate(rows_from_pytest_json(_data(1)), base).ok
    assert not gate.check_gate(rows_from_pytest_json(_data(2)), base).ok
    (tmp_path / "bad.json").write_text(json.dumps({"format": 2, "speedups": {"1": {"k": -1}}}))
    with pytest.raises(BenchError, match="thread count"):
        gate.load_baseline(tmp_path / "bad.json")


def test_gflops_and_fraction_of_mm():
    rows = rows_from_pytest_json(_data(1, {"mm_gflops": 50.0}, flops=1e9))
    lesson, fast = rows
    assert fast.gflops == pytest.approx(100.0) and fast.pct_mm == pytest.approx(200.0)
    assert lesson.gflops == pytest.approx(1e9 / 0.03 / 1e9)
    assert "flops" not in fast.extra  # shown as GFLOP/s, not as a raw count
    table = bench_report.format_table(rows, {"device": "cpu"})
    assert "torch.mm 2048x2048 float32 in this run (lowest of 3): 50.0 GFLOP/s at 1 thread" in table
    assert "100.0 GFLOP/s (200% mm)" in table
    md = bench_report.format_markdown(rows, {"cpu": "c", "cores": 2, "torch": "t", "triton": "t",
                                             "python": "p", "device": "cpu"}, "cmd")  # fmt: skip
    assert "|  | 1 | fastnca | 10.00 ms | 3.00x | 100.0 (200% mm) |  |  |" in md
    js = bench_report.results_json(rows, {"device": "cpu"}, "cmd")["rows"][1]
    assert js["threads"] == 1 and js["gflops"] == pytest.approx(100.0)
    assert js["pct_of_mm"] == pytest.approx(200.0)
    no_flops = rows_from_pytest_json(_data(1, {"mm_gflops": 50.0}))[1]
    assert no_flops.gflops is None and no_flops.pct_mm is None


def test_card_lookup_and_floor_from_the_device_name():
    assert gpu_hw.card_for("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert gpu_hw.card_for("NVIDIA H100 PCIe").name == "H100-PCIe"
    assert gpu_hw.card_for("NVIDIA H200").name == "H200"
    assert gpu_hw.card_for("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert gpu_hw.card_for("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    assert gpu_hw.card_for("NVIDIA GeForce RTX 4090") is None
    h100 = gpu_hw.card_for("NVIDIA H100 80GB HBM3")
    # Memory-bound: 3.35 GB in 1 ms; compute-bound: 66.9 GFLOP of FP32 in 1 ms.
    assert gpu_hw.floor_s(3.35e9, 1.0, h100) == pytest.approx(1e-3)
    assert gpu_hw.floor_s(0, 66.9e9, h100) == pytest.approx(1e-3)
    assert gpu_hw.floor_s(0, 494.7e9, h100, "tf32x3") == pytest.approx(3e-3)  # 3 TF32 products

    cuda = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    rows = rows_from_pytest_json(_data(None, cuda, bytes=3.35e12 * 0.005))  # floor 5 ms
    assert rows[1].floor_s == pytest.approx(0.005) and rows[1].pct_floor == pytest.approx(50.0)
    table = bench_report.format_table(rows, cuda)
    assert "roofline floors: H100-SXM peaks" in table and "50% of floor" in table
    other = {"device": "cuda", "device_name": "NVIDIA GeForce RTX 4090"}
    rows = rows_from_pytest_json(_data(None, other, bytes=1e9))
    assert rows[1].floor_s is None
    table = bench_report.format_table(rows, other)
    assert "no roofline floor: 'NVIDIA GeForce RTX 4090' is not a card" in table
    assert "of floor" not in table.split("\n", 2)[2]
    # A CPU run never gets a floor, whatever its bytes.
    assert rows_from_pytest_json(_data(1, {"device": "cpu"}, bytes=1e9))[1].floor_s is None


class _FakeEvent:
    """torch.cuda.Event stand-in: record() stamps a fake GPU clock (ms)."""

    clock = [0.0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = _FakeEvent.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.t - self.t


class _FakeCuda:
    Event = _FakeEvent


def test_timer_choice_and_cuda_event_timing_with_a_fake_device():
    name, timer = plugin.choose_timer("cpu")
    assert name == "perf_counter" and isinstance(timer(), float)
    name, timer = plugin.choose_timer("cuda", cuda=_FakeCuda)
    assert name == "cuda events"
    start = timer()
    _FakeEvent.clock[0] += 2.5  # the GPU ran 2.5 ms
    assert timer() - start == pytest.approx(2.5e-3)  # seconds, as pytest-benchmark expects

    calls = []

    def flush():  # outside the timed region: the fake clock does not move
        calls.append("flush")

    def work(ms, tag):
        def run():
            calls.append(tag)
            _FakeEvent.clock[0] += ms

        return run

    assert plugin.time_call(work(4.0, "w"), timer, flush) == pytest.approx(4e-3)
    assert calls == ["flush", "w"]
    calls.clear()
    ratio = plugin.paired_speedup(work(6.0, "b"), work(2.0, "r"), 2, timer, flush)
    assert ratio == pytest.approx(3.0)
    assert calls == ["flush", "b", "flush", "r", "flush", "r", "flush", "b"]


def test_l2_flush_buffer_and_setup_contract(monkeypatch):
    """The flush zeroes 2x the card's L2 (at least 64 MiB) and returns None, as pytest-benchmark
    requires of a setup that passes no arguments (faked properties, a CPU buffer)."""
    import torch

    class Props:
        L2_cache_size = 60 * 2**20  # an H100/H200's 50-60 MB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    flush = plugin.l2_flush("cpu")
    assert flush() is None and flush.nbytes == 120 * 2**20
    Props.L2_cache_size = 6 * 2**20
    assert plugin.l2_flush("cpu").nbytes == 64 * 2**20


def test_mm_rate_with_a_fake_timer_and_dropped_results():
    clock = [0.0]

    def timer():
        clock[0] += 0.001  # every reading 1 ms later: each call "takes" 1 ms
        return clock[0]

    assert plugin.mm_gflops("cpu", n=32, reps=2, timer=timer) == pytest.approx(
        2 * 32**3 / 1e-3 / 1e9
    )
    faults = []
    run = plugin._dropping(lambda x: [x] * 3, faults)
    assert run(1) is None and len(faults) == 1 and faults[0] >= 0
    assert plugin.steady_allocator() in ("no-trim", "default")


def test_cli_runs_each_thread_count(tmp_path, capsys, monkeypatch):
    """--threads 1,2 on the fake sleep suite: a table and JSON rows per count, mm rate per run;
    --write-baseline keys the speed-ups by count and --gate checks them at the same counts."""
    suite = tmp_path / "benchmarks"
    suite.mkdir()
    (suite / "bench_fake.py").write_text(
        "import time, pytest\npytestmark = pytest.mark.ops\n"
        "@pytest.mark.parametrize('variant', ['lesson eager', 'fastnca'])\n"
        "def test_fake(benchmark, variant):\n"
        "    benchmark.group = 'fake op'\n"
        "    benchmark.extra_info['variant'] = variant\n"
        "    benchmark.extra_info['flops'] = 1e6\n"
        "    d = 0.008 if variant == 'lesson eager' else 0.002\n"
        "    benchmark.pedantic(time.sleep, args=(d,), rounds=3, iterations=1)\n"
    )
    (suite / "pytest.ini").write_text((runner.find_bench_dir() / "pytest.ini").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTNCA_BENCH_MM", "128")
    monkeypatch.delenv("FASTNCA_BENCH_INJECT_SLOWDOWN", raising=False)
    common = ["bench", "--bench-dir", str(suite), "--suite", "ops", "--device", "cpu"]
    argv = [*common, "--threads", "1,2", "--write-baseline", "--baseline", "b.json", "-o", "a.json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fake op   [1 thread; baseline" in out and "fake op   [2 threads; baseline" in out
    assert "GFLOP/s (" in out and "torch.mm 2048x2048 float32 in this run" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert [(r["threads"], r["variant"]) for r in a["rows"]] == [
        (1, "lesson eager"), (1, "fastnca"), (2, "lesson eager"), (2, "fastnca"),
    ]  # fmt: skip
    assert all(r["mm_gflops"] and r["gflops"] for r in a["rows"])
    assert a["machine"]["threads"] == [1, 2]
    base = json.loads((tmp_path / "b.json").read_text())
    assert sorted(base["speedups"]) == ["1", "2"] and "--threads 1,2" in base["recorded_with"]
    assert main([*common, "--gate", "--baseline", "b.json", "-o", "c.json"]) == 0
    out = capsys.readouterr().out
    assert "ratio gate: PASSED (2/2 recorded rows" in out and "[2 thr] fake op :: fastnca" in out


def test_threads_default_is_one_for_quick_and_both_for_a_baseline(monkeypatch):
    from argparse import Namespace

    from fastnca.cli import bench as cli_bench

    monkeypatch.setattr("fastnca.bench.rows.usable_cores", lambda: 4)
    args = Namespace(threads=None, quick=True, write_baseline=False)
    assert cli_bench._thread_counts(args, "cpu", None) == [1]
    assert cli_bench._thread_counts(Namespace(**{**vars(args), "quick": False}), "cpu", None) == [
        None
    ]
    assert cli_bench._thread_counts(Namespace(**{**vars(args), "write_baseline": True}), "cpu",
                                    None) == [1, 4]  # fmt: skip
    assert cli_bench._thread_counts(args, "cuda", None) == [None]
    base = {"speedups": {"1": {}, "2": {}}}
    assert cli_bench._thread_counts(args, "cpu", base) == [1, 2]
    assert cli_bench._thread_counts(Namespace(**{**vars(args), "threads": "all"}), "cpu", base) == [
        4
    ]


def test_row_without_threads_keeps_the_plain_table():
    rows = [Row("g", "lesson eager", 0.03, 1.0), Row("g", "fastnca", 0.01, 3.0)]
    table = bench_report.format_table(rows)
    assert "g   [baseline: lesson eager]" in table and "GFLOP/s" not in table
