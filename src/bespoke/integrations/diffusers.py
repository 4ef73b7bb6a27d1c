"""`BespokeScheduler`: a learned (or any) bespoke solver as a diffusers scheduler.

    from bespoke.integrations.diffusers import BespokeScheduler
    pipe.scheduler = BespokeScheduler.from_solvers("bns.safetensors", bespoke.load_model("diffusers:DIR"))
    images = pipe(num_inference_steps=8).images        # the file's NFE-8 solver
    pipe.scheduler.save_pretrained("bns-scheduler")    # the learned numbers travel in scheduler_config.json

Each solver is stored in its NS form ([BNS] Eq. 11): canonical times t_0..t_n and coefficients
    x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j,    u_j = the model's velocity at (t_j, x_j),
all of them in the config, so `save_pretrained`/`from_pretrained` round-trip. `set_timesteps(n)` picks
the solver with NFE n; `timesteps` are t_0..t_{n-1} in the model's own units (fractional DDPM
timesteps, or 1000 s for flow matching), and `step` turns the network's output into the velocity
with the model's training schedule (the same config keys as diffusers' DDPM-type schedulers, or
`prediction_type="flow_prediction"`), exactly as `bespoke` does when it samples by itself.

A guided solver (one for a range of guidance scales) is stored as its anchors' raw parameters and compiled to
NS form for the scale W at `set_timesteps`. The scale comes, first found first: `set_timesteps(n,
guidance_scale=W)`; the attribute `scheduler.guidance_scale = W`; the pipeline the scheduler follows
(`scheduler.follow(pipe)`: diffusers' SD, SDXL, SD3 and Flux pipelines set `pipe._guidance_scale` from
`pipe(..., guidance_scale=W)` before they call `set_timesteps`, so the pipeline's own argument reaches it).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ..errors import BespokeError
from ..paths import VPDiscrete
from ..solvers.common import lincomb
from ..solvers.guided import GuidedBNSSolver
from .diffusers_config import DIFFUSERS_PREDICTIONS, DiffusersSchedule, ddpm_tables, schedule_from_config

__all__ = ["BespokeScheduler"]

_COMPATIBLE = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


class BespokeScheduler(SchedulerMixin, ConfigMixin):
    """A bespoke solver per NFE (its NS form) over a DDPM-type or flow-matching model's schedule."""

    _compatibles = list(_COMPATIBLE)
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        solvers: dict | None = None,
        model: dict | None = None,
    ):
        self._schedule: DiffusersSchedule = schedule_from_config(dict(self.config), "BespokeScheduler")
        if isinstance(self._schedule.scheduler, VPDiscrete):  # what DDPM-type schedulers expose (compute_snr, ...)
            tables = ddpm_tables(dict(self.config), "BespokeScheduler")
            self.betas, self.alphas, self.alphas_cumprod = tables["betas"], tables["alphas"], tables["alphas_cumprod"]
        self._solvers = {
            int(k): _guided(k, v) if "guided" in v else _ns_arrays(k, v) for k, v in (solvers or {}).items()
        }
        self.guidance_scale: float | None = None  # the scale for guided solvers, when set_timesteps is not given one
        self._pipeline = None  # a weak reference to the pipeline whose guidance_scale it follows
        self.init_noise_sigma = 1.0
        self.timesteps = torch.zeros(0)
        self.num_inference_steps = None
        self._reset()

    # --- building one ---------------------------------------------------------------------------
    @classmethod
    def from_solvers(cls, solvers, flow, *, prediction_type: str | None = None) -> BespokeScheduler:
        """A scheduler holding `solvers` (a solver file, a Solver, a list or {nfe: solver}: any bespoke solver,
        learned or built-in) for `flow`, a model from `bespoke.load_model("diffusers:DIR")` or any DDPM-type
        (`VPDiscrete`) or flow-matching model whose network output `prediction_type` names."""
        from ..solvers.files import load_solvers

        if isinstance(solvers, (str, Path)):
            solvers = load_solvers(solvers, flow=flow)
        if isinstance(solvers, dict):  # {nfe: solver}, as load_solvers returns
            solvers = list(solvers.values())
        elif not isinstance(solvers, (list, tuple)):
            solvers = [solvers]
        table = {}
        for s in solvers:
            if isinstance(s, GuidedBNSSolver):
                table[str(s.nfe)] = {"name": s.name, "guided": _guided_record(s)}
                continue
            ns = s.to_ns(flow)
            table[str(ns.nfe)] = {
                "name": getattr(s, "name", ns.name),
                "times": ns.times.tolist(),
                "a": ns.a.tolist(),
                "b": [row[: i + 1] for i, row in enumerate(ns.b.tolist())],  # lower-triangular rows
                "start_scale": ns.start_scale,
            }
        record = {"name": flow.name, "fingerprint": flow.fingerprint}
        return cls(**_schedule_config(flow, prediction_type), solvers=table, model=record)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Also from a flow-matching scheduler's config (it names no prediction type)."""
        if config is not None and "FlowMatch" in str(dict(config).get("_class_name", "")):
            kwargs.setdefault("prediction_type", "flow_prediction")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # --- the diffusers scheduler API ------------------------------------------------------------
    @property
    def nfes(self) -> list[int]:
        """The NFEs this scheduler holds a solver for."""
        return sorted(self._solvers)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only 0: a bespoke solver runs whole, from the noise (its steps combine x_0 and every earlier velocity),
        so starting mid-schedule, as img2img and inpainting with strength < 1 do, is refused."""
        if begin_index != 0:
            raise BespokeError(
                f"BespokeScheduler cannot start at step {begin_index}: its solvers run from the noise to the data "
                "(each step combines the initial noise and every earlier velocity), so img2img/inpainting with "
                "strength < 1 is not supported; use strength=1.0, or a diffusers scheduler for partial denoising"
            )
        self._begin_index = begin_index

    def follow(self, pipeline) -> BespokeScheduler:
        """Take the guidance scale of guided solvers from `pipeline` (its `_guidance_scale`, which diffusers'
        SD/SDXL/SD3/Flux pipelines set from `pipe(..., guidance_scale=W)` before `set_timesteps`); returns self."""
        self._pipeline = weakref.ref(pipeline)
        return self

    def _scale(self, given) -> float:
        """The guidance scale for a guided solver: set_timesteps', else the attribute's, else the pipeline's."""
        if given is None:
            given = self.guidance_scale
        if given is None and self._pipeline is not None and self._pipeline() is not None:
            given = getattr(self._pipeline(), "_guidance_scale", None)
        if given is None:
            raise BespokeError(
                "BespokeScheduler holds a solver for a range of guidance scales but was given none: call "
                "set_timesteps(n, guidance_scale=W), set scheduler.guidance_scale = W, or scheduler.follow(pipe) so "
                "it reads pipe(..., guidance_scale=W)"
            )
        return float(given)

    def set_timesteps(
        self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None, guidance_scale=None, **kwargs
    ):
        """Pick the solver with NFE `num_inference_steps` (a guided one at `guidance_scale`, see the module
        docstring). Flow pipelines' `sigmas`/`mu` are accepted and ignored (the solver brings its own times;
        `len(sigmas)` gives the NFE when no step count is given)."""
        if timesteps is not None:
            raise BespokeError("BespokeScheduler runs at its learned times; custom `timesteps` cannot be used")
        n = num_inference_steps if num_inference_steps is not None else (len(sigmas) if sigmas is not None else None)
        if n not in self._solvers:
            have = ", ".join(map(str, self.nfes)) or "none (build it with BespokeScheduler.from_solvers)"
            raise BespokeError(f"BespokeScheduler has no solver for {n} steps; it has NFE {have}")
        self._solver = self._solvers[n]
        if isinstance(self._solver, GuidedBNSSolver):
            ns = self._solver.at_scale(self._scale(guidance_scale))  # refused out of its range
            ns = ns.to_ns(self._schedule.scheduler)
            self._solver = {"times": ns.times, "a": ns.a.tolist(), "b": ns.b.tolist(), "start_scale": ns.start_scale}
        self.num_inference_steps = n
        self.init_noise_sigma = float(self._solver["start_scale"])
        times = self._solver["times"][:-1]
        self.timesteps = self._schedule.timestep(times).to(device=device, dtype=torch.float32)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j ([BNS] Eq. 11), u_i from the network's output at step i."""
        if self.num_inference_steps is None:
            raise BespokeError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._index_of(timestep)
        i, ns = self._step_index, self._solver
        if i == 0:
            self._x0, self._velocities = sample / ns["start_scale"], []
        u = self._schedule.output_to_velocity(model_output, sample, ns["times"][i])
        self._velocities.append(u)
        b = ns["b"][i]
        x = lincomb(float(ns["a"][i]) * self._x0, [(float(b[j]), self._velocities[j]) for j in range(i + 1)])
        self._step_index += 1
        x = x.to(sample.dtype)
        return SchedulerOutput(prev_sample=x) if return_dict else (x,)

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """x_t = alpha_t x_data + sigma_t noise at the model's `timesteps` (img2img)."""
        t = self._canonical(timesteps)  # the schedule's tables live on the CPU: index them there, then move
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        like = dict(device=original_samples.device, dtype=original_samples.dtype)
        alpha = self._schedule.scheduler.alpha(t).to(**like).reshape(shape)
        sigma = self._schedule.scheduler.sigma(t).to(**like).reshape(shape)
        return alpha * original_samples + sigma * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- internals ------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._step_index, self._begin_index, self._x0, self._velocities = None, None, None, []

    def _index_of(self, timestep) -> int:
        hits = (self.timesteps == torch.as_tensor(timestep, dtype=self.timesteps.dtype)).nonzero()
        return int(hits[0]) if len(hits) else 0

    def _canonical(self, timesteps) -> torch.Tensor:
        return self._schedule.time_of(torch.as_tensor(timesteps, dtype=torch.float64).cpu())


def _guided_record(s: GuidedBNSSolver) -> dict:
    """A guided solver in the config: its anchors' raw float64 parameters as JSON numbers (exact round trip)."""
    state = s.state_tensors()
    return {
        "entry": {k: v for k, v in s.file_entry().items() if k != "training"},
        "state": {k: v.tolist() for k, v in state.items()},
    }


def _guided(nfe, entry: dict) -> GuidedBNSSolver:
    """A guided solver from its config record, validated."""
    try:
        record = entry["guided"]
        state = {k: torch.tensor(v, dtype=torch.float64) for k, v in record["state"].items()}
        shapes = GuidedBNSSolver.state_shapes(record["entry"])
        if int(record["entry"]["nfe"]) != int(nfe) or any(tuple(state[k].shape) != v for k, v in shapes.items()):
            raise ValueError("shapes")
        return GuidedBNSSolver.from_state(state, record["entry"], None)
    except (KeyError, TypeError, ValueError, BespokeError) as e:
        raise BespokeError(f"BespokeScheduler config: the guided solver for NFE {nfe} is malformed ({e})") from None


def _ns_arrays(nfe, entry: dict) -> dict:
    """A stored solver, validated: n+1 times, n weights a_i, lower-triangular rows b_i of length i+1."""
    n = int(nfe)
    times, a, b = entry.get("times", []), entry.get("a", []), entry.get("b", [])
    if len(times) != n + 1 or len(a) != n or [len(row) for row in b] != list(range(1, n + 1)):
        raise BespokeError(f"BespokeScheduler config: the solver for NFE {n} is malformed (times, a, b lengths)")
    return {**entry, "times": torch.tensor(times, dtype=torch.float64)}


def _schedule_config(flow, prediction_type: str | None) -> dict:
    """The diffusers config keys that define `flow`'s training schedule and output."""
    info = flow.info or {}
    if "scheduler_config" in info:  # loaded from a diffusers folder: keep its own keys
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
        config = {k: info["scheduler_config"][k] for k in keys if k in info["scheduler_config"]}
        if info["schedule"]["family"] == "flow-matching":
            config["prediction_type"] = "flow_prediction"
        return config
    kind = prediction_type or DIFFUSERS_PREDICTIONS.get((info.get("recipe") or {}).get("prediction"))
    if isinstance(flow.scheduler, VPDiscrete) and kind is not None:
        ac = flow.scheduler.alphas_cumprod
        betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]])
        return {"num_train_timesteps": ac.numel(), "trained_betas": betas.tolist(), "prediction_type": kind}
    raise BespokeError(
        f"BespokeScheduler needs a DDPM-type (vp-discrete) or flow-matching model and its output type; {flow.name} "
        "has neither on record: load it with diffusers:DIR, or pass prediction_type= for a vp-discrete model"
    )
