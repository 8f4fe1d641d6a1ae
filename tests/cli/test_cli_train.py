"""`fastnca train` and `fastnca render` in-process (plus one subprocess for exit code 2)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_train_args
from PIL import Image

from fastnca.cli import main
from fastnca.nca.checkpoint import load_checkpoint, save_checkpoint
from fastnca.nca.model import NCA

TINY = tiny_train_args(max_steps=4, gif_frames=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One trained run (2 iterations, built-in texture), shared by the tests below."""
    d = tmp_path_factory.mktemp("cli") / "run"
    os.environ["FASTNCA_OFFLINE"] = "1"
    assert main(["train", "-o", str(d), "--iters", "2", *TINY]) == 0
    return d


def test_train_writes_the_run_dir_and_resume_continues(run_dir, capsys):
    for name in ("config.json", "checkpoint.pt", "style.png", "pool.png", "loss.png", "growth.gif"):
        assert (run_dir / name).is_file(), name
    ck = load_checkpoint(run_dir)
    assert ck.iteration == 2 and len(ck.losses) == 2
    assert ck.config["channels"] == 4 and ck.config["hidden"] == 8
    first = ck.losses
    assert (
        main(
            [
                "train",
                "--resume",
                str(run_dir),
                "--iters",
                "3",
                "--no-progress",
                "--gif-frames",
                "1",
            ]
        )
        == 0
    )
    ck = load_checkpoint(run_dir)
    assert ck.iteration == 3 and ck.losses[:2] == first
    assert "fastnca train: 1 iterations in" in _err(capsys)


def test_render_cli_frames_and_sizes(run_dir, tmp_path):
    # A lively model, so that no two frames are equal (Pillow merges equal neighbours).
    torch.manual_seed(0)
    m = NCA(channels=4, hidden=8)
    with torch.no_grad():
        m.w2.weight.normal_(0, 0.3)
    save_checkpoint(tmp_path / "lively.pt", m)
    out = tmp_path / "g.gif"
    assert (
        main(
            [
                "render",
                str(tmp_path / "lively.pt"),
                "-o",
                str(out),
                "--size",
                "12x20",
                "--frames",
                "3",
                "--steps-per-frame",
                "2",
                "--scale",
                "2",
            ]
        )
        == 0
    )
    with Image.open(out) as im:
        assert im.n_frames == 3 and im.size == (40, 24)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (40, 24)
    assert (
        main(["render", str(tmp_path / "lively.pt"), "-o", str(out), "--steps", "6", "--size", "8"])
        == 0
    )
    with Image.open(out) as im:
        assert im.n_frames == 6 and im.size[0] >= 256  # default: upscaled to >= 256 px
    assert main(["render", str(run_dir), "-o", str(out), "--frames", "2", "--size", "9"]) == 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "-o", "{tmp}/r", "--size", "0"], "size: expected a positive int"),
        (["train", "-o", "{tmp}/r", "--min-steps", "9", "--max-steps", "3"], "min_steps (9) >"),
        (
            ["train", "-o", "{tmp}/r", "--pool", "2", "--batch", "4"],
            "pool (2) is smaller than batch",
        ),
        (["train", "-o", "{tmp}/r", "--preset", "huge"], "preset: expected one of"),
        (["train", "-o", "{tmp}/r", "--loss", "l1"], "loss: expected one of gram, swd"),
        (["train", "{tmp}/missing.png", "-o", "{tmp}/r"], "no such file"),
        (["train", "{tmp}/notes.txt", "-o", "{tmp}/r"], "is not an image file"),
        (["train", "{tmp}", "-o", "{tmp}/r"], "is a directory"),
        (["train"], "give -o RUN_DIR"),
        (["train", "--resume", "{tmp}"], "is not a run directory"),
        (["train", "-o", "{tmp}/r", "--iters", "abc"], "expected a number, got 'abc'"),
        (["train", "-o", "{tmp}/r", "--threads", "0"], "--threads: expected a positive int"),
        (["render", "{tmp}/notes.txt", "-o", "{tmp}/a.gif"], "truncated or not a torch checkpoint"),
        (["render", "{tmp}", "-o", "{tmp}/a.gif"], "not a run directory"),
        (["render", "{tmp}/nope.pt", "-o", "{tmp}/a.gif"], "no such checkpoint"),
        (["render", "{tmp}", "-o", "{tmp}/a.avi"], ".gif or .mp4"),
        (["render", "{tmp}", "-o", "{tmp}/a.gif", "--size", "0x4"], "--size"),
        (
            [
                "render",
                "{tmp}",
                "-o",
                "{tmp}/a.gif",
                "--steps",
                "6",
                "--frames",
                "2",
                "--steps-per-frame",
                "2",
            ],
            "give two of the three",
        ),
    ],
)
def test_errors_are_one_line_exit_2(args, words, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse type errors
        rc = e.code
    assert rc == 2
    assert words in _err(capsys)
    assert not (tmp_path / "r").exists()  # nothing written by a failing run


def test_failing_runs_leave_a_good_checkpoint_alone(run_dir, tmp_path, capsys, monkeypatch):
    ck = run_dir / "checkpoint.pt"
    good = ck.read_bytes()
    assert main(["train", "-o", str(run_dir), *TINY]) == 2
    assert "already holds a trained NCA" in _err(capsys)
    assert main(["train", "--resume", str(run_dir), "--size", "32"]) == 2
    assert "size cannot change when resuming" in _err(capsys)
    assert main(["train", "--resume", str(run_dir), "-o", str(tmp_path)]) == 2
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    assert main(["render", str(run_dir), "-o", str(tmp_path / "a.mp4")]) == 2
    assert "pip install imageio-ffmpeg" in _err(capsys)
    assert ck.read_bytes() == good


def test_subprocess_exit_code_2_without_traceback(tmp_path):
    env = dict(os.environ, FASTNCA_OFFLINE="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastnca",
            "train",
            "-o",
            str(tmp_path / "r"),
            "--min-steps",
            "5",
            "--max-steps",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "fastnca train: error: min_steps (5) > max_steps (2); expected min_steps <= max_steps"
    ]
