"""The Solver interface and the dedicated-solver shell shared by every built-in method.

A built-in solver is a *program*: a short function `program(ev, times, scheduler) -> x` written
with the method's own update formulas, where `ev(t, x)` returns the velocity and `ev.x0` is the
initial noise. Run against the flow (`_Evaluate`) it samples; run against a `Trace` it compiles to
the NS form (spec §3.2). The same lines of math serve both, so the NS form is the method itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import BespokeError

__all__ = ["Solver", "Dedicated", "validate_times"]


def validate_times(times: list[float]) -> None:
    """A time grid must lie in [0, 1], never go back, and move forward overall."""
    if any(math.isnan(t) for t in times):
        raise BespokeError("the time grid contains NaN")
    if times[0] < 0 or times[-1] > 1:
        raise BespokeError(f"times must lie in [0, 1] (0 = noise, 1 = data); got {times[0]:.6g} .. {times[-1]:.6g}")
    back = [i for i in range(len(times) - 1) if times[i + 1] < times[i]]
    if back:
        i = back[0]
        raise BespokeError(
            f"the time grid is not monotone: t[{i}] = {times[i]:.6g} > t[{i + 1}] = {times[i + 1]:.6g}; "
            "times must increase from noise (0) to data (1)"
        )
    if times[-1] <= times[0]:
        raise BespokeError("the time grid must end after it starts")


class Solver:
    """What users hold: `.nfe`, `.sample(flow, noise, **cond)`, and `.to_ns(...)` where linear."""

    name: str  # set by every solver
    nfe: int  # network evaluations per sample

    def sample(self, flow, noise: torch.Tensor, **cond) -> torch.Tensor:
        raise NotImplementedError

    def to_ns(self, scheduler=None, ode_end: float = 1.0):
        raise BespokeError(f"{self.name} is not linear in its history, so it has no NS form")


class _Evaluate:
    """Runs a program on tensors: ev(t, x) is the flow's velocity, ev.x0 the noise."""

    def __init__(self, flow, noise, cond):
        self.flow, self.x0, self.cond = flow, noise, cond

    def __call__(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return self.flow(t, x, **self.cond)


@dataclass
class Dedicated(Solver):
    """A built-in solver: a program over a time grid with `steps` intervals.

    grid: fn(steps, scheduler, ode_end) -> list of steps + 1 times (see `grids.py`); a solver built
    with explicit times holds a function that returns them.
    """

    name: str
    nfe: int
    steps: int
    program: Callable
    grid: Callable
    grid_name: str
    needs_scheduler: bool = False
    options: dict = field(default_factory=dict)

    def __repr__(self):
        return f"solver({self.name!r}, nfe={self.nfe}, grid={self.grid_name!r})"

    def times(self, scheduler=None, ode_end: float = 1.0) -> list[float]:
        if self.needs_scheduler and scheduler is None:
            raise BespokeError(
                f"{self.name} needs the model's Gaussian path (alpha_t, sigma_t), but the flow has "
                "no scheduler; build it with scheduler=... or use euler, midpoint, heun, rk4 or ipndm"
            )
        cached = self.__dict__.get("_grid_cache")
        if cached is not None and cached[0] is scheduler and cached[1] == ode_end:
            return list(cached[2])  # a log-SNR or EDM grid on a discrete VP path costs a bisection per time
        times = self.grid(self.steps, scheduler, ode_end)
        validate_times(times)
        self.__dict__["_grid_cache"] = (scheduler, ode_end, tuple(times))
        return times

    def sample(self, flow, noise, **cond):
        flow.check_noise(noise)
        times = self.times(flow.scheduler, flow.ode_end)
        return self.program(_Evaluate(flow, noise, cond), times, flow.scheduler)

    def to_ns(self, target=None, ode_end: float = 1.0):
        """The NS form (times, a, b) of this solver (spec §3.2).

        target: the Flow it will sample, or just that flow's Scheduler (the coefficients of DDIM,
        DPM-Solver++, UniPC and the log-SNR/EDM grids depend on the path); None for a solver that
        needs neither.
        """
        from ..flows import Flow
        from .nonstationary import compile_ns

        scheduler = target
        if isinstance(target, Flow):
            scheduler, ode_end = target.scheduler, target.ode_end
        return compile_ns(self.program, self.times(scheduler, ode_end), scheduler, f"{self.name}[ns]")
