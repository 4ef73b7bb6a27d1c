"""Tiny random-weight diffusers text-to-image pipelines, built offline for tests.

Each builder saves a complete pipeline folder (save_pretrained layout, safetensors weights, CLIP tokenizers
written from our own word list by `bespoke.zoo.text.write_clip_tokenizer`) that
`diffusers.DiffusionPipeline.from_pretrained` loads without the Hugging Face hub. Each pipeline has 70k-320k
parameters in all: latents are 4x8x8 and images 3x16x16 (pass height=width=16).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = [
    "PROMPTS",
    "SIZE",
    "LATENT_SHAPE",
    "vocabulary",
    "tiny_sd_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sdxl_pipeline",
    "load_pipeline",
]

_WORDS = "a photo of cat dog red blue handwritten digit zero one two seven"
PROMPTS = ["a photo of cat", "a red dog", "handwritten digit seven", "a blue photo of one dog"]
SIZE = 16  # image height and width: 8x8 latents times the VAE's scale factor 2
LATENT_SHAPE = (4, 8, 8)
_MAX_LENGTH = 16  # tokenizer model_max_length = CLIP max_position_embeddings
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def vocabulary() -> list[str]:
    """The words the tiny tokenizers encode as single tokens."""
    return _WORDS.split()


def _tokenizer(folder):
    from bespoke.zoo.text import write_clip_tokenizer

    return write_clip_tokenizer(folder, vocabulary(), max_length=_MAX_LENGTH)


def _clip(tokenizer, *, hidden: int = 16, projection: int | None = None, seed: int = 0):
    """A tiny CLIPTextModel, or CLIPTextModelWithProjection when `projection` is given."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_MAX_LENGTH,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    return model.eval()


def _vae(*, seed: int = 0, **config):
    """A tiny AutoencoderKL: 3x16x16 images <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
        **config,
    ).eval()


def _save(pipe, folder) -> Path:
    """save_pretrained, without its "self.vae=None ... cannot be saved" warning for each component set to None."""
    from diffusers.utils import logging as diffusers_logging

    folder = Path(folder)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(folder)
    finally:
        diffusers_logging.set_verbosity(level)
    return folder


def tiny_sd_pipeline(folder, *, prediction_type: str = "epsilon", vae: bool = True, text_encoder: bool = True) -> Path:
    """Save a tiny StableDiffusionPipeline (DDIM, SD's scaled-linear betas) in `folder`.

    `vae=False` / `text_encoder=False` leave that component out (null in model_index.json, no subfolder)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
    ).eval()
    scheduler = DDIMScheduler(
        **_SD_BETAS, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(seed=1),
        text_encoder=_clip(tokenizer, seed=2),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if not vae:
        pipe.vae = None
    if not text_encoder:
        pipe.text_encoder = None
    return _save(pipe, folder)


def tiny_sd3_pipeline(folder) -> Path:
    """Save a tiny StableDiffusion3Pipeline (two CLIP encoders, no T5, flow matching with shift 3) in `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(f"{tmp}/1")
        tokenizer_2 = _tokenizer(f"{tmp}/2")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # >= the two CLIP widths side by side (16 + 16); T5's width when it is absent
        caption_projection_dim=16,  # = num_attention_heads * attention_head_dim
        pooled_projection_dim=32,  # the two CLIP projections side by side (16 + 16)
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed=1, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, projection=16, seed=2),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, projection=16, seed=3),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _save(pipe, folder)


def tiny_sdxl_pipeline(folder) -> Path:
    """Save a tiny StableDiffusionXLPipeline (two CLIP encoders, Euler, SDXL's betas) in `folder`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(f"{tmp}/1")
        tokenizer_2 = _tokenizer(f"{tmp}/2")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,  # the two CLIP hidden widths side by side (16 + 16)
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,  # 6 time ids x 8 + text_encoder_2's projection
    ).eval()
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed=1, scaling_factor=0.13025),
        text_encoder=_clip(tokenizer, seed=2),
        text_encoder_2=_clip(tokenizer_2, projection=16, seed=3),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _save(pipe, folder)


def load_pipeline(folder, **components):
    """Load a saved tiny pipeline back (offline, on the CPU, float32) with DiffusionPipeline.from_pretrained.

    from_pretrained refuses a folder whose model_index.json records a required component as null unless that
    component is passed; this passes None for each such one (SD3's text_encoder_3/tokenizer_3, a left-out vae or
    text_encoder), or what `components` gives."""
    from diffusers import DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {name: None for name, value in index.items() if value == [None, None]}
    return DiffusionPipeline.from_pretrained(str(folder), low_cpu_mem_usage=False, **{**absent, **components})
