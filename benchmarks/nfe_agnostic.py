"""Benchmark: one NFE-agnostic solver against per-NFE solvers, and one learned schedule against per-NFE schedules.

    python benchmarks/nfe_agnostic.py [--models digits-ot,digits-cos,digits-vp] [--range 4-16] [--per-nfe 4,8,16]
        [--iterations 300] [--schedule-iterations 150] [--val 128] [--eval 128] [--train 512]
        [--cache .bench-cache/ceiling]

Per model (the digit models, and `tiny-unet`: the diffusers UNet2DModel of benchmarks/diffusers_peers.py, trained
there), on the GT cache of benchmarks/bns_ceiling.py (768 pairs with dense trajectories, made here if missing;
selection on pairs 0..val-1, figures on the next `eval` pairs, training on pairs 256..):
(ii)  ONE RK2-Bespoke solver for the whole --range (`bespoke train --solver bespoke-rk2 --nfe LO-HI`) against
      an RK2-Bespoke solver trained at each --per-nfe alone (`--nfe 4,8,16`), the per-NFE solver at the middle
      NFE run at the others through its continuous transform (`BespokeSolver.refined`), midpoint (its base
      method) and the best dedicated solver at every NFE of the range (all built-in methods on their recommended
      grids), with the training time of each;
(iii) the dpm++2m schedule of benchmarks/schedules.py (one for NFE 3-20) against dpm++2m schedules trained at
      each --per-nfe alone and carried to the other NFEs the way "Align Your Steps" lists are: log-linear
      interpolation of the noise levels of the list for the nearest trained NFE (the 3-20 schedule is trained
      here where benchmarks/schedules.py has not made it).
Everything is cached per model under --cache/MODEL; writes the section `nfe_agnostic` of docs/benchmarks.md
and docs/img/nfe_agnostic.png.
"""

from __future__ import annotations

import argparse
import json
import math
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
from bespoke.export import schedule_in_units  # noqa: E402
from bespoke.paths import CondOT  # noqa: E402
from bespoke.solvers import METHODS  # noqa: E402
from bespoke.solvers.bespoke_range import RANGE_KNOTS  # noqa: E402
from bespoke.solvers.files import load_solver, save_solvers  # noqa: E402
from bespoke.solvers.ranged import parse_nfe_range  # noqa: E402
from bespoke.train import generate_gt  # noqa: E402
from bespoke.train.bespoke import train_bespoke  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.train.pairs import solver_psnr  # noqa: E402
from bespoke.train.schedule import SCHEDULE_LR, train_schedule  # noqa: E402

MARK = "nfe_agnostic"
RANGE_SCHEDULE = "schedule-dpm++2m-3-20-150-0.05"  # benchmarks/schedules.py's cached dpm++2m schedule


def timed(file: Path, train, flow) -> tuple[object, float]:
    """The solver in `file` (trained and saved by train() -> solver when missing) and its training seconds."""
    seconds = file.with_suffix(".seconds")
    if not file.exists():
        t0 = time.perf_counter()
        s = train()
        seconds.write_text(f"{time.perf_counter() - t0:.1f}")
        save_solvers(file, [s], flow)
    return bespoke.load_solvers(file, flow=flow), float(seconds.read_text())


def best_dedicated(nfe: int, flow, pairs) -> tuple[str, float]:
    """The best built-in method at `nfe` on its recommended grid (methods that cannot run there are skipped)."""
    scores = {}
    for name, method in METHODS.items():
        if method.largest_nfe(nfe) != nfe:
            continue
        try:
            scores[name] = solver_psnr(bespoke.solver(name, nfe), flow, pairs)
        except (bespoke.BespokeError, bespoke.NonFiniteVelocity):
            continue
    best = max(scores, key=scores.get)
    return best, scores[best]


def ays_interpolated(schedule, nfe: int, flow):
    """dpm++2m at `nfe` on the noise levels of `schedule` (another NFE) interpolated log-linearly over the step
    index ("Align Your Steps"' loglinear_interp), then sigma = 0; None where the path has no finite sigma at t = 0."""
    sigmas = schedule_in_units(schedule, flow).get("sigmas")
    if sigmas is None:
        return None
    log_s = torch.log(torch.tensor(sigmas[:-1], dtype=torch.float64))
    x_old = torch.linspace(0, 1, len(log_s), dtype=torch.float64)
    x_new = torch.linspace(0, 1, nfe, dtype=torch.float64)
    k = torch.searchsorted(x_old, x_new, right=True).clamp(1, len(x_old) - 1)
    w = (x_new - x_old[k - 1]) / (x_old[k] - x_old[k - 1])
    s = torch.exp(log_s[k - 1] + w * (log_s[k] - log_s[k - 1]))
    if isinstance(flow.scheduler, CondOT):
        times = 1 - s
    else:
        times = flow.scheduler.t_of_log_snr(-torch.log(s))
    times = torch.cat([times, torch.ones(1, dtype=torch.float64)])
    times[0] = 0.0 if abs(float(times[0])) < 1e-9 else times[0]
    return bespoke.solver("dpm++2m", nfe, grid=times.tolist())


def run_model(name: str, args) -> dict:
    out = args.cache / name
    tag = f"nfe-agnostic-{args.lo}-{args.hi}-{args.iterations}-k{RANGE_KNOTS}"
    done = out / f"{tag}.json"
    if done.exists():
        return json.loads(done.read_text())
    flow = load_bench_flow(name, out, args.tiny_iterations, args.quiet)
    gt = generate_gt(flow, out / "gt", num=768, shard_size=128, trajectory=33, quiet=args.quiet)
    val, evaluation = gt.slice(0, args.val), gt.slice(args.val, args.val + args.eval)
    train = gt.slice(256, 256 + args.train)
    config = FitConfig(iterations=args.iterations, val_every=25)
    common = dict(order=2, config=config, quiet=args.quiet)

    def bespoke_file(key, nfe):
        ckpt = out / f"rk2-{key}-{args.iterations}.ckpt"
        return lambda: train_bespoke(flow, train, val, nfe, checkpoint=ckpt, **common)

    ranged, ranged_s = timed(
        out / f"rk2-{args.lo}-{args.hi}-{args.iterations}-k{RANGE_KNOTS}.safetensors",
        bespoke_file(f"{args.lo}-{args.hi}-k{RANGE_KNOTS}", (args.lo, args.hi)),
        flow,
    )
    per_nfe, per_s = {}, {}
    for n in args.per_nfe:
        solvers, per_s[n] = timed(out / f"rk2-{n}-{args.iterations}.safetensors", bespoke_file(n, n), flow)
        per_nfe[n] = solvers[n]
    sched_config = FitConfig(iterations=args.schedule_iterations, lr=SCHEDULE_LR)
    schedules = {}
    for n in args.per_nfe:
        ckpt = out / f"schedule-dpm++2m-{n}-{n}.ckpt"
        file = out / f"schedule-dpm++2m-{n}-{n}-{args.schedule_iterations}.safetensors"
        make = lambda n=n, ckpt=ckpt: train_schedule(  # noqa: E731
            flow, train, val, "dpm++2m", (n, n), config=sched_config, checkpoint=ckpt, quiet=args.quiet
        )
        schedules[n] = timed(file, make, flow)[0][n]
    range_schedule = out / f"{RANGE_SCHEDULE}.safetensors"
    if not range_schedule.exists():  # as benchmarks/schedules.py trains it (the digit models have it from there)
        ckpt = range_schedule.with_suffix(".ckpt")
        make = lambda: train_schedule(  # noqa: E731
            flow, train, val, "dpm++2m", "3-20", config=sched_config, checkpoint=ckpt, quiet=args.quiet
        )
        timed(range_schedule, make, flow)
    middle = sorted(args.per_nfe)[len(args.per_nfe) // 2]
    res = {"model": name, "val": args.val, "eval": args.eval, "nfe": {}, "training": {}}
    res["training"] = {
        "range": {"seconds": ranged_s, **_summary(next(iter(ranged.values())))},
        **{str(n): {"seconds": per_s[n], **_summary(per_nfe[n])} for n in per_nfe},
    }
    for nfe in sorted(ranged):
        label, best = best_dedicated(nfe, flow, evaluation)
        cell = {
            "range": solver_psnr(ranged[nfe], flow, evaluation),
            "per_nfe": solver_psnr(per_nfe[nfe], flow, evaluation) if nfe in per_nfe else None,
            f"per_nfe_{middle}_refined": solver_psnr(per_nfe[middle].refined(nfe // 2), flow, evaluation),
            "midpoint": solver_psnr(bespoke.solver("midpoint", nfe), flow, evaluation),
            "best_dedicated": best,
            "best_dedicated_name": label,
        }
        res["nfe"][str(nfe)] = cell
        print(name, nfe, {k: round(v, 2) if isinstance(v, float) else v for k, v in cell.items()}, flush=True)
    res["schedules"] = {}
    for nfe in range(args.lo, args.hi + 1):
        nearest = min(schedules, key=lambda m: abs(math.log(nfe / m)))
        ays = ays_interpolated(schedules[nearest], nfe, flow) if nearest != nfe else schedules[nfe]
        cell = {
            "range_schedule": solver_psnr(load_solver(range_schedule, nfe, flow=flow), flow, evaluation)
            if range_schedule.exists()
            else None,
            "per_nfe_interpolated": solver_psnr(ays, flow, evaluation) if ays is not None else None,
            "from_nfe": nearest,
            "dpm++2m": solver_psnr(bespoke.solver("dpm++2m", nfe), flow, evaluation),
        }
        res["schedules"][str(nfe)] = cell
        print(name, "schedule", nfe, cell, flush=True)
    return write_json(done, res)


def _summary(s) -> dict:
    t = s.training_summary
    return {k: t.get(k) for k in ("init", "val_psnr_init", "val_psnr", "best_iteration", "iterations")}


def fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def bespoke_table(res: dict, middle: int) -> list[str]:
    lines = [
        f"| NFE | NFE-agnostic RK2 | per-NFE RK2 | per-NFE {middle} refined | midpoint | best dedicated | "
        "agnostic − per-NFE | agnostic − best dedicated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for nfe, c in res["nfe"].items():
        per, refined = c["per_nfe"], c[f"per_nfe_{middle}_refined"]
        gap = "–" if per is None else f"{c['range'] - per:+.2f}"
        lines.append(
            f"| {nfe} | **{c['range']:.2f}** | {fmt(per)} | {fmt(refined)} | {c['midpoint']:.2f} | "
            f"{c['best_dedicated']:.2f} ({c['best_dedicated_name']}) | {gap} | "
            f"{c['range'] - c['best_dedicated']:+.2f} |"
        )
    return lines


def schedule_table(res: dict) -> list[str]:
    lines = [
        "| NFE | one schedule for 3-20 | per-NFE schedule, log-linear (from NFE) | dpm++2m (log-SNR) | one − per-NFE |",
        "|---|---|---|---|---|",
    ]
    for nfe, c in res["schedules"].items():
        one, per = c["range_schedule"], c["per_nfe_interpolated"]
        gap = "–" if one is None or per is None else f"{one - per:+.2f}"
        lines.append(f"| {nfe} | {fmt(one)} | {fmt(per)} ({c['from_nfe']}) | {c['dpm++2m']:.2f} | {gap} |")
    return lines


def plot(results: list[dict], middle: int, path: Path) -> None:
    fig, axes = plt.subplots(2, len(results), figsize=(4.8 * len(results), 7.2), squeeze=False)
    for j, res in enumerate(results):
        ax = axes[0][j]
        nfes = [int(n) for n in res["nfe"]]
        get = lambda key, res=res, nfes=nfes: [res["nfe"][str(n)][key] for n in nfes]  # noqa: E731
        ax.plot(nfes, get("range"), color="black", lw=2.2, marker="o", ms=3, label="NFE-agnostic RK2-Bespoke")
        per = [(n, res["nfe"][str(n)]["per_nfe"]) for n in nfes if res["nfe"][str(n)]["per_nfe"] is not None]
        ax.plot(*zip(*per), ls="none", marker="*", ms=11, color="tab:red", label="RK2-Bespoke trained at that NFE")
        ax.plot(nfes, get(f"per_nfe_{middle}_refined"), lw=1, marker=".", label=f"RK2-Bespoke {middle}, refined")
        ax.plot(nfes, get("midpoint"), lw=1, marker=".", label="midpoint")
        ax.plot(nfes, get("best_dedicated"), lw=1, ls="--", marker=".", label="best dedicated")
        ax.set_title(f"{model_label(res['model'])}: Bespoke", fontsize=10)
        ax = axes[1][j]
        nfes = [int(n) for n in res["schedules"]]
        for key, label, style in (
            ("range_schedule", "one dpm++2m schedule (3-20)", dict(color="black", lw=2.2, marker="o", ms=3)),
            ("per_nfe_interpolated", "per-NFE schedules, log-linear", dict(lw=1, marker=".")),
            ("dpm++2m", "dpm++2m, log-SNR grid", dict(lw=1, ls="--", marker=".")),
        ):
            pts = [(n, res["schedules"][str(n)][key]) for n in nfes if res["schedules"][str(n)][key] is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, **style)
        ax.set_title(f"{model_label(res['model'])}: schedules", fontsize=10)
    save_panels(fig, axes.flat, "One solver or schedule for every NFE (black) against per-NFE ones", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-ot,digits-cos,digits-vp")
    ap.add_argument("--range", default="4-16")
    ap.add_argument("--per-nfe", default="4,8,16")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--schedule-iterations", type=int, default=150)
    add_ceiling_pair_args(ap)
    args = ap.parse_args(argv)
    args.lo, args.hi = parse_nfe_range(args.range)
    args.per_nfe = [int(n) for n in args.per_nfe.split(",")]
    middle = sorted(args.per_nfe)[len(args.per_nfe) // 2]
    started = time.perf_counter()
    results = [run_model(m, args) for m in args.models.split(",")]
    cmd = (
        f"python benchmarks/nfe_agnostic.py --models {args.models} --range {args.range} --per-nfe "
        f"{','.join(map(str, args.per_nfe))} --iterations {args.iterations} --schedule-iterations "
        f"{args.schedule_iterations} --val {args.val} --eval {args.eval} --train {args.train}"
    )
    lines = [
        "## One solver for every NFE: NFE-agnostic Bespoke solvers and learned schedules against per-NFE ones",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU.",
        "",
        f"Mean per-sample PSNR on {args.eval} evaluation pairs (not the {args.val} selection pairs nor the "
        f"{args.train} training pairs), every solver from the same noise against the same dopri5 ground truth. "
        f"*NFE-agnostic RK2*: one RK2-Bespoke solver for NFE {args.range} (`bespoke train --solver bespoke-rk2 "
        f"--nfe {args.range}`: {RANGE_KNOTS} knots, {args.iterations} Adam steps, one NFE of the range per step). "
        "*Per-NFE RK2*: "
        f"one solver trained at that NFE alone with the same recipe ({args.iterations} steps each). *Refined*: the "
        f"per-NFE solver of NFE {middle} run at another NFE through its continuous transform. *Best dedicated*: the "
        "best built-in method on its recommended grid at that NFE.",
    ]
    for res in results:
        t = res["training"]
        per_total = sum(v["seconds"] for k, v in t.items() if k != "range")
        each = ", ".join(f"{k}: {v['seconds']:.0f} s" for k, v in t.items() if k != "range")
        lines += [
            "",
            f"### `{model_label(res['model'])}`",
            "",
            f"Training time: the NFE-agnostic solver {t['range']['seconds']:.0f} s (start: {t['range']['init']}); "
            f"the per-NFE solvers {per_total:.0f} s together "
            f"({each}).",
            "",
            *bespoke_table(res, middle),
            "",
            "dpm++2m schedules (iii): one schedule for NFE 3-20 (benchmarks/schedules.py) against schedules "
            f"trained at NFE {', '.join(map(str, args.per_nfe))} alone ({args.schedule_iterations} steps each), "
            "each used at other NFEs by log-linear interpolation of its noise levels (the list of the nearest "
            "trained NFE, in brackets), as users of Align-Your-Steps lists do. – where the path has no finite "
            "noise level at t = 0 (cosine).",
            "",
            *schedule_table(res),
        ]
    draw = lambda img: plot(results, middle, img)  # noqa: E731
    lines += figure_lines(args.out, "nfe_agnostic.png", "PSNR against NFE: one solver for every NFE", draw)
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
