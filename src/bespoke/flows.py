"""Flow: a pre-trained model seen as the canonical velocity field u(t, x, **cond), t in [0, 1].

t = 0 is the noise end, t = 1 the data end (DESIGN §3). Every model source (zoo, a network with
an eps/x1/v/velocity head, diffusers, EDM denoisers) becomes a `Flow`; solvers only ever see that.

Adapters (spec §1.3, [BNS] Table 1): every Gaussian-path model's velocity is affine in the network
output f, u = beta_t x + gamma_t f:
    eps       beta = alpha'/alpha,                gamma = sigma' - sigma alpha'/alpha
    x1        beta = sigma'/sigma,                gamma = alpha' - alpha sigma'/sigma
    v         beta = (alpha alpha' + sigma sigma')/(alpha^2 + sigma^2), gamma = -D/(alpha^2 + sigma^2)
    velocity  beta = 0,                           gamma = 1
with D = alpha' sigma - alpha sigma' and v = alpha eps - sigma x1 (v-prediction).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import BespokeError, NonFiniteVelocity, SingularEnd
from .io import weights_fingerprint
from .paths import Scheduler, VPDiscrete

__all__ = [
    "Flow",
    "Guidance",
    "PREDICTIONS",
    "canonical_prediction",
    "velocity_from_prediction",
    "prediction_from_velocity",
    "scale_time_flow",
    "from_network",
]

PREDICTIONS = ("eps", "x1", "v", "velocity")
_ALIASES = {
    "eps": "eps",
    "epsilon": "eps",
    "noise": "eps",
    "x1": "x1",
    "x0": "x1",
    "sample": "x1",
    "data": "x1",
    "x_start": "x1",
    "v": "v",
    "v_prediction": "v",
    "velocity": "velocity",
    "u": "velocity",
    "flow": "velocity",
}


def canonical_prediction(kind: str) -> str:
    """Normalise a prediction-type name ('epsilon', 'sample', 'v_prediction', ...)."""
    try:
        return _ALIASES[kind]
    except KeyError:
        raise BespokeError(
            f"unknown prediction type {kind!r}; valid: {', '.join(PREDICTIONS)} "
            f"(aliases: {', '.join(sorted(set(_ALIASES) - set(PREDICTIONS)))})"
        ) from None


def _per_sample(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 per-sample coefficient (shape () or (B,)) cast and shaped to broadcast with x."""
    coef = coef.to(dtype=x.dtype, device=x.device)
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


def _coefficients(sched: Scheduler, t: torch.Tensor):
    t = t.to("cpu", torch.float64)  # differentiable: learned solvers train their times through here
    if t.dim() == 1 and t.numel() > 1 and t.stride(0) == 0:  # one time expanded over the batch: compute it once
        return tuple(c.expand(t.shape) for c in _coefficients(sched, t[:1]))
    return sched.alpha(t), sched.sigma(t), sched.d_alpha(t), sched.d_sigma(t)


def velocity_from_prediction(kind: str, f, x, t, sched: Scheduler) -> torch.Tensor:
    """u = beta_t x + gamma_t f for the network output f of type `kind` ([BNS] Table 1)."""
    kind = canonical_prediction(kind)
    if kind == "velocity":
        return f
    a, s, da, ds = _coefficients(sched, t)
    if kind == "eps":
        beta, gamma = da / a, ds - s * da / a
    elif kind == "x1":
        beta, gamma = ds / s, da - a * ds / s
    else:  # v
        n = a * a + s * s
        beta, gamma = (a * da + s * ds) / n, -(da * s - a * ds) / n
    return _per_sample(beta, x) * x + _per_sample(gamma, x) * f


def prediction_from_velocity(kind: str, u, x, t, sched: Scheduler) -> torch.Tensor:
    """The network output of type `kind` that gives velocity u at (t, x) (inverse of the above).

    Written with D = alpha' sigma - alpha sigma' so it stays finite at both ends of the path:
    x1 = (sigma u - sigma' x)/D,  eps = (alpha' x - alpha u)/D,  v = alpha eps - sigma x1.
    """
    kind = canonical_prediction(kind)
    if kind == "velocity":
        return u
    a, s, da, ds = _coefficients(sched, t)
    d = da * s - a * ds
    if kind == "x1":
        return _per_sample(s / d, x) * u - _per_sample(ds / d, x) * x
    if kind == "eps":
        return _per_sample(da / d, x) * x - _per_sample(a / d, x) * u
    n = a * a + s * s
    return _per_sample((a * da + s * ds) / d, x) * x - _per_sample(n / d, x) * u


# --- classifier-free guidance -------------------------------------------------------------------

GUIDANCE_CONVENTIONS = {
    "fm": "(1+w)*cond - w*uncond  (Guided Flows / flow_matching; w = 0 is unguided)",
    "diffusers": "uncond + w*(cond - uncond)  (diffusers pipelines; w = 1 is unguided)",
}


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: weight, its convention (named explicitly) and the null condition.

    `null` maps each conditioning keyword to its unconditional value (e.g. {"labels": 10} for a
    class embedding whose null label is 10); keywords not listed are passed unchanged to both
    halves. The conditional and unconditional passes are batched into one network call, which
    counts as one NFE.
    """

    weight: float
    convention: str = "fm"
    null: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.convention not in GUIDANCE_CONVENTIONS:
            raise BespokeError(
                f"unknown guidance convention {self.convention!r}; valid: "
                + "; ".join(f"{k!r}: {v}" for k, v in GUIDANCE_CONVENTIONS.items())
            )

    @property
    def is_identity(self) -> bool:
        """True when the guided output is just the conditional one (no unconditional pass needed)."""
        return self.weight == (0.0 if self.convention == "fm" else 1.0)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.convention == "fm":
            return (1.0 + w) * cond - w * uncond
        return uncond + w * (cond - uncond)

    def as_dict(self) -> dict:
        return {"weight": self.weight, "convention": self.convention}


def _null_like(value: torch.Tensor, null) -> torch.Tensor:
    null = torch.as_tensor(null, dtype=value.dtype, device=value.device)
    return null.expand_as(value)


def guided(fn: Callable, guidance: Guidance, required: tuple[str, ...]) -> Callable:
    """Wrap fn(x, t, **cond) so that it returns the guided output from one batched call (a plain call
    when the weight makes it the conditional output, e.g. w = 0 in the fm convention)."""

    def call(x, t, **cond):
        missing = [k for k in required if k not in cond]
        if missing:
            raise BespokeError(
                f"guidance (w={guidance.weight}) needs the condition {', '.join(missing)}; "
                "pass it to sample(..., labels=...) or build the flow without guidance"
            )
        if guidance.is_identity:  # the guided output is the conditional one: no unconditional pass
            return fn(x, t, **cond)
        both = {
            k: torch.cat([v, _null_like(v, guidance.null[k])]) if k in guidance.null else torch.cat([v, v])
            for k, v in cond.items()
        }
        out = fn(torch.cat([x, x]), torch.cat([t, t]), **both)
        c, u = out.chunk(2)
        return guidance.combine(c, u)

    return call


# --- the Flow ------------------------------------------------------------------------------------


class Flow:
    """A velocity field u(t, x, **cond) in canonical time, with the facts solvers need about it.

    velocity:     fn(t, x, **cond) -> u, with t a tensor of shape (batch,); one call = one NFE
    scheduler:    its Gaussian path, when known (needed by exponential integrators and DDIM)
    sample_shape: shape of one sample (without the batch axis), used to validate noise
    cond_keys:    the conditioning keywords the model takes; anything else is an error
    ode_end:      last time at which the model is defined (< 1 for discrete-timestep diffusion
                  models: their smallest training timestep). Ground truth integrates to it and
                  then takes the data prediction there (DESIGN §3).
    data_range:   peak-to-peak range of the data, for PSNR (2 for data in [-1, 1])
    dtype:        the model's compute dtype (network adapters cast the state to it for the network
                  call only, so a float64 state keeps float64 coefficient math); None = any
    noise_scale:  the state at t = 0 is noise_scale * N(0, I): 1 for normalised paths, sigma_max for
                  EDM/VE-coordinate models (k-diffusion's `randn * sigmas[0]`); GT caches and the CLI
                  draw their initial states this way (`initial_state`)
    num_classes:  number of class labels of a class-conditional model (None otherwise); for a text-to-image
                  model loaded with a prompt set, the number of prompts (its `labels` index the set)
    prompts:      that prompt set (`bespoke.prompts.Prompts`), None for other models
    decode:       latents -> pictures in the data range, for a latent model (its VAE); None when the samples are
                  the pictures
    info:         what the model source knows of it (recipe, training time, ...), JSON-able
    """

    def __init__(
        self,
        velocity: Callable,
        *,
        scheduler: Scheduler | None = None,
        sample_shape: tuple[int, ...] | None = None,
        cond_keys: tuple[str, ...] = (),
        name: str = "flow",
        ode_end: float = 1.0,
        data_range: float = 2.0,
        fingerprint: str | None = None,
        guidance: Guidance | None = None,
        dtype: torch.dtype | None = None,
        num_classes: int | None = None,
        info: dict | None = None,
        noise_scale: float = 1.0,
        prompts=None,
        decode: Callable | None = None,
    ):
        if not 0.0 < ode_end <= 1.0:
            raise BespokeError(f"ode_end must lie in (0, 1], got {ode_end}")
        self._velocity = velocity
        self.scheduler = scheduler
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.cond_keys = tuple(cond_keys)
        self.name = name
        self.ode_end = float(ode_end)
        self.data_range = float(data_range)
        self.fingerprint = fingerprint
        self.guidance = guidance
        self.dtype = dtype
        self.num_classes = num_classes
        self.info = dict(info or {})
        self.noise_scale = float(noise_scale)
        self.prompts = prompts
        self.decode = decode
        self.nfe = 0

    def __repr__(self):
        return f"Flow({self.name!r}, scheduler={self.scheduler!r}, sample_shape={self.sample_shape})"

    def derived(self, velocity: Callable, **changes) -> Flow:
        """A flow with another velocity field and these facts changed, all others the same as this one's."""
        facts = dict(
            scheduler=self.scheduler,
            sample_shape=self.sample_shape,
            cond_keys=self.cond_keys,
            name=self.name,
            ode_end=self.ode_end,
            data_range=self.data_range,
            fingerprint=self.fingerprint,
            guidance=self.guidance,
            dtype=self.dtype,
            num_classes=self.num_classes,
            info=self.info,
            noise_scale=self.noise_scale,
            prompts=self.prompts,
            decode=self.decode,
        )
        return Flow(velocity, **{**facts, **changes})

    def initial_state(self, noise: torch.Tensor) -> torch.Tensor:
        """The state at t = 0 for standard normal `noise`: noise_scale * noise."""
        return noise if self.noise_scale == 1.0 else self.noise_scale * noise

    # --- validation ---------------------------------------------------------------------------
    def check_noise(self, noise: torch.Tensor) -> None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise BespokeError(f"noise must be a floating-point tensor, got {type(noise).__name__}")
        if self.sample_shape is not None and tuple(noise.shape[1:]) != self.sample_shape:
            raise BespokeError(
                f"noise has shape {tuple(noise.shape)}, but {self.name} takes "
                f"(batch, {', '.join(map(str, self.sample_shape))}); draw it as "
                f"torch.randn(batch, {', '.join(map(str, self.sample_shape))})"
            )

    def check_cond(self, cond: Mapping[str, Any], batch: int) -> None:
        unknown = [k for k in cond if k not in self.cond_keys]
        if unknown:
            takes = ", ".join(self.cond_keys) if self.cond_keys else "no conditioning keywords"
            raise BespokeError(f"unknown model keyword {', '.join(map(repr, unknown))}: {self.name} takes {takes}")
        for k, v in cond.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != batch:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise BespokeError(f"condition {k!r} must be a tensor with batch size {batch}, got {shape}")

    # --- evaluation ---------------------------------------------------------------------------
    def __call__(self, t, x: torch.Tensor, **cond) -> torch.Tensor:
        """u_t(x): one NFE. `t` is a float or a (batch,) tensor."""
        self.check_cond(cond, x.shape[0])
        t = torch.as_tensor(t, dtype=torch.float64)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        u = self._velocity(t.to(device=x.device), x, **cond)
        self.nfe += 1
        check_output(self.name, u, x, "velocity")
        if not torch.isfinite(u).all():
            bad = ~torch.isfinite(u.reshape(u.shape[0], -1)).all(1)
            tt = t[bad.nonzero()[0, 0]].item() if t.numel() == u.shape[0] else t.flatten()[0].item()
            error, why = NonFiniteVelocity, "check the model and its inputs (dtype, scale of the noise)"
            if not 0.0 <= tt <= 1.0:
                why = "outside the time range [0, 1]"
            elif tt >= self.ode_end:
                error, why = (
                    SingularEnd,
                    (
                        "at the data end, where VP-type paths are singular: use a solver that does not "
                        "evaluate there, e.g. ddim, dpm++2m, unipc or edm-heun"
                    ),
                )
            raise error(f"{self.name} returned a non-finite velocity at t = {tt:.6g}: {why}")
        return u

    @contextmanager
    def counting(self):
        """`with flow.counting() as c: ...; c.nfe` counts the NFE spent inside the block."""
        counter = _Counter(self)
        yield counter
        counter.stop()

    # --- conversions --------------------------------------------------------------------------
    def _need_scheduler(self, what: str) -> Scheduler:
        if self.scheduler is None:
            raise BespokeError(
                f"{what} needs the model's Gaussian path, but {self.name} has no scheduler; "
                "build the flow with scheduler=... or use an RK solver (euler, midpoint, heun, rk4, ipndm)"
            )
        return self.scheduler

    def predict(self, kind: str, t, x, u) -> torch.Tensor:
        """The eps / x1 / v prediction at (t, x) from the velocity u there."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return prediction_from_velocity(kind, u, x, t, self._need_scheduler(f"the {kind} prediction"))


class _Counter:
    def __init__(self, flow: Flow):
        self._flow, self._start, self._end = flow, flow.nfe, None

    def stop(self):
        self._end = self._flow.nfe

    @property
    def nfe(self) -> int:
        return (self._flow.nfe if self._end is None else self._end) - self._start


# --- adapters from networks ----------------------------------------------------------------------


def _network_cond_keys(net: Callable) -> tuple[tuple[str, ...], bool]:
    """Keyword names net(x, t, **cond) accepts besides the first two, and whether it has **kwargs."""
    fn = net.forward if isinstance(net, torch.nn.Module) else net
    params = list(inspect.signature(fn).parameters.values())[2:]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    keys = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return keys, var_kw


def check_output(name: str, out, x: torch.Tensor, what: str) -> None:
    """A model's output must be a tensor of its input's shape (batch included), or a one-line error."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BespokeError(
            f"{name} returned {got} for an input of shape {tuple(x.shape)}; the model must return its {what} "
            "with the input's shape (batch included): check the network's output and its sample_shape"
        )


def _output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):  # diffusers' output dataclasses
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise BespokeError(f"the network returned {type(out).__name__}; expected a tensor")


def from_network(
    net: Callable,
    *,
    prediction: str,
    scheduler: Scheduler,
    time_input: str | Callable = "auto",
    cond_keys: tuple[str, ...] | None = None,
    guidance: Guidance | None = None,
    sample_shape: tuple[int, ...] | None = None,
    name: str = "network",
    ode_end: float | None = None,
    data_range: float = 2.0,
    fingerprint: str | None = None,
    num_classes: int | None = None,
    info: dict | None = None,
) -> Flow:
    """A Flow from a network `net(x, time, **cond)` that predicts eps, x1 (data), v or the velocity.

    time_input: what the network takes as its time argument:
        "canonical" - canonical t in [0, 1] (continuous-time FM models);
        "timestep"  - the discrete scheduler's timestep tau (a `VPDiscrete` scheduler; fractional
                      values between integers, clamped at 0 below the smallest training timestep);
        callable    - any map from canonical t (float64 tensor) to the network's time;
        "auto"      - "timestep" for a VPDiscrete scheduler, "canonical" otherwise.
    For discrete-timestep models the ODE runs from the largest to the smallest training timestep
    (`ode_end`), and the sample is the data prediction there (DESIGN §3).
    fingerprint: defaults, for an nn.Module, to a hash of its weights, prediction and scheduler, so
    solver files and GT caches made for it recognise it in a later process.
    """
    kind = canonical_prediction(prediction)
    if not isinstance(scheduler, Scheduler):
        raise BespokeError(f"scheduler must be a bespoke.paths.Scheduler, got {type(scheduler).__name__}")
    if time_input == "auto":
        time_input = "timestep" if isinstance(scheduler, VPDiscrete) else "canonical"
    if time_input == "timestep":
        if not isinstance(scheduler, VPDiscrete):
            raise BespokeError('time_input="timestep" needs a VPDiscrete scheduler')
        to_net_time = lambda t: scheduler.timestep(t).clamp(min=0.0)  # noqa: E731
        if ode_end is None:
            ode_end = float(scheduler.time_of_timestep(0.0))
    elif time_input == "canonical":
        to_net_time = lambda t: t  # noqa: E731
    elif callable(time_input):
        to_net_time = time_input
    else:
        raise BespokeError(f'time_input must be "auto", "canonical", "timestep" or a callable, got {time_input!r}')

    keys, var_kw = _network_cond_keys(net)
    if cond_keys is None:
        if var_kw:
            raise BespokeError(
                "the network takes **kwargs, so misspelt keywords cannot be caught; pass "
                "cond_keys=(...) naming the conditioning keywords it uses"
            )
        cond_keys = keys
    else:
        bad = [k for k in cond_keys if k not in keys] if not var_kw else []
        if bad:
            raise BespokeError(f"cond_keys {bad} are not parameters of the network (it takes {keys})")

    net_dtype = next((p.dtype for p in net.parameters()), None) if isinstance(net, torch.nn.Module) else None
    if fingerprint is None and isinstance(net, torch.nn.Module):  # the weights and how they are read
        fingerprint = weights_fingerprint(net.state_dict(), extra=f"{kind}|{scheduler!r}")

    def predict(x, t, **cond):
        # the network runs in its own dtype; the state and the coefficient math keep theirs (e.g. float64)
        xin = x if net_dtype is None else x.to(net_dtype)
        tin = to_net_time(t.to("cpu", torch.float64)).to(device=x.device, dtype=xin.dtype)
        out = _output_tensor(net(xin, tin, **cond))
        check_output(name, out, xin, f"{kind} prediction")
        return out.to(x.dtype)

    if guidance is not None:
        unknown = [k for k in guidance.null if k not in cond_keys]
        if unknown:
            raise BespokeError(f"guidance.null names {unknown}, which the network does not take ({cond_keys})")
        predict = guided(predict, guidance, tuple(guidance.null))

    def velocity(t, x, **cond):
        return velocity_from_prediction(kind, predict(x, t, **cond), x, t, scheduler)

    return Flow(
        velocity,
        scheduler=scheduler,
        sample_shape=sample_shape,
        cond_keys=tuple(cond_keys),
        name=name,
        ode_end=1.0 if ode_end is None else ode_end,
        data_range=data_range,
        fingerprint=fingerprint,
        guidance=guidance,
        dtype=net_dtype,
        num_classes=num_classes,
        info=info,
    )


def scale_time_flow(flow: Flow, target: Scheduler) -> Flow:
    """The flow seen through the path `target`: x_bar(r) = s_r x(t_r) ([BES] Thm 2.3, spec §1.4-1.5).

    u_bar_r(x_bar) = (s'_r / s_r) x_bar + t'_r s_r u_{t_r}(x_bar / s_r): one NFE of u_bar is one of u.
    For ideal (exact) velocity fields this is the same model trained on `target`. A trajectory of the
    new flow starts from s_0 x_0 and ends at s_1 x(1) (s_0 = s_1 = 1 between normalised paths).
    """
    from .paths import scale_time

    source = flow._need_scheduler("a change of scheduler")

    def velocity(r, xb, **cond):
        st = scale_time(source, target, r.to("cpu", torch.float64))
        s, ds, dt = (_per_sample(v, xb) for v in (st.s, st.ds, st.dt))
        return (ds / s) * xb + dt * s * flow(st.t, xb / s, **cond)

    end = flow.ode_end if flow.ode_end >= 1.0 else float(target.t_of_log_snr(source.log_snr(flow.ode_end)))
    return flow.derived(velocity, scheduler=target, name=f"{flow.name}@{target!r}", ode_end=end)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_flow(flow: Flow, dtype) -> Flow:
    """The flow with its network run under torch.autocast(dtype) (bf16/fp16 matmuls and convolutions):
    the solver's state and coefficient math keep their own dtype (float32/float64), as autocast leaves
    elementwise arithmetic alone. The same model, so the fingerprint is kept."""
    dtype = AUTOCAST_DTYPES.get(dtype, dtype)
    if dtype not in AUTOCAST_DTYPES.values():
        raise BespokeError(f"autocast dtype must be one of {', '.join(AUTOCAST_DTYPES)}, got {dtype!r}")

    def velocity(t, x, **cond):
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return flow(t, x, **cond).to(x.dtype)

    return flow.derived(velocity, name=f"{flow.name}[autocast {dtype}]")
