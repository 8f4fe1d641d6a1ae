"""Run directories: one owner at a time, -o only on new or empty folders, stale temp files
cleaned, and a run written by the previous checkpoint format still resumes exactly."""

import shutil
from pathlib import Path

import pytest
from conftest import TINY_RUN

from fastnca.nca.checkpoint import FORMAT_VERSION, load_checkpoint, load_nca
from fastnca.nca.run import train_texture
from fastnca.nca.rundir import RunLock

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_v1_run"
LEGACY_CURVE = [
    0.8720821142196655,
    0.8707133531570435,
    0.8691510558128357,
    0.8663250803947449,
    0.8612585663795471,
]  # the old version's own 5-iteration run (see SOURCE.md)
TINY = {**TINY_RUN, "layers": (1,), "save_every": 0}
KW = dict(progress=False, gif_frames=1, gif_steps_per_frame=1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")


def test_a_version_1_run_loads_and_resumes_bit_for_bit(tmp_path):
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    ck = load_checkpoint(run)
    assert ck.iteration == 3 and ck.losses == LEGACY_CURVE[:3] and ck.train["opt"] is not None
    assert load_nca(run).channels == 4
    res = train_texture(resume=run, iters=5, **KW)
    assert res.losses == LEGACY_CURVE  # pool.pt, Adam state and RNG of the old format restored
    new = load_checkpoint(run)
    assert new.iteration == 5 and new.train["extra"]["pool"].shape == (4, 4, 12, 12)
    assert (
        __import__("torch").load(run / "checkpoint.pt", weights_only=True)["version"]
        == FORMAT_VERSION
    )


def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    run = tmp_path / "r"
    with RunLock(run):  # another owner (flock is per open file: same process counts)
        with pytest.raises(ValueError, match=r"is in use by another fastnca train \(pid \d+\)"):
            train_texture(None, run, "quick", iters=1, **TINY, **KW)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the run written
    train_texture(None, run, "quick", iters=1, **TINY, **KW)  # free again: runs


def test_out_dir_must_be_new_or_empty_and_stale_temps_go(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")  # somebody's own files
    with pytest.raises(ValueError, match="is not empty .*config.json.* not a fastnca run"):
        train_texture(None, mine, "quick", iters=1, **TINY, **KW)
    assert (mine / "config.json").read_text() == "{}"
    run = tmp_path / "run"
    run.mkdir()
    train_texture(None, run, "quick", iters=1, **TINY, **KW)
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"left by a killed writer")
    train_texture(resume=run, iters=2, **KW)
    assert not list(run.glob(".*.tmp"))


def test_resume_continues_the_reseed_count(tmp_path):
    from fastnca.nca.run import TrainingRun

    run = tmp_path / "r"
    train_texture(None, run, "quick", iters=4, **dict(TINY, seed_every=2), **KW)
    saved = load_checkpoint(run).train["extra"]["n_reseeds"]
    assert saved == 2  # iterations 0 and 2 reseeded
    plan = TrainingRun(resume=run, iters=6)
    plan.run(progress=False, gif_frames=1, gif_steps_per_frame=1)
    assert load_checkpoint(run).train["extra"]["n_reseeds"] == 3  # + iteration 4
