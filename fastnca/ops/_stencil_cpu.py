"""CPU perception by shifted views: 3x3 filters as streaming passes, and their adjoint.

A 3x3 cross-correlation of a padded plane ``xp`` (..., H+2, W+2) with filter k is the sum over the
non-zero taps (a, e, v) of k of ``v * xp[..., a:a+H, e:e+W]``: one vectorised pass per tap over
views, no im2col and no convolution kernel (oneDNN's depthwise 3x3 measured about 3x slower than
these passes on one AVX2 core at (4, 12, 128, 128)). Used by the perceive and nca_step CPU paths.

The default bank (identity, sobel_x, sobel_y, laplacian) factorises with s = [1, 2, 1] and
d = [-1, 0, 1]: sobel_x = s (rows) x d (cols), sobel_y = d x s, laplacian = s x s - 16 delta. Its
four planes take 10 passes instead of the 21 of its taps (1 identity copy; 2 for the row-smoothed
plane v; 1 for sobel_x from v; 3 for the laplacian from v; 2 for the column-smoothed plane h; 1 for
sobel_y from h). Results differ from the tap order only by float rounding.
"""

from __future__ import annotations

import torch

from fastnca.reference import DEFAULT_FILTERS

Taps = list[list[tuple[int, int, float]]]


def filter_taps(filters: torch.Tensor) -> Taps:
    """Non-zero taps (a, e, value) of each (3, 3) filter, read on the host."""
    return [
        [(a, e, v) for a, row in enumerate(kf) for e, v in enumerate(row) if v != 0]
        for kf in filters.tolist()
    ]


DEFAULT_TAPS = filter_taps(DEFAULT_FILTERS)


def taps_tensor(filters: torch.Tensor) -> torch.Tensor:
    """The taps as the C++ kernels take them (kernels/stencil_cpu.h): (K, 4) float64 rows
    (filter, row, column, value)."""
    rows = [[f, a, e, v] for f, tf in enumerate(filter_taps(filters)) for a, e, v in tf]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _default_planes(xp, outs):
    # xp: (..., H+2, W+2); outs: identity, sobel_x, sobel_y, laplacian views (..., H, W).
    ident, sx, sy, lap = outs
    H, W = ident.shape[-2:]
    center = xp[..., 1 : H + 1, 1 : W + 1]
    ident.copy_(center)
    v = torch.add(xp[..., 0:H, :], xp[..., 2 : H + 2, :])  # s applied down the rows: (..., H, W+2)
    v.add_(xp[..., 1 : H + 1, :], alpha=2)
    torch.sub(v[..., 2:], v[..., :-2], out=sx)
    torch.add(v[..., :-2], v[..., 2:], out=lap)
    lap.add_(v[..., 1:-1], alpha=2).add_(center, alpha=-16)
    h = torch.add(xp[..., 0:W], xp[..., 2 : W + 2])  # s applied along the columns: (..., H+2, W)
    h.add_(xp[..., 1 : W + 1], alpha=2)
    torch.sub(h[..., 2:, :], h[..., :-2, :], out=sy)


def planes_into(xp: torch.Tensor, taps: Taps, outs: list[torch.Tensor]) -> None:
    """outs[f] (..., H, W) <- filter f on the padded planes xp (..., H+2, W+2)."""
    if taps == DEFAULT_TAPS:
        return _default_planes(xp, outs)
    H, W = outs[0].shape[-2:]
    for o, tf in zip(outs, taps, strict=True):
        if not tf:
            o.zero_()
            continue
        a, e, v = tf[0]
        torch.mul(xp[..., a : a + H, e : e + W], v, out=o)
        for a, e, v in tf[1:]:
            o.add_(xp[..., a : a + H, e : e + W], alpha=v)


def adjoint_into(acc: torch.Tensor, dps: list[torch.Tensor], taps: Taps) -> None:
    """acc (..., H+2, W+2) += adjoint of the filters applied to dps[f] (..., H, W): each tap
    scatters its plane back to the cells it read, ``acc[..., a:a+H, e:e+W] += v * dp``."""
    H, W = dps[0].shape[-2:]
    for dp, tf in zip(dps, taps, strict=True):
        for a, e, v in tf:
            acc[..., a : a + H, e : e + W].add_(dp, alpha=v)


def fold_circular(acc: torch.Tensor) -> torch.Tensor:
    """Fold the one-cell halo of acc (..., H+2, W+2) back onto the opposite edges (the adjoint of
    circular padding) and return the (..., H, W) interior view. Rows first, so corners land too."""
    H, W = acc.shape[-2] - 2, acc.shape[-1] - 2
    acc[..., 1, :].add_(acc[..., H + 1, :])
    acc[..., H, :].add_(acc[..., 0, :])
    acc[..., 1 : H + 1, 1].add_(acc[..., 1 : H + 1, W + 1])
    acc[..., 1 : H + 1, W].add_(acc[..., 1 : H + 1, 0])
    return acc[..., 1 : H + 1, 1 : W + 1]
