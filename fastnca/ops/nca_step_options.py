"""nca_step with the options of the Distill models: zero padding, alive masking, clipping (the
bank is rotated by the caller). Used by ``fastnca.ops.nca_step`` whenever an option is set; the
no-option call never comes here.

Semantics (as ``fastnca.reference.nca_step_ref``; (lo, hi) from ``clip``, open when absent):
    p = clip(perceive(x), perception); h = clip(relu(w1 p + b1), hidden);
    y = clip(w2 h + b2, update); new = clip(x + y * mask, state)   (x where the mask is 0);
    out = new * (pre & post), pre = maxpool3x3(x[alive]) > thr, post = maxpool3x3(new[alive]) > thr
The max-pool wraps for circular padding and ignores cells outside the grid for zero padding.

CPU: ``fastnca::nca_step_cpu_options`` and its backward, the fired-cells-only MLP of the plain CPU
op with the options added. It returns the alive mask ``pre & post`` (bool, 1 byte per cell) besides
the new state, and backward keeps x, the update mask and the alive mask: 4C + 2 bytes per cell in
float32, everything else (perception, hidden, update) is recomputed, on the cells that fired and
are alive only (a dead cell's output is 0 whatever its update; the masks carry no gradient).
Where the Triton path runs (CUDA; FASTNCA_BACKEND=triton under the interpreter), ``ops.nca_step``
calls ``fastnca::nca_step_options`` instead (same outputs and saved tensors; backward from
``options_backward``). Other devices: a dense composite under activation checkpointing, which
saves only its inputs.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from fastnca.ops._nca_cpu import (
    _acc,
    _adjoint_planes,
    _channel_order,
    _chunk,
    _fired,
    _perceive_planes,
    _planes_order,
)
from fastnca.ops._stencil_cpu import filter_taps
from fastnca.reference import CLIP_KEYS, circular_pad1, perceive_shifts, rotate_filters

_INF = math.inf


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


def clip_bounds(clip) -> list[float]:
    """``clip`` (None or {key: (lo, hi)}) as 8 floats [lo, hi] per CLIP_KEYS, +-inf where open."""
    if clip is None:
        return [-_INF, _INF] * 4
    if not isinstance(clip, dict):
        raise TypeError(
            f"clip must be None or a dict with keys from {CLIP_KEYS}, got {type(clip).__name__}"
        )
    bad = [k for k in clip if k not in CLIP_KEYS]
    if bad:
        raise ValueError(f"clip has unknown keys {bad}; allowed: {list(CLIP_KEYS)}")
    out = []
    for key in CLIP_KEYS:
        rng = clip.get(key)
        if rng is None:
            out += [-_INF, _INF]
            continue
        if (
            not isinstance(rng, (tuple, list))
            or len(rng) != 2
            or not all(v is None or _real(v) for v in rng)
        ):
            raise ValueError(f"clip[{key!r}] must be a (lo, hi) pair of numbers, got {rng!r}")
        lo = -_INF if rng[0] is None else float(rng[0])
        hi = _INF if rng[1] is None else float(rng[1])
        if lo > hi:
            raise ValueError(f"clip[{key!r}] must have lo <= hi, got {rng!r}")
        out += [lo, hi]
    return out


def check_options(padding, alive_threshold, alive_channel, clip, perception_angle, C, NF):
    """Validate the step options -> (zero_pad, threshold or None, channel, clip bounds, angle)."""
    if padding not in ("circular", "zeros"):
        raise ValueError(f'padding must be "circular" or "zeros", got {padding!r}')
    if alive_threshold is not None and not (
        _real(alive_threshold) and math.isfinite(alive_threshold)
    ):
        raise ValueError(
            f"alive_threshold must be None or a finite number, got {alive_threshold!r}"
        )
    if (
        not isinstance(alive_channel, numbers.Integral)
        or isinstance(alive_channel, bool)
        or (alive_threshold is not None and not 0 <= alive_channel < C)
    ):
        raise ValueError(
            f"alive_channel must be an int in [0, C) = [0, {C}), got {alive_channel!r}"
        )
    if not (_real(perception_angle) and math.isfinite(perception_angle)):
        raise ValueError(
            f"perception_angle must be a finite number (radians), got {perception_angle!r}"
        )
    if perception_angle != 0 and NF < 3:
        raise ValueError(
            f"perception_angle rotates filters 1 and 2 and needs F >= 3 filters, got F={NF}"
        )
    thr = None if alive_threshold is None else float(alive_threshold)
    return padding == "zeros", thr, int(alive_channel), clip_bounds(clip), float(perception_angle)


# ------------------------------------------------------------------------------ helpers


def _clamp(t, lo, hi):
    # clamp unless the range is open; in place (t is a temporary).
    return t if lo == -_INF and hi == _INF else t.clamp_(lo, hi)


def _inside(t, lo, hi):
    # torch.clamp's gradient mask (torch 2.14): 1 where lo < t < hi, 0 on the bounds and beyond
    # (an infinite t on an open side included, where torch gives 1).
    return (t > lo) & (t < hi)


def alive_mask(a, thr, zero_pad):
    # a: (B, H, W) -> maxpool3x3(a) > thr, (B, H, W) bool; the padding never wins the max.
    a = a[:, None]
    a = F.pad(a, (1, 1, 1, 1), value=-_INF) if zero_pad else circular_pad1(a)
    return F.max_pool2d(a, 3, stride=1)[:, 0] > thr


# ---------------------------------------------------------------------------------- CPU op


def _forward(x, w1, b1, w2, b2, mask, filters, zero_pad, thr, ch, clip):
    # -> (out (B, C, H, W) in x.dtype, alive (B, 1, H, W) bool, empty without alive masking).
    dt = _acc(x)
    B, C, H, W = x.shape
    NF, N = filters.shape[0], B * H * W
    (plo, phi, hlo, hhi, ulo, uhi, slo, shi) = clip
    taps = filter_taps(filters)
    xd = x.to(dt)
    if thr is not None:
        # A cell with no living cell in its 3x3 neighbourhood (pre) has no neighbour that can
        # survive (pre is false around it), so its update reaches no output: skip its MLP.
        pre = alive_mask(xd[:, ch], thr, zero_pad)  # (B, H, W)
        near = alive_mask(pre.to(dt), 0.5, zero_pad)[:, None]
        mask = mask & near if mask.dtype == torch.bool else mask * near
    idx, vals = _fired(mask, dt)
    w1p = _planes_order(w1, C, NF, dt)  # columns f*C + c
    p = _perceive_planes(xd, taps, zero_pad).view(NF * C, N)
    out = torch.empty((C, B, H, W), dtype=dt)
    out.copy_(xd.transpose(0, 1))
    b1c = None if b1 is None else b1.to(dt)[:, None]
    b2c = None if b2 is None else b2.to(dt)[:, None]
    w2c = w2.to(dt)
    chunk = _chunk()
    for lo in range(0, idx.numel(), chunk):
        ic = idx[lo : lo + chunk]
        pc = _clamp(p.index_select(1, ic), plo, phi)  # (F*C, n)
        a = w1p @ pc if b1c is None else torch.addmm(b1c, w1p, pc)  # (HID, n)
        h = _clamp(a.relu_(), hlo, hhi)
        y = _clamp(w2c @ h if b2c is None else torch.addmm(b2c, w2c, h), ulo, uhi)  # (C, n)
        if vals is not None:
            y.mul_(vals[lo : lo + chunk])
        out.view(C, N).scatter_add_(1, ic.expand(C, -1), y)
    _clamp(out, slo, shi)
    if thr is None:
        alive = torch.empty((0,), dtype=torch.bool)
    else:
        alive = pre & alive_mask(out[ch], thr, zero_pad)  # (B, H, W)
        out.mul_(alive)
        alive = alive.view(B, 1, H, W)
    return out.transpose(0, 1).to(x.dtype).contiguous(), alive


def _backward(grad, x, w1, b1, w2, b2, mask, alive, filters, zero_pad, clip):
    # -> (dx in grad's dtype, dw1, db1, dw2, db2 in the accumulation dtype). Recomputes the step
    # on the fired cells; gradients of the clamps are torch.clamp's (1 on lo < t < hi).
    dt = _acc(x)
    B, C, H, W = x.shape
    NF, N = filters.shape[0], B * H * W
    (plo, phi, hlo, hhi, ulo, uhi, slo, shi) = clip
    clip_p, clip_h = (plo, phi) != (-_INF, _INF), (hlo, hhi) != (-_INF, _INF)
    clip_u, clip_s = (ulo, uhi) != (-_INF, _INF), (slo, shi) != (-_INF, _INF)
    taps = filter_taps(filters)
    if alive.numel():  # cells the alive mask zeroes get no gradient: skip their MLP
        mask = mask & alive if mask.dtype == torch.bool else mask * alive
    idx, vals = _fired(mask, dt)
    w1p = _planes_order(w1, C, NF, dt)
    w2c = w2.to(dt)
    b1c = None if b1 is None else b1.to(dt)[:, None]
    b2c = None if b2 is None else b2.to(dt)[:, None]
    xd = x.to(dt)
    p = _perceive_planes(xd, taps, zero_pad).view(NF * C, N)
    xT = xd.transpose(0, 1).reshape(C, N)
    gT = torch.empty((C, B, H, W), dtype=dt)
    gT.copy_(grad.transpose(0, 1))
    gT = gT.view(C, N)
    if alive.numel():
        gT.mul_(alive.view(1, N))  # gradient w.r.t. new (before the alive mask)
    gd = gT * _inside(xT, slo, shi) if clip_s else gT.clone()  # direct term: resting cells
    dp = torch.zeros((NF * C, N), dtype=dt)
    dw1p = torch.zeros_like(w1p)
    dw2 = torch.zeros_like(w2c)
    db1 = torch.zeros(w1p.shape[0], dtype=dt)
    db2 = torch.zeros(C, dtype=dt)
    chunk = _chunk()
    for lo in range(0, idx.numel(), chunk):
        ic = idx[lo : lo + chunk]
        vc = None if vals is None else vals[lo : lo + chunk]
        pr = p.index_select(1, ic)  # (F*C, n)
        pc = pr.clamp(plo, phi) if clip_p else pr
        a = w1p @ pc if b1c is None else torch.addmm(b1c, w1p, pc)  # (HID, n)
        r = a.relu()
        h = r.clamp(hlo, hhi) if clip_h else r
        gy = gT.index_select(1, ic)  # (C, n): gradient w.r.t. new on the fired cells
        if clip_u or clip_s:
            yr = w2c @ h if b2c is None else torch.addmm(b2c, w2c, h)
        if clip_s:
            y = yr.clamp(ulo, uhi)
            new = (
                xT.index_select(1, ic).addcmul_(y, vc)
                if vc is not None
                else (xT.index_select(1, ic).add_(y))
            )
            gy.mul_(_inside(new, slo, shi))
            gd.index_copy_(1, ic, gy)
        if vc is not None:
            gy = gy * vc
        if clip_u:
            gy.mul_(_inside(yr, ulo, uhi))
        dw2.addmm_(gy, h.t())
        db2.add_(gy.sum(1))
        dh = w2c.t() @ gy
        if clip_h:
            dh.mul_(_inside(r, hlo, hhi))
        da = torch.ops.aten.threshold_backward(dh, r, 0)  # (HID, n)
        dw1p.addmm_(da, pc.t())
        db1.add_(da.sum(1))
        dpc = w1p.t() @ da
        if clip_p:
            dpc.mul_(_inside(pr, plo, phi))
        dp.index_copy_(1, ic, dpc)
    dx = _adjoint_planes(
        dp.view(NF, C, B, H, W), gd.view(C, B, H, W).transpose(0, 1), taps, zero_pad
    )
    dw1 = _channel_order(dw1p, C, NF, w1.shape)
    return dx.to(grad.dtype).contiguous(), dw1, db1, dw2, db2


@torch.library.custom_op("fastnca::nca_step_cpu_options", mutates_args=(), device_types="cpu")
def _cpu_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor,
    filters: torch.Tensor,
    zero_pad: bool,
    alive_threshold: float | None,
    alive_channel: int,
    clip: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(
        x, w1, b1, w2, b2, mask, filters, zero_pad, alive_threshold, alive_channel, clip
    )


@_cpu_op.register_fake
def _(x, w1, b1, w2, b2, mask, filters, zero_pad, alive_threshold, alive_channel, clip):
    B, _, H, W = x.shape
    shape = (0,) if alive_threshold is None else (B, 1, H, W)
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(shape, dtype=torch.bool, device=x.device),
    )


@torch.library.custom_op(
    "fastnca::nca_step_cpu_options_backward", mutates_args=(), device_types="cpu"
)
def _cpu_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor,
    alive: torch.Tensor,
    filters: torch.Tensor,
    zero_pad: bool,
    clip: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad, x, w1, b1, w2, b2, mask, alive, filters, zero_pad, clip)


@_cpu_backward_op.register_fake
def _(grad, x, w1, b1, w2, b2, mask, alive, filters, zero_pad, clip):
    dt = _acc(x)
    new = lambda *shape: torch.empty(shape, dtype=dt, device=x.device)
    return (
        torch.empty(grad.shape, dtype=grad.dtype, device=grad.device),
        new(*w1.shape),
        new(w1.shape[0]),
        new(*w2.shape),
        new(w2.shape[0]),
    )


def options_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, mask, filters, zero_pad, _, _, clip, *extra = inputs  # extra: Triton's
    # dot_precision. x, the update mask and the alive mask: the only per-step tensors kept.
    ctx.save_for_backward(x, w1, b1, w2, b2, mask, output[1], filters)
    ctx.zero_pad, ctx.clip, ctx.extra = zero_pad, clip, extra


def options_backward(backward_op):
    """The autograd backward of an options op (CPU here, Triton in ops.nca_step) from its
    registered backward op (grad, x, w1, b1, w2, b2, mask, alive, filters, zero_pad, clip)."""

    def backward(ctx, grad, _grad_alive):
        x, w1, b1, w2, b2, mask, alive, filters = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = backward_op(
            grad, x, w1, b1, w2, b2, mask, alive, filters, ctx.zero_pad, ctx.clip, *ctx.extra
        )
        return (
            dx.to(x.dtype),
            dw1.to(w1.dtype),
            None if b1 is None else db1.to(b1.dtype),
            dw2.to(w2.dtype),
            None if b2 is None else db2.to(b2.dtype),
        ) + (None,) * (6 + len(ctx.extra))

    return backward


_cpu_op.register_autograd(
    options_backward(torch.ops.fastnca.nca_step_cpu_options_backward),
    setup_context=options_setup_context,
)


# ------------------------------------------------------------ other devices: dense, checkpointed


def _dense(x, w1, b1, w2, b2, mask, filters, zero_pad, thr, ch, clip):
    # Every cell through the MLP (ops inductor fuses), float32 (float64 for float64).
    (plo, phi, hlo, hhi, ulo, uhi, slo, shi) = clip
    dt = _acc(x)
    B, C, H, W = x.shape
    xs = x.to(dt)
    p = perceive_shifts(xs, filters, "zeros" if zero_pad else "circular").reshape(B, -1, H * W)
    p = p.clamp(plo, phi)
    a = torch.matmul(w1.to(dt), p)
    if b1 is not None:
        a = a + b1.to(dt)[:, None]
    y = torch.matmul(w2.to(dt), torch.relu(a).clamp(hlo, hhi))  # (B, C, H*W)
    if b2 is not None:
        y = y + b2.to(dt)[:, None]
    m = mask.reshape(B, 1, H * W)
    xs = xs.reshape(B, C, H * W)
    new = torch.where(m != 0, xs + y.clamp(ulo, uhi) * m.to(dt), xs).clamp(slo, shi)
    new = new.reshape(B, C, H, W)
    if thr is not None:
        keep = alive_mask(xs.reshape(B, C, H, W)[:, ch], thr, zero_pad) & alive_mask(
            new[:, ch], thr, zero_pad
        )
        new = new * keep[:, None].to(dt)
    return new.to(x.dtype)


def nca_step_options(x, w1, b1, w2, b2, mask, filters, zero_pad, thr, ch, clip, angle):
    """The step with options, validated arguments (see ``fastnca.ops.nca_step``)."""
    filters = rotate_filters(filters, angle)
    if x.device.type == "cpu":
        return torch.ops.fastnca.nca_step_cpu_options(
            x, w1, b1, w2, b2, mask, filters, zero_pad, thr, ch, clip
        )[0]
    return torch.utils.checkpoint.checkpoint(
        _dense, x, w1, b1, w2, b2, mask, filters, zero_pad, thr, ch, clip, use_reentrant=False
    )
