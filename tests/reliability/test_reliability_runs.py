"""Run directories and checkpoints under careless use: -o never replaces a user's files, a failed
resume writes nothing, a damaged or foreign checkpoint says what is wrong, a diverging run never
reaches disk. In-process, tiny runs."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import tiny_train_args

from fastnca.cli import main
from fastnca.nca.checkpoint import load_checkpoint

TINY = tiny_train_args()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")
    monkeypatch.delenv("FASTNCA_DEBUG", raising=False)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1] if err else ""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import os

    os.environ["FASTNCA_OFFLINE"] = "1"
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "-o", str(run), "--iters", "2", *TINY]) == 0
    return run


def _snapshot(d):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.iterdir() if p.is_file()}


def test_out_into_a_folder_that_is_not_a_run_changes_nothing(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "style.png").write_bytes(b"my picture")
    before = _snapshot(mine)
    assert main(["train", "-o", str(mine), "--iters", "2", *TINY]) == 2
    assert "is not empty" in _err(capsys)
    assert _snapshot(mine) == before


def test_a_failed_resume_writes_nothing(run_dir, capsys):
    before = _snapshot(run_dir)
    assert main(["train", "--resume", str(run_dir), "--iters", "4", "--size", "32"]) == 2
    assert "size cannot change when resuming" in _err(capsys)
    assert main(["train", "--resume", str(run_dir), "--iters", "2"]) == 2  # nothing left to do
    assert "already has 2 iterations" in _err(capsys)
    assert _snapshot(run_dir) == before


def test_resume_refuses_a_pool_of_another_grid_size(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    obj = torch.load(run / "checkpoint.pt", weights_only=True)
    pool = obj["train"]["extra"]["pool"]
    obj["train"]["extra"]["pool"] = torch.zeros(*pool.shape[:2], 24, 24)
    torch.save(obj, run / "checkpoint.pt")
    before = _snapshot(run)
    assert main(["train", "--resume", str(run), "--iters", "4"]) == 2
    err = _err(capsys)
    assert "pool has shape" in err and "(4, 4, 16, 16)" in err
    assert _snapshot(run) == before


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "truncated or not a"),
        (b"\x00" * 100, "truncated or not a"),
        (_saved({"format": "fastnca-nca", "model": torch.nn.Linear(2, 2)}), "unsafe content"),
        pytest.param(_saved({"x": _Boom()}), "unsafe content"),
        pytest.param(pickle.dumps({"x": _Boom()}, protocol=2), "unsafe content"),
    ],
)
def test_checkpoint_problems_say_which(content, words, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    out = tmp_path / "g.gif"
    assert main(["render", str(bad), "-o", str(out)]) == 2
    assert words in _err(capsys)
    assert not out.exists()


def test_weights_not_matching_their_config_say_so(run_dir, tmp_path, capsys):
    obj = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    obj["config"]["hidden"] = 99
    bad = tmp_path / "mismatch.pt"
    torch.save(obj, bad)
    assert main(["render", str(bad), "-o", str(tmp_path / "g.gif")]) == 2
    assert "weights do not fit its config" in _err(capsys)


def test_a_diverging_run_never_reaches_disk(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "-o", str(run), "--iters", "3", "--lr", "1e308", *TINY])
    err = _err(capsys)
    assert rc in (0, 2)
    if rc == 2:  # diverged: said so, no checkpoint of a non-finite state
        assert "diverg" in err.lower() or "nan" in err.lower() or "finite" in err.lower()
        assert not (run / "checkpoint.pt").exists()
    else:  # survived 3 steps: whatever was saved is finite
        ck = load_checkpoint(run)
        assert all(torch.isfinite(v).all() for v in ck.state_dict.values())
