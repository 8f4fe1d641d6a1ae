"""Mixed precision is really on where a user asks for it: probes record the dtypes autocast
produced inside the feature extractor (bfloat16) and the NCA rollout (float32 state), for texture
training, stylize and both CLI flags. Without the flag the same probes see float32 features."""

import pytest
import torch
from conftest import TINY_RUN, tiny_train_args

from fastnca.cli import main
from fastnca.nca.recipe import NCACB
from fastnca.nca.run import train_texture
from fastnca.style import features as features_mod
from fastnca.style.stylize import stylize
from fastnca.style.textures import builtin_content, builtin_texture

TINY = {**TINY_RUN, "layers": (1, 6), "save_every": 0, "iters": 1}


@pytest.fixture
def probes(monkeypatch, tmp_path):
    """dtypes seen: 'features' (VGG16Features outputs under grad), 'state' (NCA rollout results)."""
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    seen = {"features": set(), "state": set()}
    forward = features_mod.VGG16Features.forward

    def probed_forward(self, x):
        out = forward(self, x)
        if torch.is_grad_enabled():  # the trained image, not the targets (computed once, no grad)
            seen["features"] |= {f.dtype for f in out}
        return out

    rollout = NCACB.rollout

    def probed_rollout(self, x, n):
        out = rollout(self, x, n)
        seen["state"].add(out.dtype)
        return out

    monkeypatch.setattr(features_mod.VGG16Features, "forward", probed_forward)
    monkeypatch.setattr(NCACB, "rollout", probed_rollout)
    return seen


@pytest.mark.parametrize("amp, feats", [("bf16", {torch.bfloat16}), ("none", {torch.float32})])
def test_texture_training_autocasts_the_style_loss_only(probes, tmp_path, amp, feats):
    train_texture(
        None,
        tmp_path / "r",
        "quick",
        progress=False,
        gif_frames=1,
        gif_steps_per_frame=1,
        amp=amp,
        **TINY,
    )
    assert probes["features"] == feats
    assert probes["state"] == {torch.float32}  # the rollout stays float32 under autocast


def test_train_cli_amp_flag(probes, tmp_path):
    argv = [
        "train",
        "-o",
        str(tmp_path / "r"),
        "--amp",
        "bf16",
        "--iters",
        "1",
        *tiny_train_args(),
    ]
    assert main(argv) == 0
    assert probes["features"] == {torch.bfloat16} and probes["state"] == {torch.float32}


@pytest.mark.parametrize("amp, feats", [("bf16", {torch.bfloat16}), (False, {torch.float32})])
def test_stylize_autocasts_the_features(probes, amp, feats):
    c, s = builtin_content("landscape", 24), builtin_texture("stripes", 24)
    stylize(
        c,
        s,
        steps=2,
        content_layers=("relu2_1",),
        style_layers=("relu1_1",),
        weights="random",
        amp=amp,
        verbose=False,
    )
    assert probes["features"] == feats


def test_stylize_cli_amp_flag(probes, tmp_path):
    argv = [
        "stylize",
        "builtin:landscape",
        "builtin:dots",
        "-o",
        str(tmp_path / "o.png"),
        "--size",
        "24",
        "--steps",
        "2",
        "--weights",
        "random",
        "-q",
        "--amp",
    ]
    assert main(argv) == 0
    assert probes["features"] == {torch.bfloat16}
