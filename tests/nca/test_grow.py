"""Growing-NCA training recipe (fastnca.nca.grow): targets, config, GrowCB on the Learner, run
directory. Tiny grids and a few iterations: behaviour, not convergence."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastnca.nca.grow import (
    TARGETS,
    GrowCB,
    builtin_target,
    circle_masks,
    growing_nca,
    load_target,
    make_grow_config,
    train_grow,
)

TINY = dict(
    target_size=8,
    padding=2,
    hidden=16,
    pool=6,
    batch=3,
    min_steps=3,
    max_steps=5,
    iters=3,
    damage=1,
)


@pytest.mark.parametrize("name", TARGETS)
def test_builtin_targets(name):
    t = builtin_target(name, 20)
    assert t.shape == (1, 4, 20, 20)
    a = t[:, 3:]
    assert (t[:, :3] <= a + 1e-6).all() and t.min() >= 0 and a.max() == 1  # premultiplied
    assert 0.2 < (a > 0.5).float().mean() < 0.9  # a shape, not empty or full
    with pytest.raises(ValueError, match="target: unknown built-in"):
        builtin_target("lizard")


def test_load_target_rgba_and_on_white(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[2:8, 5:15] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    t, what = load_target(tmp_path / "t.png", 10)  # longest side 20 -> 10
    assert t.shape == (1, 4, 5, 10) and "t.png" in what
    assert t[0, 3, 2, 5] == 1 and t[0, 3, 0, 0] == 0
    # An RGB image on white: alpha = 1 - min(rgb), shown on white it is the image again.
    rgb = np.full((6, 6, 3), 255, np.uint8)
    rgb[1:5, 1:5] = (40, 200, 120)
    Image.fromarray(rgb).save(tmp_path / "w.png")
    t, what = load_target(tmp_path / "w.png", 6)
    assert "on white" in what
    shown = 1 - t[0, 3] + t[0, :3]
    torch.testing.assert_close(
        shown.permute(1, 2, 0), torch.from_numpy(rgb / 255).float(), atol=2 / 255, rtol=0
    )
    assert t[0, 3, 0, 0] == 0 and t[0, 3, 2, 2] > 0.8
    with pytest.raises(ValueError, match="not an image file or a built-in"):
        load_target(tmp_path / "missing.png", 8)
    (tmp_path / "bad.png").write_text("no image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_target(tmp_path / "bad.png", 8)


def test_circle_masks():
    m = circle_masks(5, 16, 12, generator=torch.Generator().manual_seed(0))
    assert m.shape == (5, 1, 16, 12) and set(m.unique().tolist()) <= {0.0, 1.0}
    holes = (m == 0).flatten(1).sum(1)
    assert (holes > 0).all() and (holes < 16 * 12 / 2).all()


def test_config_presets_and_errors():
    assert make_grow_config("grow").hidden == 128 and make_grow_config("grow").damage == 3
    assert make_grow_config().preset == "grow-quick"
    for bad, match in [
        (dict(batch=0), "batch"),
        (dict(damage=3, batch=3), "damage"),
        (dict(min_steps=9, max_steps=5), "min_steps"),
        (dict(lr=0.0), "lr"),
        (dict(channels=3), "channels"),
        (dict(bogus=1), "unknown"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_grow_config(**bad)
    with pytest.raises(ValueError, match="preset"):
        make_grow_config("grow-slow")


def test_growcb_pool_reseed_damage():
    from fastnca.train.callbacks import GradNormCB
    from fastnca.train.data import dummy_dls
    from fastnca.train.learner import Learner

    cfg = make_grow_config(**TINY)
    target = torch.nn.functional.pad(builtin_target("heart", 8), (2,) * 4)
    model = growing_nca(16, 16)
    cb = GrowCB(target, cfg)
    w2 = model.w2.weight.detach().clone()
    learn = Learner(
        model,
        dummy_dls(cfg.iters),
        lambda *a: None,
        lr=cfg.lr,
        cbs=[cb, GradNormCB()],
        opt_func=torch.optim.Adam,
    )
    learn.fit(1, train=True, valid=False)
    assert cb.iteration == 3 and len(cb.losses) == 3 and np.isfinite(cb.losses).all()
    assert cb.pool.shape == (6, 16, 12, 12)
    assert not torch.equal(model.w2.weight, w2)  # it learned (w2 starts at zero)
    seed = model.seed(1, 12)
    assert seed[0, 3:, 6, 6].eq(1).all() and seed.sum() == 13


def test_train_grow_writes_run(tmp_path):
    res = train_grow("ring", tmp_path / "run", **TINY)
    files = res["files"]
    for key in ("checkpoint", "config", "target", "loss", "gif", "regen"):
        assert files[key].is_file(), key
    from fastnca.nca.checkpoint import load_checkpoint

    info = json.loads(files["config"].read_text())
    assert info["growth_mse"] == res["mse"] and 0 < res["mse"] < 1
    ck = load_checkpoint(files["checkpoint"])
    assert ck.config["grow_config"]["target_size"] == 8 and len(res["losses"]) == 3
    with Image.open(files["regen"]) as im:
        assert im.n_frames > 1


def _args(*argv):
    # The namespace `fastnca train --task grow ARGV` parses to (the real parser, its defaults).
    from fastnca.cli import build_parser

    return build_parser().parse_args(["train", "--task", "grow", "--no-progress", *argv])


def test_cli_run_grow(tmp_path):
    from fastnca.cli._common import UsageError
    from fastnca.cli._grow import run_grow

    tiny = ["--size", "8", "--batch", "3", "--pool", "6", "--hidden", "16", "--iters", "2"]
    tiny += ["--min-steps", "3", "--max-steps", "5"]
    assert run_grow(_args("smiley", "-o", str(tmp_path / "r"), *tiny)) == 0
    assert (tmp_path / "r" / "regenerate.gif").is_file()
    for argv, match in [
        (["--loss", "swd"], "--loss"),
        (["--preset", "texture"], "--preset"),
        ([str(tmp_path / "nope.png")], "target"),
        ([], "-o RUN_DIR"),
    ]:
        out = ["-o", str(tmp_path / "x")] if argv else []
        with pytest.raises(UsageError, match=match):
            run_grow(_args(*out, *tiny, *argv))
