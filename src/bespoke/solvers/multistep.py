"""Linear multistep methods: iPNDM, Adams-Bashforth up to order 4 with lower-order warm-up.

iPNDM (Zhang & Chen 2023, the DEIS paper) replaces PNDM's RK warm-up by lower-order
Adams-Bashforth steps, so every step costs one NFE. The coefficients are the fixed-step AB ones,
applied on any grid as iPNDM does; we step the flow ODE in canonical time.
"""

from __future__ import annotations

from .common import lincomb, start

__all__ = ["ADAMS_BASHFORTH", "ipndm"]

# x_{i+1} = x_i + h sum_j beta_j u_{i-j}
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm(ev, times, scheduler, order: int = 4):
    """iPNDM: order_i = min(order, i + 1) Adams-Bashforth step on the flow ODE."""
    x = start(ev, times, scheduler)
    us = []
    for i in range(len(times) - 1):
        us.append(ev(times[i], x))
        h = times[i + 1] - times[i]
        beta = ADAMS_BASHFORTH[min(order, i + 1)]
        x = lincomb(x, [(h * bj, us[i - j]) for j, bj in enumerate(beta)])
    return x
