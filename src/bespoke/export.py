"""A solver's time grid in the units other samplers take: diffusers `timesteps`, k-diffusion/ComfyUI `sigmas`.

Canonical time t runs from noise (0) to data (1). Per model:
    timesteps   DDPM-type (vp-discrete) models: the training timestep tau(t) = (N - 1) - t N of the evaluation
                points t_0..t_{n-1}, rounded to integers as diffusers' schedulers take them (DPMSolverMultistep,
                UniPC, Euler: `pipe(..., timesteps=[...])`); diffusers flow-matching models: (1 - t) N.
    sigmas      flow-matching paths (condot): sigma = 1 - t, diffusers' FlowMatch convention; other Gaussian paths:
                sigma = sigma_t / alpha_t = exp(-lambda(t)), EDM's and k-diffusion's noise level. All n + 1 grid
                points, ending in 0 (k-diffusion samplers, ComfyUI's SIGMAS).
    diffusers-sigmas  what `pipe(..., sigmas=[...])` takes: the first n (diffusers appends the 0), and for a
                flow-matching scheduler with a static `shift` s != 1 mapped through the inverse of the shift that
                diffusers applies to them, sigma' = sigma / (s - (s - 1) sigma). A scheduler with dynamic
                (resolution-dependent) shifting cannot be given an exact list; it is refused.
A grid exported as integer timesteps is not the learned one exactly: `schedule_in_units` also returns the
canonical times those integers stand for, so that a sampler on them can be compared like for like.
"""

from __future__ import annotations

import json
import math

import torch

from .errors import BespokeError
from .paths import CondOT, VPDiscrete

__all__ = ["grid_of", "schedule_in_units", "exported", "FORMATS"]

FORMATS = ("timesteps", "sigmas", "diffusers-sigmas", "json")


def grid_of(solver, flow) -> list[float]:
    """The time grid t_0 = 0 < ... < t_n = 1 a schedule or built-in solver steps on for `flow`."""
    if getattr(solver, "kind", None) == "schedule":
        return solver.grid(flow.scheduler, flow.ode_end)
    if hasattr(solver, "grid_name"):  # a built-in solver on its grid
        return solver.times(flow.scheduler, flow.ode_end)
    raise BespokeError(
        f"{solver.name} is a {getattr(solver, 'kind', 'custom')} solver: its steps are learned coefficients that "
        "no stock sampler runs, so it has no schedule to export; export a learned schedule (bespoke train --solver "
        "schedule:METHOD) or a built-in solver"
    )


def _flow_matching_timesteps(flow) -> int | None:
    """N of a diffusers flow-matching model (its network takes (1 - t) N), None for any other model."""
    schedule = (flow.info or {}).get("schedule") or {}
    return int(schedule["num_train_timesteps"]) if schedule.get("family") == "flow-matching" else None


def _unshifted(sigmas: list[float], config: dict) -> list[float] | None:
    """Sigmas that a FlowMatch scheduler with this config shifts onto `sigmas` (None: dynamic shifting)."""
    if config.get("use_dynamic_shifting"):
        return None
    s = float(config.get("shift", 1.0))
    return [x / (s - (s - 1.0) * x) for x in sigmas]


def schedule_in_units(solver, flow) -> dict:
    """{"times", "timesteps"?, "timestep_times"?, "sigmas"?}: the grid in canonical time and in the model's units
    (those it has); "timestep_times" are the canonical times of the rounded timesteps (plus t = 1)."""
    times = grid_of(solver, flow)
    out = {"times": times}
    sch = flow.scheduler
    n_fm = _flow_matching_timesteps(flow)
    if isinstance(sch, VPDiscrete):
        steps = [round(float(v)) for v in sch.timestep(torch.tensor(times[:-1], dtype=torch.float64))]
        out["timesteps"] = steps
        out["timestep_times"] = sch.time_of_timestep(torch.tensor(steps, dtype=torch.float64)).tolist() + [1.0]
    elif n_fm is not None:
        out["timesteps"] = [(1.0 - t) * n_fm for t in times[:-1]]
    if isinstance(sch, CondOT):
        out["sigmas"] = [1.0 - t for t in times]
    elif sch is not None:
        lam = sch.log_snr(torch.tensor(times, dtype=torch.float64))
        sigmas = torch.exp(-lam).tolist()
        sigmas[-1] = 0.0 if times[-1] == 1.0 else sigmas[-1]
        if all(math.isfinite(s) for s in sigmas):  # a path with SNR 0 at t = 0 (cosine) starts at sigma = inf
            out["sigmas"] = sigmas
    if "sigmas" in out:
        config = (flow.info or {}).get("scheduler_config") or {}
        theirs = _unshifted(out["sigmas"][:-1], config) if n_fm is not None else out["sigmas"][:-1]
        if theirs is not None:
            out["diffusers-sigmas"] = theirs
    return out


def exported(solver, flow, fmt: str) -> str:
    """The text `bespoke export` prints: a list in the model's units, or the JSON record of the schedule."""
    if fmt not in FORMATS:
        raise BespokeError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    units = schedule_in_units(solver, flow)
    if fmt == "json":
        record = {"model": flow.name, "solver": solver.name, "nfe": solver.nfe, **units}
        return json.dumps(record, indent=1)
    if fmt not in units:
        why = {
            "timesteps": "its network takes canonical time, not a training timestep",
            "sigmas": "its path has no finite noise level at t = 0 (or no Gaussian path)",
            "diffusers-sigmas": "its path has no finite noise level at t = 0, or its scheduler shifts sigmas "
            "dynamically (use_dynamic_shifting)",
        }[fmt]
        raise BespokeError(f"{flow.name} has no {fmt}: {why}; use --format json for the canonical times")
    return json.dumps([round(v, 10) if isinstance(v, float) else v for v in units[fmt]])
