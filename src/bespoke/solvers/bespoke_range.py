"""NFE-agnostic Bespoke solvers: one continuous scale-time transform, discretised at any NFE of a range.

A fixed-NFE Bespoke solver (solvers/scale_time.py) learns the transform only at its own grid points. Here the
transform is a function of r in [0, 1] with K equal segments (knots r_k = k / K), and the solver at NFE n runs
the base method (RK1 / RK2) with n / order uniform steps in r on it:

    t(r)  = (1 - e) T(r) / T(1) + e r,  T(r) = int_0^r exp(g(rho)) d rho,  g piecewise linear through (r_k, g_k)
    t'(r) = (1 - e) exp(g(r)) / T(1) + e          (e = 1e-3: t increases strictly, by >= e / N a step, in float64)
    s(r)  = exp(h(r)),   h the C^1 cubic Hermite spline through (r_k, h_k) with slopes h'_k, h_0 = 0
    s'(r) = s(r) h'(r)

so t(0) = 0, t(1) = 1 and s(0) = 1 hold for any parameters, and t' and s' are the exact derivatives of t and
s: as n grows the solver converges to the model's own samples at the base method's order (Thm 2.2; g has
K kinks, which cost K steps one order of local error each, not the global order).

The parameters (g, h, h') are two rows, one for the range's lowest NFE and one for its highest, mixed linearly
in log n at the NFEs between them (solvers/ranged.py): learned schedules measured that one transform shared by
all NFEs trades the lowest NFE away, while two ends let each NFE have its own compromise on a curve that is
smooth in n. With both rows equal the transform is the same at every NFE.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BespokeError
from ..interpolate import hermite
from ..paths import Scheduler, scale_time
from .learned import Learned
from .ranged import Ranged, parse_nfe_range
from .scale_time import BASE, STEPS, BespokeSolver, ScaleTimeSampling, Transform, _target_path

__all__ = ["BespokeRangeSolver", "RANGE_KNOTS", "RANGE_ROWS"]

# Knots of the transform. A change of path onto condot, fitted with 8 / 16 / 32 knots, scores 38.4 / 41.0 / 43.8 dB
# at NFE 16 on zoo:digits-vp (RK2; the fixed-NFE solver on the exact change: 44.1): the change is steep near the
# ends, and a coarse spline caps the highest NFEs. Trained for NFE 4-16 (150 steps), 16 knots gave 47.1 dB at NFE
# 16 against 39.7 with 8, and 31.0 against 32.2 at NFE 4.
RANGE_KNOTS = 16
RANGE_ROWS = 2
_FLOOR = 1e-3  # the share of t_r = r in t (as the learned schedules' warp keeps)


def _exp_mean(d: torch.Tensor) -> torch.Tensor:
    """(e^d - 1) / d, the mean of exp over [0, d] (1 at d = 0)."""
    small = d.abs() < 1e-8
    safe = torch.where(small, torch.ones_like(d), d)
    return torch.where(small, 1 + 0.5 * d, torch.expm1(safe) / safe)


def speed_curve(g: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t(r), t'(r)) for the log-speed g at the K + 1 knots (piecewise linear between them), normalised so
    that t(1) = 1: each segment integrates exp(g) in closed form, int_0^{wh} e^{g_k + d rho / h} = h e^{g_k} w
    E(w d) with E the exp-mean. Mixed with 0.1% of t_r = r, so that no step collapses in float64."""
    g = g - g.max()  # scale-free: exp(g) / T(1) is unchanged
    knots = g.numel() - 1
    h, d = 1.0 / knots, g[1:] - g[:-1]
    whole = torch.cat([g.new_zeros(1), torch.cumsum(h * torch.exp(g[:-1]) * _exp_mean(d), 0)])
    x = r.to(g.dtype).clamp(0, 1) * knots
    k = torch.clamp(x.floor().long(), max=knots - 1)
    w = x - k
    total = whole[-1]
    t = (whole[k] + h * torch.exp(g[k]) * w * _exp_mean(w * d[k])) / total
    t = (1 - _FLOOR) * t + _FLOOR * x / knots  # a share of t_r = r: every step rises by >= _FLOOR / N
    return torch.where(r >= 1, torch.ones_like(t), t), (1 - _FLOOR) * torch.exp(g[k] + w * d[k]) / total + _FLOOR


def scale_curve(h: torch.Tensor, slopes: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s(r), s'(r)) with log s the cubic Hermite spline through (r_k, h_k) with slopes h'_k."""
    knots = torch.linspace(0, 1, h.numel(), dtype=h.dtype, device=h.device)
    log_s, d_log_s = hermite(knots, h[None], slopes[None], r.to(h.dtype))
    s = torch.exp(log_s[0])
    return s, s * d_log_s[0]


class BespokeRangeSolver(Ranged, ScaleTimeSampling, Learned):
    """RK1- or RK2-Bespoke on one learned continuous transform, for every NFE of `nfe_range` that is a multiple
    of the order. `.at(n)` is the solver at NFE n (a view sharing the parameters); `.fixed()` the plain
    BespokeSolver it equals there."""

    def __init__(
        self,
        order: int,
        nfe_range,
        *,
        knots: int = RANGE_KNOTS,
        rows: int = RANGE_ROWS,
        nfe: int | None = None,
        init: str = "identity",
        model_fingerprint: str | None = None,
        force: bool = False,
    ):
        super().__init__(init=init, model_fingerprint=model_fingerprint, force=force)
        if order not in STEPS:
            raise BespokeError(f"a Bespoke solver's base method is RK1 (euler) or RK2 (midpoint); got order {order}")
        for what, v in (("knots", knots), ("rows", rows)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BespokeError(f"an NFE-agnostic Bespoke solver needs {what} >= 1, got {v!r}")
        self.order = order
        self.nfe_range = parse_nfe_range(nfe_range)
        if not self.valid_nfes():
            raise BespokeError(
                f"RK{order}-Bespoke takes {order} evaluations per step, and no NFE in {self.range_text()} is a "
                f"multiple of {order}"
            )
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=torch.float64))  # noqa: E731
        self.log_speed = zeros(rows, knots + 1)  # rows: NFEs log-evenly from the range's lowest to its highest
        self.log_scale = zeros(rows, knots)  # h_1..h_K (h_0 = 0: s_0 = 1); all zeros: t_r = r, s_r = 1
        self.scale_slope = zeros(rows, knots + 1)
        self._nfe = self._check_nfe(self.valid_nfes()[-1] if nfe is None else nfe)

    # --- what it is --------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return f"bespoke-rk{self.order}"

    @property
    def range_what(self) -> str:
        return f"RK{self.order}-Bespoke solver"

    def valid_nfes(self) -> list[int]:
        lo, hi = self.nfe_range
        return [n for n in range(lo, hi + 1) if n % self.order == 0]

    @property
    def knots(self) -> int:
        return self.log_scale.shape[1]

    @property
    def steps(self) -> int:
        return self.nfe // self.order

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.nfe}[{self.range_text()}]"

    @property
    def num_parameters(self) -> int:
        """Degrees of freedom: per row K + 1 log-speeds less one (their common shift changes nothing), K
        log-scales and K + 1 log-scale slopes: rows (3K + 1)."""
        return self.rows * (3 * self.knots + 1)

    def __repr__(self):
        return f"BespokeRangeSolver(RK{self.order}, nfe={self.nfe}, range={self.range_text()}, knots={self.knots})"

    # --- the transform -----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.log_speed.shape[0]

    def row(self, nfe: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g, h, h') at NFE n: the rows on either side of n mixed linearly in log n (differentiable); row j sits
        at log_position j / (rows - 1)."""
        x = self.position(nfe) * (self.rows - 1)
        j = min(int(x), self.rows - 2) if self.rows > 1 else 0
        w = x - j
        mix = lambda p: p[j] if self.rows == 1 else (1 - w) * p[j] + w * p[j + 1]  # noqa: E731
        h = torch.cat([self.log_scale.new_zeros(1), mix(self.log_scale)])
        return mix(self.log_speed), h, mix(self.scale_slope)

    def curves(self, r: torch.Tensor, nfe: int | None = None):
        """(t, t', s, s') of the transform at fractions r, at NFE n (this view's by default)."""
        g, h, slopes = self.row(nfe)
        t, dt = speed_curve(g, r)
        s, ds = scale_curve(h, slopes, r)
        return t, dt, s, ds

    def transform(self) -> Transform:
        """The transform at the grid points r_k = k / (order steps) of this view's NFE."""
        r = torch.linspace(0, 1, self.order * self.steps + 1, dtype=torch.float64, device=self.log_speed.device)
        t, dt, s, ds = self.curves(r)
        return Transform(t=t, dt=dt[:-1], s=s, ds=ds[:-1])

    def times(self) -> torch.Tensor:
        return self.transform().t.detach()

    def fixed(self) -> BespokeSolver:
        """The plain fixed-NFE BespokeSolver that samples like this view (its transform at this NFE's points)."""
        with torch.no_grad():
            v = self.transform()
        out = BespokeSolver(
            self.order,
            Transform(*(x.cpu() for x in (v.t, v.dt, v.s, v.ds))),
            init=f"{self.name}",
            model_fingerprint=self.model_fingerprint,
            force=self.force,
        )
        out.model_guidance = self.model_guidance
        return out

    def set_row(self, end: int, flow_or_scheduler, target) -> None:
        """Make row `end` (0: lowest NFE, -1: highest) the change of path onto `target` (Thm 2.3; a Scheduler
        or one of scale_time.INITS: the fixed-NFE solver's starts), fitted to this solver's curves: h, h' at
        the knots exactly (a slope that is infinite at an end, as onto vp, by the secant there), g by least
        squares on t at 16 K + 1 points. The transform is continuous, so one fit serves every NFE."""
        source = getattr(flow_or_scheduler, "scheduler", flow_or_scheduler)
        if not isinstance(source, Scheduler):
            raise BespokeError("starting a Bespoke solver from a noise schedule needs the model's Gaussian path")
        if target == "identity":
            with torch.no_grad():
                for p in (self.log_speed, self.log_scale, self.scale_slope):
                    p[end] = 0.0
            return
        r = torch.linspace(0, 1, 16 * self.knots + 1, dtype=torch.float64)
        st = scale_time(source, _target_path(target), r, clamp=True)
        t = st.t.clone()
        t[0], t[-1] = 0.0, 1.0
        log_s = torch.log(st.s / st.s[0])
        slope = st.ds / st.s  # (log s)'; infinite where the path is singular at an end: there the secant slope
        slope = torch.where(torch.isfinite(slope), slope, torch.gradient(log_s, spacing=(r,))[0])
        at_knots = slice(None, None, 16)
        with torch.no_grad():
            self.log_scale[end] = log_s[at_knots][1:]
            self.scale_slope[end] = slope[at_knots]
            self.log_speed[end] = _fit_log_speed(r, t, self.knots)
        if not all(torch.isfinite(p[end]).all() for p in (self.log_speed, self.log_scale, self.scale_slope)):
            raise BespokeError(f"the change of path onto {target!r} is singular on {source!r}; start from another")

    # --- file state (solvers/files.py) ----------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return {"log_speed": self.log_speed, "log_scale": self.log_scale, "scale_slope": self.scale_slope}

    @classmethod
    def state_shapes(cls, entry: dict) -> dict[str, tuple[int, ...]]:
        k, rows = int(entry["knots"]), int(entry["rows"])
        return {"log_speed": (rows, k + 1), "log_scale": (rows, k), "scale_slope": (rows, k + 1)}

    @staticmethod
    def nfes_of(entry: dict) -> list[int]:
        """The NFEs a file entry of this kind serves (without building the solver)."""
        order = int(str(entry["kind"]).removeprefix("bespoke-rk"))
        lo, hi = entry["nfe_range"]
        return [n for n in range(lo, hi + 1) if n % order == 0]

    def file_entry(self) -> dict:
        ends = sorted({self.valid_nfes()[0], self.valid_nfes()[-1]})
        return {
            "kind": self.kind,
            "nfe_range": list(self.nfe_range),
            "base": BASE[self.order],
            "knots": self.knots,
            "rows": self.rows,
            "init": self.init,
            "parameters": self.num_parameters,
            "times_at": {  # the grids at the range's ends, for reading (the tensors are authoritative)
                str(n): [round(t, 12) for t in self.at(n).times().tolist()] for n in ends
            },
            "training": self.training_summary,
        }

    @classmethod
    def from_state(cls, state, entry: dict, model_fingerprint: str | None) -> BespokeRangeSolver:
        order = int(str(entry["kind"]).removeprefix("bespoke-rk"))
        solver = cls(
            order,
            tuple(entry["nfe_range"]),
            knots=int(entry["knots"]),
            rows=int(entry["rows"]),
            init=str(entry.get("init", "custom")),
            model_fingerprint=model_fingerprint,
        )
        return solver.restored(state, entry)

    def validate(self) -> None:
        """Finite parameters and a strictly increasing grid at every NFE of the range."""
        for n in self.valid_nfes():
            Learned.validate(self.at(n))


def _fit_log_speed(r: torch.Tensor, t: torch.Tensor, knots: int, iterations: int = 200) -> torch.Tensor:
    """The log-speeds g (K + 1) whose speed_curve is closest to t(r) in least squares (L-BFGS from the log
    of the secant slopes around each knot); r holds the knots at every (len(r) - 1) / K-th point."""
    secant = torch.diff(t[:: (len(r) - 1) // knots]) * knots
    around = torch.cat([secant[:1], torch.sqrt(secant[1:] * secant[:-1]), secant[-1:]])
    g = torch.log(around.clamp(min=1e-12)).requires_grad_(True)
    opt = torch.optim.LBFGS([g], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        loss = (speed_curve(g, r)[0] - t).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return g.detach()
