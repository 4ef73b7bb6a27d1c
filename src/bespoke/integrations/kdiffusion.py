"""k-diffusion-style sampling with bespoke solvers: `edm_flow` and the sampler `sample_bns`.

k-diffusion's samplers take a denoiser D(x, sigma) in EDM/VE coordinates x = x_data + sigma eps and solve
dx/dsigma = (x - D(x, sigma)) / sigma from sigmas[0] down to sigmas[-1]. Here that ODE is a `Flow` in canonical
time on the EDM path (alpha = 1, sigma(t) = (smax^(1/rho) + t (smin^(1/rho) - smax^(1/rho)))^rho):

    u(t, x) = dx/dt = sigma'(t)/sigma(t) (x - D(x, sigma(t)))        ([BNS] Table 1, x1-prediction, alpha = 1)

    from bespoke.integrations.kdiffusion import edm_flow, sample_bns
    flow = edm_flow(denoiser, sigma_max=80.0)               # train on this flow (bespoke.generate_gt / train_bns)
    x = sample_bns(denoiser, torch.randn(16, 3, 32, 32) * 80.0, sigmas, solver="bns.safetensors")

Conventions:
- The state at t = 0 is x at sigma = sigma_max, i.e. k-diffusion's already scaled `randn * sigmas[0]`; solvers
  start from it unchanged. The flow's `noise_scale` is sigma_max, so `bespoke.generate_gt` (and the CLI)
  draw their initial states the same way and training pairs fit the sampler.
- sigma_min = 0 reaches the data (t = 1 is sigma = 0). There sigma' = 0 too (rho > 1) and u = sigma' * (x - D)/sigma,
  sigma' times the noise prediction, is 0; the model is not called at sigma = 0 (D(x, 0) = x), as in k-diffusion.
- The model's `extra_args` are fixed when the flow is built; they are not per-call conditioning.
"""

from __future__ import annotations

import itertools
import math
import os
import re

import torch
from tqdm import tqdm

from ..errors import BespokeError
from ..flows import Flow
from ..paths import EDM
from ..solvers import Solver
from ..solvers import solver as builtin_solver
from ..solvers.files import load_solver, read_metadata
from ..solvers.guided import GuidedBNSSolver, to_convention
from ..solvers.nonstationary import run_ns

__all__ = ["edm_flow", "sample_bns"]


def _edm(sigma_max: float, sigma_min: float, rho: float) -> EDM:
    if not (math.isfinite(sigma_max) and 0.0 <= sigma_min < sigma_max) or not rho > 0:
        raise BespokeError(
            f"the EDM path needs 0 <= sigma_min < sigma_max and rho > 0, got sigma_min = {sigma_min}, "
            f"sigma_max = {sigma_max}, rho = {rho}; pass decreasing sigmas (e.g. k-diffusion's get_sigmas_karras)"
        )
    return EDM(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)


def _rate(sched: EDM, t: torch.Tensor) -> torch.Tensor:
    """sigma'(t)/sigma(t) in float64 (shape of t); 0 at sigma = 0, where sigma' = 0 as well (rho > 1)."""
    t = torch.as_tensor(t, dtype=torch.float64).to("cpu")
    s, ds = sched.sigma(t), sched.d_sigma(t)
    at_data = s == 0
    if sched.rho <= 1 and bool(at_data.any()):
        raise BespokeError(
            f"with rho = {sched.rho:g} and sigma_min = 0, dx/dt = sigma'/sigma (x - D) is infinite at sigma = 0; "
            "use rho > 1, end the sigmas above 0, or a solver that does not evaluate at the data end"
        )
    return torch.where(at_data, torch.zeros_like(s), ds / torch.where(at_data, torch.ones_like(s), s))


def _denoise(model, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict) -> torch.Tensor:
    """D(x, sigma) by k-diffusion's call model(x, sigma * s_in, **extra_args); sigma is () or (batch,).

    At sigma = 0 there is no noise to remove, D = x, and the model is not called (k-diffusion never does)."""
    if bool((sigma == 0).all()):
        return x
    s_in = x.new_ones([x.shape[0]])
    return model(x, sigma.to(x.device, x.dtype) * s_in, **extra_args).to(x.dtype)


def _velocity(sched: EDM, t, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """u = sigma'(t)/sigma(t) (x - D): the x1-prediction row of [BNS] Table 1 with alpha = 1."""
    rate = _rate(sched, t).to(x.device, x.dtype)
    return rate.reshape(rate.shape + (1,) * (x.dim() - rate.dim())) * (x - denoised)


def edm_flow(
    model,
    sigma_max: float,
    sigma_min: float = 0.0,
    rho: float = 7.0,
    *,
    sample_shape: tuple[int, ...] | None = None,
    name: str = "k-diffusion denoiser",
    extra_args: dict | None = None,
) -> Flow:
    """A k-diffusion denoiser `model(x, sigma, **extra_args)` as a Flow on EDM(sigma_min, sigma_max, rho).

    t = 0 is sigma_max (the state there is the scaled noise randn * sigma_max), t = 1 is sigma_min (the data
    when sigma_min = 0). The flow has no fingerprint: a callable cannot be hashed, so solver files and GT
    caches made for it are not checked against the model.
    """
    sched = _edm(float(sigma_max), float(sigma_min), float(rho))
    extra = dict(extra_args or {})

    def velocity(t, x):
        tt = t.to("cpu", torch.float64)
        return _velocity(sched, tt, x, _denoise(model, x, sched.sigma(tt), extra))

    return Flow(velocity, scheduler=sched, sample_shape=sample_shape, name=name, noise_scale=sched.sigma_max)


def _check_trained_path(path, sched: EDM) -> None:
    """A solver file records the path it was trained on; its times are canonical t of that path only."""
    record = read_metadata(path)["model"].get("scheduler")
    if record is None:
        return
    m = re.fullmatch(r"EDM\(sigma_min=([^,]+), sigma_max=([^,]+), rho=([^)]+)\)", record)
    try:
        same = m is not None and all(
            math.isclose(float(v), w, rel_tol=1e-6, abs_tol=1e-12)
            for v, w in zip(m.groups(), (sched.sigma_min, sched.sigma_max, sched.rho))
        )
    except ValueError:
        same = False
    if not same:
        raise BespokeError(
            f"{path} was trained on the path {record}, but these sigmas and rho give {sched!r}; its times are "
            "canonical times of its own path, so pass sigmas with the same first and last value (and the same rho), "
            "or train a solver on edm_flow(model, sigma_max, sigma_min, rho)"
        )


def _resolve(solver, nfe: int, sched: EDM) -> Solver:
    if solver is None:
        raise BespokeError(
            "sample_bns needs a solver: pass solver= a learned solver file (*.safetensors), a bespoke Solver "
            '(e.g. bespoke.BNSSolver or bespoke.solver("dpm++2m", 8)) or a built-in solver name'
        )
    if isinstance(solver, Solver):
        return solver
    if not isinstance(solver, (str, os.PathLike)):
        raise BespokeError(
            f"solver must be a bespoke Solver, a solver file or a solver name, got {type(solver).__name__}"
        )
    if str(solver).endswith(".safetensors") or os.path.isfile(solver):
        loaded = load_solver(solver, nfe)  # NFE = len(sigmas) - 1; the error lists the NFEs the file holds
        _check_trained_path(solver, sched)
        return loaded
    return builtin_solver(str(solver), nfe)


def _guided_scale(solver: GuidedBNSSolver, given, extra: dict) -> float:
    """The scale a guided solver runs at: guidance_scale=, else extra_args' cond_scale (both k-diffusion's CFG
    convention, diffusers'), in the solver's convention and checked against its range."""
    given = extra.get("cond_scale") if given is None else given
    if given is None:
        raise BespokeError(
            f"this solver serves guidance scales {solver.range_text()}: pass sample_bns(..., guidance_scale=S) with "
            "the scale your CFG wrapper applies (or extra_args={'cond_scale': S})"
        )
    return solver.check_scale(to_convention(float(given), "diffusers", solver.convention))


def _endpoints(sigmas) -> tuple[torch.Tensor, float, float]:
    sigmas = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise BespokeError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    return sigmas, float(sigmas[0]), float(sigmas[-1])


@torch.no_grad()
def sample_bns(
    model, x, sigmas, extra_args=None, callback=None, disable=None, solver=None, rho=7.0, guidance_scale=None
):
    """k-diffusion sampler: the bespoke `solver` on `model` from x (= randn * sigmas[0]) to sigma = sigmas[-1].

    Only the endpoints of `sigmas` are used: the EDM path EDM(sigmas[-1], sigmas[0], rho) (see `edm_flow`)
    defines canonical time, and the solver brings its own times in it, so a learned solver must have been
    trained on `edm_flow(model, sigma_max, sigma_min, rho)` with the same three numbers (a solver file says
    which path it was trained on, and that is checked). NFE = solver.nfe.
    solver: a solver file (*.safetensors; its solver for NFE = len(sigmas) - 1), a built-in name (same NFE),
            or a bespoke Solver (BNSSolver, BespokeSolver, NSSolver, bespoke.solver(...)). A learned solver's
            model fingerprint cannot be checked against a callable model.
    callback: called once per model evaluation with k-diffusion's keys; i is the evaluation index and
            sigma = sigma_hat the noise level sigma(t_i) of that evaluation.
    guidance_scale: for a guided solver (one for a range of scales), the scale `model` applies, in k-diffusion's
            CFG convention uncond + s (cond - uncond); default: extra_args["cond_scale"], as CFG wrappers take it.
    """
    sigmas, sigma_max, sigma_min = _endpoints(sigmas)
    extra = dict(extra_args or {})
    flow = edm_flow(model, sigma_max, sigma_min, rho, sample_shape=tuple(x.shape[1:]), extra_args=extra)
    sched = flow.scheduler
    resolved = _resolve(solver, sigmas.numel() - 1, sched)
    if isinstance(resolved, GuidedBNSSolver):  # its NS form at the scale the model runs at
        resolved = resolved.at_scale(_guided_scale(resolved, guidance_scale, extra))
    ns = resolved.to_ns(flow)
    a, b = ns.a.to(x.device, x.dtype), ns.b.to(x.device, x.dtype)
    calls = itertools.count()

    with tqdm(total=ns.nfe, disable=disable) as bar:

        def ev(t, xt):
            sigma = sched.sigma(t)
            denoised = _denoise(model, xt, sigma, extra)
            if callback is not None:
                s = sigma.to(sigmas.device, sigmas.dtype)
                callback({"x": xt, "i": next(calls), "sigma": s, "sigma_hat": s, "denoised": denoised})
            bar.update(1)
            return _velocity(sched, t, xt, denoised)

        return run_ns(ev, x, ns.times, a, b, ns.start_scale)
