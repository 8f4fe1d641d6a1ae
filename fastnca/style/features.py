"""VGG16 feature extractor for style/content losses: forward hooks, early stop, offline weights.

``VGG16Features(layers)`` returns the activations at the given indices of
``torchvision.models.vgg16().features`` (the fast.ai lesson's homework: collected with forward
hooks), computing nothing past the deepest requested index. Input ``(B, 3, H, W)`` in [0, 1];
ImageNet normalisation happens inside.

Weights, in order of preference (the choice is printed and kept in ``.source``):

1. an explicit ``weights=PATH`` (a state dict, loaded with ``torch.load(weights_only=True)``);
   a file the user names always wins;
2. torchvision's ImageNet weights, from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or
   downloaded into it once (528 MB): a connection or read silent for ``timeout`` seconds is given
   up, and so is the whole download after ``deadline`` seconds (default 600, environment
   ``FASTNCA_DOWNLOAD_DEADLINE``); a progress line goes to stderr; the partial file is removed on
   any failure (and stale ones of killed downloads on the next try). ``FASTNCA_OFFLINE=1`` never
   downloads (nor does ``weights="random"`` or a weights file);
3. the offline fallback: random multi-scale shallow convolutional features (Ustyuzhaninov et al.,
   2017, "What does it take to generate natural textures?", ICLR: one layer of random filters of
   many sizes, ReLU, Gram matrices). Every requested index gets one fixed random filter bank
   (seeded, ReLU) applied to the full-resolution image, with kernel 3 * 2**k and stride 2**k for
   an index after k pools (3, 6, 12, 24, 48 px for relu1_1..relu5_1) and VGG's channel count, so
   shapes match VGG16 exactly. The large filters see fine detail over large areas, which is what
   lets random features reproduce structured textures (dots, scales, checks). Limits: no semantic
   content (content loss keeps edges and colour layout only), some high-frequency noise in the
   result, colour and layout of a big style image tend to be copied, results differ from those of
   a pretrained VGG; about 3x the cost of the first VGG block (a small fraction of VGG16's).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnca.style.download import (  # noqa: F401 (download_weights is part of this module's API)
    DEADLINE_ENV,
    DEFAULT_DEADLINE,
    OFFLINE_ENV,
    _default_deadline,
    download_weights,
    offline,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # VGG16_Weights.IMAGENET1K_V1
DEFAULT_LAYERS = (1, 6, 11, 18, 25)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1

# vgg16().features: (conv, relu)* blocks of 2, 2, 3, 3, 3 convs, each block followed by a max pool.
_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _layer_table() -> tuple[dict[str, int], list[int], list[int]]:
    """names -> index, channels per index, pools applied up to and including each index."""
    names, chans, level, i = {}, [], [], 0
    for b, (c, n) in enumerate(_BLOCKS, start=1):
        for k in range(1, n + 1):
            names[f"conv{b}_{k}"], names[f"relu{b}_{k}"] = i, i + 1
            chans += [c, c]
            level += [b - 1, b - 1]
            i += 2
        names[f"pool{b}"] = i
        chans.append(c)
        level.append(b)
        i += 1
    return names, chans, level


LAYER_NAMES, _CHANNELS, _LEVEL = _layer_table()  # e.g. LAYER_NAMES["relu4_1"] == 18
N_LAYERS = len(_CHANNELS)  # 31
_INDEX_NAMES = {i: n for n, i in LAYER_NAMES.items()}


def layer_index(layer: int | str) -> int:
    """A ``vgg16().features`` index from an int (0..30) or a name such as "relu3_1"."""
    if isinstance(layer, str):
        if layer not in LAYER_NAMES:
            raise ValueError(
                f"layers: unknown layer name {layer!r}; expected an index 0..30 or "
                f"one of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, conv3_2, pool2, "
                f"..."
            )
        return LAYER_NAMES[layer]
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layers: expected ints or layer names, got {type(layer).__name__}")
    if not 0 <= layer < N_LAYERS:
        raise ValueError(f"layers: index {layer} out of range; vgg16().features has indices 0..30")
    return layer


def layer_name(index: int) -> str:
    """The name of a ``vgg16().features`` index: 1 -> "relu1_1", 4 -> "pool1"."""
    return _INDEX_NAMES[layer_index(index)]


def feature_shape(index: int | str, height: int, width: int) -> tuple[int, int, int]:
    """(C, H, W) of the activation at a features index for an (H, W) input (any weights)."""
    i = layer_index(index)
    s = 2 ** _LEVEL[i]
    return _CHANNELS[i], height // s, width // s


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"fastnca.style.features: {msg}", file=sys.stderr, flush=True)


def hub_checkpoint_path() -> Path:
    """Where torchvision keeps the VGG16 ImageNet weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(VGG16_URL)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A vgg16 or vgg16().features state dict from a file, keyed like features ("0.weight")."""
    if path.is_dir() or not path.exists():
        raise ValueError(
            f"weights: {str(path)!r} is not a file; expected a VGG16 state-dict file "
            f"(.pth), 'auto', 'imagenet' or 'random'"
        )
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device could block torch.load forever
        raise ValueError(
            f"weights: {str(path)!r} is not a regular file (a FIFO, device or "
            f"socket); expected a VGG16 state-dict file (.pth)"
        )
    try:
        try:  # memory-map: the classifier (~0.5 GB of the torchvision file) is never read
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated files, non-torch files
        raise ValueError(
            f"weights: cannot load {str(path)!r} as a state dict with "
            f"weights_only=True ({type(e).__name__})"
        ) from None
    return _features_keys(sd, str(path))


def _features_keys(sd, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise ValueError(f"weights: {where} holds a {type(sd).__name__}, expected a state dict")
    if any(k.startswith("features.") for k in sd):
        sd = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    return dict(sd)


def _vgg16_features(sd: Mapping[str, torch.Tensor], last: int, source: str) -> nn.Sequential:
    """``vgg16().features[: last + 1]`` (same indices and keys as torchvision), weights from ``sd``.

    Built on the meta device and filled with ``assign=True``: no time spent on a random init. ReLUs
    are not in-place, so a hooked conv output is never overwritten by the ReLU after it.
    """
    with torch.device("meta"):
        mods: list[nn.Module] = []
        c_in = 3
        for c, n in _BLOCKS:
            for _ in range(n):
                mods += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = c
            mods.append(nn.MaxPool2d(2, 2))
        net = nn.Sequential(*mods[: last + 1])
    keep = {
        k: v.float() if v.is_floating_point() else v
        for k, v in sd.items()
        if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= last
    }
    try:
        net.load_state_dict(keep, strict=True, assign=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ValueError(
            f"weights: the state dict from {source} does not fit vgg16 features "
            f"0..{last}: {msg[:300]}"
        ) from None
    return net


class RandomMultiScaleFeatures(nn.Module):
    """Offline fallback: fixed random multi-scale filter banks + ReLU (see the module doc).

    For each requested index i after k pools, s = 2**k: relu of a random conv with kernel
    base * s and stride s on the image (replicate padding s on each side), C_i filters, so
    (B, 3, H, W) -> (B, C_i, H // s, W // s), exactly VGG16's shapes. Computed as the same conv in
    space-to-depth form, ``conv2d(pixel_unshuffle(x_padded, s), W_i)`` with W_i of shape
    (C_i, 3 * s², base, base) (a 3x3 conv over 3s² channels runs much faster than a 48x48 kernel at
    stride 16). W_i ~ N(0, 1 / fan_in), seeded per (seed, i): the same features in every run,
    whatever other layers are requested.
    """

    def __init__(self, layers: Sequence[int], seed: int = 0, base: int = 3):
        super().__init__()
        if base < 1 or base % 2 == 0:
            raise ValueError(f"base: expected an odd kernel size >= 1, got {base}")
        self.layers = tuple(layers)
        self.levels = tuple(_LEVEL[i] for i in self.layers)
        self.base = base
        for n, (i, k) in enumerate(zip(self.layers, self.levels, strict=True)):
            c_in = 3 * 4**k
            g = torch.Generator().manual_seed(seed * N_LAYERS + i)  # same bank whatever else runs
            w = torch.randn(_CHANNELS[i], c_in, base, base, generator=g) / (c_in * base**2) ** 0.5
            self.register_buffer(f"weight_{n}", w)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        H, W = x.shape[-2:]
        out = []
        for n, k in enumerate(self.levels):
            s, pad = 2**k, (self.base - 1) // 2 * 2**k  # pad: s on each side for base 3
            # Replicate padding, cropped to a multiple of s, as one gather: padded row r is row
            # clamp(r - pad, 0, H - 1). (Inductor mis-strides replication_pad2d's backward.)
            rows = torch.arange(-pad, (H // s + self.base - 1) * s - pad, device=x.device)
            cols = torch.arange(-pad, (W // s + self.base - 1) * s - pad, device=x.device)
            xp = x.index_select(-2, rows.clamp(0, H - 1)).index_select(-1, cols.clamp(0, W - 1))
            w = getattr(self, f"weight_{n}")
            out.append(F.relu(F.conv2d(F.pixel_unshuffle(xp, s), w.to(x.dtype))))
        return out


class VGG16Features(nn.Module):
    """Frozen VGG16 feature extractor: ``forward(x) -> [activation at each of `layers`]``.

    layers: ``vgg16().features`` indices or names (default relu1_1, relu2_1, relu3_1, relu4_1,
    relu5_1); the output list follows this order. weights: "auto" (torchvision cache, then
    download, then the random fallback), "imagenet" (torchvision weights or an error), "random"
    (the fallback), a path to a state-dict file, or a state dict. x: (B, 3, H, W) in [0, 1] -> list
    of (B, C_i, H // 2**k_i, W // 2**k_i) with k_i the pools before index i. Parameters never get
    gradients; the module stays in eval mode.
    """

    def __init__(
        self,
        layers: Sequence[int | str] = DEFAULT_LAYERS,
        weights="auto",
        *,
        verbose: bool = True,
        timeout: float = 5.0,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(layers, (int, str)):
            layers = (layers,)
        idx = tuple(layer_index(l) for l in layers)
        if not idx:
            raise ValueError("layers: expected at least one layer index, got an empty sequence")
        if len(set(idx)) != len(idx):
            raise ValueError(f"layers: duplicate layers in {tuple(layers)}")
        self.layers = idx
        self.names = tuple(_INDEX_NAMES[i] for i in idx)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        sd, self.source = self._resolve(weights, verbose, timeout)
        if sd is None:
            self.body = RandomMultiScaleFeatures(idx, seed=seed)
        else:
            self.body = _vgg16_features(sd, max(idx), self.source)  # stops after the deepest
            self._acts: dict[int, torch.Tensor] = {}
            for i in idx:
                self.body[i].register_forward_hook(self._hook(i))
        self.requires_grad_(False)
        self.eval()
        _say(verbose, f"features {', '.join(self.names)} from {self.source}")

    @property
    def is_pretrained(self) -> bool:
        return not isinstance(self.body, RandomMultiScaleFeatures)

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self._acts[i] = output

        return hook

    @staticmethod
    def _resolve(weights, verbose: bool, timeout: float):
        """(state dict or None for the fallback, description of the source)."""
        if isinstance(weights, Mapping):
            return _features_keys(weights, "the given state dict"), "a given state dict"
        if isinstance(weights, (str, os.PathLike)) and str(weights) not in (
            "auto",
            "imagenet",
            "random",
        ):
            path = Path(weights).expanduser()
            return _load_state_dict(path), f"weights file {path}"
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(
                f"weights: expected 'auto', 'imagenet', 'random', a path or a state "
                f"dict, got {type(weights).__name__}"
            )
        fallback = "random multi-scale features (offline fallback, Ustyuzhaninov et al. 2017)"
        if weights == "random":
            return None, fallback
        ckpt = hub_checkpoint_path()
        why = f"no {ckpt.name} in the torch hub cache {ckpt.parent}"
        if not ckpt.is_file():
            if offline():
                why += f" and {OFFLINE_ENV} is set"
            else:
                _say(
                    verbose,
                    f"downloading {VGG16_URL} to {ckpt} (timeout {timeout:g}s, at "
                    f"most {_default_deadline():g}s in all; {OFFLINE_ENV}=1 skips this)",
                )
                try:
                    download_weights(VGG16_URL, ckpt, timeout=timeout, verbose=verbose)
                except (OSError, ValueError) as e:  # URLError, timeouts, refused, hash mismatch
                    why += f" and the download failed ({type(e).__name__}: {e})"
        if ckpt.is_file():
            try:
                return _load_state_dict(ckpt), f"torchvision ImageNet weights {ckpt}"
            except ValueError as e:
                why = f"{ckpt} is unreadable ({e})"
        if weights == "imagenet":
            raise ValueError(
                f"weights='imagenet': {why}; put vgg16-397923af.pth there, pass a "
                f"state-dict file, or use weights='random'"
            )
        _say(
            verbose,
            f"{why}: using the offline fallback. For a pretrained VGG16 put "
            f"{ckpt.name} in {ckpt.parent} or pass --weights PATH",
        )
        return None, fallback

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation: (x - mean) / std per channel; x: (B, 3, H, W)."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected an image batch (B, 3, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating dtype with values in [0, 1], got {x.dtype}")
        x = self.normalize(x)
        if not self.is_pretrained:
            return self.body(x)
        self._acts = {}
        self.body(x)
        acts, self._acts = self._acts, {}
        return [acts[i] for i in self.layers]

    def extra_repr(self) -> str:
        return f"layers={self.names}, source={self.source!r}"
