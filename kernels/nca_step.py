"""Fused NCA step: circular perception + MLP + update mask + residual. Triton fwd + recompute bwd.

For a state x: (B, C, H, W), a filter bank k: (F, 3, 3), w1: (HID, F*C), b1: (HID,), w2: (C, HID),
optional b2: (C,) and an update mask m: (B, 1, H, W) (bool or float), per cell n = (i, j):

    p[n, c*F + f] = sum_{a, e} k[f, a, e] * x[c, (i+a-1) mod H, (j+e-1) mod W]      (perception)
    a[n] = w1 @ p[n] + b1,  h[n] = relu(a[n]),  y[n] = w2 @ h[n] (+ b2)               (MLP)
    out[n] = x[n] + y[n] * m[n]  where m[n] != 0,  else x[n]                           (update)

Cells that do not fire are copied unchanged (the lesson's ``x + y * m`` equals this whenever y is
finite; here a non-finite update of a resting cell is not written into it).

Forward: one program per (tile of BLOCK_M cells, batch). The tile's perception is built in
registers as a (BLOCK_M, F*C) matrix straight in w1's column order (nine wrapped gathers of x, so
the one-cell circular halo costs no padded copy), then two ``tl.dot``s, the mask and the residual,
and one store. Hidden and feature dims are padded to powers of two >= 16 with masks.
Bytes per cell: read C*s + mask, write C*s (s = element size); FLOPs per cell: 2*HID*(F*C + C).

Backward (saves only x and the mask; recomputes p and a):

    gy = g * m (fired cells)        dW2 += gy^T h      db2 += sum gy
    da = (w2^T gy) * [a > 0]        dW1 += da^T p      db1 += sum da
    dP = da @ w1                    dx = g + sum_f adjoint_stencil_f(dP[:, c*F + f])

The adjoint stencil needs dP at the neighbouring cells, which live in other programs' tiles. Triton
has no cross-program (or cheap cross-lane) shift, so the main backward kernel writes dP for its tile
to a float32 scratch (B, F*C, H, W) and a second kernel applies the adjoint stencil and adds g:
extra traffic 2*F*C*4 bytes per cell. (Recomputing on a halo-extended tile would redo the whole MLP
on (T+2)^2/T^2 as many cells and still need that shift through memory.) Weight gradients are
accumulated in registers by persistent programs (each loops over tiles) and written as one partial
sum per program, reduced afterwards with torch.sum: no atomics, deterministic.

Arithmetic is in float32 (float64 for float64 input); half-precision inputs are converted after the
load and outputs cast at the store. float32 dots run as 3xTF32 on NVIDIA tensor cores (about fp32
accurate; plain TF32 when torch.backends.cuda.matmul.allow_tf32 is set). Batch and plane offsets
are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastnca.kernels._launch import launch


@triton.jit
def _perceive_tile(x_base, k_ptr, n, H, W, NF, FC, BLOCK_M: tl.constexpr, FCP: tl.constexpr):
    # p: (BLOCK_M, FCP), p[m, c*NF + f] = sum_ae k[f, a, e] x[c, wrap(i+a-1), wrap(j+e-1)];
    # columns >= FC and rows with n >= H*W are 0.
    HW = H * W
    i = n // W
    j = n % W
    col = tl.arange(0, FCP)
    c64 = (col // NF).to(tl.int64)
    f = col % NF
    colm = col < FC
    lm = (n < HW)[:, None] & colm[None, :]
    acc = tl.zeros((BLOCK_M, FCP), dtype=k_ptr.dtype.element_ty)
    for a in tl.static_range(3):
        for e in tl.static_range(3):
            # `%` truncates toward zero: add H (W) before wrapping.
            src = ((i + (a - 1) + H) % H) * W + (j + (e - 1) + W) % W
            xs = tl.load(x_base + c64[None, :] * HW + src[:, None], mask=lm, other=0.0)
            ks = tl.load(k_ptr + f * 9 + (a * 3 + e), mask=colm, other=0.0)
            acc += xs.to(acc.dtype) * ks[None, :]
    return acc


@triton.jit
def nca_step_fwd_kernel(x_ptr, k_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, m_ptr, out_ptr,
                        C, H, W, NF, HID,
                        HAS_B2: tl.constexpr, BLOCK_M: tl.constexpr, CP: tl.constexpr,
                        FCP: tl.constexpr, HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # x, out: (B, C, H*W); m: (B, H*W); w1: (HID, FC); w2: (C, HID); all contiguous.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    FC = C * NF
    acc_ty = k_ptr.dtype.element_ty
    n = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    inb = n < HW
    x_base = x_ptr + b * C * HW
    p = _perceive_tile(x_base, k_ptr, n, H, W, NF, FC, BLOCK_M, FCP)
    hid = tl.arange(0, HP)
    hm = hid < HID
    col = tl.arange(0, FCP)
    w1t = tl.load(w1_ptr + hid[None, :] * FC + col[:, None],
                  mask=(col < FC)[:, None] & hm[None, :], other=0.0)  # (FCP, HP) = w1^T
    h = tl.dot(p, w1t, input_precision=DOT_PRECISION)
    h += tl.load(b1_ptr + hid, mask=hm, other=0.0)[None, :]
    h = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu, NaN stays NaN
    cc = tl.arange(0, CP)
    cm = cc < C
    w2t = tl.load(w2_ptr + cc[None, :] * HID + hid[:, None], mask=hm[:, None] & cm[None, :],
                  other=0.0)  # (HP, CP) = w2^T
    y = tl.dot(h, w2t, input_precision=DOT_PRECISION)  # (BLOCK_M, CP)
    if HAS_B2:
        y += tl.load(b2_ptr + cc, mask=cm, other=0.0)[None, :]
    m = tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty)[:, None]
    offs = cc[None, :].to(tl.int64) * HW + n[:, None]
    lm = inb[:, None] & cm[None, :]
    xc = tl.load(x_base + offs, mask=lm, other=0.0).to(acc_ty)
    out = tl.where(m != 0, xc + y * m, xc)
    tl.store(out_ptr + b * C * HW + offs, out.to(out_ptr.dtype.element_ty), mask=lm)


@triton.jit
def nca_step_bwd_kernel(x_ptr, k_ptr, w1_ptr, b1_ptr, w2_ptr, m_ptr, g_ptr, dp_ptr,
                        dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                        C, H, W, NF, HID, TILES_PER_IMG, N_TILES,
                        BLOCK_M: tl.constexpr, CP: tl.constexpr, FCP: tl.constexpr,
                        HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Persistent: program pid handles tiles pid, pid + P, ... (P = programs launched).
    # Writes dP: (B, FC, H*W) and per-program partials dw1: (P, HID, FC), db1: (P, HID),
    # dw2: (P, C, HID), db2: (P, C).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    HW = H * W
    FC = C * NF
    acc_ty = k_ptr.dtype.element_ty
    hid = tl.arange(0, HP)
    hm = hid < HID
    col = tl.arange(0, FCP)
    colm = col < FC
    cc = tl.arange(0, CP)
    cm = cc < C
    w1t = tl.load(w1_ptr + hid[None, :] * FC + col[:, None], mask=colm[:, None] & hm[None, :],
                  other=0.0)  # (FCP, HP)
    w1 = tl.load(w1_ptr + hid[:, None] * FC + col[None, :], mask=hm[:, None] & colm[None, :],
                 other=0.0)  # (HP, FCP)
    w2 = tl.load(w2_ptr + cc[:, None] * HID + hid[None, :], mask=cm[:, None] & hm[None, :],
                 other=0.0)  # (CP, HP)
    b1 = tl.load(b1_ptr + hid, mask=hm, other=0.0)
    dw1 = tl.zeros((HP, FCP), dtype=acc_ty)
    dw2 = tl.zeros((CP, HP), dtype=acc_ty)
    db1 = tl.zeros((HP,), dtype=acc_ty)
    db2 = tl.zeros((CP,), dtype=acc_ty)
    for t in range(pid, N_TILES, n_prog):
        b = (t // TILES_PER_IMG).to(tl.int64)
        n = (t % TILES_PER_IMG) * BLOCK_M + tl.arange(0, BLOCK_M)
        inb = n < HW
        p = _perceive_tile(x_ptr + b * C * HW, k_ptr, n, H, W, NF, FC, BLOCK_M, FCP)
        a = tl.dot(p, w1t, input_precision=DOT_PRECISION) + b1[None, :]  # (BLOCK_M, HP)
        h = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)
        m = tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty)[:, None]
        lm = inb[:, None] & cm[None, :]
        g = tl.load(g_ptr + b * C * HW + cc[None, :].to(tl.int64) * HW + n[:, None], mask=lm,
                    other=0.0).to(acc_ty)
        gy = tl.where(m != 0, g * m, 0.0)  # (BLOCK_M, CP); 0 on resting and padded cells
        dw2 += tl.dot(tl.trans(gy), h, input_precision=DOT_PRECISION)
        db2 += tl.sum(gy, axis=0)
        dh = tl.dot(gy, w2, input_precision=DOT_PRECISION)  # (BLOCK_M, HP)
        da = tl.where(a > 0, dh, 0.0)
        db1 += tl.sum(da, axis=0)
        dw1 += tl.dot(tl.trans(da), p, input_precision=DOT_PRECISION)
        dp = tl.dot(da, w1, input_precision=DOT_PRECISION)  # (BLOCK_M, FCP)
        tl.store(dp_ptr + b * FC * HW + col[None, :].to(tl.int64) * HW + n[:, None], dp,
                 mask=inb[:, None] & colm[None, :])
    pid64 = pid.to(tl.int64)
    tl.store(dw1_ptr + pid64 * HID * FC + hid[:, None] * FC + col[None, :], dw1,
             mask=hm[:, None] & colm[None, :])
    tl.store(dw2_ptr + pid64 * C * HID + cc[:, None] * HID + hid[None, :], dw2,
             mask=cm[:, None] & hm[None, :])
    tl.store(db1_ptr + pid64 * HID + hid, db1, mask=hm)
    tl.store(db2_ptr + pid64 * C + cc, db2, mask=cm)


@triton.jit
def nca_step_bwd_dx_kernel(dp_ptr, k_ptr, g_ptr, dx_ptr, C, H, W, NF,
                           BLOCK_M: tl.constexpr, CP: tl.constexpr):
    # dx[c, i, j] = g[c, i, j] + sum_f sum_ae k[f, a, e] dP[c*NF + f, wrap(i-a+1), wrap(j-e+1)]
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
    offs = cc[None, :].to(tl.int64) * HW + n[:, None]
    acc = tl.load(g_ptr + b * C * HW + offs, mask=lm, other=0.0).to(acc_ty)
    dp_base = dp_ptr + b * C * NF * HW
    for f in range(NF):
        plane = (cc * NF + f).to(tl.int64) * HW
        for a in tl.static_range(3):
            for e in tl.static_range(3):
                src = ((i + (1 - a) + H) % H) * W + (j + (1 - e) + W) % W
                d = tl.load(dp_base + plane[None, :] + src[:, None], mask=lm, other=0.0)
                acc += tl.load(k_ptr + f * 9 + (a * 3 + e)) * d.to(acc_ty)
    tl.store(dx_ptr + b * C * HW + offs, acc.to(dx_ptr.dtype.element_ty), mask=lm)


def _pad(v: int) -> int:
    return max(16, triton.next_power_of_2(v))


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    # float32 dots: "tf32" if the user allowed TF32 matmuls; else, on NVIDIA tensor-core GPUs,
    # "tf32x3" (three TF32 products per fp32 product, about fp32 accurate: per-cell MLP FLOPs are
    # ~120 per byte moved, so FMA-only "ieee" dots would make the step compute-bound); else "ieee".
    if dtype != torch.float32:
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    if device.type == "cuda" and torch.version.hip is None and \
            torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(x, w1, b1, w2, mask, filters):
    # Contiguous operands in the accumulation dtype (weights are tiny); the mask as (B, H*W),
    # bool viewed as uint8. b1 None -> zeros.
    acc = _acc_dtype(x.dtype)
    x = x.contiguous()
    w1 = w1.to(acc).contiguous()
    w2 = w2.to(acc).contiguous()
    if b1 is None:
        b1 = torch.zeros(w1.shape[0], device=x.device, dtype=acc)
    b1 = b1.to(acc).contiguous()
    m = mask.reshape(x.shape[0], -1).contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return x, w1, b1, w2, m, filters.to(acc).contiguous()


def nca_step_fwd(x, w1, b1, w2, b2, mask, filters, block_m: int = 64):
    """x + (w2 relu(w1 perceive(x) + b1) + b2) * mask on fired cells. Shapes checked by caller.

    x: (B, C, H, W); w1: (HID, F*C); b1: (HID,) or None; w2: (C, HID); b2: (C,) or None;
    mask: (B, 1, H, W) bool or float; filters: (F, 3, 3). Returns (B, C, H, W) in x.dtype.
    """
    x, w1, b1, w2, m, k = _prepare(x, w1, b1, w2, mask, filters)
    B, C, H, W = x.shape
    HID, NF = w1.shape[0], k.shape[0]
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    b2a = b1 if b2 is None else b2.to(w1.dtype).contiguous()  # b1 is a dummy pointer
    grid = (triton.cdiv(H * W, block_m), B)
    launch(nca_step_fwd_kernel, grid, x, k, w1, b1, w2, b2a, m, out, C, H, W, NF, HID,
           HAS_B2=b2 is not None, BLOCK_M=block_m, CP=_pad(C), FCP=_pad(NF * C), HP=_pad(HID),
           DOT_PRECISION=_dot_precision(w1.dtype, x.device), num_warps=8)
    return out


def _n_programs(x: torch.Tensor, n_tiles: int) -> int:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(n_tiles, 2 * sms))
    return max(1, min(n_tiles, 8))


def nca_step_bwd(grad, x, w1, b1, w2, mask, filters, block_m: int = 64,
                 max_programs: int | None = None):
    """Gradients of nca_step_fwd from the saved x and mask (p and h recomputed).

    Returns (dx, dw1, db1, dw2, db2): dx in grad's dtype; weight grads in the accumulation dtype
    (float32, float64 for float64 x), shaped like w1, (HID,), w2, (C,). db1 and db2 are computed
    whether or not the biases exist (the caller drops them); b2 does not enter the gradients.
    """
    x, w1, b1, w2, m, k = _prepare(x, w1, b1, w2, mask, filters)
    g = grad.contiguous()
    B, C, H, W = x.shape
    HID, NF = w1.shape[0], k.shape[0]
    acc = w1.dtype
    dx = torch.empty_like(g)
    tiles_per_img = triton.cdiv(H * W, block_m)
    n_tiles = B * tiles_per_img
    n_prog = _n_programs(x, n_tiles) if max_programs is None else max(1, min(n_tiles, max_programs))
    dw1 = torch.empty((n_prog, HID, NF * C), device=x.device, dtype=acc)
    db1 = torch.empty((n_prog, HID), device=x.device, dtype=acc)
    dw2 = torch.empty((n_prog, C, HID), device=x.device, dtype=acc)
    db2 = torch.empty((n_prog, C), device=x.device, dtype=acc)
    if n_tiles == 0 or C == 0:
        for t in (dw1, db1, dw2, db2):
            t.zero_()
        return dx, dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0)
    dp = torch.empty((B, NF * C, H, W), device=x.device, dtype=acc)  # scratch, freed on return
    launch(nca_step_bwd_kernel, (n_prog,), x, k, w1, b1, w2, m, g, dp, dw1, db1, dw2, db2,
           C, H, W, NF, HID, tiles_per_img, n_tiles,
           BLOCK_M=block_m, CP=_pad(C), FCP=_pad(NF * C), HP=_pad(HID),
           DOT_PRECISION=_dot_precision(acc, x.device), num_warps=8)
    launch(nca_step_bwd_dx_kernel, (tiles_per_img, B), dp, k, g, dx, C, H, W, NF,
           BLOCK_M=block_m, CP=_pad(C), num_warps=4)
    return dx, dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0)
