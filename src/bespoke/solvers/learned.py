"""What every learned solver (BNS, Bespoke) shares: raw float64 parameters that a solver file stores
bit for bit, a model fingerprint it checks before sampling, a training summary, and the monotone
time parameterisation with pinned ends.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import BespokeError
from .base import Solver, validate_times

__all__ = ["Learned", "pinned_times", "evaluator", "guidance_record"]


def guidance_record(flow) -> dict | None:
    """What a solver records of the guidance its model ran at: {"weight", "convention"}, or None."""
    g = getattr(flow, "guidance", None)
    return None if g is None else {"weight": float(g.weight), "convention": g.convention}


def _guidance_text(record: dict | None) -> str:
    return "no guidance" if record is None else f"guidance w={record['weight']:g} ({record['convention']})"


def pinned_times(log_inc: torch.Tensor, t_ends: torch.Tensor) -> torch.Tensor:
    """t_0..t_m from m positive increments exp(log_inc), ends pinned exactly (normalised cumulative sums)."""
    inc = torch.exp(log_inc)
    frac = torch.cumsum(inc, 0)[:-1] / inc.sum()
    t0, t1 = t_ends[0], t_ends[1]
    return torch.cat([t0[None], t0 + (t1 - t0) * frac, t1[None]])


def evaluator(flow, cond: dict, checkpoint: bool = False):
    """ev(t, x) = flow(t, x, **cond); checkpoint=True recomputes each network call in the backward pass
    instead of storing its activations (for back-propagating through many steps of a large model).

    The reentrant form runs the first pass without autograd at all: measured on zoo:digits-ot (batch 40),
    BNS training peaks at 2.1-2.2x one forward+backward pass from NFE 4 to 16, flat, where the
    non-reentrant form grew from 2.0x to 2.75x (benchmarks/scaling.py). A call whose inputs need no gradient (the first
    step: the noise at a pinned time) records nothing either way and runs plainly."""

    def ev(t, x):
        if checkpoint and torch.is_grad_enabled() and (t.requires_grad or x.requires_grad):
            return torch.utils.checkpoint.checkpoint(lambda t_, x_: flow(t_, x_, **cond), t, x, use_reentrant=True)
        return flow(t, x, **cond)

    return ev


class Learned(nn.Module, Solver):
    """Base of the learned solver kinds. Subclasses define `kind`, `_state()` (name -> raw tensor),
    `times()` (the evaluation grid) and the file hooks `state_shapes`, `from_state`, `file_entry`."""

    kind: str

    def __init__(self, *, init: str, model_fingerprint: str | None, force: bool):
        nn.Module.__init__(self)
        self.init = init
        self.model_fingerprint = model_fingerprint
        self.model_guidance: dict | None = None  # the guidance it was trained at (checked with the fingerprint)
        self.force = force
        self.training_summary: dict = {}
        self._warned: set[str] = set()  # the forced mismatches already warned about

    def bind_model(self, flow) -> Learned:
        """Record `flow` (its fingerprint and guidance) as the model this solver is for; returns self."""
        self.model_fingerprint, self.model_guidance = flow.fingerprint, guidance_record(flow)
        return self

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def times(self) -> torch.Tensor:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The raw parameters as CPU float64 copies (what a solver file stores)."""
        return {k: v.detach().to("cpu", torch.float64).clone() for k, v in self._state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self._state().items():
                v.copy_(state[k])

    def restored(self, state: dict[str, torch.Tensor], entry: dict):
        """This solver with the raw parameters `state` and the training summary of file entry `entry`, validated
        (the end of every kind's `from_state`); returns self."""
        self.load_state(state)
        self.training_summary = dict(entry.get("training") or {})
        self.validate()
        return self

    def check_model(self, flow) -> None:
        """Refuse a model other than the one this solver was trained for (fingerprint), or the same model at
        another guidance scale, unless forced (then a warning)."""
        mine, theirs = self.model_fingerprint, getattr(flow, "fingerprint", None)
        if mine and theirs and mine != theirs:
            problem = f"this solver was trained for the model with fingerprint {mine}, but {flow.name} has {theirs}"
            fix = "train a solver for this model"
        elif mine and guidance_record(flow) != self.model_guidance:
            problem = (
                f"this solver was trained at {_guidance_text(self.model_guidance)}, but {flow.name} runs at "
                f"{_guidance_text(guidance_record(flow))}"
            )
            fix = (
                "sample at the scale it was trained for (--guidance), train one at this scale or one for a range "
                "of scales (--guidance-scales)"
            )
        else:
            return
        self.refuse_unless_forced(problem, fix)

    def refuse_unless_forced(self, problem: str, fix: str) -> None:
        """A one-line error naming `problem` and `fix`, or, when forced, one warning per solver and problem."""
        if not self.force:
            raise BespokeError(f"{problem}; {fix}, or force it (force=True / --force)")
        if problem not in self._warned:  # once per solver, not at every batch
            self._warned.add(problem)
            warnings.warn(f"{problem} (used anyway: forced)", stacklevel=4)

    def validate(self) -> None:
        """Finite parameters and a monotone grid (checked before saving and after loading)."""
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise BespokeError(f"the {self.kind} solver's {name} contains NaN or inf")
        validate_times(self.times().tolist())
