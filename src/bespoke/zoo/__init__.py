"""Bundled models. `load_model("zoo:NAME")` resolves them.

zoo:gmm2d      a 2-D Gaussian mixture (6 components, 3 classes) with its exact velocity
zoo:gmm<D>d    a seeded random mixture in D dimensions, e.g. zoo:gmm16d
"""

from __future__ import annotations

import re

from ..errors import BespokeError
from ..flows import Flow, Guidance
from ..paths import Scheduler, scheduler_from_name
from .gmm import GaussianMixture, gmm2d, gmm_flow, random_mixture

__all__ = ["load_model", "ZOO_NAMES", "GaussianMixture", "gmm_flow", "gmm2d", "random_mixture"]

ZOO_NAMES = ("gmm2d", "gmm<D>d")


def _zoo(name: str, scheduler: Scheduler, guidance: Guidance | None) -> Flow:
    if name == "gmm2d":
        return gmm2d(scheduler, guidance)
    m = re.fullmatch(r"gmm(\d+)d", name)
    if m and int(m.group(1)) >= 1:
        return gmm_flow(random_mixture(int(m.group(1))), scheduler, name=f"zoo:{name}", guidance=guidance)
    raise BespokeError(f"unknown zoo model 'zoo:{name}'; available: {', '.join('zoo:' + n for n in ZOO_NAMES)}")


def load_model(spec: str, *, path: str | Scheduler = "condot", guidance: Guidance | float | None = None) -> Flow:
    """A Flow from a model spec. `path` picks the Gaussian path of analytic models (condot, cosine,
    vp, vp-discrete, ve, edm, or a Scheduler); `guidance` a CFG weight (fm convention) or a Guidance."""
    if not isinstance(spec, str) or ":" not in spec:
        raise BespokeError(f"model spec must look like zoo:NAME, got {spec!r}")
    kind, _, name = spec.partition(":")
    if kind != "zoo":
        raise BespokeError(f"unsupported model spec {spec!r}: only zoo:NAME models are available in this version")
    scheduler = path if isinstance(path, Scheduler) else scheduler_from_name(path)
    if isinstance(guidance, (int, float)):
        guidance = Guidance(float(guidance), "fm")
    return _zoo(name, scheduler, guidance)
