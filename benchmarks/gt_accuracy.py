"""Benchmark: how accurate is the ground truth itself? dopri5 at the default tolerance (1e-5) against
a much tighter solve (1e-8), per bundled model: the PSNR above which solver comparisons are limited by
the ground truth rather than by the solvers.

    python benchmarks/gt_accuracy.py [--models digits-ot,digits-cos,digits-vp] [--num 32] [--tight 1e-8]

Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import machine, publish  # noqa: E402  (benchmarks/common.py)

import bespoke

MARK = "gt_accuracy"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-ot,digits-cos,digits-vp")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--tols", default="1e-4,1e-5,1e-6")
    ap.add_argument("--tight", type=float, default=1e-8)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    tols = [float(t) for t in args.tols.split(",")]
    lines = [
        "## How accurate is the ground truth?",
        "",
        f"Command: `python benchmarks/gt_accuracy.py --models {args.models} --num {args.num} --tols {args.tols} "
        f"--tight {args.tight:g}` · machine: {machine()}, no GPU.",
        "",
        f"dopri5 at rtol = atol = tol against dopri5 at {args.tight:g}, on {args.num} samples (seed 0, random labels, "
        "float64 states): the mean per-sample RMSE and the PSNR it corresponds to, i.e. the level above which a "
        "solver's PSNR against that ground truth measures the ground truth's error more than the solver's.",
        "",
        "| model | " + " | ".join(f"tol {t:g}: RMSE (PSNR ceiling), NFE" for t in tols) + " |",
        "|---|" + "---|" * len(tols),
    ]
    for name in args.models.split(","):
        flow = bespoke.load_model(f"zoo:{name}")
        noise = bespoke.draw_noise(flow.sample_shape, args.num, 0, dtype=torch.float64)
        labels = bespoke.noise.draw_labels(args.num, flow.num_classes, 0)
        exact = bespoke.ground_truth(flow, noise, rtol=args.tight, atol=args.tight, labels=labels).samples
        cells = []
        for tol in tols:
            gt = bespoke.ground_truth(flow, noise, rtol=tol, atol=tol, labels=labels)
            rmse = float(bespoke.rmse(gt.samples, exact).mean())
            cells.append(f"{rmse:.1e} ({bespoke.psnr(gt.samples, exact, flow.data_range):.1f} dB), {gt.nfe}")
        lines.append(f"| `zoo:{name}` | " + " | ".join(cells) + " |")
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
