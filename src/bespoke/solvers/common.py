"""Pieces every solver program shares: the start state, linear combinations, path values.

States and velocities inside a program are tensors when sampling and `Lin` coefficient vectors
when compiling to NS form; everything here works on both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["lincomb", "start", "PathValues"]


def lincomb(x, terms):
    """x + sum(c * v for c, v in terms), skipping zero coefficients."""
    for c, v in terms:
        if c != 0:
            x = x + c * v
    return x


def start(ev, times, scheduler):
    """The state at times[0]: the noise itself at t = 0. A grid that starts later (EDM's
    sigma_max) starts, as EDM does, from the noise scaled to that noise level, dropping the
    alpha_t x1 part: x = (sigma_t0 / sigma_0) x0."""
    if times[0] == 0.0:
        return ev.x0
    return (float(scheduler.sigma(times[0])) / float(scheduler.sigma(0.0))) * ev.x0


@dataclass
class PathValues:
    """alpha, sigma, their derivatives, D = alpha' sigma - alpha sigma' and lambda on a grid (floats).

    The data and noise predictions are linear in (x, u) at a grid point (spec §1.3):
        x1_hat = (sigma u - sigma' x) / D,     eps_hat = (alpha' x - alpha u) / D.
    """

    alpha: list[float]
    sigma: list[float]
    d_alpha: list[float]
    d_sigma: list[float]
    lam: list[float]

    @classmethod
    def on(cls, scheduler, times) -> PathValues:
        t = torch.tensor(times, dtype=torch.float64)
        with torch.no_grad():
            return cls(
                scheduler.alpha(t).tolist(),
                scheduler.sigma(t).tolist(),
                scheduler.d_alpha(t).tolist(),
                scheduler.d_sigma(t).tolist(),
                scheduler.log_snr(t).tolist(),
            )

    def D(self, i: int) -> float:
        return self.d_alpha[i] * self.sigma[i] - self.alpha[i] * self.d_sigma[i]

    def x1_hat(self, i: int, x, u):
        return (self.sigma[i] / self.D(i)) * u - (self.d_sigma[i] / self.D(i)) * x

    def eps_hat(self, i: int, x, u):
        return (self.d_alpha[i] / self.D(i)) * x - (self.alpha[i] / self.D(i)) * u

    def h(self, i: int) -> float:
        """Step in half log-SNR from point i to i+1 (inf when one end is pure noise or data)."""
        return self.lam[i + 1] - self.lam[i]

    def is_finite(self, i: int) -> bool:
        return math.isfinite(self.lam[i])
