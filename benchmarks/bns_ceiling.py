"""Benchmark: how far can BNS go on each digit model (the ceiling), and how close does the default get?

    python benchmarks/bns_ceiling.py [--models digits-ot,digits-cos,digits-vp] [--nfe 4,8,16]
        [--long-nfe 8,16] [--long-iterations 1200] [--sigma0 1,2,5] [--cache .bench-cache/ceiling]

Per model: a GT cache with dense trajectories (seed 0; validation = pairs 0..val-1, training = the next
`train`). Per NFE, all scored by mean per-sample PSNR on the same validation pairs:
  screen   every start the BNS family offers, without training: each dedicated solver, and its times
           with least-squares coefficients (`train/least_squares.py`), at every preconditioning sigma0
  new      the default of `bespoke train --solver bns` now (least-squares starts, BNS_ITERATIONS Adam steps)
  long     (--long-nfe) from the best start of the screen (the default's solver when it is the same start),
           Adam for --long-iterations more steps with patience (optionally L-BFGS polish): the ceiling estimate
  old      (--old-nfe) the previous default: the best dedicated solver, then 300 Adam steps
Each run is checkpointed and its result cached under --cache, so a killed run resumes and a re-run only
re-renders. Writes its section of docs/benchmarks.md and docs/img/bns_ceiling.png (validation PSNR
against training steps, one curve per run).
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
from common import figure_lines, machine, publish, write_json  # noqa: E402  (benchmarks/common.py)

import bespoke  # noqa: E402
from bespoke.errors import BespokeError  # noqa: E402
from bespoke.solvers.bns import BNSSolver  # noqa: E402
from bespoke.solvers.files import load_solvers, save_solvers  # noqa: E402
from bespoke.train import generate_gt  # noqa: E402
from bespoke.train.bns import BNS_ITERATIONS, select_init, train_bns  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.train.pairs import solver_psnr  # noqa: E402

MARK = "bns_ceiling"
REPORT_ONLY = False  # --report-only: render what has finished, train nothing
OLD = FitConfig(iterations=300)  # the default before this study, from the best dedicated solver
RUNS = ("old", "new", "long")


def cached(path: Path, make):
    if path.exists():
        return json.loads(path.read_text())
    return write_json(path, make())


def screen(flow, train, val, nfe: int, sigmas) -> dict:
    """{sigma0: {start: val PSNR}}: every dedicated start and its least-squares refit, untrained."""
    out = {}
    for sigma0 in sigmas:
        try:
            _, scores = select_init(flow, val, nfe, sigma0=sigma0, train=train)
        except BespokeError as e:  # e.g. preconditioning on a path whose SNR does not reach 0
            out[str(sigma0)] = {"error": str(e)}
            continue
        out[str(sigma0)] = {k: v for k, v in scores.items() if v == v}
    return out


TIE_DB = 0.01  # starts this close are the same start (a refit's PSNR hardly depends on sigma0)


def best_start(scores: dict) -> tuple[float, str, float]:
    """(sigma0, start, PSNR) of the best untrained start in a screen; sigma0 = 1 (no preconditioning) where
    another sigma0 gains less than TIE_DB."""
    cells = [(float(s), k, v) for s, row in scores.items() for k, v in row.items() if k != "error"]
    best = max(cells, key=lambda c: c[2])
    plain = [c for c in cells if c[0] == 1.0 and c[2] >= best[2] - TIE_DB]
    return max(plain, key=lambda c: c[2]) if plain else best


def start_solver(flow, nfe: int, sigma0: float, start: str, train) -> BNSSolver:
    name = start.split("[")[0]
    bns = BNSSolver.from_solver(bespoke.solver(name, nfe), flow, sigma0=sigma0)
    if start.endswith("+lsq"):
        from bespoke.train.least_squares import least_squares_coefficients

        bns = least_squares_coefficients(flow, bns, train)
    return bns


def movement(start: BNSSolver, end: BNSSolver) -> dict:
    """How far training moved the times (max |dt|) and the coefficients (relative change of (a, b))."""
    with torch.no_grad():
        (t0, a0, b0), (t1, a1, b1) = (tuple(v.detach().cpu() for v in s.coefficients()) for s in (start, end))
        c0, c1 = torch.cat([a0, b0.flatten()]), torch.cat([a1, b1.flatten()])
        return {"times_max_abs": float((t1 - t0).abs().max()), "coef_rel": float((c1 - c0).norm() / c0.norm())}


class NotRun(Exception):
    """--report-only: a run that has not finished is left out of the report."""


def run(flow, train, val, nfe, out: Path, tag: str, init, sigma0: float, config, least_squares=True) -> dict:
    """One training run, resumable (checkpoint) and cached (solver file + JSON)."""
    done = out / f"{tag}-{nfe}.json"
    if done.exists():
        return json.loads(done.read_text())
    if REPORT_ONLY:
        raise NotRun(done)
    file = out / f"{tag}-{nfe}.safetensors"
    s = train_bns(
        flow,
        train,
        val,
        nfe,
        init=init,
        sigma0=sigma0,
        least_squares=least_squares,
        config=config,
        checkpoint=out / f"{tag}-{nfe}.ckpt",
        quiet=True,
    )
    save_solvers(file, {nfe: s}, flow)
    t = s.training_summary
    return write_json(
        done,
        {
            "val": t["val_psnr"],
            "init": t["init"],
            "val_init": t["val_psnr_init"],
            "sigma0": sigma0,
            "train": solver_psnr(s, flow, train.slice(0, len(val))),
            "seconds": t["seconds"],
            "iterations": t["iterations"],
            "history": t["history"],
            "lr": t["config"]["lr"],
        },
    )


def pairs_of(name: str, args):
    flow = bespoke.load_model(f"zoo:{name}")
    out = args.cache / name
    gt = generate_gt(flow, out / "gt", num=args.val + args.train, shard_size=128, trajectory=33, quiet=args.quiet)
    return flow, out, gt.slice(args.val, args.val + args.train), gt.slice(0, args.val)


def run_model(name: str, args, long: bool) -> dict:
    """Screen and the default at every NFE; with `long`, the long runs too (a second pass, after every model's
    default, so that a time-limited run has the defaults of all models first)."""
    flow, out, train, val = pairs_of(name, args)
    res = {"model": name, "val": len(val), "train": len(train), "nfe": {}}
    for nfe in args.nfe:
        cell = res["nfe"][str(nfe)] = {}
        try:
            if REPORT_ONLY and not (out / f"screen-{nfe}.json").exists():
                raise NotRun(nfe)
            cell["screen"] = cached(out / f"screen-{nfe}.json", lambda n=nfe: screen(flow, train, val, n, args.sigma0))
            plain = {k: v for k, v in cell["screen"]["1.0"].items() if not k.endswith("+lsq")}
            cell["dedicated"] = max(plain.items(), key=lambda kv: kv[1])
            cell["new"] = run(flow, train, val, nfe, out, "new", "auto", 1.0, FitConfig(iterations=BNS_ITERATIONS))
        except NotRun:
            del res["nfe"][str(nfe)]
            continue
        try:
            if long and nfe in args.long_nfe:
                cell["long"] = long_run(flow, train, val, nfe, out, cell, args)
            if long and nfe in args.old_nfe and name in args.old_models:  # the previous default: no least squares,
                cell["old"] = run(flow, train, val, nfe, out, "old", "auto", 1.0, OLD, least_squares=False)  # 300 steps
        except NotRun:
            pass
        runs = {k: cell[k] for k in RUNS if k in cell}
        for k, r in runs.items() if long else ():  # how far from the untrained start, rebuilt (training moves
            start = start_solver(flow, nfe, r["sigma0"], r["init"], train)  # a start it is given in place)
            r.update(movement(start, load_solvers(out / f"{k}-{nfe}.safetensors", flow=flow)[nfe]))
        best = max(runs, key=lambda k: runs[k]["val"])
        cell["ceiling"] = {"run": best, **{k: runs[best][k] for k in ("val", "init", "sigma0")}}
    return res


def long_run(flow, train, val, nfe: int, out: Path, cell: dict, args) -> dict:
    """From the best untrained start of the screen (the default's trained solver when that is its start too),
    Adam for --long-iterations more steps with patience."""
    sigma0, start, _ = best_start(cell["screen"])
    if sigma0 == 1.0 and start == cell["new"]["init"]:
        init = load_solvers(out / f"new-{nfe}.safetensors", flow=flow)[nfe]
    else:
        init = start_solver(flow, nfe, sigma0, start, train)
    config = FitConfig(
        iterations=args.long_iterations, val_every=50, patience=args.patience, polish_steps=args.polish_steps
    )
    result = run(flow, train, val, nfe, out, "long", init, sigma0, config)
    if init.training_summary:  # a continuation: its curve starts where the default's ended
        result = {**result, "continued": cell["new"]["iterations"]}
    return result


def table(res: dict) -> list[str]:
    head = (
        "| NFE | best dedicated | best untrained start (σ₀) | old default | new default | long run (steps) | "
        "ceiling | new − ceiling | new − dedicated | ceiling − dedicated |"
    )
    lines = [head, "|" + "---|" * 10]
    for nfe, c in res["nfe"].items():
        sigma0, start, score = best_start(c["screen"])
        long = c.get("long")
        new, ded = c["new"]["val"], c["dedicated"][1]
        old_txt = f"{c['old']['val']:.2f}" if "old" in c else "–"
        if long:  # the ceiling estimate: the best of all runs
            ceil = c["ceiling"]["val"]
            long_txt = f"{long['val']:.2f} ({long['iterations']})"
            rest = f"{ceil:.2f} | {new - ceil:+.2f} | {new - ded:+.2f} | {ceil - ded:+.2f}"
        else:
            long_txt, rest = "not run", f"– | – | {new - ded:+.2f} | –"
        lines.append(
            f"| {nfe} | {ded:.2f} ({c['dedicated'][0]}) | {score:.2f} ({start}, {sigma0:g}) | {old_txt} | "
            f"**{new:.2f}** | {long_txt} | {rest} |"
        )
    return lines


def details(res: dict) -> list[str]:
    lines = [
        "| NFE | run | start | val PSNR | train PSNR | train − val | max Δt | rel. Δ(a, b) | time |",
        "|" + "---|" * 9,
    ]
    for nfe, c in res["nfe"].items():
        for k in RUNS:
            if k not in c:
                continue
            r = c[k]
            lines.append(
                f"| {nfe} | {k} | {r['init']} (σ₀ {r['sigma0']:g}) | {r['val']:.2f} | {r['train']:.2f} | "
                f"{r['train'] - r['val']:+.2f} | {r['times_max_abs']:.4f} | {r['coef_rel']:.3f} | "
                f"{r['seconds']:.0f} s |"
            )
    return lines


def screen_lines(res: dict) -> list[str]:
    lines = []
    for nfe, c in res["nfe"].items():
        for sigma0, row in c["screen"].items():
            if "error" in row:
                lines.append(f"- NFE {nfe}, σ₀ = {float(sigma0):g}: not possible ({row['error'].split(';')[0]})")
                continue
            top = sorted(row.items(), key=lambda kv: -kv[1])[:4]
            best = ", ".join(f"{k} {v:.2f}" for k, v in top)
            lines.append(f"- NFE {nfe}, σ₀ = {float(sigma0):g}: {best} (of {len(row)})")
    return lines


def plot(results: list[dict], path: Path) -> None:
    nfes = sorted({int(n) for r in results for n in r["nfe"]})
    fig, axes = plt.subplots(
        len(results), len(nfes), figsize=(4.4 * len(nfes), 3.2 * len(results)), dpi=100, squeeze=False
    )
    colours = {"old": "tab:gray", "new": "tab:blue", "long": "tab:red"}
    for row, res in zip(axes, results):
        for ax, nfe in zip(row, nfes):
            c = res["nfe"].get(str(nfe))
            if c is None:
                ax.axis("off")
                continue
            for k in RUNS:
                if k in c:
                    steps, vals = zip(*c[k]["history"])
                    steps = [i + c[k].get("continued", 0) for i in steps]
                    ax.plot(steps, vals, marker=".", color=colours[k], label=f"{k} ({c[k]['init']})")
            ax.axhline(c["dedicated"][1], color="black", ls=":", lw=1, label=f"best dedicated ({c['dedicated'][0]})")
            ax.set_title(f"zoo:{res['model']}, NFE {nfe}", fontsize=10)
            ax.set_xlabel("training step")
            ax.set_ylabel("val PSNR [dB]")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle("BNS training: validation PSNR against steps (old default, new default, long run)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-ot,digits-cos,digits-vp")
    ap.add_argument("--nfe", default="4,8,16")
    ap.add_argument("--long-nfe", default="8,16")
    ap.add_argument("--long-iterations", type=int, default=1200)
    ap.add_argument("--old-nfe", default="16", help="NFEs at which the previous default runs too")
    ap.add_argument("--old-models", default=None, help="models on which it does (default: all of --models)")
    ap.add_argument("--patience", type=int, default=6, help="validations (every 50 steps) without improvement")
    ap.add_argument("--polish-steps", type=int, default=10)
    ap.add_argument("--sigma0", default="1,2,5")
    ap.add_argument("--val", type=int, default=256)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache/ceiling"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="render the runs that have finished; train nothing")
    args = ap.parse_args(argv)
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    args.nfe = [int(n) for n in args.nfe.split(",")]
    args.long_nfe = [int(n) for n in args.long_nfe.split(",") if n]
    args.old_nfe = [int(n) for n in args.old_nfe.split(",") if n]
    args.sigma0 = [float(s) for s in args.sigma0.split(",")]
    args.old_models = (args.old_models or args.models).split(",")
    started = time.perf_counter()
    models = args.models.split(",")
    results = [run_model(m, args, long=False) for m in models]
    results = [r for r in (run_model(m, args, long=True) for m in models) if r["nfe"]]
    cmd = (
        f"python benchmarks/bns_ceiling.py --models {args.models} --nfe {','.join(map(str, args.nfe))} "
        f"--long-nfe {','.join(map(str, args.long_nfe))} --long-iterations {args.long_iterations} "
        f"--old-nfe {','.join(map(str, args.old_nfe))} --old-models {','.join(args.old_models)} "
        f"--patience {args.patience} --polish-steps {args.polish_steps} "
        f"--sigma0 {','.join(f'{s:g}' for s in args.sigma0)} "
        f"--val {args.val} --train {args.train}"
    )
    lines = [
        "## How far BNS goes: the ceiling on the digit models, and the default against it",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU.",
        "",
        f"Mean per-sample PSNR on {args.val} validation pairs against dopri5 (rtol = atol = 1e-5), training on "
        f"{args.train} other pairs (GT with 33-point dense trajectories). *New default* (what `bespoke train` does "
        "now): the best start among the dedicated solvers and their least-squares refits "
        "(`train/least_squares.py`: each "
        f"step's coefficients fitted in closed form along the solver's own states), then {BNS_ITERATIONS} Adam steps "
        f"(batch {FitConfig.batch_size}). "
        "*Long run*: from the best untrained start of the screen (any σ₀; the new default's solver when that is its "
        "start), Adam with patience (and L-BFGS polish if asked). *Old default*: the best dedicated solver, then "
        f"{OLD.iterations} Adam steps. The *ceiling* is the best validation PSNR of all runs: a lower bound on what "
        "the family can reach.",
    ]
    for res in results:
        lines += ["", f"### `zoo:{res['model']}`", ""] + table(res)
        lines += ["", "Runs (train PSNR on as many training pairs as validation pairs):", ""] + details(res)
        lines += ["", "Untrained starts (best four per NFE and σ₀; `+lsq` = least-squares coefficients):", ""]
        lines += screen_lines(res)
    draw = lambda img: plot(results, img)  # noqa: E731
    lines += figure_lines(args.out, "bns_ceiling.png", "validation PSNR against training steps", draw)
    publish(args.out, MARK, lines, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
