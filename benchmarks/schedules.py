"""Benchmark: learned schedules against the same method on its fixed grids, at every NFE of a range.

    python benchmarks/schedules.py [--models digits-ot,digits-cos,digits-vp] [--methods dpm++2m,unipc]
        [--range 3-20] [--iterations 150] [--val 128] [--eval 128] [--train 512] [--cache .bench-cache/ceiling]

Per model (the digit models, and `tiny-unet`: the diffusers UNet2DModel of benchmarks/diffusers_peers.py, trained
there): the GT cache of benchmarks/bns_ceiling.py (seed 0, 768 pairs with dense trajectories, shared with it);
the schedule is selected on pairs 0..val-1, reported on the next `eval` pairs and trained on pairs 256..
(`train` of them). Per method: ONE schedule trained for the whole --range (what `bespoke train --solver
schedule:METHOD --nfe LO-HI` does), and the method on each fixed grid: uniform, log-SNR, EDM-rho (rho = 7),
and on DDPM-type models diffusers' default spacings (`leading` with steps_offset = 1 as SD 1.x ships, and
`trailing`), at every NFE of the range, all from the same noise against the same ground truth. Cached per
(model, method) under --cache/MODEL/schedule-*; writes the section `schedules` of docs/benchmarks.md and
docs/img/schedules.png (PSNR against NFE).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import (
    add_ceiling_pair_args,
    figure_lines,
    load_bench_flow,
    machine,
    model_label,
    publish,
    save_panels,
    write_json,
)  # noqa: E402  (benchmarks/common.py)

import bespoke  # noqa: E402
from bespoke.paths import VPDiscrete  # noqa: E402
from bespoke.solvers.files import load_solver, save_solvers  # noqa: E402
from bespoke.solvers.schedule import parse_nfe_range  # noqa: E402
from bespoke.train import generate_gt  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.train.pairs import solver_psnr  # noqa: E402
from bespoke.train.schedule import SCHEDULE_LR, train_schedule  # noqa: E402

MARK = "schedules"
GRIDS = ("uniform", "logsnr", "edm")


def diffusers_grid(path: VPDiscrete, steps: int, spacing: str) -> list[float]:
    """diffusers' DDPM-type timesteps for `steps` steps (`leading` + steps_offset 1, or `trailing`), as canonical
    times, then t = 1 (the final step to sigma = 0)."""
    n = path.num_timesteps
    if spacing == "leading":
        taus = [i * (n // steps) + 1 for i in range(steps)][::-1]
    else:
        taus = [round(n - i * n / steps) - 1 for i in range(steps)]
    return path.time_of_timestep(torch.tensor(taus, dtype=torch.float64)).tolist() + [1.0]


def fixed_grids(flow) -> dict:
    """{label: grid argument of bespoke.solver (a name, or a function of the step count)}."""
    grids = {g: g for g in GRIDS}
    if isinstance(flow.scheduler, VPDiscrete):
        for spacing in ("leading", "trailing"):
            grids[f"diffusers {spacing}"] = lambda steps, s=spacing: diffusers_grid(flow.scheduler, steps, s)
    return grids


def psnr_of(method: str, nfe: int, grid, flow, pairs) -> float:
    """PSNR of `method` at `nfe` on a fixed grid (NaN where the method cannot run there, e.g. t = 1 on VP)."""
    from bespoke.solvers import METHODS

    steps = METHODS[method].steps_for(method, nfe)
    try:
        s = bespoke.solver(method, nfe, grid=grid if isinstance(grid, str) else grid(steps))
        return solver_psnr(s, flow, pairs)
    except (bespoke.BespokeError, bespoke.NonFiniteVelocity):
        return float("nan")


def run_cell(name: str, method: str, args) -> dict:
    out = args.cache / name
    tag = f"schedule-{method}-{args.lo}-{args.hi}-{args.iterations}-{args.lr:g}"
    done = out / f"{tag}.json"
    if done.exists():
        return json.loads(done.read_text())
    flow = load_bench_flow(name, out, args.tiny_iterations, args.quiet)
    gt = generate_gt(flow, out / "gt", num=768, shard_size=128, trajectory=33, quiet=args.quiet)
    val, evaluation = gt.slice(0, args.val), gt.slice(args.val, args.val + args.eval)
    train = gt.slice(256, 256 + args.train)
    file = out / f"{tag}.safetensors"
    if not file.exists():
        config = FitConfig(iterations=args.iterations, lr=args.lr)
        ckpt = file.with_suffix(".ckpt")
        s = train_schedule(flow, train, val, method, args.range, config=config, checkpoint=ckpt, quiet=args.quiet)
        save_solvers(file, [s], flow)
    learned = load_solver(file, args.hi, flow=flow)
    nfes = learned.valid_nfes()
    res = {"model": name, "method": method, "training": learned.training_summary, "nfe": {}}
    for nfe in nfes:
        cell = {"learned": solver_psnr(learned.at(nfe), flow, evaluation)}
        for label, grid in fixed_grids(flow).items():
            cell[label] = psnr_of(method, nfe, grid, flow, evaluation)
        res["nfe"][str(nfe)] = cell
        print(name, method, nfe, " ".join(f"{k} {v:.2f}" for k, v in cell.items()), flush=True)
    return write_json(done, res)


def best_fixed(cell: dict) -> tuple[str, float]:
    fixed = {k: v for k, v in cell.items() if k != "learned" and v == v}
    label = max(fixed, key=fixed.get)
    return label, fixed[label]


def table(res: dict) -> list[str]:
    labels = [k for k in next(iter(res["nfe"].values())) if k != "learned"]
    head = "| NFE | " + " | ".join(labels) + " | **learned** | gain over best fixed |"
    lines = [head, "|" + "---|" * (len(labels) + 3)]
    for nfe, cell in res["nfe"].items():
        label, best = best_fixed(cell)
        fixed = " | ".join("n/a" if cell[k] != cell[k] else f"{cell[k]:.2f}" for k in labels)
        lines.append(f"| {nfe} | {fixed} | **{cell['learned']:.2f}** | {cell['learned'] - best:+.2f} ({label}) |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    models = sorted({r["model"] for r in results}, key=[r["model"] for r in results].index)
    methods = sorted({r["method"] for r in results}, key=[r["method"] for r in results].index)
    fig, axes = plt.subplots(len(methods), len(models), figsize=(4.6 * len(models), 3.4 * len(methods)), squeeze=False)
    for res in results:
        ax = axes[methods.index(res["method"])][models.index(res["model"])]
        nfes = [int(n) for n in res["nfe"]]
        for label in next(iter(res["nfe"].values())):
            ys = [res["nfe"][str(n)][label] for n in nfes]
            style = dict(color="black", lw=2.2, marker="o", ms=3) if label == "learned" else dict(lw=1, marker=".")
            ax.plot(nfes, ys, label=label, **style)
        ax.set_title(f"{model_label(res['model'])}, {res['method']}", fontsize=10)
    title = "One learned schedule per method and model (black) against the method's fixed grids"
    save_panels(fig, axes.flat, title, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-ot,digits-cos,digits-vp")
    ap.add_argument("--methods", default="dpm++2m,unipc")
    ap.add_argument("--range", default="3-20")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--lr", type=float, default=SCHEDULE_LR)
    add_ceiling_pair_args(ap)
    args = ap.parse_args(argv)
    args.lo, args.hi = parse_nfe_range(args.range)
    started = time.perf_counter()
    results = [run_cell(m, meth, args) for m in args.models.split(",") for meth in args.methods.split(",")]
    cmd = (
        f"python benchmarks/schedules.py --models {args.models} --methods {args.methods} --range {args.range} "
        f"--iterations {args.iterations} --lr {args.lr:g} --val {args.val} --eval {args.eval} --train {args.train}"
    )
    lines = [
        "## Learned schedules: one per method and model, for every NFE of a range",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU.",
        "",
        f"Mean per-sample PSNR on {args.eval} evaluation pairs (dopri5 1e-5 ground truth; not the {args.val} "
        f"pairs the schedule was selected on, nor the {args.train} it was trained on). *Learned*: one schedule for "
        f"NFE {args.range} (`bespoke train --solver schedule:METHOD --nfe {args.range}`, {args.iterations} Adam "
        "steps, one NFE of the range per step), discretised at each NFE. The other columns: the same method on a "
        "fixed grid; `diffusers leading/trailing`: diffusers' default timestep spacings (DDPM-type model only). "
        "n/a: the method cannot run on that grid (e.g. it evaluates at t = 1 of a VP path).",
    ]
    for res in results:
        t = res["training"]
        lines += [
            "",
            f"### `{model_label(res['model'])}`, {res['method']}",
            "",
            f"Training: {t['iterations']} steps, {t['seconds']:.0f} s; kept: step {t['best_iteration']}, whose "
            f"smallest validation gain over its start ({t['init']}) at NFE {', '.join(t['val_psnr_by_nfe'])} is "
            f"{max(v for _, v in t['history']):+.2f} dB.",
            "",
            *table(res),
        ]
    draw = lambda img: plot(results, img)  # noqa: E731
    lines += figure_lines(args.out, "schedules.png", "PSNR against NFE, learned schedule and fixed grids", draw)
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
