"""Backward kernels of the fused NCA step (launched by ``nca_step_bwd`` in nca_step.py; the math is
in that module's docstring). With clip options (bits of CLIP, kernels/_nca_tile.py):

    p = clip_P(pr), pr = perceive(x)       dP = (da @ w1) * [plo < pr < phi] = ... [plo < p < phi]
    h = clip_H(r), r = relu(a)             da = (w2^T gy) * [hlo < r < hhi] * [a > 0]

The update and state clips act after w2; their gradient masks need the full update y of a cell, so
the launcher folds them into the incoming gradient with a forward-kernel pass (GRAD mode) before
these kernels run: they see g = the gradient w.r.t. the clipped update (times the update mask here),
and the dx kernel the gradient w.r.t. x through the residual.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastnca.kernels._nca_tile import (
    CLIP_H,
    CLIP_P,
    _bounds,
    _clamp,
    _columns,
    _dot,
    _idx,
    _inside,
    _perceive_tile,
)
from fastnca.kernels._round import to_out


@triton.jit
def nca_step_bwd_kernel(
    x_ptr,
    k_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    m_ptr,
    g_ptr,
    dp_ptr,
    dw1_ptr,
    db1_ptr,
    dw2_ptr,
    db2_ptr,
    clip_ptr,
    C,
    H,
    W,
    NF,
    HID,
    TILES_PER_IMG,
    N_TILES,
    N_PROG,
    BLOCK_M: tl.constexpr,
    CP: tl.constexpr,
    CPP: tl.constexpr,
    NFP: tl.constexpr,
    HB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    IDX64: tl.constexpr,
    ZERO_PAD: tl.constexpr = False,
    CLIP: tl.constexpr = 0,
):
    # One launch, two roles, both persistent over tiles t = q, q + N_PROG, ... (program q of its
    # role); grid (N_PROG * (1 + N_CHUNKS),), N_CHUNKS = cdiv(HID, HB):
    #   pid < N_PROG:  dP = sum_chunks da[chunk] @ w1[chunk]  -> dp: (B, FC, H*W)
    #   else chunk k = (pid - N_PROG) // N_PROG: rows [k*HB, (k+1)*HB) of the weight gradients,
    #        partials dw1: (N_PROG, HID, FC), db1: (N_PROG, HID), dw2: (N_PROG, C, HID),
    #        db2: (N_PROG, C) (written by chunk 0).
    # Each program holds one (HB, FCP) + (CP, HB) slice of the accumulators, never (HID, FC).
    pid = tl.program_id(0)
    role = pid // N_PROG  # 0: dP; k + 1: weight-gradient chunk k
    q = pid % N_PROG
    HW = H * W
    FC = C * NF
    acc_ty = k_ptr.dtype.element_ty
    col, colm = _columns(C, NF, CPP, NFP)
    cc = tl.arange(0, CP)
    cm = cc < C
    if CLIP_P & CLIP:
        plo, phi = _bounds(clip_ptr, 0)
    if CLIP_H & CLIP:
        hlo, hhi = _bounds(clip_ptr, 1)
    if role == 0:
        for t in range(q, N_TILES, N_PROG):
            b = (t // TILES_PER_IMG).to(tl.int64)
            n = (t % TILES_PER_IMG) * BLOCK_M + tl.arange(0, BLOCK_M)
            inb = n < HW
            x_base = x_ptr + b * C * HW
            p = _perceive_tile(x_base, k_ptr, n, H, W, C, NF, BLOCK_M, CPP, NFP, IDX64, ZERO_PAD)
            if CLIP_P & CLIP:
                p = _clamp(p, plo, phi)
            m = tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty)[:, None]
            g = tl.load(
                g_ptr + b * C * HW + _idx(cc[None, :], IDX64) * HW + n[:, None],
                mask=inb[:, None] & cm[None, :],
                other=0.0,
            ).to(acc_ty)
            gy = tl.where(m != 0, g * m, 0.0)  # (BLOCK_M, CP); 0 on resting and padded cells
            dp = tl.zeros((BLOCK_M, CPP * NFP), dtype=acc_ty)
            for h0 in range(0, HID, HB):
                hid = h0 + tl.arange(0, HB)
                hm = hid < HID
                w1t = tl.load(
                    w1_ptr + hid[None, :] * FC + col[:, None],
                    mask=colm[:, None] & hm[None, :],
                    other=0.0,
                )  # (FCP, HB)
                a = _dot(
                    p, w1t, tl.zeros((BLOCK_M, HB), dtype=acc_ty), DOT_PRECISION, DOT_DTYPE, UPCAST
                )
                a += tl.load(b1_ptr + hid, mask=hm, other=0.0)[None, :]
                w2c = tl.load(
                    w2_ptr + cc[:, None] * HID + hid[None, :],
                    mask=cm[:, None] & hm[None, :],
                    other=0.0,
                )  # (CP, HB)
                dh = _dot(
                    gy, w2c, tl.zeros((BLOCK_M, HB), dtype=acc_ty), DOT_PRECISION, DOT_DTYPE, UPCAST
                )
                if CLIP_H & CLIP:
                    dh = tl.where(_inside(tl.maximum(a, 0.0), hlo, hhi), dh, 0.0)
                da = tl.where(a > 0, dh, 0.0)
                dp = _dot(da, tl.trans(w1t), dp, DOT_PRECISION, DOT_DTYPE, UPCAST)
            if CLIP_P & CLIP:
                # plo < pr < phi  <=>  plo < clamp(pr) < phi: the mask from the clipped tile
                dp = tl.where(_inside(p, plo, phi), dp, 0.0)
            tl.store(
                dp_ptr + b * FC * HW + _idx(col[None, :], IDX64) * HW + n[:, None],
                dp,
                mask=inb[:, None] & colm[None, :],
            )
    else:
        hid = (role - 1) * HB + tl.arange(0, HB)
        hm = hid < HID
        # (offsets and masks first, then the loads: this order compiles spill-free on sm_100)
        w1_offs = hid[None, :] * FC + col[:, None]
        w1_mask = colm[:, None] & hm[None, :]
        w2_offs = cc[:, None] * HID + hid[None, :]
        w2_mask = cm[:, None] & hm[None, :]
        w1t = tl.load(w1_ptr + w1_offs, mask=w1_mask, other=0.0)  # (FCP, HB)
        w2c = tl.load(w2_ptr + w2_offs, mask=w2_mask, other=0.0)  # (CP, HB)
        b1 = tl.load(b1_ptr + hid, mask=hm, other=0.0)
        dw1 = tl.zeros((HB, CPP * NFP), dtype=acc_ty)
        dw2 = tl.zeros((CP, HB), dtype=acc_ty)
        db1 = tl.zeros((HB,), dtype=acc_ty)
        db2 = tl.zeros((CP,), dtype=acc_ty)
        for t in range(q, N_TILES, N_PROG):
            b = (t // TILES_PER_IMG).to(tl.int64)
            n = (t % TILES_PER_IMG) * BLOCK_M + tl.arange(0, BLOCK_M)
            inb = n < HW
            p = _perceive_tile(
                x_ptr + b * C * HW, k_ptr, n, H, W, C, NF, BLOCK_M, CPP, NFP, IDX64, ZERO_PAD
            )
            if CLIP_P & CLIP:
                p = _clamp(p, plo, phi)
            a = (
                _dot(
                    p, w1t, tl.zeros((BLOCK_M, HB), dtype=acc_ty), DOT_PRECISION, DOT_DTYPE, UPCAST
                )
                + b1[None, :]
            )  # (BLOCK_M, HB)
            h = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)
            if CLIP_H & CLIP:
                hin = _inside(h, hlo, hhi)
                h = _clamp(h, hlo, hhi)
            m = tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty)[:, None]
            g = tl.load(
                g_ptr + b * C * HW + _idx(cc[None, :], IDX64) * HW + n[:, None],
                mask=inb[:, None] & cm[None, :],
                other=0.0,
            ).to(acc_ty)
            gy = tl.where(m != 0, g * m, 0.0)  # (BLOCK_M, CP)
            dw2 = _dot(tl.trans(gy), h, dw2, DOT_PRECISION, DOT_DTYPE, UPCAST)
            db2 += tl.sum(gy, axis=0)
            dh = _dot(
                gy, w2c, tl.zeros((BLOCK_M, HB), dtype=acc_ty), DOT_PRECISION, DOT_DTYPE, UPCAST
            )
            if CLIP_H & CLIP:
                dh = tl.where(hin, dh, 0.0)
            da = tl.where(a > 0, dh, 0.0)
            db1 += tl.sum(da, axis=0)
            dw1 = _dot(tl.trans(da), p, dw1, DOT_PRECISION, DOT_DTYPE, UPCAST)  # (HB, FCP)
        q64 = q.to(tl.int64)
        tl.store(
            dw1_ptr + q64 * HID * FC + hid[:, None] * FC + col[None, :],
            dw1,
            mask=hm[:, None] & colm[None, :],
        )
        tl.store(
            dw2_ptr + q64 * C * HID + cc[:, None] * HID + hid[None, :],
            dw2,
            mask=cm[:, None] & hm[None, :],
        )
        tl.store(db1_ptr + q64 * HID + hid, db1, mask=hm)
        if role == 1:
            tl.store(db2_ptr + q64 * C + cc, db2, mask=cm)


@triton.jit
def nca_step_bwd_dx_kernel(
    dp_ptr,
    k_ptr,
    g_ptr,
    dx_ptr,
    C,
    H,
    W,
    NF,
    BLOCK_M: tl.constexpr,
    CP: tl.constexpr,
    IDX64: tl.constexpr,
    ZERO_PAD: tl.constexpr = False,
):
    # dx[c, i, j] = g[c, i, j] + sum_f sum_ae k[f, a, e] dP[c*NF + f, i-a+1, j-e+1], the source
    # cell wrapped (circular) or, for zero padding, dropped where it lies outside the grid.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    acc_ty = k_ptr.dtype.element_ty
    n = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    inb = n < HW
    i = n // W
    j = n % W
    cc = tl.arange(0, CP)
    lm = inb[:, None] & (cc < C)[None, :]
    offs = _idx(cc[None, :], IDX64) * HW + n[:, None]
    acc = tl.load(g_ptr + b * C * HW + offs, mask=lm, other=0.0).to(acc_ty)
    dp_base = dp_ptr + b * C * NF * HW
    for f in range(NF):
        plane = _idx(cc * NF + f, IDX64) * HW
        for a in tl.static_range(3):
            for e in tl.static_range(3):
                ii = i + (1 - a)
                jj = j + (1 - e)
                if ZERO_PAD:
                    ok = (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
                    d = tl.load(
                        dp_base + plane[None, :] + (ii * W + jj)[:, None],
                        mask=lm & ok[:, None],
                        other=0.0,
                    )
                else:
                    src = ((ii + H) % H) * W + (jj + W) % W
                    d = tl.load(dp_base + plane[None, :] + src[:, None], mask=lm, other=0.0)
                acc += tl.load(k_ptr + f * 9 + (a * 3 + e)) * d.to(acc_ty)
    tl.store(dx_ptr + b * C * HW + offs, to_out(acc, dx_ptr.dtype.element_ty), mask=lm)
