"""Runs the benchmark suites behind `fastnca bench`: pytest + pytest-benchmark in a subprocess.

The suites ship inside the package (``fastnca/bench/suites/``, one pytest-benchmark file per
workload, marked ``ops`` or ``train`` and ``quick`` for their small sizes), so an installed fastnca
benchmarks itself from any directory. :func:`run_suites` returns one :class:`Row` per benchmark
with its speed-up over the group's baseline measured in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastnca.bench.plugin import ENV_QUICK, ENV_SUMMARY, ENV_THREADS
from fastnca.bench.rows import ENV_SLOWDOWN, BenchError, Row, parse_slowdown, rows_from_pytest_json

SUITES = {"ops": "ops", "train": "train", "all": "ops or train"}
SUITES_DIR = Path(__file__).resolve().parent / "suites"
BASELINES_DIR = Path(__file__).resolve().parent / "baselines"
ENV_DEVICE = "FASTNCA_BENCH_DEVICE"


def find_bench_dir(bench_dir: str | Path | None = None) -> Path:
    """The suites folder: the package's own, or ``bench_dir`` (tests use a tiny fake suite)."""
    d = Path(bench_dir) if bench_dir else SUITES_DIR
    if not (d / "pytest.ini").is_file():
        raise BenchError(f"benchmark suites not found: no pytest.ini in {d}")
    return d


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
        "fastnca.bench.plugin",
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
    """Run the chosen suites through pytest-benchmark at one torch thread count (``threads``;
    None: torch's default); return (rows, pytest exit code)."""
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    bench_dir = find_bench_dir(bench_dir)
    markexpr = f"({SUITES[suite]})" + (" and quick" if quick else "")
    run_env = dict(os.environ if env is None else env)
    run_env.pop("TRITON_INTERPRET", None)  # benchmarks time the real kernels
    parse_slowdown(run_env.get(ENV_SLOWDOWN))  # fail early on a malformed spec
    run_env[ENV_QUICK] = "1" if quick else "0"
    run_env[ENV_SUMMARY] = "0"  # the caller prints its own table
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
        for line in proc.stdout:
            echo(line.rstrip("\n"))
        rc = proc.wait()
        data = json.loads(json_out.read_text()) if json_out.is_file() else {}
    rows = rows_from_pytest_json(data)
    for r in rows:
        r.threads = threads or r.threads
    return rows, rc


def resolve_threads(spec: str | None, cores: int) -> list[int]:
    """``--threads`` "1,2" / "all" / "1,all" -> distinct thread counts in the order given
    ("all" = ``cores``, the cores this process may use)."""
    out: list[int] = []
    for part in (spec or "").split(","):
        part = part.strip().lower()
        if not part:
            continue
        n = cores if part == "all" else int(part) if part.isdigit() else 0
        if n < 1:
            raise BenchError(f"--threads: expected a positive integer or 'all', got {part!r}")
        if n not in out:
            out.append(n)
    if not out:
        raise BenchError(f"--threads: expected a comma-separated list like 1,all, got {spec!r}")
    return out
