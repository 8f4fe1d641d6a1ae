"""Style transfer by pixel optimisation with the Learner (fast.ai lesson: "the image is the model").

    loss(img) = content_weight * mean_l [ mean((phi_l(img) - P_l)²) / mean(P_l²) ]    (content l)
              + style_weight   * mean_l [ mean((gram(phi_l(img)) - G_l)²) / mean(G_l²) ]  (style l)
    P_l = phi_l(content), G_l = gram(phi_l(style)): relative errors, so the weights mean the same
    whatever the scale of the features (pretrained VGG or the random fallback).

phi = VGG16Features (one forward for the union of the layers), gram(f) = F Fᵀ / (H*W) per image.
``TensorModel`` holds the image as its only parameter, ``ImageOptCB`` makes the Learner call
``model()`` and ``loss_func(preds)``, ``ImageLogCB`` keeps snapshots and saves a progress grid.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastnca._checks import check_int
from fastnca.losses import content_loss
from fastnca.ops import StyleLoss, gram
from fastnca.style.features import VGG16Features, layer_index
from fastnca.style.images import check_min_side, image_grid, load_image, save_image
from fastnca.train.callbacks import DeviceCB, MixedPrecision, ProgressCB
from fastnca.train.data import dummy_dls
from fastnca.train.learner import Callback, Learner, TrainCB

__all__ = [
    "ImageLogCB",
    "ImageOptCB",
    "StyleTransferLoss",
    "TensorModel",
    "feature_layers",
    "stylize",
]

CONTENT_LAYERS = ("relu4_1",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def feature_layers(content_layers: Sequence, style_layers: Sequence) -> list[int]:
    """The features indices one extractor must return for both losses (union, in order)."""
    return list(dict.fromkeys(layer_index(l) for l in (*style_layers, *content_layers)))


class TensorModel(nn.Module):
    """A model whose output is its parameter: ``TensorModel(img)()`` is ``img`` (1, 3, H, W)."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"t: expected a floating tensor, got {getattr(t, 'dtype', type(t))}")
        self.t = nn.Parameter(t.detach().clone())

    def forward(self, *args) -> torch.Tensor:  # the Learner's dummy batch, if given, is ignored
        return self.t


class ImageOptCB(TrainCB):
    """Training callback for pixel optimisation: ``preds = model()``, ``loss = loss_func(preds)``.

    With ``clamp`` (default) the pixels are clamped to [0, 1] after every optimiser step.
    Backward/step come from TrainCB, so MixedPrecision, AccelerateCB and CompileCB compose.
    """

    def __init__(self, clamp: bool = True):
        super().__init__()
        self.clamp = clamp

    def predict(self, learn):
        learn.preds = learn.model()

    def get_loss(self, learn):
        learn.loss = learn.loss_func(learn.preds)

    def after_step(self, learn):
        if self.clamp:
            with torch.no_grad():
                for p in learn.model.parameters():
                    p.clamp_(0, 1)


class ImageLogCB(Callback):
    """Every ``every`` training steps keep a CPU copy of the image (the first image too), and
    after the fit save them as a grid PNG at ``path`` (if given). ``self.images``: the snapshots
    (3, H, W); ``self.steps``: the step of each."""

    order = 20

    def __init__(
        self, every: int = 10, path: str | os.PathLike | None = None, ncols: int | None = None
    ):
        check_int("every", every, 1)
        self.every, self.path, self.ncols = every, path, ncols
        self.images: list[torch.Tensor] = []
        self.steps: list[int] = []

    def _snap(self, learn, step: int):
        self.images.append(learn.model().detach().float().cpu().clamp(0, 1)[0])
        self.steps.append(step)

    def before_fit(self, learn):
        self.images, self.steps, self._n = [], [], 0
        self._snap(learn, 0)

    def after_batch(self, learn):
        if learn.training:
            self._n += 1
            if self._n % self.every == 0:
                self._snap(learn, self._n)

    def after_fit(self, learn):
        if self.steps[-1] != self._n:
            self._snap(learn, self._n)
        if self.path is not None:
            save_image(image_grid(self.images, ncols=self.ncols), self.path)


class StyleTransferLoss(nn.Module):
    """``loss(img)``: the weighted content + style loss of (B, 3, H, W) images in [0, 1].

    Targets are computed once, in float32 without gradients, from ``content`` and ``style``
    (1, 3, H, W). ``last`` keeps the latest (content, style) terms as detached tensors.
    """

    def __init__(
        self,
        features: VGG16Features,
        content: torch.Tensor,
        style: torch.Tensor,
        content_layers: Sequence = CONTENT_LAYERS,
        style_layers: Sequence = STYLE_LAYERS,
        content_weight: float = 1.0,
        style_weight: float = 1.0,
    ):
        super().__init__()
        self.features = features
        have = list(features.layers)
        c_idx = [layer_index(l) for l in content_layers]
        s_idx = [layer_index(l) for l in style_layers]
        missing = list(dict.fromkeys(i for i in c_idx + s_idx if i not in have))
        if missing:
            raise ValueError(
                f"content_layers/style_layers: layers {missing} are not among the "
                f"features' layers {have}; build the extractor with "
                f"feature_layers(content_layers, style_layers)"
            )
        self.c_pos = [have.index(i) for i in c_idx]
        self.s_pos = [have.index(i) for i in s_idx]
        self.content_weight, self.style_weight = float(content_weight), float(style_weight)
        with torch.no_grad():
            fc = features(content.float())
            fs = features(style.float())
        for k, p in enumerate(self.c_pos):
            self.register_buffer(f"content_{k}", fc[p].detach().clone())
        # Layer l's term is divided by (number of layers * mean square of its target): a relative
        # error, so the weights mean the same for any feature scale (pretrained VGG or fallback).
        self.c_layer_weights = [
            1.0 / (len(c_idx) * fc[p].square().mean().item() + 1e-12) for p in self.c_pos
        ]
        self.style = None
        if self.s_pos:
            with torch.no_grad():
                grams = [gram(fs[p].float())[0] for p in self.s_pos]  # (C_l, C_l)
            ws = [1.0 / (len(s_idx) * g.square().mean().item() + 1e-12) for g in grams]
            self.style = StyleLoss(grams, weights=ws)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        feats = self.features(img)
        total = img.new_zeros((), dtype=torch.float32)
        lc = ls = total
        if self.c_pos and self.content_weight:
            targets = [getattr(self, f"content_{k}") for k in range(len(self.c_pos))]
            lc = content_loss([feats[p].float() for p in self.c_pos], targets, self.c_layer_weights)
            total = total + self.content_weight * lc
        if self.style is not None and self.style_weight:
            ls = self.style([feats[p] for p in self.s_pos])
            total = total + self.style_weight * ls
        self.last = (lc.detach(), ls.detach())
        return total


def _as_image(x, name: str, size: int | None, verbose: bool) -> torch.Tensor:
    """A path or a (1, 3, H, W) / (3, H, W) tensor in [0, 1] -> (1, 3, H, W) float32 on the CPU,
    the longer side at most ``size``."""
    if isinstance(x, (str, os.PathLike)):
        img = load_image(Path(x), size=size, verbose=verbose)
        check_min_side(f"{name} {str(x)!r}", img.shape[-1], img.shape[-2], size)
        return img
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{name}: expected an image path or a float tensor (1, 3, H, W) in [0, 1], "
            f"got {getattr(x, 'dtype', type(x).__name__)}"
        )
    t = x.detach().float()
    t = t[None] if t.dim() == 3 else t
    if t.dim() != 4 or t.shape[:2] != (1, 3):
        raise ValueError(f"{name}: expected shape (1, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    h, w = t.shape[-2:]
    if size is not None and max(h, w) > size:
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        if verbose:
            print(
                f"fastnca: resized {name} from {w}x{h} to {nw}x{nh} (size {size})",
                file=sys.stderr,
                flush=True,
            )
    check_min_side(name, t.shape[-1], t.shape[-2], size, (w, h))
    return t.clamp(0, 1)


def stylize(
    content,
    style,
    steps: int = 150,
    lr: float = 0.05,
    content_layers: Sequence = CONTENT_LAYERS,
    style_layers: Sequence = STYLE_LAYERS,
    style_weight: float = 10.0,
    content_weight: float = 1.0,
    init: str = "content",
    size: int | None = 256,
    *,
    features: VGG16Features | None = None,
    weights="auto",
    device=None,
    amp: bool | str = False,
    compile: bool | str = False,
    progress: bool = False,
    log_every: int | None = None,
    log_path=None,
    cbs: Sequence[Callback] = (),
    seed: int = 0,
    verbose: bool = True,
) -> torch.Tensor:
    """Optimise the pixels of an image to match ``content``'s features and ``style``'s Grams.

    content, style: image paths or float tensors (1, 3, H, W) in [0, 1]; resized so the longer
    side is at most ``size`` (None: as they are). The result has the content's size.
    init: "content" (start from the content image) or "random" (uniform noise, seeded).
    features: a VGG16Features holding at least the content and style layers (default: one built
    with ``weights``, see fastnca.style.features). amp: False, True/"bf16" or "fp16" (autocast for
    the feature extractor and losses); compile: torch.compile the loss (features + Grams) with
    fullgraph=True (True: inductor; a string: that backend). The loss, not the model, is compiled:
    the model only returns its parameter (CompileCB in ``cbs`` would compile that instead).
    log_every/log_path: an ImageLogCB (snapshots every N steps, grid saved to log_path).
    Returns the stylized image, (1, 3, H, W) float32 in [0, 1] on the CPU.
    """
    check_int("steps", steps, 1)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive finite learning rate, got {lr!r}")
    if init not in ("content", "random"):
        raise ValueError(f"init: expected 'content' or 'random', got {init!r}")
    for name, w in (("style_weight", style_weight), ("content_weight", content_weight)):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, got {w!r}")
    content_img = _as_image(content, "content", size, verbose)
    style_img = _as_image(style, "style", size, verbose)
    dev = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    )
    if features is None:
        features = VGG16Features(
            feature_layers(content_layers, style_layers), weights=weights, verbose=verbose
        )
    features = features.to(dev)
    loss = StyleTransferLoss(
        features,
        content_img.to(dev),
        style_img.to(dev),
        content_layers,
        style_layers,
        content_weight,
        style_weight,
    ).to(dev)
    if compile:  # True: inductor; a string names another torch.compile backend
        backend = compile if isinstance(compile, str) else "inductor"
        loss_func = torch.compile(loss, backend=backend, fullgraph=True)
    else:
        loss_func = loss
    if init == "content":
        start = content_img
    else:
        g = torch.Generator().manual_seed(seed)
        start = torch.rand(content_img.shape, generator=g)
    model = TensorModel(start)
    cb_list: list[Callback] = [ImageOptCB(), DeviceCB(dev)]
    if amp:
        cb_list.append(MixedPrecision("bf16" if amp is True else amp))
    if progress:
        cb_list.append(ProgressCB(file=sys.stderr))
    if log_every is not None:
        cb_list.append(ImageLogCB(log_every, log_path))
    learn = Learner(
        model,
        dummy_dls(steps),
        loss_func=loss_func,
        lr=lr,
        cbs=[*cb_list, *cbs],
        opt_func=torch.optim.Adam,
    )
    learn.fit(1, valid=False)
    return model.t.detach().float().cpu().clamp(0, 1)
