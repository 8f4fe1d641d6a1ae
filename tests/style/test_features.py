"""VGG16Features: hooks return exactly the requested layers, early stop, normalisation, every
weight source (state-dict file, torch hub cache, download via file://, offline fallback), errors.

No test touches the network: TORCH_HOME points at a temp dir and FASTNCA_OFFLINE=1 unless a test
replaces the download URL with a local file:// or a closed local port.
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.request

import pytest
import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

import fastnca.style.features as fe
from fastnca.style.features import (
    LAYER_NAMES,
    RandomMultiScaleFeatures,
    VGG16Features,
    feature_shape,
    layer_index,
    layer_name,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTNCA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def tv_features():
    """torchvision's vgg16().features with random weights (the oracle) and its state dict keyed
    like a full vgg16 checkpoint ("features.0.weight", plus a classifier key)."""
    torch.manual_seed(1)
    net = make_layers(cfgs["D"]).eval()
    sd = {f"features.{k}": v.clone() for k, v in net.state_dict().items()}
    sd["classifier.6.bias"] = torch.zeros(10)
    return net, sd


def oracle(net, x, layers):
    """Run torchvision's layers one by one (the lesson's loop) and keep the requested outputs."""
    out, h = {}, (x - MEAN) / STD
    for i, m in enumerate(net):
        if i > max(layers):
            break
        h = m(h)
        out[i] = h.clone()  # torchvision's ReLUs are in-place
    return [out[i] for i in layers]


def test_layer_table_matches_torchvision():
    net = make_layers(cfgs["D"])
    assert len(net) == fe.N_LAYERS == 31
    for i, m in enumerate(net):
        kind = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "pool"}[type(m)]
        assert layer_name(i).startswith(kind)
    assert [LAYER_NAMES[n] for n in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")] == [
        1,
        6,
        11,
        18,
        25,
    ]
    assert layer_index("relu4_1") == 18 and layer_index(3) == 3
    with torch.no_grad():  # feature_shape agrees with the real network on an odd size
        shapes, h = {}, torch.zeros(1, 3, 37, 50)
        for i, m in enumerate(net):
            h = m(h)
            shapes[i] = tuple(h.shape[1:])
    assert all(feature_shape(i, 37, 50) == shapes[i] for i in range(31))


def test_state_dict_file_matches_torchvision(tv_features, tmp_path, capsys):
    net, sd = tv_features
    path = tmp_path / "vgg.pth"
    torch.save(sd, path)
    layers = (11, 1, 6)  # any order: the output follows it
    m = VGG16Features(layers, weights=str(path))
    assert m.source == f"weights file {path}" and m.is_pretrained
    assert "weights file" in capsys.readouterr().err
    x = torch.rand(2, 3, 29, 34)
    got, want = m(x), oracle(net, x, layers)
    assert len(got) == 3
    for g, w, i in zip(got, want, layers, strict=True):
        assert g.shape == (2, *feature_shape(i, 29, 34))
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_names_and_conv_layers_and_legacy_file(tv_features, tmp_path):
    net, sd = tv_features
    path = tmp_path / "legacy.pth"
    feats_only = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    torch.save(feats_only, path, _use_new_zipfile_serialization=False)  # not memory-mappable
    m = VGG16Features(("conv1_2", "relu1_1", "pool1"), weights=path, verbose=False)
    assert m.layers == (2, 1, 4) and m.names == ("conv1_2", "relu1_1", "pool1")
    x = torch.rand(1, 3, 20, 22)
    for g, w in zip(m(x), oracle(net, x, (2, 1, 4)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)  # conv output not clobbered


def test_stops_after_deepest_layer(tv_features):
    _, sd = tv_features
    m = VGG16Features((1, 6), weights=sd, verbose=False)
    assert len(m.body) == 7  # features[:7]: nothing past relu2_1 exists
    ran = []
    for i, mod in enumerate(m.body):
        mod.register_forward_hook(lambda mod, inp, out, i=i: ran.append(i))
    fs = m(torch.rand(1, 3, 16, 16))
    assert ran == list(range(7))  # every kept layer ran once, and there is no deeper one
    assert [f.shape[1] for f in fs] == [64, 128]
    # the fallback also computes only what is needed: pyramid levels up to relu2_1's (1)
    r = VGG16Features((1, 6), weights="random", verbose=False)
    assert isinstance(r.body, RandomMultiScaleFeatures) and r.body.levels == (0, 1)


def test_normalisation_inside(tv_features):
    _, sd = tv_features
    sd = dict(sd)
    w = torch.zeros(64, 3, 3, 3)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = w[2, 2, 1, 1] = 1.0  # conv1_1 copies the 3 input channels
    sd["features.0.weight"], sd["features.0.bias"] = w, torch.zeros(64)
    m = VGG16Features((0,), weights=sd, verbose=False)
    x = torch.rand(2, 3, 9, 11)
    want = torch.stack([(x[:, c] - fe.IMAGENET_MEAN[c]) / fe.IMAGENET_STD[c] for c in range(3)], 1)
    torch.testing.assert_close(m(x)[0][:, :3], want)
    torch.testing.assert_close(m.normalize(x), (x - MEAN) / STD)


def test_frozen_eval_and_input_gradient(tv_features):
    m = VGG16Features((1, 6), weights=tv_features[1], verbose=False)
    m.train()
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    x = torch.rand(1, 3, 12, 12, requires_grad=True)
    sum(f.square().mean() for f in m(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


def test_torch_hub_cache_is_used(tv_features, tmp_path, capsys):
    net, sd = tv_features
    ckpt = fe.hub_checkpoint_path()
    assert str(ckpt).startswith(str(tmp_path / "torch_home"))
    ckpt.parent.mkdir(parents=True)
    torch.save(sd, ckpt)
    m = VGG16Features(weights="auto")
    assert m.source.startswith("torchvision ImageNet weights") and m.is_pretrained
    assert "torchvision ImageNet weights" in capsys.readouterr().err
    x = torch.rand(1, 3, 32, 32)
    for g, w in zip(m(x), oracle(net, x, (1, 6, 11, 18, 25)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert VGG16Features(weights="imagenet", verbose=False).is_pretrained


def test_offline_fallback_selected_and_says_so(capsys):
    m = VGG16Features()  # empty TORCH_HOME, FASTNCA_OFFLINE=1
    err = capsys.readouterr().err
    assert not m.is_pretrained and "offline fallback" in m.source
    assert "FASTNCA_OFFLINE" in err and "offline fallback" in err and "--weights" in err
    x = torch.rand(2, 3, 35, 48)
    fs = m(x)
    assert [tuple(f.shape) for f in fs] == [(2, *feature_shape(i, 35, 48)) for i in m.layers]
    assert all(torch.isfinite(f).all() and (f >= 0).all() and f.std() > 0 for f in fs)
    # deterministic, and a layer's bank does not depend on which other layers are requested
    torch.testing.assert_close(VGG16Features((11,), "random", verbose=False)(x)[0], fs[2])
    with pytest.raises(ValueError, match="weights='imagenet'.*vgg16-397923af.pth"):
        VGG16Features(weights="imagenet", verbose=False)


def test_fallback_textures_are_told_apart():
    """The fallback's Gram matrices separate different textures (what a style loss needs)."""
    from fastnca.style.textures import builtin_texture

    def gram(f):  # (1, C, H, W) -> (C, C)
        return torch.einsum("bchw,bdhw->cd", f, f) / (f.shape[2] * f.shape[3])

    m = VGG16Features(weights="random", verbose=False)
    for one, other in [("dots", "stripes"), ("scales", "checker")]:
        a, b = builtin_texture(one, 128), builtin_texture(other, 128)
        a2 = torch.roll(a, shifts=(32, 64), dims=(2, 3))  # the same texture, shifted (tiles)
        ga, gb, ga2 = ([gram(f) for f in m(t)] for t in (a, b, a2))
        for x, y, z in zip(ga, gb, ga2, strict=True):
            assert (x - z).norm() < 0.3 * (x - y).norm()


def test_download_from_file_url(tv_features, tmp_path, monkeypatch, capsys):
    _, sd = tv_features
    src = tmp_path / "src.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    good = tmp_path / f"vgg16-{sha[:8]}.pth"
    src.rename(good)
    monkeypatch.delenv("FASTNCA_OFFLINE")
    monkeypatch.setattr(fe, "VGG16_URL", good.as_uri())
    m = VGG16Features((1,), weights="auto")
    assert m.is_pretrained and fe.hub_checkpoint_path().is_file()
    assert "downloading" in capsys.readouterr().err
    # a file whose content does not match the hash in its name is rejected -> fallback
    bad = tmp_path / "vgg16-0000abcd.pth"
    bad.write_bytes(good.read_bytes())
    monkeypatch.setattr(fe, "VGG16_URL", bad.as_uri())
    m = VGG16Features((1,), weights="auto")
    assert not m.is_pretrained and "sha256" in capsys.readouterr().err
    assert not fe.hub_checkpoint_path().exists() and not list(
        fe.hub_checkpoint_path().parent.glob(".*part")
    )


def test_download_fails_fast(monkeypatch, capsys):
    monkeypatch.delenv("FASTNCA_OFFLINE")
    monkeypatch.setattr(fe, "VGG16_URL", "http://127.0.0.1:9/vgg16-397923af.pth")  # refused
    m = VGG16Features((1,), weights="auto", timeout=2.0)
    assert not m.is_pretrained and "download failed" in capsys.readouterr().err
    # a connect that hangs (e.g. a DNS lookup, which socket timeouts do not bound) is abandoned
    release = threading.Event()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: release.wait(30))
    t0 = time.monotonic()
    m = VGG16Features((1,), weights="auto", timeout=0.3)
    waited = time.monotonic() - t0
    release.set()
    assert not m.is_pretrained and "TimeoutError" in capsys.readouterr().err
    assert waited < 20  # did not wait for the hanging call (30 s)


def test_compiles_fullgraph(tv_features):
    m = VGG16Features((1, 6), weights=tv_features[1], verbose=False)
    x = torch.rand(1, 3, 16, 16)
    got = torch.compile(m, backend="eager", fullgraph=True)(x)  # hooks trace without breaks
    for g, w in zip(got, m(x), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(layers=()), ValueError, "layers: expected at least one"),
        (dict(layers=(1, "relu1_1")), ValueError, "layers: duplicate"),
        (dict(layers=("relu9_9",)), ValueError, "layers: unknown layer name 'relu9_9'"),
        (dict(layers=(31,)), ValueError, "layers: index 31 out of range"),
        (dict(layers=(1.0,)), TypeError, "layers: expected ints or layer names, got float"),
        (dict(weights=3), TypeError, "weights: expected 'auto'"),
        (dict(weights="/no/such/vgg.pth"), ValueError, "weights: '/no/such/vgg.pth' is not a file"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        VGG16Features(**{"weights": "random", "verbose": False, **kwargs})


def test_bad_weight_files(tmp_path, tv_features):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="weights: cannot load .*junk.pth"):
        VGG16Features(weights=junk, verbose=False)
    wrong = {"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)}
    with pytest.raises(ValueError, match="does not fit vgg16 features 0..1"):
        VGG16Features((1,), weights=wrong, verbose=False)
    with pytest.raises(ValueError, match="x: expected an image batch"):
        VGG16Features((1,), weights="random", verbose=False)(torch.rand(3, 8, 8))
