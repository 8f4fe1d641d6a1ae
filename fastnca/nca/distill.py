"""Importers of the NCAs published with the two Distill articles.

    models = import_distill("models.json")             # 66 texture NCAs, by name
    models = import_distill("ex3_1f98e_lizard.json")   # {"ex3_1f98e_lizard": NCA}

Formats (as published by the articles' repositories):
- Self-Organising Textures (Niklasson et al. 2021), ``models.json``: ``{"model_names": [...],
  "layers": [L1, L2]}``, each layer ``{"shape": [in + 1, out], "layout": [cols, rows], "scale": s,
  "data": "data:image/png;base64,..."}``: the weights of all models as tiles of one RGBA PNG. Model
  i sits in tile ``divmod(i, cols)``, a tile is ``in + 1`` pixel rows by ``ceil(out / 4)`` pixels;
  its RGBA bytes row-major give the ``(in + 1, out)`` matrix (last row: bias), value
  ``(byte - 127) / 255 * s``.
- Growing NCA (Mordvintsev et al. 2020), ``exN_<codepoint>_<name>.json``: ``[L1, L2]``, each
  ``{"type": "uint8", "in_ch", "out_ch", "weight_scale", "bias_scale", "data_b64"}``: base64 of an
  ``(in_ch + 1, out_ch)`` uint8 matrix, value ``(byte / 255 - 0.5) * weight_scale`` (last row:
  ``* bias_scale``, the bias).
In both, first-layer rows are filter-major (row ``f * C + c``); fastnca's ``w1`` columns are
``c * F + f``, so they are reordered.

Architectures (the authors' code): ``TEXTURE`` (12 channels, 96 hidden, circular padding, the
identity/sobel/laplacian bank / 8, perception, hidden, update and state clipped) and ``GROWING``
(16 channels RGBA + 12, 128 hidden, zero padding, identity/sobel_x/sobel_y / 8, alive masking on
alpha > 0.1); both fire at rate 0.5 and have both biases. Display: textures ``x[:3] / 2 + 0.5``
("rgb/2", matches the authors' renderings), growing models premultiplied RGBA on white.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from fastnca.nca.model import NCA
from fastnca.reference import DISTILL_FILTERS

TEXTURE_CLIP = {
    "perception": (-2.0, 2.0),
    "hidden": (0.0, 2.0),
    "update": (-2.0, 2.0),
    "state": (-2.0, 2.0),
}
TEXTURE = dict(
    channels=12,
    hidden=96,
    fire_rate=0.5,
    filters=DISTILL_FILTERS,
    bias1=True,
    bias2=True,
    padding="circular",
    clip=TEXTURE_CLIP,
    display="rgb/2",  # the authors' demo shows x[:3] / 2 + 0.5
)
GROWING = dict(
    channels=16,
    hidden=128,
    fire_rate=0.5,
    filters=DISTILL_FILTERS[:3],
    bias1=True,
    bias2=True,
    padding="zeros",
    alive_threshold=0.1,
    alive_channel=3,
)

_EXPECTED = (
    "expected a published Distill NCA file: the Self-Organising Textures models.json "
    "(keys 'model_names' and 'layers') or a Growing NCA exN_<code>_<name>.json (a list "
    "of two uint8 layers)"
)


class DistillFormatError(ValueError):
    """A file that is not one of the published formats (one line, names the file)."""


def _png_rgba(data_url: str) -> np.ndarray:
    from PIL import Image

    payload = data_url.split(",", 1)[1] if data_url.startswith("data:") else data_url
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    return np.asarray(img.convert("RGBA"))  # (rows, cols, 4) uint8


def decode_texture_layers(obj: dict) -> tuple[list[str], list[list[np.ndarray]]]:
    """``(names, [layer1 matrices, layer2 matrices])``: per model an ``(in + 1, out)`` float32."""
    names = [str(n) for n in obj["model_names"]]
    layers = []
    for layer in obj["layers"]:
        rows, out = (int(v) for v in layer["shape"])
        cols = int(layer["layout"][0])
        tile_w = math.ceil(out / 4)
        img = _png_rgba(layer["data"])
        mats = []
        for i in range(len(names)):
            r, c = divmod(i, cols)
            tile = img[r * rows : (r + 1) * rows, c * tile_w : (c + 1) * tile_w]
            if tile.shape != (rows, tile_w, 4):
                raise ValueError(
                    f"layer image {img.shape[:2]} too small for model {i} in tile "
                    f"({r}, {c}) of {rows}x{tile_w} pixels"
                )
            m = tile.reshape(rows, tile_w * 4)[:, :out].astype(np.float32)
            mats.append((m - 127.0) / 255.0 * np.float32(layer["scale"]))
        layers.append(mats)
    return names, layers


def decode_growing_layers(obj: list) -> list[np.ndarray]:
    """``[(in + 1, out)]`` float32 matrices of the two layers (last row: bias)."""
    mats = []
    for layer in obj:
        if layer.get("type") != "uint8":
            raise ValueError(f"layer type {layer.get('type')!r}, expected 'uint8'")
        rows, out = int(layer["in_ch"]) + 1, int(layer["out_ch"])
        raw = np.frombuffer(base64.b64decode(layer["data_b64"], validate=True), np.uint8)
        if raw.size != rows * out:
            raise ValueError(f"layer holds {raw.size} bytes, expected {rows} x {out}")
        v = raw.reshape(rows, out).astype(np.float32) / np.float32(255.0) - np.float32(0.5)
        v[:-1] *= np.float32(layer["weight_scale"])
        v[-1] *= np.float32(layer["bias_scale"])
        mats.append(v)
    return mats


def _check_shapes(named, arch: dict) -> None:
    C, hidden, NF = arch["channels"], arch["hidden"], arch["filters"].shape[0]
    for _, l1, l2 in named:
        if l1.shape != (NF * C + 1, hidden) or l2.shape != (hidden + 1, C):
            raise ValueError(
                f"layer shapes {l1.shape}, {l2.shape}; the architecture needs "
                f"({NF * C + 1}, {hidden}) and ({hidden + 1}, {C})"
            )


def build_nca(l1: np.ndarray, l2: np.ndarray, arch: dict) -> NCA:
    """The NCA of ``arch`` holding layers ``l1`` ((F*C + 1, hidden), rows filter-major ``f*C +
    c``, last row bias) and ``l2`` ((hidden + 1, C))."""
    C, hidden, NF = arch["channels"], arch["hidden"], arch["filters"].shape[0]
    _check_shapes([(None, l1, l2)], arch)
    model = NCA(**arch)
    w1 = torch.from_numpy(l1[:-1]).reshape(NF, C, hidden).permute(2, 1, 0).reshape(hidden, -1)
    with torch.no_grad():
        model.w1.weight.copy_(w1[:, :, None, None])
        model.w1.bias.copy_(torch.from_numpy(l1[-1]))
        model.w2.weight.copy_(torch.from_numpy(l2[:-1]).t()[:, :, None, None])
        model.w2.bias.copy_(torch.from_numpy(l2[-1]))
    return model


def import_distill(path) -> dict[str, NCA]:
    """The NCAs of a published Distill model file, by name, configured as the authors' models.

    Textures ``models.json`` -> 66 models named as in the file ("bubbly_0101", ...); a growing
    ``exN_<code>_<name>.json`` -> one model named by the file's stem. Raises ``FileNotFoundError``
    for a missing file and ``DistillFormatError`` (a ValueError naming the file) for any other.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r}: no such file; {_EXPECTED}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DistillFormatError(
            f"{str(p)!r} is not JSON ({type(e).__name__}); {_EXPECTED}"
        ) from None
    try:
        if isinstance(obj, dict) and "model_names" in obj and "layers" in obj:
            names, layers = decode_texture_layers(obj)
            arch, named = TEXTURE, list(zip(names, *layers, strict=True))
        elif (
            isinstance(obj, list)
            and len(obj) == 2
            and all(isinstance(d, dict) and "data_b64" in d for d in obj)
        ):
            arch, named = GROWING, [(p.stem, *decode_growing_layers(obj))]
        else:
            named = None
        if named is not None:
            _check_shapes(named, arch)
    except (KeyError, TypeError, ValueError, OSError, binascii.Error) as e:
        raise DistillFormatError(
            f"{str(p)!r} looks like a Distill model file but is damaged "
            f"({type(e).__name__}: {str(e)[:120]}); {_EXPECTED}"
        ) from None
    if named is not None:
        return {name: build_nca(l1, l2, arch) for name, l1, l2 in named}
    what = (
        f"a dict with keys {sorted(map(str, obj))[:6]}"
        if isinstance(obj, dict)
        else f"a JSON {type(obj).__name__}"
    )
    raise DistillFormatError(f"{str(p)!r} holds {what}; {_EXPECTED}")


def load_distill(path, name: str | None = None) -> NCA:
    """One model of a published Distill file (see :func:`import_distill`). ``name`` picks one model
    of a file of several (the textures' models.json); a one-model file (a growing NCA's
    exN_*.json) needs none."""
    models = import_distill(path)
    if name is None and len(models) == 1:
        return next(iter(models.values()))
    if name not in models:
        raise ValueError(
            f"name: {str(path)!r} holds {len(models)} models; pass one of "
            f"{', '.join(list(models)[:8])}{', ...' if len(models) > 8 else ''}, "
            f"got {name!r}"
        )
    return models[name]


def save_distill(models: dict[str, NCA], out_dir, source: str | None = None) -> list[Path]:
    """One fastnca checkpoint ``out_dir/<name>.pt`` per model (``load_nca``, ``fastnca render``
    and the exporter read them); the config keeps the step options and the display."""
    from fastnca.nca.checkpoint import save_checkpoint

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in models.items():
        cfg = {
            "preset": "distill",
            "source": source,
            "display": model.display,
            **model.step_options(),
        }
        paths.append(save_checkpoint(out / f"{name}.pt", model, cfg))
    return paths
