"""Rendering: grow on any grid size, frame counts and sizes, GIF/MP4 writing, loss plot."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastnca.nca.checkpoint import save_checkpoint
from fastnca.nca.model import NCA
from fastnca.nca.render import (
    MissingDependencyError,
    grow,
    plot_losses,
    pool_image,
    render,
    write_animation,
)


def _model():
    torch.manual_seed(3)
    m = NCA(channels=4, hidden=8)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("size", [(7, 12), 5])
def test_grow_frames_on_any_grid_size(size):
    m = _model()
    rng = torch.get_rng_state()
    frames = grow(m, size, frames=4, steps_per_frame=2, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    h, w = (size, size) if isinstance(size, int) else size
    assert len(frames) == 4
    assert all(f.shape == (h, w, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[-1])  # it changes as it grows
    again = grow(m, size, frames=4, steps_per_frame=2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(frames, again, strict=True))
    # frame k is the state after (k + 1) * steps_per_frame steps
    with torch.random.fork_rng():
        torch.manual_seed(5)
        with torch.no_grad():
            x = m(m.seed(1, (h, w)), steps=4)
            want = (m.to_rgb(x)[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0)
    np.testing.assert_array_equal(frames[1], want.numpy())


def test_grow_rejects_bad_sizes():
    m = _model()
    for bad in (0, (3, 0), (2, 3, 4), 2.5):
        with pytest.raises(ValueError, match="size"):
            grow(m, bad, frames=1)
    with pytest.raises(ValueError, match="frames"):
        grow(m, 4, frames=0)


def test_gif_frames_size_and_loop(tmp_path):
    frames = [np.full((5, 7, 3), 40 * i, np.uint8) for i in range(5)]
    p = write_animation(frames, tmp_path / "a.gif", fps=10, scale=3)
    with Image.open(p) as im:
        assert im.n_frames == 5 and im.size == (21, 15)
        assert im.info.get("loop") == 0 and im.info.get("duration") == 100
        im.seek(4)
        assert np.asarray(im.convert("RGB"))[0, 0].tolist() == [160, 160, 160]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.gif"]  # no temp files left


def test_mp4_without_imageio_ffmpeg_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if missing
    frames = [np.zeros((4, 4, 3), np.uint8)]
    with pytest.raises(MissingDependencyError, match="pip install imageio-ffmpeg.*gif"):
        write_animation(frames, tmp_path / "a.mp4")
    with pytest.raises(ValueError, match=".gif or .mp4"):
        write_animation(frames, tmp_path / "a.avi")
    assert list(tmp_path.iterdir()) == []


def test_render_from_checkpoint_writes_animation_and_png(tmp_path, monkeypatch):
    m = _model()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", m)
    res = render(
        tmp_path / "run",
        tmp_path / "out" / "g.gif",
        size=(6, 10),
        frames=3,
        steps_per_frame=2,
        scale=2,
    )
    assert res["frames"] == 3 and res["size"] == (12, 20) and res["steps"] == 6
    with Image.open(res["animation"]) as im:
        assert im.n_frames == 3 and im.size == (20, 12)
    with Image.open(tmp_path / "out" / "g.png") as im:
        assert im.size == (20, 12)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(MissingDependencyError):
        render(tmp_path / "run", tmp_path / "g.mp4", size=4, frames=1)


def test_plot_losses_and_pool_image(tmp_path):
    p = plot_losses([3.0, 2.0, float("nan"), 1.5, 0.7] * 20, tmp_path / "loss.png", title="t")
    with Image.open(p) as im:
        assert im.size == (640, 360)
        a = np.asarray(im.convert("RGB"))
    assert (a[..., 2] > a[..., 0] + 60).any()  # the blue curve was drawn
    plot_losses([], tmp_path / "empty.png")
    plot_losses([1.0], tmp_path / "one.png")
    g = pool_image(torch.rand(5, 3, 8, 8), min_side=64)
    assert g.shape[0] == 3 and min(g.shape[1:]) >= 64


def test_mp4_is_written_and_reads_back(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # in the dev extra
    frames = [np.full((9, 11, 3), v, np.uint8) for v in (30, 130, 230)]  # odd sides: padded
    p = write_animation(frames, tmp_path / "a.mp4", fps=10, scale=2)
    reader = imageio_ffmpeg.read_frames(str(p))
    meta = next(reader)
    back = [np.frombuffer(f, np.uint8) for f in reader]
    assert meta["size"] == (22, 18) and len(back) == 3
    assert [int(round(f.mean())) for f in back] == pytest.approx([30, 130, 230], abs=6)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.mp4"]  # no temp file left
