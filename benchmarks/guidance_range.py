"""Benchmark: one BNS solver for a range of guidance scales against a BNS solver trained at each scale alone and
against the best dedicated solver at each scale (and, on the text-to-image model, diffusers' schedulers inside
the pipeline), from the same held-out noise and the same dopri5 ground truth.

    python benchmarks/guidance_range.py [--models digits-ot,digits-t2i] [--nfe 8,16] [--scales 1,2,3,5,8]
                                        [--anchors 1,3,8] [--eval-scales 1,1.5,2,3,4,5,6.5,8]

Guidance in diffusers' convention on both models (uncond + w (cond - uncond), w = 1 unguided): zoo:digits-ot
loaded with Guidance(w, "diffusers") over its labels, zoo:digits-t2i over the ten digit prompts. Per training
scale: GT pairs (seed 0, dense trajectories; validation first); per evaluation scale: held-out pairs (seed 7).
The guided solver (`train_bns_guided`) has its anchors at --anchors and trains on every --scales scale (those
between anchors train the interpolation); the per-scale BNS solvers (`train_bns`, the library's default start)
train on their scale's pairs alone; the evaluation scales between the training ones (1.5, 4, 6.5) have no
per-scale solver and test the interpolation where nothing was trained. Everything is cached under --cache.
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
from bespoke import Guidance  # noqa: E402
from bespoke.errors import NonFiniteVelocity  # noqa: E402
from bespoke.solvers.files import load_solvers, save_solvers  # noqa: E402
from bespoke.train.bns import init_candidates  # noqa: E402
from bespoke.train.loop import FitConfig  # noqa: E402
from bespoke.train.pairs import solver_psnr  # noqa: E402

MARK = "guidance_range"
SIZES = {"digits-ot": (128, 256, 128, 64), "digits-t2i": (64, 128, 64, 32)}  # val, train, eval, shard size


def load(model: str, w: float):
    if model == "digits-t2i":
        from t2i_pipeline import PROMPTS

        return bespoke.load_model("zoo:digits-t2i", prompts=PROMPTS, guidance=float(w))
    return bespoke.load_model(f"zoo:{model}", guidance=Guidance(float(w), "diffusers"))


def gt(model: str, w: float, home: Path, quiet: bool):
    """(train, val) pairs at scale w, and the held-out evaluation pairs."""
    val, train, ev, shard = SIZES[model]
    flow = load(model, w)
    where = home / f"w{w:g}"
    pairs = bespoke.generate_gt(flow, where / "gt", num=val + train, shard_size=shard, trajectory=33, quiet=quiet)
    held = bespoke.generate_gt(flow, where / "gt-eval", num=ev, seed=7, shard_size=shard, quiet=quiet)
    return flow, (pairs.slice(val, val + train), pairs.slice(0, val)), held


def timed(file: Path, flow, make):
    """(solver, training seconds): from `file` (and its .seconds.json) when there, else make() timed and saved."""
    clock = file.with_name(file.name + ".seconds.json")
    if not (file.exists() and clock.exists()):
        t0 = time.perf_counter()
        solver = make()
        seconds = time.perf_counter() - t0
        save_solvers(file, [solver], flow)
        clock.write_text(json.dumps(seconds))
    (solver,) = load_solvers(file, flow=flow).values()
    return solver, json.loads(clock.read_text())


def run_model(model: str, args) -> dict:
    home = args.cache / model
    done = home / f"results-{args.tag}-n{'-'.join(map(str, args.nfe))}.json"
    if done.exists():
        return json.loads(done.read_text())
    home.mkdir(parents=True, exist_ok=True)
    config = FitConfig(iterations=args.iterations, batch_size=args.batch_size)
    scales = sorted(set(args.scales) | set(args.anchors))
    flows, pairs, held = {}, {}, {}
    for w in sorted(set(scales) | set(args.eval_scales)):
        if w in scales:
            flows[w], pairs[w], held[w] = gt(model, w, home, args.quiet)
        else:
            flows[w] = load(model, w)
            held[w] = bespoke.generate_gt(
                flows[w],
                home / f"w{w:g}" / "gt-eval",
                num=SIZES[model][2],
                seed=7,
                shard_size=SIZES[model][3],
                quiet=args.quiet,
            )
    res = {"model": model, "scales": scales, "anchors": args.anchors, "eval_scales": args.eval_scales}
    res.update(
        eval=SIZES[model][2], val=SIZES[model][0], train=SIZES[model][1], seconds={}, command=command(model, args)
    )

    # the guided solver (one per NFE) and the per-scale BNS solvers at the benchmark's scales
    guided, per = {}, {w: {} for w in args.scales}
    for nfe in args.nfe:
        file = home / f"guided-{args.tag}-nfe{nfe}.safetensors"
        guided[nfe], res["seconds"][f"guided-{nfe}"] = timed(
            file,
            flows[scales[0]],
            lambda nfe=nfe: bespoke.train_bns_guided(
                {w: flows[w] for w in scales},
                {w: pairs[w] for w in scales},
                nfe,
                anchors=args.anchors,
                config=config,
                joint_iterations=args.joint_iterations,
                checkpoint=home / f"guided-{args.tag}-{nfe}",
                quiet=args.quiet,
            ),
        )
        for w in args.scales:
            file = home / f"w{w:g}" / f"bns-{args.iterations}-nfe{nfe}.safetensors"
            per[w][nfe], res["seconds"][f"w{w:g}-{nfe}"] = timed(
                file,
                flows[w],
                lambda nfe=nfe, w=w: bespoke.train_bns(flows[w], *pairs[w], nfe, config=config, quiet=args.quiet),
            )
    res["guided_training"] = {n: s.training_summary for n, s in guided.items()}

    # every scale: PSNR of the guided solver, the per-scale one (at its own scale), each dedicated solver
    res["psnr"] = {}
    for w in args.eval_scales:
        cells = res["psnr"][f"{w:g}"] = {}
        for nfe in args.nfe:
            row = cells[str(nfe)] = {"guided": solver_psnr(guided[nfe], flows[w], held[w])}
            if w in per:
                row["per-scale"] = solver_psnr(per[w][nfe], flows[w], held[w])
            row["dedicated"] = {}
            for name in init_candidates(flows[w], nfe):
                try:
                    s = bespoke.solver(name, nfe)
                    row["dedicated"][s.name] = solver_psnr(s, flows[w], held[w])
                except NonFiniteVelocity:
                    row["dedicated"][name] = float("nan")
    if model == "digits-t2i":
        res["diffusers"] = in_pipeline(guided, flows, held, args)
    return write_json(done, res)


def in_pipeline(guided, flows, held, args) -> dict:
    """{w: {nfe: {scheduler: psnr}}}: diffusers' schedulers and the guided solver run by the pipeline itself, the
    guided one through `BespokeScheduler.follow(pipe)` (it reads `pipe(..., guidance_scale=w)`)."""
    import diffusers
    from t2i_pipeline import PEERS, in_pipeline, pipeline

    from bespoke.integrations.diffusers import BespokeScheduler

    pipe, calls = pipeline()
    base = pipe.scheduler.config
    ours = BespokeScheduler.from_solvers(list(guided.values()), flows[args.eval_scales[0]]).follow(pipe)
    out = {}
    for w in args.eval_scales:
        latents, labels, reference = held[w].noise, held[w].labels, held[w].samples.double()
        out[f"{w:g}"] = {}
        for nfe in args.nfe:
            cell = out[f"{w:g}"][str(nfe)] = {}
            for label, (cls_name, options) in PEERS.items():
                if cls_name == "HeunDiscreteScheduler":
                    continue  # 2 s - 1 calls: never the best at a budget (docs' t2i_pipeline section)
                scheduler = getattr(diffusers, cls_name).from_config(base, **options)
                x, _ = in_pipeline(pipe, calls, scheduler, nfe, latents, labels, w)
                cell[label] = bespoke.psnr(x, reference)
            x, n = in_pipeline(pipe, calls, ours, nfe, latents, labels, w)
            cell["guided (BespokeScheduler)"] = bespoke.psnr(x, reference)
    return out


# --- the report --------------------------------------------------------------------------------------


def best_dedicated(row: dict) -> tuple[str, float]:
    name = max((k for k, v in row["dedicated"].items() if v == v), key=lambda k: row["dedicated"][k])
    return name, row["dedicated"][name]


def best_diffusers(res: dict, w: str, nfe: int) -> tuple[str, float]:
    cells = {k: v for k, v in res["diffusers"][w][str(nfe)].items() if not k.startswith("guided")}
    name = max(cells, key=cells.get)
    return name, cells[name]


def table(res: dict, nfe: int) -> list[str]:
    t2i = "diffusers" in res
    head = "| w | guided | per-scale BNS | guided − per-scale | best dedicated | guided − best dedicated |"
    rule = "|---|---|---|---|---|---|"
    if t2i:
        head += " best diffusers scheduler (in the pipeline) | guided in the pipeline |"
        rule += "---|---|"
    lines = [head, rule]
    for w, cells in res["psnr"].items():
        row = cells[str(nfe)]
        name, best = best_dedicated(row)
        per = row.get("per-scale")
        anchor = (
            " (anchor)"
            if float(w) in res["anchors"]
            else " (trained on, between anchors)"
            if float(w) in res["scales"]
            else " (not trained on)"
        )
        line = f"| {w}{anchor} | **{row['guided']:.2f}** | " + (
            f"{per:.2f} | {row['guided'] - per:+.2f} |" if per else "— | — |"
        )
        line += f" {best:.2f} ({name}) | {row['guided'] - best:+.2f} |"
        if t2i:
            peer, value = best_diffusers(res, w, nfe)
            line += f" {value:.2f} ({peer}) | {res['diffusers'][w][str(nfe)]['guided (BespokeScheduler)']:.2f} |"
        lines.append(line)
    return lines


def nfes_of(res: dict) -> list[int]:
    """The NFEs a model's run has results for."""
    return sorted(int(n) for n in next(iter(res["psnr"].values())))


def plot(results: list[dict], nfes, path: Path) -> None:
    fig, axes = plt.subplots(len(results), len(nfes), figsize=(5.2 * len(nfes), 3.9 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        for ax, nfe in zip(row, nfes):
            if nfe not in nfes_of(res):
                ax.axis("off")
                ax.text(0.5, 0.5, f"zoo:{res['model']}: not run at NFE {nfe}", ha="center", transform=ax.transAxes)
                continue
            ws = [float(w) for w in res["psnr"]]
            cells = [res["psnr"][w][str(nfe)] for w in res["psnr"]]
            ax.plot(ws, [c["guided"] for c in cells], "o-", color="black", lw=2.5, label="guided BNS (one solver)")
            pts = [(float(w), c["per-scale"]) for w, c in zip(res["psnr"], cells) if "per-scale" in c]
            ax.plot(*zip(*pts), "D", color="crimson", ms=8, label="BNS trained at that scale alone")
            ax.plot(ws, [best_dedicated(c)[1] for c in cells], "s--", color="tab:blue", label="best dedicated solver")
            for name, color in (("dpm++2m", "tab:orange"), ("unipc", "tab:purple")):  # high order: lose most at high w
                ax.plot(
                    ws,
                    [c["dedicated"].get(name, float("nan")) for c in cells],
                    lw=1,
                    alpha=0.6,
                    color=color,
                    label=name,
                )
            if "diffusers" in res:
                peers = [best_diffusers(res, w, nfe)[1] for w in res["psnr"]]
                ax.plot(ws, peers, "^:", color="tab:green", label="best diffusers scheduler (pipeline)")
            for a in res["anchors"]:
                ax.axvline(a, color="gray", lw=0.6, alpha=0.5)
            ax.set_title(f"zoo:{res['model']}, NFE {nfe}")
            ax.set_xlabel("guidance scale w (diffusers convention; grey: anchors)")
            ax.set_ylabel(f"PSNR [dB] ({res['eval']} held-out samples)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("One guided BNS solver for w in [1, 8] against per-scale BNS and dedicated solvers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def command(model: str, args) -> str:
    """The invocation that makes `model`'s results (each model's run is cached with its own settings)."""
    return (
        f"python benchmarks/guidance_range.py --models {model} --nfe {','.join(map(str, args.nfe))} "
        f"--scales {','.join(f'{w:g}' for w in args.scales)} --anchors {','.join(f'{w:g}' for w in args.anchors)} "
        f"--eval-scales {','.join(f'{w:g}' for w in args.eval_scales)} --iterations {args.iterations} "
        f"--joint-iterations {args.joint_iterations} --batch-size {args.batch_size}"
    )


def report(results: list[dict], args, started: float) -> None:
    lines = [
        "## One solver for a range of guidance scales",
        "",
        "Commands (one per model, each caching its results; this report: `python benchmarks/guidance_range.py "
        "--report-from RESULTS.json,...`): "
        + "; ".join(f"`{r['command']}`" for r in results)
        + f". Machine: {machine()}.",
        "",
        "Guidance in diffusers' convention (uncond + w (cond − uncond); w = 1 is unguided) on both models. The "
        "guided solver is one file: BNS parameters at the anchor scales, interpolated linearly in w between them "
        "(`bespoke.train_bns_guided`: a shared time grid, each anchor trained on its own pairs, then all anchors "
        "together on every training scale). Per-scale BNS: `bespoke.train_bns` on that scale's pairs alone, "
        "the library's default start. Best dedicated: the best built-in solver at exactly that NFE at that scale. "
        "All from the same held-out noise against dopri5 ground truth of the guided ODE at that scale; "
        "rows marked 'not trained on' are scales where no training pair was drawn.",
    ]
    for res in results:
        for nfe in nfes_of(res):
            lines += ["", f"**zoo:{res['model']}, NFE {nfe}** ({res['eval']} held-out pairs per scale):", ""]
            lines += table(res, nfe)
        secs = res["seconds"]
        for nfe in nfes_of(res):
            alone = sum(v for k, v in secs.items() if k.endswith(f"-{nfe}") and k.startswith("w"))
            lines.append(
                f"\nTraining wall time at NFE {nfe}: the guided solver {secs[f'guided-{nfe}']:.0f} s; the "
                f"{len(args.scales)} per-scale solvers {alone:.0f} s in all."
            )
    every = sorted({n for res in results for n in nfes_of(res)})
    lines += figure_lines(
        args.out, "guidance_range.png", "PSNR against guidance scale", lambda p: plot(results, every, p)
    )
    publish(args.out, MARK, lines, started)


def merged(results: list[dict]) -> list[dict]:
    """One result per model: the runs of one model at different NFEs (same scales) joined."""
    out: dict[str, dict] = {}
    for res in results:
        if res["model"] not in out:
            out[res["model"]] = res
            continue
        into = out[res["model"]]
        for w, cells in res["psnr"].items():
            into["psnr"][w].update(cells)
        for w, cells in res.get("diffusers", {}).items():
            into["diffusers"][w].update(cells)
        into["seconds"].update(res["seconds"])
        into["guided_training"].update(res["guided_training"])
        into["command"] += f"` and `{res['command']}"
    return list(out.values())


def floats(text: str) -> list[float]:
    return sorted(float(v) for v in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=lambda s: s.split(","), default=["digits-ot", "digits-t2i"])
    ap.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16])
    ap.add_argument("--scales", type=floats, default=[1, 2, 3, 5, 8])
    ap.add_argument("--anchors", type=floats, default=[1, 3, 8])
    ap.add_argument("--eval-scales", type=floats, default=[1, 1.5, 2, 3, 4, 5, 6.5, 8])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--joint-iterations", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache/guidance"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--models-only", action="store_true", help="train and evaluate, write no report")
    ap.add_argument(
        "--report-from",
        type=lambda s: [Path(v) for v in s.split(",")],
        default=None,
        metavar="JSON,JSON",
        help="write the report from these results files (runs with different settings per model), running nothing",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.report_from:
        report(merged([json.loads(f.read_text()) for f in args.report_from]), args, time.perf_counter())
        return
    args.tag = "a" + "-".join(f"{w:g}" for w in args.anchors) + f"-i{args.iterations}-j{args.joint_iterations}"
    started = time.perf_counter()
    results = [run_model(m, args) for m in args.models]
    if not args.models_only:
        report(results, args, started)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_grad_enabled(True)
    main()
