"""Training a BNS solver ([BNS] Algorithm 2, spec §3.4-3.5).

    theta_0 = a dedicated solver in NS form (the best one on the validation pairs by default)
    minimise  L(theta) = mean over pairs of log ||x_n^theta(x_0) - x(1)||^2     (Eq. 13, per-sample MSE)
by full back-propagation through the n steps (the model frozen), selecting the parameters with the
best validation PSNR. The pairs (x_0, x(1)) come from the ground-truth cache (`gt_cache.py`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import BespokeError
from ..metrics import psnr
from ..solvers import METHODS, solver
from ..solvers.bns import BNSSolver
from .loop import FitConfig, batch_indices, fit

__all__ = ["train_bns", "init_candidates", "select_init", "solver_psnr"]


def _cond(pairs, idx=None) -> dict:
    if pairs.labels is None:
        return {}
    return {"labels": pairs.labels if idx is None else pairs.labels[idx]}


def _to(pairs, device):
    moved = {k: getattr(pairs, k).to(device) for k in ("noise", "samples")}
    labels = pairs.labels.to(device) if pairs.labels is not None else None
    return dataclasses.replace(pairs, labels=labels, **moved)


def solver_psnr(s, flow, pairs, *, batch_size: int = 256, per_sample: bool = False):
    """Mean per-sample PSNR of solver `s` against the pairs' ground truth (no gradients), or all of them."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            sl = slice(i, i + batch_size)
            idx = torch.arange(i, min(i + batch_size, len(pairs)))
            x = s.sample(flow, pairs.noise[sl], **_cond(pairs, idx))
            out.append(psnr(x, pairs.samples[sl], flow.data_range, reduction="none"))
    per = torch.cat(out)
    return per if per_sample else float(per.mean())


def init_candidates(flow, nfe: int) -> list[str]:
    """Every built-in solver that takes exactly `nfe` evaluations on this flow and compiles to NS form."""
    names = []
    for name, method in METHODS.items():
        if method.largest_nfe(nfe) != nfe or (method.needs_scheduler and flow.scheduler is None):
            continue
        names.append(name)
    return names


def select_init(flow, pairs, nfe: int, *, sigma0: float = 1.0, candidates=None, max_pairs: int = 256):
    """The candidate with the best PSNR on (the first `max_pairs` of) `pairs`, as a BNS solver.

    Returns (solver, {name: psnr}); candidates are solver names (each on its recommended grid)."""
    candidates = list(candidates or init_candidates(flow, nfe))
    sub = pairs.slice(0, min(max_pairs, len(pairs)))
    scores, best = {}, None
    for name in candidates:
        bns = BNSSolver.from_solver(solver(name, nfe), flow, sigma0=sigma0)
        scores[name] = solver_psnr(bns, flow, sub)
        if best is None or scores[name] > scores[best[0]]:
            best = (name, bns)
    if best is None:
        raise BespokeError(f"no built-in solver takes NFE {nfe} on {flow.name}; choose --init explicitly")
    return best[1], scores


def _initial_solver(flow, val, nfe, init, sigma0):
    if isinstance(init, BNSSolver):
        if init.nfe != nfe:
            raise BespokeError(f"the initial BNS solver has NFE {init.nfe}, not {nfe}")
        return init, {}
    if init in (None, "auto", "best"):
        return select_init(flow, val, nfe, sigma0=sigma0)
    return BNSSolver.from_solver(solver(init, nfe), flow, sigma0=sigma0), {}


def _learning_rate(lr: float, module: BNSSolver, flow, val) -> float:
    """Adam moves every parameter by about lr per step whatever its gradient, so from an accurate start
    a step must not move the output by more than the start's own error: lr <= 0.3 RMSE_0 (in units of
    half the data range). Measured on zoo:gmm2d, NFE 16 from 64 dB: lr 1e-2 -> collapses to the start,
    0.3 RMSE_0 (8e-4) -> 76.4 dB. Starts worse than ~45 dB keep the configured lr."""
    per_sample = solver_psnr(module, flow, val.slice(0, min(len(val), 256)), per_sample=True)
    rmse0 = float((flow.data_range * 10 ** (-per_sample / 20)).mean())
    return min(lr, 0.3 * rmse0 / (flow.data_range / 2))


def train_bns(
    flow,
    train,
    val,
    nfe: int,
    *,
    init="auto",
    sigma0: float = 1.0,
    config: FitConfig | None = None,
    checkpoint=None,
    grad_checkpoint: bool = False,
    device=None,
    quiet: bool = False,
) -> BNSSolver:
    """A BNS solver for `flow` at `nfe`, trained on the `train` pairs and selected on the `val` pairs.

    train, val: ground-truth pairs (`GTCache` or its `slice`s) with .noise, .samples, .labels.
    init:       "auto" (the best dedicated solver on val), a built-in solver name, or a BNSSolver.
    checkpoint: a path; the run saves there at every validation and resumes from it if it exists.
    device:     where the flow runs (the pairs and the solver's parameters are moved there).
    The returned solver carries `training_summary` (validation PSNR at init and best, iterations,
    wall time, ...), which solver files record.
    """
    config = config or FitConfig()
    if len(train) == 0 or len(val) == 0:
        raise BespokeError("training needs at least one training and one validation pair")
    if device is not None:
        train, val = _to(train, device), _to(val, device)
    module, init_scores = _initial_solver(flow, val, nfe, init, sigma0)
    config = dataclasses.replace(config, lr=_learning_rate(config.lr, module, flow, val))
    if device is not None:
        module.to(device)
    module.model_fingerprint = flow.fingerprint

    def log_mse(m, idx):  # Eq. 13: per-sample log-MSE against the ground truth, summed
        x = m.sample(flow, train.noise[idx], checkpoint=grad_checkpoint, **_cond(train, idx))
        err = (x - train.samples[idx].to(x.dtype)).flatten(1).pow(2).mean(1)
        return torch.log(err.clamp(min=1e-30)).sum()

    def loss_fn(m, it):  # phase 1: the mean over a mini-batch
        idx = batch_indices(len(train), config.batch_size, config.seed, it)
        return log_mse(m, idx) / len(idx)

    def full_loss_fn(m):  # phase 2: the mean over all training pairs, back-propagated chunk by chunk
        total = 0.0
        for idx in torch.arange(len(train)).split(config.batch_size):
            loss = log_mse(m, idx) / len(train)
            loss.backward()
            total += loss.item()
        return torch.tensor(total, dtype=torch.float64)

    signature = {
        "kind": "bns",
        "nfe": nfe,
        "init": module.init,
        "sigma0": sigma0,
        "model": flow.fingerprint,
        "train": len(train),
        "val": len(val),
    }
    result = fit(
        module,
        loss_fn,
        lambda m: solver_psnr(m, flow, val),
        config,
        full_loss_fn=full_loss_fn,
        checkpoint=checkpoint,
        signature=signature,
        desc=f"bns nfe={nfe}",
        quiet=quiet,
    )
    module.training_summary = {
        "objective": "mean per-sample log-MSE (BNS Eq. 13)",
        "init": module.init,
        "init_candidates_psnr": {k: round(v, 4) for k, v in init_scores.items()},
        "train_pairs": len(train),
        "val_pairs": len(val),
        "val_psnr_init": round(result.initial_val, 4),
        "val_psnr": round(result.best_val, 4),
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "config": dict(vars(config)),  # lr as used: capped by the initial error (see _learning_rate)
        "history": [[i, round(v, 4)] for i, v in result.history],
        "grad_checkpoint": grad_checkpoint,
    }
    return module
