"""Reliability of `fastnca train` as a process: one owner per run directory, SIGTERM/SIGINT stop
at an iteration boundary and resume to the same loss curve as an unbroken run, temp files of a
killed writer removed on the next start. Real subprocesses, tiny sizes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from conftest import tiny_train_args

from fastnca.nca.checkpoint import load_checkpoint

TINY = tiny_train_args(progress=True)
ENV = {**os.environ, "FASTNCA_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("FASTNCA_DEBUG", None)


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "fastnca", "train", *map(str, args)]


def _start(*args) -> subprocess.Popen:
    # stdout (progress lines) and stderr go to a file (appended) read while the process runs.
    fd, path = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    with open(path, "a") as log:
        p = subprocess.Popen(_cmd(*args), env=ENV, stdout=log, stderr=log)
    p.log = path
    return p


def _err(p: subprocess.Popen) -> str:
    with open(p.log) as f:
        return f.read()


def _wait_for_training(p: subprocess.Popen, run, timeout: float = 300.0) -> None:
    """Wait until p owns ``run`` (its pid in .lock), has written config.json after taking the
    lock and has printed a progress line (an iteration done), on a loaded machine too."""
    lock, cfg, end = run / ".lock", run / "config.json", time.monotonic() + timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            raise AssertionError(f"{p.args} ended early ({p.returncode}): {_err(p)}")
        try:
            mine = lock.read_text().strip() == str(p.pid)
            if mine and cfg.stat().st_mtime_ns >= lock.stat().st_mtime_ns and "train [" in _err(p):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    p.kill()
    raise AssertionError(f"{p.args} did not start training within {timeout:g}s")


def _finish(p: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    p.wait(timeout=timeout)
    return p.returncode, _err(p)


def test_second_train_on_the_same_dir_fails_at_once_naming_the_pid(tmp_path):
    run = tmp_path / "run"
    a = _start("-o", run, "--iters", "1000", *TINY)
    try:
        _wait_for_training(a, run)
        b = subprocess.run(
            _cmd("-o", run, "--iters", "3", *TINY),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        err = b.stderr.strip()
        assert b.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"pid {a.pid}" in err and "in use by another fastnca train" in err
        r = subprocess.run(
            _cmd("--resume", run, "--iters", "5"),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and f"pid {a.pid}" in r.stderr
    finally:
        a.kill()
        a.wait()


def test_sigterm_then_sigint_then_resume_equals_an_unbroken_run(tmp_path):
    n = 400  # long enough that each signal lands while iterations remain (tiny ones are fast)
    iters = ["--iters", str(n)]
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    unbroken = _start("-o", whole, *iters, *TINY)  # runs while the broken one is stopped
    p = _start("-o", broken, *iters, *TINY)
    _wait_for_training(p, broken)
    p.send_signal(signal.SIGTERM)
    rc, err = _finish(p)
    assert rc == 143, err
    assert f"continue with: fastnca train --resume {broken}" in err and "Traceback" not in err
    first = load_checkpoint(broken).iteration
    assert 0 < first < n
    p = _start("--resume", broken, *iters)
    _wait_for_training(p, broken)
    p.send_signal(signal.SIGINT)
    rc, err = _finish(p)
    assert rc == 130, err
    assert "--resume" in err and "Traceback" not in err
    second = load_checkpoint(broken).iteration
    assert first <= second < n
    p = _start("--resume", broken, *iters)
    rc, err = _finish(p)
    assert rc == 0, err
    rc, err = _finish(unbroken)
    assert rc == 0, err
    a, b = load_checkpoint(broken), load_checkpoint(whole)
    assert a.iteration == b.iteration == n
    assert a.losses == b.losses  # bit for bit, across both stops


def test_temp_files_of_a_killed_writer_are_gone_after_the_next_start(tmp_path):
    run = tmp_path / "run"
    p = _start("-o", run, "--iters", "1000", *TINY)
    _wait_for_training(p, run)
    p.send_signal(signal.SIGKILL)  # kill -9: no handler, no cleanup
    p.wait()
    assert p.returncode == -signal.SIGKILL
    stale = run / ".checkpoint.pt.x1y2z3.tmp"  # what atomic_path leaves when killed mid-write
    stale.write_bytes(b"partial")
    (run / "checkpoint.pt").unlink(missing_ok=True)
    # The killed run saved no checkpoint (save_every 500): the directory holds its leftovers;
    # a new run there is refused as "not empty", so resume-less restarts use the lock path:
    from fastnca.nca.rundir import RunLock

    with RunLock(run):  # what every start (new or --resume) does first
        assert not stale.exists()
    assert not list(run.glob(".*.tmp"))
