"""Exponential integrators in data-prediction form: DDIM, DPM-Solver++(2M), UniPC (bh2).

All three step the exact linear part of the ODE in the half log-SNR lambda and approximate the
data prediction x1_hat (spec §1.3, §3.2):
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) * [polynomial in past x1_hat],
h_i = lambda_{i+1} - lambda_i. h is infinite on a step that starts from pure noise (alpha = 0) or
ends at the data (sigma = 0); the formulas are written so that those limits come out exactly.
"""

from __future__ import annotations

import math

import numpy as np

from .common import PathValues, lincomb, start

__all__ = ["ddim", "dpmpp_2m", "unipc"]


def ddim(ev, times, scheduler):
    """DDIM (Song et al. 2021), deterministic: x_{i+1} = alpha_{i+1} x1_hat_i + sigma_{i+1} eps_hat_i."""
    p = PathValues.on(scheduler, times)
    x = start(ev, times, scheduler)
    for i in range(len(times) - 1):
        u = ev(times[i], x)
        x = p.alpha[i + 1] * p.x1_hat(i, x, u) + p.sigma[i + 1] * p.eps_hat(i, x, u)
    return x


def dpmpp_2m(ev, times, scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2); first order on the first and the last step.

    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) [(1 + 1/(2 r_i)) d_i - d_{i-1}/(2 r_i)],
    d_i = x1_hat_i, r_i = h_{i-1} / h_i.
    """
    p = PathValues.on(scheduler, times)
    n = len(times) - 1
    x = start(ev, times, scheduler)
    d_prev = None
    for i in range(n):
        d = p.x1_hat(i, x, ev(times[i], x))
        h = p.h(i)
        if d_prev is not None and i < n - 1:
            w = 0.5 * h / p.h(i - 1)  # 1 / (2 r_i); 0 after a step of infinite h
            D = lincomb((1 + w) * d, [(-w, d_prev)])
        else:
            D = d
        x = (p.sigma[i + 1] / p.sigma[i]) * x - (p.alpha[i + 1] * math.expm1(-h)) * D
        d_prev = d
    return x


def _uni_coefficients(p: PathValues, s0: int, target: int, hist: list[int]):
    """UniPC's (bh2) R matrix, b vector and the scalars h_phi_1, B_h for a step s0 -> target.

    rks are the history points' lambda offsets in units of h, with the target appended as 1.
    """
    h = p.lam[target] - p.lam[s0]
    hh = -h  # data prediction
    rks = [(p.lam[k] - p.lam[s0]) / h for k in hist] + [1.0]
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    B_h = h_phi_1  # bh2
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    R, b = [], []
    for k in range(1, len(rks) + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(R), np.array(b), rks, h_phi_1, B_h


def _uni_step(p: PathValues, x, s0: int, target: int, hist: list[int], m: dict, m_target=None):
    """UniP (predictor, m_target None) or UniC (corrector with the output at the target)."""
    R, b, rks, h_phi_1, B_h = _uni_coefficients(p, s0, target, hist)
    D1s = [(m[k] - m[s0]) / r for k, r in zip(hist, rks)]
    x_lin = (p.sigma[target] / p.sigma[s0]) * x - (p.alpha[target] * h_phi_1) * m[s0]
    if m_target is None:
        rhos = np.linalg.solve(R[:-1, :-1], b[:-1]) if hist else []
        terms = list(zip(rhos, D1s))
    else:
        rhos = np.linalg.solve(R, b)
        terms = list(zip(rhos[:-1], D1s)) + [(rhos[-1], m_target - m[s0])]
    return lincomb(x_lin, [(-p.alpha[target] * B_h * float(r), d) for r, d in terms])


def unipc(ev, times, scheduler, order: int = 2):
    """UniPC (Zhao et al. 2023), bh2 variant, data prediction; multistep predictor UniP and corrector
    UniC, the corrector reusing the next evaluation (no extra NFE). Warm-up with lower orders and
    lower order at the last steps (order_i = min(order, i + 1, n - i)), as in the reference code.
    The rho coefficients are always solved from (R, b) (the reference hard-codes 1/2 for the
    lowest orders, its h -> 0 limit), which keeps steps of infinite h exact. History points at
    infinite lambda (pure noise) carry no information for the lambda-polynomial and are skipped.
    """
    p = PathValues.on(scheduler, times)
    n = len(times) - 1

    def history(s0, order_):
        ks = [s0 - j for j in range(1, order_)]
        return [k for k in ks if k >= 0 and p.is_finite(k)]

    x = start(ev, times, scheduler)
    m = {}
    base_prev, order_prev = None, None
    for i in range(n):
        m[i] = p.x1_hat(i, x, ev(times[i], x))
        if i > 0:  # UniC: correct x_i with the output evaluated at the predicted x_i
            x = _uni_step(p, base_prev, i - 1, i, history(i - 1, order_prev), m, m_target=m[i])
        order_i = min(order, i + 1, n - i)
        base_prev, order_prev = x, order_i
        x = _uni_step(p, x, i, i + 1, history(i, order_i), m)  # UniP
    return x
