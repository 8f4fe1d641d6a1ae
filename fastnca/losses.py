"""Losses for style transfer and texture NCA: content, style (Gram), sliced Wasserstein, overflow.

Every multi-layer loss takes a list of (B, C_l, H_l, W_l) feature maps (or one tensor) and returns a
0-d tensor summed over the layers, with optional per-layer weights. ``style_loss`` and ``gram`` live
in :mod:`fastnca.ops.gram` (Triton kernels on CUDA) and are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastnca._checks import acc_dtype, check_int
from fastnca.ops._checks import check_same_device, check_tensor
from fastnca.ops.gram import StyleLoss, as_layers, check_feature, gram, layer_weights, style_loss

__all__ = [
    "StyleLoss",
    "content_loss",
    "gram",
    "overflow_loss",
    "sliced_wasserstein_loss",
    "style_loss",
]


def _pairs(feats, target_feats, weights):
    feats = as_layers("feats", feats)
    target_feats = as_layers("target_feats", target_feats)
    if len(target_feats) != len(feats):
        raise ValueError(
            f"target_feats has {len(target_feats)} layers but feats has {len(feats)}; "
            "pass one target feature map per layer"
        )
    ws = layer_weights(weights, len(feats))
    for l, (f, t) in enumerate(zip(feats, target_feats, strict=True)):
        check_feature(f"feats[{l}]", f)
        check_feature(f"target_feats[{l}]", t)
        check_same_device(f"target_feats[{l}]", t, f"feats[{l}]", f)
        if t.shape[1] != f.shape[1]:
            raise ValueError(
                f"target_feats[{l}] has {t.shape[1]} channels but feats[{l}] has "
                f"{f.shape[1]}; both must come from the same layer"
            )
        if t.shape[0] not in (1, f.shape[0]):
            raise ValueError(
                f"target_feats[{l}] has batch {t.shape[0]} but feats[{l}] has batch "
                f"{f.shape[0]}; expected 1 (broadcast) or {f.shape[0]}"
            )
    return feats, target_feats, ws


def _weighted_sum(terms, ws):
    total = None
    for l, term in enumerate(terms):
        if ws is not None:
            term = term * ws[l]
        total = term if total is None else total + term
    return total


def content_loss(feats, target_feats, weights=None) -> torch.Tensor:
    """``sum_l w_l * mean((feats[l] - target_feats[l])²)`` (the lesson's content loss).

    target_feats[l] must have feats[l]'s shape, or batch 1 (broadcast over the batch).
    """
    feats, target_feats, ws = _pairs(feats, target_feats, weights)
    terms = []
    for l, (f, t) in enumerate(zip(feats, target_feats, strict=True)):
        if tuple(t.shape[1:]) != tuple(f.shape[1:]):
            raise ValueError(
                f"target_feats[{l}] has shape {tuple(t.shape)} but feats[{l}] has "
                f"{tuple(f.shape)}; content loss compares the same positions"
            )
        terms.append(F.mse_loss(f, t.expand_as(f)))
    return _weighted_sum(terms, ws)


def overflow_loss(x: torch.Tensor, normalise: bool = False) -> torch.Tensor:
    """Penalty on values outside [-1, 1]: ``(x - x.clamp(-1, 1)).abs().sum()``, or its mean over
    the elements with ``normalise=True`` (the NCA lesson keeps the state in range with it)."""
    check_tensor("x", x)
    over = (x - x.clamp(-1, 1)).abs()
    return over.mean() if normalise else over.sum()


def _directions(C: int, n: int, dtype, device, generator) -> torch.Tensor:
    # n random unit vectors in R^C as the columns of a (C, n) matrix.
    if generator is None:
        d = torch.randn(C, n, dtype=dtype, device=device)
    else:
        d = torch.randn(C, n, dtype=dtype, device=generator.device, generator=generator).to(device)
    return d / d.norm(dim=0, keepdim=True)


def sliced_wasserstein_loss(
    feats,
    target_feats,
    n_projections: int = 32,
    weights=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced optimal-transport texture loss (Heitz et al., CVPR 2021), summed over layers.

    Per layer: the C-dim feature vectors of every pixel are projected on ``n_projections`` random
    unit directions (fresh per layer and call, from torch's global generator or ``generator``), the
    projections of each image are sorted, and the loss is the mean squared difference between the
    sorted image and target projections. When the target has a different number of pixels, its
    sorted values are resampled to the image's count by linear interpolation of the quantiles
    (``F.interpolate``). Invariant to pixel permutations; zero for identical feature distributions.

    Args:
        feats: list of (B, C_l, H_l, W_l) (or one tensor).
        target_feats: list of (B or 1, C_l, H'_l, W'_l); any H', W'.
        n_projections: number of random directions per layer (>= 1).
        weights: optional per-layer weights.
        generator: optional ``torch.Generator`` for the directions (reproducible without touching
            the global seed); ``torch.manual_seed`` also makes the loss reproducible.

    Returns:
        0-d loss in float32 (float64 for float64 features).
    """
    check_int("n_projections", n_projections, 1)
    feats, target_feats, ws = _pairs(feats, target_feats, weights)
    terms = []
    for f, t in zip(feats, target_feats, strict=True):
        acc = acc_dtype(f.dtype)
        B, C, H, W = f.shape
        N = H * W
        dirs = _directions(C, n_projections, acc, f.device, generator).t()  # (P, C)
        pf = (dirs @ f.reshape(B, C, N).to(acc)).sort(dim=-1).values  # (B, P, N)
        Bt, _, Ht, Wt = t.shape
        pt = (dirs @ t.reshape(Bt, C, Ht * Wt).to(acc)).sort(dim=-1).values  # (Bt, P, N')
        if Ht * Wt != N:
            pt = F.interpolate(pt, size=N, mode="linear", align_corners=False)
        terms.append((pf - pt).square().mean())
    return _weighted_sum(terms, ws)
