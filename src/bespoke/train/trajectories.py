"""Ground truth at any time from cached dense trajectories (spec §2.6), instead of a dopri5 solve per
iteration ([BES] calls that "rather naive").

A GT cache made with `trajectory=K` holds, per pair, the solution x(T_k) and the velocity u(T_k, x(T_k))
at K fixed times T_k (denser towards the data). Between two of them the trajectory is the cubic
Hermite interpolant of those values and slopes, accurate to O(dT^4) in the state and O(dT^3) in its
derivative, so ground truth at the learned times of a Bespoke solver costs a gather and a few
multiply-adds.
"""

from __future__ import annotations

import torch

from ..errors import BespokeError
from ..interpolate import hermite

__all__ = ["gt_at"]


def gt_at(cache, idx: torch.Tensor, t: torch.Tensor):
    """Ground truth (x(t), u(t, x(t))) of pairs `idx` of a GT cache with dense trajectories, at times t (m,).

    Times past the last stored time (a discrete-time model's ode_end < 1) are clamped to it."""
    if cache.trajectory_states is None:
        raise BespokeError(
            f"{cache.path} holds endpoints only; Bespoke training needs dense trajectories: make a cache with them "
            "in a new directory (`bespoke gt --model SPEC --num N --trajectory 65 --out NEW_DIR`; Python: "
            "generate_gt(..., trajectory=65))"
        )
    grid = cache.trajectory_times.to(t.device)
    tt = t.detach().to(torch.float64).clamp(0.0, float(grid[-1]))
    return hermite(grid, cache.trajectory_states[idx], cache.trajectory_velocities[idx], tt)
