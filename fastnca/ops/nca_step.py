"""nca_step: one fused NCA update (perception + MLP + update mask + residual) that saves only the
state and the mask for backward.

CUDA tensors run the Triton kernels of ``fastnca.kernels.nca_step`` through the registered ops
``torch.ops.fastnca.nca_step`` / ``fastnca::nca_step_backward`` (forward, and a backward that
recomputes perception and hidden activations); with step options, ``fastnca::nca_step_options`` /
``fastnca::nca_step_options_backward`` (zero padding and clips in the kernels, the rotated bank
from the host, alive masking as two max-pools around the kernel; backward keeps x, the update
mask and the alive mask). CPU tensors run ``fastnca::nca_step_cpu`` /
``fastnca::nca_step_cpu_backward``, which evaluate the MLP only on the cells that fire (about
``fire_rate`` of them: resting cells are copied, so their update is never needed, forward or
backward): the C++ kernel of ``kernels/nca_step_cpu.cpp`` (tiles of rows fused in cache) where it
is built, else torch composites in cache-sized blocks of cells. They are custom ops so that
``torch.compile`` keeps them whole: a dense composite fused by inductor measured about 2x slower
per step (every cell through the MLP: 100 vs 47 ms at (4, 12, 128, 128), one thread), and a
custom autograd.Function traced by compile had its hidden activations saved by the partitioner
(~470 B per cell). Every path keeps only ``x`` and the mask (plus the shared weights) for backward
and recomputes the rest. Other devices run the dense composite under activation checkpointing.

Semantics (all paths): ``out = x + y * mask`` on cells whose mask is non-zero, ``out = x``
elsewhere, with ``y = w2 relu(w1 perceive(x) + b1) + b2``. This is the lesson's ``x + y * mask``
whenever ``y`` is finite; a NaN in the state still spreads (the NaN cell stays NaN and poisons every
neighbour that fires), it is only not written into resting cells.
"""

from __future__ import annotations

import numbers

import torch
import torch.utils.checkpoint
from torch.library import triton_op

try:  # Triton is optional: without it every device runs the torch composite (ops._backend)
    from fastnca.kernels.nca_step import nca_step_bwd, nca_step_fwd
except ImportError:
    nca_step_bwd = nca_step_fwd = None
from fastnca.ops._backend import use_triton
from fastnca.ops._checks import (
    check_filters,
    check_real_device,
    check_same_device,
    check_tensor,
)
from fastnca.ops._cpp_kernels import kernels
from fastnca.ops._cpu_parallel import MIN_GRID
from fastnca.ops._nca_cpu import _acc, _cpu_backward, _cpu_forward, _update_mask_cpu
from fastnca.ops.nca_step_options import (
    alive_mask,
    check_options,
    nca_step_options,
    options_backward,
    options_setup_context,
)
from fastnca.reference import DEFAULT_FILTERS, perceive_shifts, rotate_filters, update_mask

# ---------------------------------------------------------------------------------------- CUDA

# The kernels' dot precisions (kernels/nca_step.py DOT_PRECISIONS; kept here so that CPU-only
# installs validate the argument without importing Triton).
DOT_PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16", "fp16")


@triton_op("fastnca::nca_step", mutates_args={})
def _nca_step_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor,
    filters: torch.Tensor,
    dot_precision: str | None = None,
) -> torch.Tensor:
    return nca_step_fwd(x, w1, b1, w2, b2, mask, filters, dot_precision=dot_precision)


@triton_op("fastnca::nca_step_backward", mutates_args={})
def _nca_step_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    mask: torch.Tensor,
    filters: torch.Tensor,
    dot_precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # (dx, dw1, db1, dw2, db2); the caller drops db1/db2 when the step has no such bias.
    return nca_step_bwd(grad, x, w1, b1, w2, mask, filters, dot_precision=dot_precision)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, mask, filters, *extra = inputs  # extra: the Triton op's dot_precision
    ctx.save_for_backward(x, w1, b1, w2, mask, filters)  # x and mask: the only per-step tensors
    ctx.b2_dtype = None if b2 is None else b2.dtype
    ctx.extra = extra


def _autograd(backward_op):
    def backward(ctx, grad):
        x, w1, b1, w2, mask, filters = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = backward_op(grad, x, w1, b1, w2, mask, filters, *ctx.extra)
        return (
            dx.to(x.dtype),
            dw1.to(w1.dtype),
            None if b1 is None else db1.to(b1.dtype),
            dw2.to(w2.dtype),
            None if ctx.b2_dtype is None else db2.to(ctx.b2_dtype),
        ) + (None,) * (2 + len(ctx.extra))

    return backward


_nca_step_op.register_autograd(
    _autograd(torch.ops.fastnca.nca_step_backward), setup_context=_setup_context
)


@triton_op("fastnca::nca_step_options", mutates_args={})
def _nca_step_options_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor,
    filters: torch.Tensor,
    zero_pad: bool,
    alive_threshold: float | None,
    alive_channel: int,
    clip: list[float],
    dot_precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # -> (out, alive (B, 1, H, W) bool, or (0,) without alive masking), like the CPU options op.
    # The kernel does padding and clips; alive masking is two 3x3 max-pools of one channel.
    kw = dict(zero_pad=zero_pad, clip=clip, dot_precision=dot_precision)
    new = nca_step_fwd(x, w1, b1, w2, b2, mask, filters, **kw)
    if alive_threshold is None:
        return new, torch.empty((0,), dtype=torch.bool, device=x.device)
    ch, thr = alive_channel, alive_threshold
    alive = (alive_mask(x[:, ch], thr, zero_pad) & alive_mask(new[:, ch], thr, zero_pad))[:, None]
    return new * alive, alive


@triton_op("fastnca::nca_step_options_backward", mutates_args={})
def _nca_step_options_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor,
    alive: torch.Tensor,
    filters: torch.Tensor,
    zero_pad: bool,
    clip: list[float],
    dot_precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if alive.numel():  # dL/d(new): the alive mask carries no gradient
        grad = grad * alive
    kw = dict(zero_pad=zero_pad, clip=clip, b2=b2, dot_precision=dot_precision)
    return nca_step_bwd(grad, x, w1, b1, w2, mask, filters, **kw)


_nca_step_options_op.register_autograd(
    options_backward(torch.ops.fastnca.nca_step_options_backward),
    setup_context=options_setup_context,
)

# ------------------------------------------------------------- CPU: the MLP on fired cells only


@torch.library.custom_op("fastnca::nca_step_cpu", mutates_args=(), device_types="cpu")
def _nca_step_cpu_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    mask: torch.Tensor,
    filters: torch.Tensor,
) -> torch.Tensor:
    return _cpu_forward(x, w1, b1, w2, b2, mask, filters)


@_nca_step_cpu_op.register_fake
def _(x, w1, b1, w2, b2, mask, filters):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastnca::nca_step_cpu_backward", mutates_args=(), device_types="cpu")
def _nca_step_cpu_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    mask: torch.Tensor,
    filters: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cpu_backward(grad, x, w1, b1, w2, mask, filters)


@_nca_step_cpu_backward_op.register_fake
def _(grad, x, w1, b1, w2, mask, filters):
    dt = _acc(x)
    new = lambda *shape: torch.empty(shape, dtype=dt, device=x.device)
    return (
        torch.empty(grad.shape, dtype=grad.dtype, device=grad.device),
        new(*w1.shape),
        new(w1.shape[0]),
        new(*w2.shape),
        new(w2.shape[0]),
    )


_nca_step_cpu_op.register_autograd(
    _autograd(torch.ops.fastnca.nca_step_cpu_backward), setup_context=_setup_context
)


# --------------------------------------------------------- other devices: dense, checkpointed


def _dense_step(x, w1, b1, w2, b2, mask, filters):
    # Every cell through the MLP, as ops inductor fuses (stencil, matmuls, where), in float32
    # (float64 for float64). x: (B, C, H, W) -> (B, C, H, W) in x.dtype.
    dt = _acc(x)
    B, C, H, W = x.shape
    xs = x.to(dt)
    p = perceive_shifts(xs, filters).reshape(B, -1, H * W)  # (B, F*C, H*W)
    a = torch.matmul(w1.to(dt), p)
    if b1 is not None:
        a = a + b1.to(dt)[:, None]
    y = torch.matmul(w2.to(dt), torch.relu(a))  # (B, C, H*W)
    if b2 is not None:
        y = y + b2.to(dt)[:, None]
    m = mask.reshape(B, 1, H * W)
    xs = xs.reshape(B, C, H * W)
    out = torch.where(m != 0, xs + y * m.to(dt), xs)
    return out.reshape(B, C, H, W).to(x.dtype)


def _dense_checkpointed(*args):
    # Activation checkpointing makes autograd (and, under torch.compile, the partitioner) keep only
    # the inputs and recompute the step in backward: the same saved tensors as the CPU/CUDA ops.
    # (A custom autograd.Function is not enough under compile: the partitioner merges its
    # recompute with the forward and saves the hidden activations, about 470 B per cell.)
    return torch.utils.checkpoint.checkpoint(_dense_step, *args, use_reentrant=False)


# ---------------------------------------------------------------------------------------- public


def _as_matrix(name, w):
    # Accept the lesson's 1x1 conv weights (out, in, 1, 1) as well as (out, in).
    if isinstance(w, torch.Tensor) and w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
        check_tensor(name, w)  # the conv layout too: floating weights only
        return w.flatten(1)
    check_tensor(name, w, ndim=2)
    return w


def _check(x, w1, b1, w2, b2, mask, fire_rate, filters):
    check_tensor("x", x, ndim=4)
    check_real_device("x", x, "nca_step")
    B, C, H, W = x.shape
    if H < 1 or W < 1:
        raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
    check_filters(filters, x)
    NF = filters.shape[0]
    w1, w2 = _as_matrix("w1", w1), _as_matrix("w2", w2)
    check_same_device("w1", w1, "x", x)
    check_same_device("w2", w2, "x", x)
    hidden = w1.shape[0]
    if w1.shape[1] != NF * C:
        raise ValueError(
            f"w1 must have shape (hidden, F*C) = (hidden, {NF * C}) for x with C={C} "
            f"channels and {NF} filters, got {tuple(w1.shape)}"
        )
    if tuple(w2.shape) != (C, hidden):
        raise ValueError(f"w2 must have shape (C, hidden) = ({C}, {hidden}), got {tuple(w2.shape)}")
    for name, bias, size in (("b1", b1, hidden), ("b2", b2, C)):
        if bias is not None:
            check_tensor(name, bias, ndim=1)
            check_same_device(name, bias, "x", x)
            if bias.shape[0] != size:
                raise ValueError(f"{name} must have shape ({size},), got {tuple(bias.shape)}")
    if mask is not None:
        check_tensor("mask", mask, float_only=False)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool or floating (0/1 values), got {mask.dtype}")
        if tuple(mask.shape) != (B, 1, H, W):
            raise ValueError(
                f"mask must have shape (B, 1, H, W) = ({B}, 1, {H}, {W}), got {tuple(mask.shape)}"
            )
        check_same_device("mask", mask, "x", x)
    elif (
        not isinstance(fire_rate, numbers.Real)
        or isinstance(fire_rate, bool)
        or not 0.0 <= fire_rate <= 1.0
    ):
        raise ValueError(f"fire_rate must be a number in [0, 1], got {fire_rate!r}")
    return w1, w2


def nca_step(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    fire_rate: float = 0.5,
    filters: torch.Tensor | None = None,
    *,
    padding: str = "circular",
    alive_threshold: float | None = None,
    alive_channel: int = 3,
    clip: dict | None = None,
    perception_angle: float = 0.0,
    dot_precision: str | None = None,
) -> torch.Tensor:
    """One NCA update ``x + (w2 relu(w1 perceive(x) + b1) + b2) * mask``, fused, recompute backward.

    Args:
        x: state (B, C, H, W), float16/bfloat16/float32/float64, any H, W >= 1.
        w1: (hidden, F*C) (or the lesson's conv weight (hidden, F*C, 1, 1)); column c*F + f
            multiplies filter f on channel c. b1: (hidden,) or None.
        w2: (C, hidden) (or (C, hidden, 1, 1)); b2: (C,) or None.
        mask: (B, 1, H, W) bool or float; None draws ``update_mask(x, fire_rate)``. Cells where it
            is 0 are copied unchanged. Pass bool masks: they are what backward keeps (1 byte/cell).
        fire_rate: probability that a cell updates when ``mask`` is None, in [0, 1].
        filters: (F, 3, 3) perception bank; default ``DEFAULT_FILTERS`` (the lesson's).
        padding: "circular" (default) or "zeros" (cells outside the grid read 0).
        alive_threshold: None, or the alive masking of the growing NCA: the result is multiplied
            by ``pre & post``, ``pre = maxpool3x3(x[:, alive_channel]) > alive_threshold`` and
            ``post`` the same on the updated state (the padding never wins the max).
        alive_channel: the alpha channel of alive masking (default 3).
        clip: None or a dict with any of "perception", "hidden" (after relu), "update" (before
            the mask) and "state" (after the update) mapping to a (lo, hi) range.
        perception_angle: radians; filters 1 and 2 (the gradients) become
            ``cos a k1 - sin a k2`` and ``sin a k1 + cos a k2``.
        Any option set runs ``fastnca.ops.nca_step_options`` (see there); its backward also keeps
        the alive mask (1 byte per cell). Where the Triton path runs, that is the kernels with
        the options compiled in (``fastnca::nca_step_options``; alive masking around them).
        dot_precision: the Triton path's float32 dots: None (default: "tf32" when
            ``torch.backends.cuda.matmul.allow_tf32``, else "tf32x3" on sm_80+, about float32
            accurate), "tf32", "tf32x3", "ieee", or "bf16"/"fp16" (operands rounded to that type,
            float32 accumulation). Checked on every path; the CPU and other-device paths compute
            in float32 (float64 for float64) whatever it says; float64 states always run "ieee".

    Returns (B, C, H, W) in x's dtype (contiguous); arithmetic in float32 (float64 for float64).
    Differentiable w.r.t. x, w1, b1, w2, b2 (not the mask or the filters). Backward keeps only x,
    the mask and the weights, and recomputes perception and hidden activations.
    """
    if filters is None:
        filters = DEFAULT_FILTERS.to(x.device) if isinstance(x, torch.Tensor) else DEFAULT_FILTERS
    w1, w2 = _check(x, w1, b1, w2, b2, mask, fire_rate, filters)
    if dot_precision is not None and dot_precision not in DOT_PRECISIONS:
        raise ValueError(
            f"dot_precision must be None or one of {DOT_PRECISIONS}, got {dot_precision!r}"
        )
    if mask is None:
        # On CPU through the mask op when it matters (a traced step: the same masks as eager; a
        # grid the pure-torch step splits: drawn inside its hold on the cores); otherwise drawn
        # directly, which skips the op's ~0.2 ms of dispatch.
        cpu = x.device.type == "cpu"
        traced = torch.compiler.is_compiling()  # (kernels() is not traced: checked after it)
        op = cpu and (traced or (x[:, 0].numel() >= MIN_GRID and kernels() is None))
        mask = _update_mask_cpu(x.detach(), fire_rate) if op else update_mask(x, fire_rate)
    if (
        padding != "circular"
        or alive_threshold is not None
        or clip is not None
        or perception_angle != 0
    ):
        o = check_options(
            padding,
            alive_threshold,
            alive_channel,
            clip,
            perception_angle,
            x.shape[1],
            filters.shape[0],
        )
        args = (x, w1, b1, w2, b2, mask.detach(), filters.detach())
        with torch.autocast(x.device.type, enabled=False):
            if use_triton(x.device):
                k = rotate_filters(args[-1], o[-1])
                return torch.ops.fastnca.nca_step_options(*args[:-1], k, *o[:-1], dot_precision)[0]
            return nca_step_options(*args, *o)
    args = (x, w1, b1, w2, b2, mask.detach(), filters.detach())
    # The step computes in float32 whatever autocast says (the state is a residual sum over many
    # steps); autocast would otherwise recast the CPU op's inner matmuls and break its buffers.
    with torch.autocast(x.device.type, enabled=False):
        if use_triton(x.device):
            return torch.ops.fastnca.nca_step(*args, dot_precision)
        if x.device.type == "cpu":
            return torch.ops.fastnca.nca_step_cpu(*args)
        return _dense_checkpointed(*args)
