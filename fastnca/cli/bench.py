"""`fastnca bench`: run the benchmark suites, print one table, write JSON / markdown / a plot, and
gate performance (ratio gate against a committed baseline; or a saved same-machine run).

Examples:
    fastnca bench --quick                        # all suites, reduced sizes and rounds (< 3 min)
    fastnca bench --suite ops --plot ops.png     # op kernels: lesson eager vs compiled vs fastnca
    fastnca bench --quick --suite ops --gate     # CI: fail if a fastnca path lost its speed-up
    fastnca bench --quick --threads 1,all        # each row at 1 thread and at every core
    fastnca bench --save main                    # same-machine runs: record ...
    fastnca bench --compare main --fail-above 10 # ... and fail if a median regressed > 10 %
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
from pathlib import Path

from fastnca.cli._common import UsageError, positive_int

SUITE_NAMES = ("ops", "train", "all")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_JSON = ".benchmarks/fastnca-bench.json"


def add_parser(sub):
    p = sub.add_parser(
        "bench",
        help="run the benchmark suites; table, JSON, plot, regression gate",
        description="Run fastnca's pytest-benchmark suites (shipped in the package) and print, "
        "per workload, each variant's median and its speed-up over the baseline variant "
        "measured in the same run.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes and at most 5 rounds per benchmark (under 3 minutes on 2 CPUs)",
    )
    p.add_argument(
        "--suite",
        default="all",
        metavar="ops|train|all",
        help="which suites: ops (kernels), train (training strategies), all (default)",
    )
    p.add_argument(
        "-k",
        dest="keyword",
        default=None,
        metavar="EXPR",
        help="only benchmarks whose name matches this pytest -k expression",
    )
    p.add_argument(
        "--threads",
        type=_thread_spec,
        default=None,
        metavar="N[,N...]|all",
        help="torch CPU thread counts, each a run of its own: e.g. 1, 1,2 or 1,all (all = every "
        "core this process may use). Default: 1 with --quick, torch's own otherwise; with "
        "--write-baseline 1,all, with --gate the counts the baseline was recorded at",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda",
        help="benchmark device (default auto: cuda when present, else cpu)",
    )
    p.add_argument(
        "-o",
        "--out",
        "--json",
        dest="json",
        default=DEFAULT_JSON,
        metavar="PATH",
        help="write the rows, the machine and the gate result here as JSON (default: %(default)s)",
    )
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write a markdown table")
    p.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="bar chart PNG of the speed-ups (needs matplotlib: pip install 'fastnca[plot]')",
    )
    p.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        metavar="N",
        help="run the suites N times; report the median speed-up, record the lowest as baseline",
    )
    p.add_argument(
        "--gate",
        action="store_true",
        help="ratio gate: every fastnca row must keep --min-fraction of the speed-up "
        "recorded in fastnca/bench/baselines/<device kind>.json (exit 1 otherwise)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="PATH",
        help="baseline file for --gate / --write-baseline (default: by device kind)",
    )
    p.add_argument(
        "--min-fraction",
        type=float,
        default=None,
        metavar="F",
        help="fraction of the recorded speed-up to keep (default: the baseline's, 0.5)",
    )
    p.add_argument(
        "--write-baseline",
        action="store_true",
        help="record this run's speed-ups as the baseline for this device kind",
    )
    p.add_argument(
        "--save",
        default=None,
        metavar="NAME",
        help="save this run in .benchmarks/ (pytest-benchmark --benchmark-save=NAME)",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="NAME",
        help="compare with the latest run saved as NAME (same machine only)",
    )
    p.add_argument(
        "--fail-above",
        type=float,
        default=None,
        metavar="PCT",
        help="with --compare: fail if any median is more than PCT %% slower",
    )
    p.add_argument("--bench-dir", default=None, help=argparse.SUPPRESS)  # tests: a fake suite
    return p


def _thread_spec(s: str) -> str:
    """Validate a --threads list now (argparse error), resolve "all" later."""
    from fastnca.bench.rows import BenchError
    from fastnca.bench.runner import resolve_threads

    try:
        resolve_threads(s, 1)
    except BenchError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--threads: ")) from None
    return s


def _thread_counts(args, device: str, baseline: dict | None) -> list[int | None]:
    """The thread counts to run (None: leave torch's default, one run)."""
    from fastnca.bench import gate, rows, runner

    cores = rows.usable_cores()
    if args.threads:
        return runner.resolve_threads(args.threads, cores)
    if device == "cuda":
        return [None]
    if baseline is not None:  # gate: like for like with what was recorded
        counts = gate.baseline_threads(baseline)
        if any(t and t > cores for t in counts):
            print(f"fastnca bench: note: the baseline was recorded at {counts} threads; this "
                  f"process may use {cores} cores")  # fmt: skip
        return counts
    if args.write_baseline:
        return runner.resolve_threads("1,all", cores)
    return [1] if args.quick else [None]


def _check_args(args) -> None:
    if args.suite not in SUITE_NAMES:
        raise UsageError(
            f"--suite: unknown suite {args.suite!r}; expected one of {', '.join(SUITE_NAMES)}"
        )
    if args.device not in DEVICES:
        raise UsageError(
            f"--device: {args.device!r} cannot be benchmarked; expected auto, cpu or cuda"
        )
    if args.fail_above is not None and args.compare is None:
        raise UsageError("--fail-above needs --compare NAME (a run saved earlier with --save NAME)")
    if args.fail_above is not None and not args.fail_above > 0:
        raise UsageError(f"--fail-above must be a percentage > 0, got {args.fail_above:g}")
    if args.min_fraction is not None and not 0 < args.min_fraction <= 1:
        raise UsageError(f"--min-fraction must be in (0, 1], got {args.min_fraction:g}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'fastnca[plot]' (or pip install matplotlib)"
        )
    for mod in ("pytest", "pytest_benchmark"):
        if importlib.util.find_spec(mod) is None:
            raise UsageError(
                f"fastnca bench needs {mod.replace('_', '-')}: pip install 'fastnca[dev]'"
            )


def _by_repeat(results: list, n_counts: int) -> list:
    """Runs ordered (repeat, thread count) -> one list of rows per repeat (all its counts)."""
    return [
        [r for run in results[i : i + n_counts] for r in run]
        for i in range(0, len(results), n_counts)
    ]


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was requested but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _command_line(args) -> str:
    """The options of this run as a shell command (recorded in JSON, markdown and baselines)."""
    parts = ["fastnca", "bench"]
    for opt in ("quick", "gate", "write_baseline"):
        if getattr(args, opt):
            parts.append("--" + opt.replace("_", "-"))
    for opt in (
        "suite",
        "threads",
        "repeat",
        "device",
        "keyword",
        "json",
        "markdown",
        "plot",
        "baseline",
        "min_fraction",
        "save",
        "compare",
        "fail_above",
    ):
        value = getattr(args, opt)
        defaults = {"suite": "all", "repeat": 1, "json": DEFAULT_JSON, "device": "auto"}
        if value is not None and value != defaults.get(opt):
            flag = "-k" if opt == "keyword" else "--" + opt.replace("_", "-")
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(parts)


def _pytest_args(args, storage: Path) -> list[str]:
    """pytest-benchmark options for --save / --compare / --fail-above (same-machine layer)."""
    extra = [f"--benchmark-storage=file://{storage}"]
    if args.save:
        extra.append(f"--benchmark-save={args.save}")
    if args.compare:
        from fastnca.bench.runner import saved_runs

        runs = saved_runs(storage, args.compare)
        if not runs:
            raise UsageError(
                f"--compare: no run saved as {args.compare!r} in {storage}; "
                f"save one first with: fastnca bench --save {args.compare}"
            )
        extra.append(f"--benchmark-compare={runs[-1]}")
        if args.fail_above is not None:
            extra.append(f"--benchmark-compare-fail=median:{args.fail_above:g}%")
    return extra


def _check_outputs(args) -> None:
    """Every file this run will write is writable, checked before the (long) run."""
    from fastnca.cli._paths import writable_file

    writable_file(args.json, "--json")
    if args.markdown:
        writable_file(args.markdown, "--markdown")
    if args.plot:
        writable_file(args.plot, "--plot")
    if args.write_baseline and args.baseline:
        writable_file(args.baseline, "--baseline")


def run(args) -> int:
    _check_args(args)
    _check_outputs(args)
    device = _resolve_device(args.device)
    from fastnca.bench import gate, report, rows, runner

    command = _command_line(args)
    try:
        bench_dir = runner.find_bench_dir(args.bench_dir)
        rows.parse_slowdown(os.environ.get(rows.ENV_SLOWDOWN))
    except rows.BenchError as e:
        raise UsageError(str(e)) from None
    kind = rows.device_kind(rows.machine_info(device))
    baseline_path = Path(args.baseline or runner.BASELINES_DIR / f"{kind}.json")
    baseline = None
    if args.gate:
        if not baseline_path.is_file():
            raise UsageError(
                f"--gate: no baseline file {baseline_path} for device kind {kind!r}; "
                f"record one with: fastnca bench --write-baseline (same suite options)"
            )
        try:
            baseline = gate.load_baseline(baseline_path)
        except rows.BenchError as e:
            raise UsageError(f"--gate: {e}") from None
    counts = _thread_counts(args, device, baseline)
    machine = rows.machine_info(device, counts if len(counts) > 1 else counts[0])
    extra = _pytest_args(args, Path.cwd() / ".benchmarks")

    results, rc = [], 0
    runs = [t for _ in range(args.repeat) for t in counts]  # repeat-major
    for n, threads in enumerate(runs):  # --save/--compare act on the last run
        last = n == len(runs) - 1
        found, rc = runner.run_suites(
            args.suite, quick=args.quick, device=device, threads=threads, keyword=args.keyword,
            bench_dir=bench_dir, extra_args=tuple(extra if last else extra[:1]),
        )  # fmt: skip
        results.append(found)
        if rc != 0 or not found:
            break
    table = rows.combine_runs(_by_repeat(results, len(counts)))
    if rc == 5 or (rc == 0 and not table):
        k = f", -k {args.keyword}" if args.keyword else ""
        raise UsageError(f"no benchmark matched (suite {args.suite}{', quick' * args.quick}{k})")
    print(
        f"\nfastnca bench: {machine['cpu']} ({machine['cores']} cores, "
        f"{report.threads_text(machine['threads'])} "
        f"torch threads), device "
        f"{machine.get('device_name', device)}, torch {machine['torch']}, "
        f"triton {machine['triton']}"
    )
    print(report.format_table(table, machine))

    status = 0
    if rc != 0:
        why = "a median regressed beyond --fail-above, or " if args.compare else ""
        print(f"fastnca bench: pytest exited with {rc} ({why}a benchmark failed; see above)")
        status = 1
    gate_result = None
    if baseline is not None:
        result = gate.check_gate(table, baseline, args.min_fraction)
        gate_result = {"baseline": str(baseline_path), "ok": result.ok, "lines": result.lines}
        print("\n".join(result.lines))
        status = status or int(not result.ok)
    if args.write_baseline:
        if rc != 0:
            raise UsageError("--write-baseline: not written, the run did not pass (see above)")
        frac = args.min_fraction or gate.DEFAULT_FRACTION
        report.write_json(baseline_path, gate.make_baseline(table, machine, command, frac))
        print(f"fastnca bench: baseline written to {baseline_path}")
    out = report.results_json(table, machine, command, gate_result)
    print(f"fastnca bench: JSON written to {report.write_json(args.json, out)}")
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(report.format_markdown(table, machine, command))
        print(f"fastnca bench: markdown written to {md}")
    if args.plot:
        try:
            png = report.plot_ratios(table, args.plot, title=f"{command} ({machine['cpu']})")
        except rows.BenchError as e:
            raise UsageError(str(e)) from None
        print(f"fastnca bench: plot written to {png}")
    return status
