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

from ..distributed import is_main
from ..errors import BespokeError

__all__ = ["FitConfig", "FitResult", "fit", "batch_indices"]


@dataclass
class FitConfig:
    iterations: int = 300
    batch_size: int = 40
    lr: float = 1e-2
    final_lr_ratio: float = 0.02  # cosine decay from lr to lr * final_lr_ratio
    warmup: int = 10
    val_every: int = 50
    patience: int = 0  # stop Adam after this many validations without improvement (0 = never)
    seed: int = 0
    backtrack_db: float = 1.0  # a validation this far below the best: back to the best, halve the lr (0 = off)
    polish_steps: int = 0  # then L-BFGS steps on the whole training set ...
    polish_evals: int = 5  # ... of at most this many loss evaluations each

    def __post_init__(self):
        for name, low in (
            ("iterations", 0),
            ("batch_size", 1),
            ("val_every", 1),
            ("polish_steps", 0),
            ("polish_evals", 1),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise BespokeError(f"{name} must be an integer >= {low}, got {v!r}")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


_FRESH = "delete it to start afresh"


def _load_checkpoint(path: Path, signature: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BespokeError(f"checkpoint {path} cannot be read ({type(e).__name__}); {_FRESH}") from None
    need = ("signature", "module", "adam", "lbfgs", *_RUN_KEYS)
    missing = [k for k in need if not isinstance(state, dict) or k not in state]
    if missing:
        raise BespokeError(f"checkpoint {path} is not a training checkpoint (no {', '.join(missing)}); {_FRESH}")
    theirs = state["signature"] if isinstance(state["signature"], dict) else {}
    if theirs != signature:
        diff = sorted(k for k in set(signature) | set(theirs) if signature.get(k) != theirs.get(k))
        raise BespokeError(
            f"checkpoint {path} belongs to another training run (differs in {', '.join(diff)}); "
            "use another output path or delete the checkpoint to start afresh"
        )
    return state


def _restore(path: Path, state: dict, module, adam, lbfgs) -> dict:
    """Load a checkpoint's parameters and optimiser states; the run's progress (its _RUN_KEYS) back."""
    try:
        module.load_state_dict(state["module"])
        adam.load_state_dict(state["adam"])
        if state["lbfgs"]:
            lbfgs.load_state_dict(state["lbfgs"])
        run = {k: state[k] for k in _RUN_KEYS}
        run["history"] = [(int(i), float(v)) for i, v in run["history"]]
        _check_run(run, module)
    except Exception as e:  # wrong names, shapes or types anywhere in a checkpoint that unpickled safely
        message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise BespokeError(f"checkpoint {path} has the wrong structure ({message}); {_FRESH}") from None
    return run


def _check_run(run: dict, module) -> None:
    """The progress fields of a checkpoint have the types `fit` relies on."""
    ints, floats = ("step", "best_iteration", "bad"), ("seconds", "best_val", "initial_val", "lr_factor")
    if not all(type(run[k]) is int for k in ints) or not all(isinstance(run[k], float) for k in floats):
        raise TypeError(f"progress fields {', '.join(ints + floats)} must be numbers")
    if not isinstance(run["stopped_early"], bool) or not isinstance(run["best"], dict):
        raise TypeError("stopped_early must be a bool and best a state dict")
    mine, best = module.state_dict(), run["best"]
    fits = lambda k, v: isinstance(best.get(k), torch.Tensor) and best[k].shape == v.shape  # noqa: E731
    if set(best) != set(mine) or not all(fits(k, v) for k, v in mine.items()):
        raise TypeError("the best parameters do not fit the solver")


def fit(
    module: torch.nn.Module,
    loss_fn,
    val_fn,
    config: FitConfig,
    *,
    full_loss_fn=None,
    after_backward=None,
    checkpoint: str | os.PathLike | None = None,
    signature: dict | None = None,
    desc: str = "train",
    quiet: bool = False,
) -> FitResult:
    """Train `module` in place; on return it holds the best-validation parameters (the initial ones
    if nothing beat them, so the result is never worse than the start on the validation set).

    Phase 1: `config.iterations` Adam steps on `loss_fn(module, it)` (a mini-batch loss tensor).
    Phase 2: `config.polish_steps` L-BFGS steps from the best parameters of phase 1 on
    `full_loss_fn(module)`, which computes the whole-training-set loss, back-propagates it itself and
    returns it: with a few hundred parameters, quasi-Newton steps on the full objective go where Adam's
    noisy mini-batch steps cannot (zoo:gmm2d, NFE 8: 58.9 -> 66.4 dB after 1,200 Adam steps had levelled off).
    after_backward(module): called once the gradients of a step are in (data-parallel runs all-reduce them);
    under torch.distributed only rank 0 writes the checkpoint and shows progress.
    """
    signature = {**(signature or {}), "config": asdict(config)}
    params = [p for p in module.parameters() if p.requires_grad]
    adam = torch.optim.Adam(params, lr=config.lr)
    lbfgs = torch.optim.LBFGS(
        params, lr=1.0, max_iter=config.polish_evals, history_size=20, line_search_fn="strong_wolfe"
    )
    if config.polish_steps and full_loss_fn is None:
        raise BespokeError("polish_steps > 0 needs full_loss_fn (the whole-training-set loss)")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    total = config.iterations + config.polish_steps
    if ckpt is not None and ckpt.exists():
        run = _restore(ckpt, _load_checkpoint(ckpt, signature), module, adam, lbfgs)
    else:
        v = float(val_fn(module))
        run = {
            "step": 0,
            "seconds": 0.0,
            "best": _copy(module),
            "best_val": v,
            "best_iteration": 0,
            "initial_val": v,
            "history": [(0, v)],
            "bad": 0,
            "stopped_early": False,
            "lr_factor": 1.0,
        }
    t0, seconds_before = time.perf_counter(), run["seconds"]
    bar = tqdm(
        total=total,
        initial=run["step"],
        desc=desc,
        disable=quiet or not is_main(),
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )

    def validate(done: int, loss: float) -> None:
        val = float(val_fn(module))
        run["history"].append((done, val))
        if val > run["best_val"]:
            run.update(best=_copy(module), best_val=val, best_iteration=done, bad=0)
        else:
            run["bad"] += 1
        if config.backtrack_db > 0 and done <= config.iterations and val < run["best_val"] - config.backtrack_db:
            # Adam overshot (its steps are ~lr whatever the gradient, too large near a sharp optimum):
            # go back to the best parameters with fresh moments and half the learning rate
            module.load_state_dict(run["best"])
            adam.state.clear()
            run["lr_factor"] *= 0.5
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.2f}", best=f"{run['best_val']:.2f}")
        if done <= config.iterations:  # patience stops phase 1 only
            run["stopped_early"] = config.patience > 0 and run["bad"] >= config.patience
        run.update(step=done, seconds=seconds_before + time.perf_counter() - t0)
        if ckpt is not None and is_main():
            _save_checkpoint(
                ckpt,
                {
                    "signature": signature,
                    "module": module.state_dict(),
                    "adam": adam.state_dict(),
                    "lbfgs": lbfgs.state_dict() if done > config.iterations else {},
                    **run,
                },
            )

    while run["step"] < total:
        it = run["step"]
        if it < config.iterations and not run["stopped_early"]:  # phase 1: Adam on mini-batches
            for group in adam.param_groups:
                group["lr"] = config.learning_rate(it) * run["lr_factor"]
            adam.zero_grad(set_to_none=True)
            loss = loss_fn(module, it)
            _check_finite(loss, it)
            loss.backward()
            if after_backward is not None:
                after_backward(module)
            adam.step()
            done = it + 1
            bar.update(1)
            if done % config.val_every == 0 or done == config.iterations:
                validate(done, loss.item())
            else:
                run["step"] = done
            continue
        if it < config.iterations:  # stopped early: go on to phase 2 from here
            bar.update(config.iterations - it)
            run["step"] = it = config.iterations
            if not config.polish_steps:
                break
        if it == config.iterations:  # phase 2 starts from the best parameters so far
            module.load_state_dict(run["best"])

        def closure(it=it):
            lbfgs.zero_grad(set_to_none=True)
            loss = full_loss_fn(module)
            _check_finite(loss, it)
            return loss

        loss = lbfgs.step(closure)
        bar.update(1)
        validate(it + 1, float(loss))
    bar.close()
    module.load_state_dict(run["best"])
    return FitResult(
        best_val=run["best_val"],
        best_iteration=run["best_iteration"],
        initial_val=run["initial_val"],
        iterations=run["history"][-1][0],  # the last step taken (fewer than planned if stopped early)
        seconds=seconds_before + time.perf_counter() - t0,
        stopped_early=run["stopped_early"],
        history=run["history"],
    )


_RUN_KEYS = (
    "step",
    "seconds",
    "best",
    "best_val",
    "best_iteration",
    "initial_val",
    "history",
    "bad",
    "stopped_early",
    "lr_factor",
)


def _check_finite(loss: torch.Tensor, it: int) -> None:
    if not torch.isfinite(loss):
        raise BespokeError(f"the training loss became {loss.item()} at iteration {it}; lower the learning rate")


def _copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
