"""Position tables moved to a new window or grid: V1 bias tables (the official bicubic recipe, and the official
SimMIM fine-tune's geometric spline), and the absolute position embedding."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError


def resize_bias_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """((2M-1)^2, heads) -> ((2M'-1)^2, heads), exactly as the official `load_pretrained`:
    per head, the table as a (2M-1)x(2M-1) image, torch bicubic, align_corners=False."""
    L1, heads = table.shape
    S1, S2 = math.isqrt(L1), math.isqrt(new_len)
    if S1 * S1 != L1 or S2 * S2 != new_len:
        raise CheckpointError(f"bias table of {L1} rows -> {new_len}: only square windows can be resized")
    img = table.float().permute(1, 0).reshape(1, heads, S1, S1)
    out = F.interpolate(img, size=(S2, S2), mode="bicubic")
    return out.reshape(heads, new_len).permute(1, 0).contiguous().to(table.dtype)


def geometric_positions(src_size: int, dst_size: int) -> tuple[list[float], "np.ndarray"]:
    """The official SimMIM fine-tune's sample positions (`utils_simmim.remap_pretrained_keys_swin`): the
    pretrained table's offsets spaced by a geometric progression whose sum reaches the new half-width,
    and the new table's integer offsets."""
    def gp(a: float, r: float, n: int) -> float:
        return a * (1.0 - r ** n) / (1.0 - r)
    left, right = 1.01, 1.5
    while right - left > 1e-6:  # the same bisection as the official, float for float
        q = (left + right) / 2.0
        if gp(1, q, src_size // 2) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = [-d for d in reversed(dis)] + [0.0] + dis
    t = dst_size // 2.0
    return x, np.arange(-t, t + 0.1, 1.0)


def spline_matrix(x: Sequence[float], t: "np.ndarray") -> "np.ndarray":
    """(len(t), len(x)) float64: the cubic interpolating spline through (x, y) with not-a-knot ends, evaluated
    at t (clamped to [x0, xn]), as a linear map of y. This is FITPACK's s=0, k=3 spline, which SciPy's removed
    `interp2d(kind='cubic')` fitted on a grid; on a grid the 2-D spline is this map along each axis."""
    x = np.asarray(x, dtype=np.float64)
    n, h = len(x), np.diff(x)
    if n < 4:
        raise ValueError(f"a not-a-knot cubic spline needs at least 4 points, got {n}")
    A, R = np.zeros((n, n)), np.zeros((n, n))  # A @ M = R @ y for the second derivatives M
    A[0, :3] = -h[1], h[0] + h[1], -h[0]  # third derivative continuous at x1 ...
    A[-1, -3:] = -h[-1], h[-2] + h[-1], -h[-2]  # ... and at x_{n-2}
    for i in range(1, n - 1):
        A[i, i - 1:i + 2] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        R[i, i - 1:i + 2] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    M = np.linalg.solve(A, R)
    t = np.clip(np.asarray(t, dtype=np.float64), x[0], x[-1])
    out = np.zeros((len(t), n))
    for r, v in enumerate(t):
        i = int(min(max(np.searchsorted(x, v, side="right") - 1, 0), n - 2))
        hi, a, b = h[i], x[i + 1] - v, v - x[i]
        out[r] = M[i] * (a ** 3 / (6 * hi) - hi * a / 6) + M[i + 1] * (b ** 3 / (6 * hi) - hi * b / 6)
        out[r, i] += a / hi
        out[r, i + 1] += b / hi
    return out


def resize_bias_table_geometric(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """((2M-1)^2, heads) -> ((2M'-1)^2, heads) as the official SimMIM fine-tune: per head, the table sampled
    at geometrically spaced offsets and re-sampled at the new integer offsets by a bicubic spline."""
    L1, heads = table.shape
    S1, S2 = math.isqrt(L1), math.isqrt(new_len)
    if S1 * S1 != L1 or S2 * S2 != new_len:
        raise CheckpointError(f"bias table of {L1} rows -> {new_len}: only square windows can be resized")
    if S1 < 4:  # too small a table for the spline: the plain bicubic resize
        return resize_bias_table(table, new_len)
    x, t = geometric_positions(S1, S2)
    a = torch.from_numpy(spline_matrix(x, t))
    z = table.double().t().reshape(heads, S1, S1)
    out = a @ z @ a.t()  # rows (y) and columns (x) share the positions
    return out.reshape(heads, new_len).t().contiguous().float().to(table.dtype)


def resize_abs_pos_embed(pe: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, S*S, C) -> (1, gh*gw, C), bicubic as the official `load_pretrained`."""
    _, L1, C = pe.shape
    S1 = math.isqrt(L1)
    if S1 * S1 != L1:
        raise CheckpointError(f"absolute_pos_embed of {L1} positions is not a square grid")
    img = pe.float().reshape(1, S1, S1, C).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=grid, mode="bicubic")
    return out.permute(0, 2, 3, 1).flatten(1, 2).contiguous().to(pe.dtype)
