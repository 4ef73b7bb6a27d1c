"""Accuracy against ground truth from the same noise (DESIGN §3, §8).

Per-sample RMSE = sqrt(mean of squared error over all coordinates); per-sample
PSNR = 20 log10(R / RMSE) with R the data range (2 for data in [-1, 1]); reported as the mean over
samples (not the PSNR of the batch MSE).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch

from .errors import BespokeError
from .solvers.adaptive import GroundTruth

__all__ = ["rmse", "psnr", "EvalResult", "evaluate"]


def _pair(x: torch.Tensor, ref):
    ref = ref.samples if isinstance(ref, GroundTruth) else ref
    if x.shape != ref.shape:
        raise BespokeError(
            f"samples of shape {tuple(x.shape)} cannot be scored against a reference of shape {tuple(ref.shape)}"
        )
    return x.detach().to(torch.float64).flatten(1), ref.detach().to(torch.float64, copy=False).to(x.device).flatten(1)


def rmse(x: torch.Tensor, ref) -> torch.Tensor:
    """Per-sample root-mean-square error, shape (batch,), float64. `ref`: a tensor or a GroundTruth."""
    a, b = _pair(x, ref)
    return (a - b).pow(2).mean(1).sqrt()


def psnr(x: torch.Tensor, ref, data_range: float = 2.0, reduction: str = "mean"):
    """Per-sample PSNR in dB, averaged over samples (reduction="mean") or not ("none")."""
    if data_range <= 0:
        raise BespokeError(f"data_range must be > 0, got {data_range}")
    per = 20.0 * torch.log10(data_range / rmse(x, ref))
    if reduction == "none":
        return per
    if reduction != "mean":
        raise BespokeError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(per.mean())


@dataclass
class EvalResult:
    """One row of an evaluation (the eval-JSON contract of DESIGN §6)."""

    solver: str
    nfe: int
    psnr_db: float
    rmse: float
    num_samples: int
    seconds: float
    samples: torch.Tensor | None = field(default=None, repr=False, compare=False)  # with keep_samples=True

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}


def evaluate(
    solver,
    flow,
    noise: torch.Tensor,
    reference: torch.Tensor,
    *,
    data_range: float | None = None,
    name: str | None = None,
    keep_samples: bool = False,
    **cond,
) -> EvalResult:
    """Run `solver` on `noise`, count the NFE it really spends per sample, and score it against `reference`
    (keep_samples: also return the samples, as `.samples`)."""
    t0 = time.perf_counter()
    with torch.no_grad(), flow.counting() as count:
        x = solver.sample(flow, noise, **cond)
    seconds = time.perf_counter() - t0
    return EvalResult(
        solver=name or getattr(solver, "name", str(solver)),
        nfe=count.nfe,
        psnr_db=psnr(x, reference, flow.data_range if data_range is None else data_range),
        rmse=float(rmse(x, reference).mean()),
        num_samples=noise.shape[0],
        seconds=seconds,
        samples=x if keep_samples else None,
    )
