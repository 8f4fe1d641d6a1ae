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

Step options (fastnca.reference.nca_step_ref): zero padding (ZERO_PAD: out-of-grid neighbours
read 0; the adjoint stencil drops the halo) and the clips of perception, hidden, update and state
(CLIP bits, kernels/_nca_tile.py) are compiled in; the backward's clip gradients are in
nca_step_bwd.py. Files: shared tile helpers in _nca_tile.py, backward kernels in nca_step_bwd.py,
forward kernel and all launchers here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastnca.kernels._launch import gpu_info, launch
from fastnca.kernels._nca_tile import (
    CLIP_H,
    CLIP_P,
    CLIP_S,
    CLIP_U,
    _bounds,
    _clamp,
    _columns,
    _dot,
    _idx,
    _inside,
    _perceive_tile,
)
from fastnca.kernels._round import to_out
from fastnca.kernels.nca_step_bwd import nca_step_bwd_dx_kernel, nca_step_bwd_kernel


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
    clip_ptr,
    g_ptr,
    gs_ptr,
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
    ZERO_PAD: tl.constexpr = False,
    CLIP: tl.constexpr = 0,
    GRAD: tl.constexpr = False,
):
    # x, out: (B, C, H*W); m: (B, H*W); w1: (HID, FC); w2: (C, HID); all contiguous.
    # y = sum over hidden chunks [h0, h0+HB) of relu(p @ w1[chunk]^T + b1[chunk]) @ w2[:, chunk]^T:
    # only a (BLOCK_M, HB) slice of the hidden activations is live at a time. Clip options (CLIP,
    # kernels/_nca_tile.py) clamp p, h, y and the new state.
    # GRAD (the backward's first pass when the update or state is clipped): with g = dL/d(new)
    # (B, C, H*W), write gs = g * [slo < new < shi] (dL/dx through the residual) to gs_ptr and
    # gs * [ulo < y < uhi] (dL/d clipped y, before the update mask) to out_ptr (float32/64).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    FC = C * NF
    acc_ty = k_ptr.dtype.element_ty
    n = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    inb = n < HW
    x_base = x_ptr + b * C * HW
    # (BLOCK_M, FCP)
    p = _perceive_tile(x_base, k_ptr, n, H, W, C, NF, BLOCK_M, CPP, NFP, IDX64, ZERO_PAD)
    if CLIP_P & CLIP:
        plo, phi = _bounds(clip_ptr, 0)
        p = _clamp(p, plo, phi)
    if CLIP_H & CLIP:
        hlo, hhi = _bounds(clip_ptr, 1)
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
        if CLIP_H & CLIP:
            h = _clamp(h, hlo, hhi)
        w2t = tl.load(
            w2_ptr + cc[None, :] * HID + hid[:, None], mask=hm[:, None] & cm[None, :], other=0.0
        )  # (HB, CP) = w2^T
        y = _dot(h, w2t, y, DOT_PRECISION, DOT_DTYPE, UPCAST)  # (BLOCK_M, CP)
    if HAS_B2:
        y += tl.load(b2_ptr + cc, mask=cm, other=0.0)[None, :]
    yr = y
    if CLIP_U & CLIP:
        ulo, uhi = _bounds(clip_ptr, 2)
        y = _clamp(y, ulo, uhi)
    m = tl.load(m_ptr + b * HW + n, mask=inb, other=0).to(acc_ty)[:, None]
    offs = _idx(cc[None, :], IDX64) * HW + n[:, None]
    lm = inb[:, None] & cm[None, :]
    xc = tl.load(x_base + offs, mask=lm, other=0.0).to(acc_ty)
    out = tl.where(m != 0, xc + y * m, xc)
    if CLIP_S & CLIP:
        slo, shi = _bounds(clip_ptr, 3)
        sin = _inside(out, slo, shi)
        out = _clamp(out, slo, shi)
    if GRAD:
        gs = tl.load(g_ptr + b * C * HW + offs, mask=lm, other=0.0).to(acc_ty)
        if CLIP_S & CLIP:
            gs = tl.where(sin, gs, 0.0)
            tl.store(gs_ptr + b * C * HW + offs, gs, mask=lm)
        if CLIP_U & CLIP:
            gs = tl.where(_inside(yr, ulo, uhi), gs, 0.0)
        tl.store(out_ptr + b * C * HW + offs, gs, mask=lm)
    else:
        tl.store(out_ptr + b * C * HW + offs, to_out(out, out_ptr.dtype.element_ty), mask=lm)


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


def _config(C: int, NF: int, HID: int, backward: bool, gpu=None) -> tuple[int, int, int]:
    """(BLOCK_M cells, HB hidden units per chunk, num_warps): the configuration rule.

    Registers per thread grow with BLOCK_M * (FCP + HB) / threads (perception tile, one hidden
    slice and their split tf32x3 operands) plus, in backward, the (HB, FCP) weight-gradient
    slice (the backward's weight-gradient role is the heavy one). Forward 32 cells x 32 hidden on
    4 warps, backward 32 cells x 16 hidden on 8 warps compile without spills for FCP <= 64
    (C*F <= 64) on sm_80 and sm_90 in float32/bf16/fp16 (table in docs/gpu_static.md, made by
    ``python -m fastnca.bench.gpu_static``); wider tiles take 16 cells. sm_100 (``gpu``, the
    launch's GpuInfo) spills 16-36 B per thread in that backward; there it runs 16 cells on 4
    warps (about 200 registers, no spill; 16 cells on 8 warps or one pipeline stage still spill).
    """
    t = _tile_args(C, NF)
    wide = t["CPP"] * t["NFP"] > 64
    if backward:
        if not wide and gpu is not None and gpu.capability >= (10, 0):
            return 16, min(16, _pad(HID)), 4
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


def _options(zero_pad: bool, clip, acc: torch.dtype, device) -> tuple[dict, torch.Tensor | None]:
    """ZERO_PAD / CLIP constexprs, given only when set (the plain step's launch stays as it was),
    and the clip bounds (8 values in the accumulation dtype, lo, hi per stage; None unclipped).
    clip: None or 8 floats (CLIP_KEYS order, +-inf where open)."""
    kw = dict(ZERO_PAD=True) if zero_pad else {}
    bits = 0
    for s, bit in enumerate((CLIP_P, CLIP_H, CLIP_U, CLIP_S)):
        if clip is not None and (clip[2 * s] != -math.inf or clip[2 * s + 1] != math.inf):
            bits |= bit.value
    if not bits:
        return kw, None
    return dict(kw, CLIP=bits), torch.tensor(list(clip), dtype=acc, device=device)


def _launch_fwd(x, w1, b1, w2, b2, m, k, out, clip_t, g, gs, opts, bm, hb, nw, prec, stages):
    # One forward-kernel launch on prepared operands (GRAD in opts: the backward's first pass).
    B, C, H, W = x.shape
    HID, NF = w1.shape[0], k.shape[0]
    dummy = b1  # pointer arguments the constexprs leave unused
    launch(
        nca_step_fwd_kernel,
        (triton.cdiv(H * W, bm), B),
        x,
        k,
        w1,
        b1,
        w2,
        dummy if b2 is None else b2.to(w1.dtype).contiguous(),
        m,
        out,
        dummy if clip_t is None else clip_t,
        dummy if g is None else g,
        dummy if gs is None else gs,
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
        **_dot_args(w1.dtype, x.device, prec),
        IDX64=_idx64(x, NF),
        **opts,
        num_warps=nw,
        **({} if stages is None else dict(num_stages=stages)),
    )


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
    zero_pad: bool = False,
    clip=None,
):
    """x + (w2 relu(w1 perceive(x) + b1) + b2) * mask on fired cells. Shapes checked by caller.

    x: (B, C, H, W); w1: (HID, F*C); b1: (HID,) or None; w2: (C, HID); b2: (C,) or None;
    mask: (B, 1, H, W) bool or float; filters: (F, 3, 3). Returns (B, C, H, W) in x.dtype.
    block_m / hidden_block / num_warps / dot_precision override the configuration rule.
    zero_pad: neighbours outside the grid read 0; clip: None or 8 floats (lo, hi of perception,
    hidden, update, state; +-inf where open), the clamps of fastnca.reference.nca_step_ref.
    """
    x, w1, b1, w2, m, k = _prepare(x, w1, b1, w2, mask, filters)
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    opts, clip_t = _options(zero_pad, clip, w1.dtype, x.device)
    bm, hb, nw = _config(C, k.shape[0], w1.shape[0], backward=False)
    bm, hb, nw = block_m or bm, hidden_block or hb, num_warps or nw
    _launch_fwd(
        x,
        w1,
        b1,
        w2,
        b2,
        m,
        k,
        out,
        clip_t,
        None,
        None,
        opts,
        bm,
        hb,
        nw,
        dot_precision,
        num_stages,
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
    zero_pad: bool = False,
    clip=None,
    b2=None,
):
    """Gradients of nca_step_fwd from the saved x and mask (p and h recomputed).

    Returns (dx, dw1, db1, dw2, db2): dx in grad's dtype; weight grads in the accumulation dtype
    (float32, float64 for float64 x), shaped like w1, (HID,), w2, (C,). db1 and db2 are computed
    whether or not the biases exist (the caller drops them). zero_pad / clip as in nca_step_fwd;
    b2 enters only through the update and state clips (their gradient masks need y).
    """
    x, w1, b1, w2, m, k = _prepare(x, w1, b1, w2, mask, filters)
    g = grad.contiguous()
    B, C, H, W = x.shape
    HID, NF = w1.shape[0], k.shape[0]
    acc = w1.dtype
    dx = torch.empty_like(g)
    opts, clip_t = _options(zero_pad, clip, acc, x.device)
    bits = opts.pop("CLIP", 0)
    bm, hb, nw = _config(C, NF, HID, backward=True, gpu=gpu_info(x.device))
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
    g_mlp = g_dx = g  # dL/d(update) before the update mask; dL/dx through the residual
    if bits & (CLIP_U.value | CLIP_S.value):
        # First pass: the update y of every cell, to fold the clips' gradient masks into g.
        g_mlp = torch.empty(x.shape, device=x.device, dtype=acc)
        g_dx = torch.empty(x.shape, device=x.device, dtype=acc) if bits & CLIP_S.value else g
        fbm, fhb, fnw = _config(C, NF, HID, backward=False)
        opts_g = dict(opts, CLIP=bits, GRAD=True)
        _launch_fwd(
            x, w1, b1, w2, b2, m, k, g_mlp, clip_t, g, g_dx, opts_g, block_m or fbm, fhb, fnw,
            dot_precision, num_stages,
        )  # fmt: skip
    opts_b = dict(opts)
    if bits & (CLIP_P.value | CLIP_H.value):
        opts_b["CLIP"] = bits & (CLIP_P.value | CLIP_H.value)
    if num_stages is None and bits & CLIP_P.value:
        # A clamped perception tile, software-pipelined, takes 190 KB of shared memory and
        # spills (sm_80/90/100, docs/gpu_static.md); unpipelined: ~180-250 registers, no spill.
        num_stages = 1
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
        g_mlp,
        dp,
        dw1,
        db1,
        dw2,
        db2,
        b1 if clip_t is None else clip_t,
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
        **opts_b,
        num_warps=nw,
        **({} if num_stages is None else dict(num_stages=num_stages)),
    )
    launch(
        nca_step_bwd_dx_kernel,
        (triton.cdiv(H * W, 64), B),
        dp,
        k,
        g_dx,
        dx,
        C,
        H,
        W,
        NF,
        BLOCK_M=64,
        CP=_pad(C),
        IDX64=_idx64(x, NF),
        **opts,
        num_warps=4,
    )
    return dx, dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0)
