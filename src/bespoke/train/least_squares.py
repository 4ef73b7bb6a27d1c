"""The best BNS coefficients for given times, step by step in closed form, from dense GT trajectories.

Step i of an NS solver (Eq. 11) is linear in its coefficients:

    x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j,        u_j = u(t_j, x_j) at the solver's own states.

So, going forward along the solver's own states, the row (a_i, b_i0..b_ii) that brings x_{i+1} closest
to the ground truth x(t_{i+1}) over the training pairs is a least-squares problem with i + 2 unknowns:

    min  sum_pairs || x(t_{i+1}) - a_i x_0 - sum_{j<=i} b_ij u_j ||^2

Fit row 0, step every pair to x_1 with it, evaluate u_1 there, fit row 1, ... : n network calls per
pair in all (one sampling pass), no back-propagation. The last row minimises the final MSE against the
GT samples given the chain before it. Intermediate targets x(t_i) come from the cached dense
trajectories (`trajectories.py`). In the preconditioned coordinates (sigma0 != 1) the same holds for
x_bar = s_r x(t_r) and u_bar = (s'/s) x_bar + t' s u(t, x) (spec §3.3).

This is the multistep method that tracks the GT best at those times. It starts BNS training far above
the dedicated solver whose times it keeps (zoo:digits-ot, NFE 8, 256 pairs, about 4 s: midpoint 43.8 dB,
refit 47.1 dB, as far as 300 Adam steps from midpoint go). Feeding each step the GT states instead of
its own ("teacher forcing") fits worse (46.1 dB): the solver's own states drift from the GT.
"""

from __future__ import annotations

import torch

from ..errors import BespokeError
from ..solvers.bns import BNSSolver, preconditioned_frame
from .pairs import cond_of
from .trajectories import gt_at

__all__ = ["least_squares_coefficients", "has_trajectories"]


def has_trajectories(pairs) -> bool:
    return getattr(pairs, "trajectory_states", None) is not None


def _frame_values(times: torch.Tensor, frame, dtype):
    """(model times, s, s', t') at the grid points; the identity map without preconditioning."""
    if frame is None:
        one = torch.ones_like(times, dtype=dtype)
        return times, one, torch.zeros_like(one), one
    return frame.t, frame.s.to(dtype), frame.ds.to(dtype), frame.dt.to(dtype)


def least_squares_coefficients(
    flow, solver: BNSSolver, pairs, *, max_pairs: int = 256, chunk: int = 128, ridge: float = 1e-10
) -> BNSSolver:
    """A BNS solver with `solver`'s times (and sigma0) and, row by row along its own states, the coefficients
    that bring each step closest to the GT on the first `max_pairs` of `pairs` (a GT cache with dense
    trajectories)."""
    if not has_trajectories(pairs):
        raise BespokeError("least-squares coefficients need a GT cache with dense trajectories (trajectory=K)")
    with torch.no_grad():
        times = solver.times().detach().cpu()
    idx = torch.arange(min(max_pairs, len(pairs)))
    noise, cond = pairs.noise[idx], cond_of(pairs, idx)
    t, s, ds, dt = _frame_values(times, preconditioned_frame(flow.scheduler, solver.sigma0, times), noise.dtype)
    n = len(times) - 1
    inner, _ = gt_at(pairs, idx, t[1:-1])
    target = torch.cat([inner.to(noise.dtype), pairs.samples[idx].to(noise.dtype)[:, None]], 1)  # x(t_1)..x(t_n)
    x0_bar = s[0] * noise
    f = torch.empty(n + 1, x0_bar.numel(), dtype=torch.float64, device=noise.device)  # x_bar_0, u_bar_0, u_bar_1..
    f[0] = x0_bar.flatten()
    gram = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # <f_k, f_l>, one row and column more per step
    gram[0, 0] = f[0] @ f[0]
    x = solver.start_scale * x0_bar
    a, b = torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        with torch.no_grad():  # u_bar_i = (s'/s) x_bar + t' s u(t, x_bar / s), the network in chunks
            u = torch.cat([flow(t[i], xc / s[i], **_rows(cond, c)) for c, xc in _chunks(x, chunk)])
        f[i + 1] = ((ds[i] / s[i]) * x + dt[i] * s[i] * u).flatten()
        gram[i + 1, : i + 2] = gram[: i + 2, i + 1] = (f[: i + 2] @ f[i + 1]).cpu()
        g = gram[: i + 2, : i + 2]
        g = g + ridge * g.diagonal().mean() * torch.eye(i + 2, dtype=g.dtype)
        row = torch.linalg.solve(g, (f[: i + 2] @ (s[i + 1] * target[:, i]).flatten().double()).cpu())
        a[i], b[i, : i + 1] = row[0], row[1:]
        x = (row.to(f.device) @ f[: i + 2]).reshape(x.shape).to(x.dtype)  # every pair's x_bar_{i+1}
    fitted = BNSSolver(
        times.double(), a, b, start_scale=solver.start_scale, sigma0=solver.sigma0, init=f"{solver.init}+lsq"
    )
    with torch.no_grad():  # the very same times: the raw parameters, not their round trip through the grid
        fitted.log_dt.copy_(solver.log_dt)
    return fitted.bind_model(flow).to(solver.a.device)


def _chunks(x: torch.Tensor, size: int):
    for start in range(0, x.shape[0], size):
        yield slice(start, start + size), x[start : start + size]


def _rows(cond: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in cond.items()}
