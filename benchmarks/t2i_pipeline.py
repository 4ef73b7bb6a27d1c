"""Benchmark: learned solvers vs diffusers' schedulers inside `StableDiffusionPipeline`, on the text-to-image
model `zoo:digits-t2i`, from the same latents and prompts, PSNR on latents against our dopri5 ground truth.

    python benchmarks/t2i_pipeline.py [--guidance 1,3] [--nfe 4,8,16] [--eval 128] [--train 256] [--val 128]

Per guidance scale W (diffusers' convention, uncond + W (cond - uncond)): the ten digit prompts ("a
handwritten seven", ...) drawn per pair from the seed; held-out evaluation pairs (seed 7); BNS solvers
(preconditioning σ0 = 1 and 5) and RK2-Bespoke solvers trained on their own pairs (seed 0) with the library's
default recipe; each diffusers scheduler set as `pipe.scheduler` and run by the pipeline itself
(`pipe(prompts, latents=..., guidance_scale=W, num_inference_steps=s, output_type="latent")`), network calls
counted by a hook on the UNet; the learned solvers run the same way through `BespokeScheduler`. A picture
grid (ground truth, best diffusers scheduler, BNS) decoded through the VAE. Everything is cached under
--cache; a re-run only re-renders. Writes its section of docs/benchmarks.md and docs/img/t2i_*.png.
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
from safetensors.torch import load_file, save_file  # noqa: E402

import bespoke  # noqa: E402
from bespoke import plots  # noqa: E402
from bespoke.integrations.diffusers import BespokeScheduler  # noqa: E402
from bespoke.prompts import Prompts  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.zoo.digits_t2i import NUMBER_WORDS  # noqa: E402
from bespoke.zoo.pretrained import T2I_NAME, WEIGHTS_DIR  # noqa: E402

MARK = "t2i_pipeline"
PROMPTS = Prompts(tuple(f"a handwritten {word}" for word in NUMBER_WORDS))
PEERS = {  # label: (class, options); each scheduler's defaults otherwise (as the pipeline ships them)
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", {}),
    "DPMSolverMultistep (Karras σ)": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPCMultistep": ("UniPCMultistepScheduler", {}),
    "DEISMultistep": ("DEISMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {"timestep_spacing": "trailing"}),  # its default "leading" never starts at 999
    "EulerDiscrete": ("EulerDiscreteScheduler", {}),
    "HeunDiscrete": ("HeunDiscreteScheduler", {}),
}
LEARNED = ("BNS σ0=1", "BNS σ0=5", "RK2-Bespoke")


def pipeline():
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(WEIGHTS_DIR / T2I_NAME), low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    calls = [0]
    pipe.unet.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return pipe, calls


@torch.no_grad()
def in_pipeline(pipe, calls, scheduler, steps: int, latents, labels, weight: float, batch: int = 64):
    """(latents out, network calls per sample): the pipeline's own loop with `scheduler`."""
    pipe.scheduler, out = scheduler, []
    size = latents.shape[-1] * pipe.vae_scale_factor
    for a in range(0, latents.shape[0], batch):
        calls[0] = 0
        texts = [PROMPTS.texts[int(k)] for k in labels[a : a + batch]]
        run = pipe(
            texts,
            latents=latents[a : a + batch].float().clone(),
            num_inference_steps=steps,
            guidance_scale=weight,
            output_type="latent",
            height=size,
            width=size,
        )
        out.append(run.images.double())
    return torch.cat(out), calls[0]


def learned(flow, home: Path, args) -> dict:
    """{label: {nfe: solver}}, trained on the model's own pairs at this guidance scale."""
    num = args.val + args.train
    pairs = bespoke.generate_gt(flow, home / "gt", num=num, shard_size=32, trajectory=33, quiet=args.quiet)
    val, train = pairs.slice(0, args.val), pairs.slice(args.val, num)
    config = FitConfig(iterations=args.iterations, batch_size=args.batch_size)

    def bns(sigma0):
        def make(nfe):
            ckpt = home / f"bns-s{sigma0:g}-{nfe}.ckpt"
            return bespoke.train_bns(
                flow, train, val, nfe, sigma0=sigma0, config=config, checkpoint=ckpt, quiet=args.quiet
            )

        return make

    def rk2(nfe):
        return bespoke.train_bespoke(
            flow, train, val, nfe, order=2, config=config, checkpoint=home / f"rk2-{nfe}.ckpt", quiet=args.quiet
        )

    makers = {"BNS σ0=1": bns(1.0), "BNS σ0=5": bns(5.0), "RK2-Bespoke": rk2}
    files = {"BNS σ0=1": "bns-s1", "BNS σ0=5": "bns-s5", "RK2-Bespoke": "bespoke-rk2"}
    out, skipped = {}, {}
    for k in LEARNED:
        try:
            out[k] = trained(home / f"{files[k]}.safetensors", flow, args.nfe, makers[k])
        except bespoke.BespokeError as e:  # e.g. preconditioning on a path whose SNR does not reach 0
            skipped[k] = str(e)
    return out, skipped


def _peer_file(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def run_guidance(weight: float, args) -> dict:
    home = args.cache / f"t2i-w{weight:g}"
    done = home / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    home.mkdir(parents=True, exist_ok=True)
    flow = bespoke.load_model(f"zoo:{T2I_NAME}", prompts=PROMPTS, guidance=weight)
    evaluation = bespoke.generate_gt(flow, home / "gt-eval", num=args.eval, seed=7, shard_size=32, quiet=args.quiet)
    latents, labels, reference = evaluation.noise, evaluation.labels, evaluation.samples.double()
    pipe, calls = pipeline()
    base = pipe.scheduler.config
    res = {"guidance": weight, "eval": len(evaluation), "gt_nfe": evaluation.manifest["shards"][0]["nfe"]}
    res["diffusers"], res["learned"], res["train_seconds"] = {}, {}, {}
    for label, (cls_name, options) in PEERS.items():
        res["diffusers"][label] = {}
        for nfe in args.nfe:
            steps = (nfe + 1) // 2 if cls_name == "HeunDiscreteScheduler" else nfe  # Heun: 2 s - 1 calls <= nfe
            scheduler = getattr(diffusers, cls_name).from_config(base, **options)
            x, n = in_pipeline(pipe, calls, scheduler, steps, latents, labels, weight)
            res["diffusers"][label][nfe] = {"psnr": bespoke.psnr(x, reference), "nfe": n}
            save_file({"x": x.float()}, home / f"{_peer_file(label)}-{nfe}.safetensors")
    solvers_of, res["skipped"] = learned(flow, home, args)
    for label, solvers in solvers_of.items():
        scheduler = BespokeScheduler.from_solvers(list(solvers.values()), flow)
        res["learned"][label] = {}
        res["train_seconds"][label] = {nfe: solvers[nfe].training_summary["seconds"] for nfe in args.nfe}
        for nfe in args.nfe:
            x, n = in_pipeline(pipe, calls, scheduler, nfe, latents, labels, weight)
            res["learned"][label][nfe] = {"psnr": bespoke.psnr(x, reference), "nfe": n}
            save_file({"x": x.float()}, home / f"{_peer_file(label)}-{nfe}.safetensors")
    return write_json(done, res)


# --- the report --------------------------------------------------------------------------------------


def best_learned(res: dict, nfe: int) -> tuple[str, float]:
    name = max((k for k in res["learned"] if k.startswith("BNS")), key=lambda k: res["learned"][k][str(nfe)]["psnr"])
    return name, res["learned"][name][str(nfe)]["psnr"]


def table(res: dict, nfes) -> list[str]:
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for k, cells in res["diffusers"].items():
        lines.append(f"| diffusers {k} | " + " | ".join(psnr_cell(cells[str(n)], n) for n in nfes) + " |")
    for k, cells in res["learned"].items():
        lines.append(
            f"| **{k}** (BespokeScheduler) | " + " | ".join(psnr_cell(cells[str(n)], n, True) for n in nfes) + " |"
        )
    peers = {n: best_peer(res, n) for n in nfes}
    lines.append(
        "| best diffusers scheduler | " + " | ".join(f"{peers[n][1]:.2f} ({peers[n][0]})" for n in nfes) + " |"
    )
    gains = " | ".join(f"{best_learned(res, n)[1] - peers[n][1]:+.2f}" for n in nfes)
    lines.append(f"| best BNS − best diffusers scheduler | {gains} |")
    return lines


def initialisers(res: dict, args) -> list[str]:
    """Where BNS started: our best dedicated solver on the validation pairs (from the solver file's summary)."""
    from bespoke.solvers.files import read_metadata

    file = args.cache / f"t2i-w{res['guidance']:g}" / "bns-s1.safetensors"
    entries = read_metadata(file)["solvers"]
    parts = []
    for nfe in args.nfe:
        t = entries[str(nfe)]["training"]
        parts.append(f"NFE {nfe}: {t['init']} {t['val_psnr_init']:.2f} → {t['val_psnr']:.2f} dB")
    return ["BNS σ0=1 started from our best dedicated solver (validation pairs): " + "; ".join(parts) + "."]


def plot(results: list[dict], nfes, path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), dpi=110, squeeze=False)
    for ax, res in zip(axes[0], results):
        for k, cells in res["diffusers"].items():
            pts = sorted((c["nfe"], c["psnr"]) for c in cells.values())
            ax.plot(*zip(*pts), marker="o", lw=1, alpha=0.8, label=f"diffusers {k}")
        styles = (("black", "*"), ("dimgray", "P"), ("crimson", "D"))
        for (k, cells), (color, marker) in zip(res["learned"].items(), styles):
            pts = sorted((c["nfe"], c["psnr"]) for c in cells.values())
            ax.plot(*zip(*pts), marker=marker, ms=9, lw=2.5, color=color, label=f"{k} (BespokeScheduler)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(nfes), [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE (network calls per sample; a CFG pair is one)")
        ax.set_title(f"zoo:{T2I_NAME}, guidance {res['guidance']:g}: {res['eval']} held-out samples", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("PSNR on latents against dopri5 [dB]")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=3, loc="lower center", frameon=False)
    fig.suptitle("inside StableDiffusionPipeline: diffusers' schedulers vs learned solvers, same latents and prompts")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def grid(res: dict, nfe: int, args, path: Path) -> None:
    """Ground truth, the best diffusers scheduler and the best BNS at `nfe`, decoded through the VAE."""
    home = args.cache / f"t2i-w{res['guidance']:g}"
    flow = bespoke.load_model(f"zoo:{T2I_NAME}", prompts=PROMPTS, guidance=res["guidance"])
    evaluation = bespoke.load_gt(home / "gt-eval", flow)
    k = 10
    peer, bns = best_peer(res, nfe)[0], best_learned(res, nfe)[0]
    rows = [
        ("diffusers (best)", load_file(home / f"{_peer_file(peer)}-{nfe}.safetensors")["x"][:k].double()),
        (bns, load_file(home / f"{_peer_file(bns)}-{nfe}.safetensors")["x"][:k].double()),
    ]
    plots.sample_grid(
        rows,
        path,
        reference=evaluation.samples[:k].double(),
        data_range=flow.data_range,
        title=f"zoo:{T2I_NAME}, guidance {res['guidance']:g}, NFE {nfe}, best diffusers scheduler: {peer}; prompts "
        + ", ".join(f"'{PROMPTS.texts[int(j)]}'" for j in evaluation.labels[:3])
        + ", ...",
        decode=flow.decode,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", default="1,3")
    ap.add_argument("--nfe", default="4,8,16")
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=FitConfig().iterations)
    ap.add_argument("--batch-size", type=int, default=FitConfig().batch_size)
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.nfe = [int(n) for n in args.nfe.split(",")]
    started = time.perf_counter()
    results = [run_guidance(float(w), args) for w in args.guidance.split(",")]
    lines = [
        f"Command: `python benchmarks/t2i_pipeline.py --guidance {args.guidance} --nfe {','.join(map(str, args.nfe))} "
        f"--eval {args.eval} --train {args.train} --val {args.val} --iterations {args.iterations} "
        f"--batch-size {args.batch_size}`. Machine: "
        f"{machine()}.",
        "",
        f"Model: `zoo:{T2I_NAME}` (a latent `StableDiffusionPipeline`: CLIP-type text encoder, VAE, "
        "`UNet2DConditionModel`, ε-prediction on SD's scaled-linear schedule), prompts 'a handwritten zero' … "
        "'a handwritten nine' drawn per sample. Every solver runs inside the pipeline "
        "(`pipe(prompts, latents=..., guidance_scale=W, num_inference_steps=..., output_type='latent')`): "
        "diffusers' schedulers built with `from_config(pipe.scheduler.config)` as a user swaps them in (so with "
        "the pipeline's `timestep_spacing='leading'`, `steps_offset=1`, as SD 1.x ships; DDIM 'trailing'), ours "
        "through `BespokeScheduler`; all from the same latents and prompts. "
        "PSNR is on the **latents** (as in the BNS paper), against dopri5 ground truth of the same guided ODE. "
        "A cell's (n) is the network calls it really made where that differs from the column (Heun: 2 s − 1). "
        "Learned solvers: the library's training with "
        f"{args.iterations} Adam steps of batch {args.batch_size} on {args.train} pairs, selected on {args.val} "
        "(the default is 300 steps of batch 40: this model's network is too slow on the 2-core CPU for that here).",
    ]
    for res in results:
        lines += ["", f"**Guidance W = {res['guidance']:g}** (ground truth {res['gt_nfe']} NFE per sample):", ""]
        lines += table(res, args.nfe)
        secs = {k: sum(v.values()) for k, v in res["train_seconds"].items()}
        lines += ["", "Training time (all NFEs): " + ", ".join(f"{k} {s:.0f} s" for k, s in secs.items()) + "."]
        lines += [f"Not run: {k}: {why}" for k, why in res["skipped"].items()]
        lines += initialisers(res, args)
    doc = args.out
    lines += figure_lines(doc, "t2i_pipeline.png", "PSNR against NFE", lambda p: plot(results, args.nfe, p))
    for res in results:
        if res["guidance"] == max(r["guidance"] for r in results):
            name = f"t2i_grid_w{res['guidance']:g}.png"
            lines += figure_lines(doc, name, "decoded samples", lambda p, r=res: grid(r, 8, args, p))
    publish(doc, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
