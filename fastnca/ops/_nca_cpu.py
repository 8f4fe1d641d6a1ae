"""CPU helpers of the fused NCA step, shared by the plain step (``fastnca.ops.nca_step``) and the
step with options (``fastnca.ops.nca_step_options``): perception planes and their adjoint, the
fired cells of a mask, the GEMM block size, and the plain step's forward and backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastnca._checks import acc_dtype
from fastnca.reference import circular_pad1


def _chunk() -> int:
    # Cells per GEMM block: small enough to keep the (hidden, chunk) activations in cache, large
    # enough that every thread has work (measured at (4, 12, 128, 128): 8192 cells best on one
    # thread; 4096 cells was 10x slower on two threads of a loaded machine, 16384+ best there).
    return 8192 * max(1, torch.get_num_threads())


def _taps(filters):
    # Non-zero taps (a, e, value) of each filter, read on the host (the CPU path's bank is on CPU).
    return [
        [(a, e, v) for a, row in enumerate(kf) for e, v in enumerate(row) if v != 0]
        for kf in filters.tolist()
    ]


def _perceive_planes(x, taps, zero_pad=False):
    # x: (B, C, H, W) -> P: (F, C, B, H, W), P[f, c, b] = filter f on channel c of image b: the
    # layout in which the fired cells of all images are columns of one (F*C, B*H*W) matrix.
    # Circular padding, or zeros outside the grid with zero_pad.
    B, C, H, W = x.shape
    xt = x.transpose(0, 1)
    xp = F.pad(xt, (1, 1, 1, 1)) if zero_pad else circular_pad1(xt)  # (C, B, H+2, W+2), one copy
    out = torch.empty((len(taps), C, B, H, W), dtype=x.dtype)
    for f, tf in enumerate(taps):
        o = out[f]
        if not tf:
            o.zero_()
            continue
        a, e, v = tf[0]
        o.copy_(xp[:, :, a : a + H, e : e + W])
        if v != 1:
            o.mul_(v)
        for a, e, v in tf[1:]:
            o.add_(xp[:, :, a : a + H, e : e + W], alpha=v)
    return out


def _adjoint_planes(dp, g, taps, zero_pad=False):
    # g + adjoint perception of dp: (F, C, B, H, W) -> (B, C, H, W). Accumulates into a padded
    # buffer (dx[i+a-1, j+e-1] += k[a, e] dp[i, j]) and folds the halo back circularly (zero_pad:
    # drops it, the padding is a constant).
    B, C, H, W = g.shape
    acc = torch.zeros((C, B, H + 2, W + 2), dtype=dp.dtype)
    acc[:, :, 1 : H + 1, 1 : W + 1] = g.transpose(0, 1)
    for f, tf in enumerate(taps):
        for a, e, v in tf:
            acc[:, :, a : a + H, e : e + W].add_(dp[f], alpha=v)
    if zero_pad:
        return acc[:, :, 1 : H + 1, 1 : W + 1].transpose(0, 1)
    acc[:, :, 1].add_(acc[:, :, H + 1])
    acc[:, :, H].add_(acc[:, :, 0])
    acc[:, :, 1 : H + 1, 1].add_(acc[:, :, 1 : H + 1, W + 1])
    acc[:, :, 1 : H + 1, W].add_(acc[:, :, 1 : H + 1, 0])
    return acc[:, :, 1 : H + 1, 1 : W + 1].transpose(0, 1)


def _fired(mask, dtype):
    # Flat indices (b*H*W + i*W + j) of fired cells, and their mask values (None for a bool mask).
    m = mask.reshape(-1)
    if m.dtype == torch.bool:
        return m.nonzero().squeeze(1), None
    idx = (m != 0).nonzero().squeeze(1)
    return idx, m.index_select(0, idx).to(dtype)


def _acc(t):
    return acc_dtype(t.dtype)


# ------------------------------------------- the plain step on CPU: the MLP on fired cells only


def _cpu_forward(x, w1, b1, w2, b2, mask, filters):
    # The MLP on fired cells only, in column blocks of _chunk() cells. -> (B, C, H, W) in x.dtype.
    dt = _acc(x)
    B, C, H, W = x.shape
    NF, N = filters.shape[0], B * H * W
    taps = _taps(filters)
    idx, vals = _fired(mask, dt)
    w1p = w1.to(dt).view(-1, C, NF).transpose(1, 2).reshape(-1, NF * C)  # columns f*C + c
    p = _perceive_planes(x.to(dt), taps).view(NF * C, N)
    out = torch.empty((C, B, H, W), dtype=dt)
    out.copy_(x.transpose(0, 1))  # (C, B*H*W) below: fired columns get their update
    b1c = None if b1 is None else b1.to(dt)[:, None]
    b2c = None if b2 is None else b2.to(dt)[:, None]
    w2c = w2.to(dt)
    chunk = _chunk()
    for lo in range(0, idx.numel(), chunk):
        ic = idx[lo : lo + chunk]
        pc = p.index_select(1, ic)  # (F*C, n)
        a = w1p @ pc if b1c is None else torch.addmm(b1c, w1p, pc)  # (HID, n)
        y = w2c @ a.relu_() if b2c is None else torch.addmm(b2c, w2c, a.relu_())
        if vals is not None:
            y.mul_(vals[lo : lo + chunk])
        out.view(C, N).scatter_add_(1, ic.expand(C, -1), y)
    return out.view(C, B, H, W).transpose(0, 1).to(x.dtype).contiguous()


def _cpu_backward(grad, x, w1, b1, w2, mask, filters):
    # -> (dx in grad's dtype, dw1, db1, dw2, db2 in the accumulation dtype), like nca_step_bwd.
    dt = _acc(x)
    B, C, H, W = x.shape
    NF, N = filters.shape[0], B * H * W
    taps = _taps(filters)
    idx, vals = _fired(mask, dt)
    w1p = w1.to(dt).view(-1, C, NF).transpose(1, 2).reshape(-1, NF * C)
    w2c = w2.to(dt)
    b1c = None if b1 is None else b1.to(dt)[:, None]
    p = _perceive_planes(x.to(dt), taps).view(NF * C, N)
    g = grad.to(dt)
    gT = g.transpose(0, 1).reshape(C, N)
    dp = torch.zeros((NF * C, N), dtype=dt)
    dw1p = torch.zeros_like(w1p)
    dw2 = torch.zeros_like(w2c)
    db1 = torch.zeros(w1p.shape[0], dtype=dt)
    db2 = torch.zeros(C, dtype=dt)
    chunk = _chunk()
    for lo in range(0, idx.numel(), chunk):
        ic = idx[lo : lo + chunk]
        pc = p.index_select(1, ic)  # (F*C, n)
        h = (w1p @ pc if b1c is None else torch.addmm(b1c, w1p, pc)).relu_()  # (HID, n)
        gy = gT.index_select(1, ic)  # (C, n)
        if vals is not None:
            gy.mul_(vals[lo : lo + chunk])
        dw2.addmm_(gy, h.t())
        db2.add_(gy.sum(1))
        da = torch.ops.aten.threshold_backward(w2c.t() @ gy, h, 0)  # (HID, n)
        dw1p.addmm_(da, pc.t())
        db1.add_(da.sum(1))
        dp.scatter_(1, ic.expand(NF * C, -1), w1p.t() @ da)
    dx = _adjoint_planes(dp.view(NF, C, B, H, W), g, taps)
    dw1 = dw1p.view(-1, NF, C).transpose(1, 2).reshape(w1.shape)
    return dx.to(grad.dtype).contiguous(), dw1, db1, dw2, db2
