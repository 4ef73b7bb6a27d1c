"""Loading the bundled digits models: safetensors weights + JSON metadata, never a pickle.

Each weights file records how it was made (recipe, training wall time, machine) and, once chosen,
the model's default guidance; `digits_flow` turns it into a Flow through the public adapter.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ..flows import Flow, Guidance, from_network
from ..io import load_tensors, save_tensors, weights_fingerprint
from ..paths import scheduler_from_name
from .digits import NUM_CLASSES, SIZE
from .unet import UNet

__all__ = [
    "DIGITS_MODELS",
    "T2I_NAME",
    "digits_flow",
    "t2i_flow",
    "digits_network",
    "read_weights",
    "weights_path",
    "write_metadata",
]

DIGITS_MODELS = ("digits-ot", "digits-vp", "digits-cos")
T2I_NAME = "digits-t2i"
T2I_GUIDANCE = 3.0  # the default guidance scale of zoo:digits-t2i (diffusers' convention)
WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


@lru_cache(maxsize=8)
def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(state dict, metadata, fingerprint of the weights)."""
    state, meta = load_tensors(
        path, f"reinstall the package or train the model again: `python -m bespoke.zoo.train {path.stem}`"
    )
    return state, meta, weights_fingerprint(state)


def _guidance(guidance, meta: dict) -> Guidance | None:
    if guidance == "default":
        default = meta.get("default_guidance")
        guidance = None if default is None else Guidance(default["weight"], default["convention"])
    if guidance is None:
        return None
    if isinstance(guidance, (int, float)):
        guidance = Guidance(float(guidance), "fm")
    return Guidance(guidance.weight, guidance.convention, {"labels": NUM_CLASSES})


def digits_network(name: str) -> tuple[UNet, dict, str]:
    """The bare network of a bundled model (eval mode, frozen), its metadata and fingerprint."""
    state, meta, fp = read_weights(weights_path(name))
    cfg = meta["unet"]
    net = UNet(channels=tuple(cfg["channels"]), num_classes=cfg["num_classes"], time_scale=cfg["time_scale"])
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return net, meta, fp


def digits_flow(name: str, guidance="default") -> Flow:
    """zoo:digits-ot | digits-vp | digits-cos as a Flow (sample shape (1, 16, 16), labels 0..9)."""
    net, meta, fingerprint = digits_network(name)
    recipe = meta["recipe"]
    return from_network(
        net,
        prediction=recipe["prediction"],
        scheduler=scheduler_from_name(recipe["path"]),
        time_input=recipe["time_input"],
        guidance=_guidance(guidance, meta),
        sample_shape=(1, SIZE, SIZE),
        name=f"zoo:{name}",
        fingerprint=fingerprint,
        num_classes=NUM_CLASSES,
        info=meta,
    )


def t2i_flow(guidance="default", prompts=None, negative_prompt=None) -> Flow:
    """zoo:digits-t2i: the bundled text-to-image pipeline folder (`python -m bespoke.zoo.digits_t2i`) as a Flow;
    guidance W in diffusers' convention, T2I_GUIDANCE by default (as the digits models sample guided by default)."""
    from ..errors import BespokeError

    folder = WEIGHTS_DIR / T2I_NAME
    if not (folder / "model_index.json").is_file():
        raise BespokeError(
            f"zoo:{T2I_NAME}: its pipeline folder {folder} is missing; reinstall the package or train it again: "
            "`python -m bespoke.zoo.digits_t2i`"
        )
    try:
        from ..integrations.diffusers_model import load_diffusers
    except ImportError as e:
        raise BespokeError(
            f"zoo:{T2I_NAME} needs diffusers and transformers ({e}); pip install 'bespoke-solvers[diffusers]'"
        ) from None
    guidance = T2I_GUIDANCE if guidance == "default" and prompts is not None else guidance
    return load_diffusers(
        folder, spec=f"zoo:{T2I_NAME}", guidance=guidance, prompts=prompts, negative_prompt=negative_prompt
    )


def write_metadata(name: str, **updates) -> None:
    """Merge `updates` into a weights file's metadata (atomic rewrite; the weights are untouched)."""
    path = weights_path(name)
    state, meta, _ = read_weights(path)
    save_tensors(path, state, {**meta, **updates})
    read_weights.cache_clear()
