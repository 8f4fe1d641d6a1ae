"""Careless and hostile command lines: every one is a single line on stderr and exit 2 before
any work or any write (validation of sizes, memory, channels, images, output places, weights,
devices), and runtime failures (a full disk) are one line and exit 1."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastnca.cli import main
from fastnca.nca.checkpoint import save_checkpoint
from fastnca.nca.model import NCA


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")
    monkeypatch.delenv("FASTNCA_DEBUG", raising=False)


def _fails(capsys, argv, words, code=2):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in [words] if isinstance(words, str) else words:
        assert w in err, err
    return err


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    save_checkpoint(path, NCA(channels=4, hidden=8))
    return path


TRAIN_LIMITS = [
    (["--size", "8"], "size: expected an int >= 16"),
    (["--channels", "1"], "channels: expected an int >= 3 (RGB is read from channels 0..2)"),
    (["--size", "20000"], ["would need about", "of this machine's", "lower size"]),
    (["--pool", "10000000"], ["pool", "would need about"]),
    (["--batch", "100000", "--pool", "100000"], ["would need about"]),
    (["--hidden", "100000000"], ["would need about"]),
    (["--channels", "100000000"], ["would need about"]),
    (["--iters", "1000000000"], "iters: expected an int in [1, 1000000] (the loss curve"),
    (["--seed", str(2**64)], "seed: expected an int in [0, 9223372036854775807]"),
    (["--device", "meta"], "device"),
    (["--lr", "inf"], "expected a finite number"),
]


@pytest.mark.parametrize("extra, words", TRAIN_LIMITS)
def test_train_limits_refused_before_any_write(extra, words, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, ["train", "-o", out, *extra], words)
    assert not out.exists()


def test_style_images_too_small_after_resizing_or_not_files(tmp_path, capsys):
    wide = tmp_path / "wide.png"  # 5:1, at train's default size 64 -> 64x13
    Image.fromarray(np.zeros((40, 200, 3), np.uint8)).save(wide)
    err = _fails(capsys, ["train", wide, "-o", tmp_path / "r"], "shorter side is under 16 px")
    assert "size of at least 80" in err and not (tmp_path / "r").exists()
    rect = tmp_path / "rect.png"  # stylize --size 16: 32x20 -> 16x10
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(rect)
    _fails(
        capsys,
        ["stylize", rect, "builtin:dots", "--size", "16", "-o", tmp_path / "o.png"],
        "shorter side is under 16 px",
    )
    fifo = tmp_path / "style.fifo"
    os.mkfifo(fifo)  # opening it for reading would block forever
    _fails(capsys, ["train", fifo, "-o", tmp_path / "r"], "not a regular file")
    _fails(
        capsys,
        ["stylize", "builtin:landscape", fifo, "-o", tmp_path / "o.png"],
        "not a regular file",
    )
    _fails(capsys, ["stylize", "--demo", "--lr", "inf"], "expected a finite number")
    _fails(capsys, ["stylize", "--demo", "--device", "meta"], "device")
    _fails(capsys, ["stylize", "--demo", "--size", "100000"], ["would need about", "lower --size"])
    assert not (tmp_path / "o.png").exists()


def test_unwritable_outputs_refused_before_the_work(tmp_path, capsys, ckpt, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = "/proc"  # a place nobody can create files in (even root)
    for argv in (
        ["render", ckpt, "-o", afile / "g.gif"],
        ["render", ckpt, "-o", f"{ro}/g.gif"],
        ["stylize", "--demo", "-o", afile / "o.png"],
        ["stylize", "--demo", "-o", f"{ro}/o.png"],
        ["train", "-o", afile / "run"],
        ["train", "-o", f"{ro}/run"],
        ["bench", "--json", afile / "b.json"],
        ["bench", "--json", f"{ro}/b.json"],
        ["bench", "--markdown", afile / "b.md"],
        ["bench", "--plot", f"{ro}/b.png"],
    ):
        _fails(capsys, argv, ["cannot write"])
    if os.geteuid() != 0:  # a read-only folder (root may write anywhere)
        d = tmp_path / "ro"
        d.mkdir(mode=0o555)
        _fails(capsys, ["render", ckpt, "-o", d / "g.gif"], "cannot create files in")
    # nothing ran: the bench suites were never started
    assert not (tmp_path / ".benchmarks").exists()


def test_bench_malformed_gate_baseline_refused_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    import fastnca.bench.runner as runner

    def never(*a, **k):
        raise AssertionError("the suites ran")

    monkeypatch.setattr(runner, "run_suites", never)
    _fails(
        capsys,
        ["bench", "--gate", "--baseline", "bad.json", "--device", "cpu"],
        "--gate: baseline bad.json",
    )


def test_render_refuses_non_finite_weights_and_huge_renders(tmp_path, capsys, ckpt):
    obj = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in obj["model"].items() if v.is_floating_point() and v.dim() > 1)
    obj["model"][key] = torch.full_like(obj["model"][key], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(obj, bad)
    out = tmp_path / "g.gif"
    _fails(capsys, ["render", bad, "-o", out], ["NaN or inf", key])
    _fails(
        capsys,
        ["render", ckpt, "-o", out, "--size", "100", "--scale", "1000"],
        "larger than a GIF can be",
    )
    _fails(
        capsys,
        ["render", ckpt, "-o", out, "--size", "60000", "--frames", "2"],
        ["would need about", "lower --size"],
    )
    _fails(capsys, ["render", ckpt, "-o", out, "--steps", "2000000"], "more than 1000000")
    _fails(capsys, ["render", ckpt, "-o", out, "--seed", str(2**64)], "--seed")
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_disk_full_is_one_line_naming_the_path(tmp_path, capsys, ckpt, monkeypatch):
    import fastnca._io as io

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full)
    out = tmp_path / "g.gif"
    err = _fails(
        capsys,
        ["render", ckpt, "-o", out, "--size", "8", "--frames", "1", "--steps-per-frame", "1"],
        "no space left on device at",
        code=1,
    )
    assert str(out) in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # temp file removed


def test_torch_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import fastnca._io as io

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(io, "_disk_full", lambda path: True)
    with pytest.raises(OSError, match="no space left on device at") as e:
        io.atomic_save({"a": 1}, tmp_path / "x.pt")
    assert e.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


def test_help_and_behaviour_agree_on_downloads(capsys, monkeypatch):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "no downloads" not in text and "FASTNCA_OFFLINE=1" in text and "downloaded" in text
    assert main(["stylize", "--help"]) == 0
    assert "FASTNCA_OFFLINE=1" in " ".join(capsys.readouterr().out.split())
    import fastnca.style.features as features

    def never(*a, **k):
        raise AssertionError("downloaded although FASTNCA_OFFLINE=1")

    monkeypatch.setattr(features, "download_weights", never)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-fastnca-test")
    m = features.VGG16Features((1,), weights="auto", verbose=False)
    assert not m.is_pretrained
