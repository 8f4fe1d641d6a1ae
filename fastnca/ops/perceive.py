"""perceive: the circular 3x3 per-channel NCA perception, as a drop-in differentiable op.

CUDA tensors run the Triton kernels of ``fastnca.kernels.perceive`` through the registered op
``torch.ops.fastnca.perceive`` (forward) / ``fastnca::perceive_backward`` (its adjoint), which
``torch.compile`` traces as user-defined Triton kernels. CPU tensors run ``fastnca::perceive_cpu``
/ ``fastnca::perceive_cpu_backward``: the C++ kernel of ``kernels/perceive_cpu.cpp`` (row blocks
of each channel plane, all filters from one padded copy in cache) where it is built
(``ops._cpp_kernels``), else each filter as streaming passes over shifted views of a padded copy.
Other devices run a depthwise-convolution composite (one grouped
conv2d on a circularly padded copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.library import triton_op

try:  # Triton is optional: without it every device runs the torch composite (ops._backend)
    from fastnca.kernels.perceive import perceive_bwd, perceive_fwd
except ImportError:
    perceive_bwd = perceive_fwd = None
from fastnca._checks import acc_dtype
from fastnca.ops._backend import use_triton
from fastnca.ops._checks import check_channels, check_filters, check_real_device, check_tensor
from fastnca.ops._cpp_kernels import kernels
from fastnca.ops._stencil_cpu import (
    adjoint_into,
    filter_taps,
    fold_circular,
    planes_into,
    taps_tensor,
)
from fastnca.reference import DEFAULT_FILTERS, circular_pad1


@triton_op("fastnca::perceive", mutates_args={})
def _perceive_op(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    return perceive_fwd(x, filters)


@triton_op("fastnca::perceive_backward", mutates_args={})
def _perceive_backward_op(grad_out: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    return perceive_bwd(grad_out, filters)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward(ctx, grad_out):
    (filters,) = ctx.saved_tensors
    return torch.ops.fastnca.perceive_backward(grad_out, filters), None


_perceive_op.register_autograd(_backward, setup_context=_setup_context)


def perceive_composite(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Other devices: out[:, c*F + f] = filter f on channel c, as one depthwise conv (groups=C).

    x: (B, C, H, W) -> (B, C*F, H, W). Computes in float32 for half inputs and float64 for
    float64, and returns x's dtype.
    """
    C = x.shape[1]
    acc = acc_dtype(x.dtype)
    weight = filters.to(acc)[:, None].repeat(C, 1, 1, 1)  # (C*F, 1, 3, 3): filter f of group c
    y = F.conv2d(circular_pad1(x.to(acc)), weight, groups=C)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------- CPU
BLOCK_CELLS = 8192  # cells per row block of the C++ kernel


def _block_rows(W: int) -> int:
    return max(1, BLOCK_CELLS // W)


# Without the C++ kernel: filters as streaming passes over shifted views (ops._stencil_cpu:
# about 3x faster than the depthwise conv on one core). Each pass is one elementwise op over the
# whole batch, which torch spreads over its own threads (parts on Python threads, as the step's
# torch path uses, measured slower here right after another torch op: see docs/benchmarks.md).
# Custom ops, so that torch.compile keeps them whole instead of re-deriving a slower graph.


@torch.library.custom_op("fastnca::perceive_cpu", mutates_args=(), device_types="cpu")
def _perceive_cpu_op(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    dt, k = acc_dtype(x.dtype), kernels()
    if k is not None:
        xc, taps = x.to(dt).contiguous(), taps_tensor(filters)
        out = k.perceive_forward(xc, taps, len(filters), _block_rows(W))
        return out.to(x.dtype)
    taps = filter_taps(filters)
    out = torch.empty((B, C, len(taps), H, W), dtype=dt)  # channel c*F + f = out[:, c, f]
    planes_into(circular_pad1(x.to(dt)), taps, [out[:, :, f] for f in range(len(taps))])
    return out.view(B, -1, H, W).to(x.dtype)


@_perceive_cpu_op.register_fake
def _(x, filters):
    B, C, H, W = x.shape
    return x.new_empty((B, C * filters.shape[0], H, W))


@torch.library.custom_op("fastnca::perceive_cpu_backward", mutates_args=(), device_types="cpu")
def _perceive_cpu_backward_op(grad_out: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    # dx = sum_f adjoint_f(grad[:, c*F + f]): taps scatter into a padded buffer, halo folded back.
    B, CF, H, W = grad_out.shape
    dt, k = acc_dtype(grad_out.dtype), kernels()
    if k is not None:
        g, taps = grad_out.to(dt).contiguous(), taps_tensor(filters)
        return k.perceive_backward(g, taps, len(filters), _block_rows(W)).to(grad_out.dtype)
    taps = filter_taps(filters)
    C = CF // len(taps)
    g = grad_out.reshape(B, C, len(taps), H, W).to(dt)
    acc = torch.zeros((B, C, H + 2, W + 2), dtype=dt)
    adjoint_into(acc, [g[:, :, f] for f in range(len(taps))], taps)
    return fold_circular(acc).to(grad_out.dtype).contiguous()


@_perceive_cpu_backward_op.register_fake
def _(grad_out, filters):
    B, CF, H, W = grad_out.shape
    return grad_out.new_empty((B, CF // filters.shape[0], H, W))


def _cpu_backward(ctx, grad_out):
    (filters,) = ctx.saved_tensors
    return torch.ops.fastnca.perceive_cpu_backward(grad_out, filters), None


_perceive_cpu_op.register_autograd(_cpu_backward, setup_context=_setup_context)


def perceive(x: torch.Tensor, filters: torch.Tensor | None = None) -> torch.Tensor:
    """Every channel of ``x`` convolved with every filter of ``filters``, circular padding 1.

    Args:
        x: (B, C, H, W) float16, bfloat16, float32 or float64; any H, W >= 1; any strides.
        filters: (F, 3, 3) cross-correlation kernels on x's device; default
            ``fastnca.reference.DEFAULT_FILTERS`` (identity, sobel_x, sobel_y, laplacian).

    Returns:
        (B, C*F, H, W) in x's dtype; channel ``c*F + f`` is filter ``f`` applied to channel ``c``.
        Differentiable with respect to ``x`` (not ``filters``: the bank is fixed, as in the lesson).
    """
    check_tensor("x", x, ndim=4)
    check_real_device("x", x, "perceive")
    check_channels("x", x)
    if filters is None:
        filters = DEFAULT_FILTERS.to(x.device)
    check_filters(filters, x)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
    if use_triton(x.device):
        return torch.ops.fastnca.perceive(x, filters.detach())
    if x.device.type == "cpu":
        return torch.ops.fastnca.perceive_cpu(x, filters.detach())
    return perceive_composite(x, filters.detach())


class Perception(nn.Module):
    """nn.Module wrapper of :func:`perceive` holding the filter bank as a (non-trained) buffer."""

    def __init__(self, filters: torch.Tensor | None = None):
        super().__init__()
        bank = DEFAULT_FILTERS if filters is None else torch.as_tensor(filters)
        if bank.dim() != 3 or tuple(bank.shape[1:]) != (3, 3):
            raise ValueError(f"filters must have shape (F, 3, 3), got {tuple(bank.shape)}")
        self.register_buffer("filters", bank.clone().float())

    @property
    def n_filters(self) -> int:
        return self.filters.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return perceive(x, self.filters)
