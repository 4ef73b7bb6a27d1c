"""Benchmark: BNS solvers next to every dedicated solver on the three digit models, same noise and GT.

    python benchmarks/bns_digits.py [--models digits-ot,digits-cos,digits-vp] [--nfe 4,8,16]
                                    [--val 512] [--train 520] [--iterations 300] [--cache .bench-cache]

Per model: ground-truth pairs from the GT cache (validation = pairs 0..val-1, training = the next
`train`), every dedicated solver on its recommended grid, and a BNS solver per NFE (initialised from
the best dedicated solver on the validation pairs, trained on the training pairs), all scored by mean
per-sample PSNR on the same validation pairs. FD-digits at the largest NFE against the GT's from
the same noise. Everything is cached under --cache (GT shards, solver files, per-model results), so a
killed run resumes and a re-run only re-renders. Writes its section of docs/benchmarks.md and
docs/img/bns_digits.png.
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
from common import figure_lines, finish_psnr_panels, machine, publish, write_json  # noqa: E402  (benchmarks/common.py)

import bespoke  # noqa: E402
from bespoke.errors import NonFiniteVelocity  # noqa: E402
from bespoke.fd import fd_digits  # noqa: E402
from bespoke.solvers import SOLVER_NAMES, largest_valid_nfe  # noqa: E402
from bespoke.solvers.files import load_solvers, save_solvers  # noqa: E402
from bespoke.train import generate_gt  # noqa: E402
from bespoke.train.bns import train_bns  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.train.pairs import solver_psnr  # noqa: E402

MARK = "bns_digits"


def cached_json(path: Path, make):
    """The JSON at `path`, or `make()` written there atomically first."""
    if path.exists():
        return json.loads(path.read_text())
    return write_json(path, make())


def dedicated(flow, val, nfes) -> dict:
    """PSNR on the validation pairs of every built-in solver on its recommended grid."""
    table = {}
    for name in SOLVER_NAMES:
        table[name] = {}
        for nfe in nfes:
            n = largest_valid_nfe(name, nfe)
            s = bespoke.solver(name, nfe=n)
            try:
                score = solver_psnr(s, flow, val)
            except NonFiniteVelocity:  # e.g. a solver that evaluates at t = 1, where VP paths are singular
                score = float("nan")
            table[name][nfe] = {"psnr": score, "nfe": n, "grid": s.grid_name}
    return table


def run_model(name: str, args) -> dict:
    out = args.cache / name
    done = out / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    flow = bespoke.load_model(f"zoo:{name}")
    gt = generate_gt(flow, out / "gt", num=args.val + args.train, shard_size=128, quiet=args.quiet)
    val, train = gt.slice(0, args.val), gt.slice(args.val, args.val + args.train)
    shards_used = [s for s in gt.manifest["shards"] if s["start"] < args.val + args.train]
    res = {
        "model": name,
        "gt_seconds": sum(s["seconds"] for s in shards_used),
        "gt_nfe": gt.nfe,
        "val": len(val),
        "train": len(train),
        "dedicated": {},
        "bns": {},
    }
    res["dedicated"] = cached_json(out / f"dedicated-{args.val}.json", lambda: dedicated(flow, val, args.nfe))
    file = out / "bns.safetensors"
    solvers = load_solvers(file, flow=flow) if file.exists() else {}
    config = FitConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        val_every=args.val_every,
        polish_steps=args.polish_steps,
        polish_evals=args.polish_evals,
    )
    for nfe in args.nfe:
        if nfe not in solvers:
            solvers[nfe] = train_bns(
                flow, train, val, nfe, config=config, checkpoint=out / f"bns{nfe}.ckpt", quiet=args.quiet
            )
            save_solvers(file, solvers, flow)
        s = solvers[nfe]
        res["bns"][nfe] = {"psnr": solver_psnr(s, flow, val), **s.training_summary}
    big = max(args.nfe)
    with torch.no_grad():
        x = solvers[big].sample(flow, val.noise, **val.cond())
    best = max(SOLVER_NAMES, key=lambda k: torch.nan_to_num(torch.tensor(res["dedicated"][k][str(big)]["psnr"]), -1e9))
    with torch.no_grad():
        y = bespoke.solver(best, nfe=largest_valid_nfe(best, big)).sample(flow, val.noise, **val.cond())
    res["fd"] = {
        "nfe": big,
        "gt": fd_digits(val.samples.float()),
        "bns": fd_digits(x.float()),
        "best_dedicated": best,
        "dedicated": fd_digits(y.float()),
    }
    return write_json(done, res)  # str keys, as when cached


def table(res: dict, nfes) -> list[str]:
    lines = ["| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|" + "---|" * (len(nfes) + 2)]
    ded = res["dedicated"]
    best = {
        n: max(ded[k][str(n)]["psnr"] for k in ded if ded[k][str(n)]["psnr"] == ded[k][str(n)]["psnr"]) for n in nfes
    }
    for k, cells in ded.items():
        row = []
        for n in nfes:
            c = cells[str(n)]
            if c["psnr"] != c["psnr"]:  # NaN: the solver cannot run on this model
                row.append("n/a†")
                continue
            txt = f"{c['psnr']:.2f}" + ("*" if c["nfe"] != n else "")
            row.append(f"*{txt}*" if c["psnr"] == best[n] else txt)
        lines.append(f"| {k} | {cells[str(nfes[0])]['grid']} | " + " | ".join(row) + " |")
    bns = res["bns"]
    lines.append("| **BNS** | learned | " + " | ".join(f"**{bns[str(n)]['psnr']:.2f}**" for n in nfes) + " |")
    lines.append(
        "| BNS − best dedicated | | " + " | ".join(f"{bns[str(n)]['psnr'] - best[n]:+.2f}" for n in nfes) + " |"
    )
    lines.append(
        "| BNS init (→ its PSNR) | | "
        + " | ".join(f"{bns[str(n)]['init']} {bns[str(n)]['val_psnr_init']:.2f}" for n in nfes)
        + " |"
    )
    return lines


def plot(results: list[dict], nfes, path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), dpi=110, squeeze=False)
    for ax, res in zip(axes[0], results):
        for k, cells in res["dedicated"].items():
            ys = [cells[str(n)]["psnr"] for n in nfes]
            ax.plot(nfes, ys, marker="o", lw=1, alpha=0.75, label=k)
        ax.plot(nfes, [res["bns"][str(n)]["psnr"] for n in nfes], marker="s", lw=2.5, color="black", label="BNS")
    finish_psnr_panels(
        fig,
        axes[0],
        results,
        nfes,
        "BNS vs dedicated solvers (recommended grids), same noise and dopri5 ground truth",
        path,
        bottom=10,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-ot,digits-cos,digits-vp")
    ap.add_argument("--nfe", default="4,8,16")
    ap.add_argument("--val", type=int, default=512)
    ap.add_argument("--train", type=int, default=520)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--lr", type=float, default=FitConfig.lr)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--polish-steps", type=int, default=FitConfig.polish_steps)
    ap.add_argument("--polish-evals", type=int, default=FitConfig.polish_evals)
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.nfe = [int(n) for n in args.nfe.split(",")]
    started = time.perf_counter()
    results = [run_model(m, args) for m in args.models.split(",")]

    cmd = (
        f"python benchmarks/bns_digits.py --models {args.models} --nfe {','.join(map(str, args.nfe))} "
        f"--val {args.val} --train {args.train} --iterations {args.iterations} --batch-size {args.batch_size} "
        f"--lr {args.lr}"
    )
    lines = [
        "## BNS vs dedicated solvers on the digit models",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU.",
        "",
        f"Mean per-sample PSNR (data range 2) on {args.val} validation pairs against dopri5 ground truth "
        f"(rtol = atol = 1e-5), every solver from the same noise and labels. BNS: trained on {args.train} other "
        f"pairs ({args.iterations} Adam iterations of batch {args.batch_size}, lr {args.lr} with cosine decay, "
        "full back-propagation through the steps), initialised from the best dedicated solver on the validation "
        "pairs, best validation checkpoint kept. Dedicated solvers on their recommended grids; `*` = ran at the "
        "largest NFE it takes below the column's; *italic* = best dedicated solver in the column; † = cannot "
        "run on this model (Heun and RK4 evaluate at t = 1, where the VP path is singular).",
    ]
    for res in results:
        lines += ["", f"### `zoo:{res['model']}`", ""] + table(res, args.nfe)
        fd = res["fd"]
        lines += [
            "",
            f"FD-digits of the {args.val} validation samples at NFE {fd['nfe']}: GT {fd['gt']:.2f}, "
            f"BNS {fd['bns']:.2f} ({100 * (fd['bns'] / fd['gt'] - 1):+.1f}% vs GT), best dedicated "
            f"({fd['best_dedicated']}) {fd['dedicated']:.2f} ({100 * (fd['dedicated'] / fd['gt'] - 1):+.1f}%).",
        ]
        times = ", ".join(f"NFE {n}: {res['bns'][str(n)]['seconds']:.0f} s" for n in args.nfe)
        lines += [
            "",
            f"Cost: GT for the {res['val'] + res['train']} pairs {res['gt_seconds']:.0f} s "
            f"(dopri5, {min(res['gt_nfe'])}–{max(res['gt_nfe'])} NFE per shard); BNS training {times}.",
        ]
    draw = lambda img: plot(results, args.nfe, img)  # noqa: E731
    lines += figure_lines(args.out, "bns_digits.png", "PSNR vs NFE, BNS and dedicated solvers", draw)
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
