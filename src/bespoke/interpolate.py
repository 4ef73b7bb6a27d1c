"""Cubic Hermite interpolation: a C^1 curve through values and slopes at knots.

Used for ground truth at any time from cached dense trajectories (`train/trajectories.py`) and for
running a learned Bespoke transform on a finer grid (`solvers/scale_time.py`).
"""

from __future__ import annotations

import torch

from .errors import BespokeError

__all__ = ["hermite"]


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(*v.shape, *([1] * (ndim - v.dim())))


def hermite(grid: torch.Tensor, states: torch.Tensor, velocities: torch.Tensor, t: torch.Tensor):
    """(x(t), dx/dt(t)) of the cubic Hermite interpolant through (grid, states, velocities).

    grid: (K,) increasing times; states, velocities: (B, K, ...) per trajectory; t: (m,) query times in
    [grid[0], grid[-1]]. Returns two (B, m, ...) tensors.
    """
    if torch.any(t < grid[0]) or torch.any(t > grid[-1]):
        raise BespokeError(f"cannot interpolate outside the knots [{grid[0]:.6g}, {grid[-1]:.6g}]")
    j = torch.searchsorted(grid, t, right=True).clamp(1, len(grid) - 1) - 1  # interval [grid_j, grid_j+1]
    dt = grid[j + 1] - grid[j]
    w = (t - grid[j]) / dt
    # Hermite basis h00, h10, h01, h11 on [0, 1] and their derivatives
    h00, h10, h01, h11 = 2 * w**3 - 3 * w**2 + 1, w**3 - 2 * w**2 + w, -2 * w**3 + 3 * w**2, w**3 - w**2
    d00, d10, d01, d11 = 6 * w**2 - 6 * w, 3 * w**2 - 4 * w + 1, -6 * w**2 + 6 * w, 3 * w**2 - 2 * w
    x0, x1, v0, v1 = states[:, j], states[:, j + 1], velocities[:, j], velocities[:, j + 1]
    nd = x0.dim()
    c = lambda v: _bcast(v, nd - 1).to(x0.dtype)  # noqa: E731  (m,) -> (m, 1, ..., 1), batch broadcast in front
    x = c(h00) * x0 + c(h10 * dt) * v0 + c(h01) * x1 + c(h11 * dt) * v1
    dx = c(d00 / dt) * x0 + c(d10) * v0 + c(d01 / dt) * x1 + c(d11) * v1
    return x, dx
