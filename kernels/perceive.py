"""Circular 3x3 per-channel perception stencil: Triton forward and backward kernels + launchers.

Forward, for x: (B, C, H, W) and a filter bank k: (F, 3, 3) (cross-correlation, like F.conv2d):

    out[b, c*F + f, i, j] = sum_{a, e in 0..2} k[f, a, e] * x[b, c, (i+a-1) mod H, (j+e-1) mod W]

Backward (the adjoint stencil, summed over the filters):

    dx[b, c, i, j] = sum_f sum_{a, e} k[f, a, e] * g[b, c*F + f, (i-a+1) mod H, (j-e+1) mod W]

One program handles one (b, c) plane and one BLOCK_H x BLOCK_W tile of it. The nine shifted taps are
gathered with wrapped row/column indices, so the circular halo costs no padding copy and stays exact
for any H, W >= 1. Arithmetic is in the filter dtype (float32, or float64 for float64 input);
loads are converted first, stores round once to the output dtype, to nearest even on every path
(kernels/_round.py; bf16/fp16 maths is never done in half precision). Plane offsets are 64-bit.

Bytes that must move, forward: read x once, write F*x; backward: read F*x, write x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnca.kernels._launch import launch
from fastnca.kernels._round import to_out


@triton.jit
def _wrapped_offsets(
    i0, j0, H, W, DI: tl.constexpr, DJ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr
):
    # Row/col indices of the tile shifted by (DI, DJ), wrapped into [0, H) x [0, W).
    # `%` truncates toward zero like C, so add H (resp. W) before taking it.
    rows = i0 + tl.arange(0, BLOCK_H)
    cols = j0 + tl.arange(0, BLOCK_W)
    rs = (rows + DI + H) % H
    cs = (cols + DJ + W) % W
    return rs[:, None] * W + cs[None, :]


@triton.jit
def _tap(
    base,
    i0,
    j0,
    H,
    W,
    DI: tl.constexpr,
    DJ: tl.constexpr,
    inb,
    acc_ty: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # The tile shifted by (DI, DJ) with circular wrap, converted to the accumulation dtype.
    offs = _wrapped_offsets(i0, j0, H, W, DI, DJ, BLOCK_H, BLOCK_W)
    return tl.load(base + offs, mask=inb).to(acc_ty)


@triton.jit
def perceive_fwd_kernel(
    x_ptr, k_ptr, out_ptr, H, W, NF, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr
):
    # x: (B*C, H, W) contiguous planes; k: (NF, 3, 3) in the accumulation dtype;
    # out: (B*C*NF, H, W), plane bc*NF + f.
    bc = tl.program_id(0).to(tl.int64)
    i0 = tl.program_id(1) * BLOCK_H
    j0 = tl.program_id(2) * BLOCK_W
    acc_ty = k_ptr.dtype.element_ty
    plane = H * W
    x_base = x_ptr + bc * plane
    rows = i0 + tl.arange(0, BLOCK_H)
    cols = j0 + tl.arange(0, BLOCK_W)
    inb = (rows[:, None] < H) & (cols[None, :] < W)
    # The nine taps, t{a}{e} = x[(i+a-1) mod H, (j+e-1) mod W], loaded once for all filters.
    t00 = _tap(x_base, i0, j0, H, W, -1, -1, inb, acc_ty, BLOCK_H, BLOCK_W)
    t01 = _tap(x_base, i0, j0, H, W, -1, 0, inb, acc_ty, BLOCK_H, BLOCK_W)
    t02 = _tap(x_base, i0, j0, H, W, -1, 1, inb, acc_ty, BLOCK_H, BLOCK_W)
    t10 = _tap(x_base, i0, j0, H, W, 0, -1, inb, acc_ty, BLOCK_H, BLOCK_W)
    t11 = _tap(x_base, i0, j0, H, W, 0, 0, inb, acc_ty, BLOCK_H, BLOCK_W)
    t12 = _tap(x_base, i0, j0, H, W, 0, 1, inb, acc_ty, BLOCK_H, BLOCK_W)
    t20 = _tap(x_base, i0, j0, H, W, 1, -1, inb, acc_ty, BLOCK_H, BLOCK_W)
    t21 = _tap(x_base, i0, j0, H, W, 1, 0, inb, acc_ty, BLOCK_H, BLOCK_W)
    t22 = _tap(x_base, i0, j0, H, W, 1, 1, inb, acc_ty, BLOCK_H, BLOCK_W)
    out_offs = rows[:, None] * W + cols[None, :]
    for f in range(NF):
        kf = k_ptr + f * 9
        y = (
            tl.load(kf + 0) * t00
            + tl.load(kf + 1) * t01
            + tl.load(kf + 2) * t02
            + tl.load(kf + 3) * t10
            + tl.load(kf + 4) * t11
            + tl.load(kf + 5) * t12
            + tl.load(kf + 6) * t20
            + tl.load(kf + 7) * t21
            + tl.load(kf + 8) * t22
        )
        o_base = out_ptr + (bc * NF + f) * plane
        tl.store(o_base + out_offs, to_out(y, out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def perceive_bwd_kernel(
    g_ptr, k_ptr, dx_ptr, H, W, NF, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr
):
    # g: (B*C*NF, H, W); dx: (B*C, H, W). dx[i, j] = sum_f sum_ae k[f,a,e] g_f[(i-a+1), (j-e+1)].
    bc = tl.program_id(0).to(tl.int64)
    i0 = tl.program_id(1) * BLOCK_H
    j0 = tl.program_id(2) * BLOCK_W
    acc_ty = k_ptr.dtype.element_ty
    plane = H * W
    rows = i0 + tl.arange(0, BLOCK_H)
    cols = j0 + tl.arange(0, BLOCK_W)
    inb = (rows[:, None] < H) & (cols[None, :] < W)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_ty)
    for f in range(NF):
        g_base = g_ptr + (bc * NF + f) * plane
        kf = k_ptr + f * 9
        # Filter tap (a, e) reads g at offset (1-a, 1-e).
        for a in tl.static_range(3):
            for e in tl.static_range(3):
                offs = _wrapped_offsets(i0, j0, H, W, 1 - a, 1 - e, BLOCK_H, BLOCK_W)
                acc += tl.load(kf + a * 3 + e) * tl.load(g_base + offs, mask=inb).to(acc_ty)
    tl.store(
        dx_ptr + bc * plane + rows[:, None] * W + cols[None, :],
        to_out(acc, dx_ptr.dtype.element_ty),
        mask=inb,
    )


def _blocks(H: int, W: int) -> tuple[int, int]:
    # Tiles of up to 16 x 64 cells: wide along W for coalesced rows; smaller for tiny grids.
    return min(16, triton.next_power_of_2(H)), min(64, triton.next_power_of_2(W))


def _acc_filters(filters: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return filters.to(acc).contiguous()


def perceive_fwd(x: torch.Tensor, filters: torch.Tensor, out: torch.Tensor | None = None):
    """x: (B, C, H, W), filters: (F, 3, 3) -> (B, C*F, H, W) in x.dtype."""
    x = x.contiguous()
    B, C, H, W = x.shape
    NF = filters.shape[0]
    if out is None:
        out = torch.empty((B, C * NF, H, W), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    BH, BW = _blocks(H, W)
    grid = (B * C, triton.cdiv(H, BH), triton.cdiv(W, BW))
    launch(
        perceive_fwd_kernel,
        grid,
        x,
        _acc_filters(filters, x.dtype),
        out,
        H,
        W,
        NF,
        BLOCK_H=BH,
        BLOCK_W=BW,
    )
    return out


def perceive_bwd(grad_out: torch.Tensor, filters: torch.Tensor, out: torch.Tensor | None = None):
    """grad_out: (B, C*F, H, W), filters: (F, 3, 3) -> dx: (B, C, H, W) in grad_out.dtype."""
    g = grad_out.contiguous()
    B, CF, H, W = g.shape
    NF = filters.shape[0]
    C = CF // NF
    if out is None:
        out = torch.empty((B, C, H, W), device=g.device, dtype=g.dtype)
    if out.numel() == 0:
        return out
    BH, BW = _blocks(H, W)
    grid = (B * C, triton.cdiv(H, BH), triton.cdiv(W, BW))
    launch(
        perceive_bwd_kernel,
        grid,
        g,
        _acc_filters(filters, g.dtype),
        out,
        H,
        W,
        NF,
        BLOCK_H=BH,
        BLOCK_W=BW,
    )
    return out
