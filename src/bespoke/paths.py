"""Gaussian probability paths ("schedulers"): x_t = alpha_t * x1 + sigma_t * x0.

Canonical time t in [0, 1]: t = 0 is the noise end, t = 1 the data end (spec §1.1-1.2).
Every quantity is computed in float64 and returned as a float64 tensor, whatever the input.

Each scheduler gives alpha, sigma, their t-derivatives, the half log-SNR
lambda = log(alpha / sigma) and its inverse. `scale_time` is the change between two schedulers
of [BES] Thm 2.3 (spec §1.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BespokeError

__all__ = [
    "Scheduler",
    "CondOT",
    "Cosine",
    "VPLinear",
    "VPDiscrete",
    "VE",
    "EDM",
    "ScaleTime",
    "scale_time",
    "Preconditioned",
    "scheduler_from_name",
    "SCHEDULERS",
]

F64 = torch.float64


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=F64)


class Scheduler:
    """A Gaussian path (alpha_t, sigma_t). Subclasses define `alpha`, `sigma` and their derivatives.

    `log_snr` and `t_of_log_snr` have closed forms where one exists; the base class inverts the
    (strictly increasing) log-SNR by bisection otherwise.
    """

    name = "scheduler"

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma_d_sigma(self, t) -> torch.Tensor:
        """sigma * sigma' = (sigma^2)'/2, finite where sigma' alone is not (VP at t = 1)."""
        return self.sigma(t) * self.d_sigma(t)

    def log_snr(self, t) -> torch.Tensor:
        """lambda(t) = log(alpha_t / sigma_t) (DPM-Solver's half log-SNR); -inf/+inf at the ends."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_log_snr(self, lam) -> torch.Tensor:
        """Inverse of `log_snr` (bisection on [0, 1]; subclasses override with closed forms)."""
        lam = _f64(lam)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(64):  # 2^-64 < 1e-19: exact to float64 resolution
            mid = 0.5 * (lo + hi)
            below = self.log_snr(mid) < lam
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def snr(self, t) -> torch.Tensor:
        """rho(t) = alpha_t / sigma_t."""
        return self.alpha(t) / self.sigma(t)

    def snr_inverse(self, snr) -> torch.Tensor:
        """t such that alpha_t / sigma_t = snr (spec §1.2, the `rho^{-1}` column)."""
        return self.t_of_log_snr(torch.log(_f64(snr)))

    def denominator(self, t) -> torch.Tensor:
        """D_t = alpha'_t sigma_t - alpha_t sigma'_t (> 0 when the SNR increases; spec §1.3)."""
        return self.d_alpha(t) * self.sigma(t) - self.alpha(t) * self.d_sigma(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CondOT(Scheduler):
    """FM-OT: alpha = t, sigma = 1 - t."""

    name = "condot"

    def alpha(self, t):
        return _f64(t).clone()

    def sigma(self, t):
        return 1.0 - _f64(t)

    def d_alpha(self, t):
        return torch.ones_like(_f64(t))

    def d_sigma(self, t):
        return -torch.ones_like(_f64(t))

    def t_of_log_snr(self, lam):
        return torch.sigmoid(_f64(lam))  # t = rho / (1 + rho)


class Cosine(Scheduler):
    """FM/v-CS: alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

    name = "cosine"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * _f64(t))

    def sigma(self, t):
        # cos(pi/2) is 6e-17 in floating point; pin the data end to exactly 0.
        t = _f64(t)
        return torch.where(t == 1.0, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))

    def d_alpha(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * _f64(t))

    def d_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * _f64(t))

    def t_of_log_snr(self, lam):
        return (2.0 / math.pi) * torch.atan(torch.exp(_f64(lam)))  # t = (2/pi) arctan(rho)


class VPLinear(Scheduler):
    """epsilon-VP with continuous linear beta (Song et al.; spec §1.2).

    T(t) = (1-t)^2 (B-b)/2 + (1-t) b,  alpha = exp(-T/2),  sigma = sqrt(1 - exp(-T)).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise BespokeError(f"VPLinear needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _T(self, t):
        s = 1.0 - _f64(t)
        return 0.5 * s * s * (self.beta_max - self.beta_min) + s * self.beta_min

    def _dT(self, t):
        s = 1.0 - _f64(t)
        return -s * (self.beta_max - self.beta_min) - self.beta_min

    def alpha(self, t):
        return torch.exp(-0.5 * self._T(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self._T(t)))

    def d_alpha(self, t):
        return -0.5 * self._dT(t) * self.alpha(t)

    def d_sigma(self, t):
        return 0.5 * self._dT(t) * torch.exp(-self._T(t)) / self.sigma(t)

    def sigma_d_sigma(self, t):
        return 0.5 * self._dT(t) * torch.exp(-self._T(t))

    def log_snr(self, t):
        T = self._T(t)
        return -0.5 * T - 0.5 * torch.log(-torch.expm1(-T))

    def t_of_log_snr(self, lam):
        # Spec §1.2: T = -log(rho^2 / (1 + rho^2)) = log1p(exp(-2 lambda)); solve T(t) for 1 - t.
        T = torch.nn.functional.softplus(-2.0 * _f64(lam))
        d, b = self.beta_max - self.beta_min, self.beta_min
        one_minus_t = 2.0 * T / (b + torch.sqrt(b * b + 2.0 * d * T))  # stable root of d/2 s^2 + b s = T
        return 1.0 - one_minus_t

    def __repr__(self):
        return f"VPLinear(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPDiscrete(Scheduler):
    """VP from a discrete `alphas_cumprod` (DDPM-type models with integer timesteps 0..N-1).

    Canonical time maps linearly onto a continuous timestep tau:
        tau(t) = (N - 1) - t * N,   so t = 0 is tau = N - 1 (pure noise end), tau = k at t = (N-1-k)/N,
    and t = 1 is tau = -1, where we put alphas_cumprod = 1 (DDPM's x_0: the empty product of (1 - beta)).
    Between integers, log(alphas_cumprod) is a C^1 cubic Hermite interpolant (knot slopes by centred
    differences), so alpha' and sigma' are continuous. At integer timesteps the values are exactly
    the given `alphas_cumprod`.
    """

    name = "vp-discrete"

    def __init__(self, alphas_cumprod):
        ac = _f64(alphas_cumprod).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac < 1)) or not torch.all(ac[1:] < ac[:-1]):
            raise BespokeError(
                "alphas_cumprod must be a strictly decreasing sequence in (0, 1) with at least 2 entries"
            )
        self.alphas_cumprod = ac
        self.num_timesteps = ac.numel()
        # knots at tau = -1, 0, ..., N-1 of y = log(alphas_cumprod), with y(-1) = 0
        self._y = torch.cat([torch.zeros(1, dtype=F64), torch.log(ac)])
        y = self._y
        m = torch.empty_like(y)
        m[1:-1] = 0.5 * (y[2:] - y[:-2])
        m[0] = y[1] - y[0]
        m[-1] = y[-1] - y[-2]
        self._m = m

    @classmethod
    def ddpm_linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """The DDPM linear-beta schedule (diffusers `DDPMScheduler(beta_schedule="linear")`)."""
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=F64)
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def from_betas(cls, betas):
        return cls(torch.cumprod(1.0 - _f64(betas), 0))

    # --- timestep <-> canonical time -------------------------------------------------------
    def timestep(self, t) -> torch.Tensor:
        """Continuous timestep tau for canonical time t (t = 0 -> N-1, t = 1 -> -1)."""
        return (self.num_timesteps - 1) - _f64(t) * self.num_timesteps

    def time_of_timestep(self, tau) -> torch.Tensor:
        return ((self.num_timesteps - 1) - _f64(tau)) / self.num_timesteps

    def _log_ac(self, t, derivative: bool = False) -> torch.Tensor:
        """log(alphas_cumprod) at canonical t by cubic Hermite interpolation (or its d/dt)."""
        x = self.timestep(t) + 1.0  # knot coordinate: knot k sits at x = k
        n = self._y.numel()
        k = torch.clamp(torch.floor(x), 0, n - 2).long()
        s = x - k
        y0, y1, m0, m1 = self._y[k], self._y[k + 1], self._m[k], self._m[k + 1]
        if not derivative:
            h00 = (1 + 2 * s) * (1 - s) ** 2
            h10 = s * (1 - s) ** 2
            h01 = s * s * (3 - 2 * s)
            h11 = s * s * (s - 1)
            return h00 * y0 + h10 * m0 + h01 * y1 + h11 * m1
        d00 = 6 * s * s - 6 * s
        d10 = 3 * s * s - 4 * s + 1
        d01 = -6 * s * s + 6 * s
        d11 = 3 * s * s - 2 * s
        dy_dx = d00 * y0 + d10 * m0 + d01 * y1 + d11 * m1
        return -self.num_timesteps * dy_dx  # dx/dt = -N

    def alpha(self, t):
        return torch.exp(0.5 * self._log_ac(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._log_ac(t)))

    def d_alpha(self, t):
        return 0.5 * self._log_ac(t, derivative=True) * self.alpha(t)

    def sigma_d_sigma(self, t):
        # (sigma^2)' / 2 = -(alphas_cumprod)' / 2
        return -0.5 * self._log_ac(t, derivative=True) * torch.exp(self._log_ac(t))

    def d_sigma(self, t):
        return self.sigma_d_sigma(t) / self.sigma(t)

    def log_snr(self, t):
        y = self._log_ac(t)
        return 0.5 * y - 0.5 * torch.log(-torch.expm1(y))

    def __repr__(self):
        return f"VPDiscrete(num_timesteps={self.num_timesteps})"


class VE(Scheduler):
    """Variance exploding (Song et al.): alpha = 1, sigma = sigma_min (sigma_max/sigma_min)^(1-t).

    Not a normalised path (alpha_0 = 1, sigma_1 = sigma_min > 0).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise BespokeError(f"VE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t):
        return torch.ones_like(_f64(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp((1.0 - _f64(t)) * self._log_ratio)

    def d_alpha(self, t):
        return torch.zeros_like(_f64(t))

    def d_sigma(self, t):
        return -self._log_ratio * self.sigma(t)

    def log_snr(self, t):
        return -(math.log(self.sigma_min) + (1.0 - _f64(t)) * self._log_ratio)

    def t_of_log_snr(self, lam):
        return 1.0 + (_f64(lam) + math.log(self.sigma_min)) / self._log_ratio

    def __repr__(self):
        return f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class EDM(Scheduler):
    """EDM (Karras et al.): alpha = 1, sigma(t) = (smax^(1/rho) + t (smin^(1/rho) - smax^(1/rho)))^rho.

    With t uniform this is exactly EDM's time-step discretisation (spec §1.2). `sigma_min = 0`
    gives a path that reaches the data (sigma_1 = 0).
    """

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 <= sigma_min < sigma_max or rho <= 0:
            raise BespokeError(f"EDM needs 0 <= sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self._a = sigma_max ** (1.0 / rho)
        self._b = sigma_min ** (1.0 / rho) - self._a

    def alpha(self, t):
        return torch.ones_like(_f64(t))

    def sigma(self, t):
        return (self._a + _f64(t) * self._b) ** self.rho

    def d_alpha(self, t):
        return torch.zeros_like(_f64(t))

    def d_sigma(self, t):
        return self.rho * self._b * (self._a + _f64(t) * self._b) ** (self.rho - 1.0)

    def log_snr(self, t):
        return -self.rho * torch.log(self._a + _f64(t) * self._b)

    def t_of_log_snr(self, lam):
        return (torch.exp(-_f64(lam) / self.rho) - self._a) / self._b

    def __repr__(self):
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"


class Preconditioned(Scheduler):
    """BNS preconditioning ([BNS] Eq. 14, spec §3.3): alpha_bar = alpha, sigma_bar = sigma0 * sigma.

    The same model seen with a source distribution of standard deviation sigma0: the NS solver runs
    on the scale-time transform of the flow onto this path (`scale_time_flow`), which starts from
    sigma0 * x_0 and puts more of a uniform grid at high noise. sigma0 = 1 is the path itself.
    """

    name = "preconditioned"

    def __init__(self, base: Scheduler, sigma0: float):
        if not (isinstance(sigma0, (int, float)) and math.isfinite(sigma0) and sigma0 > 0):
            raise BespokeError(f"the preconditioning sigma0 must be a positive number (1 = off), got {sigma0!r}")
        self.base, self.sigma0 = base, float(sigma0)

    def alpha(self, t):
        return self.base.alpha(t)

    def sigma(self, t):
        return self.sigma0 * self.base.sigma(t)

    def d_alpha(self, t):
        return self.base.d_alpha(t)

    def d_sigma(self, t):
        return self.sigma0 * self.base.d_sigma(t)

    def sigma_d_sigma(self, t):
        return self.sigma0**2 * self.base.sigma_d_sigma(t)

    def log_snr(self, t):
        return self.base.log_snr(t) - math.log(self.sigma0)

    def t_of_log_snr(self, lam):
        return self.base.t_of_log_snr(_f64(lam) + math.log(self.sigma0))

    def __repr__(self):
        return f"Preconditioned({self.base!r}, sigma0={self.sigma0:g})"


SCHEDULERS = {
    "condot": CondOT,
    "cosine": Cosine,
    "vp": VPLinear,
    "vp-discrete": VPDiscrete.ddpm_linear,
    "ve": VE,
    "edm": EDM,
}


def scheduler_from_name(name: str) -> Scheduler:
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise BespokeError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}") from None


# --- scale-time change between schedulers ([BES] Thm 2.3, spec §1.5) ---------------------------


@dataclass(frozen=True)
class ScaleTime:
    """Values of a scale-time transformation at r: x_bar(r) = s_r x(t_r) (spec §1.4)."""

    t: torch.Tensor
    s: torch.Tensor
    dt: torch.Tensor  # d t_r / dr
    ds: torch.Tensor  # d s_r / dr


def scale_time(source: Scheduler, target: Scheduler, r, *, clamp: bool = False) -> ScaleTime:
    """The ST map that turns trajectories of `source` into trajectories of `target` (Thm 2.3).

    t_r = rho^{-1}(rho_bar(r)),  s_r = sigma_bar_r / sigma_{t_r} (= alpha_bar_r / alpha_{t_r}),
    t'_r = rho_bar'(r) / rho'(t_r) = D_bar_r / (D_{t_r} s_r^2),
    s'_r = (sigma_{t_r} sigma_bar'_r - sigma_bar_r sigma'_{t_r} t'_r) / sigma_{t_r}^2.
    Each ratio is taken in the form that stays finite at the end it is used at.
    clamp: where the target's log-SNR leaves the source's range, use the source's end (t_r = 0 or 1)
    instead of raising (the values there are then those of the nearest map the source allows).
    """
    r = _f64(r)
    lam = target.log_snr(r)
    lo, hi = float(source.log_snr(0.0)), float(source.log_snr(1.0))
    if clamp:
        lam = lam.clamp(lo, hi)
    elif torch.any((lam < lo) | (lam > hi)):
        raise BespokeError(
            f"{target!r} reaches log-SNRs outside [{lo:.4g}, {hi:.4g}], the range of {source!r}, so it is no "
            "scale-time transform of it there (Thm 2.3 needs the source to cover the target's SNRs)"
        )
    t = source.t_of_log_snr(lam)
    a_bar, s_bar = target.alpha(r), target.sigma(r)
    a, s_ = source.alpha(t), source.sigma(t)
    # s_r: use alpha_bar/alpha near the data end and sigma_bar/sigma near the noise end (spec §1.5)
    scale = torch.where(s_ >= a, s_bar / s_, a_bar / a)
    # t' = rho_bar'(r) / rho'(t_r) = D_bar / (D s^2), using sigma/sigma_bar = alpha/alpha_bar = 1/s
    dt = target.denominator(r) / (source.denominator(t) * scale * scale)
    # s = sigma_bar/sigma => s'/s = sigma_bar'/sigma_bar - sigma'/sigma t'  (and the alpha form, equal)
    dscale = torch.where(
        s_ >= a,
        scale * (target.d_sigma(r) / s_bar - source.d_sigma(t) / s_ * dt),
        scale * (target.d_alpha(r) / a_bar - source.d_alpha(t) / a * dt),
    )
    return ScaleTime(t=t, s=scale, dt=dt, ds=dscale)
