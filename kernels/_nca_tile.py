"""Tile helpers shared by the fused NCA step's forward (nca_step.py) and backward (nca_step_bwd.py)
kernels: offsets, the perception tile, the w1 column map, the dot at a chosen precision, and the
clamps of the step's clip options.

Clip options reach a kernel as ``CLIP`` (constexpr bit set: 1 perception, 2 hidden, 4 update,
8 state) and ``clip_ptr`` (8 values lo, hi per stage in that order, the accumulation dtype); a stage
whose bit is clear compiles to nothing, so the plain step's code is unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastnca.kernels._round import to_out

# CLIP bits in clip_ptr's order (constexpr globals: usable in @triton.jit; .value on the host)
CLIP_P, CLIP_H, CLIP_U, CLIP_S = (
    tl.constexpr(1),
    tl.constexpr(2),
    tl.constexpr(4),
    tl.constexpr(8),
)


@triton.jit
def _idx(v, IDX64: tl.constexpr):
    # Offsets inside one image (c * H*W + cell, up to F*C*H*W): int32 unless they can pass 2**31.
    if IDX64:
        return v.to(tl.int64)
    return v


@triton.jit
def _bounds(clip_ptr, STAGE: tl.constexpr):
    # (lo, hi) of clip stage STAGE (0 perception, 1 hidden, 2 update, 3 state).
    return tl.load(clip_ptr + 2 * STAGE), tl.load(clip_ptr + 2 * STAGE + 1)


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp: NaN stays NaN.
    v = tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _inside(v, lo, hi):
    # torch.clamp's gradient mask (torch 2.14): 1 where lo < v < hi, 0 on the bounds, beyond them
    # and on NaN (also for an infinite v on an open side, +-inf here, where torch gives 1).
    return (v > lo) & (v < hi)


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
    ZERO_PAD: tl.constexpr = False,
    VOLATILE_K: tl.constexpr = True,
):
    # p: (BLOCK_M, CPP*NFP), p[m, c*NFP + f] = sum_ae k[f, a, e] x[c, i+a-1, j+e-1] (column order
    # of _columns), neighbours wrapped (circular) or read as 0 outside the grid (ZERO_PAD);
    # padded columns and rows with n >= H*W are 0.
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
            ii = i + (a - 1)
            jj = j + (e - 1)
            if ZERO_PAD:
                src = ii * W + jj
                ok = (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
                xs = tl.load(
                    x_base + coff[None, :] + src[:, None], mask=lm & ok[:, None], other=0.0
                )
            else:
                # `%` truncates toward zero: add H (W) before wrapping.
                src = ((ii + H) % H) * W + (jj + W) % W
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
