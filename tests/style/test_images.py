"""Image loading (modes, resizing, every bad input), atomic saving, grids, built-in textures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastnca.style.images import ImageError, image_grid, load_image, save_image, to_uint8
from fastnca.style.textures import (
    builtin_content,
    builtin_texture,
    list_content,
    list_textures,
)


def _rgb(h=12, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_roundtrip_exact(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert t.shape == (1, 3, 12, 20) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1
    np.testing.assert_array_equal(to_uint8(t), a)
    save_image(t, tmp_path / "b.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), a)


def test_jpeg_and_modes_become_rgb(tmp_path):
    a = _rgb(16, 16)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    t = load_image(tmp_path / "a.jpg")
    assert t.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(to_uint8(t), np.asarray(Image.open(tmp_path / "a.jpg")))
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (1, 3, 6, 8)
    torch.testing.assert_close(g[0, 0], torch.from_numpy(gray).float() / 255)
    assert torch.equal(g[0, 0], g[0, 2])
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit gray
    torch.testing.assert_close(load_image(tmp_path / "g16.png"), g, atol=1 / 255, rtol=0)
    Image.fromarray(a).convert("P", palette=Image.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (1, 3, 16, 16)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red...
    rgba[:2, :, 3] = 255  # ...opaque in the top half, transparent below -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    t = load_image(tmp_path / "t.png")
    assert torch.equal(t[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(t[0, :, 3, 0], torch.ones(3))


def test_resize_keeps_aspect_and_says_so(tmp_path, capsys):
    Image.fromarray(_rgb(60, 90)).save(tmp_path / "big.png")
    t = load_image(tmp_path / "big.png", size=30)
    assert t.shape == (1, 3, 20, 30)
    assert "resized big.png from 90x60 to 30x20" in capsys.readouterr().err
    assert load_image(tmp_path / "big.png", size=90).shape == (1, 3, 60, 90)  # not enlarged
    assert capsys.readouterr().err == ""
    Image.fromarray(_rgb(200, 120)).save(tmp_path / "big.jpg")  # JPEG draft path
    assert load_image(tmp_path / "big.jpg", size=50, verbose=False).shape == (1, 3, 50, 30)
    with pytest.raises(ValueError, match="size: expected a positive int"):
        load_image(tmp_path / "big.png", size=0)


def test_bad_inputs_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not an image\n")
    Image.fromarray(_rgb(32, 32)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = {
        tmp_path / "missing.png": "no such file",
        tmp_path: "is a directory",
        tmp_path / "notes.txt": "is not an image file",
        tmp_path / "cut.png": "could not be decoded",
    }
    for path, msg in cases.items():
        with pytest.raises(ImageError, match=msg) as e:
            load_image(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert isinstance(e.value, ValueError)


def test_save_atomic_creates_dirs_and_replaces(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out.png"
    save_image(torch.zeros(1, 3, 5, 7), out)
    assert out.is_file() and np.asarray(Image.open(out)).shape == (5, 7, 3)
    old_inode = os.stat(out).st_ino
    save_image(torch.full((3, 5, 7), 2.0), out)  # clamped to 1 -> white, replaced as a new file
    assert np.asarray(Image.open(out)).min() == 255 and os.stat(out).st_ino != old_inode
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png"]  # no temp left behind

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)  # a failed write keeps the old file intact
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.zeros(3, 5, 7), out)
    assert np.asarray(Image.open(out)).min() == 255
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png"]
    monkeypatch.undo()
    save_image(torch.rand(8, 8), tmp_path / "gray.jpg")
    assert Image.open(tmp_path / "gray.jpg").format == "JPEG"
    with pytest.raises(ValueError, match="path: cannot save images as '.xyz'"):
        save_image(torch.zeros(3, 4, 4), tmp_path / "x.xyz")
    with pytest.raises(ValueError, match="img: expected a single image"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "x.png")


def test_image_grid_layout():
    ims = [torch.full((3, 4, 6), v) for v in (0.1, 0.2, 0.3)]
    g = image_grid(ims, ncols=2, pad=1, pad_value=1.0)
    assert g.shape == (3, 1 + 2 * 5, 1 + 2 * 7)
    assert torch.all(g[:, 1:5, 1:7] == 0.1) and torch.all(g[:, 1:5, 8:14] == 0.2)
    assert torch.all(g[:, 6:10, 1:7] == 0.3) and torch.all(g[:, 6:10, 8:14] == 1.0)  # empty cell
    assert torch.all(g[:, 0] == 1.0) and torch.all(g[:, :, 7] == 1.0)
    assert image_grid(torch.rand(4, 1, 3, 3), pad=0).shape == (3, 6, 6)  # gray batch, 2 x 2
    with pytest.raises(ValueError, match="images: all images must have one shape"):
        image_grid([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)])


@pytest.mark.parametrize("name", list_textures())
def test_builtin_textures_tile_and_are_colourful(name):
    t = builtin_texture(name, 64)
    assert t.shape == (1, 3, 64, 64) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1 and t.std() > 0.15
    # seamless: the jump across the wrap edge is like the jumps inside the image
    inner = (t[..., 1:, :] - t[..., :-1, :]).abs().mean(), (t[..., 1:] - t[..., :-1]).abs().mean()
    wrap = (t[..., 0, :] - t[..., -1, :]).abs().mean(), (t[..., 0] - t[..., -1]).abs().mean()
    assert wrap[0] < 2.5 * inner[0] and wrap[1] < 2.5 * inner[1]
    hues = t[0].reshape(3, -1).T.mul(4).round().unique(dim=0)
    assert len(hues) >= 6  # several distinct colours
    assert torch.equal(t, builtin_texture(name, 64))  # deterministic
    assert builtin_texture(name, (32, 48)).shape == (1, 3, 32, 48)


def test_builtin_content_and_errors():
    assert list_content() == ["landscape"] and len(list_textures()) >= 3
    c = builtin_content("landscape", (48, 64))
    assert c.shape == (1, 3, 48, 64) and c.std() > 0.1
    with pytest.raises(ValueError, match="name: unknown texture 'nope'; built-in textures: "):
        builtin_texture("nope")
    with pytest.raises(ValueError, match="size: expected an int >= 8"):
        builtin_texture("dots", 4)


def test_exif_rotation_is_applied(tmp_path):
    """A camera JPEG stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to
    view) loads upright: portrait, with the stored left column on top."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = (250, 0, 0)  # red band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "cam.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "cam.jpg", verbose=False)
    assert tuple(img.shape) == (1, 3, 40, 20)
    assert img[0, 0, :8].mean() > 0.8 and img[0, 0, -8:].mean() < 0.2  # red on top


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (12, 10), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow
    cmyk.save(tmp_path / "print.jpg", quality=95)
    img = load_image(tmp_path / "print.jpg", verbose=False)
    assert tuple(img.shape) == (1, 3, 10, 12)
    r, g, b = img[0].mean(dim=(1, 2)).tolist()
    assert r > 0.9 and g < 0.1 and b < 0.1  # red, as printed
