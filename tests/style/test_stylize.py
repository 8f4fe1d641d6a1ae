"""Pixel optimisation: TensorModel / ImageOptCB / ImageLogCB with the Learner, the style-transfer
loss, stylize(), and `fastnca stylize` (including every bad image input: exit 2, one line)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastnca.cli import main
from fastnca.losses import content_loss
from fastnca.style.features import VGG16Features
from fastnca.style.stylize import (
    ImageLogCB,
    ImageOptCB,
    StyleTransferLoss,
    TensorModel,
    feature_layers,
    stylize,
)
from fastnca.style.textures import builtin_content, builtin_texture
from fastnca.train.data import dummy_dls
from fastnca.train.learner import Learner

LAYERS = dict(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1", "relu3_1"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def feats():
    return VGG16Features(feature_layers(**LAYERS), weights="random", verbose=False)


def test_tensor_model_and_image_opt_cb_fit_a_target():
    target = torch.rand(1, 3, 8, 8) * 1.4 - 0.2  # partly outside [0, 1]
    model = TensorModel(torch.full((1, 3, 8, 8), 0.5))
    assert model() is model.t and model(0, 0) is model.t  # the dummy batch is ignored
    learn = Learner(
        model,
        dummy_dls(60),
        loss_func=lambda p: F.mse_loss(p, target),
        lr=0.05,
        cbs=[ImageOptCB()],
        opt_func=torch.optim.Adam,
    )
    learn.fit(1, valid=False)
    clamped = target.clamp(0, 1)
    assert F.mse_loss(model.t, clamped) < 0.1 * F.mse_loss(torch.full_like(target, 0.5), clamped)
    assert model.t.min() >= 0 and model.t.max() <= 1  # ImageOptCB clamps after every step
    with pytest.raises(TypeError, match="t: expected a floating tensor"):
        TensorModel(torch.zeros(3, dtype=torch.long))


def test_image_log_cb_snapshots_and_grid(tmp_path):
    model = TensorModel(torch.zeros(1, 3, 6, 10))
    log = ImageLogCB(every=3, path=tmp_path / "logs" / "grid.png", ncols=4)
    learn = Learner(
        model,
        dummy_dls(7),
        loss_func=lambda p: (p - 1).square().mean(),
        lr=0.1,
        cbs=[ImageOptCB(), log],
        opt_func=torch.optim.SGD,
    )
    learn.fit(1, valid=False)
    assert log.steps == [0, 3, 6, 7] and len(log.images) == 4
    assert torch.equal(log.images[0], torch.zeros(3, 6, 10))
    assert log.images[1].mean() < log.images[2].mean() < log.images[3].mean()  # progress kept
    grid = np.asarray(Image.open(tmp_path / "logs" / "grid.png"))
    assert grid.shape == (2 + 6 + 2, 2 + 4 * (10 + 2), 3)
    with pytest.raises(ValueError, match="every: expected a positive int"):
        ImageLogCB(every=0)


def test_content_loss_zero_for_identical_inputs(feats):
    img = builtin_content("landscape", 24)
    fs = feats(img)
    assert content_loss(fs, [f.clone() for f in fs]).item() == 0.0
    assert content_loss(fs, [f + 0.1 for f in fs]).item() > 0
    other = builtin_texture("dots", 24)
    loss = StyleTransferLoss(feats, img, other, **LAYERS, style_weight=0.0)
    assert loss(img).item() == 0.0 and loss(other).item() > 0
    style_only = StyleTransferLoss(feats, img, other, **LAYERS, content_weight=0.0)
    assert style_only(other).item() < 1e-6 < style_only(img).item()


def test_style_transfer_loss_is_relative(feats):
    """Each layer's term is divided by its target's mean square: scaling the features by k
    (another network's scale) leaves the loss unchanged."""
    c, s = builtin_content("landscape", 24), builtin_texture("dots", 24)
    x = torch.rand(1, 3, 24, 24)
    base = StyleTransferLoss(feats, c, s, **LAYERS)(x)

    class Scaled(torch.nn.Module):
        layers = feats.layers

        def forward(self, img):
            return [3.0 * f for f in feats(img)]

    torch.testing.assert_close(StyleTransferLoss(Scaled(), c, s, **LAYERS)(x), base)
    with pytest.raises(ValueError, match="style_layers: layers \\[25, 18\\] are not among"):
        StyleTransferLoss(feats, c, s, content_layers=("relu5_1",))


def test_stylize_lowers_the_loss(feats):
    c, s = builtin_content("landscape", 32), builtin_texture("dots", 32)
    loss = StyleTransferLoss(feats, c, s, **LAYERS, style_weight=10.0)
    for init in ("content", "random"):
        start = (
            c
            if init == "content"
            else torch.rand(c.shape, generator=torch.Generator().manual_seed(0))
        )
        out = stylize(c, s, steps=20, lr=0.05, **LAYERS, init=init, features=feats, verbose=False)
        assert out.shape == c.shape and out.min() >= 0 and out.max() <= 1
        with torch.no_grad():
            assert loss(out) < 0.7 * loss(start)


def test_stylize_amp_compile_and_log(feats, tmp_path):
    c, s = builtin_content("landscape", 24), builtin_texture("stripes", 24)
    a = stylize(c, s, steps=4, **LAYERS, features=feats, verbose=False)
    b = stylize(
        c,
        s,
        steps=4,
        **LAYERS,
        features=feats,
        compile="aot_eager",
        verbose=False,
        log_every=2,
        log_path=tmp_path / "p.png",
    )  # fullgraph: hooks, Grams, losses
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (tmp_path / "p.png").is_file()
    h = stylize(c, s, steps=4, **LAYERS, features=feats, amp="bf16", verbose=False)
    assert torch.isfinite(h).all() and (h - c).abs().max() > 0
    assert (h - a).abs().mean() < 0.05  # bf16 autocast takes about the same path


def test_stylize_with_pretrained_style_weights(tmp_path, capsys):
    from torchvision.models.vgg import cfgs, make_layers

    path = tmp_path / "vgg_features.pth"
    torch.save(make_layers(cfgs["D"][:4]).state_dict(), path)  # conv1_1..conv2_1: enough here
    c, s = builtin_content("landscape", 24), builtin_texture("checker", 24)
    out = stylize(
        c,
        s,
        steps=6,
        content_layers=("relu2_1",),
        style_layers=("relu1_1",),
        weights=str(path),
        size=20,
    )
    assert out.shape == (1, 3, 20, 20)  # size=20 resized both images
    err = capsys.readouterr().err
    assert f"weights file {path}" in err and "resized content from 24x24 to 20x20" in err


def test_stylize_bad_arguments(feats, tmp_path):
    c = builtin_content("landscape", 16)
    for kwargs, match in [
        (dict(steps=0), "steps: expected a positive int"),
        (dict(lr=0.0), "lr: expected a positive"),
        (dict(init="zeros"), "init: expected 'content' or 'random'"),
        (dict(style_weight=-1.0), "style_weight: expected a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            stylize(c, c, features=feats, verbose=False, **kwargs)
    with pytest.raises(ValueError, match="no such file"):
        stylize(tmp_path / "nope.png", c, features=feats, verbose=False)
    with pytest.raises(ValueError, match="content: expected shape"):
        stylize(torch.rand(2, 3, 8, 8), c, features=feats, verbose=False)


# ----- the CLI -----
def _cli(capsys, *argv):
    code = main(["stylize", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_runs_and_writes_output(tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "out.png"
    code, stdout, err = _cli(
        capsys,
        "builtin:landscape",
        "builtin:dots",
        "-o",
        out,
        "--size",
        24,
        "--steps",
        3,
        "--weights",
        "random",
        "--log-every",
        2,
    )
    assert code == 0, err
    assert np.asarray(Image.open(out)).shape == (24, 24, 3)
    assert (tmp_path / "new" / "dir" / "out_progress.png").is_file()
    assert "offline fallback" in err and "wrote" in stdout and "3 steps" in stdout
    out.write_bytes(b"old")  # an existing output is replaced
    code, _, _ = _cli(capsys, "--demo", "-o", out, "--size", 20, "--steps", 2, "-q", "--amp")
    assert code == 0 and Image.open(out).size == (20, 20)
    assert Image.open(tmp_path / "new" / "dir" / "out_grid.png").size == (2 + 3 * 22, 24)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "out.png",
        "out_grid.png",
        "out_progress.png",
    ]


def test_cli_bad_images_exit_2_one_line(tmp_path, capsys):
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ok)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    cases = [
        ((tmp_path / "missing.png", ok), "CONTENT: .*missing.png': no such file"),
        ((ok, tmp_path), "STYLE: .* is a directory"),
        ((tmp_path / "notes.txt", ok), "CONTENT: .*notes.txt' is not an image file"),
        ((ok, tmp_path / "fake.png"), "STYLE: .*fake.png' (is not an image|could not be decoded)"),
        ((ok, "builtin:nope"), "STYLE: unknown built-in image 'nope'"),
        ((ok,), "CONTENT and STYLE images are required"),
        ((ok, ok, "-o", tmp_path), "--out: .* is a directory"),
        ((ok, ok, "-o", tmp_path / "x.xyz"), "--out: cannot write '.xyz'"),
        ((ok, ok, "--device", "cuda:0"), "--device: 'cuda:0' requested but CUDA is not available"),
        ((ok, ok, "--weights", tmp_path / "w.pth"), "--weights: weights: .*w.pth' is not a file"),
        ((ok, ok, "--weights", tmp_path / "notes.txt"), "--weights: weights: cannot load"),
        (("--demo", ok), "give either --demo or CONTENT STYLE"),
    ]
    for argv, pattern in cases:
        code, stdout, err = (
            _cli(capsys, *argv, "-o", tmp_path / "o.png")
            if "-o" not in argv
            else _cli(capsys, *argv)
        )
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("fastnca stylize: error: "), err
        assert __import__("re").search(pattern, lines[0]), (pattern, lines[0])
        assert "Traceback" not in err and not (tmp_path / "o.png").exists()


def test_cli_process_exit_code(tmp_path):
    """The installed entry point: a missing file is one line on stderr and exit status 2."""
    env = {**os.environ, "FASTNCA_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "fastnca", "stylize", str(tmp_path / "a.png"), "builtin:dots"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"fastnca stylize: error: CONTENT: '{tmp_path / 'a.png'}': no such file (built-in: "
    )
