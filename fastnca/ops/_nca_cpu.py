"""CPU helpers of the fused NCA step, shared by the plain step (``fastnca.ops.nca_step``) and the
step with options (``fastnca.ops.nca_step_options``): perception planes and their adjoint, the
fired cells of a mask, the GEMM block size, and the plain step's forward and backward.

The plain step runs the C++ kernel of ``kernels/nca_step_cpu.cpp`` (tiles of rows fused in cache,
on torch's intra-op threads) when it is built (``ops._cpp_kernels``); otherwise the pure-torch
path below (whole-grid passes, parts on Python threads)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from fastnca._checks import acc_dtype
from fastnca.ops._cpp_kernels import kernels
from fastnca.ops._cpu_parallel import channel_parts, cores, n_parts, run_parts, split
from fastnca.ops._stencil_cpu import (
    adjoint_into,
    filter_taps,
    fold_circular,
    planes_into,
    taps_tensor,
)
from fastnca.reference import circular_pad1, update_mask


def _chunk() -> int:
    # Cells per GEMM block: small enough to keep the (hidden, chunk) activations in cache, large
    # enough that every thread has work (measured at (4, 12, 128, 128): 8192 cells best on one
    # thread; 4096 cells was 10x slower on two threads of a loaded machine, 16384+ best there).
    return 8192 * max(1, torch.get_num_threads())


def _perceive_planes(x, taps, zero_pad=False):
    # x: (B, C, H, W) -> P: (F, C, B, H, W), P[f, c, b] = filter f on channel c of image b: the
    # layout in which the fired cells of all images are columns of one (F*C, B*H*W) matrix.
    # Circular padding, or zeros outside the grid with zero_pad.
    B, C, H, W = x.shape
    xt = x.transpose(0, 1)
    xp = F.pad(xt, (1, 1, 1, 1)) if zero_pad else circular_pad1(xt)  # (C, B, H+2, W+2), one copy
    out = torch.empty((len(taps), C, B, H, W), dtype=x.dtype)
    planes_into(xp, taps, list(out))
    return out


def _adjoint_planes(dp, g, taps, zero_pad=False):
    # g + adjoint perception of dp: (F, C, B, H, W) -> (B, C, H, W). Accumulates into a padded
    # buffer (dx[i+a-1, j+e-1] += k[a, e] dp[i, j]) and folds the halo back circularly (zero_pad:
    # drops it, the padding is a constant).
    B, C, H, W = g.shape
    acc = torch.zeros((C, B, H + 2, W + 2), dtype=dp.dtype)
    acc[:, :, 1 : H + 1, 1 : W + 1] = g.transpose(0, 1)
    adjoint_into(acc, list(dp), taps)
    if zero_pad:
        return acc[:, :, 1 : H + 1, 1 : W + 1].transpose(0, 1)
    return fold_circular(acc).transpose(0, 1)


def _fired(mask, dtype):
    # Flat indices (b*H*W + i*W + j) of fired cells, and their mask values (None for a bool mask).
    m = mask.reshape(-1)
    if m.dtype == torch.bool:
        return m.nonzero().squeeze(1), None
    idx = (m != 0).nonzero().squeeze(1)
    return idx, m.index_select(0, idx).to(dtype)


def _acc(t):
    return acc_dtype(t.dtype)


def _planes_order(w1, C, nf, dt):
    # w1 (HID, C*nf), columns c*nf + f (perceive's channel order) -> (HID, nf*C) in dt, columns
    # f*C + c: the row order of the perception planes.
    return w1.to(dt).view(-1, C, nf).transpose(1, 2).reshape(-1, nf * C)


def _channel_order(dw1p, C, nf, shape):
    # The inverse, for a weight gradient: (HID, nf*C) -> w1's ``shape`` (columns c*nf + f).
    return dw1p.view(-1, nf, C).transpose(1, 2).reshape(shape)


# ------------------------------------------- the plain step on CPU: the MLP on fired cells only


def _setup(x, w1, b1, w2, mask, filters):
    # What forward and backward share: the fired cells (flat b*H*W + i*W + j, and i*W + j within
    # their image), the weights in the planes' row order (f*C + c), the state as (C, B, H, W).
    dt = _acc(x)
    B, C, H, W = x.shape
    idx, vals = _fired(mask, dt)
    w1p = _planes_order(w1, C, filters.shape[0], dt)
    b1c = None if b1 is None else b1.to(dt)[:, None]
    xt = x.to(dt).transpose(0, 1)
    return dt, filter_taps(filters), idx, torch.remainder(idx, H * W), vals, w1p, b1c, w2.to(dt), xt


MIN_FIRED = 4096  # fired cells per MLP part at least


def _segments(idx, B, HW):
    # Per part: (s, e, b) runs of idx of at most _chunk() cells, each inside one image b, so that
    # an image's own (C, H*W) rows can be read and written with local indices.
    starts = torch.searchsorted(idx, torch.arange(B + 1) * HW).tolist()  # image b: [b], [b+1]
    chunk = _chunk()
    segs = []
    for lo, hi in split(idx.numel(), n_parts(idx.numel(), MIN_FIRED)):
        segs.append([])
        for b in range(B):
            s0, s1 = max(lo, starts[b]), min(hi, starts[b + 1])
            segs[-1] += [(s, min(s + chunk, s1), b) for s in range(s0, s1, chunk)]
    return segs


TILE_CELLS = 2048  # cells per tile of the C++ kernel (rows of one image; measured 1-4k best)


def _kernel_args(x, w1, w2, mask, filters):
    # The C++ kernel's inputs: x contiguous in the accumulation dtype, w1's columns in plane
    # order (f*C + c), the mask as (B, H, W) bool or in x's dtype, the taps as (K, 4) float64
    # rows (filter, row, column, value), and the tile height.
    dt = _acc(x)
    B, C, H, W = x.shape
    nf = filters.shape[0]
    w1p = _planes_order(w1, C, nf, dt).contiguous()
    m = mask.reshape(B, H, W)
    m = (m if m.dtype == torch.bool else m.to(dt)).contiguous()
    rows = max(1, TILE_CELLS // W)
    return dt, x.to(dt).contiguous(), w1p, w2.to(dt).contiguous(), m, taps_tensor(filters), rows


def _bias(b, dt):
    return torch.empty(0, dtype=dt) if b is None else b.to(dt).contiguous()


def _cpu_forward(x, w1, b1, w2, b2, mask, filters):
    k = kernels()
    if k is not None:
        dt, xc, w1p, w2c, m, taps, rows = _kernel_args(x, w1, w2, mask, filters)
        out = k.nca_forward(xc, w1p, _bias(b1, dt), w2c, _bias(b2, dt), m, taps, rows)
        return out.to(x.dtype)
    with cores(x[:, 0].numel()):  # the whole op on every core (ops._cpu_parallel)
        return _forward(x, w1, b1, w2, b2, mask, filters)


def _forward(x, w1, b1, w2, b2, mask, filters):
    # The MLP on fired cells only, in column blocks of _chunk() cells, parts on every thread
    # (ops._cpu_parallel). -> (B, C, H, W) in x.dtype.
    B, C, H, W = x.shape
    HW = H * W
    dt, taps, idx, loc, vals, w1p, b1c, w2c, xt = _setup(x, w1, b1, w2, mask, filters)
    b2c = None if b2 is None else b2.to(dt)[:, None]
    p = torch.empty((len(taps), C, B, H, W), dtype=dt)
    out = torch.empty((B, C, H, W), dtype=dt)  # x, then fired cells get their update
    cparts = channel_parts(C)

    def planes(i):
        c0, c1 = cparts[i]
        planes_into(circular_pad1(xt[c0:c1]), taps, [pf[c0:c1] for pf in p])
        out[:, c0:c1].copy_(x[:, c0:c1])

    run_parts(planes, len(cparts))
    p, out3 = p.view(-1, B * HW), out.view(B, C, HW)
    segs = _segments(idx, B, HW)

    def mlp(i):
        for s, e, b in segs[i]:
            pc = p.index_select(1, idx[s:e])  # (F*C, n)
            a = w1p @ pc if b1c is None else torch.addmm(b1c, w1p, pc)  # (HID, n)
            y = w2c @ a.relu_() if b2c is None else torch.addmm(b2c, w2c, a.relu_())
            if vals is not None:
                y.mul_(vals[s:e])
            out3[b].scatter_add_(1, loc[s:e].expand(C, -1), y)  # parts own disjoint cells

    run_parts(mlp, len(segs))
    return out.to(x.dtype)


def _cpu_backward(grad, x, w1, b1, w2, mask, filters):
    k = kernels()
    if k is not None:
        dt, xc, w1p, w2c, m, taps, rows = _kernel_args(x, w1, w2, mask, filters)
        g = grad.to(dt).contiguous()
        dx, dw1p, db1, dw2, db2 = k.nca_backward(g, xc, w1p, _bias(b1, dt), w2c, m, taps, rows)
        dw1 = _channel_order(dw1p, x.shape[1], filters.shape[0], w1.shape)
        return dx.to(grad.dtype), dw1, db1, dw2, db2
    with cores(x[:, 0].numel()):
        return _backward(grad, x, w1, b1, w2, mask, filters)


def _backward(grad, x, w1, b1, w2, mask, filters):
    # -> (dx in grad's dtype, dw1, db1, dw2, db2 in the accumulation dtype), like nca_step_bwd.
    B, C, H, W = x.shape
    HW = H * W
    dt, taps, idx, loc, vals, w1p, b1c, w2c, xt = _setup(x, w1, b1, w2, mask, filters)
    NF = len(taps)
    g = grad.to(dt)
    g3 = g.reshape(B, C, HW)
    p = torch.empty((NF, C, B, H, W), dtype=dt)
    dp = torch.empty((NF, C, B, H, W), dtype=dt)
    acc = torch.empty((C, B, H + 2, W + 2), dtype=dt)
    cparts = channel_parts(C)

    def planes(i):
        c0, c1 = cparts[i]
        planes_into(circular_pad1(xt[c0:c1]), taps, [pf[c0:c1] for pf in p])
        dp[:, c0:c1].zero_()  # resting cells have no dP

    run_parts(planes, len(cparts))
    p, dp2 = p.view(-1, B * HW), dp.view(-1, B * HW)
    segs = _segments(idx, B, HW)

    def mlp(i):
        # Weight gradients of this part's cells (summed over parts below) and its dP columns.
        dw1p, dw2 = torch.zeros_like(w1p), torch.zeros_like(w2c)
        db1, db2 = torch.zeros(w1p.shape[0], dtype=dt), torch.zeros(C, dtype=dt)
        for s, e, b in segs[i]:
            ic = idx[s:e]
            pc = p.index_select(1, ic)  # (F*C, n)
            h = (w1p @ pc if b1c is None else torch.addmm(b1c, w1p, pc)).relu_()  # (HID, n)
            gy = g3[b].index_select(1, loc[s:e])  # (C, n)
            if vals is not None:
                gy.mul_(vals[s:e])
            dw2.addmm_(gy, h.t())
            db2.add_(gy.sum(1))
            da = torch.ops.aten.threshold_backward(w2c.t() @ gy, h, 0)  # (HID, n)
            dw1p.addmm_(da, pc.t())
            db1.add_(da.sum(1))
            dp2.scatter_(1, ic.expand(NF * C, -1), w1p.t() @ da)
        return dw1p, db1, dw2, db2

    grads = [sum(parts) for parts in zip(*run_parts(mlp, len(segs)), strict=True)]

    def adjoint(i):
        # dx = g + adjoint perception of dP, channels c0:c1 (padded, halo folded back).
        c0, c1 = cparts[i]
        a = acc[c0:c1]
        a[..., 1 : H + 1, 1 : W + 1] = g.transpose(0, 1)[c0:c1]
        halo = (a[..., 0, :], a[..., H + 1, :], a[..., 1 : H + 1, 0], a[..., 1 : H + 1, W + 1])
        for edge in halo:
            edge.zero_()
        adjoint_into(a, [d[c0:c1] for d in dp], taps)
        dx[:, c0:c1].copy_(fold_circular(a).transpose(0, 1))

    dx = torch.empty((B, C, H, W), dtype=grad.dtype)
    run_parts(adjoint, len(cparts))
    dw1p, db1, dw2, db2 = grads
    dw1 = _channel_order(dw1p, C, NF, w1.shape)
    return dx, dw1, db1, dw2, db2


@torch.library.custom_op(
    "fastnca::update_mask_cpu",
    mutates_args=(),
    device_types="cpu",
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _update_mask_cpu(x: torch.Tensor, fire_rate: float) -> torch.Tensor:
    # update_mask, as a custom op so that torch.compile calls it too (same generator, same masks
    # as eager) instead of drawing with inductor's own random numbers on every thread. On the
    # pure-torch path it is drawn single-threaded inside the step's hold on the cores
    # (ops._cpu_parallel): an OpenMP team started here would still spin on the cores the step's
    # parts are about to use. The C++ kernel runs on torch's own threads: nothing to hold.
    with nullcontext() if kernels() is not None else cores(x[:, 0].numel()):
        return update_mask(x, fire_rate)


@_update_mask_cpu.register_fake
def _(x, fire_rate):
    B, _, H, W = x.shape
    return x.new_empty((B, 1, H, W), dtype=torch.bool)
