"""Bespoke scale-time solvers ([BES], spec §2): a base RK method with n uniform steps in a new time r,
applied to the scale-time transformed field (spec §1.4)

    x_bar(r) = s_r x(t_r),     u_bar_r(x_bar) = (s'_r / s_r) x_bar + t'_r s_r u_{t_r}(x_bar / s_r),

with the transform learned at the few points the base method looks at: the grid r_k = k / (order n),
k = 0..order n (RK2's half points included). Per point the solver holds t_k, t'_k, s_k, s'_k; the
steps below are the base method on u_bar written back in x-space (Eqs. 17, 19-20), so every step is a
linear combination of the state and one velocity and the solver compiles to NS form (spec §3.2).

Constraints (§2.3, Eqs. 18, 21): t monotone with t_0 = 0, t_N = 1 pinned (normalised cumulative sums
of exp(log increments)); t' = exp(.) > 0; s = exp(.) > 0 with s_0 = 1; s' free. t' and s' at the last
point are never used. Degrees of freedom: 4n - 1 (RK1), 8n - 1 (RK2).

Being an ST transform of the base method, the solver keeps the base method's order (Thm 2.2):
`refined(steps)` runs the same transform (C^1 Hermite interpolation of t and s through the learned
values and slopes) with more steps and converges to the model's own samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BespokeError
from ..interpolate import hermite
from ..paths import Scheduler, scale_time, scheduler_from_name
from .learned import Learned, evaluator, pinned_times
from .nonstationary import NSSolver, Trace

__all__ = [
    "BespokeSolver",
    "ScaleTimeSampling",
    "Transform",
    "rk1_step",
    "rk2_step",
    "run_bespoke",
    "step_lipschitz",
    "bound_weights",
]


@dataclass(frozen=True)
class Transform:
    """The scale-time transform at the grid points r_k = k / (N - 1): t, s of shape (N,); dt = t', ds = s'
    (N - 1 values: the last point's are never used). `t` stays float64 for the model's time input."""

    t: torch.Tensor
    dt: torch.Tensor
    s: torch.Tensor
    ds: torch.Tensor

    def cast(self, like: torch.Tensor, stacked: bool = False) -> Transform:
        """The coefficients in the state's dtype/device; stacked=True shapes them (N, 1, ..., 1) for a stack
        of states (n, batch, ...) that takes all steps at once (g then indexes with a LongTensor)."""
        shape = (-1,) + (1,) * (like.dim() - 1) if stacked else (-1,)
        c = lambda v: v.to(like.device, like.dtype).reshape(shape)  # noqa: E731
        return Transform(t=self.t, dt=c(self.dt), s=c(self.s), ds=c(self.ds))


# --- the steps (x-space, spec §2.2); g indexes the step's first grid point, h = 1/n ---------------------
# They work on tensors, on stacks of states (g a LongTensor: all steps at once) and on `Lin` values.


def rk1_step(ev, x, v: Transform, g, h: float):
    """RK1-Bespoke (Eq. 17): x_{i+1} = ((s_i + h s'_i) / s_{i+1}) x_i + (h t'_i s_i / s_{i+1}) u_{t_i}(x_i)."""
    s0, s1 = v.s[g], v.s[g + 1]
    return ((s0 + h * v.ds[g]) / s1) * x + (h * v.dt[g] * s0 / s1) * ev(v.t[g], x)


def rk2_step(ev, x, v: Transform, g, h: float):
    """RK2-Bespoke, midpoint (Eqs. 19-20); g + 1 is the half point r_i + h/2, z the midpoint state:
    z       = ((s_i + (h/2) s'_i) / s_m) x_i + ((h/2) t'_i s_i / s_m) u_{t_i}(x_i)
    x_{i+1} = (s_i / s_{i+1}) x_i + (h / s_{i+1}) (s'_m z + t'_m s_m u_{t_m}(z))."""
    s0, sm, s1 = v.s[g], v.s[g + 1], v.s[g + 2]
    z = ((s0 + 0.5 * h * v.ds[g]) / sm) * x + (0.5 * h * v.dt[g] * s0 / sm) * ev(v.t[g], x)
    return (s0 / s1) * x + (h / s1) * (v.ds[g + 1] * z + (v.dt[g + 1] * sm) * ev(v.t[g + 1], z))


STEPS = {1: rk1_step, 2: rk2_step}
BASE = {1: "euler", 2: "midpoint"}


def run_bespoke(ev, x0, v: Transform, order: int, steps: int):
    """Bespoke sampling: x <- x_0, then `steps` steps of the base method on u_bar (s_0 = 1, so x-space
    needs no scaling in or out: the s ratios sit inside the step coefficients)."""
    x = x0
    for i in range(steps):
        x = STEPS[order](ev, x, v, order * i, 1.0 / steps)
    return x


def step_lipschitz(v: Transform, order: int, steps: int, lipschitz_u: float = 1.0) -> torch.Tensor:
    """L_{i+1}, the Lipschitz constant of step i (x_i -> x_{i+1}), for a field of Lipschitz constant L_tau
    (App. D, Lemmas D.2/D.3): with L_bar_k = |s'_k| / s_k + t'_k L_tau,
    RK1: (s_i / s_{i+1}) (1 + h L_bar_i),  RK2: (s_i / s_{i+1}) (1 + h L_bar_m (1 + (h/2) L_bar_i))."""
    h = 1.0 / steps
    lbar = v.ds.abs() / v.s[:-1] + v.dt * lipschitz_u
    g = torch.arange(steps) * order
    ratio = v.s[g] / v.s[g + order]
    if order == 1:
        return ratio * (1 + h * lbar[g])
    return ratio * (1 + h * lbar[g + 1] * (1 + 0.5 * h * lbar[g]))


def bound_weights(lipschitz: torch.Tensor) -> torch.Tensor:
    """M_i = prod_{j > i} L_j (M_n = 1): the weight of step i's local error in e_n <= sum_i M_i d_i (Eq. 26)."""
    later = torch.flip(torch.cumprod(torch.flip(lipschitz[1:], [0]), 0), [0])
    return torch.cat([later, torch.ones_like(lipschitz[:1])])


# --- the learnable solver ------------------------------------------------------------------------------

INITS = ("identity", "condot", "ddim", "cosine", "vp", "edm")


class ScaleTimeSampling:
    """Sampling, NS form and step Lipschitz constants of a scale-time solver, from its `transform()` (the
    transform at the order * steps + 1 grid points), `order`, `steps` and `name`: shared by the fixed-NFE
    solver below and the NFE-agnostic one (solvers/bespoke_range.py)."""

    order: int

    def transform(self) -> Transform:
        raise NotImplementedError

    def lipschitz(self, lipschitz_u: float = 1.0) -> torch.Tensor:
        return step_lipschitz(self.transform(), self.order, self.steps, lipschitz_u)

    # --- sampling -----------------------------------------------------------------------------------
    def sample(self, flow, noise: torch.Tensor, *, checkpoint: bool = False, **cond) -> torch.Tensor:
        """Differentiable in the parameters; checkpoint=True keeps no network activations (global-RMSE loss)."""
        flow.check_noise(noise)
        self.check_model(flow)
        v = self.transform().cast(noise)
        return run_bespoke(evaluator(flow, cond, checkpoint), noise, v, self.order, self.steps)

    def to_ns(self, target=None, ode_end: float = 1.0) -> NSSolver:
        """The NS form (spec §3.2): RK1 is a one-step update, RK2 two NS steps per step (z at t_m)."""
        with torch.no_grad():
            v = self.transform()
        v = Transform(*(x.tolist() for x in (v.t, v.dt, v.s, v.ds)))
        trace = Trace()
        out = run_bespoke(trace, trace.x0, v, self.order, self.steps)
        return trace.to_ns(out, 1.0, f"{self.name}[ns]")


class BespokeSolver(ScaleTimeSampling, Learned):
    """RK1- or RK2-Bespoke with NFE = order * steps; `.sample(flow, noise, **cond)` like every solver."""

    def __init__(self, order: int, transform: Transform, *, init="identity", model_fingerprint=None, force=False):
        super().__init__(init=init, model_fingerprint=model_fingerprint, force=force)
        if order not in STEPS:
            raise BespokeError(f"a Bespoke solver's base method is RK1 (euler) or RK2 (midpoint); got order {order}")
        t, dt, s, ds = (
            torch.as_tensor(x, dtype=torch.float64) for x in (transform.t, transform.dt, transform.s, transform.ds)
        )
        n = t.numel() - 1
        if n < order or n % order or s.shape != t.shape or dt.shape != (n,) or ds.shape != (n,):
            raise BespokeError(
                f"an RK{order}-Bespoke solver needs t and s at order * steps + 1 grid points and t', s' at all but "
                f"the last; got {t.numel()}, {s.numel()}, {dt.numel()}, {ds.numel()} values"
            )
        if torch.any(torch.diff(t) <= 0) or t[0] != 0 or t[-1] != 1 or torch.any(dt <= 0) or torch.any(s <= 0):
            raise BespokeError("a Bespoke transform needs 0 = t_0 < ... < t_N = 1, t' > 0 and s > 0 (spec §2.3)")
        self.order = order
        self.register_buffer("t_ends", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.log_dt = nn.Parameter(torch.log(torch.diff(t)))
        self.log_tdot = nn.Parameter(torch.log(dt))
        self.log_s = nn.Parameter(torch.log(s[1:] / s[0]))  # s_0 = 1: scaling all s, s' by one constant changes no step
        self.sdot = nn.Parameter(ds / s[0])

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def identity(cls, order: int, nfe: int) -> BespokeSolver:
        """t_r = r, s_r = 1: the base method (Euler / midpoint) on the uniform grid."""
        n = _grid_points(order, nfe) - 1
        one = torch.ones(n, dtype=torch.float64)
        t = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
        return cls(order, Transform(t=t, dt=one, s=torch.ones(n + 1, dtype=torch.float64), ds=0 * one))

    @classmethod
    def from_path(cls, flow_or_scheduler, target, order: int, nfe: int) -> BespokeSolver:
        """The base method with uniform steps on the model seen through the Gaussian path `target`
        (Thm 2.3): t_r = rho^{-1}(rho_bar(r)), s_r = sigma_bar_r / sigma_{t_r}. target: a Scheduler or one of
        condot (alias ddim: RK1 on it is DDIM on the grid of uniform OT time), cosine, vp, edm (EDM's rho = 7
        schedule to sigma = 0, from sigma_max = 80). Ends are pinned to t = 0, 1 and s normalised to s_0 = 1."""
        source = getattr(flow_or_scheduler, "scheduler", flow_or_scheduler)
        if not isinstance(source, Scheduler):
            raise BespokeError("starting a Bespoke solver from a noise schedule needs the model's Gaussian path")
        name = target if isinstance(target, str) else repr(target)
        target = _target_path(target)
        r = torch.linspace(0.0, 1.0, _grid_points(order, nfe), dtype=torch.float64)
        st = scale_time(source, target, r, clamp=True)
        t = st.t.clone()
        t[0], t[-1] = 0.0, 1.0
        v = Transform(t=t, dt=st.dt[:-1], s=st.s / st.s[0], ds=st.ds[:-1] / st.s[0])
        solver = cls(order, v, init=name)
        if hasattr(flow_or_scheduler, "fingerprint"):  # a flow, not a bare scheduler
            solver.bind_model(flow_or_scheduler)
        return solver

    # --- the parameters as a transform --------------------------------------------------------------
    @property
    def kind(self) -> str:
        return f"bespoke-rk{self.order}"

    @property
    def nfe(self) -> int:
        return self.log_dt.numel()

    @property
    def steps(self) -> int:
        return self.nfe // self.order

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.nfe}"

    @property
    def num_parameters(self) -> int:
        """Degrees of freedom (§2.3): N - 2 interior times, N - 1 each of t', s (s_0 = 1) and s': 4n - 1 / 8n - 1."""
        return (self.nfe - 1) + 3 * self.nfe

    def times(self) -> torch.Tensor:
        return pinned_times(self.log_dt, self.t_ends)

    def transform(self) -> Transform:
        s = torch.cat([torch.ones_like(self.log_s[:1]), torch.exp(self.log_s)])
        return Transform(t=self.times(), dt=torch.exp(self.log_tdot), s=s, ds=self.sdot)

    def __repr__(self):
        return f"BespokeSolver(RK{self.order}, nfe={self.nfe}, init={self.init!r})"

    def refined(self, steps: int) -> BespokeSolver:
        """The same transform (t and s as C^1 Hermite cubics through the learned values and slopes) on
        `steps` steps: the base method's order of convergence to the model's own samples (Thm 2.2)."""
        with torch.no_grad():
            v = self.transform()
        knots = torch.linspace(0.0, 1.0, v.t.numel(), dtype=torch.float64)
        r = torch.linspace(0.0, 1.0, self.order * steps + 1, dtype=torch.float64)
        t, dt = _hermite_curve(knots, v.t, v.dt, r)
        s, ds = _hermite_curve(knots, v.s, v.ds, r)
        t[0], t[-1] = 0.0, 1.0
        out = type(self)(
            self.order,
            Transform(t=t, dt=dt[:-1], s=s, ds=ds[:-1]),
            init=f"{self.name} refined",
            model_fingerprint=self.model_fingerprint,
            force=self.force,
        )
        out.model_guidance = self.model_guidance
        return out

    # --- file state (solvers/files.py) ----------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return {"log_dt": self.log_dt, "log_tdot": self.log_tdot, "log_s": self.log_s, "sdot": self.sdot}

    @classmethod
    def state_shapes(cls, nfe: int) -> dict[str, tuple[int, ...]]:
        return {"log_dt": (nfe,), "log_tdot": (nfe,), "log_s": (nfe,), "sdot": (nfe,)}

    def file_entry(self) -> dict:
        return {
            "kind": self.kind,
            "nfe": self.nfe,
            "base": BASE[self.order],
            "steps": self.steps,
            "init": self.init,
            "parameters": self.num_parameters,
            "times": [round(t, 12) for t in self.times().tolist()],  # for reading; the tensors are authoritative
            "training": self.training_summary,
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], entry: dict, model_fingerprint: str | None) -> BespokeSolver:
        order = int(str(entry["kind"]).removeprefix("bespoke-rk"))
        nfe = state["log_dt"].numel()
        solver = cls.identity(order, nfe)
        solver.init, solver.model_fingerprint = str(entry.get("init", "custom")), model_fingerprint
        return solver.restored(state, entry)


def _grid_points(order: int, nfe: int) -> int:
    if order not in STEPS:
        raise BespokeError(f"a Bespoke solver's base method is RK1 (euler) or RK2 (midpoint); got order {order}")
    if not isinstance(nfe, int) or nfe < order or nfe % order:
        raise BespokeError(
            f"RK{order}-Bespoke takes {order} evaluations per step, so NFE must be a multiple of {order}; got {nfe}"
        )
    return nfe + 1


def _target_path(target) -> Scheduler:
    from ..paths import EDM

    if isinstance(target, Scheduler):
        return target
    if target == "ddim":
        target = "condot"
    if target == "edm":
        return EDM(sigma_min=0.0, sigma_max=80.0, rho=7.0)
    if target not in INITS:
        raise BespokeError(f"unknown Bespoke initialisation {target!r}; valid: {', '.join(INITS)} or a Scheduler")
    return scheduler_from_name(target)


def _hermite_curve(knots, values, slopes, r):
    """A C^1 curve through (knots, values) with the given slopes at all knots but the last; there the slope
    makes the last piece a quadratic (2 secant - slope), since the last point's slope is never learned."""
    last = 2 * (values[-1] - values[-2]) / (knots[-1] - knots[-2]) - slopes[-1]
    x, dx = hermite(knots, values[None], torch.cat([slopes, last[None]])[None], r)
    return x[0], dx[0]
