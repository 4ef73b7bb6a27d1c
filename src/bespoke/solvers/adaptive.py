"""Ground truth: the flow ODE solved by torchdiffeq's adaptive dopri5 (RK45) in float64.

The ODE runs from t = 0 to the flow's `ode_end`; if that is before t = 1 (a discrete-timestep
diffusion model stops at its smallest training timestep), the sample is the data prediction there,
x1_hat = (sigma u - sigma' x) / D, at the cost of one more NFE (DESIGN §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BespokeError

__all__ = ["GroundTruth", "ground_truth"]


@dataclass
class GroundTruth:
    """samples: x(1) (float64); nfe: evaluations used for the whole batch; states: x at `times`."""

    samples: torch.Tensor
    nfe: int
    rtol: float
    atol: float
    times: torch.Tensor | None = None
    states: torch.Tensor | None = None

    def settings(self) -> dict:
        return {"solver": "dopri5", "rtol": self.rtol, "atol": self.atol, "nfe": self.nfe}


def ground_truth(
    flow, noise: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5, times=None, **cond
) -> GroundTruth:
    """Solve the flow from `noise` with dopri5; optionally also return the states at `times`."""
    from torchdiffeq import odeint  # imported here: it pulls in scipy, which `import bespoke` needn't pay for

    flow.check_noise(noise)
    if not (rtol > 0 and atol > 0):
        raise BespokeError(f"rtol and atol must be > 0, got {rtol}, {atol}")
    end = flow.ode_end
    req = None
    if times is not None:
        req = torch.as_tensor(times, dtype=torch.float64).flatten()
        if req.numel() == 0 or req.min() < 0 or req.max() > end or torch.any(req[1:] <= req[:-1]):
            raise BespokeError(f"times must be strictly increasing in [0, {end:g}]")
    grid = (
        torch.tensor([0.0, end], dtype=torch.float64)
        if req is None
        else torch.unique(torch.cat([req, torch.tensor([0.0, end], dtype=torch.float64)]))
    )

    def rhs(t, x):
        return flow(t, x, **cond).to(torch.float64)

    x0 = noise.detach().to(torch.float64)
    with torch.no_grad(), flow.counting() as count:
        # step_t makes dopri5 land exactly on the end instead of stepping past it and interpolating
        # back, and a given first step skips torchdiffeq's initial-step probe, which can evaluate far
        # outside [0, 1]: the field is never evaluated beyond ode_end. States at intermediate `times`
        # come from dopri5's dense output (4th order), so asking for them costs no extra steps.
        grid = grid.to(x0.device)
        options = {"step_t": torch.tensor([end], dtype=torch.float64, device=x0.device), "first_step": 1e-3 * end}
        path = odeint(rhs, x0, grid, rtol=rtol, atol=atol, method="dopri5", options=options)
        x_end = path[-1]
        if end < 1.0:
            u = rhs(torch.tensor(end, dtype=torch.float64), x_end)
            x_end = flow.predict("x1", end, x_end, u)
    states = None
    if req is not None:
        index = torch.searchsorted(grid, req)
        states = path[index]
    return GroundTruth(samples=x_end, nfe=count.nfe, rtol=rtol, atol=atol, times=req, states=states)
