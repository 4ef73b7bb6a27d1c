"""`bespoke eval`: solvers against ground truth from the same noise, as a PSNR table (and JSON, a plot).

    bespoke eval --model zoo:gmm2d --solvers all --nfe 4,8,16 [--json OUT.json] [--plot PNG]
    bespoke eval --model zoo:digits-ot --gt GT_DIR --solvers dpm++2m,bns.safetensors --nfe 8

The ground truth is a dopri5 solve of --num samples drawn from --seed, or the pairs of a GT cache
(`--gt`, as `bespoke gt` and `bespoke demo` make them). `run_eval` is the one evaluation the demo shares.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import bespoke
from bespoke import BespokeError, budget
from bespoke.errors import SingularEnd
from bespoke.flows import GUIDANCE_CONVENTIONS
from bespoke.noise import draw_noise
from bespoke.solvers import METHODS, largest_valid_nfe
from bespoke.solvers.files import load_solver, load_solvers

from .common import (
    add_model_args,
    add_run_args,
    check_picture_path,
    check_writable,
    conditioning,
    device,
    load_flow,
    nfe_list,
    positive_float,
    positive_int,
    print_error,
    say,
    solver_names,
    write_json_atomic,
)


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare solvers against ground truth (PSNR table)",
        description="Evaluate solvers at several NFE against dopri5 ground truth from the same noise; "
        "print a PSNR table (dB) and optionally write the eval JSON and a PSNR-vs-NFE plot.",
    )
    add_model_args(p)
    p.add_argument(
        "--solvers",
        required=True,
        metavar="all|A,B,...",
        help=f"'all' or comma-separated names from: {', '.join(bespoke.SOLVER_NAMES)}, or solver files (*.safetensors)",
    )
    p.add_argument("--force", action="store_true", help="use solver files made for another model anyway")
    p.add_argument(
        "--nfe", required=True, type=nfe_list, metavar="N,N,...", help="NFE values, e.g. 4,8,16 or 4-16 (every one)"
    )
    p.add_argument(
        "-n", "--num", type=positive_int, default=None, help="number of samples (default 1000; with --gt: all)"
    )
    p.add_argument("--gt", metavar="GT_DIR", default=None, help="score against the pairs of this GT cache")
    p.add_argument("--rtol", type=positive_float, default=1e-5, help="ground-truth dopri5 rtol (default 1e-5)")
    p.add_argument("--atol", type=positive_float, default=1e-5, help="ground-truth dopri5 atol (default 1e-5)")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the results as eval JSON")
    p.add_argument("--plot", metavar="PNG", default=None, help="write a PSNR-vs-NFE plot")
    add_run_args(p)
    p.set_defaults(func=cmd_eval)


@dataclass
class Cell:
    solver: str
    requested: int
    run_at: int | None  # None: no valid NFE <= requested
    result: bespoke.EvalResult | None = None
    error: str | None = None
    na: str | None = None  # why this solver cannot run on this model at all (not a failure)


def nfe_rule(name: str, files: dict | None = None) -> str:
    method = METHODS.get(name)
    if method is not None:
        return method.nfe_rule()
    if files and name in files:
        return f"the NFEs in the file: {', '.join(map(str, files[name]))}"
    return "other NFE"


# --- output ---------------------------------------------------------------------------------------


def table(cells: list[Cell], names: list[str], nfes: list[int], header: str, data_range: float, files=None) -> str:
    by = {(c.solver, c.requested): c for c in cells}

    def text(c: Cell) -> str:
        if c.run_at is None:
            return "- "
        if c.error is not None:
            return "err "
        if c.na is not None:
            return "n/a "
        return f"{c.result.psnr_db:.2f}" + ("*" if c.run_at != c.requested else " ")

    rows = [["solver"] + [f"NFE {n} " for n in nfes]]
    rows += [[name] + [text(by[name, n]) for n in nfes] for name in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [header, "", "PSNR (dB) against ground truth, mean over samples"]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]).rstrip())

    notes = []
    for name in names:
        mine = [by[name, n] for n in nfes]
        moved = [c for c in mine if c.run_at is not None and c.run_at != c.requested]
        if moved:
            pairs = ", ".join(f"{c.run_at} for {c.requested}" for c in moved)
            notes.append(f"* {name} ran at NFE {pairs}: it takes {nfe_rule(name, files)}")
        missing = [c for c in mine if c.run_at is None]
        if missing:
            asked = ", ".join(str(c.requested) for c in missing)
            if files and name in files:
                held = ", ".join(map(str, files[name]))
                notes.append(f"- {name} at NFE {asked}: the file holds NFE {held} (train others with `bespoke train`)")
            else:
                notes.append(f"- {name} at NFE {asked}: no valid NFE at or below; it takes {nfe_rule(name, files)}")
        errors: dict[str, list[int]] = {}  # one note per message, listing the NFEs it happened at
        for c in mine:
            if c.error is not None:
                errors.setdefault(c.error, []).append(c.requested)
        for message, at in errors.items():
            notes.append(f"err {name} at NFE {', '.join(map(str, at))}: {message}")
        na = next((c.na for c in mine if c.na is not None), None)
        if na is not None:
            notes.append(f"n/a {name}: cannot run on this model ({na})")
    lines += [""] + notes if notes else []
    lines += [
        "",
        f"PSNR = 20 log10({data_range:g} / RMSE) per sample (data range {data_range:g}), against dopri5 ground truth "
        "from the same noise.",
        "NFE counts network evaluations per sample; a classifier-free-guidance pair (cond + uncond, batched) counts "
        "as one.",
    ]
    return "\n".join(lines)


# --- commands -------------------------------------------------------------------------------------


def run_eval(
    flow, names, nfes, noise, reference, cond, *, force=False, quiet=False, keep_samples=False, files=None
) -> tuple[list[Cell], dict[str, list[int]]]:
    """Every solver (built-in name or solver file) at every NFE on `noise`, scored against `reference`.

    A built-in solver runs at its largest valid NFE at or below the one asked for; a file at the NFEs
    it holds. A solver that cannot run on this model is reported in its cell, not raised: n/a where it
    evaluates the model where the model is singular, err for any other problem.
    files: `file_nfes(names, flow, force)` when the caller has it already.
    Returns the cells and the NFEs each solver file holds."""
    files = file_nfes(names, flow, force) if files is None else files

    def run_at(name: str, n: int) -> int | None:
        if name in files:
            return n if n in files[name] else None
        return largest_valid_nfe(name, n)

    cells = [Cell(name, n, run_at(name, n)) for name in names for n in nfes]
    jobs = sorted(
        {(c.solver, c.run_at) for c in cells if c.run_at is not None}, key=lambda j: (names.index(j[0]), j[1])
    )
    done: dict[tuple[str, int], bespoke.EvalResult | BespokeError] = {}
    with tqdm(jobs, desc="eval", unit="run", file=sys.stderr, disable=quiet, dynamic_ncols=True) as bar:
        for name, nfe in bar:
            bar.set_postfix_str(f"{name} NFE {nfe}", refresh=False)
            try:
                s = load_solver(name, nfe, flow=flow, force=force) if name in files else bespoke.solver(name, nfe)
                done[name, nfe] = bespoke.evaluate(
                    s, flow, noise, reference, name=name, keep_samples=keep_samples, **cond
                )
            except BespokeError as e:  # this solver cannot run on this model: report it in its cell
                done[name, nfe] = e
    for c in cells:
        if c.run_at is None:
            continue
        out = done[c.solver, c.run_at]
        if isinstance(out, SingularEnd):
            c.na = " ".join(str(out).split())
        elif isinstance(out, BespokeError):
            c.error = " ".join(str(out).split())
        else:
            c.result = out
    return cells, files


def file_nfes(names: list[str], flow, force: bool) -> dict[str, list[int]]:
    """The NFEs each solver file holds, after checking the file is valid and made for this model."""
    return {n: sorted(load_solvers(n, flow=flow, force=force)) for n in names if n not in bespoke.SOLVER_NAMES}


def results_of(cells: list[Cell]) -> list[dict]:
    """One eval-JSON result per cell that ran: solver, NFE spent, PSNR, RMSE, ... and the NFE asked for."""
    return [dict(c.result.as_dict(), requested_nfe=c.requested) for c in cells if c.result is not None]


def eval_json(cells: list[Cell], settings: dict, files: dict) -> dict:
    """The eval JSON (DESIGN §6): ground-truth settings, one result per cell that ran, and what did not."""
    results = results_of(cells)
    skipped = [
        {"solver": c.solver, "requested_nfe": c.requested, "reason": f"it takes {nfe_rule(c.solver, files)}"}
        for c in cells
        if c.run_at is None
    ]
    skipped += [
        {"solver": c.solver, "requested_nfe": c.requested, "reason": f"cannot run on this model: {c.na}"}
        for c in cells
        if c.na is not None
    ]
    failed = [
        {"solver": c.solver, "requested_nfe": c.requested, "nfe": c.run_at, "error": c.error}
        for c in cells
        if c.error is not None
    ]
    return {"ground_truth": settings, "results": results, "skipped": skipped, "failed": failed}


def cache_settings(cache, gt_dir) -> dict:
    """The eval JSON's ground-truth settings for the pairs of a GT cache (`cache`: its first pairs, sliced)."""
    m = cache.manifest
    return {
        "solver": m["solver"],
        "rtol": m["rtol"],
        "atol": m["atol"],
        "nfe": cache.nfe,
        "gt_dir": str(gt_dir),
        "seed": m["seed"],
        "seconds": sum(s["seconds"] for s in m["shards"] if s["start"] < len(cache)),
    }


def _reference(args, flow, dev):
    """(noise, reference samples, cond, labels text, ground-truth settings) from --gt or a dopri5 solve."""
    if args.gt is not None:
        cache = bespoke.load_gt(args.gt, flow, force=args.force)
        num = len(cache) if args.num is None else args.num
        if num > len(cache):
            raise BespokeError(f"--num {num}: the GT cache {args.gt} holds {len(cache)} pairs; ask for at most that")
        cache = cache.slice(0, num)
        noise = cache.noise.to(dev, torch.float64)
        cond = {k: v.to(dev) for k, v in cache.cond().items()}
        labels = None if cache.labels is None else f"from the GT cache (seed {cache.manifest['seed']})"
        return noise, cache.samples.to(dev), cond, labels, cache_settings(cache, args.gt)
    num = 1000 if args.num is None else args.num
    cond, labels = conditioning(args, flow, num)
    cond = {k: v.to(dev) for k, v in cond.items()}
    noise = flow.initial_state(draw_noise(flow.sample_shape, num, args.seed, dtype=torch.float64, device=dev))
    say(args, f"ground truth: dopri5 (rtol={args.rtol:g}, atol={args.atol:g}) on {num} samples ...")
    t0 = time.perf_counter()
    gt = bespoke.ground_truth(flow, noise, rtol=args.rtol, atol=args.atol, **cond)
    settings = dict(gt.settings(), seconds=time.perf_counter() - t0, seed=args.seed)
    return noise, gt.samples, cond, labels, settings


def header(model: str, flow, num: int, where: str, labels: str | None, gt: dict) -> str:
    """The line above a PSNR table: model, path, samples, guidance, labels and ground truth."""
    parts = [model, f"path {flow.scheduler.name if flow.scheduler else 'none'}", f"{num} samples ({where})"]
    if flow.guidance is not None:
        g = flow.guidance
        parts.append(f"guidance w={g.weight:g} ({g.convention}: {GUIDANCE_CONVENTIONS[g.convention].split('  ')[0]})")
    if labels is not None:
        parts.append(f"{'prompts' if flow.prompts is not None else 'labels'} {labels}")
    if flow.decode is not None:
        parts.append("PSNR on latents")
    nfe = gt["nfe"]
    if not isinstance(nfe, int):  # a GT cache: one count per shard
        nfe = min(nfe) if min(nfe) == max(nfe) else f"{min(nfe)}-{max(nfe)}"
    parts.append(f"ground truth: {gt['solver']} rtol={gt['rtol']:g} atol={gt['atol']:g}, {nfe} NFE per sample")
    return " | ".join(parts)


def _check_budget(args, flow, files: dict, dev: str) -> None:
    """Refuse, before the ground truth is solved, an evaluation whose states cannot fit in memory."""
    num = 1000 if args.num is None else args.num  # with --gt: at most --num of the cache's pairs
    numel = math.prod(flow.sample_shape)
    solve = budget.solve_bytes(max(args.nfe), num, numel, history=bool(files))
    need = solve + 2 * num * numel * 8 + (0 if args.gt else budget.ground_truth_bytes(num, numel))
    what = f"evaluating {num} samples at NFE up to {max(args.nfe)}"
    budget.require(need, what=what, fix="ask for fewer samples (--num) or lower NFEs", device=dev)


def cmd_eval(args) -> int:
    t_start = time.perf_counter()
    dev = device(args.device)
    names = solver_names(args.solvers)
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path is not None:
            check_writable(path, flag)
    if args.plot is not None:
        check_picture_path(args.plot, "--plot")
    if args.gt is not None and args.labels is not None:
        raise BespokeError("--labels: the pairs of --gt carry their own labels; drop --labels")
    flow = load_flow(args)
    files = file_nfes(names, flow, args.force)  # every solver file checked before the ground truth is solved
    _check_budget(args, flow, files, dev)
    noise, reference, cond, labels_text, gt = _reference(args, flow, dev)
    cells, files = run_eval(
        flow, names, args.nfe, noise, reference, cond, force=args.force, quiet=args.quiet, files=files
    )
    where = f"GT cache {args.gt}" if args.gt else f"seed {args.seed}, float64, {dev}"
    title = header(args.model, flow, noise.shape[0], where, labels_text, gt)
    print(table(cells, names, args.nfe, title, flow.data_range, files), flush=True)

    if args.json is not None:
        settings = dict(
            gt,
            model=args.model,
            path=flow.scheduler.name if flow.scheduler else None,
            num=noise.shape[0],
            noise="the GT cache's, run in float64" if args.gt else "bespoke.noise.draw_noise, float64",
            device=dev,
            guidance=flow.guidance.as_dict() if flow.guidance is not None else None,
            labels=labels_text,
            data_range=flow.data_range,
            bespoke_version=bespoke.__version__,
        )
        write_json_atomic(args.json, eval_json(cells, settings, files))
        say(args, f"wrote {args.json}")
    if args.plot is not None:
        from bespoke.plots import psnr_vs_nfe

        psnr_vs_nfe(
            results_of(cells), args.plot, title=f"{args.model}: {noise.shape[0]} samples, PSNR against ground truth"
        )
        say(args, f"wrote {args.plot}")
    say(args, f"done in {time.perf_counter() - t_start:.1f} s (ground truth {gt['seconds']:.1f} s)")
    failures = [c for c in cells if c.error is not None]  # n/a cells are not failures
    if failures:
        print_error(f"{len(failures)} of {len(cells)} evaluations failed; see the 'err' notes under the table")
        return 2
    return 0
