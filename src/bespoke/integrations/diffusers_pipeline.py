"""A diffusers text-to-image pipeline folder as a model: prompts in, latents stepped, pictures out through its VAE.

One mechanism for every supported pipeline class: the pipeline itself turns a prompt into the denoiser's
keyword arguments (`encode_prompt`, SDXL's `added_cond_kwargs` with `time_ids`, SD3's pooled
projections, ...). We run it once per prompt (and once for the negative prompt), stop it at its first
denoiser call and keep the keywords it prepared, so nothing is re-implemented per family. The keywords
of a prompt set are stacked in memory (`PromptTable`); the model then takes `labels` = indices into the
set, as class-conditional models do (`bespoke.prompts`).

Supported: `PIPELINES` (tested with tiny random-weight pipelines built offline). Refused with the reason:
`REFUSED`, and any other class (not tested).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path

import torch

from ..errors import BespokeError
from ..io import weights_fingerprint
from ..prompts import Prompts

__all__ = [
    "PIPELINES",
    "REFUSED",
    "PromptTable",
    "is_text_pipeline",
    "load_text_pipeline",
    "latent_decoder",
    "pipeline_fingerprint",
    "prompt_table",
]

# pipeline class -> its denoiser component
PIPELINES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusion3Pipeline": "transformer",
}
_PARTIAL = "it starts from an input image part-way through the schedule; load the text-to-image pipeline instead"
REFUSED = {
    "FluxPipeline": "its transformer takes packed 2x2 latent patches with position ids, not the latent image",
    "StableDiffusionImg2ImgPipeline": _PARTIAL,
    "StableDiffusionInpaintPipeline": _PARTIAL,
    "StableDiffusionXLImg2ImgPipeline": _PARTIAL,
    "StableDiffusionXLInpaintPipeline": _PARTIAL,
    "StableDiffusionControlNetPipeline": "its ControlNet takes a conditioning image, which is not a prompt",
    "StableDiffusionXLControlNetPipeline": "its ControlNet takes a conditioning image, which is not a prompt",
}


def is_text_pipeline(index: dict | None) -> bool:
    """True when a model_index.json names text encoders: prompts condition the model."""
    return bool(index) and any(k.startswith("text_encoder") for k in index)


def _present(root: Path, index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None and (root / name).is_dir()


def _check_folder(root: Path, index: dict, spec: str) -> str:
    """The pipeline class name, once the folder has what a text-to-image model needs; else a one-line error."""
    name = str(index.get("_class_name"))
    if name in REFUSED:
        raise BespokeError(f"{spec}: {name} is not supported: {REFUSED[name]}")
    if name not in PIPELINES:
        raise BespokeError(
            f"{spec}: {name} is not a supported text-to-image pipeline (supported: {', '.join(PIPELINES)})"
        )
    if not _present(root, index, "text_encoder"):
        raise BespokeError(
            f"{spec}: the pipeline folder has no text encoder (text_encoder/ is missing or null in model_index.json), "
            "so prompts cannot be encoded; save the whole pipeline with save_pretrained"
        )
    if not _present(root, index, "vae"):
        raise BespokeError(
            f"{spec}: the pipeline folder has no VAE (vae/ is missing or null in model_index.json), so latents cannot "
            "be decoded into pictures; save the whole pipeline with save_pretrained"
        )
    return name


def _load_pipeline(root: Path, index: dict, name: str, spec: str):
    import diffusers

    absent = {k: None for k, v in index.items() if v == [None, None]}  # saved as null: diffusers wants them named
    try:
        with _quiet_diffusers():
            pipe = getattr(diffusers, name).from_pretrained(str(root), low_cpu_mem_usage=False, **absent)
    except Exception as e:  # diffusers/transformers raise OSError, ValueError, ... for a bad folder
        raise BespokeError(f"{spec}: diffusers could not load the pipeline: {type(e).__name__}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    return pipe


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' and transformers' own log lines (truncation, missing optional parts) off for the duration:
    we say what matters ourselves."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in (dlog, tlog)]
    for log, _, _ in before:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level, bars in before:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()


# --- the denoiser's keywords for each prompt, as the pipeline prepares them -----------------------


class _Stop(Exception):
    def __init__(self, arguments):
        super().__init__("captured")
        self.arguments = arguments


def _denoiser_keywords(pipe, denoiser, prompt: str, negative: str, size: tuple[int, int]) -> tuple[dict, dict]:
    """The keywords the pipeline passes its denoiser for `prompt` with guidance on, split into the unconditional
    and the conditional half (batch 1 each), sample and time removed. With guidance on, the null condition is
    exactly the pipeline's own (SDXL, for one, uses zeros for an empty negative prompt)."""
    signature = inspect.signature(denoiser.forward)

    def stop(module, args, kwargs):
        raise _Stop(signature.bind(*args, **kwargs).arguments)

    handle = denoiser.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with _quiet_diffusers(), torch.no_grad():
            pipe(
                prompt=prompt,
                negative_prompt=negative or None,
                num_inference_steps=1,
                guidance_scale=2.0,
                output_type="latent",
                height=size[0],
                width=size[1],
                generator=torch.Generator().manual_seed(0),
            )
    except _Stop as captured:
        arguments = dict(captured.arguments)
    else:
        raise BespokeError(f"{type(pipe).__name__} finished without calling its denoiser; it cannot be read")
    finally:
        handle.remove()
    sample = next(iter(signature.parameters))
    for key in (sample, "timestep", "return_dict"):
        arguments.pop(key, None)
    return _half(arguments, 0), _half(arguments, 1)


def _half(value, k: int):
    """Half k of a guided batch [uncond, cond] (tensors with a batch axis of 2; anything else as it is)."""
    if isinstance(value, dict):
        return {key: _half(v, k) for key, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2:
        return value[k : k + 1]
    return value


def _flatten(value, prefix=()) -> dict[tuple, object]:
    if isinstance(value, dict):
        return {path: v for k, item in value.items() for path, v in _flatten(item, (*prefix, k)).items()}
    return {prefix: value}


def _unflatten(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


class PromptTable(torch.nn.Module):
    """The denoiser's keywords for every prompt of a set (and the negative prompt last), stacked on the batch
    axis; `table(labels)` gives them for a batch of prompt indices. Keywords that do not depend on the prompt
    (ids, flags, None) are kept once. In-memory only (non-persistent buffers: not part of the fingerprint)."""

    def __init__(self, per_prompt: list[dict]):
        super().__init__()
        flat = [_flatten(d) for d in per_prompt]
        self.paths = list(flat[0])
        self.stacked, self.constant = [], {}
        for j, path in enumerate(self.paths):
            values = [f[path] for f in flat]
            if isinstance(values[0], torch.Tensor) and values[0].dim() > 0 and values[0].shape[0] == 1:
                self.register_buffer(f"kw{j}", torch.cat(values), persistent=False)
                self.stacked.append((path, f"kw{j}"))
            else:
                self.constant[path] = values[0]

    def forward(self, labels: torch.Tensor) -> dict:
        flat = dict(self.constant)
        for path, name in self.stacked:
            table = getattr(self, name)
            flat[path] = table.index_select(0, labels.to(table.device).long())
        return _unflatten(flat)


def _warn_truncated(pipe, prompts: Prompts) -> None:
    """One warning per prompt longer than a tokenizer's limit: its end is dropped, as diffusers drops it."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        limit = int(tok.model_max_length)
        for i, text in enumerate(prompts.all_texts):
            n = len(tok(text, truncation=False).input_ids)
            if n > limit:
                which = "the negative prompt" if i == len(prompts) else f"prompt {i + 1}"
                warnings.warn(
                    f"{which} has {n} tokens, more than {name}'s limit of {limit}: the end is dropped, as diffusers "
                    f"does ({text[:40]!r}...)",
                    stacklevel=2,
                )


def prompt_table(pipe, denoiser, prompts: Prompts, size: tuple[int, int]) -> PromptTable:
    """The PromptTable of `prompts` (the null condition last) for this pipeline."""
    _warn_truncated(pipe, prompts)
    halves = [_denoiser_keywords(pipe, denoiser, text, prompts.negative, size) for text in prompts.texts]
    return PromptTable([cond for _, cond in halves] + [halves[0][0]])


# --- pictures -------------------------------------------------------------------------------------


def latent_decoder(vae, batch: int = 64):
    """latents -> pictures in [-1, 1], as the pipeline decodes them: vae.decode(latents / scaling + shift)."""
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.get("shift_factor", None) or 0.0)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        out = []
        for chunk in latents.split(batch):
            z = chunk.to(device=param.device, dtype=param.dtype) / scale + shift
            out.append(vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0).cpu())
        return torch.cat(out)

    return decode


# --- the model ------------------------------------------------------------------------------------


def pipeline_fingerprint(pipe, denoiser_name: str, extra: str) -> str:
    """The denoiser's and text encoders' weights: another text encoder is another model."""
    state = {}
    for name in (denoiser_name, "text_encoder", "text_encoder_2", "text_encoder_3"):
        part = getattr(pipe, name, None)
        if isinstance(part, torch.nn.Module):
            state.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
    return weights_fingerprint(state, extra=extra)


def load_text_pipeline(root: Path, index: dict, spec: str, prompts: Prompts | None):
    """(pipeline, denoiser name, PromptTable or None) for a text-to-image pipeline folder."""
    name = _check_folder(root, index, spec)
    pipe = _load_pipeline(root, index, name, spec)
    denoiser_name = PIPELINES[name]
    denoiser = getattr(pipe, denoiser_name)
    size = denoiser.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixels = tuple(int(s) * int(pipe.vae_scale_factor) for s in size)
    table = None if prompts is None else prompt_table(pipe, denoiser, prompts, pixels)
    return pipe, denoiser_name, table
