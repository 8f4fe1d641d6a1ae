"""Plain-PyTorch definitions of every fastnca op.

These are the specification, the test oracle and the CPU path. They are written with ops that
inductor fuses (rolls, slices, elementwise, matmul) so that ``torch.compile`` of the CPU path turns
each into one or two loops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastnca._checks import acc_dtype

# The NCA perception bank of the fast.ai lesson: identity, sobel_x, sobel_y, laplacian, unscaled.
# Filters are cross-correlation kernels (like F.conv2d): out[i, j] = sum_ab k[a, b] x[i+a-1, j+b-1].
_SOBEL_X = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
DEFAULT_FILTERS = torch.tensor(
    [
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],  # identity
        _SOBEL_X,  # sobel_x
        [list(r) for r in zip(*_SOBEL_X, strict=True)],  # sobel_y (transpose of sobel_x)
        [[1.0, 2.0, 1.0], [2.0, -12.0, 2.0], [1.0, 2.0, 1.0]],  # laplacian
    ]
)
# The Distill "Self-Organising Textures" scaling: gradient and laplacian filters divided by 8.
DISTILL_FILTERS = DEFAULT_FILTERS * torch.tensor([1.0, 1 / 8, 1 / 8, 1 / 8])[:, None, None]


def circular_pad1(x: torch.Tensor) -> torch.Tensor:
    """Circular padding of one cell on the last two dims, exact for any H, W >= 1.

    x: (..., H, W) -> (..., H + 2, W + 2). (F.pad's circular mode needs pad <= size; this does not.)
    """
    x = torch.cat([x[..., -1:, :], x, x[..., :1, :]], dim=-2)
    return torch.cat([x[..., -1:], x, x[..., :1]], dim=-1)


def pad1(x: torch.Tensor, padding: str = "circular", value: float = 0.0) -> torch.Tensor:
    """One cell of padding on the last two dims: ``"circular"`` (wrap) or ``"zeros"`` (``value``).

    x: (..., H, W) -> (..., H + 2, W + 2).
    """
    if padding == "circular":
        return circular_pad1(x)
    if padding == "zeros":
        return F.pad(x, (1, 1, 1, 1), value=value)
    raise ValueError(f'padding must be "circular" or "zeros", got {padding!r}')


def perceive_ref(
    x: torch.Tensor, filters: torch.Tensor | None = None, padding: str = "circular"
) -> torch.Tensor:
    """The lesson's perception: every channel convolved with every filter, padding 1.

    x: (B, C, H, W), filters: (F, 3, 3) -> (B, C*F, H, W), out[:, c*F + f] = filter f on channel c.
    Same as ``conv2d(circular_pad(x.reshape(B*C, 1, H, W)), filters[:, None])`` reshaped to
    (B, C*F, H, W). ``padding="zeros"`` reads cells outside the grid as 0 (the growing NCA).
    """
    if filters is None:
        filters = DEFAULT_FILTERS
    filters = filters.to(device=x.device, dtype=x.dtype)
    B, C, H, W = x.shape
    y = F.conv2d(pad1(x.reshape(B * C, 1, H, W), padding), filters[:, None])
    return y.reshape(B, C * filters.shape[0], H, W)


def rotate_filters(filters: torch.Tensor, angle: float) -> torch.Tensor:
    """The bank with its two gradient filters (1 and 2) rotated by ``angle`` radians.

    filters: (F >= 3, 3, 3) -> [k0, cos a k1 - sin a k2, sin a k1 + cos a k2, k3, ...]: with
    k1, k2 = sobel_x, sobel_y the perceived gradient turns by ``angle`` (the growing NCA's
    ``perceive(x, angle)``). ``angle == 0`` returns ``filters`` itself.
    """
    if angle == 0:
        return filters
    if filters.shape[0] < 3:
        raise ValueError(
            f"perception_angle needs a bank of F >= 3 filters (identity, two "
            f"gradients, ...), got {tuple(filters.shape)}"
        )
    c, s = math.cos(angle), math.sin(angle)
    k1, k2 = filters[1], filters[2]
    return torch.cat([filters[:1], (c * k1 - s * k2)[None], (s * k1 + c * k2)[None], filters[3:]])


def alive_mask_ref(
    x: torch.Tensor, threshold: float, channel: int = 3, padding: str = "circular"
) -> torch.Tensor:
    """Living cells: ``maxpool3x3(x[:, channel]) > threshold`` as a (B, 1, H, W) bool mask.

    The 3x3 neighbourhood wraps for ``padding="circular"``; for ``"zeros"`` cells outside the grid
    are ignored (padded with -inf: the padding never wins the max, like TF's 'SAME' max-pool).
    """
    a = x[:, channel : channel + 1]
    a = pad1(a, padding, value=-math.inf)
    return F.max_pool2d(a, 3, stride=1) > threshold


def perceive_shifts(
    x: torch.Tensor, filters: torch.Tensor, padding: str = "circular"
) -> torch.Tensor:
    """perceive_ref as a sum of 9 shifted copies: the form inductor fuses into one stencil loop.

    out[b, c*F + f, i, j] = sum_{a,b'} filters[f, a, b'] * x[b, c, (i+a-1) % H, (j+b'-1) % W].
    ``padding="zeros"`` reads 0 outside the grid. Accumulates in float32 (or float64 for float64
    input) and returns x's dtype.
    """
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    xp = pad1(x.to(acc), padding)  # (B, C, H+2, W+2)
    k = filters.to(device=x.device, dtype=acc)  # (F, 3, 3)
    out = None
    for a in range(3):
        for b in range(3):
            tap = xp[:, :, None, a : a + H, b : b + W] * k[None, None, :, a, b, None, None]
            out = tap if out is None else out + tap
    return out.reshape(B, C * k.shape[0], H, W).to(x.dtype)


def perceive_backward_ref(grad_out: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Adjoint of perceive: dx[c, i, j] = sum_f sum_ab k_f[a, b] g[c*F+f, i-a+1, j-b+1] (circular).

    grad_out: (B, C*F, H, W), filters: (F, 3, 3) -> (B, C, H, W).
    """
    B, CF, H, W = grad_out.shape
    Fn = filters.shape[0]
    acc = acc_dtype(grad_out.dtype)
    gp = circular_pad1(grad_out.to(acc).reshape(B, CF // Fn, Fn, H, W))
    k = filters.to(device=grad_out.device, dtype=acc)
    out = None
    for a in range(3):
        for b in range(3):
            # g[i - (a-1)] sits at padded row i + 2 - a.
            tap = gp[:, :, :, 2 - a : 2 - a + H, 2 - b : 2 - b + W] * k[:, a, b, None, None]
            tap = tap.sum(2)
            out = tap if out is None else out + tap
    return out.to(grad_out.dtype)


def gram_ref(f: torch.Tensor) -> torch.Tensor:
    """One Gram matrix per image: G[b] = F_b F_bᵀ / (H*W), F_b = f[b].reshape(C, H*W).

    f: (B, C, H, W) -> (B, C, C) in f's dtype.
    """
    B, C, H, W = f.shape
    fm = f.reshape(B, C, H * W)
    return fm @ fm.transpose(1, 2) / (H * W)


def gram_batch_ref(f: torch.Tensor) -> torch.Tensor:
    """The lesson's Gram, ``einsum('bchw,bdhw->cd', f, f) / (H*W)``: summed over the batch.

    f: (B, C, H, W) -> (C, C) = gram_ref(f).sum(0). With B > 1 this is B times the batch-mean Gram,
    and comparing it with a single-image style target mixes the images of the batch; kept only as
    an explicit option (``fastnca.gram(f, batch_sum=True)``).
    """
    return torch.einsum("bchw,bdhw->cd", f, f) / (f.shape[-2] * f.shape[-1])


def style_loss_ref(feats, targets, weights=None) -> torch.Tensor:
    """sum_l w_l * mean((gram_ref(f_l) - T_l)²), T_l: (C_l, C_l) broadcast over the batch or
    (B, C_l, C_l); the mean is over B*C_l*C_l elements. feats: sequence of (B, C_l, H_l, W_l)."""
    weights = [1.0] * len(feats) if weights is None else weights
    total = None
    for f, t, w in zip(feats, targets, weights, strict=True):
        term = w * (gram_ref(f) - t).square().mean()
        total = term if total is None else total + term
    return total


CLIP_KEYS = ("perception", "hidden", "update", "state")


def clamp_opt(t: torch.Tensor, clip: dict | None, key: str) -> torch.Tensor:
    """``t`` clamped to ``clip[key] = (lo, hi)`` when the step clips there (None bounds: open)."""
    if not clip or clip.get(key) is None:
        return t
    lo, hi = clip[key]
    return t.clamp(lo, hi)


def update_mask(x: torch.Tensor, fire_rate: float = 0.5) -> torch.Tensor:
    """Bernoulli(fire_rate) per cell as a bool (B, 1, H, W) mask, from torch's generator.

    Drawn exactly like the lesson's ``(torch.rand(B, 1, H, W) + fire_rate).floor()`` (same values
    for the same seed on CPU), stored as bool: 1 byte per cell.
    """
    B, _, H, W = x.shape
    return (torch.rand((B, 1, H, W), device=x.device) + fire_rate) >= 1.0


def nca_step_ref(
    x,
    w1,
    b1,
    w2,
    b2,
    mask,
    filters=None,
    *,
    padding="circular",
    alive_threshold=None,
    alive_channel=3,
    clip=None,
    perception_angle=0.0,
) -> torch.Tensor:
    """The lesson's NCA update: perception, two 1x1 convolutions (per-cell matmuls), mask, residual,
    with the options of the Distill models.

    x: (B, C, H, W); w1: (hidden, F*C); b1: (hidden,) or None; w2: (C, hidden); b2: (C,) or None;
    mask: (B, 1, H, W) of 0/1 (bool or float); filters: (F, 3, 3) (default DEFAULT_FILTERS).
    Defaults (the lesson): p = perceive_ref(x) (B, F*C, H, W); h = relu(w1 . p + b1);
    y = w2 . h (+ b2); x + y * mask.

    Options:
        padding: "circular" (default) or "zeros", for the perception and the alive max-pool.
        perception_angle: radians; the bank is ``rotate_filters(filters, angle)``.
        clip: None or a dict with any of ``CLIP_KEYS`` mapping to (lo, hi):
            p = clip(p, "perception"); h = clip(relu(.), "hidden"); y = clip(y, "update");
            new = clip(x + y * mask, "state").
        alive_threshold: None or a float: with ``pre = alive_mask_ref(x)``,
            ``post = alive_mask_ref(new)`` (channel ``alive_channel``), the result is
            ``new * (pre & post)`` (the growing NCA's living mask).
    """
    if filters is None:
        filters = DEFAULT_FILTERS
    filters = rotate_filters(filters.to(device=x.device, dtype=x.dtype), perception_angle)
    p = clamp_opt(perceive_ref(x, filters, padding), clip, "perception")
    h = clamp_opt(torch.relu(F.conv2d(p, w1[:, :, None, None], b1)), clip, "hidden")
    y = clamp_opt(F.conv2d(h, w2[:, :, None, None], b2), clip, "update")
    new = clamp_opt(x + y * mask.to(x.dtype), clip, "state")
    if alive_threshold is None:
        return new
    pre = alive_mask_ref(x, alive_threshold, alive_channel, padding)
    post = alive_mask_ref(new, alive_threshold, alive_channel, padding)
    return new * (pre & post).to(x.dtype)
