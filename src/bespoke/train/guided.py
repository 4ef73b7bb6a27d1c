"""Training one BNS solver for a range of guidance scales (solvers/guided.py).

data:     GT pairs at several scales w_s (one GT cache per scale; its manifest records the scale)
stage 1:  a BNS solver per anchor scale, trained on that scale's pairs as `train_bns` does (BNS Eq. 13), by
          continuation from the lowest anchor: each starts from the best of its own best start (every dedicated
          solver and its least-squares refit) and the previous anchor's solver (as is, and refitted), so that
          neighbouring anchors lie in one basin and their interpolation stays a good solver
stage 2:  when training scales lie between anchors: all anchors together on
              L(theta) = mean over scales w_s of mean over pairs of log ||x_n^theta(w_s)(x_0) - x_w_s(1)||^2
          (theta(w) interpolated), each Adam step on a share of the batch at every scale, keeping the parameters
          with the best mean validation PSNR over the scales (the stage-1 ones if none beat them).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from ..errors import BespokeError, NonFiniteVelocity
from ..solvers import solver
from ..solvers.bns import BNSSolver
from ..solvers.guided import GuidedBNSSolver, guidance_scale_of
from .bns import BNS_ITERATIONS, init_candidates, log_mse_loss, train_bns
from .least_squares import has_trajectories, least_squares_coefficients
from .loop import FitConfig, batch_indices, fit
from .pairs import solver_psnr, to_device

__all__ = ["train_bns_guided", "JOINT_ITERATIONS"]

JOINT_ITERATIONS = 150  # stage-2 Adam steps; each takes a share of the batch at every scale


def _by_scale(flows: dict, pairs: dict, convention: str | None) -> tuple[dict, dict, str]:
    """({w: flow}, {w: (train, val)}, convention): the scales in the solver's convention, every flow guided, one
    model."""
    if set(pairs) != set(flows) or len(flows) < 2:
        raise BespokeError(
            f"a guided solver needs a flow and GT pairs at each of 2 or more scales; got {sorted(flows)} and "
            f"{sorted(pairs)}"
        )
    if any(f.guidance is None for f in flows.values()):
        raise BespokeError("every flow of a guided solver must run with guidance (load_model(..., guidance=W))")
    if len({f.fingerprint for f in flows.values()}) > 1:
        raise BespokeError("the flows of a guided solver must be one model at several guidance scales")
    convention = convention or next(iter(flows.values())).guidance.convention
    w = {k: guidance_scale_of(f, convention) for k, f in flows.items()}
    if len(set(w.values())) < len(w):
        raise BespokeError(f"two flows of a guided solver run at the same scale: {sorted(w.values())}")
    if any(len(t) == 0 or len(v) == 0 for t, v in pairs.values()):
        raise BespokeError("training needs at least one training and one validation pair at every scale")
    order = sorted(w, key=w.get)
    return {w[k]: flows[k] for k in order}, {w[k]: pairs[k] for k in order}, convention


def _anchors(anchors, scales: list[float]) -> list[float]:
    anchors = sorted(float(w) for w in (anchors if anchors is not None else scales))
    if len(anchors) < 2 or anchors[0] != scales[0] or anchors[-1] != scales[-1]:
        raise BespokeError(
            f"the anchors {anchors} must span the training scales {scales}: the first and last anchor are the "
            "lowest and highest scale trained on"
        )
    missing = [w for w in anchors if w not in scales]
    if missing:
        raise BespokeError(f"anchors {missing} have no GT pairs; every anchor must be one of the scales {scales}")
    return anchors


def _shared_start(flows, pairs, anchors, nfe, init, sigma0, least_squares) -> tuple[dict, dict]:
    """One time grid for every anchor: of the dedicated solvers' grids (or the one `init` names), the one whose
    start (its own coefficients or their least-squares refit at that anchor, whichever is better) has the best
    mean validation PSNR over the anchors. Returns ({w: start at w}, {candidate@w: psnr})."""
    names = init_candidates(flows[anchors[0]], nfe) if init in (None, "auto", "best") else [init]
    best, scores, grids = None, {}, set()
    for name in names:
        try:
            base = BNSSolver.from_solver(solver(name, nfe), flows[anchors[0]], sigma0=sigma0)
        except BespokeError:
            continue
        grid = tuple(round(t, 9) for t in base.times().tolist())
        if grid in grids:  # euler, ddim and midpoint share theirs: their refits coincide
            continue
        grids.add(grid)
        try:
            starts = {w: _rated_start(name, nfe, flows[w], *pairs[w], sigma0, least_squares, scores) for w in anchors}
        except NonFiniteVelocity:  # it evaluates where the model is singular (heun, rk4 at t = 1 of a VP path)
            continue
        mean = sum(v for v, _ in starts.values()) / len(anchors)
        if math.isfinite(mean) and (best is None or mean > best[0]):
            best = (mean, {w: o for w, (_, o) in starts.items()})
    if best is None:
        raise BespokeError(
            f"no initial solver can run at NFE {nfe} on {flows[anchors[0]].name}; choose init explicitly"
        )
    return best[1], scores


def _rated_start(name, nfe, flow, train, val, sigma0, least_squares, scores) -> tuple[float, BNSSolver]:
    """(validation PSNR, start) of the dedicated solver `name` at one scale: its own coefficients or their
    least-squares refit on `train`, whichever is better; each one's PSNR recorded in `scores`."""
    options = [BNSSolver.from_solver(solver(name, nfe), flow, sigma0=sigma0).bind_model(flow)]
    if least_squares and has_trajectories(train):
        options.append(least_squares_coefficients(flow, options[0], train))
    rated = [(solver_psnr(o, flow, val), o) for o in options]
    w = flow.guidance.weight
    scores.update({f"{o.init}@w={w:g}": v for v, o in rated})
    return max(rated, key=lambda r: r[0])


def _anchor_solvers(flows, pairs, anchors, nfe, starts, config, checkpoint, quiet, **run) -> dict:
    """Stage 1: a BNS solver per anchor, trained on its own pairs from its start (`train_bns`)."""
    out = {}
    for w in anchors:
        ckpt = None if checkpoint is None else Path(f"{checkpoint}.w{w:g}")
        train, val = pairs[w]
        out[w] = train_bns(
            flows[w], train, val, nfe, init=starts[w], config=config, checkpoint=ckpt, quiet=quiet, **run
        )
    return out


def train_bns_guided(
    flows: dict,
    pairs: dict,
    nfe: int,
    *,
    anchors=None,
    convention: str | None = None,
    init="auto",
    sigma0: float = 1.0,
    least_squares: bool = True,
    config: FitConfig | None = None,
    joint_iterations: int = JOINT_ITERATIONS,
    checkpoint=None,
    grad_checkpoint: bool = False,
    device=None,
    quiet: bool = False,
) -> GuidedBNSSolver:
    """A BNS solver for every guidance scale in [min w, max w] of one model, at `nfe`.

    flows:   {key: flow}, the model at each training scale (load_model(..., guidance=W)); pairs: {key: (train, val)}
             under the same keys, GT pairs made with that flow (`generate_gt`).
    anchors: the scales that hold parameters (default: every training scale); the first and last are the range's
             ends. Stage 1 trains a BNS solver per anchor (`config`, as train_bns), stage 2 all anchors together on
             every scale (`joint_iterations` Adam steps; only when some training scale lies between anchors).
    convention: of the anchors and of the range ("fm" or "diffusers"; default: the flows').
    checkpoint: a path prefix; each stage checkpoints there and resumes.
    The returned solver's `training_summary` holds the validation PSNR per scale after each stage.
    """
    config = config or FitConfig(iterations=BNS_ITERATIONS)
    flows, pairs, convention = _by_scale(flows, pairs, convention)
    if device is not None:
        pairs = {w: (to_device(t, device), to_device(v, device)) for w, (t, v) in pairs.items()}
    scales = list(flows)
    anchors = _anchors(anchors, scales)
    run = dict(grad_checkpoint=grad_checkpoint, device=device)
    t0 = time.perf_counter()
    starts, scores = _shared_start(flows, pairs, anchors, nfe, init, sigma0, least_squares)
    solvers = _anchor_solvers(flows, pairs, anchors, nfe, starts, config, checkpoint, quiet, **run)
    init_name = ", ".join(f"{solvers[w].init}@w={w:g}" for w in anchors)
    module = GuidedBNSSolver.from_anchors(solvers, convention, init=init_name).bind_model(flows[anchors[0]])
    if device is not None:
        module.to(device)
    between = [w for w in scales if w not in anchors]
    stage1 = _by_scale_psnr(module, flows, pairs)
    result = None
    if between and joint_iterations > 0:
        ckpt = None if checkpoint is None else Path(f"{checkpoint}.joint")
        result = _joint(module, flows, pairs, nfe, config, joint_iterations, ckpt, grad_checkpoint, quiet)
    after = _by_scale_psnr(module, flows, pairs)
    module.training_summary = {
        "objective": "BNS Eq. 13 per anchor, then its mean over every training scale (anchors interpolated)",
        "init": init_name,
        "init_candidates_psnr": {k: round(v, 4) if math.isfinite(v) else None for k, v in scores.items()},
        "guidance_anchors": anchors,
        "guidance_scales": scales,
        "train_pairs": sum(len(t) for t, _ in pairs.values()),
        "val_pairs": sum(len(v) for _, v in pairs.values()),
        "val_psnr_init": round(sum(stage1.values()) / len(scales), 4),
        "val_psnr": round(sum(after.values()) / len(scales), 4),
        "val_psnr_by_guidance": {f"{w:g}": [round(stage1[w], 4), round(after[w], 4)] for w in scales},
        "anchor_training": {f"{w:g}": _brief(solvers[w].training_summary) for w in anchors},
        "iterations": config.iterations * len(anchors) + (result.iterations if result else 0),
        "joint": None
        if result is None
        else {
            "best_iteration": result.best_iteration,
            "iterations": result.iterations,
            "history": [[i, round(v, 4)] for i, v in result.history],
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return module


def _brief(summary: dict) -> dict:
    keep = ("init", "val_psnr_init", "val_psnr", "best_iteration", "iterations", "seconds")
    return {k: summary[k] for k in keep if k in summary}


def _by_scale_psnr(m, flows, pairs) -> dict[float, float]:
    """Validation PSNR at every scale."""
    return {w: solver_psnr(m, flows[w], pairs[w][1]) for w in flows}


def _joint(module, flows, pairs, nfe, config, iterations, checkpoint, grad_checkpoint, quiet):
    """Stage 2: Adam on the mean over scales of Eq. 13, a share of the batch at each scale per step; the kept
    parameters are those with the best mean validation PSNR over the scales (the stage-1 ones if none beat them)."""
    scales = list(flows)
    anchor_psnr = [solver_psnr(module, flows[w], pairs[w][1]) for w in module.anchor_list]
    rmse0 = sum(10 ** (-p / 20) for p in anchor_psnr) / len(anchor_psnr)  # in units of half the data range
    config = dataclasses.replace(config, iterations=iterations, lr=min(config.lr, 0.3 * rmse0 * 2))
    share = max(1, math.ceil(config.batch_size / len(scales)))  # pairs per scale in one Adam step

    def loss_fn(m, it):
        total = 0.0
        for s, w in enumerate(scales):
            train = pairs[w][0]
            idx = batch_indices(len(train), share, config.seed + 7919 * s, it)
            total = total + log_mse_loss(m, flows[w], train, idx, grad_checkpoint)
        return total / len(scales)

    signature = {"kind": "bns-guided", "nfe": nfe, "anchors": module.anchor_list, "scales": scales}
    signature.update(model=module.model_fingerprint, pairs={f"{w:g}": [len(t), len(v)] for w, (t, v) in pairs.items()})
    return fit(
        module,
        loss_fn,
        lambda m: sum(_by_scale_psnr(m, flows, pairs).values()) / len(scales),
        config,
        checkpoint=checkpoint,
        signature=signature,
        desc=f"bns nfe={nfe} w={scales[0]:g}-{scales[-1]:g}",
        quiet=quiet,
    )
