"""Ground-truth pairs as training and validation data: conditioning, device moves, scoring a solver.

Pairs are a `GTCache` (or a slice of one): .noise, .samples, .labels and optional dense trajectories.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..distributed import all_reduce_sum, rank, world_size
from ..errors import BespokeError
from ..metrics import psnr
from .loop import FitConfig, batch_indices, fit

__all__ = [
    "cond_of",
    "to_device",
    "solver_psnr",
    "capped_learning_rate",
    "training_summary",
    "range_summary",
    "fit_solver",
]


def cond_of(pairs, idx=None) -> dict:
    """The conditioning keywords of pairs idx (all if None): {"labels": ...} or {}."""
    if pairs.labels is None:
        return {}
    return {"labels": pairs.labels if idx is None else pairs.labels[idx]}


def to_device(pairs, device):
    """The pairs (noise, samples, labels, dense trajectories) moved to `device`."""
    keys = ("noise", "samples", "labels", "trajectory_times", "trajectory_states", "trajectory_velocities")
    moved = {k: getattr(pairs, k).to(device) for k in keys if getattr(pairs, k, None) is not None}
    return dataclasses.replace(pairs, **moved)


def solver_psnr(s, flow, pairs, *, batch_size: int = 256, per_sample: bool = False):
    """Mean per-sample PSNR of solver `s` against the pairs' ground truth (no gradients), or all of them."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            sl = slice(i, i + batch_size)
            idx = torch.arange(i, min(i + batch_size, len(pairs)))
            x = s.sample(flow, pairs.noise[sl], **cond_of(pairs, idx))
            out.append(psnr(x, pairs.samples[sl], flow.data_range, reduction="none"))
    per = torch.cat(out)
    return per if per_sample else float(per.mean())


# Above this many free parameters the cap shrinks in proportion (BNS at NFE 8 has 51; see capped_learning_rate)
CAP_PARAMETERS = 51


def capped_learning_rate(lr: float, module, flow, val) -> float:
    """Adam moves every parameter by about lr per step whatever its gradient, so from an accurate start
    a step must not move the output by more than the start's own error: lr <= 0.3 RMSE_0 (in units of
    half the data range). Measured on zoo:gmm2d, NFE 16 from 64 dB: lr 1e-2 -> collapses to the start,
    0.3 RMSE_0 (8e-4) -> 76.4 dB. Starts worse than ~45 dB keep the configured lr.

    The more parameters move together, the more the output moves, so a solver with P > CAP_PARAMETERS free
    parameters gets the cap times CAP_PARAMETERS / P. Measured on the digit models, 150 steps from the
    least-squares start (benchmarks/bns_ceiling.py's pairs): at NFE 8 (51 parameters) 0.3 RMSE_0 beats
    0.1 by 0.04-0.26 dB and 1.0 diverges for a while; at NFE 16 (167) 0.1 beats 0.3 by +0.38 (ot), +0.29 (vp)
    and -0.03 dB (cos), and on ot 0.1 beats 0.03 and 0.17 too."""
    per_sample = solver_psnr(module, flow, val.slice(0, min(len(val), 256)), per_sample=True)
    rmse0 = float((flow.data_range * 10 ** (-per_sample / 20)).mean())
    crowd = min(1.0, CAP_PARAMETERS / getattr(module, "num_parameters", CAP_PARAMETERS))
    return min(lr, 0.3 * crowd * rmse0 / (flow.data_range / 2))


def training_summary(objective: str, init: str, init_scores: dict, train, val, result, config, **extra) -> dict:
    """What a solver file records of a training run (validation PSNR at the start and at the best, ...)."""
    return {
        "objective": objective,
        "init": init,
        "init_candidates_psnr": {k: round(v, 4) if math.isfinite(v) else None for k, v in init_scores.items()},
        "train_pairs": len(train),
        "val_pairs": len(val),
        "val_psnr_init": round(result.initial_val, 4),
        "val_psnr": round(result.best_val, 4),
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "config": dict(vars(config)),  # lr as used: capped by the initial error (capped_learning_rate)
        "history": [[i, round(v, 4)] for i, v in result.history],
        **extra,
    }


def fit_solver(flow, train, val, initial, batch_loss, config, *, signature, checkpoint=None, device=None, quiet=False):
    """The training every learned solver kind shares, around `loop.fit`.

    initial(train, val) -> (module, {candidate: psnr}) chooses the starting solver; batch_loss(m, train, idx, it)
    is the mean loss over training pairs idx at iteration it (None: the whole-set loss of the L-BFGS polish).
    Moves data and solver to `device`, caps the learning rate by the start's error (unless the module says
    `caps_learning_rate = False`), selects on `selection_score` and runs the optional L-BFGS polish on the
    whole training set chunk by chunk. Returns (module holding its best parameters, FitResult, scores, config).
    """
    config = config or FitConfig()
    if len(train) == 0 or len(val) == 0:
        raise BespokeError("training needs at least one training and one validation pair")
    if device is not None:
        train, val = to_device(train, device), to_device(val, device)
    module, init_scores = initial(train, val)
    if getattr(module, "caps_learning_rate", True):
        config = dataclasses.replace(config, lr=capped_learning_rate(config.lr, module, flow, val))
    if device is not None:
        module.to(device)
    module.bind_model(flow)

    def share(m, idx, of: int, it) -> torch.Tensor:  # this rank's part of a mean over `of` pairs
        mine = idx[rank() :: world_size()]
        if len(mine) == 0:
            return sum(p.sum() * 0.0 for p in m.parameters())  # no pairs here: a zero with a graph
        return batch_loss(m, train, mine, it) * (len(mine) / of)

    def loss_fn(m, it):  # phase 1: a mini-batch (split over ranks, gradients summed by all_reduce_grads)
        idx = batch_indices(len(train), config.batch_size, config.seed, it)
        return share(m, idx, len(idx), it)

    def full_loss_fn(m):  # phase 2: all training pairs, back-propagated chunk by chunk
        total = torch.zeros((), dtype=torch.float64)
        for idx in torch.arange(len(train)).split(config.batch_size * world_size()):
            part = share(m, idx, len(train), None)
            part.backward()
            total += part.item()
        all_reduce_grads(m)
        all_reduce_sum([total])
        return total

    signature = {"kind": module.kind, "nfe": module.nfe, "init": module.init, **signature}
    signature.update(model=flow.fingerprint, train=len(train), val=len(val))
    result = fit(
        module,
        loss_fn,
        selection_score(module, flow, val),
        config,
        full_loss_fn=full_loss_fn,
        after_backward=all_reduce_grads,
        checkpoint=checkpoint,
        signature=signature,
        desc=f"{module.kind} nfe={module.nfe}",
        quiet=quiet,
    )
    return module, result, init_scores, config


def selection_score(module, flow, val):
    """score(m), which training maximises on the validation pairs: the PSNR; for a module that serves several
    NFEs, the smallest gain in PSNR over the start (`module` as it is now) among its `validation_views()`, so
    that the selected parameters are worse than the start at none of them."""
    if not hasattr(module, "validation_views"):
        return lambda m: distributed_psnr(m, flow, val)
    start = [distributed_psnr(v, flow, val) for v in module.validation_views()]
    return lambda m: min(distributed_psnr(v, flow, val) - s for v, s in zip(m.validation_views(), start))


def range_summary(before, after, flow, val, device=None) -> dict:
    """The PSNRs of a solver that serves a range, where its history and selection are gains: the mean over its
    validation views at the start (`before`) and as kept (`after`), and {NFE: [start, kept]}, scored on `device`
    (where training ran)."""
    if device is not None:
        val, before = to_device(val, device), before.to(device)
    views = {
        v.nfe: (solver_psnr(b, flow, val), solver_psnr(v, flow, val))
        for b, v in zip(before.validation_views(), after.validation_views())
    }
    return {
        "val_psnr_init": round(sum(a for a, _ in views.values()) / len(views), 4),
        "val_psnr": round(sum(b for _, b in views.values()) / len(views), 4),
        "val_psnr_by_nfe": {str(n): [round(a, 4), round(b, 4)] for n, (a, b) in views.items()},
    }


def all_reduce_grads(module) -> None:
    """Sum the solver's gradients over ranks (a few hundred numbers: one all-reduce per parameter)."""
    all_reduce_sum([p.grad for p in module.parameters() if p.grad is not None])


def distributed_psnr(s, flow, pairs) -> float:
    """Mean per-sample PSNR over `pairs`, each rank scoring its share (alone: solver_psnr)."""
    if world_size() == 1:
        return solver_psnr(s, flow, pairs)
    n, k = len(pairs), world_size()
    a, b = n * rank() // k, n * (rank() + 1) // k  # this rank's contiguous share
    total = torch.zeros(2, dtype=torch.float64)
    if b > a:
        total[0] = solver_psnr(s, flow, pairs.slice(a, b), per_sample=True).sum()
        total[1] = b - a
    all_reduce_sum([total])
    return float(total[0] / total[1])
