"""Benchmark: what BNS training costs in memory as NFE grows (with and without per-step gradient
checkpointing), and ground-truth throughput with 1 and 2 processes under torchrun.

    python benchmarks/scaling.py [--model digits-ot] [--nfe 4,8,16] [--batch 40] [--gt-pairs 128]

Memory: each configuration runs in a fresh process; its peak is the growth of the process's peak
resident set (ru_maxrss) over a few training iterations, after the model, the pairs and a warm-up
forward pass are in memory. The unit is one forward + backward pass of the model on the same batch
(what one solver step costs without checkpointing). GT throughput: `bespoke gt` on the same pairs
with 1 process and with `torchrun --nproc_per_node 2` (gloo), pairs per second.
Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, publish  # noqa: E402  (benchmarks/common.py)

MARK = "scaling"
HERE = Path(__file__).resolve()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def probe(kind: str, model: str, nfe: int, batch: int, checkpoint: bool) -> dict:
    """In this process: the peak memory growth of `kind` (fwd+bwd | bns) after a warm-up."""
    import torch

    import bespoke

    torch.manual_seed(0)
    flow = bespoke.load_model(f"zoo:{model}")
    x = bespoke.draw_noise(flow.sample_shape, batch, 0, dtype=torch.float64)
    labels = torch.arange(batch) % 10
    with torch.no_grad():  # warm-up: weights touched, allocator and thread pools up
        flow(torch.tensor(0.5, dtype=torch.float64), x, labels=labels)
    before = _peak_mib()
    if kind == "fwd+bwd":  # a network pass with the graph kept, then its backward (twice, as the training)
        for _ in range(2):
            xx = x.clone().requires_grad_()
            flow(torch.tensor(0.5, dtype=torch.float64), xx, labels=labels).pow(2).mean().backward()
    else:  # BNS training steps: n network passes through the solver, back-propagated to its parameters
        solver = bespoke.BNSSolver.from_solver(bespoke.solver("midpoint", nfe), flow)
        for _ in range(2):
            y = solver.sample(flow, x, checkpoint=checkpoint, labels=labels)
            y.pow(2).mean().backward()
    return {"kind": kind, "nfe": nfe, "checkpoint": checkpoint, "peak_mib": _peak_mib() - before}


def _subprocess_probe(args, kind: str, nfe: int, checkpoint: bool, repeats: int = 3) -> float:
    """The median peak (MiB) of `repeats` fresh processes: resident-set peaks vary by a few MiB run to run."""
    cmd = [sys.executable, str(HERE), "--probe", kind, "--model", args.model, "--batch", str(args.batch)]
    cmd += ["--probe-nfe", str(nfe)] + (["--checkpoint"] if checkpoint else [])
    peaks = []
    for _ in range(repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1200)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])
    return statistics.median(peaks)


def gt_throughput(args, procs: int) -> dict:
    """Pairs per second of `bespoke gt` with `procs` processes (a fresh cache each time)."""
    tmp = Path(tempfile.mkdtemp(prefix="bespoke-gt-"))
    try:
        launch = (
            [sys.executable]
            if procs == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        )
        cmd = launch + [
            "-m",
            "bespoke",
            "gt",
            "--model",
            f"zoo:{args.model}",
            "-n",
            str(args.gt_pairs),
            "--shard-size",
            str(args.gt_shard),
            "--out",
            str(tmp / "gt"),
            "--quiet",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=3000)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"procs": procs, "seconds": seconds, "pairs_per_s": args.gt_pairs / seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-ot")
    ap.add_argument("--nfe", default="4,8,16")
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--gt-pairs", type=int, default=128)
    ap.add_argument("--gt-shard", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--probe", choices=("fwd+bwd", "bns"), help=argparse.SUPPRESS)
    ap.add_argument("--probe-nfe", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.model, args.probe_nfe, args.batch, args.checkpoint)))
        return 0
    started = time.perf_counter()
    nfes = [int(n) for n in args.nfe.split(",")]
    unit = _subprocess_probe(args, "fwd+bwd", 0, False)
    rows = {(n, c): _subprocess_probe(args, "bns", n, c) for n in nfes for c in (False, True)}
    gt = [gt_throughput(args, p) for p in (1, 2)]

    cmd = (
        f"python benchmarks/scaling.py --model {args.model} --nfe {args.nfe} --batch {args.batch} "
        f"--gt-pairs {args.gt_pairs} --gt-shard {args.gt_shard}"
    )
    lines = [
        "## Scaling: BNS training memory against NFE, and ground truth over processes",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU.",
        "",
        f"Peak memory of BNS training on `zoo:{args.model}` (batch {args.batch}, float64 states, two training "
        "steps), as the growth of the peak resident set after a warm-up forward pass, median of 3 fresh processes; "
        f"unit: one forward + backward pass of the model on the same batch ({unit:.0f} MiB).",
        "",
        "| NFE | without checkpointing | with per-step checkpointing |",
        "|---|---|---|",
    ]
    for n in nfes:
        a, b = rows[n, False], rows[n, True]
        lines.append(f"| {n} | {a:.0f} MiB = {a / unit:.2f}× | {b:.0f} MiB = {b / unit:.2f}× |")
    lines += [
        "",
        f"Ground truth (`bespoke gt`, {args.gt_pairs} pairs in shards of {args.gt_shard}, dopri5 1e-5): "
        f"1 process {gt[0]['pairs_per_s']:.2f} pairs/s ({gt[0]['seconds']:.0f} s), `torchrun --nproc_per_node 2` "
        f"{gt[1]['pairs_per_s']:.2f} pairs/s ({gt[1]['seconds']:.0f} s): "
        f"ratio {gt[1]['pairs_per_s'] / gt[0]['pairs_per_s']:.2f}× "
        "(both include start-up; on this 2-core machine the two processes share the cores that one process's "
        "threads use, so the ratio measures overhead, not the speed-up one GPU per process gives).",
    ]
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
