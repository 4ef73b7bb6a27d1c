"""Bespoke Non-Stationary (BNS) solvers ([BNS] §3, spec §3.1-3.4): a learnable NS solver.

Parameters theta = (times, a, b), kept in float64 and cast to the state's dtype only when sampling:
    times   t_k = t_start + (t_end - t_start) * cumsum(exp(log_dt))_k / sum(exp(log_dt))
            (normalised cumulative sums of positive increments: monotone, ends pinned; spec §3.5)
    a       a_i, the weight of x_0 in step i
    b       b_ij, j <= i, the weights of the velocities (lower triangular)
Sampling is Algorithm 1, differentiable in theta (gradients reach the times through the network's
time input and the path coefficients), optionally in the preconditioned coordinates of spec §3.3
(sigma0 > 1). Degrees of freedom: (n - 1) + n + n(n + 1)/2 = n(n + 5)/2 - 1 (17/51/167 at n = 4/8/16).

A BNS solver starts as any dedicated solver: `BNSSolver.from_solver` compiles it to NS form
(spec §3.2) in the same coordinates, so at initialisation it *is* that solver.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BespokeError
from ..paths import Preconditioned, Scheduler, scale_time
from .base import Dedicated, Solver
from .learned import Learned, evaluator, pinned_times
from .nonstationary import NSSolver, Trace, run_ns

__all__ = ["BNSSolver", "preconditioned_frame", "run_bns"]

_TINY = 1e-30  # stands in for a zero time increment (repeated times, e.g. RK4's two midpoint stages)


def preconditioned_frame(scheduler: Scheduler | None, sigma0: float, r: torch.Tensor):
    """The scale-time values at grid points r onto the preconditioned path (spec §3.3), or None for sigma0 = 1."""
    if sigma0 == 1.0:
        return None
    if scheduler is None:
        raise BespokeError(
            "preconditioning (sigma0 != 1) needs the model's Gaussian path, but the flow has no scheduler; "
            "use sigma0 = 1 or build the flow with scheduler=..."
        )
    try:
        return scale_time(scheduler, Preconditioned(scheduler, sigma0), r)
    except BespokeError:
        raise BespokeError(
            f"preconditioning with sigma0 = {sigma0:g} needs a path whose SNR reaches 0 at t = 0 (FM paths such "
            f"as condot and cosine); {scheduler!r} does not, so use sigma0 = 1 for this model"
        ) from None


def run_bns(flow, noise, coefficients, start_scale: float, sigma0: float, cond: dict, checkpoint: bool = False):
    """Algorithm 1 with the (differentiable) float64 coefficients (times, a, b), in the preconditioned
    coordinates of spec §3.3 when sigma0 != 1; the path math on the CPU in float64, the weights cast to the
    state's dtype."""
    times, a, b = coefficients
    frame = preconditioned_frame(flow.scheduler, sigma0, times.cpu())
    a, b = a.to(noise.device, noise.dtype), b.to(noise.device, noise.dtype)
    if frame is not None:  # the times stay float64 for the flow; the coefficients take the state's dtype
        cast = lambda v: v.to(noise.device, noise.dtype)
        frame = type(frame)(t=frame.t, s=cast(frame.s), dt=cast(frame.dt), ds=cast(frame.ds))
    return run_ns(evaluator(flow, cond, checkpoint), noise, times, a, b, start_scale, frame)


class BNSSolver(Learned):
    """A learnable n-step NS solver; `.sample(flow, noise, **cond)` like every solver, NFE = n."""

    kind = "bns"

    def __init__(
        self,
        times,
        a,
        b,
        *,
        start_scale: float = 1.0,
        sigma0: float = 1.0,
        init: str = "custom",
        model_fingerprint: str | None = None,
        force: bool = False,
    ):
        super().__init__(init=init, model_fingerprint=model_fingerprint, force=force)
        ns = NSSolver(times, a, b, start_scale=start_scale)  # validates shapes, triangularity, monotone times
        self.sigma0 = float(sigma0)
        if not self.sigma0 > 0:
            raise BespokeError(f"sigma0 must be > 0 (1 = no preconditioning), got {sigma0}")
        self.start_scale = float(start_scale)
        self.register_buffer("t_ends", ns.times[[0, -1]].clone())
        self.register_buffer("mask", torch.tril(torch.ones_like(ns.b)))
        self.log_dt = nn.Parameter(torch.log(torch.diff(ns.times).clamp(min=_TINY)))
        self.a = nn.Parameter(ns.a.clone())
        self.b = nn.Parameter(ns.b.clone())

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_solver(cls, solver: Solver, flow, *, sigma0: float = 1.0) -> BNSSolver:
        """A BNS solver equal to `solver` on `flow` (run in the preconditioned coordinates if sigma0 != 1)."""
        from ..flows import scale_time_flow

        if sigma0 != 1.0 and not isinstance(solver, Dedicated):
            raise BespokeError(
                f"a preconditioned BNS solver (sigma0 = {sigma0:g}) starts from a built-in solver run in the "
                f"preconditioned coordinates; start from {solver.name} with sigma0 = 1 instead"
            )
        target = flow if sigma0 == 1.0 else scale_time_flow(flow, _preconditioned(flow, sigma0))
        ns = solver.to_ns(target)
        grid = getattr(solver, "grid_name", None)
        init = solver.name if grid is None else f"{solver.name}[{grid}]"
        return cls(ns.times, ns.a, ns.b, start_scale=ns.start_scale, sigma0=sigma0, init=init).bind_model(flow)

    # --- file state (solvers/files.py): the raw float64 parameters, so a loaded solver is bit-identical
    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = super().state_tensors()
        state["b"] = state["b"] * self.mask.cpu()  # only the lower triangle is a parameter
        return state

    def _state(self) -> dict[str, torch.Tensor]:
        return {"log_dt": self.log_dt, "a": self.a, "b": self.b, "t_ends": self.t_ends}

    def file_entry(self) -> dict:
        return {
            "kind": self.kind,
            "nfe": self.nfe,
            "init": self.init,
            "sigma0": self.sigma0,
            "start_scale": self.start_scale,
            "parameters": self.num_parameters,
            "times": [round(t, 12) for t in self.times().tolist()],  # for reading; the tensors are authoritative
            "training": self.training_summary,
        }

    @classmethod
    def state_shapes(cls, nfe: int) -> dict[str, tuple[int, ...]]:
        return {"log_dt": (nfe,), "a": (nfe,), "b": (nfe, nfe), "t_ends": (2,)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], entry: dict, model_fingerprint: str | None) -> BNSSolver:
        """The solver whose raw parameters are `state` (shapes as `state_shapes`, already checked)."""
        if torch.any(torch.triu(state["b"], diagonal=1) != 0):
            raise BespokeError("b is not lower triangular")
        times = pinned_times(state["log_dt"], state["t_ends"])
        solver = cls(
            times,
            state["a"],
            state["b"],
            start_scale=float(entry.get("start_scale", 1.0)),
            sigma0=float(entry.get("sigma0", 1.0)),
            init=str(entry.get("init", "custom")),
            model_fingerprint=model_fingerprint,
        )
        return solver.restored(state, entry)

    # --- the parameters as an NS solver -------------------------------------------------------
    @property
    def nfe(self) -> int:
        return self.a.numel()

    @property
    def name(self) -> str:
        return f"bns{self.nfe}"

    @property
    def num_parameters(self) -> int:
        """Degrees of freedom: n - 1 free times, n weights a_i, n(n+1)/2 weights b_ij."""
        n = self.nfe
        return (n - 1) + n + n * (n + 1) // 2

    def times(self) -> torch.Tensor:
        return pinned_times(self.log_dt, self.t_ends)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.times(), self.a, self.b * self.mask

    def __repr__(self):
        pre = f", sigma0={self.sigma0:g}" if self.sigma0 != 1.0 else ""
        return f"BNSSolver(nfe={self.nfe}, init={self.init!r}{pre})"

    # --- sampling -----------------------------------------------------------------------------
    def sample(self, flow, noise: torch.Tensor, *, checkpoint: bool = False, **cond) -> torch.Tensor:
        """Algorithm 1, differentiable in the parameters; checkpoint=True recomputes each network call
        in the backward pass instead of storing its activations (memory: the n velocities only)."""
        flow.check_noise(noise)
        self.check_model(flow)
        return run_bns(flow, noise, self.coefficients(), self.start_scale, self.sigma0, cond, checkpoint)

    def to_ns(self, target=None, ode_end: float = 1.0) -> NSSolver:
        """The plain NS form over the model's own velocity (compiling the preconditioned coordinates away)."""
        with torch.no_grad():
            times, a, b = (v.detach().clone() for v in self.coefficients())
        if self.sigma0 == 1.0:
            return NSSolver(times, a, b, start_scale=self.start_scale, name=f"{self.name}[ns]")
        scheduler = getattr(target, "scheduler", target)
        frame = preconditioned_frame(scheduler, self.sigma0, times)
        trace = Trace()
        out = run_ns(trace, trace.x0, times.tolist(), a.tolist(), b, self.start_scale, _float_frame(frame))
        return trace.to_ns(out, float(frame.t[-1]), f"{self.name}[ns]")


def _preconditioned(flow, sigma0: float) -> Preconditioned:
    preconditioned_frame(flow.scheduler, sigma0, torch.zeros(1, dtype=torch.float64))  # the clear error if unusable
    return Preconditioned(flow.scheduler, sigma0)


def _float_frame(frame):
    return type(frame)(*(v.tolist() for v in (frame.t, frame.s, frame.dt, frame.ds)))
