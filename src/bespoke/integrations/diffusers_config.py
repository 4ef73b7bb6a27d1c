"""What a diffusers scheduler config says about the *model*: its path, prediction type and time units.

A diffusers model is defined by its training schedule, not by the sampler its folder ships with
(DESIGN §4). Two families:

- DDPM-type (every scheduler with `beta_schedule`/`trained_betas`): the discrete `alphas_cumprod`
  exactly as diffusers computes it (so every beta schedule diffusers knows is supported), our
  `VPDiscrete` path, prediction `epsilon`, `v_prediction` or `sample`, integer timesteps 0..N-1
  (fractional ones between them).
- Flow matching (`FlowMatchEulerDiscreteScheduler`): x_s = (1 - s) x_data + s eps with s = 1 - t, the
  network sees s * N and predicts v = dx/ds, so our velocity is u = dx/dt = -v on the CondOT path.
  `shift` and dynamic shifting only choose the sampling grid: the ODE is the same.

Sampler options that do not change the ODE are ignored with one log line; options that change the
model (zero terminal SNR) are refused with the reason.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import BespokeError
from ..flows import canonical_prediction
from ..paths import CondOT, Scheduler, VPDiscrete

__all__ = ["DiffusersSchedule", "schedule_from_config", "SAMPLER_OPTIONS", "DIFFUSERS_PREDICTIONS"]

log = logging.getLogger(__name__)

# options of diffusers' samplers, not properties of the model: they never change the ODE
SAMPLER_OPTIONS = (
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_spacing",
    "steps_offset",
    "variance_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "shift",
    "use_dynamic_shifting",
    "stochastic_sampling",
    "final_sigmas_type",
    "solver_order",
    "algorithm_type",
)
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x1", "flow_prediction": "velocity"}
DIFFUSERS_PREDICTIONS = {ours: theirs for theirs, ours in _PREDICTIONS.items()}  # our name -> diffusers


@dataclass
class DiffusersSchedule:
    """The model's path and how to talk to its network.

    scheduler:   our Gaussian path in canonical time t (0 = noise, 1 = data)
    prediction:  what the network predicts, in our names (eps, v, x1, velocity)
    sign:        +1, or -1 when the network's output is minus our prediction (flow models: v = -u)
    timestep:    canonical t (float64 tensor) -> the network's timestep
    time_of:     its inverse, the network's timestep -> canonical t
    ode_end:     last canonical time the model is defined at (DESIGN §3)
    config:      the JSON-able description a BespokeScheduler stores to rebuild this
    """

    scheduler: Scheduler
    prediction: str
    sign: float
    timestep: Callable[[torch.Tensor], torch.Tensor]
    time_of: Callable[[torch.Tensor], torch.Tensor]
    ode_end: float
    config: dict = field(default_factory=dict)

    def output_to_velocity(self, output: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """The canonical velocity u(t, x) from the network's output at (x, t) (spec §1.3 adapters)."""
        from ..flows import velocity_from_prediction

        t = torch.as_tensor(t, dtype=torch.float64)
        return velocity_from_prediction(self.prediction, self.sign * output, x, t, self.scheduler)


def _is_flow_matching(config: dict) -> bool:
    return "FlowMatch" in str(config.get("_class_name", "")) or config.get("prediction_type") == "flow_prediction"


def _note_ignored(config: dict, where: str) -> None:
    ignored = sorted(k for k in SAMPLER_OPTIONS if k in config)
    if ignored:
        log.info(
            "%s: ignoring sampler options %s: they choose a sampler, not the model's ODE", where, ", ".join(ignored)
        )


def ddpm_tables(config: dict, where: str = "scheduler config") -> dict[str, torch.Tensor]:
    """betas, alphas and alphas_cumprod (float32) exactly as diffusers' DDPMScheduler computes them from this config."""
    from diffusers import DDPMScheduler

    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    try:
        ddpm = DDPMScheduler(**{k: v for k, v in config.items() if k in accepted})
    except (ValueError, NotImplementedError, TypeError) as e:
        raise BespokeError(f"{where}: diffusers cannot build the training schedule from this config: {e}") from None
    return {"betas": ddpm.betas, "alphas": ddpm.alphas, "alphas_cumprod": ddpm.alphas_cumprod}


def _alphas_cumprod(config: dict, where: str) -> torch.Tensor:
    """alphas_cumprod exactly as diffusers' DDPMScheduler computes it from this config, in float64."""
    ac = ddpm_tables(config, where)["alphas_cumprod"].to(torch.float64)
    if not bool(ac[-1] > 0):
        cause = "rescale_betas_zero_snr = true" if config.get("rescale_betas_zero_snr") else "its betas"
        raise BespokeError(
            f"{where}: the schedule reaches zero terminal SNR (alphas_cumprod = 0 at the last timestep, from {cause}), "
            "which is not supported: the ODE would start at infinite noise; use a model trained with a positive "
            "final alphas_cumprod"
        )
    return ac


def schedule_from_config(config: dict, where: str = "scheduler config") -> DiffusersSchedule:
    """The model's DiffusersSchedule from a diffusers scheduler config (a dict, e.g. scheduler_config.json)."""
    _note_ignored(config, where)
    n = int(config.get("num_train_timesteps", 1000))
    if _is_flow_matching(config):
        # x_s = (1 - s) x + s eps, s = 1 - t; the network sees s * N and predicts v = dx/ds = -u
        return DiffusersSchedule(
            scheduler=CondOT(),
            prediction="velocity",
            sign=-1.0,
            timestep=lambda t: (1.0 - t) * n,
            time_of=lambda tau: 1.0 - tau / n,
            ode_end=1.0,
            config={"family": "flow-matching", "num_train_timesteps": n},
        )
    kind = config.get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS or kind == "flow_prediction":
        raise BespokeError(
            f"{where}: prediction_type {kind!r} is not supported for DDPM-type schedules; "
            "valid: epsilon, v_prediction, sample"
        )
    path = VPDiscrete(_alphas_cumprod(config, where))
    return DiffusersSchedule(
        scheduler=path,
        prediction=canonical_prediction(_PREDICTIONS[kind]),
        sign=1.0,
        timestep=lambda t: path.timestep(t).clamp(min=0.0),  # fractional timesteps between the integers
        time_of=path.time_of_timestep,
        ode_end=float(path.time_of_timestep(0.0)),
        config={"family": "ddpm", "num_train_timesteps": n, "prediction_type": kind},
    )
