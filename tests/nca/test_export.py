"""fastnca.nca.export: the self-contained WebGL2 page and its parity with PyTorch.

Parity: the page's test mode (``#test=64&seed=S&size=HxW``) runs 64 steps from the hashed noise
state with the hashed update masks and writes the float32 state into the DOM; PyTorch runs the
same 64 steps (``hash_state``, ``hash_mask``, fastnca's own step). Both compute in float32 but sum
in different orders, so they drift apart by a few float32 ulps per step: the documented tolerance
is PARITY_ATOL = 1e-4 absolute after 64 steps on states of magnitude ~1 (measured: ~1e-6). The
browser tests need a chromium binary (Debian: ``apt-get install -y chromium``) and are skipped,
saying so, only when there is none.
"""

import base64
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastnca import DISTILL_FILTERS, NCA
from fastnca.nca import export
from fastnca.nca.distill import GROWING, load_distill
from fastnca.nca.export import (
    export_html,
    find_chromium,
    hash_mask,
    hash_state,
    read_state,
    run_headless,
    seed_state,
)

PARITY_ATOL = 1e-4
DATA = Path(__file__).resolve().parents[1] / "data"
STEPS, H, W = 64, 24, 40  # non-square, so a transposed layout fails
TEXTURE_CLIP = {
    "perception": (-2.0, 2.0),
    "hidden": (0.0, 2.0),
    "update": (-0.02, 0.02),
    "state": (-1.0, None),
}
# CI sets FASTNCA_REQUIRE_CHROMIUM=1: there a missing browser fails instead of skipping.
REQUIRE_CHROMIUM = os.environ.get("FASTNCA_REQUIRE_CHROMIUM") == "1"
needs_chromium = pytest.mark.skipif(
    find_chromium() is None and not REQUIRE_CHROMIUM,
    reason="no chromium binary on PATH: the browser parity tests need Debian's chromium "
    "(apt-get install -y chromium)",
)


def randomize(model, s1=0.1, s2=0.01):
    """Non-zero weights that keep 64 steps bounded (|state| of order 1) but changing."""
    with torch.no_grad():
        for conv, s in ((model.w1, s1), (model.w2, s2)):
            conv.weight.normal_(0, s)
            if conv.bias is not None:
                conv.bias.normal_(0, s)
    return model


def growing_model(**extra):
    """The growing NCA's architecture (16 channels, 128 hidden, 3 filters, zero padding, alive
    masking), rotated filters, with weights that keep most cells alive for 64 steps."""
    m = randomize(NCA(**{**GROWING, "perception_angle": 0.4, **extra}))
    with torch.no_grad():
        m.w2.bias[3] = -0.01  # alpha drifts down: some cells die, most live (checked below)
    return m


def torch_steps(model, x, steps, seed):
    """``steps`` steps of fastnca's step with the page's masks."""
    H, W = x.shape[-2:]
    with torch.no_grad():
        for s in range(steps):
            x = model.step(x, hash_mask(seed, s, H, W, model.fire_rate))
    return x


def page_state(tmp_path, model, seed, fragment=""):
    page = export_html(model, tmp_path / "nca.html")
    dom = run_headless(page, f"test={STEPS}&seed={seed}&size={H}x{W}{fragment}")
    return read_state(dom)


# ----------------------------------------------------------------------------- browser parity
@needs_chromium
@pytest.mark.parametrize("preset", ["lesson", "texture", "texture-weights-texture", "clip"])
def test_page_matches_pytorch_after_64_steps(tmp_path, preset):
    if preset == "lesson":
        model = randomize(NCA.fastai())
    elif preset == "clip":
        model = randomize(NCA.texture(bias2=True, clip=TEXTURE_CLIP), s2=0.05)
    else:
        model = randomize(NCA.texture())
    # "texture-weights-texture": the page's other weight path (weights read from a texture).
    frag = "&weights=texture" if preset.endswith("weights-texture") else ""
    got = page_state(tmp_path, model, seed=3, fragment=frag)
    x0 = hash_state(3, model.channels, H, W)
    want = torch_steps(model, x0, STEPS, seed=3)
    assert got.shape == want.shape == (1, model.channels, H, W)
    assert (want - x0).abs().max() > 0.1, "the test model must change the state"
    diff = (got - want).abs().max().item()
    assert diff <= PARITY_ATOL, f"{preset}: page vs PyTorch max abs diff {diff:.3g} after 64 steps"


@needs_chromium
def test_page_matches_pytorch_growing_model(tmp_path):
    model = growing_model()
    got = page_state(tmp_path, model, seed=5)
    want = torch_steps(model, hash_state(5, 16, H, W), STEPS, seed=5)
    alive = (want[:, 3] != 0).float().mean().item()
    assert 0.2 < alive < 0.95, f"alive masking must kill some cells and keep most ({alive:.2f})"
    diff = (got - want).abs().max().item()
    assert diff <= PARITY_ATOL, f"growing: page vs PyTorch max abs diff {diff:.3g} after 64 steps"


@needs_chromium
@pytest.mark.parametrize("c,hidden,nf", [(3, 1, 1), (5, 7, 2)])
def test_page_matches_pytorch_odd_sizes(tmp_path, c, hidden, nf):
    # Channel and hidden counts that are not multiples of 4, one or two random filters.
    model = randomize(NCA(c, hidden, 0.5, torch.randn(nf, 3, 3) * 0.3, bias2=True), s1=0.05)
    page = export_html(model, tmp_path / "nca.html")
    got = read_state(run_headless(page, "test=8&seed=1&size=12x10"))
    want = torch_steps(model, hash_state(1, c, 12, 10), 8, seed=1)
    assert (got - want).abs().max().item() <= PARITY_ATOL


@needs_chromium
@pytest.mark.parametrize(
    "file,name,init",
    [("ex3_1f98e_lizard.json", None, "centre"), ("textures_subset.json", "bubbly_0101", "zeros")],
)
def test_page_matches_pytorch_published_models(tmp_path, file, name, init):
    # The Distill authors' own models (tests/data/SOURCE.md) from their own seeds: the lizard
    # grows from one cell (zero padding, alive masking), bubbly from zeros (clipping, rgb/2).
    model = load_distill(DATA / file, name)
    page = export_html(model, tmp_path / "nca.html")
    d = _data(page.read_text())
    assert d["display"] == ("premultiplied" if init == "centre" else "rgb/2")
    got = read_state(run_headless(page, f"test={STEPS}&seed=2&size={H}x{W}&init={init}"))
    x0 = seed_state(init, model.channels, H, W)
    want = torch_steps(model, x0, STEPS, seed=2)
    assert (want - x0).abs().max() > 0.1
    diff = (got - want).abs().max().item()
    assert diff <= PARITY_ATOL, f"{file}: page vs PyTorch max abs diff {diff:.3g} after 64 steps"


@needs_chromium
def test_page_brush_erases_a_disc_of_cells(tmp_path):
    model = randomize(NCA.fastai())
    page = export_html(model, tmp_path / "nca.html")
    got = read_state(run_headless(page, "test=4&seed=1&size=20x30&erase=10.5,5.5,4"))
    want = torch_steps(model, hash_state(1, 4, 20, 30), 4, seed=1)
    yy, xx = torch.meshgrid(torch.arange(20) + 0.5, torch.arange(30) + 0.5, indexing="ij")
    disc = (xx - 10.5) ** 2 + (yy - 5.5) ** 2 <= 16  # cell centres within radius 4 of (x, y)
    assert disc.sum() > 40 and (got[0, :, disc] == 0).all()
    assert (got - want)[0, :, ~disc].abs().max() <= PARITY_ATOL


@needs_chromium
def test_page_says_so_without_webgl2_or_when_the_grid_is_too_big(tmp_path):
    page = export_html(NCA.fastai(), tmp_path / "nca.html")
    dom = run_headless(page, "test=1", extra_flags=("--disable-3d-apis",))
    assert "This page needs WebGL2" in dom
    dom = run_headless(page, "test=1&size=9000")  # past SwiftShader's 8192 texels a side
    assert "Choose a smaller grid" in dom


# ----------------------------------------------------------------------------- masks and states
def test_hash_mask_rate_and_determinism():
    m = hash_mask(7, 0, 64, 64, 0.5)
    assert m.shape == (1, 1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - 0.5) < 0.03
    assert torch.equal(m, hash_mask(7, 0, 64, 64, 0.5))
    assert not torch.equal(m, hash_mask(7, 1, 64, 64, 0.5))
    assert not torch.equal(m, hash_mask(8, 0, 64, 64, 0.5))
    assert hash_mask(7, 3, 16, 16, 1.0).all() and not hash_mask(7, 3, 16, 16, 0.0).any()
    assert abs(hash_mask(1, 2, 64, 64, 0.25).mean().item() - 0.25) < 0.03


def test_hash_state_range_and_channels_differ():
    x = hash_state(3, 5, 16, 24)
    assert x.shape == (1, 5, 16, 24) and x.dtype == torch.float32
    assert x.min() >= -0.5 and x.max() < 0.5 and abs(x.mean().item()) < 0.05
    assert not torch.equal(x[0, 0], x[0, 1]) and torch.equal(x, hash_state(3, 5, 16, 24))


def test_hash32_is_lowbias32():
    # lowbias32 of 1, computed by hand from its definition with Python ints.
    def ref(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    vals = np.array([0, 1, 2, 12345, 0xFFFFFFFF], dtype=np.uint32)
    assert export.hash32(vals).tolist() == [ref(int(v)) for v in vals]


# ----------------------------------------------------------------------------- the page's file
def _data(html):
    m = re.search(r"const NCA_DATA = (\{.*?\});\n", html)
    return json.loads(m.group(1))


def _floats(b64):
    return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype="<f4").copy())


def test_page_is_self_contained_and_carries_the_weights(tmp_path):
    model = randomize(NCA.texture(bias2=True))
    path = export_html(model, tmp_path / "t.html", name="tex </script>", grid=(64, 96))
    html = path.read_text()
    assert not re.search(r"(src|href)\s*=|https?://|@import|fetch\(|XMLHttpRequest", html)
    assert html.count("</script>") == 1  # the name could not close the script early
    d = _data(html)
    assert (d["channels"], d["hidden"], d["n_filters"], d["grid"]) == (12, 96, 4, [64, 96])
    assert d["display"] == "rgb" and d["seed_kind"] == "zeros" and d["padding"] == "circular"
    torch.testing.assert_close(_floats(d["w1"]), model.w1.weight.flatten(), rtol=0, atol=0)
    torch.testing.assert_close(_floats(d["b2"]), model.w2.bias, rtol=0, atol=0)
    torch.testing.assert_close(_floats(d["filters"]), DISTILL_FILTERS.flatten(), rtol=0, atol=0)
    assert d["fire_threshold"] == 1 << 23


def test_growing_model_defaults_and_rotated_filters(tmp_path):
    model = growing_model(clip={"update": (None, 0.5)})
    d = _data(export_html(model, tmp_path / "g.html").read_text())
    assert d["display"] == "premultiplied" and d["seed_kind"] == "centre"
    assert d["padding"] == "zeros" and d["alive_threshold"] == pytest.approx(0.1)
    assert d["clip"] == {"update": [None, 0.5]}
    k = _floats(d["filters"]).reshape(3, 3, 3)
    c, s = np.cos(0.4), np.sin(0.4)
    want = c * DISTILL_FILTERS[1] - s * DISTILL_FILTERS[2]
    torch.testing.assert_close(k[1], want.float(), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- refusals
def _nan_model():
    m = NCA.fastai()
    with torch.no_grad():
        m.w1.weight[0, 0] = float("nan")
    return m


def _with(model, **attrs):
    for k, v in attrs.items():
        setattr(model, k, v)
    return model


BAD_MODELS = {  # model the page cannot run -> (exception, words of its message)
    "channels>64": (lambda: NCA(channels=65, hidden=8), ValueError, "channels = 65"),
    "channels<3": (lambda: NCA(channels=2, hidden=8), ValueError, "channels = 2"),
    "hidden>512": (lambda: NCA(channels=4, hidden=513), ValueError, "hidden = 513"),
    "filters>16": (lambda: NCA(filters=torch.zeros(17, 3, 3)), ValueError, "filters = 17"),
    "nan": (_nan_model, ValueError, "w1 holds NaN"),
    "alive_channel": (
        lambda: _with(NCA.fastai(), alive_threshold=0.1, alive_channel=4),
        ValueError,
        "alive_channel 4",
    ),
    "padding": (lambda: _with(NCA.fastai(), padding="reflect"), ValueError, "padding"),
    "not-nca": (lambda: torch.nn.Linear(3, 3), TypeError, "fastnca NCA"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_export_refuses_models_it_cannot_run(tmp_path, case):
    make, exc, words = BAD_MODELS[case]
    with pytest.raises(exc, match=words) as e:
        export_html(make(), tmp_path / "x.html")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_paths(tmp_path, monkeypatch):
    model = NCA.fastai()
    with pytest.raises(ValueError, match="does not exist"):
        export_html(model, tmp_path / "missing" / "x.html")
    with pytest.raises(ValueError, match="is a directory"):
        export_html(model, tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)

    def denied(*a, **k):  # root ignores the mode bits: refuse the way a read-only dir does
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export.tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match="cannot write") as e:
        export_html(model, ro / "x.html")
    assert "\n" not in str(e.value) and list(ro.iterdir()) == []
    for kwargs, words in (
        ({"grid": 0}, "grid"),
        ({"display": "hsv"}, "display"),
        ({"seed": "ring"}, "seed"),
        ({"steps_per_frame": 0}, "steps_per_frame"),
    ):
        with pytest.raises(ValueError, match=words):
            export_html(model, tmp_path / "y.html", **kwargs)
    assert not (tmp_path / "y.html").exists()


# ----------------------------------------------------------------------------- the commands
def cli(argv, capsys):
    """`fastnca export|zoo ARGS` as fastnca.cli.main runs them: (exit code, stderr)."""
    import argparse

    from fastnca.cli import export as cli_export
    from fastnca.cli import zoo as cli_zoo
    from fastnca.cli._common import UsageError

    parser = argparse.ArgumentParser(prog="fastnca")
    sub = parser.add_subparsers(dest="command")
    for mod in (cli_export, cli_zoo):
        mod.add_parser(sub).set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
    except UsageError as e:
        print(f"fastnca {args.command}: error: {e}", file=sys.stderr)
        rc = 2
    return rc, capsys.readouterr().err


def test_cli_export_of_a_run_dir_and_a_checkpoint(tmp_path, capsys):
    from fastnca.nca.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.pt", randomize(NCA.fastai()))
    rc, err = cli(["export", str(run), "-o", str(tmp_path / "a.html"), "--size", "48x64"], capsys)
    assert rc == 0 and "a.html" in err
    d = _data((tmp_path / "a.html").read_text())
    assert d["grid"] == [48, 64] and d["name"] == "run" and d["channels"] == 4
    rc, _ = cli(["export", str(run / "checkpoint.pt"), "-o", str(tmp_path / "b.html")], capsys)
    assert rc == 0 and (tmp_path / "b.html").is_file()


@pytest.mark.parametrize("case", ["zoo", "no-checkpoint", "missing-dir", "size", "bad-file"])
def test_cli_export_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    out = tmp_path / "out" / "nca.html"
    out.parent.mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    argv = {
        "zoo": ["zoo:no-such-model", "-o", str(out)],
        "no-checkpoint": [str(tmp_path / "empty"), "-o", str(out)],
        "missing-dir": ["zoo:stripes", "-o", str(tmp_path / "nope" / "x.html")],
        "size": ["zoo:stripes", "-o", str(out), "--size", "0"],
        "bad-file": [str(tmp_path / "junk.pt"), "-o", str(out)],
    }[case]
    if case in ("missing-dir", "size"):  # a source that loads, so the path/size is what fails
        from fastnca.nca.checkpoint import save_checkpoint

        argv[0] = str(save_checkpoint(tmp_path / "ok.pt", NCA.fastai()))
    rc, err = cli(["export", *argv], capsys)
    assert rc == 2, err
    assert err.startswith("fastnca export: error: ") and err.count("\n") == 1, err
    assert list(out.parent.iterdir()) == [] and not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------- the zoo
def test_zoo_models_are_small_checkpoints_that_export(tmp_path, capsys):
    from fastnca.nca.checkpoint import load_checkpoint
    from fastnca.nca.zoo import ZOO_DIR, zoo_names, zoo_path

    assert {"stripes", "dots", "checker"} <= set(zoo_names())
    readme = (ZOO_DIR / "README.md").read_text()
    for name in zoo_names():
        path = zoo_path(f"zoo:{name}")
        ckpt = load_checkpoint(path)
        assert path.stat().st_size < 64 * 1024 and ckpt.train is None
        assert ckpt.config["zoo"]["command"] in readme  # each file's command is documented
        rc, _ = cli(["export", f"zoo:{name}", "-o", str(tmp_path / f"{name}.html")], capsys)
        assert rc == 0 and _data((tmp_path / f"{name}.html").read_text())["name"] == name
    rc, _ = cli(["zoo"], capsys)
    assert rc == 0
    with pytest.raises(ValueError, match="unknown zoo model 'nope'; the zoo has: .*stripes"):
        zoo_path("zoo:nope")


@needs_chromium
def test_zoo_stripes_grows_its_texture_in_the_page(tmp_path):
    from fastnca.nca.checkpoint import load_nca
    from fastnca.nca.zoo import zoo_path

    model = load_nca(zoo_path("stripes"))
    page = export_html(model, tmp_path / "stripes.html")
    got = read_state(run_headless(page, f"test={STEPS}&seed=0&size=32x32&init=zeros"))
    want = torch_steps(model, torch.zeros(1, model.channels, 32, 32), STEPS, seed=0)
    assert (got - want).abs().max().item() <= PARITY_ATOL
    rgb = model.to_rgb(got)
    assert rgb.std() > 0.1, "the texture grew from the blank state: colours vary across the grid"
