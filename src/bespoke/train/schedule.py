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

from ..errors import BespokeError, NonFiniteVelocity
from ..solvers.grids import CONTINUOUS
from ..solvers.schedule import ScheduleSolver, parse_nfe_range
from .bns import log_mse_loss
from .loop import FitConfig
from .pairs import fit_solver, solver_psnr, training_summary

__all__ = ["train_schedule", "select_grid", "SCHEDULE_KNOTS", "SCHEDULE_ITERATIONS", "SCHEDULE_LR"]

SCHEDULE_KNOTS = 8
SCHEDULE_ITERATIONS = 150  # `bespoke train --solver schedule:METHOD`
# Adam's peak learning rate: 1e-2 (the BNS default) moved the warp too little in 150 steps to improve all of
# NFE 3, 11 and 20 at once on zoo:digits-ot (kept: the start); 5e-2 gained +1.6 to +2.3 dB at 5-20 in 60 steps
SCHEDULE_LR = 5e-2


def select_grid(flow, val, base: str, nfe_range, knots: int, max_pairs: int = 256):
    """The schedule (identity warp) on the fixed grid with the best mean PSNR at the validation NFEs, and
    {base[grid]: that PSNR} for every grid (NaN where the method cannot run on it). The method's recommended
    grid is not always its best: dpm++2m on zoo:digits-vp, NFE 5: uniform 27.8 dB, log-SNR 22.3 dB."""
    sub = val.slice(0, min(max_pairs, len(val)))
    scores, best = {}, None
    for grid in CONTINUOUS:
        s = ScheduleSolver(base, nfe_range, knots=knots, grid=grid)
        try:
            score = sum(solver_psnr(v, flow, sub) for v in s.validation_views()) / len(s.validation_views())
        except (BespokeError, NonFiniteVelocity):  # e.g. a grid the path cannot take
            score = float("nan")
        scores[s.init] = score
        if score == score and (best is None or score > scores[best.init]):
            best = s
    if best is None:
        raise BespokeError(f"{base} cannot run on any grid of {flow.name}: {scores}")
    return best, scores


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
    before = ScheduleSolver(base, nfe_range, knots=knots, grid=start.grid_name)  # as the run started
    views = {
        v.nfe: (solver_psnr(b, flow, val), solver_psnr(v, flow, val))
        for b, v in zip(before.validation_views(), module.validation_views())
    }
    module.training_summary = training_summary(
        "mean per-sample log-MSE (BNS Eq. 13), one NFE of the range per iteration; kept: the largest smallest "
        "validation gain over the method's grid at the validation NFEs (the history)",
        module.init,
        scores,
        train,
        val,
        result,
        config,
        grad_checkpoint=grad_checkpoint,
    )
    module.training_summary.update(  # PSNRs, where the history and selection are gains
        val_psnr_init=round(sum(a for a, _ in views.values()) / len(views), 4),
        val_psnr=round(sum(b for _, b in views.values()) / len(views), 4),
        val_psnr_by_nfe={str(n): [round(a, 4), round(b, 4)] for n, (a, b) in views.items()},
    )
    return module
