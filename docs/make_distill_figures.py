"""Figures of the published Distill NCAs run by fastnca (docs/distill_*.png).

    python docs/make_distill_figures.py TEXTURES_MODELS_JSON GROWING_JSON [GROWING_JSON ...]
        [--authors PNG ...] [--out docs]

TEXTURES_MODELS_JSON is the Self-Organising Textures demo's ``models.json`` (66 models), the
GROWING_JSONs are Growing NCA ``exN_<code>_<name>.json`` files. Writes
- distill_textures.png: the first 12 texture models, each grown from zeros on a 64x64 grid for 256
  steps (seed 0), shown as the authors show them (x[:3] / 2 + 0.5);
- distill_growing.png: each growing model 200 steps after its seed cell on a 72x72 grid, on white;
- with --authors PNGs: distill_authors.png, those renderings for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from fastnca.nca.distill import import_distill
from fastnca.style.images import image_grid, save_image


def grown(model, size: int, steps: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        x = model(model.seed(1, size), steps=steps)
        return model.image(x)[0].clamp(0, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("textures")
    ap.add_argument("growing", nargs="+")
    ap.add_argument("--authors", nargs="*", default=[])
    ap.add_argument("--out", default="docs")
    a = ap.parse_args(argv)
    out = Path(a.out)
    tex = list(import_distill(a.textures).items())[:12]
    imgs = [grown(m, 64, 256) for _, m in tex]
    save_image(image_grid(imgs, ncols=6), out / "distill_textures.png")
    print("textures:", ", ".join(name for name, _ in tex))
    grow = [m for f in a.growing for m in import_distill(f).values()]
    save_image(
        image_grid([grown(m, 72, 200) for m in grow], ncols=len(grow)), out / "distill_growing.png"
    )
    if a.authors:
        pics = [
            torch.tensor(list(Image.open(p).convert("RGB").resize((64, 64)).getdata()))
            .float()
            .div(255)
            .T.reshape(3, 64, 64)
            for p in a.authors
        ]
        save_image(image_grid(pics, ncols=len(pics)), out / "distill_authors.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
