"""gram and style_loss: per-image Gram matrices and the Gram (style) loss, differentiable.

CUDA tensors (float16, bfloat16, float32) run the Triton kernels of ``fastnca.kernels.gram``
through the registered ops ``torch.ops.fastnca.gram`` / ``gram_backward`` and ``style_loss`` /
``style_loss_backward``. Everything else (CPU, and float64 anywhere) runs a composite with a custom
backward: one ``bmm`` with the symmetrised gradient, ``dF = (dG + dGᵀ) F / N``, instead of the two
``bmm`` autograd derives from ``F @ Fᵀ`` (measured about 2x faster forward+backward on CPU). Both
paths compile with ``torch.compile(fullgraph=True)``.

Differences from the lesson: the lesson's ``einsum('bchw,bdhw->cd')`` sums the Grams of the batch
and compares that sum with a single-image target; here every image has its own Gram, compared with
a (C, C) target broadcast over the batch (or per-image (B, C, C) targets). The batch-summed form is
``gram(f, batch_sum=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.library import triton_op

try:  # Triton is optional: without it every device runs the torch composite (ops._backend)
    from fastnca.kernels.gram import gram_bwd, gram_fwd, style_fwd
except ImportError:
    gram_bwd = gram_fwd = style_fwd = None
from fastnca._checks import acc_dtype
from fastnca.ops._backend import use_triton
from fastnca.ops._checks import (
    check_channels,
    check_loss_weight,
    check_same_device,
    check_tensor,
)

# ---------------------------------------------------------------------------------------------
# Registered ops (CUDA path; on CPU tensors they run the kernels through the Triton interpreter).


@triton_op("fastnca::gram", mutates_args={})
def _gram_op(f: torch.Tensor) -> torch.Tensor:
    return gram_fwd(f)


@triton_op("fastnca::gram_backward", mutates_args={})
def _gram_backward_op(grad: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return gram_bwd(grad, f, sym=True)


def _gram_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gram_backward(ctx, grad):
    (f,) = ctx.saved_tensors
    return torch.ops.fastnca.gram_backward(grad, f)


_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)


@triton_op("fastnca::style_loss", mutates_args={})
def _style_op(
    f: torch.Tensor, target: torch.Tensor, save_residual: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return style_fwd(f, target, save_residual)


@triton_op("fastnca::style_loss_backward", mutates_args={})
def _style_backward_op(grad: torch.Tensor, residual: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    B, C, H, W = f.shape
    return gram_bwd(residual, f, sym=False, grad_scale=grad, scale=2.0 / (B * C * C * H * W))


def _style_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _style_backward(ctx, grad_loss, grad_residual):
    f, residual = ctx.saved_tensors
    if residual.numel() == 0:
        raise RuntimeError(
            "fastnca::style_loss was called with save_residual=False, so it has no "
            "residual to differentiate; call it with save_residual=True"
        )
    return torch.ops.fastnca.style_loss_backward(grad_loss, residual, f), None, None


_style_op.register_autograd(_style_backward, setup_context=_style_setup)

# ---------------------------------------------------------------------------------------------
# Composites (CPU and float64): inductor fuses the elementwise parts around the bmm.


_acc = acc_dtype  # the arithmetic dtype of every op (fastnca._checks)


# Blocked CPU reduction for float32 Grams over many pixels. One float32 gemm over N = H*W terms
# lost 0.3% (C=4, N=2^24) and more as N grows; instead the N axis is cut into blocks of
# K = max(GRAM_BLOCK, C) columns, each block's (C, C) product is one float32 gemm (error at most
# about K * 2^-24 of sum_k |f_ik f_jk| in the worst case, ~sqrt(K) * 2^-24 typically) and the
# blocks are summed in float64 (error ~ (N / K) * 2^-53, negligible). The partial products take
# at most the input's memory (K >= C). gram() of (1, 4, 4096, 4096) float32 (N = 2^24) on a busy
# 2-core CPU, one thread, median of 7: 157 ms before, 100 ms after; max relative error 3.0e-3 ->
# 5.3e-8. At (1, 64, 512, 512): 93 -> 96 ms, 1.7e-6 -> 9.3e-8.
GRAM_BLOCK = 4096


def _gram_sum(m: torch.Tensor) -> torch.Tensor:
    """sum_k m[:, i, k] m[:, j, k] for m: (B, C, N) in float32/float64 -> (B, C, C), same dtype.

    float32 on the CPU with N > K (K = max(GRAM_BLOCK, C)): blocked float32 gemms with float64
    block sums (see GRAM_BLOCK), so the error does not grow with N. Otherwise one bmm.
    """
    B, C, N = m.shape
    K = max(GRAM_BLOCK, C)
    if m.dtype != torch.float32 or m.device.type != "cpu" or N <= K:
        return torch.bmm(m, m.transpose(1, 2))
    n = N // K
    x = m[..., : n * K].reshape(B, C, n, K).transpose(1, 2)  # (B, n, C, K)
    acc = torch.matmul(x, x.transpose(-1, -2)).to(torch.float64).sum(1)  # (B, C, C)
    if N > n * K:
        r = m[..., n * K :]
        acc = acc + torch.bmm(r, r.transpose(1, 2)).to(torch.float64)
    return acc.to(m.dtype)


class _GramComposite(torch.autograd.Function):
    """G = F Fᵀ / N in float32 (float64 for float64), returned in f's dtype."""

    @staticmethod
    def forward(ctx, f):
        B, C, H, W = f.shape
        m = f.reshape(B, C, H * W).to(_acc(f.dtype))
        ctx.save_for_backward(f)
        return (_gram_sum(m) / (H * W)).to(f.dtype)

    @staticmethod
    def backward(ctx, grad):
        (f,) = ctx.saved_tensors
        B, C, H, W = f.shape
        acc = _acc(f.dtype)
        g = grad.to(acc)
        s = (g + g.transpose(1, 2)) / (H * W)
        return torch.bmm(s, f.reshape(B, C, H * W).to(acc)).view(f.shape).to(f.dtype)


class _StyleLossComposite(torch.autograd.Function):
    """mean((F Fᵀ / N - T)²) with D = G - T from one baddbmm; backward 2/(BC²N) (D + Dᵀ) F."""

    @staticmethod
    def forward(ctx, f, target):
        B, C, H, W = f.shape
        acc = _acc(f.dtype)
        m = f.reshape(B, C, H * W).to(acc)
        if m.device.type == "cpu" and acc == torch.float32 and H * W > max(GRAM_BLOCK, C):
            d = _gram_sum(m) / (H * W) - target.to(acc)  # accurate for many pixels
        else:
            d = torch.baddbmm(
                target.to(acc).expand(B, C, C), m, m.transpose(1, 2), beta=-1, alpha=1.0 / (H * W)
            )
        ctx.save_for_backward(f, d)
        return d.square().mean()

    @staticmethod
    def backward(ctx, grad):
        f, d = ctx.saved_tensors
        B, C, H, W = f.shape
        s = (d + d.transpose(1, 2)) * (grad * (2.0 / (B * C * C * H * W)))
        dx = torch.bmm(s, f.reshape(B, C, H * W).to(d.dtype))
        return dx.view(f.shape).to(f.dtype), None


def gram_composite(f: torch.Tensor) -> torch.Tensor:
    return _GramComposite.apply(f)


def style_loss_composite(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _StyleLossComposite.apply(f, target)


# ---------------------------------------------------------------------------------------------
# Input checks shared with fastnca.losses.


def as_layers(name: str, x) -> list:
    """A tensor or a non-empty sequence of tensors -> list; errors name ``name``."""
    if isinstance(x, torch.Tensor):
        return [x]
    if not isinstance(x, Sequence) or isinstance(x, str):
        raise TypeError(
            f"{name} must be a tensor or a list of tensors (one per layer), got {type(x).__name__}"
        )
    if len(x) == 0:
        raise ValueError(f"{name} is empty; pass at least one layer")
    return list(x)


def check_feature(name: str, f) -> None:
    check_tensor(name, f, ndim=4)
    check_channels(name, f)
    if f.shape[2] < 1 or f.shape[3] < 1:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(f.shape)}")


def layer_weights(weights, n: int, what: str = "feats") -> list | None:
    """None, or n per-layer weights (numbers or 0-d tensors)."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(
                f"weights must be a 1-D tensor or a list, got shape {tuple(weights.shape)}"
            )
        weights = list(weights.unbind(0))
    elif not isinstance(weights, Sequence) or isinstance(weights, str):
        raise TypeError(f"weights must be a list of numbers, got {type(weights).__name__}")
    if len(weights) != n:
        raise ValueError(
            f"weights has {len(weights)} entries but {what} has {n} layers; "
            "pass one weight per layer"
        )
    return list(weights)


def _check_target(l: int, t, f: torch.Tensor) -> None:
    name = f"targets[{l}]"
    check_tensor(name, t)
    B, C = f.shape[:2]
    if tuple(t.shape) not in ((C, C), (B, C, C)):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but feats[{l}] has {C} channels "
            f"and batch {B}; expected ({C}, {C}) or ({B}, {C}, {C})"
        )
    check_same_device(name, t, f"feats[{l}]", f)


def _triton_path(f: torch.Tensor) -> bool:
    return f.dtype != torch.float64 and use_triton(f.device)


# ---------------------------------------------------------------------------------------------
# Public API.


def gram(f: torch.Tensor, batch_sum: bool = False) -> torch.Tensor:
    """Per-image Gram matrices ``G[b] = F_b F_bᵀ / (H*W)``, ``F_b = f[b].reshape(C, H*W)``.

    Args:
        f: (B, C, H, W) float16, bfloat16, float32 or float64; any H, W >= 1; any strides.
        batch_sum: return the lesson's batch-summed ``einsum('bchw,bdhw->cd') / (H*W)``, (C, C).

    Returns:
        (B, C, C) (or (C, C) with ``batch_sum``) in f's dtype; accumulated in float32 (float64 for
        float64). Differentiable with respect to ``f``.

    Error bound (CPU, float32/half inputs): for H*W <= K = max(4096, C) one float32 gemm, error
    at most about ``H*W * 2^-24 * sum_k |f_ik f_jk| / (H*W)``; for more pixels a blocked sum (K
    pixels per float32 block, blocks added in float64), so the bound stops growing with H*W:
    ``|G_ij - exact| <= (K * 2^-24 + H*W / K * 2^-53) * sum_k |f_ik f_jk| / (H*W)`` plus the final
    rounding to f's dtype (typical errors ~1e-8 relative at H*W = 2^24, where one gemm gave 3e-3).
    float64 inputs are summed in float64 (bound ``H*W * 2^-53``).
    """
    check_feature("f", f)
    g = torch.ops.fastnca.gram(f) if _triton_path(f) else gram_composite(f)
    return g.sum(0) if batch_sum else g


def _style_layer(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if _triton_path(f):
        save = torch.is_grad_enabled() and f.requires_grad
        return torch.ops.fastnca.style_loss(f, t, save)[0]
    return style_loss_composite(f, t)


def style_loss(feats, targets, weights=None) -> torch.Tensor:
    """Gram (style) loss: ``sum_l w_l * mean((gram(feats[l]) - targets[l])²)``.

    Args:
        feats: list of (B, C_l, H_l, W_l) feature maps (or one tensor), floating dtypes.
        targets: list of target Grams, (C_l, C_l) broadcast over the batch or (B, C_l, C_l).
        weights: optional list (or 1-D tensor) of per-layer weights; default all 1.

    Returns:
        0-d loss in float32 (float64 for float64 features). Differentiable with respect to the
        features; the targets are constants (detached).
    """
    feats = as_layers("feats", feats)
    targets = as_layers("targets", targets)
    if len(targets) != len(feats):
        raise ValueError(
            f"targets has {len(targets)} layers but feats has {len(feats)}; pass one "
            "target Gram per feature layer"
        )
    ws = layer_weights(weights, len(feats))
    total = None
    for l, (f, t) in enumerate(zip(feats, targets, strict=True)):
        check_feature(f"feats[{l}]", f)
        _check_target(l, t, f)
        if ws is not None:
            check_loss_weight(f"weights[{l}]", ws[l], f.device)
        term = _style_layer(f, t.detach())
        if ws is not None:
            term = term * ws[l]
        total = term if total is None else total + term
    return total


class StyleLoss(nn.Module):
    """Style loss against fixed target Grams held as buffers (``target_0``, ``target_1``, ...).

    ``StyleLoss.from_features(style_feats, weights)`` computes the targets once from a style image's
    features; ``module(feats)`` is ``style_loss(feats, targets, weights)``.
    """

    def __init__(self, targets, weights=None):
        super().__init__()
        targets = as_layers("targets", targets)
        for l, t in enumerate(targets):
            check_tensor(f"targets[{l}]", t)
            if t.dim() not in (2, 3) or t.shape[-1] != t.shape[-2]:
                raise ValueError(
                    f"targets[{l}] must be (C, C) or (B, C, C), got shape {tuple(t.shape)}"
                )
            self.register_buffer(f"target_{l}", t.detach().clone())
        self.n_layers = len(targets)
        ws = layer_weights(weights, len(targets), what="targets")
        for l, w in enumerate(ws or ()):
            check_loss_weight(f"weights[{l}]", w, targets[l].device)
        self.weights = None if ws is None else [float(w) for w in ws]

    @classmethod
    def from_features(cls, feats, weights=None) -> StyleLoss:
        """Targets from style features, list of (1, C_l, H_l, W_l) (kept as (C_l, C_l), broadcast
        over any batch) or (B, C_l, H_l, W_l) (kept per image). Grams in float32 (float64)."""
        feats = as_layers("feats", feats)
        grams = []
        with torch.no_grad():
            for l, f in enumerate(feats):
                check_feature(f"feats[{l}]", f)
                g = gram(f.to(_acc(f.dtype)))
                grams.append(g[0] if g.shape[0] == 1 else g)
        return cls(grams, weights)

    @property
    def targets(self) -> list[torch.Tensor]:
        return [getattr(self, f"target_{l}") for l in range(self.n_layers)]

    def forward(self, feats) -> torch.Tensor:
        return style_loss(feats, self.targets, self.weights)

    def extra_repr(self) -> str:
        chans = [t.shape[-1] for t in self.targets]
        return f"channels={chans}, weights={self.weights}"
