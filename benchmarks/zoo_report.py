"""Report on the bundled digits models (docs/zoo.md), and the choice of their default guidance.

    python benchmarks/zoo_report.py --select-guidance   # sweep w by GT FD-digits, record it, report
    python benchmarks/zoo_report.py                     # report at the recorded default guidance

For each model: parameters, forward time of a batch of 256 on this machine, training time, ground
truth (dopri5, rtol = atol = 1e-5) NFE, FD-digits and class accuracy of 1,000 GT samples at the
default guidance, next to the real-data floor, and a grid of GT samples (docs/img/zoo_NAME.png).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import bespoke  # noqa: E402
from bespoke.fd import class_accuracy, fd_digits, fd_floor  # noqa: E402
from bespoke.noise import draw_noise  # noqa: E402
from bespoke.zoo.pretrained import DIGITS_MODELS, digits_flow, digits_network, write_metadata  # noqa: E402

SWEEP = (0.0, 0.5, 1.0, 2.0, 3.0)


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def gt_samples(flow, num: int, seed: int, batch: int = 250):
    """GT samples (float32) for balanced labels, and the mean dopri5 NFE per batch."""
    noise = draw_noise(flow.sample_shape, num, seed, dtype=torch.float32)
    labels = balanced_labels(num)
    out, nfes = [], []
    for i in range(0, num, batch):
        gt = bespoke.ground_truth(flow, noise[i : i + batch], labels=labels[i : i + batch])
        out.append(gt.samples.float())
        nfes.append(gt.nfe)
    return torch.cat(out), labels, sum(nfes) / len(nfes)


def forward_ms(name: str, reps: int = 10) -> float:
    """Median wall time of one forward pass of the bare network on a batch of 256 (no guidance)."""
    unet, _, _ = digits_network(name)
    x, t, y = torch.randn(256, 1, 16, 16), torch.rand(256), torch.randint(0, 10, (256,))
    times = []
    with torch.no_grad():
        for _ in range(3):
            unet(x, t, y)
        for _ in range(reps):
            t0 = time.perf_counter()
            unet(x, t, y)
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[reps // 2]


def select_guidance(name: str, num: int, seed: int) -> dict:
    fds = {}
    for w in SWEEP:
        flow = digits_flow(name, guidance=w)
        samples, _, _ = gt_samples(flow, num, seed)
        fds[w] = fd_digits(samples)
        print(f"  {name} w={w}: FD-digits {fds[w]:.3f}", flush=True)
    best = min(fds, key=fds.get)
    record = {
        "weight": best,
        "convention": "fm",
        "selected_by": f"lowest FD-digits of {num} GT samples (dopri5 1e-5) over w in {list(SWEEP)}",
        "fd_by_weight": {str(w): round(v, 4) for w, v in fds.items()},
    }
    write_metadata(name, default_guidance=record)
    return record


def grid(samples: torch.Tensor, path: Path, title: str) -> None:
    """10 x 10 grid: row = class, from the first 100 balanced-label samples."""
    imgs = samples[:100].clamp(-1, 1).reshape(10, 10, 16, 16)  # [k // 10][k % 10], label = k % 10
    imgs = imgs.permute(1, 0, 2, 3)  # row = label
    tiled = imgs.permute(0, 2, 1, 3).reshape(160, 160)
    fig, ax = plt.subplots(figsize=(4.2, 4.5), dpi=110)
    ax.imshow(tiled.numpy(), cmap="gray", vmin=-1, vmax=1)
    ax.set_yticks([8 + 16 * k for k in range(10)], [str(k) for k in range(10)])
    ax.set_xticks([])
    ax.set_ylabel("class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--select-guidance", action="store_true")
    ap.add_argument("--sweep-num", type=int, default=300)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(DIGITS_MODELS))
    ap.add_argument("--out", type=Path, default=Path("docs/zoo.md"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    floor = fd_floor(args.num)  # FD is biased by the sample count: compare at the same N
    rows, sections = [], []
    for name in args.models.split(","):
        if args.select_guidance:
            select_guidance(name, args.sweep_num, args.seed)
        flow = digits_flow(name)
        meta = flow.info
        samples, labels, nfe = gt_samples(flow, args.num, args.seed + 1)
        fd, acc = fd_digits(samples), class_accuracy(samples, labels)
        img = args.out.parent / "img" / f"zoo_{name}.png"
        g = meta.get("default_guidance", {})
        grid(samples, img, f"zoo:{name}, GT (dopri5) samples, w = {g.get('weight', 'none')}")
        tr = meta["training"]
        rows.append(
            f"| `zoo:{name}` | {meta['recipe']['path']} | {meta['recipe']['prediction']} | {meta['num_params']:,} "
            f"| {forward_ms(name):.0f} | {tr['wall_seconds'] / 60:.1f} min ({tr['iterations']} it) "
            f"| {g.get('weight', '-')} | {nfe:.0f} | {fd:.2f} ({fd / floor:.1f}x floor) | {100 * acc:.1f}% |"
        )
        sweep = ", ".join(f"w={w}: {v}" for w, v in g.get("fd_by_weight", {}).items())
        sections += [
            f"### `zoo:{name}`",
            "",
            f"Reproduce the weights: `python -m bespoke.zoo.train {name}` (seed {meta['recipe']['seed']}, "
            f"{meta['recipe']['iterations']} iterations of batch {meta['recipe']['batch']}, Adam lr "
            f"{meta['recipe']['lr']}, EMA {meta['recipe']['ema']}); trained on {tr['machine']} in "
            f"{tr['wall_seconds']:.0f} s. Default guidance: {g.get('selected_by', 'none')}"
            + (f" ({sweep})." if sweep else "."),
            "",
            f"![GT samples of zoo:{name}](img/{img.name})",
            "",
        ]
    text = "\n".join(
        [
            "# The bundled digits models",
            "",
            f"Command: `python benchmarks/zoo_report.py{' --select-guidance' if args.select_guidance else ''}` · "
            f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}. "
            f"Run time {time.perf_counter() - started:.0f} s.",
            "",
            "Three class-conditional 16x16 digit generators of the papers' three model types, trained by our "
            "own code on scikit-learn's digits (1,497 training images; 300 held out). FD-digits is the Fréchet "
            "distance between the penultimate features of our shipped digits classifier for the samples and for "
            f"the 300 held-out real digits; its floor at the same sample count ({args.num} real training digits vs "
            f"the held-out ones, mean of 10 draws) is **{floor:.2f}**. Ground truth: dopri5 at rtol = atol = "
            "1e-5 from per-sample seeded noise, "
            f"{args.num} samples with balanced labels, at each model's default guidance (fm convention, "
            "(1+w) cond - w uncond; one NFE is one batched cond+uncond pass).",
            "",
            "| model | path | prediction | params | fwd 256 [ms] | training | default w | GT NFE "
            "| GT FD-digits | GT class acc. |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *sections,
        ]
    )
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
