"""The one training loop every learned solver shares: Adam with a decaying learning rate, validation
at fixed intervals, the best-validation parameters kept, early stopping, and checkpoint/resume.

The loop knows nothing of solvers: it minimises `loss_fn(module, iteration)` and maximises
`val_fn(module)`. Everything that decides an iteration's result is a function of the iteration
number (the mini-batch is drawn from a generator seeded with (seed, iteration), the learning rate is
a closed-form schedule), and a checkpoint holds the parameters, the optimiser state and the best
parameters so far, so a run killed at any point and resumed ends bit-identical to an uninterrupted one.
Checkpoints are written atomically with `torch.save` and read with `weights_only=True`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import BespokeError

__all__ = ["FitConfig", "FitResult", "fit", "batch_indices"]


@dataclass
class FitConfig:
    iterations: int = 600
    batch_size: int = 40
    lr: float = 5e-3
    final_lr_ratio: float = 0.02  # cosine decay from lr to lr * final_lr_ratio
    warmup: int = 10
    val_every: int = 50
    patience: int = 0  # stop after this many validations without improvement (0 = never)
    seed: int = 0

    def __post_init__(self):
        for name in ("iterations", "batch_size", "val_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BespokeError(f"{name} must be an integer >= 1, got {v!r}")
        if not (self.lr > 0 and 0 < self.final_lr_ratio <= 1):
            raise BespokeError(f"lr must be > 0 and final_lr_ratio in (0, 1]; got {self.lr}, {self.final_lr_ratio}")

    def learning_rate(self, it: int) -> float:
        """Linear warm-up, then cosine decay to lr * final_lr_ratio at the last iteration."""
        if it < self.warmup:
            return self.lr * (it + 1) / self.warmup
        p = (it - self.warmup) / max(1, self.iterations - self.warmup)
        lo = self.lr * self.final_lr_ratio
        return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * min(p, 1.0)))


@dataclass
class FitResult:
    best_val: float
    best_iteration: int
    initial_val: float
    iterations: int
    seconds: float
    stopped_early: bool
    history: list[tuple[int, float]] = field(default_factory=list)

    def summary(self) -> dict:
        return asdict(self)


def batch_indices(num: int, batch_size: int, seed: int, it: int) -> torch.Tensor:
    """The mini-batch of iteration `it`: a function of (seed, it) only, so resuming replays it exactly."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
    return torch.randperm(num, generator=gen)[: min(batch_size, num)]


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, signature: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BespokeError(
            f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to start afresh"
        ) from None
    if state.get("signature") != signature:
        theirs = state.get("signature") or {}
        diff = sorted(k for k in set(signature) | set(theirs) if signature.get(k) != theirs.get(k))
        raise BespokeError(
            f"checkpoint {path} belongs to another training run (differs in {', '.join(diff)}); "
            "use another output path or delete the checkpoint to start afresh"
        )
    return state


def fit(
    module: torch.nn.Module,
    loss_fn,
    val_fn,
    config: FitConfig,
    *,
    checkpoint: str | os.PathLike | None = None,
    signature: dict | None = None,
    desc: str = "train",
    quiet: bool = False,
) -> FitResult:
    """Train `module` in place; on return it holds the best-validation parameters (the initial ones
    if nothing beat them, so the result is never worse than the start on the validation set)."""
    signature = {**(signature or {}), "config": asdict(config)}
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start, seconds_before = 0, 0.0
    if ckpt is not None and ckpt.exists():
        state = _load_checkpoint(ckpt, signature)
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        start, seconds_before = int(state["iteration"]), float(state["seconds"])
        best_state, best_val, best_it = state["best"], float(state["best_val"]), int(state["best_iteration"])
        initial_val, history, bad = float(state["initial_val"]), [tuple(h) for h in state["history"]], int(state["bad"])
    else:
        initial_val = best_val = float(val_fn(module))
        best_state, best_it, history, bad = _copy(module), 0, [(0, initial_val)], 0
    t0 = time.perf_counter()
    stopped_early = config.patience > 0 and bad >= config.patience  # a resumed run that had already stopped
    bar = tqdm(
        range(start, start if stopped_early else config.iterations),
        desc=desc,
        initial=start,
        total=config.iterations,
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
    it = start
    for it in bar:
        for group in opt.param_groups:
            group["lr"] = config.learning_rate(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module, it)
        if not torch.isfinite(loss):
            raise BespokeError(f"the training loss became {loss.item()} at iteration {it}; lower the learning rate")
        loss.backward()
        opt.step()
        done = it + 1
        if done % config.val_every == 0 or done == config.iterations:
            val = float(val_fn(module))
            history.append((done, val))
            if val > best_val:
                best_val, best_state, best_it, bad = val, _copy(module), done, 0
            else:
                bad += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.2f}", best=f"{best_val:.2f}")
            stopped_early = config.patience > 0 and bad >= config.patience
            if ckpt is not None:
                _save_checkpoint(
                    ckpt,
                    {
                        "signature": signature,
                        "module": module.state_dict(),
                        "optimizer": opt.state_dict(),
                        "iteration": done,
                        "seconds": seconds_before + time.perf_counter() - t0,
                        "best": best_state,
                        "best_val": best_val,
                        "best_iteration": best_it,
                        "initial_val": initial_val,
                        "history": [list(h) for h in history],
                        "bad": bad,
                    },
                )
            if stopped_early:
                break
    bar.close()
    module.load_state_dict(best_state)
    return FitResult(
        best_val=best_val,
        best_iteration=best_it,
        initial_val=initial_val,
        iterations=history[-1][0] if history else start,
        seconds=seconds_before + time.perf_counter() - t0,
        stopped_early=stopped_early,
        history=history,
    )


def _copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
