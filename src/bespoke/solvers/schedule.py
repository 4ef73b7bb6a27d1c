"""Learned schedules: a built-in solver on a learned time grid that serves every step count in a range.

A schedule is a monotone map of the grid fraction f in [0, 1] to canonical time, for each NFE n of a range
[lo, hi],
    t_n(f) = Phi(w_n(f)),     t_i = t_n(i / n) at n steps (n evaluations' worth of steps),
where Phi is one of the fixed grids as a continuous map (`grids.continuous_grid`: uniform, quadratic, log-SNR,
EDM-rho; the method's recommended one by default; at w = identity the schedule *is* the method on that grid;
training starts from the best of them) and w_n is a monotone
piecewise-linear warp of [0, 1] with K equal segments. Its knot heights interpolate, linearly in log n, two
learned height vectors, one for n = lo and one for n = hi:
    H_n = (1 - a) H_lo + a H_hi,   a = log(n / lo) / log(hi / lo),
each the normalised cumulative sums of exp(log_inc) mixed with 0.1% of the identity (w(0) = 0, w(1) = 1
pinned; each segment rises by at least 1e-3 / K, so every grid increases strictly for any finite parameters,
in float64 too). One warp shared by all NFEs was measured to trade the lowest NFE away (zoo:gmm2d, dpm++2m
3-8: -2.5 dB at NFE 3 for +3.6 to +8.4 dB at 4-8); the two ends give each NFE its own compromise while
the grid stays a smooth function of n, trained jointly over the whole range. The method's coefficients follow
from its times as the method defines them: the grid is compiled to NS form (spec §3.2) and sampled by the
NS loop, so the solver is exactly the base method on the grid t_i.

Gradients: the NS loop is differentiable in (times, a, b); the compilation is plain float arithmetic, so
`CompiledGrid` differentiates it by central differences in the interior grid fractions (2 (n - 1) compiles
of a few milliseconds, no network call).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BespokeError
from .grids import CONTINUOUS, continuous_grid
from .learned import Learned, evaluator
from .nonstationary import NSSolver, run_ns
from .ranged import Ranged, parse_nfe_range

__all__ = ["ScheduleSolver", "CompiledGrid", "SCHEDULE_BASES", "nfes_served", "parse_nfe_range"]

_FD_STEP = 1e-6  # central-difference step in grid fraction (compiles are exact to ~1e-15)
_FLOOR = 1e-3  # the share of the warp that stays uniform, so that no segment collapses in float64


def _bases() -> dict[str, str]:
    """{method: its recommended grid} for every built-in method a schedule can drive."""
    from . import METHODS

    return {name: m.grid for name, m in METHODS.items() if m.grid in CONTINUOUS}


SCHEDULE_BASES = tuple(_bases())  # edm-heun starts at EDM's sigma_max, not at t = 0: its schedule is heun's


def nfes_served(base: str, nfe_range) -> list[int]:
    """Every NFE in `nfe_range` (lo, hi) that the built-in method `base` takes (midpoint: the even ones)."""
    from . import METHODS

    method = METHODS[base]
    return [n for n in range(nfe_range[0], nfe_range[1] + 1) if method.largest_nfe(n) == n]


class CompiledGrid(torch.autograd.Function):
    """(times, a, b) of the NS form of `compile(fractions)`, differentiable in the fractions (central
    differences in each interior fraction; the ends are pinned)."""

    @staticmethod
    def forward(ctx, fractions: torch.Tensor, compile_fn):
        ns = compile_fn(fractions.detach())
        ctx.compile_fn = compile_fn
        ctx.save_for_backward(fractions.detach())
        return ns.times.clone(), ns.a.clone(), ns.b.clone()

    @staticmethod
    def backward(ctx, g_times, g_a, g_b):
        (f,) = ctx.saved_tensors
        grad = torch.zeros_like(f)
        outs = (g_times, g_a, g_b)
        for k in range(1, f.numel() - 1):
            step = min(_FD_STEP, 0.25 * float(f[k + 1] - f[k]), 0.25 * float(f[k] - f[k - 1]))
            hi, lo = f.clone(), f.clone()
            hi[k] += step
            lo[k] -= step
            p, m = ctx.compile_fn(hi), ctx.compile_fn(lo)
            for g, vp, vm in zip(outs, (p.times, p.a, p.b), (m.times, m.a, m.b)):
                if g is not None:
                    grad[k] += (g.to(torch.float64) * (vp - vm) / (2 * step)).sum()
        return grad, None


class ScheduleSolver(Ranged, Learned):
    """A built-in method on a learned, continuous time grid; one solver for every NFE in `nfe_range`.

    `.at(n)` is the solver at NFE n (a view sharing the parameters); `.nfe` is the NFE this one samples at.
    """

    kind = "schedule"
    # Adam's step on a log-increment moves a time by about lr / K of the grid, far less than a step on an NS
    # coefficient moves the sample: the cap of train/pairs.capped_learning_rate would freeze the schedule
    caps_learning_rate = False

    def __init__(
        self,
        base: str,
        nfe_range: tuple[int, int],
        *,
        knots: int = 8,
        grid: str | None = None,
        nfe: int | None = None,
        init: str | None = None,
        model_fingerprint: str | None = None,
        force: bool = False,
    ):
        bases = _bases()
        if base not in bases:
            raise BespokeError(f"a schedule drives one of {', '.join(bases)}; got {base!r}")
        grid = grid or bases[base]
        if grid not in CONTINUOUS:
            raise BespokeError(f"a schedule warps one of the grids {', '.join(CONTINUOUS)}; got {grid!r}")
        super().__init__(init=init or f"{base}[{grid}]", model_fingerprint=model_fingerprint, force=force)
        if not isinstance(knots, int) or knots < 1:
            raise BespokeError(f"a schedule needs knots >= 1, got {knots!r}")
        self.base, self.grid_name = base, grid
        self.nfe_range = parse_nfe_range(nfe_range)
        if not self.valid_nfes():
            raise BespokeError(f"{base} takes no NFE in {self.range_text()}")
        # rows: the increments at the lowest and at the highest NFE; all equal: w = identity
        self.log_inc = nn.Parameter(torch.zeros(2, knots, dtype=torch.float64))
        self._nfe = self.valid_nfes()[-1]
        if nfe is not None:
            self._nfe = self._check_nfe(nfe)

    def valid_nfes(self) -> list[int]:
        return nfes_served(self.base, self.nfe_range)

    @property
    def range_what(self) -> str:
        return f"{self.base} schedule"

    @property
    def name(self) -> str:
        return f"schedule:{self.base}{self.nfe}"

    @property
    def num_parameters(self) -> int:
        """Degrees of freedom: 2 (K - 1) (two rows of K increments, each normalised)."""
        return 2 * (self.knots - 1)

    def __repr__(self):
        return f"ScheduleSolver(base={self.base!r}, nfe={self.nfe}, range={self.range_text()}, knots={self.knots})"

    @property
    def knots(self) -> int:
        return self.log_inc.shape[1]

    # --- the map f -> t ----------------------------------------------------------------------------
    def heights(self, nfe: int | None = None) -> torch.Tensor:
        """H_n: the warp's K + 1 knot heights at NFE n (this solver's by default), differentiable."""
        inc = torch.exp(self.log_inc - self.log_inc.max(dim=1, keepdim=True).values)  # each row's largest is 1
        ones = inc.new_ones(2, 1)  # the last height is exactly 1 (a rounded sum would unpin the data end)
        learned = torch.cat([0 * ones, torch.cumsum(inc, 1)[:, :-1] / inc.sum(1, keepdim=True), ones], 1)
        uniform = torch.linspace(0, 1, self.knots + 1, dtype=learned.dtype, device=learned.device)
        ends = (1 - _FLOOR) * learned + _FLOOR * uniform  # every segment keeps >= _FLOOR / K: strictly increasing
        a = self.position(nfe)
        return (1 - a) * ends[0] + a * ends[1]

    def set_heights(self, end: int, heights: torch.Tensor) -> None:
        """Make the warp at the range's lowest (end 0) or highest (end 1) NFE pass through `heights` (K + 1
        increasing values from 0 to 1, each rise at least _FLOOR / K), undoing the floor mixing of `heights`."""
        uniform = torch.linspace(0, 1, self.knots + 1, dtype=torch.float64)
        learned = (heights.to(torch.float64) - _FLOOR * uniform) / (1 - _FLOOR)
        with torch.no_grad():
            self.log_inc[end] = torch.log(torch.diff(learned).clamp(min=1e-12))

    def warp(self, f: torch.Tensor, nfe: int | None = None) -> torch.Tensor:
        """w_n(f): piecewise linear through (k / K, H_n[k])."""
        heights = self.heights(nfe)
        x = f.to(torch.float64).clamp(0, 1) * self.knots
        k = torch.clamp(x.floor().long(), max=self.knots - 1)
        return heights[k] + (x - k) * (heights[k + 1] - heights[k])

    def steps(self, nfe: int | None = None) -> int:
        from . import METHODS

        n = self._check_nfe(self.nfe if nfe is None else nfe)
        return METHODS[self.base].steps_for(self.base, n)

    def fractions(self) -> torch.Tensor:
        """w(i / steps), i = 0..steps: the base grid's fractions of this NFE's grid points."""
        steps = self.steps()
        return self.warp(torch.arange(steps + 1, dtype=torch.float64) / steps)

    def grid(self, scheduler=None, ode_end: float = 1.0) -> list[float]:
        """The time grid t_0 = 0 < ... < t_steps = 1 at this NFE (floats, for reading and export)."""
        with torch.no_grad():
            return continuous_grid(self.grid_name, self.fractions(), scheduler, ode_end).tolist()

    def _compile(self, scheduler, ode_end: float):
        from . import solver

        def compile_fn(fractions: torch.Tensor) -> NSSolver:
            times = continuous_grid(self.grid_name, fractions, scheduler, ode_end).tolist()
            return solver(self.base, self.nfe, grid=times).to_ns(scheduler, ode_end)

        return compile_fn

    def coefficients(self, scheduler=None, ode_end: float = 1.0):
        """(times, a, b) of the NS form at this NFE, differentiable in the parameters (every base starts at
        t = 0 from the noise itself: start_scale 1)."""
        return CompiledGrid.apply(self.fractions(), self._compile(scheduler, ode_end))

    # --- sampling ----------------------------------------------------------------------------------
    def sample(self, flow, noise: torch.Tensor, *, checkpoint: bool = False, **cond) -> torch.Tensor:
        flow.check_noise(noise)
        self.check_model(flow)
        times, a, b = self.coefficients(flow.scheduler, flow.ode_end)
        a, b = a.to(noise.device, noise.dtype), b.to(noise.device, noise.dtype)
        return run_ns(evaluator(flow, cond, checkpoint), noise, times, a, b)

    def to_ns(self, target=None, ode_end: float = 1.0) -> NSSolver:
        from ..flows import Flow

        scheduler = target
        if isinstance(target, Flow):
            scheduler, ode_end = target.scheduler, target.ode_end
        with torch.no_grad():
            return self._compile(scheduler, ode_end)(self.fractions())

    def times(self) -> torch.Tensor:
        """The warped fractions w(i / steps) (the model's times need its path: see `grid`)."""
        return self.fractions().detach()

    # --- file state (solvers/files.py) ----------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return {"log_inc": self.log_inc}

    def file_entry(self) -> dict:
        return {
            "kind": self.kind,
            "nfe_range": list(self.nfe_range),
            "base": self.base,
            "grid": self.grid_name,
            "init": self.init,
            "knots": self.knots,
            "parameters": self.num_parameters,
            "warp": {  # the knot heights at the range's ends, for reading (the tensors are authoritative)
                str(n): [round(v, 12) for v in self.heights(n).tolist()] for n in sorted(set(self.nfe_range))
            },
            "training": self.training_summary,
        }

    @classmethod
    def state_shapes(cls, entry: dict) -> dict[str, tuple[int, ...]]:
        return {"log_inc": (2, int(entry["knots"]))}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], entry: dict, model_fingerprint: str | None) -> ScheduleSolver:
        """The schedule whose raw parameters are `state` (shapes as `state_shapes`, already checked)."""
        solver = cls(
            entry["base"],
            tuple(entry["nfe_range"]),
            knots=int(entry["knots"]),
            grid=entry.get("grid"),
            init=str(entry.get("init", entry["base"])),
            model_fingerprint=model_fingerprint,
        )
        return solver.restored(state, entry)
