"""Training a BNS solver ([BNS] Algorithm 2, spec §3.4-3.5).

    theta_0 = a dedicated solver in NS form (the best one on the validation pairs by default)
    minimise  L(theta) = mean over pairs of log ||x_n^theta(x_0) - x(1)||^2     (Eq. 13, per-sample MSE)
by full back-propagation through the n steps (the model frozen), selecting the parameters with the
best validation PSNR. The pairs (x_0, x(1)) come from the ground-truth cache (`gt_cache.py`).
"""

from __future__ import annotations

import torch

from ..errors import BespokeError, NonFiniteVelocity
from ..solvers import METHODS, Solver, solver
from ..solvers.bns import BNSSolver
from .least_squares import has_trajectories, least_squares_coefficients
from .loop import FitConfig
from .pairs import cond_of, fit_solver, solver_psnr, training_summary

__all__ = ["train_bns", "init_candidates", "select_init", "log_mse_loss", "BNS_ITERATIONS"]

# Adam steps after the least-squares start (benchmarks/bns_ceiling.py): the start brings most of the gain
BNS_ITERATIONS = 150


def log_mse_loss(m, flow, pairs, idx, checkpoint: bool = False) -> torch.Tensor:
    """Eq. 13: the per-sample log-MSE of solver m's samples against the ground truth, mean over pairs idx."""
    x = m.sample(flow, pairs.noise[idx], checkpoint=checkpoint, **cond_of(pairs, idx))
    err = (x - pairs.samples[idx].to(x.dtype)).flatten(1).pow(2).mean(1)
    return torch.log(err.clamp(min=1e-30)).mean()


def init_candidates(flow, nfe: int) -> list[str]:
    """Every built-in solver that takes exactly `nfe` evaluations on this flow and compiles to NS form."""
    names = []
    for name, method in METHODS.items():
        if method.largest_nfe(nfe) != nfe or (method.needs_scheduler and flow.scheduler is None):
            continue
        names.append(name)
    return names


def select_init(flow, pairs, nfe: int, *, sigma0: float = 1.0, candidates=None, max_pairs: int = 256, train=None):
    """The candidate with the best PSNR on (the first `max_pairs` of) `pairs`, as a BNS solver.

    Returns (solver, {name: psnr}); candidates are solver names (each on its recommended grid). With
    `train` pairs that hold dense trajectories, each candidate's time grid also enters with the
    least-squares coefficients for those times (`NAME+lsq`, see least_squares.py). A candidate that
    cannot run on this flow (e.g. Heun evaluating at the singular data end of a VP path) scores NaN and
    is passed over; it is an error only if none can run."""
    candidates = list(candidates or init_candidates(flow, nfe))
    sub = pairs.slice(0, min(max_pairs, len(pairs)))
    scores, best, failures, grids = {}, None, [], set()

    def consider(name, make):
        nonlocal best
        try:
            bns = make()
            scores[name] = solver_psnr(bns, flow, sub)
        except NonFiniteVelocity as e:
            scores[name] = float("nan")
            failures.append(f"{name}: {e}")
            return None
        if best is None or scores[name] > scores[best[0]]:
            best = (name, bns)
        return bns

    for name in candidates:
        bns = consider(name, lambda name=name: BNSSolver.from_solver(solver(name, nfe), flow, sigma0=sigma0))
        grid = None if bns is None else tuple(round(t, 9) for t in bns.times().tolist())
        if bns is not None and train is not None and has_trajectories(train) and grid not in grids:
            grids.add(grid)  # one refit per distinct grid (euler, ddim and midpoint share theirs)
            consider(f"{bns.init}+lsq", lambda bns=bns: least_squares_coefficients(flow, bns, train))
    if best is None:
        why = "; ".join(failures) if failures else f"no built-in solver takes NFE {nfe} on {flow.name}"
        raise BespokeError(f"no initial solver can run: {why}; choose --init explicitly")
    return best[1], scores


def _initial_solver(flow, train, val, nfe, init, sigma0, least_squares):
    """init: "auto", a built-in solver name, "KIND:FILE" (a learned solver from a solver file, e.g.
    bespoke-rk2:solver.safetensors), a BNSSolver to continue from, or any other Solver (e.g. a BespokeSolver)."""
    if isinstance(init, BNSSolver):
        if init.nfe != nfe:
            raise BespokeError(f"the initial BNS solver has NFE {init.nfe}, not {nfe}")
        return init, {}
    if init in (None, "auto", "best"):
        return select_init(flow, val, nfe, sigma0=sigma0, train=train if least_squares else None)
    if isinstance(init, str) and ":" in init:
        init = _learned_from_file(init, nfe, flow)
    start = init if isinstance(init, Solver) else solver(init, nfe)
    if start.nfe != nfe:
        raise BespokeError(f"the initial solver {start.name} takes NFE {start.nfe}, not {nfe}")
    return BNSSolver.from_solver(start, flow, sigma0=sigma0), {}


def _learned_from_file(spec: str, nfe: int, flow):
    from ..solvers.files import KINDS, load_solver

    kind, path = spec.split(":", 1)
    if kind not in KINDS:
        raise BespokeError(
            f"init {spec!r}: unknown solver kind {kind!r}; write KIND:FILE with KIND one of {', '.join(KINDS)}"
        )
    learned = load_solver(path, nfe, flow=flow)
    if learned.kind != kind:
        raise BespokeError(f"init {spec!r}: {path} holds a {learned.kind} solver at NFE {nfe}, not {kind}")
    return learned


def train_bns(
    flow,
    train,
    val,
    nfe: int,
    *,
    init="auto",
    sigma0: float = 1.0,
    least_squares: bool = True,
    config: FitConfig | None = None,
    checkpoint=None,
    grad_checkpoint: bool = False,
    device=None,
    quiet: bool = False,
) -> BNSSolver:
    """A BNS solver for `flow` at `nfe`, trained on the `train` pairs and selected on the `val` pairs.

    train, val: ground-truth pairs (`GTCache` or its `slice`s) with .noise, .samples, .labels.
    init:       "auto" (the best on val of every dedicated solver and, when `train` holds dense
                trajectories and least_squares is on, of each one's times with least-squares coefficients:
                least_squares.py), a built-in solver name, or a BNSSolver.
    checkpoint: a path; the run saves there at every validation and resumes from it if it exists.
    device:     where the flow runs (the pairs and the solver's parameters are moved there).
    The returned solver carries `training_summary` (validation PSNR at init and best, iterations,
    wall time, ...), which solver files record.
    """

    module, result, init_scores, config = fit_solver(
        flow,
        train,
        val,
        lambda t, v: _initial_solver(flow, t, v, nfe, init, sigma0, least_squares),
        lambda m, pairs, idx, it: log_mse_loss(m, flow, pairs, idx, grad_checkpoint),
        config,
        signature={"sigma0": sigma0, "least_squares": least_squares},
        checkpoint=checkpoint,
        device=device,
        quiet=quiet,
    )
    module.training_summary = training_summary(
        "mean per-sample log-MSE (BNS Eq. 13)",
        module.init,
        init_scores,
        train,
        val,
        result,
        config,
        grad_checkpoint=grad_checkpoint,
    )
    return module
