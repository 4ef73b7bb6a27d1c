"""Training recipes of the bundled digits models: `python -m bespoke.zoo.train NAME`.

    digits-ot   flow matching on the CondOT path, velocity prediction (the papers' FM-OT)
    digits-vp   eps-prediction on the DDPM discrete linear-beta schedule, integer timesteps 0..999
                (diffusers' DDPMScheduler convention: its schedulers sample the model unchanged)
    digits-cos  v-prediction on the cosine path (the papers' FM/v-CS)

All three are class-conditional with 10% label dropout to the null label (classifier-free guidance).
The loss is the MSE between the network output and its target for (x1, x0, t), where the target is
the chosen parameterisation of the conditional velocity u = alpha' x1 + sigma' x0 (one conversion
for all three, `prediction_from_velocity`). Seeded; Adam with warm-up and cosine decay; EMA weights
are what ships. A checkpoint every 500 iterations lets a killed run resume (`--resume`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..flows import prediction_from_velocity
from ..io import save_tensors
from ..paths import CondOT, Cosine, Scheduler, VPDiscrete
from .digits import NUM_CLASSES, load_digits16
from .unet import UNet

__all__ = ["RECIPES", "Recipe", "train", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Recipe:
    path: str  # condot | cosine | vp-discrete
    prediction: str  # velocity | eps | v
    time_input: str  # canonical | timestep
    iterations: int = 4000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    label_dropout: float = 0.1
    channels: tuple[int, int] = (32, 48)
    seed: int = 0

    def scheduler(self) -> Scheduler:
        return {"condot": CondOT, "cosine": Cosine, "vp-discrete": VPDiscrete.ddpm_linear}[self.path]()

    def time_scale(self) -> float:
        """Network time -> ~[0, 1000] for the sinusoidal embedding."""
        return 1.0 if self.time_input == "timestep" else 1000.0


RECIPES = {
    "digits-ot": Recipe("condot", "velocity", "canonical"),
    "digits-vp": Recipe("vp-discrete", "eps", "timestep"),
    "digits-cos": Recipe("cosine", "v", "canonical"),
}


def _draw_times(recipe: Recipe, sched: Scheduler, n: int, g: torch.Generator):
    """Canonical times of a batch and the network's time input for them."""
    if recipe.time_input == "timestep":
        tau = torch.randint(0, sched.num_timesteps, (n,), generator=g).to(torch.float64)
        return sched.time_of_timestep(tau), tau
    t = torch.rand(n, generator=g, dtype=torch.float64) * (1 - 2e-3) + 1e-3
    return t, t


def _loss(net, recipe, sched, x1, labels, g):
    n = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=g)
    t, net_time = _draw_times(recipe, sched, n, g)
    a, s, da, ds = (v(t).float()[:, None, None, None] for v in (sched.alpha, sched.sigma, sched.d_alpha, sched.d_sigma))
    xt = a * x1 + s * x0
    target = prediction_from_velocity(recipe.prediction, da * x1 + ds * x0, xt, t, sched)
    drop = torch.rand(n, generator=g) < recipe.label_dropout
    labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
    return (net(xt, net_time.float(), labels) - target).pow(2).mean()


def _lr(recipe: Recipe, it: int) -> float:
    if it < recipe.warmup:
        return recipe.lr * (it + 1) / recipe.warmup
    progress = (it - recipe.warmup) / max(1, recipe.iterations - recipe.warmup)
    return recipe.lr * (0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * progress)).item()))


def train(
    name: str, out_dir: Path = WEIGHTS_DIR, *, resume: bool = False, quiet: bool = False, iterations: int | None = None
) -> Path:
    recipe = RECIPES[name]
    if iterations is not None:
        recipe = Recipe(**{**asdict(recipe), "iterations": iterations})
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    sched = recipe.scheduler()
    x, y = load_digits16("train")
    net = UNet(channels=recipe.channels, num_classes=NUM_CLASSES, time_scale=recipe.time_scale())
    ema = UNet(channels=recipe.channels, num_classes=NUM_CLASSES, time_scale=recipe.time_scale())
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{name}.ckpt"
    start, seconds = 0, 0.0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        start, seconds = int(state["iteration"]), float(state["seconds"])
    bar = tqdm(range(start, recipe.iterations), desc=name, disable=quiet, initial=start, total=recipe.iterations)
    t0 = time.perf_counter()
    for it in bar:
        idx = torch.randint(0, x.shape[0], (recipe.batch,), generator=g)
        for group in opt.param_groups:
            group["lr"] = _lr(recipe, it)
        loss = _loss(net, recipe, sched, x[idx], y[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - recipe.ema)
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (it + 1) % 500 == 0 and it + 1 < recipe.iterations:
            state = {
                "net": net.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "rng": g.get_state(),
                "iteration": it + 1,
                "seconds": seconds + time.perf_counter() - t0,
            }
            torch.save(state, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
    seconds += time.perf_counter() - t0
    meta = {
        "name": name,
        "recipe": {**asdict(recipe), "channels": list(recipe.channels)},
        "unet": {"channels": list(recipe.channels), "num_classes": NUM_CLASSES, "time_scale": recipe.time_scale()},
        "training": {
            "iterations": recipe.iterations,
            "wall_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "train_images": int(x.shape[0]),
        },
        "num_params": sum(p.numel() for p in ema.parameters()),
    }
    path = out_dir / f"{name}.safetensors"
    save_tensors(path, ema.state_dict(), meta)
    ckpt.unlink(missing_ok=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bespoke.zoo.train", description="Train a bundled digits model.")
    ap.add_argument("name", choices=sorted(RECIPES))
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--iterations", type=int, default=None, help="override the recipe (for quick trials)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint of a killed run")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    path = train(args.name, args.out, resume=args.resume, quiet=args.quiet, iterations=args.iterations)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
