"""Model specs (DESIGN §4): the strings the CLI and `bespoke.load_model` take to name a model.

    zoo:NAME                 a bundled demo model (`bespoke.zoo`)
    diffusers:DIR            a diffusers model folder (`bespoke.integrations.diffusers_model`)
    python:FILE.py:FUNC      FUNC() from a Python file
    MODULE:FUNC              FUNC() from an importable module (dotted name)

A factory returns a `bespoke.Flow`, or `(net, params)`: a network plus the keywords of
`bespoke.from_network` that say how to read it (prediction, scheduler - a Scheduler or a name such
as "vp-discrete" -, sample_shape, ...). A factory that takes a `guidance` keyword gets the guidance
weight asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

from .errors import BespokeError
from .flows import Flow, Guidance, from_network
from .paths import Scheduler, scheduler_from_name
from .zoo import zoo_model

__all__ = ["load_model", "SPEC_FORMS"]

SPEC_FORMS = "zoo:NAME, diffusers:DIR, python:FILE.py:FUNC or MODULE:FUNC"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_model(
    spec: str,
    *,
    path: str | Scheduler | None = None,
    guidance="default",
    prompts=None,
    negative_prompt: str | None = None,
) -> Flow:
    """A Flow from a model spec.

    path:     the Gaussian path of the analytic models (condot by default, cosine, vp, vp-discrete,
              ve, edm, or a Scheduler); trained models keep the path they were trained on.
    guidance: "default" (the model's own default: none for the mixtures), None (no guidance),
              a weight in the fm convention (1+w) cond - w uncond, or a bespoke.Guidance; for a
              text-to-image pipeline, a weight W in diffusers' convention uncond + W (cond - uncond).
    prompts:  the prompt set of a text-to-image model (a list of strings, a prompt file as a Path, or a
              `bespoke.prompts.Prompts`); its `labels` are then indices into it. negative_prompt:
              the null condition of guidance ("" by default, as in diffusers).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise BespokeError(f"model spec must look like {SPEC_FORMS}; got {spec!r}")
    kind, _, rest = spec.partition(":")
    given = prompts is not None or negative_prompt is not None
    text = {"prompts": prompts, "negative_prompt": negative_prompt} if given else {}
    if kind == "zoo":
        return zoo_model(rest, path=path, guidance=guidance, **text)
    if path is not None:
        raise BespokeError(f"{spec}: a path only applies to the analytic zoo models; this model has its own")
    if kind == "diffusers":
        from .integrations.diffusers_model import load_diffusers

        return load_diffusers(rest, spec=spec, guidance=guidance, **text)
    if text:
        raise BespokeError(f"{spec}: prompts were given, but only text-to-image pipelines (diffusers:DIR) take them")
    if kind == "python":
        source, _, func = rest.rpartition(":")
        factory = _from_file(spec, Path(source), func)
    else:
        source, _, func = spec.rpartition(":")
        factory = _from_module(spec, source, func)
    return _call_factory(spec, factory, guidance)


def _from_file(spec: str, file: Path, func: str):
    if not file.name or not func:
        raise BespokeError(f"model spec {spec!r} must look like python:FILE.py:FUNC")
    if not file.is_file():
        raise BespokeError(f"{spec}: no such file {file}")
    name = f"_bespoke_model_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None:
        raise BespokeError(f"{spec}: {file} is not a Python file (it must end in .py)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle-free helpers in the file look themselves up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise BespokeError(f"{spec}: running {file} failed: {type(e).__name__}: {e}") from None
    return _attribute(spec, module, func, str(file))


def _from_module(spec: str, module_name: str, func: str):
    if not _MODULE.fullmatch(module_name) or not func:
        raise BespokeError(f"unknown model spec {spec!r}; valid forms: {SPEC_FORMS}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise BespokeError(f"{spec}: no module named {e.name!r}; valid forms: {SPEC_FORMS}") from None
    except Exception as e:
        raise BespokeError(f"{spec}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    return _attribute(spec, module, func, module_name)


def _attribute(spec: str, module, func: str, where: str):
    factory = getattr(module, func, None)
    if not callable(factory):
        raise BespokeError(f"{spec}: {where} has no function {func!r}")
    return factory


def _call_factory(spec: str, factory, guidance) -> Flow:
    takes_guidance = "guidance" in inspect.signature(factory).parameters
    if guidance != "default" and not takes_guidance:
        raise BespokeError(f"{spec}: guidance was given, but {factory.__name__}() takes no `guidance` keyword")
    try:
        made = factory(guidance=guidance) if takes_guidance and guidance != "default" else factory()
    except BespokeError:
        raise
    except Exception as e:
        raise BespokeError(f"{spec}: {factory.__name__}() failed: {type(e).__name__}: {e}") from None
    if isinstance(made, Flow):
        flow = made
    elif isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], dict):
        flow = _from_network(spec, *made)
    else:
        raise BespokeError(
            f"{spec}: {factory.__name__}() returned {type(made).__name__}; it must return a bespoke.Flow "
            "or (net, params) with params the keywords of bespoke.from_network"
        )
    if flow.name in ("flow", "network"):
        flow.name = spec
    return flow


def _from_network(spec: str, net, params: dict) -> Flow:
    params = dict(params)
    if isinstance(params.get("scheduler"), str):
        params["scheduler"] = scheduler_from_name(params["scheduler"])
    if isinstance(params.get("guidance"), (int, float)):
        params["guidance"] = Guidance(float(params["guidance"]), "fm")
    params.setdefault("name", spec)
    try:
        return from_network(net, **params)
    except TypeError as e:
        raise BespokeError(f"{spec}: the factory's params do not fit bespoke.from_network: {e}") from None
