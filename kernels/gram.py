"""Gram matrix and fused style loss: Triton kernels (forward and backward) + launchers.

For features f: (B, C, H, W), N = H*W and F_b = f[b].reshape(C, N):

    G[b]  = F_b F_bᵀ / N                                    (B, C, C), symmetric
    style loss of one layer, T: (C, C) broadcast or (B, C, C):
    L     = mean_{b,i,j} (G[b,i,j] - T[b,i,j])²  =  sum D² / (B C²),   D = G - T
    dL/dF_b = 2 / (B C² N) · S_b F_b,      S_b = D_b + D_bᵀ
    Gram backward for an upstream dG:   dF_b = (dG_b + dG_bᵀ) F_b / N

Forward: the (C, C) output is cut into BLOCK_M x BLOCK_M tiles and only the T(T+1)/2 tiles of the
upper triangle are computed (half the FLOPs of a full matmul); each is stored twice (tile and
transpose). The fused style-loss forward reduces D² tile by tile into one partial sum per program
and never writes G; for an off-diagonal tile (i, j) it also loads T's (j, i) tile, so the loss is
exact for a non-symmetric target. In training it stores the symmetric residual S (C² per image, in
fp32): the backward is then one matmul S F. Recomputing G in the backward would have to write S
anyway (dF needs every column of S for each row block), so keeping S never moves more bytes.

Small C with large N (VGG relu1_1: C=64, N=65536) gives too few tiles to fill a GPU, so the
reduction over N is split across programs ("split-K"): each writes a partial Gram into a
(SPLIT, B, C, C) fp32 workspace which is summed afterwards (no float atomics: deterministic). The
style loss then finishes with a few elementwise torch ops on the small (B, C, C) Gram.

Precision: accumulation in float32 (float64 for float64 input). The forward dot runs in the input
dtype: fp16/bf16 on tensor cores; fp32 as TF32 unless torch.get_float32_matmul_precision() is
"highest" (then full fp32). The backward dot casts S (or dG + dGᵀ) to the feature dtype for half
inputs (as torch's half bmm does with its half gradient) and is TF32/fp32 as above for fp32.
Under TRITON_INTERPRET=1 half inputs are upcast to fp32 after load (the interpreter's bf16 dot is
wrong) and the backward dot stays fp32, unless FASTNCA_GPU_BRANCHES=1 (tests): then the launchers
take the GPU's choices, fp16 dots run in fp16 (numpy: exact products, fp32 sums, like tensor cores)
and bf16 ones round their operands to bf16 first and multiply them upcast (same values, a correct
dot). Half stores round to nearest even on every path (kernels/_round.py). tf32 dots run exactly
in fp32 under the interpreter (it ignores input_precision). Image and row offsets are 64-bit.

Bytes that must move (per image, input dtype size s): forward reads C*N*s (+ C² target reads and,
in training, C²*4 residual writes); backward reads C*N*s + C²*4 and writes C*N*s. FLOPs: forward
C²N (upper triangle), backward 2C²N.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastnca.kernels._launch import gpu_info, launch
from fastnca.kernels._round import to_out


@triton.jit
def _tile_pair(p, SQRT_NUDGE: tl.constexpr = 0):
    # p-th tile of the upper triangle in column-major order: p = tj(tj+1)/2 + ti, 0 <= ti <= tj.
    # tj = floor((sqrt(8p + 1) - 1) / 2), then corrected by one either way: a float32 sqrt a few
    # ulps off (hardware approximations) still maps every p to its own pair. SQRT_NUDGE (tests
    # only) moves the sqrt that many float32 ulps to prove the guard works.
    r = tl.sqrt(8.0 * p.to(tl.float32) + 1.0)
    if SQRT_NUDGE != 0:
        r = (r.to(tl.int32, bitcast=True) + SQRT_NUDGE).to(tl.float32, bitcast=True)
    tj = ((r - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= p, tj + 1, tj)  # guard against sqrt rounding
    tj = tl.where(tj * (tj + 1) // 2 > p, tj - 1, tj)
    return p - tj * (tj + 1) // 2, tj


@triton.jit
def _gram_tile(
    f_base,
    C,
    N,
    rows_i,
    rows_j,
    k_lo,
    k_hi,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    # acc[r, c] = sum_{k in [k_lo, k_hi)} F[rows_i[r], k] * F[rows_j[c], k]: (BLOCK_M, BLOCK_M).
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    off_i = rows_i.to(tl.int64)[:, None] * N
    off_j = rows_j.to(tl.int64)[:, None] * N
    m_i = (rows_i < C)[:, None]
    m_j = (rows_j < C)[:, None]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mk = (ks < k_hi)[None, :]
        a = tl.load(f_base + off_i + ks[None, :], mask=m_i & mk, other=0.0)
        b = tl.load(f_base + off_j + ks[None, :], mask=m_j & mk, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def gram_fwd_kernel(
    f_ptr,
    out_ptr,
    C,
    N,
    K_CHUNK,
    scale,
    stride_split,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    # f: (B, C, N); out: (SPLIT, B, C, C) with split stride stride_split (0 when SPLIT == 1).
    # Program (p, b, s): upper-triangle tile p of image b over columns [s*K_CHUNK, (s+1)*K_CHUNK).
    ti, tj = _tile_pair(tl.program_id(0))
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    k_lo = s * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, N)
    rows_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = (
        _gram_tile(
            f_ptr + b * C * N,
            C,
            N,
            rows_i,
            rows_j,
            k_lo,
            k_hi,
            BLOCK_M,
            BLOCK_K,
            PREC,
            UPCAST,
            ACC_FP64,
        )
        * scale
    )
    o_base = out_ptr + s.to(tl.int64) * stride_split + b * C * C
    m = (rows_i < C)[:, None] & (rows_j < C)[None, :]
    g = to_out(acc, out_ptr.dtype.element_ty)
    tl.store(o_base + rows_i.to(tl.int64)[:, None] * C + rows_j[None, :], g, mask=m)
    # Mirror G[j-tile, i-tile] = tileᵀ; a diagonal tile is already complete.
    m_t = (rows_j < C)[:, None] & (rows_i < C)[None, :] & (ti != tj)
    tl.store(o_base + rows_j.to(tl.int64)[:, None] * C + rows_i[None, :], tl.trans(g), mask=m_t)


@triton.jit
def style_fwd_kernel(
    f_ptr,
    t_ptr,
    part_ptr,
    s_ptr,
    C,
    N,
    stride_tb,
    scale,
    n_pairs,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr,
    SAVE: tl.constexpr,
):
    # f: (B, C, N); t: target, image b at t_ptr + b*stride_tb (0: one (C, C) target for all);
    # part: (B * n_pairs,) partial sums of D²; s: (B, C, C) residual S = D + Dᵀ when SAVE.
    p = tl.program_id(0)
    ti, tj = _tile_pair(p)
    b = tl.program_id(1).to(tl.int64)
    rows_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    g = (
        _gram_tile(
            f_ptr + b * C * N, C, N, rows_i, rows_j, 0, N, BLOCK_M, BLOCK_K, PREC, UPCAST, ACC_FP64
        )
        * scale
    )
    m = (rows_i < C)[:, None] & (rows_j < C)[None, :]
    m_t = (rows_j < C)[:, None] & (rows_i < C)[None, :]
    off_ij = rows_i.to(tl.int64)[:, None] * C + rows_j[None, :]
    off_ji = rows_j.to(tl.int64)[:, None] * C + rows_i[None, :]
    t_base = t_ptr + b * stride_tb
    t_ij = tl.load(t_base + off_ij, mask=m, other=0.0).to(g.dtype)
    t_ji = tl.trans(tl.load(t_base + off_ji, mask=m_t, other=0.0).to(g.dtype))
    d_ij = tl.where(m, g - t_ij, 0.0)  # D on tile (i, j)
    d_ji = tl.where(m, g - t_ji, 0.0)  # (D on tile (j, i))ᵀ, as G[j, i] = G[i, j]ᵀ
    part = tl.sum(tl.sum(d_ij * d_ij, axis=1), axis=0)
    part += tl.where(ti != tj, tl.sum(tl.sum(d_ji * d_ji, axis=1), axis=0), 0.0)
    tl.store(part_ptr + b * n_pairs + p, part)
    if SAVE:
        res = d_ij + d_ji  # S on tile (i, j); S is symmetric
        s_base = s_ptr + b * C * C
        tl.store(s_base + off_ij, res, mask=m)
        tl.store(s_base + off_ji, tl.trans(res), mask=m_t & (ti != tj))


@triton.jit
def gram_bwd_kernel(
    a_ptr,
    f_ptr,
    df_ptr,
    gs_ptr,
    C,
    N,
    stride_ab,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    SYM: tl.constexpr,
    HAS_GS: tl.constexpr,
    DOT_IN_F_DTYPE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    # dF_b[rows, cols] = scale * gs * sum_k A_b[rows, k] F_b[k, cols], A_b = a_b (+ a_bᵀ if SYM);
    # a: image b at a_ptr + b*stride_ab, (C, C); f, df: (B, C, N); gs: one-element scale tensor.
    b = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    a_base = a_ptr + b * stride_ab
    f_base = f_ptr + b * C * N
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_r = (rows < C)[:, None]
    m_c = (cols < N)[None, :]
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mk = ks < C
        a = tl.load(
            a_base + rows.to(tl.int64)[:, None] * C + ks[None, :], mask=m_r & mk[None, :], other=0.0
        ).to(acc.dtype)
        if SYM:
            a_t = tl.load(
                a_base + ks.to(tl.int64)[:, None] * C + rows[None, :],
                mask=mk[:, None] & (rows < C)[None, :],
                other=0.0,
            )
            a += tl.trans(a_t).to(acc.dtype)
        fb = tl.load(
            f_base + ks.to(tl.int64)[:, None] * N + cols[None, :], mask=mk[:, None] & m_c, other=0.0
        )
        if DOT_IN_F_DTYPE and UPCAST:  # interpreter: A rounded to F's dtype, exact dot
            acc = tl.dot(
                to_out(a, fb.dtype).to(acc.dtype), fb.to(acc.dtype), acc, input_precision="ieee"
            )
        elif DOT_IN_F_DTYPE:
            acc = tl.dot(to_out(a, fb.dtype), fb, acc, input_precision=PREC)
        else:
            acc = tl.dot(a, fb.to(acc.dtype), acc, input_precision=PREC)
    acc = acc * scale
    if HAS_GS:
        acc = acc * tl.load(gs_ptr).to(acc.dtype)
    tl.store(
        df_ptr + b * C * N + rows.to(tl.int64)[:, None] * N + cols[None, :],
        to_out(acc, df_ptr.dtype.element_ty),
        mask=m_r & m_c,
    )


# ---------------------------------------------------------------------------------------------
# Launchers: plain Python, called by the registered ops of fastnca.ops.gram. Shapes are checked by
# the caller; block sizes and the split can be forced (tests use tiny blocks under the interpreter).


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gpu_branches() -> bool:
    # The compiled GPU's code paths: always when compiled; under the interpreter on request
    # (FASTNCA_GPU_BRANCHES=1, tests), so the tensor-core branches' indexing is tested on CPU.
    return not _interpreting() or os.environ.get("FASTNCA_GPU_BRANCHES", "0") == "1"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype) -> str:
    # fp32: TF32 tensor cores unless the user asked torch for "highest" fp32 matmul precision.
    # (The setting only acts on fp32 operands; fp16/bf16 dots are native with fp32 accumulation.)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _fwd_blocks(C: int, dtype: torch.dtype, block_m, block_k) -> tuple[int, int]:
    bm = block_m or max(16, min(64, triton.next_power_of_2(C)))
    bk = block_k or (32 if dtype in (torch.float32, torch.float64) else 64)
    return bm, bk


def _fwd_warps(dtype: torch.dtype) -> int:
    # 8 warps: the (64, 64) fp32 accumulator tile on 4 warps spilled (sm_90 fp32, sm_80 half);
    # spill-free on sm_80/sm_90/sm_100 with 8 (docs/gpu_static.md).
    return 8


def _sm_count(device: torch.device) -> int:
    gpu = None if _interpreting() else gpu_info(device)
    return 1 if gpu is None else gpu.sm_count


def _split(n_programs: int, N: int, bk: int, device: torch.device, split) -> tuple[int, int]:
    """(split, columns per split): enough programs for one wave of the GPU, >= 8 K-steps each."""
    if split is None:
        split = max(1, min(triton.cdiv(_sm_count(device), n_programs), triton.cdiv(N, 8 * bk)))
    chunk = triton.cdiv(triton.cdiv(N, split), bk) * bk
    return triton.cdiv(N, chunk), chunk


def _common(f: torch.Tensor):
    B, C, H, W = f.shape
    # Upcast after load: the interpreter's bf16 dot is wrong; fp16 ones too unless asked otherwise.
    upcast = _interpreting() and (
        f.dtype == torch.bfloat16 or (f.dtype == torch.float16 and not _gpu_branches())
    )
    return f.contiguous(), B, C, H * W, upcast


def gram_fwd(
    f: torch.Tensor,
    out: torch.Tensor | None = None,
    split: int | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
    out_dtype: torch.dtype | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """f: (B, C, H, W) -> G: (B, C, C) in out_dtype (default f.dtype), G[b] = F_b F_bᵀ / (H*W)."""
    f, B, C, N, upcast = _common(f)
    out_dtype = out_dtype or f.dtype
    if B * C == 0:
        return torch.zeros((B, C, C), device=f.device, dtype=out_dtype) if out is None else out
    bm, bk = _fwd_blocks(C, f.dtype, block_m, block_k)
    n_pairs = triton.cdiv(C, bm) * (triton.cdiv(C, bm) + 1) // 2
    split, chunk = _split(n_pairs * B, N, bk, f.device, split)
    # One split writes G directly; more write fp32 partial Grams that are summed afterwards.
    if split == 1:
        ws = torch.empty((B, C, C), device=f.device, dtype=out_dtype) if out is None else out
    else:
        ws = torch.empty((split, B, C, C), device=f.device, dtype=_acc_dtype(f.dtype))
    launch(
        gram_fwd_kernel,
        (n_pairs, B, split),
        f,
        ws,
        C,
        N,
        chunk,
        1.0 / N,
        0 if split == 1 else B * C * C,
        BLOCK_M=bm,
        BLOCK_K=bk,
        PREC=_precision(f.dtype),
        UPCAST=upcast,
        ACC_FP64=f.dtype == torch.float64,
        num_warps=num_warps or _fwd_warps(f.dtype),
    )
    if split == 1:
        return ws
    if out is None:
        return ws.sum(0).to(out_dtype)
    return out.copy_(ws.sum(0))


def style_fwd(
    f: torch.Tensor,
    target: torch.Tensor,
    save: bool,
    split: int | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
):
    """f: (B, C, H, W), target: (C, C) or (B, C, C) -> (loss, S).

    loss: 0-d, mean((G - T)²) in float32 (float64 for float64 f); S: (B, C, C) = D + Dᵀ in that
    dtype when ``save``, else an empty tensor.
    """
    f, B, C, N, upcast = _common(f)
    acc = _acc_dtype(f.dtype)
    t = target.to(acc).contiguous()
    bm, bk = _fwd_blocks(C, f.dtype, block_m, block_k)
    n_pairs = triton.cdiv(C, bm) * (triton.cdiv(C, bm) + 1) // 2
    split, chunk = _split(n_pairs * B, N, bk, f.device, split)
    empty = torch.empty((0,), device=f.device, dtype=acc)
    if split > 1:
        # Few tiles: split-K Gram into a workspace, then the small (B, C, C) epilogue in torch.
        g = gram_fwd(f, split=split, block_m=bm, block_k=bk, out_dtype=acc, num_warps=num_warps)
        d = g - t
        return d.square().mean(), (d + d.transpose(1, 2) if save else empty)
    part = torch.empty((B * n_pairs,), device=f.device, dtype=acc)
    res = torch.empty((B, C, C), device=f.device, dtype=acc) if save else empty
    launch(
        style_fwd_kernel,
        (n_pairs, B),
        f,
        t,
        part,
        res if save else part,
        C,
        N,
        C * C if t.dim() == 3 else 0,
        1.0 / N,
        n_pairs,
        BLOCK_M=bm,
        BLOCK_K=bk,
        PREC=_precision(f.dtype),
        UPCAST=upcast,
        ACC_FP64=acc == torch.float64,
        SAVE=save,
        num_warps=num_warps or _fwd_warps(f.dtype),
    )
    return part.sum() / (B * C * C), res


def gram_bwd(
    a: torch.Tensor,
    f: torch.Tensor,
    sym: bool,
    grad_scale: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """dF_b = scale * grad_scale * (a_b + a_bᵀ if sym else a_b) @ F_b, in f.dtype.

    a: (B, C, C) or (C, C) (shared by the batch); f: (B, C, H, W); scale defaults to 1/(H*W);
    grad_scale: optional one-element tensor (the upstream gradient of a scalar loss).
    """
    f, B, C, N, upcast = _common(f)
    a = a.contiguous()
    if out is None:
        out = torch.empty((B, C, N), device=f.device, dtype=f.dtype)
    if out.numel() == 0:
        return out.view(f.shape)
    acc = _acc_dtype(f.dtype)
    bm = block_m or max(16, min(64, triton.next_power_of_2(C)))
    bn = block_n or 64
    bk = block_k or max(16, min(32, triton.next_power_of_2(C)))
    grid = (triton.cdiv(N, bn), triton.cdiv(C, bm), B)
    half_dot = f.dtype in (torch.float16, torch.bfloat16) and _gpu_branches()
    launch(
        gram_bwd_kernel,
        grid,
        a,
        f,
        out,
        a if grad_scale is None else grad_scale,
        C,
        N,
        C * C if a.dim() == 3 else 0,
        1.0 / N if scale is None else scale,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        PREC=_precision(f.dtype),
        SYM=sym,
        HAS_GS=grad_scale is not None,
        DOT_IN_F_DTYPE=half_dot,
        ACC_FP64=acc == torch.float64,
        UPCAST=upcast,
    )
    return out.view(f.shape)
