"""CPU helpers of the fused NCA step, shared by the plain step (``fastnca.ops.nca_step``) and the
step with options (``fastnca.ops.nca_step_options``): perception planes and their adjoint, the
fired cells of a mask, and the GEMM block size."""

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
