"""Export an NCA to one self-contained HTML page that runs it live in the browser (WebGL2).

    from fastnca.nca.export import export_html
    export_html(model, "nca.html")          # open it in a browser: no network, no other files

The page (``viewer.html`` beside this file, filled with the model) keeps the state in RGBA32F
textures, 4 channels per tile, and runs one NCA step as 3-4 fragment-shader passes: perception
(3x3, circular or zero padding), the first 1x1 layer + relu, the second layer + update mask +
residual, and (growing models) the alive mask. Weights travel as base64 float32.

The update mask is a seeded integer hash per cell and step (``hash_mask``), so a Python run with
the same masks reproduces the page's states (``tests/nca/test_export.py`` checks it in headless
Chromium). Limits of the page: ``LIMITS`` (channels, hidden units, filters); the grid must fit the
browser's largest texture (the page says so when it does not).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastnca.reference import rotate_filters

TEMPLATE = Path(__file__).with_name("viewer.html")
LIMITS = {"channels": (3, 64), "hidden": (1, 512), "filters": (1, 16)}  # inclusive ranges
CLIP_KEYS = ("perception", "hidden", "update", "state")
DISPLAYS = ("rgb", "rgb/2", "premultiplied")  # x[:3] + 0.5, x[:3] / 2 + 0.5, RGBA on white
NOISE_SALT = 0xA511E9B3
_DATA_RE = re.compile(r"/\*NCA_DATA\*/.*?/\*END_NCA_DATA\*/", re.S)


# ----------------------------------------------------------------------------- seeded hashing
def hash32(x) -> np.ndarray:
    """lowbias32 integer hash of uint32 values (the page's ``hash32``, bit for bit)."""
    x = np.asarray(x, dtype=np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def fire_threshold(fire_rate: float) -> int:
    """A cell fires when the top 24 bits of its hash are below ``round(fire_rate * 2**24)``."""
    return int(round(float(fire_rate) * (1 << 24)))


def hash_mask(seed: int, step: int, H: int, W: int, fire_rate: float) -> torch.Tensor:
    """The page's update mask of step ``step`` (0 = the first step after a reset): (1, 1, H, W)
    float32 of 0/1, with ``h = hash32(hash32(hash32(seed) ^ step) ^ (y*W + x))`` per cell."""
    hs = hash32(hash32(np.uint32(seed & 0xFFFFFFFF)) ^ np.uint32(step & 0xFFFFFFFF))
    h = hash32(hs ^ np.arange(H * W, dtype=np.uint32))
    fire = (h >> np.uint32(8)) < np.uint32(fire_threshold(fire_rate))
    return torch.from_numpy(fire.reshape(1, 1, H, W).astype(np.float32))


def hash_state(seed: int, channels: int, H: int, W: int) -> torch.Tensor:
    """The page's test state (``#test=N&seed=S``): (1, C, H, W) float32, uniform in [-0.5, 0.5),
    value ``(hash32(hash32(hash32(seed ^ NOISE_SALT) ^ c) ^ cell) >> 8) / 2**24 - 0.5``."""
    base = hash32(np.uint32((seed ^ NOISE_SALT) & 0xFFFFFFFF))
    hc = hash32(base ^ np.arange(channels, dtype=np.uint32))  # (C,)
    h = hash32(hc[:, None] ^ np.arange(H * W, dtype=np.uint32)[None])  # (C, H*W)
    v = (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24) - np.float32(0.5)
    return torch.from_numpy(v.reshape(1, channels, H, W))


def seed_state(kind: str, channels: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """The page's state after a reset (or ``#test=N&init=KIND``): (1, C, H, W) float32.
    "zeros"; "centre": zeros with channels 3.. of cell (H // 2, W // 2) set to 1 (the growing
    NCA's seed); "noise": ``hash_state(seed, ...)``."""
    if kind == "noise":
        return hash_state(seed, channels, H, W)
    x = torch.zeros(1, channels, H, W)
    if kind == "centre":
        x[0, 3:, H // 2, W // 2] = 1.0
    elif kind != "zeros":
        raise ValueError(f"kind must be 'zeros', 'centre' or 'noise', got {kind!r}")
    return x


# ----------------------------------------------------------------------------- the model's data
def step_options(model) -> dict:
    """The step options of ``model`` (defaults for models that predate them)."""
    return {
        "padding": getattr(model, "padding", "circular"),
        "alive_threshold": getattr(model, "alive_threshold", None),
        "alive_channel": getattr(model, "alive_channel", 3),
        "clip": getattr(model, "clip", None),
        "perception_angle": float(getattr(model, "perception_angle", 0.0) or 0.0),
    }


def _rotated(filters: torch.Tensor, angle: float) -> torch.Tensor:
    # The growing NCA's rotated perception (the same function the step uses).
    try:
        return rotate_filters(filters, angle)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None


def _b64(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    a = t.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return base64.b64encode(a.tobytes()).decode("ascii")


def _in_range(what: str, v: int, key: str) -> None:
    lo, hi = LIMITS[key]
    if not lo <= v <= hi:
        raise ValueError(f"model: {what} = {v} is outside what the page runs ({lo}..{hi})")


def _clip_spec(clip) -> dict | None:
    if not clip:
        return None
    if not isinstance(clip, dict) or set(clip) - set(CLIP_KEYS):
        raise ValueError(f"model: clip must be a dict with keys from {CLIP_KEYS}, got {clip!r}")
    out = {}
    for key, bounds in clip.items():
        if bounds is None:
            continue
        lo, hi = bounds
        for b in (lo, hi):
            if b is not None and not math.isfinite(float(b)):
                raise ValueError(f"model: clip[{key!r}] must be finite or None, got {bounds}")
        out[key] = [None if lo is None else float(lo), None if hi is None else float(hi)]
    return out or None


def page_data(
    model,
    *,
    name: str | None = None,
    grid=128,
    display: str = "auto",
    seed: str = "auto",
    steps_per_frame: int = 1,
) -> dict:
    """The JSON the page is filled with; raises ValueError (one line) for a model it cannot run.

    grid: default grid, int or (H, W); display: "auto" (the model's ``display``; else
    premultiplied on white for growing models, else ``to_rgb``) or one of ``DISPLAYS``; seed:
    "auto" (the centre cell for growing
    models, else zeros), "zeros", "centre" or "noise".
    """
    for attr in ("channels", "hidden", "filters", "w1", "w2", "fire_rate"):
        if not hasattr(model, attr):
            raise TypeError(
                f"model must be a fastnca NCA (no attribute {attr!r}), got {type(model).__name__}"
            )
    C, hidden = int(model.channels), int(model.hidden)
    opts = step_options(model)
    filters = _rotated(model.filters.detach().cpu().float(), opts["perception_angle"])
    nf = filters.shape[0]
    _in_range("channels", C, "channels")
    _in_range("hidden", hidden, "hidden")
    _in_range("number of filters", nf, "filters")
    w1 = model.w1.weight.detach().reshape(model.w1.weight.shape[0], -1)
    w2 = model.w2.weight.detach().reshape(model.w2.weight.shape[0], -1)
    if tuple(w1.shape) != (hidden, C * nf) or tuple(w2.shape) != (C, hidden):
        raise ValueError(
            f"model: weights w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} are not the "
            f"1x1 layers ({hidden}, {C * nf}) and ({C}, {hidden})"
        )
    b1, b2 = model.w1.bias, model.w2.bias
    for key, t in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2), ("filters", filters)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"model: {key} holds NaN or inf")
    if opts["padding"] not in ("circular", "zeros"):
        raise ValueError(f"model: padding must be 'circular' or 'zeros', got {opts['padding']!r}")
    thr = opts["alive_threshold"]
    if thr is not None and not math.isfinite(float(thr)):
        raise ValueError(f"model: alive_threshold must be finite or None, got {thr!r}")
    ac = int(opts["alive_channel"])
    if thr is not None and not 0 <= ac < C:
        raise ValueError(f"model: alive_channel {ac} is not one of the {C} channels")
    if display == "auto":
        display = getattr(model, "display", None) or ("rgb" if thr is None else "premultiplied")
    if display not in DISPLAYS:
        raise ValueError(f"display must be 'auto' or one of {DISPLAYS}, got {display!r}")
    if display == "premultiplied" and not 0 <= ac < C:
        raise ValueError(f"display 'premultiplied' needs alive_channel < {C}, got {ac}")
    if seed == "auto":
        seed = "zeros" if thr is None else "centre"
    if seed not in ("zeros", "centre", "noise"):
        raise ValueError(f"seed must be 'auto', 'zeros', 'centre' or 'noise', got {seed!r}")
    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if min(gh, gw) < 1 or max(gh, gw) > 1024:
        raise ValueError(f"grid must be 1..1024 cells per side, got {grid!r}")
    if not isinstance(steps_per_frame, int) or not 1 <= steps_per_frame <= 64:
        raise ValueError(f"steps_per_frame must be an int in 1..64, got {steps_per_frame!r}")
    return {
        "format": "fastnca-webgl",
        "version": 1,
        "name": name,
        "channels": C,
        "hidden": hidden,
        "n_filters": nf,
        "filters": _b64(filters),
        "w1": _b64(w1),
        "b1": _b64(b1),
        "w2": _b64(w2),
        "b2": _b64(b2),
        "fire_rate": float(model.fire_rate),
        "fire_threshold": fire_threshold(model.fire_rate),
        "padding": opts["padding"],
        "alive_threshold": None if thr is None else float(thr),
        "alive_channel": ac,
        "clip": _clip_spec(opts["clip"]),
        "display": display,
        "seed_kind": seed,
        "grid": [gh, gw],
        "steps_per_frame": steps_per_frame,
    }


def render_page(model, **kwargs) -> str:
    """The page's HTML text for ``model`` (keywords: see :func:`page_data`)."""
    data = json.dumps(page_data(model, **kwargs), separators=(",", ":"))
    data = data.replace("</", "<\\/")  # a name can never close the <script>
    html = TEMPLATE.read_text(encoding="utf-8")
    html, n = _DATA_RE.subn(lambda _: data, html, count=1)
    if n != 1:
        raise RuntimeError(f"{TEMPLATE}: the NCA_DATA placeholder is missing")
    return html


def export_html(model, path, **kwargs) -> Path:
    """Write the self-contained page running ``model`` to ``path`` (atomically; nothing is written
    when the model or the path is refused). Keywords: see :func:`page_data`. Returns the path."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"output path {str(p)!r} is a directory; give a file name like nca.html")
    if not parent.is_dir():
        raise ValueError(f"output path {str(p)!r}: directory {str(parent)!r} does not exist")
    html = render_page(model, **kwargs)  # validates the model before anything touches the disk
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise ValueError(
            f"output path {str(p)!r}: cannot write in {str(parent)!r} ({e.strerror or e})"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, p)
    except OSError as e:
        raise ValueError(f"output path {str(p)!r}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


# ----------------------------------------------------------------------------- headless Chromium
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Software WebGL2 (SwiftShader through ANGLE) with float render targets, and no network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-gpu-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """A Chromium/Chrome binary on PATH (or $FASTNCA_CHROMIUM), or None."""
    env = os.environ.get("FASTNCA_CHROMIUM")
    if env:
        return shutil.which(env)
    return next((b for b in map(shutil.which, CHROMIUM_NAMES) if b), None)


def run_headless(
    page,
    fragment: str = "",
    *,
    screenshot=None,
    window=(640, 640),
    extra_flags=(),
    timeout: float = 180.0,
) -> str:
    """Open ``page#fragment`` in headless Chromium; return the DOM after load (or write a PNG
    to ``screenshot``)."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH (apt-get install -y chromium)")
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="fastnca-chromium-") as profile:
        cmd = [binary, *CHROMIUM_FLAGS, *extra_flags, f"--user-data-dir={profile}"]
        if screenshot is None:
            cmd += ["--dump-dom", url]
        else:
            cmd += [
                f"--screenshot={Path(screenshot).resolve()}",
                f"--window-size={window[0]},{window[1]}",
                url,
            ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"chromium exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


def read_state(dom: str) -> torch.Tensor:
    """The (1, C, H, W) float32 state the page wrote into ``#nca-result`` in test mode."""
    m = re.search(
        r'<pre id="nca-result"[^>]*data-shape="(\d+),(\d+),(\d+)"[^>]*>([^<]*)</pre>', dom
    )
    if m is None:
        err = re.search(r'<pre id="nca-result"[^>]*>([^<]*)</pre>', dom)
        raise RuntimeError(f"the page wrote no state: {err.group(1)[:300] if err else dom[:300]}")
    c, h, w = map(int, m.groups()[:3])
    a = np.frombuffer(base64.b64decode(m.group(4)), dtype="<f4").reshape(1, c, h, w)
    return torch.from_numpy(a.copy())
