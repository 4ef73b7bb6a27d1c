"""zoo:digits-t2i, a tiny text-to-image latent diffusion model trained by our own code:
`python -m bespoke.zoo.digits_t2i [--quick] [--out DIR] [--grid PNG]`.

The digits of `load_digits16` (train split) captioned "a handwritten seven", "the digit seven", ...
    tokenizer     a CLIPTokenizer over our own word list (`write_clip_tokenizer`), 16 tokens
    text encoder  a tiny CLIPTextModel, random init from the seed and frozen (its last hidden state
                  is the UNet's encoder_hidden_states; the UNet learns to read it)
    VAE           AutoencoderKL, 1x16x16 images <-> 4x8x8 latents, trained first (MSE + small KL);
                  scaling_factor = 1 / std of the latents, as in Stable Diffusion
    UNet          UNet2DConditionModel with cross-attention, eps-prediction on Stable Diffusion's
                  scaled-linear beta schedule (1000 steps), 10% caption dropout to "" for
                  classifier-free guidance; the EMA weights ship
Saved as a `StableDiffusionPipeline` folder (DDIM scheduler with the training betas) together with a
`recipe.json` recording how it was made. Seeded and deterministic for a fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .digits import NUM_CLASSES, load_digits16
from .text import write_clip_tokenizer

__all__ = ["NUMBER_WORDS", "T2IRecipe", "WEIGHTS_FOLDER", "captions", "prompt_accuracy", "save_grid", "train"]

WEIGHTS_FOLDER = Path(__file__).parent / "weights" / "digits-t2i"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {}", "the digit {}", "a {}", "the number {}", "a handwritten digit {}")
MAX_TOKENS = 16
UNET_DTYPE = torch.float16  # on disk only (4.2 -> 2.1 MB); diffusers loads it as float32 unless told otherwise
BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class T2IRecipe:
    seed: int = 0
    vae_iterations: int = 600
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-3  # on the KL per latent element, against the MSE per pixel
    vae_channels: tuple[int, int] = (16, 32)
    unet_iterations: int = 2000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999  # EMA decay, warmed up as min(ema, (1 + it) / (10 + it))
    caption_dropout: float = 0.1
    unet_channels: tuple[int, int] = (32, 64)
    attention_heads: int = 4
    text_hidden: int = 32
    eval_samples: int = 100  # per guidance scale, spread evenly over the digits


QUICK = T2IRecipe(vae_iterations=20, unet_iterations=20, warmup=5, eval_samples=10)


def captions(digit: int) -> list[str]:
    """The training captions of `digit` (0..9), one per template."""
    return [t.format(NUMBER_WORDS[digit]) for t in TEMPLATES]


def _vocabulary() -> list[str]:
    return sorted({w for t in TEMPLATES for w in t.format("").split()} | set(NUMBER_WORDS))


def _lr(base: float, warmup: int, iterations: int, it: int) -> float:
    """Linear warm-up, then cosine decay to 1% of `base`."""
    if it < warmup:
        return base * (it + 1) / warmup
    progress = (it - warmup) / max(1, iterations - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer_step(opt, params, loss, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- text -------------------------------------------------------------------------------------------


def build_text_encoder(tokenizer, hidden: int):
    """A tiny CLIPTextModel over `tokenizer`'s vocabulary (random init from the global seed), frozen."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), MAX_TOKENS, hidden) last hidden states, tokenized exactly as the SD pipeline does."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return text_encoder(torch.tensor(ids))[0]


def caption_table(tokenizer, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (10, templates, MAX_TOKENS, hidden) of every caption and (MAX_TOKENS, hidden) of ""."""
    table = torch.stack([encode_prompts(tokenizer, text_encoder, captions(d)) for d in range(NUM_CLASSES)])
    return table, encode_prompts(tokenizer, text_encoder, [""])[0]


def prompt_separation(table: torch.Tensor, null: torch.Tensor) -> dict:
    """How distinct the digits' embeddings are: the smallest distance between two digits' captions (same
    template) relative to the typical norm, and the smallest distance of a caption from the empty prompt."""
    flat = table.flatten(2)  # (10, templates, MAX_TOKENS * hidden)
    scale = flat.norm(dim=-1).mean()
    pair = torch.cdist(flat.transpose(0, 1), flat.transpose(0, 1))  # (templates, 10, 10)
    pair = pair + torch.eye(NUM_CLASSES) * 1e9
    to_null = (flat - null.flatten()).norm(dim=-1)
    return {
        "min_digit_distance": round(float(pair.min() / scale), 4),
        "min_distance_to_empty": round(float(to_null.min() / scale), 4),
    }


# --- VAE --------------------------------------------------------------------------------------------


def build_vae(channels: tuple[int, int]):
    """AutoencoderKL 1x16x16 <-> 4x8x8 (one downsampling)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def train_vae(vae, x: torch.Tensor, recipe: T2IRecipe, g: torch.Generator) -> None:
    """Reconstruction MSE (per pixel) + kl_weight * KL (per latent element) on posterior samples."""
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    bar = tqdm(range(recipe.vae_iterations), desc="digits-t2i vae")
    for it in bar:
        batch = x[torch.randint(0, x.shape[0], (recipe.vae_batch,), generator=g)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.sample(generator=g)
        mse = F.mse_loss(vae.decode(z).sample, batch)
        kl = posterior.kl().mean() / z[0].numel()
        lr = _lr(recipe.vae_lr, recipe.warmup, recipe.vae_iterations, it)
        _optimizer_step(opt, vae.parameters(), mse + recipe.kl_weight * kl, lr)
        if it % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of images x in [-1, 1]."""
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std


@torch.no_grad()
def reconstruction_psnr(vae, x: torch.Tensor) -> float:
    """PSNR (dB, images on [0, 1]) of decoding the posterior mean."""
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((recon - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


# --- UNet -------------------------------------------------------------------------------------------


def build_unet(channels: tuple[int, int], heads: int, cross_dim: int):
    """UNet2DConditionModel on 4x8x8 latents with cross-attention to the text at both resolutions."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=cross_dim,
        attention_head_dim=heads,  # diffusers' name for the number of heads
        norm_num_groups=8,
    )


def _conditions(table, null, labels, dropout: float, g: torch.Generator) -> torch.Tensor:
    """Encoder hidden states of a batch: a random template per label, replaced by "" with p = dropout."""
    n = labels.shape[0]
    template = torch.randint(0, table.shape[1], (n,), generator=g)
    cond = table[labels, template]
    drop = torch.rand(n, generator=g) < dropout
    return torch.where(drop[:, None, None], null.expand_as(cond), cond)


@torch.no_grad()
def _update_ema(ema, net, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p, 1 - decay)


def train_unet(unet, ema, latents, labels, table, null, recipe: T2IRecipe, g: torch.Generator) -> None:
    """eps-prediction MSE on scaled posterior samples, SD's beta schedule; `ema` tracks the weights."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**BETAS)
    mean, std = latents
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.0)
    bar = tqdm(range(recipe.unet_iterations), desc="digits-t2i unet")
    for it in bar:
        idx = torch.randint(0, mean.shape[0], (recipe.unet_batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z.shape[0],), generator=g)
        cond = _conditions(table, null, labels[idx], recipe.caption_dropout, g)
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        _optimizer_step(opt, unet.parameters(), loss, _lr(recipe.unet_lr, recipe.warmup, recipe.unet_iterations, it))
        _update_ema(ema, unet, min(recipe.ema, (1 + it) / (10 + it)))
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


# --- pipeline ---------------------------------------------------------------------------------------


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_digits(pipe, digits: list[int], guidance: float, *, seed: int = 0, steps: int = 30) -> torch.Tensor:
    """Images (len(digits), 1, 16, 16) in [-1, 1] for the prompts "a handwritten <digit>"."""
    prompts = [f"a handwritten {NUMBER_WORDS[d]}" for d in digits]
    out = pipe(
        prompt=prompts,
        guidance_scale=guidance,
        num_inference_steps=steps,
        height=16,
        width=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    ).images
    return out * 2 - 1


def prompt_accuracy(pipe, guidance: float, n: int = 100, *, seed: int = 0) -> float:
    """Fraction of n samples (digits 0..9 in turn) that the digits classifier reads as the prompt's digit."""
    from .classifier import load_classifier

    digits = [i % NUM_CLASSES for i in range(n)]
    images = sample_digits(pipe, digits, guidance, seed=seed)
    predicted = load_classifier()(images).argmax(1)
    return (predicted == torch.tensor(digits)).double().mean().item()


def save_grid(pipe, path, *, guidance: float = 3.0, columns: int = 10, seed: int = 0, zoom: int = 4) -> None:
    """A PNG grid: row d holds `columns` samples of "a handwritten <d>" at `guidance`."""
    from PIL import Image

    digits = [d for d in range(NUM_CLASSES) for _ in range(columns)]
    images = (sample_digits(pipe, digits, guidance, seed=seed) + 1) / 2  # (10 * columns, 1, 16, 16)
    tiles = F.pad(images, (1, 1, 1, 1), value=0.5)
    size = tiles.shape[-1]
    grid = tiles.reshape(NUM_CLASSES, columns, size, size).permute(0, 2, 1, 3).reshape(NUM_CLASSES * size, -1)
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").resize((pixels.shape[1] * zoom, pixels.shape[0] * zoom), Image.NEAREST).save(path)


# --- training ---------------------------------------------------------------------------------------


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _make_readable(folder: Path) -> None:
    """Give the folder's files and subfolders ordinary modes (some writers create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, swapping out any previous one."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _recipe_dict(recipe: T2IRecipe) -> dict:
    d = asdict(recipe)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _fit_vae(recipe: T2IRecipe, x: torch.Tensor, g: torch.Generator):
    """The trained VAE with its scaling_factor set, the scaled posterior (mean, std) of x, and the seconds taken."""
    t0 = time.perf_counter()
    vae = build_vae(recipe.vae_channels)
    train_vae(vae, x, recipe, g)
    seconds = time.perf_counter() - t0
    mean, std = encode_latents(vae, x)
    scaling = 1.0 / mean.std().item()
    vae.register_to_config(scaling_factor=scaling)
    return vae, (mean * scaling, std * scaling), seconds


def _fit_unet(recipe: T2IRecipe, latents, labels, table, null, g: torch.Generator):
    """The EMA UNet (eval mode, frozen) and the seconds taken."""
    t0 = time.perf_counter()
    unet = build_unet(recipe.unet_channels, recipe.attention_heads, recipe.text_hidden)
    ema = build_unet(recipe.unet_channels, recipe.attention_heads, recipe.text_hidden)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    train_unet(unet, ema, latents, labels, table, null, recipe, g)
    return ema.eval(), time.perf_counter() - t0


def _train_into(folder: Path, recipe: T2IRecipe) -> dict:
    """Train every component, save the pipeline into `folder`, evaluate it from there; the recipe record."""
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    x, y = load_digits16("train")
    x_heldout, _ = load_digits16("heldout")
    tokenizer = write_clip_tokenizer(folder / "tokenizer", _vocabulary(), max_length=MAX_TOKENS)
    text_encoder = build_text_encoder(tokenizer, recipe.text_hidden)
    table, null = caption_table(tokenizer, text_encoder)
    vae, latents, vae_seconds = _fit_vae(recipe, x, g)
    unet, unet_seconds = _fit_unet(recipe, latents, y, table, null, g)
    num_params = {"text_encoder": _num_params(text_encoder), "vae": _num_params(vae), "unet": _num_params(unet)}
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet.to(UNET_DTYPE))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe = load_pipeline(folder)
    accuracy = {str(w): round(prompt_accuracy(pipe, w, recipe.eval_samples, seed=recipe.seed), 3) for w in (1, 3, 5)}
    return {
        "name": "digits-t2i",
        "recipe": _recipe_dict(recipe),
        "captions": list(TEMPLATES),
        "unconditional_caption": "",
        "latent_shape": list(latents[0].shape[1:]),
        "scaling_factor": vae.config.scaling_factor,
        "num_params": num_params,
        "unet_weights_dtype": str(UNET_DTYPE).removeprefix("torch."),
        "text_embedding_separation": prompt_separation(table, null),
        "vae_psnr_db": {
            "train": round(reconstruction_psnr(vae, x), 2),
            "heldout": round(reconstruction_psnr(vae, x_heldout), 2),
        },
        "prompt_accuracy": {"guidance": accuracy, "samples": recipe.eval_samples, "steps": 30, "scheduler": "DDIM"},
        "training": {
            "vae_iterations": recipe.vae_iterations,
            "unet_iterations": recipe.unet_iterations,
            "vae_wall_seconds": round(vae_seconds, 1),
            "unet_wall_seconds": round(unet_seconds, 1),
            "wall_seconds": round(vae_seconds + unet_seconds, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "threads": torch.get_num_threads(),
            "train_images": int(x.shape[0]),
            **_versions(),
        },
    }


def _write_recipe(folder: Path, meta: dict) -> None:
    """recipe.json, including the folder's total size (with recipe.json itself)."""
    (folder / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta = {**meta, "folder_bytes": _folder_bytes(folder)}
    (folder / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")


def train(out_dir=WEIGHTS_FOLDER, *, seed: int = 0, quick: bool = False, recipe: T2IRecipe | None = None) -> Path:
    """Train the pipeline and write it to `out_dir` atomically (temp folder beside it, then rename); returns it."""
    recipe = replace(recipe or (QUICK if quick else T2IRecipe()), seed=seed)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_recipe(tmp, _train_into(tmp, recipe))
        _make_readable(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _reexec_with_passive_openmp() -> None:
    """Re-run this command with OMP_WAIT_POLICY=PASSIVE unless set: OpenMP threads that spin-wait slow
    training down ~10-40x when another process shares the cores (the variable is read when torch loads)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "bespoke.zoo.digits_t2i", *sys.argv[1:]])


def main(argv=None) -> int:
    if argv is None:
        _reexec_with_passive_openmp()
    ap = argparse.ArgumentParser(prog="python -m bespoke.zoo.digits_t2i", description="Train zoo:digits-t2i.")
    ap.add_argument("--out", type=Path, default=WEIGHTS_FOLDER)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny run for smoke tests (< 1 min)")
    ap.add_argument("--grid", type=Path, default=None, help="also save a PNG of samples at guidance 3")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = train(args.out, seed=args.seed, quick=args.quick)
    meta = json.loads((out / "recipe.json").read_text())
    print(
        f"{out}  {meta['training']['wall_seconds']} s  VAE PSNR {meta['vae_psnr_db']['heldout']} dB (held-out)  "
        f"prompt accuracy {meta['prompt_accuracy']['guidance']}  {meta['folder_bytes'] / 1e6:.2f} MB"
    )
    if args.grid:
        save_grid(load_pipeline(out), args.grid)
        print(args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
