"""Benchmark: the cost of one BNS solver from nothing, GT included, on this machine.

    python benchmarks/bns_cost.py [--model digits-ot] [--nfe 16] [--val 256] [--train 520]

Generates fresh ground-truth pairs in a temporary directory (with dense trajectories, as `bespoke train`
makes them), trains one BNS solver with the library's default recipe (least-squares starts, then
BNS_ITERATIONS Adam steps), and reports the wall time of each part and of the whole next to the
model's own recorded training time. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_section  # benchmarks/common.py

import bespoke
from bespoke.cli.train import TRAJECTORY
from bespoke.train import generate_gt
from bespoke.train.bns import BNS_ITERATIONS, train_bns
from bespoke.train.loop import FitConfig

MARK = "bns_cost"
DIGITS = ("digits-ot", "digits-cos", "digits-vp")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-ot")
    ap.add_argument("--nfe", type=int, default=16)
    ap.add_argument("--val", type=int, default=256)
    ap.add_argument("--train", type=int, default=520)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args(argv)
    flow = bespoke.load_model(f"zoo:{args.model}")
    config = FitConfig(iterations=BNS_ITERATIONS)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt = generate_gt(flow, Path(tmp) / "gt", num=args.val + args.train, shard_size=128, trajectory=TRAJECTORY)
        t_gt = time.perf_counter() - t0
        val, train = gt.slice(0, args.val), gt.slice(args.val, args.val + args.train)
        t1 = time.perf_counter()
        s = train_bns(flow, train, val, args.nfe, config=config)
        t_train = time.perf_counter() - t1
    total = t_gt + t_train
    model_s = flow.info["training"]["wall_seconds"]
    clean_s = min(bespoke.load_model(f"zoo:{m}").info["training"]["wall_seconds"] for m in DIGITS)
    ts = s.training_summary
    cmd = f"python benchmarks/bns_cost.py --model {args.model} --nfe {args.nfe} --val {args.val} --train {args.train}"
    lines = [
        "## Cost of a BNS solver, from nothing",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU, nothing else running.",
        "",
        "| part | wall time |",
        "|---|---|",
        f"| ground truth: {len(gt)} pairs, dopri5 1e-5 ({min(gt.nfe)}–{max(gt.nfe)} NFE per shard of 128), "
        f"trajectories at {TRAJECTORY} times | "
        f"{t_gt:.0f} s |",
        f"| BNS training at NFE {args.nfe} (start selection with least-squares refits, {ts['iterations']} Adam "
        f"steps of batch "
        f"{config.batch_size}, validations) | {t_train:.0f} s |",
        f"| **total** | **{total:.0f} s = {total / 60:.1f} min** |",
        "",
        f"Validation PSNR {ts['val_psnr_init']:.2f} dB at initialisation ({ts['init']}) → {ts['val_psnr']:.2f} dB "
        f"on {args.val} pairs.",
        "",
        f"Share of the model's own training: {args.model} records {model_s:.0f} s of training in its weights file, "
        f"so this solver cost {100 * total / model_s:.0f}% of it; that training shared the CPU with test runs, and "
        f"the same recipe alone takes {clean_s:.0f} s (the fastest of the three digit models), which puts the "
        f"solver at {100 * total / clean_s:.0f}%.",
    ]
    write_section(args.out, MARK, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
