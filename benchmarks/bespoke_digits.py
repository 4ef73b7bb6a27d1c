"""Benchmark: RK1/RK2-Bespoke next to BNS and the dedicated solvers on the digit models, same noise and GT.

    python benchmarks/bespoke_digits.py [--models digits-ot,digits-cos,digits-vp] [--nfe 4,8,16]
                                        [--trajectories 1024] [--iterations 300] [--bns-nfe 8]

Builds on `bns_digits.py` (run it first): the same validation pairs (0..val-1 of its GT cache), its
dedicated-solver table and its BNS solvers. Adds, per model: a dense-trajectory GT cache (seed 1, 65
times per trajectory) for step-parallel Bespoke training; RK1- and RK2-Bespoke at every NFE (RMSE-Bound
loss, initialised from the best of the identity and the Thm 2.3 transforms on the validation pairs);
and, at --bns-nfe, a BNS solver initialised from the trained RK2-Bespoke solver next to the BNS solver
initialised from the best dedicated one. Everything is cached under --cache; writes its section of
docs/benchmarks.md and docs/img/bespoke_digits.png.
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
from common import figure_lines, finish_psnr_panels, machine, publish, trained, write_json  # noqa: E402  (benchmarks/common.py)

import bespoke  # noqa: E402
from bespoke.solvers.files import load_solvers  # noqa: E402
from bespoke.train import generate_gt  # noqa: E402
from bespoke.train.bespoke import train_bespoke  # noqa: E402
from bespoke.train.bns import train_bns  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.train.pairs import solver_psnr  # noqa: E402

MARK = "bespoke_digits"


def run_model(name: str, args) -> dict:
    out = args.cache / name
    done = out / "bespoke.json"
    if done.exists():
        return json.loads(done.read_text())
    base = out / "results.json"
    if not base.exists():
        raise SystemExit(f"{base} is missing: run `python benchmarks/bns_digits.py --models {name}` first")
    res = json.loads(base.read_text())
    flow = bespoke.load_model(f"zoo:{name}")
    gt = generate_gt(flow, out / "gt", num=res["val"] + res["train"], shard_size=128, quiet=args.quiet)
    val, train = gt.slice(0, res["val"]), gt.slice(res["val"], res["val"] + res["train"])
    traj = generate_gt(flow, out / "gt-traj", num=args.trajectories, seed=1, trajectory=65, quiet=args.quiet)
    config = FitConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, val_every=args.val_every)
    res["trajectories"] = {"num": len(traj), "seconds": sum(s["seconds"] for s in traj.manifest["shards"])}
    for order in (1, 2):

        def make(nfe, order=order):
            ckpt = out / f"rk{order}-{nfe}.ckpt"
            return train_bespoke(flow, traj, val, nfe, order=order, config=config, checkpoint=ckpt, quiet=args.quiet)

        solvers = trained(out / f"bespoke-rk{order}.safetensors", flow, args.nfe, make)
        res[f"rk{order}"] = {n: {"psnr": solver_psnr(s, flow, val), **s.training_summary} for n, s in solvers.items()}
    rk2 = load_solvers(out / "bespoke-rk2.safetensors", flow=flow)
    bns_config = FitConfig(iterations=args.bns_iterations, batch_size=args.batch_size, lr=args.lr, val_every=50)

    def from_rk2(nfe):
        ckpt = out / f"bns-from-rk2-{nfe}.ckpt"
        return train_bns(flow, train, val, nfe, init=rk2[nfe], config=bns_config, checkpoint=ckpt, quiet=args.quiet)

    solvers = trained(out / "bns-from-rk2.safetensors", flow, [args.bns_nfe], from_rk2)
    res["bns_from_rk2"] = {n: {"psnr": solver_psnr(s, flow, val), **s.training_summary} for n, s in solvers.items()}
    return write_json(done, res)  # str keys, as when cached


def best_dedicated(res: dict, nfe: int) -> tuple[str, float]:
    cells = {k: v[str(nfe)]["psnr"] for k, v in res["dedicated"].items()}
    name = max((k for k in cells if cells[k] == cells[k]), key=cells.get)
    return name, cells[name]


def table(res: dict, nfes) -> list[str]:
    psnr = lambda key, n: res[key][str(n)]["psnr"]  # noqa: E731
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    best = {n: best_dedicated(res, n) for n in nfes}
    lines.append("| best dedicated | " + " | ".join(f"{best[n][1]:.2f} ({best[n][0]})" for n in nfes) + " |")
    for key, label in (("rk1", "RK1-Bespoke"), ("rk2", "RK2-Bespoke"), ("bns", "BNS")):
        lines.append(f"| {label} | " + " | ".join(f"{psnr(key, n):.2f}" for n in nfes) + " |")
    order = []
    for n in nfes:
        bns, rk2, ded = psnr("bns", n), psnr("rk2", n), best[n][1]
        order.append("yes" if bns > rk2 > ded else f"no ({'BNS ≤ RK2' if bns <= rk2 else 'RK2 ≤ dedicated'})")
    lines.append("| BNS > RK2-Bespoke > best dedicated? | " + " | ".join(order) + " |")
    inits = " | ".join(f"{res['rk2'][str(n)]['init']} {res['rk2'][str(n)]['val_psnr_init']:.2f}" for n in nfes)
    lines.append(f"| RK2-Bespoke init (→ its PSNR) | {inits} |")
    return lines


def plot(results: list[dict], nfes, path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(max(5.2 * len(results), 12), 4.2), dpi=110, squeeze=False)
    for ax, res in zip(axes[0], results):
        for cells in res["dedicated"].values():
            ax.plot(nfes, [cells[str(n)]["psnr"] for n in nfes], lw=0.8, alpha=0.35, color="gray")
        ax.plot(nfes, [best_dedicated(res, n)[1] for n in nfes], "o--", color="gray", label="best dedicated")
        styles = (("rk1", "RK1-Bespoke", "tab:orange", "^"), ("rk2", "RK2-Bespoke", "tab:red", "D"))
        for key, label, color, marker in styles + (("bns", "BNS", "black", "s"),):
            ax.plot(nfes, [res[key][str(n)]["psnr"] for n in nfes], marker=marker, lw=2, color=color, label=label)
        for n, cell in res["bns_from_rk2"].items():
            ax.plot([int(n)], [cell["psnr"]], "*", ms=13, color="tab:purple", label=f"BNS from RK2-Bespoke (NFE {n})")
    finish_psnr_panels(
        fig,
        axes[0],
        results,
        nfes,
        "Learned solvers vs dedicated ones (thin grey: every dedicated solver), same noise and ground truth",
        path,
        bottom=15,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-ot,digits-cos,digits-vp")
    ap.add_argument("--nfe", default="4,8,16")
    ap.add_argument("--trajectories", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--lr", type=float, default=FitConfig.lr)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--bns-nfe", type=int, default=8)
    ap.add_argument("--bns-iterations", type=int, default=300, help="as in bns_digits.py, for a like-for-like BNS")
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.nfe = [int(n) for n in args.nfe.split(",")]
    started = time.perf_counter()
    results = [run_model(m, args) for m in args.models.split(",")]

    cmd = (
        f"python benchmarks/bespoke_digits.py --models {args.models} --nfe {','.join(map(str, args.nfe))} "
        f"--trajectories {args.trajectories} --iterations {args.iterations} --batch-size {args.batch_size} "
        f"--lr {args.lr} --bns-nfe {args.bns_nfe} --bns-iterations {args.bns_iterations}"
    )
    lines = [
        "## Bespoke scale-time solvers (RK1/RK2) vs BNS and the dedicated solvers on the digit models",
        "",
        f"Command: `{cmd}` (after `bns_digits.py`) · machine: {machine()}, no GPU.",
        "",
        f"Mean per-sample PSNR (data range 2) on the {results[0]['val']} validation pairs of the BNS benchmark, "
        "every solver from the same noise and labels. RK1/RK2-Bespoke: step-parallel RMSE-Bound training "
        f"({args.iterations} Adam iterations of batch {args.batch_size}, lr {args.lr} capped by the initial "
        f"error, cosine decay) on {args.trajectories} dense GT trajectories (dopri5, 65 stored times each, "
        "Hermite-interpolated at the learned times), best validation checkpoint kept. NFE of RK2 = 2 × steps. "
        "BNS and the best dedicated solver (on its recommended grid) are from the BNS benchmark above.",
    ]
    for res in results:
        lines += ["", f"### `zoo:{res['model']}`", ""] + table(res, args.nfe)
        for n, cell in res["bns_from_rk2"].items():
            lines += [
                "",
                f"BNS at NFE {n} initialised from the trained RK2-Bespoke solver ({cell['val_psnr_init']:.2f} dB): "
                f"**{cell['psnr']:.2f}** dB, against {res['bns'][n]['psnr']:.2f} dB from the best dedicated solver "
                f"({res['bns'][n]['init']}, {res['bns'][n]['val_psnr_init']:.2f} dB); same data and budget, "
                f"{cell['seconds']:.0f} s.",
            ]
        secs = lambda key, res=res: ", ".join(f"{res[key][str(n)]['seconds']:.0f}" for n in args.nfe)  # noqa: E731
        lines += [
            "",
            f"Cost: {res['trajectories']['num']} GT trajectories {res['trajectories']['seconds']:.0f} s; training "
            f"seconds at NFE {'/'.join(map(str, args.nfe))}: RK1 {secs('rk1')}, RK2 {secs('rk2')}, BNS {secs('bns')}.",
        ]
    draw = lambda img: plot(results, args.nfe, img)  # noqa: E731
    lines += figure_lines(args.out, "bespoke_digits.png", "PSNR vs NFE, learned and dedicated solvers", draw)
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
