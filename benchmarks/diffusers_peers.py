"""Benchmark: diffusers' own schedulers vs our solvers (BNS and RK2-Bespoke run *through our diffusers
scheduler*), from the same noise against the same dopri5 ground truth.

    python benchmarks/diffusers_peers.py [--models digits-vp,tiny-unet] [--steps 4,6,8,10,16] [--eval 256]

Models: `zoo:digits-vp` (ε-prediction, DDPM linear-β schedule, integer timesteps: diffusers'
convention) and `tiny-unet`, a diffusers `UNet2DModel` built as the tests build it
(`tests/helpers.py::tiny_diffusers_model`), trained here for a few minutes on the 8×8 scikit-learn digits
(ε-prediction, DDPMScheduler), saved in save_pretrained layout and loaded as `diffusers:DIR`.
Per model: held-out evaluation pairs (seed 7), each diffusers scheduler run as pipelines run it
(init_noise_sigma, scale_model_input, step, float32) at each step count, counting network calls;
our dedicated solvers; BNS and RK2-Bespoke solvers (trained on the model's training pairs) run by
`BespokeScheduler` in the same loop. Everything is cached under --cache; a re-run only re-renders.
Writes its section of docs/benchmarks.md and docs/img/diffusers_peers.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import diffusers  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import best_peer, figure_lines, machine, psnr_cell, publish, trained, write_json  # noqa: E402  (benchmarks/common.py)

import bespoke  # noqa: E402
from bespoke.integrations.diffusers import BespokeScheduler  # noqa: E402
from bespoke.solvers import SOLVER_NAMES, largest_valid_nfe  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.zoo.pretrained import digits_network  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_diffusers_model  # noqa: E402

MARK = "diffusers_peers"
PEERS = {  # label: (class, options); each scheduler's defaults otherwise
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", {}),
    "DPMSolverMultistep (Karras σ)": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPCMultistep": ("UniPCMultistepScheduler", {}),
    "DEISMultistep": ("DEISMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {"timestep_spacing": "trailing"}),  # its default "leading" never starts at 999
    "EulerDiscrete": ("EulerDiscreteScheduler", {}),
    "HeunDiscrete": ("HeunDiscreteScheduler", {}),
}


# --- the models -------------------------------------------------------------------------------------


def train_tiny_unet(folder: Path, iterations: int, quiet: bool) -> None:
    """A tiny diffusers UNet2DModel, ε-prediction on DDPM's linear β, trained on the 8×8 digits (seeded)."""
    if (folder / "unet" / "diffusion_pytorch_model.safetensors").exists() and (folder / "trained").exists():
        return
    from sklearn.datasets import load_digits
    from tqdm import trange

    tiny_diffusers_model(folder, prediction="epsilon")
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
    sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    data = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    unet.train()
    for it in trange(iterations, desc="train tiny UNet2DModel", disable=quiet):
        x = data[torch.randint(len(data), (128,), generator=g)]
        eps = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (128,), generator=g)
        loss = (unet(sched.add_noise(x, eps, t), t).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (it + 1) / 100) * (0.05 + 0.95 * (1 - it / iterations))
        opt.step()
    unet.eval().save_pretrained(folder / "unet")
    (folder / "trained").write_text(json.dumps({"iterations": iterations, "final_loss": float(loss)}))


def model(name: str, cache: Path, args):
    """(flow, network call net(x, timestep, cond) -> output, diffusers base config, condition keyword)."""
    if name == "digits-vp":
        net, _, _ = digits_network(name)
        base = diffusers.DDPMScheduler(beta_schedule="linear", prediction_type="epsilon").config
        return bespoke.load_model("zoo:digits-vp"), lambda x, t, c: net(x, t.expand(x.shape[0]), c["labels"]), base
    folder = cache / "unet"
    train_tiny_unet(folder, args.tiny_iterations, args.quiet)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval()
    base = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config
    return bespoke.load_model(f"diffusers:{folder}"), lambda x, t, c: unet(x, t).sample, base


# --- the runs ----------------------------------------------------------------------------------------


@torch.no_grad()
def diffusers_loop(scheduler, steps: int, call, noise: torch.Tensor, cond: dict) -> tuple[torch.Tensor, int]:
    """Sample as diffusers pipelines do; returns the samples and the network calls per sample."""
    scheduler.set_timesteps(steps)
    x, calls = noise * scheduler.init_noise_sigma, 0
    for t in scheduler.timesteps:
        out = call(scheduler.scale_model_input(x, t), t, cond)
        calls += 1
        x = scheduler.step(out, t, x).prev_sample
    return x, calls


def run_model(name: str, args) -> dict:
    out = args.cache / f"peers-{name}"
    done = out / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    flow, call, base = model(name, out, args)
    evaluation = bespoke.generate_gt(flow, out / "gt-eval", num=args.eval, seed=7, quiet=args.quiet)
    noise, cond, reference = evaluation.noise.float(), evaluation.cond(), evaluation.samples
    res = {"model": name, "eval": len(evaluation), "diffusers": {}, "ours": {}, "learned": {}}

    for label, (cls_name, options) in PEERS.items():
        cls = getattr(diffusers, cls_name)
        res["diffusers"][label] = {}
        for steps in args.steps:
            x, calls = diffusers_loop(cls.from_config(base, **options), steps, call, noise, cond)
            res["diffusers"][label][steps] = {"psnr": bespoke.psnr(x.double(), reference), "nfe": calls}

    for s_name in SOLVER_NAMES:
        res["ours"][s_name] = {}
        for nfe in args.steps:
            n = largest_valid_nfe(s_name, nfe)
            try:
                r = bespoke.evaluate(bespoke.solver(s_name, n), flow, noise.double(), reference, **cond)
                res["ours"][s_name][nfe] = {"psnr": r.psnr_db, "nfe": r.nfe}
            except bespoke.NonFiniteVelocity:  # evaluates at t = 1, where the VP path is singular
                res["ours"][s_name][nfe] = {"psnr": float("nan"), "nfe": n}

    for kind, solvers in learned(name, flow, out, args).items():
        scheduler = BespokeScheduler.from_solvers(list(solvers.values()), flow)
        res["learned"][kind] = {}
        for nfe in args.steps:
            x, calls = diffusers_loop(scheduler, nfe, call, noise, cond)
            summary = solvers[nfe].training_summary
            res["learned"][kind][nfe] = {
                "psnr": bespoke.psnr(x.double(), reference),
                "nfe": calls,
                "train_seconds": summary["seconds"],
                "init": summary["init"],
            }
    return write_json(done, res)  # str keys, as when cached


def learned(name: str, flow, out: Path, args) -> dict:
    """{"BNS": {nfe: solver}, "RK2-Bespoke": {...}}: digits-vp extends the files of bns_digits.py and
    bespoke_digits.py (same pairs and recipes); the tiny UNet trains its own on 256 + 520 pairs."""
    if name == "digits-vp":
        home = args.cache / "digits-vp"
        pairs = bespoke.generate_gt(flow, home / "gt", num=1032, shard_size=128, quiet=args.quiet)
        traj = bespoke.generate_gt(flow, home / "gt-traj", num=512, seed=1, trajectory=65, quiet=args.quiet)
        val, train = pairs.slice(0, 512), pairs.slice(512, 1032)
    else:
        home = out
        pairs = bespoke.generate_gt(flow, home / "gt", num=776, trajectory=33, quiet=args.quiet)
        val, train = pairs.slice(0, 256), pairs.slice(256, 776)
        traj = train
    bns_config, rk2_config = FitConfig(), FitConfig(iterations=200)

    def bns(nfe):
        return bespoke.train_bns(
            flow, train, val, nfe, config=bns_config, checkpoint=home / f"bns{nfe}.ckpt", quiet=args.quiet
        )

    def rk2(nfe):
        return bespoke.train_bespoke(
            flow, traj, val, nfe, order=2, config=rk2_config, checkpoint=home / f"rk2-{nfe}.ckpt", quiet=args.quiet
        )

    return {
        "BNS": trained(home / "bns.safetensors", flow, args.steps, bns),
        "RK2-Bespoke": trained(home / "bespoke-rk2.safetensors", flow, args.steps, rk2),
    }


# --- the report --------------------------------------------------------------------------------------


def table(res: dict, steps) -> list[str]:
    lines = ["| solver | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|" + "---|" * len(steps)]
    for group, prefix in (("diffusers", "diffusers "), ("ours", "bespoke "), ("learned", "")):
        for k, cells in res[group].items():
            label = f"**{k}** (learned, via BespokeScheduler)" if group == "learned" else prefix + k
            lines.append(
                f"| {label} | " + " | ".join(psnr_cell(cells[str(n)], n, group == "learned") for n in steps) + " |"
            )
    peers = {n: best_peer(res, n) for n in steps}
    lines.append(
        "| best diffusers scheduler (≤ NFE) | " + " | ".join(f"{peers[n][1]:.2f} ({peers[n][0]})" for n in steps) + " |"
    )
    gain = " | ".join(f"{res['learned']['BNS'][str(n)]['psnr'] - peers[n][1]:+.2f}" for n in steps)
    lines.append(f"| BNS − best diffusers scheduler | {gain} |")
    return lines


def plot(results: list[dict], steps, path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), dpi=110, squeeze=False)
    for ax, res in zip(axes[0], results):
        for k, cells in res["diffusers"].items():
            pts = sorted((c["nfe"], c["psnr"]) for c in cells.values())
            ax.plot(*zip(*pts), marker="o", lw=1, alpha=0.8, label=f"diffusers {k}")
        for (k, cells), (color, marker) in zip(res["learned"].items(), (("black", "*"), ("crimson", "D"))):
            pts = sorted((c["nfe"], c["psnr"]) for c in cells.values())
            ax.plot(*zip(*pts), marker=marker, ms=9, lw=2.5, color=color, label=f"{k} (BespokeScheduler)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(steps), [str(n) for n in steps])
        ax.minorticks_off()
        ax.set_xlabel("NFE (network calls per sample)")
        ax.set_title(f"{res['model']}: {res['eval']} held-out samples", fontsize=10)
        ax.grid(alpha=0.3)
        top = max(c["psnr"] for cells in res["learned"].values() for c in cells.values())
        ax.set_ylim(top - 45, top + 3)
    axes[0, 0].set_ylabel("PSNR against dopri5 ground truth [dB]")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=3, loc="lower center", frameon=False)
    fig.suptitle("diffusers' schedulers vs learned bespoke solvers in a diffusers denoising loop, same noise")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-vp,tiny-unet")
    ap.add_argument("--steps", default="4,6,8,10,16")
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--tiny-iterations", type=int, default=4000)
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.steps = [int(n) for n in args.steps.split(",")]
    started = time.perf_counter()
    results = [run_model(m, args) for m in args.models.split(",")]
    cmd = (
        f"python benchmarks/diffusers_peers.py --models {args.models} --steps {','.join(map(str, args.steps))} "
        f"--eval {args.eval} --tiny-iterations {args.tiny_iterations}"
    )
    lines = [
        "## diffusers' schedulers vs learned solvers through `BespokeScheduler`",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU · diffusers {diffusers.__version__}.",
        "",
        f"Mean per-sample PSNR (dB) on {args.eval} held-out pairs (seed 7, never used in training or selection) "
        "against dopri5 ground truth (rtol = atol = 1e-5), every solver from the same noise and labels. diffusers "
        "schedulers run in float32 the way pipelines run them (`init_noise_sigma`, `scale_model_input`, `step`) "
        'with their default options except DDIM\'s `timestep_spacing="trailing"`; `(n)` = network calls when they '
        "differ from the step count (Heun). Our dedicated solvers: `bespoke.evaluate` in float64 on their "
        "recommended grids (n/a: Heun and RK4 evaluate at t = 1, where the VP path is singular). "
        "BNS (300 Adam iterations) and RK2-Bespoke (200) are run by `BespokeScheduler` in the "
        "same diffusers loop as the peers; digits-vp's are those of the BNS and Bespoke benchmarks above (512 "
        "validation + 520 training pairs), the tiny UNet's are trained on 256 + 520 pairs of its own.",
    ]
    for res in results:
        lines += ["", f"### {res['model']}", ""] + table(res, args.steps)
        name, peer = best_peer(res, 8)
        gain = res["learned"]["BNS"]["8"]["psnr"] - peer
        verdict = "meets" if gain >= 6 else "misses"
        lines += [
            "",
            f"At 8 NFE BNS is {gain:+.2f} dB over the best diffusers scheduler ({name}): it {verdict} "
            "the +6 dB target.",
        ]
    lines += figure_lines(
        args.out,
        "diffusers_peers.png",
        "PSNR vs NFE, diffusers schedulers and learned solvers",
        lambda img: plot(results, args.steps, img),
    )
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
