"""Writes the small test copies of the published Distill models (see SOURCE.md).

    python tests/data/make_distill_subset.py /path/to/reference-models

- textures_subset.json: 6 of the 66 texture models of models.json, in the same format (their
  weight tiles cut from the two layer PNGs and laid out again; scales unchanged, bytes identical).
- trace_*_min.npz: the parity traces with only seed_state, state_0200, the scalars and the masks
  bit-packed: ``masks_bits = np.packbits(masks, axis=-1)`` (unpack with
  ``np.unpackbits(masks_bits, axis=-1, count=W).astype(bool)``), compressed.
- ex3_1f98e_lizard.json, 1f98e_lizard.png (its target): copied as they are.
"""

import base64
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = [
    "bubbly_0101",
    "interlaced_0172",
    "dotted_0201",
    "honeycombed_0171",
    "chequered_0121",
    "banded_0037",
]
COLS = 3
TRACE_KEYS = ("seed_state", "state_0200", "fire_rate", "quant", "angle")


def subset_textures(src: Path, dst: Path) -> None:
    obj = json.loads(src.read_text())
    names = obj["model_names"]
    missing = [n for n in NAMES if n not in names]
    if missing:  # the list above is checked against the file, not guessed
        raise SystemExit(f"{src}: no models {missing}")
    layers = []
    for layer in obj["layers"]:
        rows, out = layer["shape"]
        cols = layer["layout"][0]
        tw = math.ceil(out / 4)
        png = base64.b64decode(layer["data"].split(",", 1)[1])
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
        n_rows = math.ceil(len(NAMES) / COLS)
        new = np.zeros((n_rows * rows, COLS * tw, 4), np.uint8)
        for j, name in enumerate(NAMES):
            r, c = divmod(names.index(name), cols)
            rr, cc = divmod(j, COLS)
            new[rr * rows : (rr + 1) * rows, cc * tw : (cc + 1) * tw] = img[
                r * rows : (r + 1) * rows, c * tw : (c + 1) * tw
            ]
        buf = io.BytesIO()
        Image.fromarray(new, "RGBA").save(buf, format="PNG", optimize=True)
        data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        layers.append({**layer, "layout": [COLS, n_rows], "data": data})
    dst.write_text(json.dumps({"model_names": NAMES, "layers": layers}))


def subset_trace(src: Path, dst: Path) -> None:
    d = np.load(src)
    keep = {k: d[k] for k in TRACE_KEYS if k in d.files}
    np.savez_compressed(dst, masks_bits=np.packbits(d["masks"], axis=-1), **keep)


def main(root: str) -> None:
    root, here = Path(root), Path(__file__).parent
    subset_textures(root / "textures/models.json", here / "textures_subset.json")
    subset_trace(
        root / "textures/trace_bubbly_0101_64x64.npz", here / "trace_bubbly_0101_64x64_min.npz"
    )
    subset_trace(
        root / "growing/trace_ex3_lizard_72x72.npz", here / "trace_ex3_lizard_72x72_min.npz"
    )
    for name in ("ex3_1f98e_lizard.json", "1f98e_lizard.png"):
        shutil.copyfile(root / "growing" / name, here / name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/reference-models")
