"""Bundled models: `zoo_model(NAME)`, which `bespoke.load_model("zoo:NAME")` resolves to.

zoo:gmm2d      a 2-D Gaussian mixture (6 components, 3 classes) with its exact velocity
zoo:gmm<D>d    a seeded random mixture in D dimensions, e.g. zoo:gmm16d
zoo:digits-ot  16x16 digits, flow matching on the CondOT path, velocity prediction
zoo:digits-vp  16x16 digits, eps-prediction, DDPM discrete linear-beta schedule (timesteps 0..999)
zoo:digits-cos 16x16 digits, v-prediction on the cosine path
zoo:digits-t2i a tiny text-to-image latent diffusion pipeline ("a handwritten seven"), in diffusers'
               layout (needs diffusers and transformers); loaded with a prompt set
The digits models are class-conditional (labels 0..9) and sample with their default guidance
unless told otherwise.
"""

from __future__ import annotations

import re

from ..errors import BespokeError
from ..flows import Flow, Guidance
from ..paths import Scheduler, scheduler_from_name
from .gmm import GaussianMixture, gmm2d, gmm_flow, random_mixture
from .pretrained import DIGITS_MODELS, T2I_NAME, digits_flow, t2i_flow

__all__ = ["zoo_model", "ZOO_NAMES", "GaussianMixture", "gmm_flow", "gmm2d", "random_mixture"]

ZOO_NAMES = ("gmm2d", "gmm<D>d", *DIGITS_MODELS, T2I_NAME)


def zoo_model(
    name: str, *, path: str | Scheduler | None = None, guidance="default", prompts=None, negative_prompt=None
) -> Flow:
    """The bundled model zoo:`name` (see `bespoke.load_model` for `path`, `guidance` and the prompts)."""
    if name == T2I_NAME:
        if path is not None:
            raise BespokeError(f"zoo:{name} was trained on its own path; `path` only applies to the analytic models")
        return t2i_flow(guidance=guidance, prompts=prompts, negative_prompt=negative_prompt)
    if prompts is not None or negative_prompt is not None:
        raise BespokeError(f"zoo:{name} takes no text prompts (zoo:{T2I_NAME} does)")
    scheduler = path if isinstance(path, Scheduler) or path is None else scheduler_from_name(path)
    if name in DIGITS_MODELS:
        if scheduler is not None:
            raise BespokeError(f"zoo:{name} was trained on its own path; `path` only applies to the analytic models")
        return digits_flow(name, guidance)
    scheduler = scheduler or scheduler_from_name("condot")
    guidance = None if guidance == "default" else guidance
    if isinstance(guidance, (int, float)):
        guidance = Guidance(float(guidance), "fm")
    if name == "gmm2d":
        return gmm2d(scheduler, guidance)
    m = re.fullmatch(r"gmm(\d+)d", name)
    if m and int(m.group(1)) >= 1:
        return gmm_flow(random_mixture(int(m.group(1))), scheduler, name=f"zoo:{name}", guidance=guidance)
    raise BespokeError(f"unknown zoo model 'zoo:{name}'; available: {', '.join('zoo:' + n for n in ZOO_NAMES)}")
