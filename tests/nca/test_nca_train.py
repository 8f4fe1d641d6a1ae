"""Texture NCA training: presets, config checks, pool bookkeeping, loss, training, resume."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN
from torch import nn

from fastnca.losses import overflow_loss
from fastnca.nca.config import PRESETS, make_config
from fastnca.nca.recipe import NCACB, TextureLoss, TrainingDiverged, training_rgb
from fastnca.nca.run import train_texture

# Tiny runs: 16x16 grids, few steps, random (offline) features at two layers.
TINY = {
    **TINY_RUN,
    **dict(hidden=12, pool=6, min_steps=3, max_steps=6, layers=(1, 6), seed_every=2, save_every=0),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")


def test_presets_reproduce_lesson_and_distill_numbers():
    lesson, tex = make_config("lesson"), make_config("texture")
    assert (lesson.channels, lesson.hidden, lesson.pool, lesson.size, lesson.batch) == (
        4,
        8,
        256,
        256,
        4,
    )
    assert (lesson.min_steps, lesson.max_steps, lesson.style_weight, lesson.lr, lesson.iters) == (
        32,
        96,
        0.1,
        1e-3,
        1200,
    )
    assert lesson.seed_prob == 1 / 8 and lesson.lr_milestones == ()  # reseed 1 in 8, constant lr
    assert (tex.channels, tex.hidden, tex.pool, tex.size, tex.batch) == (12, 96, 256, 128, 4)
    assert (tex.min_steps, tex.max_steps, tex.lr, tex.iters) == (32, 96, 1e-3, 4000)
    assert tex.lr_milestones == (2000,) and tex.lr_gamma == 0.3 and tex.seed_every == 8
    quick = make_config("quick")
    assert quick.size <= 64 and quick.iters * quick.max_steps < tex.iters * tex.max_steps
    assert set(PRESETS) == {"quick", "lesson", "texture"}
    assert make_config("texture", size=64, lr=None).size == 64  # None = keep the preset's


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(size=0), "size"),
        (dict(batch=-1), "batch"),
        (dict(iters=0), "iters"),
        (dict(min_steps=10, max_steps=5), "min_steps (10) > max_steps (5)"),
        (dict(pool=2, batch=4), "pool (2) is smaller than batch (4)"),
        (dict(loss="l2"), "loss"),
        (dict(amp="fp8"), "amp"),
        (dict(lr=0.0), "lr"),
        (dict(size=2.5), "size"),
        (dict(seed_prob=2.0), "seed_prob"),
    ],
)
def test_config_errors_name_the_argument(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make_config("quick", **kw)


def test_unknown_preset_and_option():
    with pytest.raises(ValueError, match="preset: expected one of quick, lesson, texture"):
        make_config("huge")
    with pytest.raises(TypeError, match="unknown training option"):
        make_config("quick", sizes=3)


class CountingNCA(nn.Module):
    """Stub NCA: each step adds 1 to every cell, so a pool value counts the steps it went
    through; seed grids are zeros."""

    def __init__(self, channels=2):
        super().__init__()
        self.channels = channels
        self.w = nn.Parameter(torch.zeros(()))
        self.inputs = []

    def seed(self, batch, size):
        return torch.zeros(batch, self.channels, size, size)

    def forward(self, x, steps=1):
        self.inputs.append(x.detach().clone())
        return x + 1 + 0 * self.w

    def to_rgb(self, x):
        return x[:, :1].expand(-1, 3, -1, -1) / 100


def _learner(model, loss_func=lambda rgb: rgb.mean()):
    return SimpleNamespace(model=model, loss_func=loss_func, training=True)


def test_pool_sampled_without_replacement_and_written_back():
    model = CountingNCA()
    cb = NCACB(pool=8, size=3, batch=5, min_steps=2, max_steps=7, seed_every=0, seed_prob=0.0)
    learn = _learner(model)
    cb.before_fit(learn)
    before = cb.pool.clone()
    seen_steps = set()
    for _ in range(30):
        cb.predict(learn)
        idx = cb.last_idx
        assert len(set(idx.tolist())) == 5  # without replacement
        torch.testing.assert_close(cb.pool[idx], learn.preds.detach())  # written back
        rest = torch.ones(8, dtype=torch.bool)
        rest[idx] = False
        torch.testing.assert_close(cb.pool[rest], before[rest])  # others untouched
        torch.testing.assert_close(
            learn.preds - before[idx], torch.full_like(learn.preds, cb.last_steps)
        )
        assert 2 <= cb.last_steps < 7
        seen_steps.add(cb.last_steps)
        before = cb.pool.clone()
        cb.iteration += 1
    assert seen_steps == set(range(2, 7))
    cb_fixed = NCACB(pool=4, size=3, batch=2, min_steps=3, max_steps=3)
    assert all(cb_fixed.n_steps() == 3 for _ in range(5))  # min == max: exactly min


def test_reseed_every_k_iterations_puts_a_seed_grid_first():
    model = CountingNCA()
    cb = NCACB(pool=6, size=3, batch=3, min_steps=1, max_steps=2, seed_every=3, seed_prob=0.0)
    learn = _learner(model)
    cb.before_fit(learn)
    starts = []
    for it in range(9):
        cb.pool.fill_(50.0)  # a grown pool: a reseeded sample starts from 0 instead
        model.inputs.clear()
        cb.predict(learn)
        starts.append(float(model.inputs[0][0].max()))
        cb.after_step(SimpleNamespace(loss=torch.tensor(1.0)))
        assert cb.iteration == it + 1
    reseeded = [i for i, s in enumerate(starts) if s < 50]
    assert reseeded == [0, 3, 6] and cb.n_reseeds == 3


def test_reseed_probability_rate():
    cb = NCACB(pool=4, size=2, batch=1, min_steps=1, max_steps=1, seed_every=0, seed_prob=0.25)
    n = 2000
    hits = sum(cb.reseed_due() for _ in range(n))
    assert abs(hits / n - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5


@pytest.mark.parametrize("normalise", [False, True])
def test_loss_is_overflow_plus_weighted_style(normalise):
    x = torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.5]).reshape(1, 5, 1, 1)
    over = overflow_loss(x, normalise=normalise)
    want = torch.tensor(3.5 / 5 if normalise else 3.5)  # |-3+1| + |2.5-1|
    torch.testing.assert_close(over, want)
    cb = NCACB(
        pool=4,
        size=1,
        batch=1,
        min_steps=1,
        max_steps=1,
        style_weight=0.25,
        overflow_normalise=normalise,
    )
    model = CountingNCA(channels=5)
    learn = _learner(model, loss_func=lambda rgb: torch.tensor(8.0))
    learn.preds = x
    cb.get_loss(learn)
    torch.testing.assert_close(learn.loss, want + 0.25 * 8.0)


def test_texture_loss_zero_on_its_own_style():
    from fastnca.style.features import VGG16Features
    from fastnca.style.textures import builtin_texture

    style = builtin_texture("dots", 32)
    for kind in ("gram", "swd"):
        loss = TextureLoss(style, VGG16Features((1, 6), weights="random", verbose=False), kind)
        assert float(loss(style)) < 1e-6
        assert float(loss(torch.full_like(style, 0.5))) > 1e-4


def _eval_loss(model, loss_func, steps=5, n=2):
    """Style + overflow loss of fixed-seed rollouts from the seed grid."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        with torch.no_grad():
            x = model(model.seed(n, 16), steps=steps)
            return float(overflow_loss(x) + loss_func(training_rgb(x)))


def test_a_few_iterations_lower_the_loss(tmp_path):
    from fastnca.nca.recipe import build_model
    from fastnca.nca.run import resolve_style
    from fastnca.style.features import VGG16Features

    cfg = make_config("quick", **TINY)
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg)
    style, _ = resolve_style(None, 16, cfg.texture)
    loss_func = TextureLoss(
        style, VGG16Features((1, 6), weights="random", verbose=False), relative=cfg.relative_style
    )  # the training objective
    res = train_texture(
        None,
        tmp_path / "run",
        "quick",
        progress=False,
        gif_frames=2,
        gif_steps_per_frame=2,
        **dict(TINY, iters=8, lr=1e-2),
    )
    assert len(res.losses) == 8 and all(torch.isfinite(torch.tensor(res.losses)))
    assert _eval_loss(res.model, loss_func) < 0.9 * _eval_loss(fresh, loss_func)
    for name in ("config.json", "checkpoint.pt", "style.png", "pool.png", "loss.png", "growth.gif"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == [
        ".lock"
    ]  # no temp file left


def test_resume_continues_the_same_loss_curve(tmp_path):
    kw = dict(progress=False, gif_frames=1, gif_steps_per_frame=1, **TINY)
    straight = train_texture(None, tmp_path / "a", "quick", **dict(kw, iters=4)).losses
    first = train_texture(None, tmp_path / "b", "quick", **dict(kw, iters=2)).losses
    assert first == straight[:2]
    resumed = train_texture(
        resume=tmp_path / "b", iters=4, progress=False, gif_frames=1, gif_steps_per_frame=1
    )
    assert len(resumed.losses) == 4
    assert resumed.losses == straight  # bit-identical: pool, optimiser, schedule and RNG restored
    with pytest.raises(ValueError, match="size cannot change when resuming"):
        train_texture(resume=tmp_path / "b", iters=6, size=32)
    with pytest.raises(ValueError, match="already has 4 iterations"):
        train_texture(resume=tmp_path / "b", iters=4)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_at_an_iteration_boundary_and_resume_is_exact(tmp_path, monkeypatch, signum):
    """SIGINT (Ctrl-C) or SIGTERM mid-iteration: the iteration finishes, the run saves and stops;
    --resume then gives the unbroken run's loss curve bit for bit."""
    from fastnca.nca.checkpoint import load_checkpoint
    from fastnca.nca.rundir import TrainingStopped

    kw = dict(progress=False, gif_frames=1, gif_steps_per_frame=1, **TINY)
    straight = train_texture(None, tmp_path / "a", "quick", **dict(kw, iters=5)).losses
    orig = NCACB.predict

    def signal_in_iteration_3(self, learn):
        if self.iteration == 2:  # the signal lands inside iteration 3, before its rollout
            os.kill(os.getpid(), signum)
        orig(self, learn)

    monkeypatch.setattr(NCACB, "predict", signal_in_iteration_3)
    with pytest.raises(TrainingStopped, match="stopped after 3 iterations") as e:
        train_texture(None, tmp_path / "r", "quick", **dict(kw, iters=5))
    assert e.value.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    monkeypatch.setattr(NCACB, "predict", orig)
    ck = tmp_path / "r" / "checkpoint.pt"
    assert load_checkpoint(ck).iteration == 3
    resumed = train_texture(resume=tmp_path / "r", iters=5, **kw)
    assert resumed.losses == straight


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train_texture(
        None,
        tmp_path / "r",
        "quick",
        progress=False,
        gif_frames=1,
        gif_steps_per_frame=1,
        **dict(TINY, iters=2),
    )
    ck = tmp_path / "r" / "checkpoint.pt"
    good = ck.read_bytes()
    orig_loss = NCACB.get_loss

    def nan_loss(self, learn):
        orig_loss(self, learn)
        learn.loss = learn.loss * float("nan")

    monkeypatch.setattr(NCACB, "get_loss", nan_loss)
    with pytest.raises(TrainingDiverged, match="diverged at iteration 3"):
        train_texture(resume=tmp_path / "r", iters=5, progress=False)
    assert ck.read_bytes() == good  # the good checkpoint is untouched
    with pytest.raises(ValueError, match="already holds a trained NCA"):
        train_texture(None, tmp_path / "r", "quick", progress=False, **TINY)
    assert ck.read_bytes() == good


def test_compiled_step_is_compiled_once_for_all_rollout_lengths():
    from torch._dynamo.utils import counters

    from fastnca.nca.recipe import build_model

    torch._dynamo.reset()
    counters.clear()
    model = build_model(make_config("quick", **TINY))
    cb = NCACB(
        pool=4,
        size=8,
        batch=2,
        min_steps=2,
        max_steps=7,
        compile=True,
        compile_kwargs=dict(backend="aot_eager"),
    )
    learn = _learner(model)
    cb.before_fit(learn)
    cb.predict(learn)
    # One graph for the step (plus at most one for the first step, whose input needs no grad).
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2
    lengths = {cb.last_steps}
    for _ in range(5):
        cb.predict(learn)
        lengths.add(cb.last_steps)
    assert len(lengths) > 1
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph per rollout length
    torch._dynamo.reset()


def test_bf16_autocast_training_runs(tmp_path):
    res = train_texture(
        None,
        tmp_path / "bf",
        "quick",
        progress=False,
        gif_frames=1,
        gif_steps_per_frame=1,
        amp="bf16",
        **dict(TINY, iters=2),
    )
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))


def test_resolve_style_file_builtin_name_and_default(tmp_path):
    from fastnca.nca.run import resolve_style
    from fastnca.style.images import save_image

    img, what = resolve_style("dots", 16, texture="stripes")  # a name given wins over texture
    assert what == "built-in texture 'dots'" and img.shape == (1, 3, 16, 16)
    assert resolve_style(None, 16, "stripes")[1] == "built-in texture 'stripes'"
    save_image(torch.rand(3, 40, 30), tmp_path / "s.png")
    img, what = resolve_style(tmp_path / "s.png", 24)
    assert img.shape == (1, 3, 24, 18) and "s.png" in what  # shrunk to the grid size
    with pytest.raises(ValueError, match="shorter side is under 16 px"):
        resolve_style(tmp_path / "s.png", 20)  # 20x15: too small for relu5_1
    assert torch.equal(img, (img * 255).round() / 255)  # 8-bit levels, as style.png stores
    with pytest.raises(ValueError, match="built-in: builtin:"):
        resolve_style(tmp_path / "nope.png", 16)
