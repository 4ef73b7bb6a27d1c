"""Training a learned schedule (solvers/schedule.py): the time grid of a built-in method, for a range of NFEs.

    minimise  L(w) = mean over pairs of log ||x_n^w(x_0) - x(1)||^2          (BNS Eq. 13, as train/bns.py)
with n cycling through every NFE of the range, one per iteration (n = valid[it mod len(valid)]), so the
schedule is trained for all of them at the cost of one solve per iteration. It starts from the best fixed
grid of the method (`select_grid`), and the parameters kept are those with the largest *smallest* gain in
validation PSNR over that start among the range's lowest, middle and highest NFE (train/pairs.selection_score):
the schedule is never worse than the method on its best fixed grid there. Everything else (Adam, checkpoints
and bit-identical resume) is the shared loop of train/pairs.py.
"""

from __future__ import annotations

import copy

import torch

from ..errors import BespokeError, NonFiniteVelocity
from ..solvers.grids import CONTINUOUS, continuous_grid
from ..solvers.schedule import ScheduleSolver, parse_nfe_range
from .bns import log_mse_loss
from .loop import FitConfig
from .pairs import fit_solver, range_summary, solver_psnr, training_summary

__all__ = ["train_schedule", "select_grid", "warped_start", "SCHEDULE_KNOTS", "SCHEDULE_ITERATIONS", "SCHEDULE_LR"]

SCHEDULE_KNOTS = 8
SCHEDULE_ITERATIONS = 150  # `bespoke train --solver schedule:METHOD`
# Adam's peak learning rate: 1e-2 (the BNS default) moved the warp too little in 150 steps to improve all of
# NFE 3, 11 and 20 at once on zoo:digits-ot (kept: the start); 5e-2 gained +1.6 to +2.3 dB at 5-20 in 60 steps
SCHEDULE_LR = 5e-2


def select_grid(flow, val, base: str, nfe_range, knots: int, max_pairs: int = 256):
    """The start of training: the fixed grid with the best PSNR at the range's highest NFE, its warp at the
    lowest NFE set to follow the grid that is best there (where they differ); or one fixed grid throughout,
    whichever has the best mean PSNR at the validation NFEs. Returns (schedule, {candidate: that mean PSNR}),
    NaN for a grid the method cannot run on. The method's recommended grid is not always its best, and the best
    changes with the NFE: dpm++2m on zoo:digits-ot is best on the uniform grid at NFE 3-10 (25.9 against
    22.1 dB for log-SNR at 3) and on log-SNR above (54.5 against 52.0 dB at 20)."""
    sub = val.slice(0, min(max_pairs, len(val)))
    lo, hi = parse_nfe_range(nfe_range)
    pure, at_ends = {}, {}
    for grid in CONTINUOUS:
        s = ScheduleSolver(base, nfe_range, knots=knots, grid=grid)
        views = s.validation_views()
        try:
            psnrs = [solver_psnr(v, flow, sub) for v in views]
        except (BespokeError, NonFiniteVelocity):  # e.g. a grid the path cannot take
            continue
        pure[grid] = s
        at_ends[grid] = (psnrs[0], psnrs[-1], sum(psnrs) / len(psnrs))
    if not pure:
        raise BespokeError(f"{base} cannot run on any fixed grid of {flow.name}")
    candidates = {s.init: s for s in pure.values()}
    scores = {name: at_ends[s.grid_name][2] for name, s in candidates.items()}
    low, high = (max(at_ends, key=lambda g: at_ends[g][k]) for k in (0, 1))
    if low != high:
        mixed = warped_start(flow, base, nfe_range, knots, high=high, low=low)
        views = mixed.validation_views()
        scores[mixed.init] = sum(solver_psnr(v, flow, sub) for v in views) / len(views)
        candidates[mixed.init] = mixed
    best = max(scores, key=scores.get)
    return candidates[best], {**{f"{base}[{g}]": float("nan") for g in CONTINUOUS}, **scores}


def warped_start(flow, base: str, nfe_range, knots: int, *, high: str, low: str) -> ScheduleSolver:
    """The schedule on grid `high`, its warp at the range's lowest NFE set so that it follows grid `low` there
    (at the knots; linear between them), moving to `high` alone at the highest NFE as log n grows."""
    lo, _ = parse_nfe_range(nfe_range)
    mixed = ScheduleSolver(base, nfe_range, knots=knots, grid=high, init=f"{base}[{high}; {low} at NFE {lo}]")
    f = torch.linspace(0, 1, knots + 1, dtype=torch.float64)
    mixed.set_heights(0, _inverse_grid(high, continuous_grid(low, f, flow.scheduler, flow.ode_end), flow))
    return mixed


def _inverse_grid(grid: str, times: torch.Tensor, flow, iterations: int = 60) -> torch.Tensor:
    """The fractions f at which grid `grid` reaches `times` (bisection; the map is increasing)."""
    lo, hi = torch.zeros_like(times), torch.ones_like(times)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = continuous_grid(grid, mid, flow.scheduler, flow.ode_end) < times
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    f = 0.5 * (lo + hi)
    f[0], f[-1] = 0.0, 1.0
    return f


def train_schedule(
    flow,
    train,
    val,
    base: str,
    nfe_range,
    *,
    knots: int = SCHEDULE_KNOTS,
    init: str = "auto",
    config: FitConfig | None = None,
    checkpoint=None,
    grad_checkpoint: bool = False,
    device=None,
    quiet: bool = False,
) -> ScheduleSolver:
    """A learned schedule for built-in method `base` on `flow`, for every NFE in `nfe_range` ("4-16" or (4, 16)).

    init: the fixed grid it warps, "auto" (the best of them: `select_grid`) or one of grids.CONTINUOUS.
    config: FitConfig(iterations=SCHEDULE_ITERATIONS, lr=SCHEDULE_LR) by default.
    Returns the solver at the range's highest NFE (`.at(n)` for the others), carrying `training_summary` as
    train_bns's does."""
    nfe_range = parse_nfe_range(nfe_range)
    config = config or FitConfig(iterations=SCHEDULE_ITERATIONS, lr=SCHEDULE_LR)
    scores = {}
    if init in (None, "auto"):
        start, scores = select_grid(flow, val, base, nfe_range, knots)
    else:
        start = ScheduleSolver(base, nfe_range, knots=knots, grid=init)
    start.bind_model(flow)
    before = copy.deepcopy(start)  # training moves the start's parameters in place
    nfes = start.valid_nfes()

    def loss(m, pairs, idx, it):  # one NFE per iteration, cycling; all of them for the whole-set loss
        views = [m.at(n) for n in (nfes if it is None else [nfes[it % len(nfes)]])]
        return sum(log_mse_loss(v, flow, pairs, idx, grad_checkpoint) for v in views) / len(views)

    module, result, _, config = fit_solver(
        flow,
        train,
        val,
        lambda t, v: (start, scores),
        loss,
        config,
        signature={"base": base, "grid": start.grid_name, "nfe_range": list(start.nfe_range), "knots": knots},
        checkpoint=checkpoint,
        device=device,
        quiet=quiet,
    )
    module.training_summary = training_summary(
        "mean per-sample log-MSE (BNS Eq. 13), one NFE of the range per iteration; kept: the largest smallest "
        "validation gain over the start at the validation NFEs (the history)",
        module.init,
        scores,
        train,
        val,
        result,
        config,
        grad_checkpoint=grad_checkpoint,
    )
    module.training_summary.update(range_summary(before, module, flow, val, device))
    return module
