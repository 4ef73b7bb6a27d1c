"""Non-stationary (NS) solvers ([BNS] §3.1) and the compiler that turns a solver into one (§3.2).

An n-step NS solver is a time grid t_0 <= ... <= t_n = 1 and the canonical coefficients
    x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j,     u_j = u(t_j, x_j)            (Eq. 11)
sampled by one loop (Algorithm 1); NFE = n. Two small generalisations, both needed to hold the
classical solvers exactly: repeated times are allowed (RK4 evaluates twice at a midpoint), and the
first evaluation may be at `start_scale * x_0` (EDM-Heun's truncated start; 1 for every other solver).

Compilation ("coefficient tracking"): run a solver's own update formulas on `Lin` values, vectors of
coefficients over the basis [x_0, u_0, u_1, ...], instead of tensors. Each evaluation point and the
output then *are* the NS rows. Any solver that is linear in its history compiles exactly.
"""

from __future__ import annotations

import numbers

import torch

from ..errors import BespokeError
from .base import Solver, validate_times

__all__ = ["NSSolver", "Lin", "Trace", "compile_ns", "run_ns"]


class NSSolver(Solver):
    """times (n+1,), a (n,), b (n, n) lower triangular; float64, cast to the state's dtype when sampling."""

    def __init__(self, times, a, b, *, start_scale: float = 1.0, name: str = "ns"):
        self.times = torch.as_tensor(times, dtype=torch.float64)
        self.a = torch.as_tensor(a, dtype=torch.float64)
        self.b = torch.as_tensor(b, dtype=torch.float64)
        self.start_scale = float(start_scale)
        self.name = name
        n = self.a.numel()
        if self.times.shape != (n + 1,) or self.b.shape != (n, n):
            raise BespokeError(
                f"an NS solver with n = {n} steps needs times of shape ({n + 1},) and b of shape "
                f"({n}, {n}); got {tuple(self.times.shape)} and {tuple(self.b.shape)}"
            )
        if torch.any(torch.triu(self.b, diagonal=1) != 0):
            raise BespokeError("b must be lower triangular: step i may only use velocities u_0..u_i")
        validate_times(self.times.tolist())

    @property
    def nfe(self) -> int:
        return self.a.numel()

    def __repr__(self):
        return f"NSSolver(name={self.name!r}, nfe={self.nfe})"

    def to_ns(self, target=None, ode_end: float = 1.0) -> NSSolver:
        return self

    def sample(self, flow, noise, **cond):
        flow.check_noise(noise)
        a = self.a.to(noise.device, noise.dtype)
        b = self.b.to(noise.device, noise.dtype)
        return run_ns(lambda t, x: flow(t, x, **cond), noise, self.times, a, b, self.start_scale)


def run_ns(ev, x0, times, a, b, start_scale=1.0, frame=None):
    """Algorithm 1 of [BNS]: x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j with u_j = ev(t_j, x_j) (Eq. 11).

    frame: a `ScaleTime` at the grid points (r_0..r_n) to run the loop in scale-time coordinates
    x_bar = s_r x(t_r) (BNS preconditioning, spec §3.3): it starts from x_bar_0 = s_0 x_0, uses
    u_bar_j = (s'_j / s_j) x_bar_j + t'_j s_j u(t_j, x_bar_j / s_j) and returns x_bar_n / s_n.
    Works on tensors (sampling, training) and on `Lin` values (compilation to plain NS form).
    """
    n = len(times) - 1
    if frame is not None:
        x0 = frame.s[0] * x0
    x = start_scale * x0
    us = []
    for i in range(n):
        if frame is None:
            us.append(ev(times[i], x))
        else:
            s, ds, dt = frame.s[i], frame.ds[i], frame.dt[i]
            us.append((ds / s) * x + (dt * s) * ev(frame.t[i], x / s))
        x = a[i] * x0 + sum(b[i, j] * us[j] for j in range(i + 1))
    return x if frame is None else x / frame.s[n]


class Lin:
    """A linear combination of the basis [x_0, u_0, u_1, ...]: coefficient index 0 is x_0, j+1 is u_j."""

    __slots__ = ("c",)

    def __init__(self, c: dict[int, float]):
        self.c = c

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # sum() starts from 0
            return self
        if not isinstance(other, Lin):
            return NotImplemented
        c = dict(self.c)
        for k, v in other.c.items():
            c[k] = c.get(k, 0.0) + v
        return Lin(c)

    __radd__ = __add__

    def __neg__(self):
        return Lin({k: -v for k, v in self.c.items()})

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, k):
        k = float(k)
        return Lin({i: k * v for i, v in self.c.items()})

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self * (1.0 / float(k))


class Trace:
    """The evaluator a solver program runs against to be compiled: records every evaluation."""

    def __init__(self):
        self.x0 = Lin({0: 1.0})
        self.points: list[tuple[float, Lin]] = []

    def __call__(self, t: float, x: Lin) -> Lin:
        self.points.append((float(t), x))
        return Lin({len(self.points): 1.0})

    def to_ns(self, output: Lin, t_end: float, name: str) -> NSSolver:
        n = len(self.points)
        if n == 0:
            raise BespokeError(f"{name} made no evaluation, so it has no NS form")
        first = self.points[0][1]
        if set(first.c) - {0}:
            raise BespokeError(f"{name}: the first evaluation must be at a multiple of x_0")
        a = torch.zeros(n, dtype=torch.float64)
        b = torch.zeros(n, n, dtype=torch.float64)
        rows = [p for _, p in self.points[1:]] + [output]
        for i, row in enumerate(rows):
            for k, v in row.c.items():
                if k == 0:
                    a[i] = v
                elif k - 1 <= i:
                    b[i, k - 1] = v
                else:  # cannot happen for a causal program
                    raise BespokeError(f"{name}: step {i} uses a velocity evaluated after it")
        times = [t for t, _ in self.points] + [float(t_end)]
        return NSSolver(times, a, b, start_scale=first.c.get(0, 0.0), name=name)


def compile_ns(program, times: list[float], scheduler, name: str) -> NSSolver:
    """NS form of `program(evaluator, times, scheduler)` by coefficient tracking."""
    trace = Trace()
    out = program(trace, times, scheduler)
    return trace.to_ns(out, times[-1], name)
