"""`diffusers:DIR` model specs: a diffusers model folder as a bespoke Flow.

DIR is in `save_pretrained` layout: `unet/` or `transformer/` (the network, any diffusers model class)
plus `scheduler/` (whose config defines the training schedule), as a full pipeline with
`model_index.json` has them. The network is read as its scheduler config says (`diffusers_config`);
class labels reach it as `class_labels` (our `labels`), text conditioning as `encoder_hidden_states`
(and `pooled_projections`), passed through from Python.

A text-to-image pipeline folder (its model_index.json names text encoders) is read whole, text encoders
and VAE included (`diffusers_pipeline`): loaded with a prompt set, the model takes `labels` = prompt
indices, guidance is the pipeline's (uncond + W (cond - uncond), null = the negative prompt), and
`flow.decode` turns latents into pictures through the VAE.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from ..errors import BespokeError
from ..flows import Flow, Guidance, from_network
from ..prompts import Prompts, as_prompts
from .diffusers_config import DiffusersSchedule, schedule_from_config
from .diffusers_pipeline import is_text_pipeline, latent_decoder, load_text_pipeline, pipeline_fingerprint

__all__ = ["load_diffusers", "DiffusersNetwork"]

_NETWORK_FOLDERS = ("unet", "transformer")
_PASSED_THROUGH = ("encoder_hidden_states", "pooled_projections")


class DiffusersNetwork(torch.nn.Module):
    """net(x, timestep, **cond) over a diffusers model: our keyword names, its output as our prediction.

    sign: -1 for flow-matching models (their v = dx/ds with s = 1 - t). A model that also predicts
    its variance (out_channels = 2 x in_channels, `learned_range`) gives its first half, the mean.
    """

    def __init__(
        self, model, *, sign: float, sample_arg: str, rename: dict[str, str], required: tuple[str, ...], prompts=None
    ):
        super().__init__()
        self.model = model
        self.sign, self.sample_arg, self.rename, self.required = sign, sample_arg, rename, required
        self.prompts = prompts  # a PromptTable: `labels` are prompt indices

    def forward(self, x, timestep, **cond):
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        if self.prompts is not None:
            kwargs = self.prompts(cond.get("labels"))
        else:
            kwargs = self._passed_through(cond)
        out = self.model(**{self.sample_arg: x}, timestep=timestep, **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return self.sign * out

    def _passed_through(self, cond: dict) -> dict:
        missing = [k for k in self.required if k not in cond]
        if missing:
            raise BespokeError(
                f"this diffusers model needs {', '.join(missing)} (e.g. text embeddings) at every call; pass them as "
                "keywords from Python (solver.sample(flow, noise, encoder_hidden_states=...))"
            )
        return {self.rename.get(k, k): v for k, v in cond.items()}


def _read_json(path: Path, spec: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BespokeError(f"{spec}: cannot read {path}: {e}") from None


def _network_folder(root: Path, spec: str) -> Path:
    if not root.is_dir():
        raise BespokeError(f"{spec}: no such directory {root}")
    for name in _NETWORK_FOLDERS:
        if (root / name / "config.json").is_file():
            return root / name
    raise BespokeError(
        f"{spec}: {root} has no unet/ or transformer/ folder with a config.json; diffusers:DIR takes a folder in "
        "save_pretrained layout (a pipeline, or unet/ or transformer/ next to scheduler/)"
    )


def _load_network(folder: Path, spec: str):
    import diffusers

    cls_name = _read_json(folder / "config.json", spec).get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        raise BespokeError(f"{spec}: {folder}/config.json names {cls_name!r}, which is not a diffusers model class")
    try:
        model = cls.from_pretrained(str(folder), low_cpu_mem_usage=False)  # no `accelerate` needed
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError ... for a bad folder
        raise BespokeError(f"{spec}: diffusers could not load {folder}: {type(e).__name__}: {e}") from None
    return model.eval().requires_grad_(False)


def _sample_shape(config) -> tuple[int, ...]:
    size = config.get("sample_size")
    if size is None or config.get("in_channels") is None:
        raise BespokeError("the diffusers model config has no in_channels/sample_size, so the sample shape is unknown")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config["in_channels"]), *map(int, size))


def _conditioning(model) -> tuple[dict[str, str], tuple[str, ...], int | None]:
    """(our keyword -> the model's, required keywords, number of classes) from the forward signature."""
    params = inspect.signature(model.forward).parameters
    rename, required = {}, []
    classes = model.config.get("num_class_embeds") or model.config.get("num_embeds_ada_norm")
    if "class_labels" in params and classes:
        rename["labels"] = "class_labels"
    for key in _PASSED_THROUGH:
        if key in params:
            rename[key] = key
            if params[key].default is inspect.Parameter.empty:
                required.append(key)
    return rename, tuple(required), int(classes) if "labels" in rename else None


def load_diffusers(
    directory, *, spec: str | None = None, guidance="default", prompts=None, negative_prompt: str | None = None
) -> Flow:
    """The model in a diffusers folder as a Flow (see the module docstring for the layout).

    prompts: for a text-to-image pipeline folder, the prompt set (a `Prompts`, a list of strings or a
    prompt file) its `labels` index; guidance: a weight W in the pipeline's convention."""
    root = Path(directory)
    spec = spec or f"diffusers:{directory}"
    index = _read_json(root / "model_index.json", spec) if (root / "model_index.json").is_file() else None
    if is_text_pipeline(index):
        prompts = None if prompts is None else as_prompts(prompts, negative_prompt)
        return _text_pipeline_flow(root, index, spec, guidance, prompts)
    if prompts is not None or negative_prompt is not None:
        raise BespokeError(f"{spec}: prompts were given, but this model takes no text (no text encoder in the folder)")
    if guidance not in ("default", None):
        raise BespokeError(
            f"{spec}: guidance needs the model's null condition, which a diffusers folder does not declare; build the "
            "flow in Python with bespoke.from_network(..., guidance=bespoke.Guidance(w, 'diffusers', null=...))"
        )
    folder = _network_folder(root, spec)
    config, schedule = _schedule(root, spec)
    model = _load_network(folder, spec)
    rename, required, num_classes = _conditioning(model)
    sample_arg = next(iter(inspect.signature(model.forward).parameters))
    net = DiffusersNetwork(model, sign=schedule.sign, sample_arg=sample_arg, rename=rename, required=required)
    return from_network(
        net,
        prediction=schedule.prediction,
        scheduler=schedule.scheduler,
        time_input=schedule.timestep,
        cond_keys=tuple(rename),
        sample_shape=_sample_shape(model.config),
        name=spec,
        ode_end=schedule.ode_end,
        num_classes=num_classes,
        info=_info(model, schedule, config),
    )


def _schedule(root: Path, spec: str) -> tuple[dict, DiffusersSchedule]:
    scheduler_config = root / "scheduler" / "scheduler_config.json"
    if not scheduler_config.is_file():
        raise BespokeError(
            f"{spec}: {root} has no scheduler/scheduler_config.json, which defines the training schedule"
        )
    config = _read_json(scheduler_config, spec)
    return config, schedule_from_config(config, spec)


def _info(model, schedule: DiffusersSchedule, config: dict, **more) -> dict:
    return {
        "source": "diffusers",
        "model_class": type(model).__name__,
        "schedule": schedule.config,
        "scheduler_config": config,
        **more,
    }


def _pipeline_guidance(guidance, prompts: Prompts | None, spec: str) -> Guidance | None:
    """The pipeline's guidance: uncond + W (cond - uncond), the null condition = the negative prompt."""
    if guidance in ("default", None):
        return None
    if prompts is None:
        raise BespokeError(f"{spec}: guidance needs the prompts (the negative prompt is its null condition)")
    if isinstance(guidance, Guidance):
        return guidance
    return Guidance(float(guidance), "diffusers", null={"labels": len(prompts)})


def _text_pipeline_flow(root: Path, index: dict, spec: str, guidance, prompts: Prompts | None) -> Flow:
    guide = _pipeline_guidance(guidance, prompts, spec)
    pipe, denoiser_name, table = load_text_pipeline(root, index, spec, prompts)
    config, schedule = _schedule(root, spec)
    model = getattr(pipe, denoiser_name)
    sample_arg = next(iter(inspect.signature(model.forward).parameters))
    table = _needs_prompts(spec) if table is None else table
    net = DiffusersNetwork(model, sign=schedule.sign, sample_arg=sample_arg, rename={}, required=(), prompts=table)
    flow = from_network(
        net,
        prediction=schedule.prediction,
        scheduler=schedule.scheduler,
        time_input=schedule.timestep,
        cond_keys=("labels",),
        guidance=guide,
        sample_shape=_sample_shape(model.config),
        name=spec,
        ode_end=schedule.ode_end,
        fingerprint=pipeline_fingerprint(pipe, denoiser_name, f"{schedule.prediction}|{schedule.scheduler!r}"),
        num_classes=None if prompts is None else len(prompts),
        info=_info(model, schedule, config, pipeline=type(pipe).__name__),
    )
    flow.prompts, flow.decode = prompts, latent_decoder(pipe.vae)
    return flow


def _needs_prompts(spec: str):
    def refuse(*args, **kwargs):
        raise BespokeError(
            f"{spec} is a text-to-image model: load it with prompts (bespoke.load_model(spec, prompts=[...]) or "
            "--prompts FILE) to sample it"
        )

    return refuse
