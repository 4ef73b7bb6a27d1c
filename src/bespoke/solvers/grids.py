"""Time grids t_0 = 0 < t_1 < ... < t_N = 1 in canonical time (0 = noise, 1 = data).

Each grid is fn(steps, scheduler, ode_end) -> list of steps + 1 floats. Grids defined in log-SNR or
in EDM's sigma = sigma_t / alpha_t = exp(-lambda) are mapped to t with the scheduler's inverse
log-SNR; their first and last points are then pinned to the exact ends 0 and 1, because the
canonical flow starts from pure noise at t = 0 and its sample is at t = 1.
"""

from __future__ import annotations

import math

import torch

from ..errors import BespokeError

__all__ = ["GRIDS", "uniform", "quadratic", "logsnr", "edm", "grid_by_name", "CONTINUOUS", "continuous_grid"]


def uniform(steps: int, scheduler=None, ode_end: float = 1.0) -> list[float]:
    """Uniform in t (the RK baselines of [BES]/[BNS]; DDIM's uniform timesteps on VP models)."""
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()


def quadratic(steps: int, scheduler=None, ode_end: float = 1.0) -> list[float]:
    """DPM-Solver's "time_quadratic": uniform in sqrt(1 - t), denser towards the data end."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (1.0 - s * s).tolist()


def _need(scheduler, grid):
    if scheduler is None:
        raise BespokeError(f"the {grid} grid needs the model's Gaussian path; use grid='uniform' for this flow")
    return scheduler


def _pin_ends(t: torch.Tensor) -> list[float]:
    t = t.clone()
    t[0], t[-1] = 0.0, 1.0
    return t.tolist()


def logsnr(steps: int, scheduler=None, ode_end: float = 1.0, clip: float = 5.0) -> list[float]:
    """Uniform in the half log-SNR lambda (DPM-Solver(++)/UniPC's "logSNR" spacing).

    lambda runs from max(lambda(0), -clip) to min(lambda(ode_end), clip): paths whose log-SNR is
    infinite at an end (FM-OT, cosine) get DPM-Solver's usual finite range, about [-5, 5].
    """
    sch = _need(scheduler, "logsnr")
    lo = max(float(sch.log_snr(0.0)), -clip)
    hi = min(float(sch.log_snr(ode_end)), clip)
    lam = torch.linspace(lo, hi, steps + 1, dtype=torch.float64)
    return _pin_ends(sch.t_of_log_snr(lam))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


def edm_sigma_range(scheduler, ode_end: float, sigma_min: float = 0.002, sigma_max: float = 80.0):
    """EDM's [sigma_min, sigma_max] clipped to what the path reaches, sigma = exp(-lambda)."""
    s_start = math.exp(-float(scheduler.log_snr(0.0)))
    s_end = math.exp(-float(scheduler.log_snr(ode_end)))
    return max(sigma_min, s_end), min(sigma_max, s_start)


def edm(steps: int, scheduler=None, ode_end: float = 1.0, rho: float = 7.0, exact_start: bool = True) -> list[float]:
    """EDM's rho = 7 polynomial grid in sigma = sigma_t/alpha_t ("EDM-rho"), then sigma = 0 (t = 1).

    `exact_start=False` keeps the first point at EDM's sigma_max (80) instead of t = 0: the
    EDM sampler itself starts there (see `edm_heun`).
    """
    sch = _need(scheduler, "edm")
    lo, hi = edm_sigma_range(sch, ode_end)
    sig = karras_sigmas(steps, lo, hi, rho)
    t = sch.t_of_log_snr(-torch.log(sig)).tolist() + [1.0]
    if exact_start:
        t[0] = 0.0
    return t


GRIDS = {"uniform": uniform, "logsnr": logsnr, "edm": edm, "quadratic": quadratic}


def grid_by_name(name: str):
    try:
        return GRIDS[name]
    except KeyError:
        raise BespokeError(f"unknown time grid {name!r}; valid: {', '.join(GRIDS)}") from None


# --- the same grids as continuous maps of the grid fraction f in [0, 1] (learned schedules, schedule.py) ----


def _logsnr_map(f: torch.Tensor, scheduler, ode_end: float, clip: float = 5.0) -> torch.Tensor:
    """Uniform in lambda over the range of `logsnr`: at f = i / n it is that grid."""
    sch = _need(scheduler, "logsnr")
    lo = max(float(sch.log_snr(0.0)), -clip)
    hi = min(float(sch.log_snr(ode_end)), clip)
    return sch.t_of_log_snr(lo + f * (hi - lo))


def _edm_map(f: torch.Tensor, scheduler, ode_end: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's rho-polynomial in sigma from sigma_max (f = 0) to sigma_min (f = 1). The discrete `edm` grid puts
    its n points at f = i / (n - 1) and then adds sigma = 0; this map reaches sigma = 0 only at the pinned end."""
    sch = _need(scheduler, "edm")
    lo, hi = edm_sigma_range(sch, ode_end)
    a, b = hi ** (1 / rho), lo ** (1 / rho)
    return sch.t_of_log_snr(-rho * torch.log(a + f * (b - a)))


CONTINUOUS = {
    "uniform": lambda f, scheduler=None, ode_end=1.0: f.clone(),
    "quadratic": lambda f, scheduler=None, ode_end=1.0: 1.0 - (1.0 - f) ** 2,
    "logsnr": _logsnr_map,
    "edm": _edm_map,
}


def continuous_grid(name: str, f, scheduler=None, ode_end: float = 1.0) -> torch.Tensor:
    """Times t(f) of grid `name` at fractions f (float64 tensor, 0 = first point, 1 = last), ends pinned to 0 and 1."""
    if name not in CONTINUOUS:
        raise BespokeError(f"unknown time grid {name!r}; valid: {', '.join(CONTINUOUS)}")
    f = torch.as_tensor(f, dtype=torch.float64)
    t = CONTINUOUS[name](f, scheduler, ode_end)
    return torch.where(f <= 0, 0.0, torch.where(f >= 1, 1.0, t))
