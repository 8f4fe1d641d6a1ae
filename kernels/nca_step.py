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

from fastnca.kernels._launch import gpu_info, launch
from fastnca.kernels._round import to_out


@triton.jit
def _idx(v, IDX64: tl.constexpr):
    # Offsets inside one image (c * H*W + cell, up to F*C*H*W): int32 unless they can pass 2**31.
    if IDX64:
        return v.to(tl.int64)
    return v


@triton.jit
def _perceive_tile(
    x_base,
    k_ptr,
    n,
    H,
    W,
    C,
    NF,
    BLOCK_M: tl.constexpr,
    CPP: tl.constexpr,
    NFP: tl.constexpr,
    IDX64: tl.constexpr,
    VOLATILE_K: tl.constexpr = True,
):
    # p: (BLOCK_M, CPP*NFP), p[m, c*NFP + f] = sum_ae k[f, a, e] x[c, wrap(i+a-1), wrap(j+e-1)]
    # (column order of _columns); padded columns and rows with n >= H*W are 0.
    HW = H * W
    i = n // W
    j = n % W
    col = tl.arange(0, CPP * NFP)
    c = col // NFP
    f = col % NFP
    colm = (c < C) & (f < NF)
    lm = (n < HW)[:, None] & colm[None, :]
    coff = _idx(c, IDX64) * HW
    acc = tl.zeros((BLOCK_M, CPP * NFP), dtype=k_ptr.dtype.element_ty)
    for a in tl.static_range(3):
        for e in tl.static_range(3):
            # `%` truncates toward zero: add H (W) before wrapping.
            src = ((i + (a - 1) + H) % H) * W + (j + (e - 1) + W) % W
            xs = tl.load(x_base + coff[None, :] + src[:, None], mask=lm, other=0.0)
            # volatile: reloaded per tile (L1 hits) instead of nine (BLOCK_M, FCP) broadcasts
            # hoisted out of the persistent loop and held in registers
            ks = tl.load(k_ptr + f * 9 + (a * 3 + e), mask=colm, other=0.0, volatile=VOLATILE_K)
            acc += xs.to(acc.dtype) * ks[None, :]
    return acc


@triton.jit
def _columns(C, NF, CPP: tl.constexpr, NFP: tl.constexpr):
    # Tile column c*NFP + f <-> w1 column (and dP plane) c*NF + f; valid where c < C, f < NF.
    col = tl.arange(0, CPP * NFP)
    c = col // NFP
    f = col % NFP
    return c * NF + f, (c < C) & (f < NF)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    # acc + a @ b with float32 (float64) accumulation. DOT_DTYPE "bf16"/"fp16": both operands
    # rounded to it (tensor-core dot); UPCAST: the rounded operands go back to float32 for an
    # exact-product "ieee" dot (the interpreter's half dot is wrong). DOT_DTYPE "": the dot of
    # the float32 (float64) operands runs at DOT_PRECISION ("ieee", "tf32", "tf32x3").
    if DOT_DTYPE == "bf16":
        a = to_out(a, tl.bfloat16)  # nearest even, interpreted too (kernels/_round.py)
        b = to_out(b, tl.bfloat16)
    elif DOT_DTYPE == "fp16":
        a = a.to(tl.float16)
        b = b.to(tl.float16)
    if DOT_DTYPE == "":
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    elif UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def nca_step_fwd_kernel(
    x_ptr,
    k_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    m_ptr,
    out_ptr,
    C,
    H,
    W,
    NF,
    HID,
    HAS_B2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CP: tl.constexpr,
    CPP: tl.constexpr,
    NFP: tl.constexpr,
    HB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    IDX64: tl.constexpr,
):
    # x, out: (B, C, H*W); m: (B, H*W); w1: (HID, FC); w2: (C, HID); all contiguous.
    # y = sum over hidden chunks [h0, h0+HB) of relu(p @ w1[chunk]^T + b1[chunk]) @ w2[:, chunk]^T:
    # only a (BLOCK_M, HB) slice of the hidden activations is live at a time.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    FC = C * NF
    acc_ty = k_ptr.dtype.element_ty
    n = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    inb = n < HW
    x_base = x_ptr + b * C * HW
    p = _perceive_tile(x_base, k_ptr, n, H, W, C, NF, BLOCK_M, CPP, NFP, IDX64)  # (BLOCK_M, FCP)
    col, colm = _columns(C, NF, CPP, NFP)
    cc = tl.arange(0, CP)
    cm = cc < C
    y = tl.zeros((BLOCK_M, CP), dtype=acc_ty)
    for h0 in range(0, HID, HB):
        hid = h0 + tl.arange(0, HB)
        hm = hid < HID
        w1t = tl.load(
            w1_ptr + hid[None, :] * FC + col[:, None], mask=colm[:, None] & hm[None, :], other=0.0
        )  # (FCP, HB) = w1^T
        h = _dot(p, w1t, tl.zeros((BLOCK_M, HB), dtype=acc_ty), DOT_PRECISION, DOT_DTYPE, UPCAST)
        h += tl.load(b1_ptr + hid, mask=hm, other=0.0)[None, :]
        h = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu, NaN stays NaN
        w2t = tl.load(
            w2_ptr + cc[None, :] * HID + hid[:, None], mask=hm[:, None] & cm[None, :], other=0.0
        )  # (HB, CP) = w2^T
        y = _dot(h, w2t, y, DOT_PRECISION, DOT_DTYPE, UPCAST)  # (BLOCK_M, CP)
    if HAS_B2:
        y += tl.load(b2_ptr + cc, mask=cm, other=0.0)[None, :]
    m = tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty)[:, None]
    offs = _idx(cc[None, :], IDX64) * HW + n[:, None]
    lm = inb[:, None] & cm[None, :]
    xc = tl.load(x_base + offs, mask=lm, other=0.0).to(acc_ty)
    out = tl.where(m != 0, xc + y * m, xc)
    tl.store(out_ptr + b * C * HW + offs, to_out(out, out_ptr.dtype.element_ty), mask=lm)


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
    if role == 0:
        for t in range(q, N_TILES, N_PROG):
            b = (t // TILES_PER_IMG).to(tl.int64)
            n = (t % TILES_PER_IMG) * BLOCK_M + tl.arange(0, BLOCK_M)
            inb = n < HW
            p = _perceive_tile(x_ptr + b * C * HW, k_ptr, n, H, W, C, NF, BLOCK_M, CPP, NFP, IDX64)
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
                a = (
                    _dot(
                        p,
                        w1t,
                        tl.zeros((BLOCK_M, HB), dtype=acc_ty),
                        DOT_PRECISION,
                        DOT_DTYPE,
                        UPCAST,
                    )
                    + tl.load(b1_ptr + hid, mask=hm, other=0.0)[None, :]
                )
                w2c = tl.load(
                    w2_ptr + cc[:, None] * HID + hid[None, :],
                    mask=cm[:, None] & hm[None, :],
                    other=0.0,
                )  # (CP, HB)
                dh = _dot(
                    gy, w2c, tl.zeros((BLOCK_M, HB), dtype=acc_ty), DOT_PRECISION, DOT_DTYPE, UPCAST
                )
                da = tl.where(a > 0, dh, 0.0)
                dp = _dot(da, tl.trans(w1t), dp, DOT_PRECISION, DOT_DTYPE, UPCAST)
            tl.store(
                dp_ptr + b * FC * HW + _idx(col[None, :], IDX64) * HW + n[:, None],
                dp,
                mask=inb[:, None] & colm[None, :],
            )
    else:
        hid = (role - 1) * HB + tl.arange(0, HB)
        hm = hid < HID
        w1t = tl.load(
            w1_ptr + hid[None, :] * FC + col[:, None], mask=colm[:, None] & hm[None, :], other=0.0
        )  # (FCP, HB)
        w2c = tl.load(
            w2_ptr + cc[:, None] * HID + hid[None, :], mask=cm[:, None] & hm[None, :], other=0.0
        )  # (CP, HB)
        b1 = tl.load(b1_ptr + hid, mask=hm, other=0.0)
        dw1 = tl.zeros((HB, CPP * NFP), dtype=acc_ty)
        dw2 = tl.zeros((CP, HB), dtype=acc_ty)
        db1 = tl.zeros((HB,), dtype=acc_ty)
        db2 = tl.zeros((CP,), dtype=acc_ty)
        for t in range(q, N_TILES, N_PROG):
            b = (t // TILES_PER_IMG).to(tl.int64)
            n = (t % TILES_PER_IMG) * BLOCK_M + tl.arange(0, BLOCK_M)
            inb = n < HW
            p = _perceive_tile(x_ptr + b * C * HW, k_ptr, n, H, W, C, NF, BLOCK_M, CPP, NFP, IDX64)
            a = (
                _dot(
                    p, w1t, tl.zeros((BLOCK_M, HB), dtype=acc_ty), DOT_PRECISION, DOT_DTYPE, UPCAST
                )
                + b1[None, :]
            )  # (BLOCK_M, HB)
            h = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)
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
):
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
    offs = _idx(cc[None, :], IDX64) * HW + n[:, None]
    acc = tl.load(g_ptr + b * C * HW + offs, mask=lm, other=0.0).to(acc_ty)
    dp_base = dp_ptr + b * C * NF * HW
    for f in range(NF):
        plane = _idx(cc * NF + f, IDX64) * HW
        for a in tl.static_range(3):
            for e in tl.static_range(3):
                src = ((i + (1 - a) + H) % H) * W + (j + (1 - e) + W) % W
                d = tl.load(dp_base + plane[None, :] + src[:, None], mask=lm, other=0.0)
                acc += tl.load(k_ptr + f * 9 + (a * 3 + e)) * d.to(acc_ty)
    tl.store(dx_ptr + b * C * HW + offs, to_out(acc, dx_ptr.dtype.element_ty), mask=lm)


def _pad(v: int) -> int:
    return max(16, triton.next_power_of_2(v))


DOT_PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16", "fp16")


def _dot_args(dtype: torch.dtype, device: torch.device, dot_precision: str | None) -> dict:
    """DOT_PRECISION / DOT_DTYPE / UPCAST constexprs for an accumulation dtype and a request.

    Default (None): float32 dots as "tf32" if the user allowed TF32 matmuls, else on NVIDIA
    tensor-core GPUs "tf32x3" (three TF32 products, about fp32 accurate: per-cell MLP FLOPs are
    ~120 per byte moved, so FMA-only "ieee" dots would make the step compute-bound), else "ieee".
    "bf16"/"fp16": operands rounded to that type, float32 accumulation (tensor cores; emulated
    exactly under the interpreter). float64 always runs "ieee".
    """
    if dot_precision is not None and dot_precision not in DOT_PRECISIONS:
        raise ValueError(
            f"dot_precision must be one of {DOT_PRECISIONS} or None, got {dot_precision!r}"
        )
    gpu = gpu_info(device)
    if dtype != torch.float32:
        return dict(DOT_PRECISION="ieee", DOT_DTYPE="", UPCAST=False)
    if dot_precision in ("bf16", "fp16"):
        return dict(DOT_PRECISION="ieee", DOT_DTYPE=dot_precision, UPCAST=gpu is None)
    if dot_precision is None:
        if torch.backends.cuda.matmul.allow_tf32:
            dot_precision = "tf32"
        elif gpu is not None and gpu.nvidia and gpu.capability >= (8, 0):
            dot_precision = "tf32x3"
        else:
            dot_precision = "ieee"
    return dict(DOT_PRECISION=dot_precision, DOT_DTYPE="", UPCAST=False)


def _config(C: int, NF: int, HID: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M cells, HB hidden units per chunk, num_warps): the configuration rule.

    Registers per thread grow with BLOCK_M * (FCP + HB) / threads (perception tile, one hidden
    slice and their split tf32x3 operands) plus, in backward, the (HB, FCP) weight-gradient
    slice (the backward's weight-gradient role is the heavy one). Forward 32 cells x 32 hidden on
    4 warps, backward 32 cells x 16 hidden on 8 warps compile without spills for FCP <= 64
    (C*F <= 64) on sm_80 and sm_90 in float32/bf16/fp16 (table in docs/gpu_static.md, made by
    ``python -m fastnca.bench.gpu_static``; sm_100 backward: a few bytes, see there); wider tiles
    take 16 cells.
    """
    t = _tile_args(C, NF)
    wide = t["CPP"] * t["NFP"] > 64
    if backward:
        return (16 if wide else 32), min(16, _pad(HID)), 8
    return (16 if wide else 32), min(32, _pad(HID)), 4


def _tile_args(C: int, NF: int) -> dict:
    # Perception tile (BLOCK_M, CPP*NFP): channels and filters padded to powers of two, and to
    # >= 16 columns (tl.dot needs K >= 16).
    nfp = triton.next_power_of_2(max(1, NF))
    return dict(CPP=max(triton.next_power_of_2(max(1, C)), triton.cdiv(16, nfp)), NFP=nfp)


def _idx64(x: torch.Tensor, nf: int) -> bool:
    # In-image offsets reach F * C * H * W (the dP scratch; padded channels masked).
    B, C, H, W = x.shape
    return _pad(nf * C) * H * W >= 2**31


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


def nca_step_fwd(
    x,
    w1,
    b1,
    w2,
    b2,
    mask,
    filters,
    block_m: int | None = None,
    hidden_block: int | None = None,
    num_warps: int | None = None,
    dot_precision: str | None = None,
    num_stages: int | None = None,
):
    """x + (w2 relu(w1 perceive(x) + b1) + b2) * mask on fired cells. Shapes checked by caller.

    x: (B, C, H, W); w1: (HID, F*C); b1: (HID,) or None; w2: (C, HID); b2: (C,) or None;
    mask: (B, 1, H, W) bool or float; filters: (F, 3, 3). Returns (B, C, H, W) in x.dtype.
    block_m / hidden_block / num_warps / dot_precision override the configuration rule.
    """
    x, w1, b1, w2, m, k = _prepare(x, w1, b1, w2, mask, filters)
    B, C, H, W = x.shape
    HID, NF = w1.shape[0], k.shape[0]
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    bm, hb, nw = _config(C, NF, HID, backward=False)
    bm, hb, nw = block_m or bm, hidden_block or hb, num_warps or nw
    b2a = b1 if b2 is None else b2.to(w1.dtype).contiguous()  # b1 is a dummy pointer
    grid = (triton.cdiv(H * W, bm), B)
    launch(
        nca_step_fwd_kernel,
        grid,
        x,
        k,
        w1,
        b1,
        w2,
        b2a,
        m,
        out,
        C,
        H,
        W,
        NF,
        HID,
        HAS_B2=b2 is not None,
        BLOCK_M=bm,
        CP=_pad(C),
        **_tile_args(C, NF),
        HB=hb,
        **_dot_args(w1.dtype, x.device, dot_precision),
        IDX64=_idx64(x, NF),
        num_warps=nw,
        **({} if num_stages is None else dict(num_stages=num_stages)),
    )
    return out


def _n_programs(x: torch.Tensor, n_tiles: int) -> int:
    gpu = gpu_info(x.device)
    if gpu is not None:
        return max(1, min(n_tiles, 2 * gpu.sm_count))
    return max(1, min(n_tiles, 8))


def nca_step_bwd(
    grad,
    x,
    w1,
    b1,
    w2,
    mask,
    filters,
    block_m: int | None = None,
    max_programs: int | None = None,
    hidden_block: int | None = None,
    num_warps: int | None = None,
    dot_precision: str | None = None,
    num_stages: int | None = None,
):
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
    bm, hb, nw = _config(C, NF, HID, backward=True)
    bm, hb, nw = block_m or bm, hidden_block or hb, num_warps or nw
    tiles_per_img = triton.cdiv(H * W, bm)
    n_tiles = B * tiles_per_img
    n_prog = _n_programs(x, n_tiles) if max_programs is None else max(1, min(n_tiles, max_programs))
    dw1 = torch.empty((n_prog, HID, NF * C), device=x.device, dtype=acc)
    db1 = torch.empty((n_prog, HID), device=x.device, dtype=acc)
    dw2 = torch.empty((n_prog, C, HID), device=x.device, dtype=acc)
    db2 = torch.empty((n_prog, C), device=x.device, dtype=acc)
    if n_tiles == 0 or C == 0 or HID == 0:
        for t in (dw1, db1, dw2, db2):
            t.zero_()
        if n_tiles == 0 or C == 0:
            return dx, dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0)
    dp = torch.empty((B, NF * C, H, W), device=x.device, dtype=acc)  # scratch, freed on return
    n_chunks = triton.cdiv(HID, hb)
    launch(
        nca_step_bwd_kernel,
        (n_prog * (1 + n_chunks),),
        x,
        k,
        w1,
        b1,
        w2,
        m,
        g,
        dp,
        dw1,
        db1,
        dw2,
        db2,
        C,
        H,
        W,
        NF,
        HID,
        tiles_per_img,
        n_tiles,
        n_prog,
        BLOCK_M=bm,
        CP=_pad(C),
        **_tile_args(C, NF),
        HB=hb,
        **_dot_args(acc, x.device, dot_precision),
        IDX64=_idx64(x, NF),
        num_warps=nw,
        **({} if num_stages is None else dict(num_stages=num_stages)),
    )
    launch(
        nca_step_bwd_dx_kernel,
        (triton.cdiv(H * W, 64), B),
        dp,
        k,
        g,
        dx,
        C,
        H,
        W,
        NF,
        BLOCK_M=64,
        CP=_pad(C),
        IDX64=_idx64(x, NF),
        num_warps=4,
    )
    return dx, dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0)
