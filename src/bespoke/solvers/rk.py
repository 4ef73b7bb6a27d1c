"""Explicit Runge-Kutta methods as Butcher tableaux over one stepping loop.

A tableau is data; `rk_program` turns it into a solver program. The loop can step either the
flow ODE itself (t, x), or the ODE in EDM/VE coordinates, x_bar = x / alpha_t in time
sigma_bar = sigma_t / alpha_t, where dx_bar / dsigma_bar = eps_hat (spec §1.2, §3.2). EDM's sampler
is Heun in those coordinates with a final Euler step (Karras et al. 2022, Alg. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .common import PathValues, lincomb, start

__all__ = ["Tableau", "EULER", "MIDPOINT", "HEUN", "RK4", "TABLEAUX", "rk_program", "edm_heun"]


@dataclass(frozen=True)
class Tableau:
    """Explicit RK: stage s is evaluated at t + c_s h on x + h sum_j a_sj k_j; x' = x + h sum_s b_s k_s."""

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.c)


EULER = Tableau("euler", (0.0,), ((),), (1.0,), 1)
MIDPOINT = Tableau("midpoint", (0.0, 0.5), ((), (0.5,)), (0.0, 1.0), 2)
HEUN = Tableau("heun", (0.0, 1.0), ((), (1.0,)), (0.5, 0.5), 2)
RK4 = Tableau("rk4", (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), 4)
TABLEAUX = {tab.name: tab for tab in (EULER, MIDPOINT, HEUN, RK4)}


class _FlowCoords:
    """The flow ODE as it is: time t, state x, derivative u."""

    def __init__(self, scheduler, times):
        self.times = times

    def tau(self, i):
        return self.times[i]

    def time_at(self, tau):
        return tau

    def to(self, x, i):
        return x

    def back(self, xb, t, i=None):
        return xb

    def deriv(self, x, u, t, i=None):
        return u


class _VECoords:
    """EDM/VE coordinates: x_bar = x / alpha, tau = sigma / alpha = exp(-lambda), d x_bar / d tau = eps_hat."""

    def __init__(self, scheduler, times):
        self.sch, self.p = scheduler, PathValues.on(scheduler, times)
        self.times = times

    def tau(self, i):
        return math.exp(-self.p.lam[i])

    def time_at(self, tau):
        return float(self.sch.t_of_log_snr(-math.log(tau))) if tau > 0 else 1.0

    def _alpha(self, t, i):
        return self.p.alpha[i] if i is not None else float(self.sch.alpha(t))

    def to(self, x, i):
        return x / self.p.alpha[i]

    def back(self, xb, t, i=None):
        return self._alpha(t, i) * xb

    def deriv(self, x, u, t, i=None):
        if i is not None:
            return self.p.eps_hat(i, x, u)
        s = PathValues.on(self.sch, [t])
        return s.eps_hat(0, x, u)


COORDS = {"flow": _FlowCoords, "ve": _VECoords}


def _rk_step(tab: Tableau, co, ev, x, i: int):
    """One step of `tab` from grid point i to i+1 in coordinates `co`."""
    t1 = co.times[i + 1]
    tau0 = co.tau(i)
    h = co.tau(i + 1) - tau0
    xb = co.to(x, i)
    ks = []
    for c, arow in zip(tab.c, tab.a):
        # stage times at the grid points are taken exactly (no round trip through tau)
        j = i if c == 0 else i + 1 if c == 1 else None
        ts = co.times[j] if j is not None else co.time_at(tau0 + c * h)
        xs = co.back(lincomb(xb, [(h * a, k) for a, k in zip(arow, ks)]), ts, j)
        ks.append(co.deriv(xs, ev(ts, xs), ts, j))
    return co.back(lincomb(xb, [(h * b, k) for b, k in zip(tab.b, ks)]), t1, i + 1)


def rk_program(tab: Tableau, coords: str = "flow", last: Tableau | None = None):
    """A solver program stepping with `tab` (and with `last` on the final step, if given)."""

    def program(ev, times, scheduler):
        co = COORDS[coords](scheduler, times)
        x = start(ev, times, scheduler)
        n = len(times) - 1
        for i in range(n):
            x = _rk_step(last if (last is not None and i == n - 1) else tab, co, ev, x, i)
        return x

    program.__doc__ = f"{tab.name} ({tab.order}th-order RK) in {coords} coordinates"
    return program


# EDM sampler (Karras et al. 2022, Alg. 1, deterministic): Heun on dx/dsigma = eps_hat over the
# rho = 7 grid, Euler on the last step to sigma = 0. N steps cost 2N - 1 NFE.
edm_heun = rk_program(HEUN, coords="ve", last=EULER)
