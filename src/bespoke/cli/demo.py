"""`bespoke demo`: the main job. On a bundled model, learn a BNS solver, an NFE-agnostic RK2-Bespoke solver
and a dpm++2m schedule, and show, in a table and in pictures, how they compare with every dedicated solver
from the same noise.

    bespoke demo [--model zoo:digits-ot] [--nfe 8] [--range 4-16] [--out bespoke-demo] [--fast]

Steps: (1) ground truth for evaluation (pairs 0..E-1 of seed S) and (2) for training (seed S+1, with
dense trajectories for Bespoke); (3) train BNS at each --nfe, (4) ONE RK2-Bespoke solver for every NFE of
--range and (5) ONE learned dpm++2m schedule for the range; (6) evaluate every solver at every NFE of the
range (and --nfe) on the evaluation pairs, exactly as `bespoke eval --gt OUT/cache/gt-eval` does; (7) write
report.md, results.json (eval JSON), psnr_vs_nfe.png (the range solvers as curves), samples.png, learned.png
and the solver files into --out. Everything slow is cached under OUT/cache/ (the evaluation per solver and
NFE in OUT/cache/eval/, keyed by the model, the pairs, the solver file's bytes, the device and the
version), so a re-run (or a run killed half-way) redoes only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

import bespoke
from bespoke import BespokeError, plots
from bespoke.io import read_tensors, save_tensors
from bespoke.solvers.files import entry_key, load_solvers, model_record
from bespoke.solvers.ranged import parse_nfe_range
from bespoke.train.schedule import SCHEDULE_LR

from . import evaluate as ev
from .common import (
    add_run_args,
    atomic_path,
    device,
    finite_float,
    int_list,
    load_flow,
    say,
    write_json_atomic,
    write_text_atomic,
)
from .train import check_training_budget, summary_line, train_file

LEARNED = {"bns": "BNS", "bespoke-rk2": "RK2-Bespoke", "schedule:dpm++2m": "dpm++2m schedule"}  # kind: label
RANGED = ("bespoke-rk2", "schedule:dpm++2m")  # trained once for every NFE of --range
STEPS = 7


def _stem(kind: str) -> str:
    """The solver file's name in --out (and the solver's name in the tables) for a learned kind."""
    return kind.replace(":", "-")


GRID_COLUMNS = 10


@dataclass(frozen=True)
class Profile:
    """How much work the demo does: pairs for evaluation, validation and training, and Adam iterations."""

    eval: int
    val: int
    train: int
    iterations: int
    trajectory: int
    shard: int = 64


PROFILES = {
    "default": Profile(eval=256, val=128, train=256, iterations=150, trajectory=33),
    "fast": Profile(eval=64, val=32, train=64, iterations=30, trajectory=17, shard=32),
}


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: learn solvers for a bundled model and compare them with every dedicated solver",
        description="Train a BNS solver, an NFE-agnostic RK2-Bespoke solver and a learned dpm++2m schedule on a "
        "model, evaluate them against every built-in solver at every NFE of a range from the same noise, and "
        "write a report with pictures.",
    )
    p.add_argument("--model", default="zoo:digits-ot", metavar="SPEC", help="model spec (default zoo:digits-ot)")
    p.add_argument("--nfe", type=int_list, default=[8], metavar="N,N,...", help="NFEs to learn BNS for (default 8)")
    p.add_argument(
        "--range",
        type=nfe_range,
        default=(4, 16),
        metavar="LO-HI",
        help="the NFEs of the NFE-agnostic RK2-Bespoke solver and the learned schedule, and of the curves "
        "(default 4-16)",
    )
    p.add_argument("--out", default="bespoke-demo", metavar="DIR", help="output directory (default ./bespoke-demo)")
    p.add_argument("--fast", action="store_true", help="fewer pairs and iterations: a run of a few minutes")
    p.add_argument(
        "--prompts", default=None, metavar="FILE", help="prompt set of a text-to-image model (one prompt per line)"
    )
    p.add_argument("--negative-prompt", default=None, metavar="TEXT", help="negative prompt (default: empty)")
    p.add_argument(
        "--guidance",
        type=finite_float,
        default=None,
        metavar="W",
        help="guidance weight (the model's convention, see `bespoke train --help`; default: the model's own)",
    )
    add_run_args(p)
    p.set_defaults(func=cmd_demo, path=None, labels=None)


def nfe_range(text: str) -> tuple[int, int]:
    """--range LO-HI."""
    try:
        return parse_nfe_range(text)
    except BespokeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- steps ---------------------------------------------------------------------------------------


class Clock:
    """Wall time per step, and whether the step's result came from the cache."""

    def __init__(self):
        self.steps: dict[str, tuple[float, bool]] = {}

    def run(self, name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.steps[name] = (time.perf_counter() - t0, False)
        return out

    def cached(self, name: str) -> None:
        self.steps[name] = (0.0, True)


def _key(flow, profile: Profile, kind: str, nfes, seed: int) -> str:
    """A short hash of everything that decides a trained solver: reuse it only when all of it matches."""
    text = json.dumps([flow.fingerprint, flow.name, asdict(profile), kind, sorted(nfes), seed, bespoke.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _ground_truth(clock: Clock, label: str, flow, where: Path, *, num: int, **settings):
    """The GT cache in `where` with at least `num` pairs: made, resumed or extended as needed."""
    try:
        done = len(bespoke.load_gt(where, flow)) >= num
    except BespokeError:
        done = False  # none yet, or damaged: generate_gt says what it does about it
    cache = clock.run(label, lambda: bespoke.generate_gt(flow, where, num=num, **settings))
    if done:
        clock.cached(label)
    return cache


def _learned(flow, kind, nfes, train, val, cache: Path, profile, args, dev, clock: Clock) -> Path:
    """The solver file of `kind` for `nfes` (NFEs, or [(LO, HI)] for one solver for a range): from the cache when
    it holds one for these settings, else trained."""
    stored = cache / f"{_stem(kind)}-{_key(flow, profile, kind, nfes, args.seed)}.safetensors"
    label = f"train {LEARNED[kind]}"
    try:
        load_solvers(stored, flow=flow)
        clock.cached(label)
        say(args, f"{LEARNED[kind]}: reusing {stored}")
        return stored
    except BespokeError:
        pass  # missing or damaged: train it again
    what = ", ".join(f"{n[0]}-{n[1]}" if isinstance(n, tuple) else str(n) for n in nfes)
    say(args, f"{LEARNED[kind]}: training at NFE {what} ...")
    config = bespoke.FitConfig(
        iterations=profile.iterations, val_every=max(10, profile.iterations // 5), seed=args.seed
    )
    if kind.startswith("schedule:"):
        config = dataclasses.replace(config, lr=SCHEDULE_LR)
    clock.run(
        label,
        lambda: train_file(
            flow,
            kind,
            nfes,
            train,
            val,
            stored,
            checkpoints=cache / f"ckpt-{stored.stem}",
            config=config,
            device=dev,
            quiet=args.quiet,
        ),
    )
    return stored


def _publish(src: Path, dst: Path) -> None:
    with atomic_path(dst, "--out") as tmp:
        shutil.copyfile(src, tmp)


def _fd(cells, reference, flow) -> dict | None:
    """FD-digits of every solver's samples and of the ground truth (None unless they are, or a latent model
    decodes them into, 16x16 digit images)."""
    if tuple(flow.sample_shape) != (1, 16, 16) and flow.decode is None:
        return None

    def digits(x):
        return plots.pictures(flow, x).float().cpu()

    with torch.no_grad():
        ref = digits(reference)
        if tuple(ref.shape[1:]) != (1, 16, 16):
            return None
        fd = {"ground truth": bespoke.fd_digits(ref)}
        for c in cells:
            if c.result is not None:
                fd[f"{c.solver}@{c.requested}"] = bespoke.fd_digits(digits(c.result.samples))
    return fd


# --- the evaluation, cached per (solver, NFE) cell ------------------------------------------------


def _solver_id(name: str) -> str:
    """A built-in solver's name, or the SHA-256 of a solver file's bytes."""
    if name in bespoke.SOLVER_NAMES:
        return name
    return "sha256:" + hashlib.sha256(Path(name).read_bytes()).hexdigest()


def _gt_identity(gt) -> dict:
    """What identifies the evaluation pairs: the GT cache's settings and the SHA-256 of the shards they come from."""
    m, stop = gt.manifest, gt.start + len(gt)
    shards = [e["sha256"] for e in m["shards"] if e["start"] < stop and e["stop"] > gt.start]
    return {**{k: m[k] for k in ("seed", "rtol", "atol")}, "start": gt.start, "num": len(gt), "shards": shards}


def _cell_key(flow, gt, solver_id: str, nfe: int, dev: str) -> dict:
    """Everything that decides one evaluation cell: a cached cell is reused only when all of it matches."""
    return {
        "model": model_record(flow),  # name, fingerprint, path, guidance: what a solver file records of it
        "ground_truth": _gt_identity(gt),
        "solver": solver_id,
        "requested_nfe": nfe,
        "device": dev,
        "bespoke_version": bespoke.__version__,
        "torch_version": torch.__version__,
    }


def _cell_path(where: Path, key: dict) -> Path:
    return where / f"cell-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.safetensors"


def _cell_fields() -> list[str]:
    """The fields of `ev.Cell` a cache file holds: all but the solver's name, the NFE asked for and the result."""
    return [f.name for f in fields(ev.Cell) if f.name not in ("solver", "requested", "result")]


def _save_cell(path: Path, key: dict, cell: ev.Cell) -> None:
    """One evaluated cell as safetensors: its samples as a tensor, the rest as JSON metadata (atomic)."""
    r = cell.result
    meta = {
        "key": key,
        "cell": {k: getattr(cell, k) for k in _cell_fields()},
        "result": None if r is None else r.as_dict(),
    }
    save_tensors(path, {} if r is None else {"samples": r.samples.detach().cpu()}, meta)


def _load_cell(path: Path, key: dict, name: str, dev: str) -> ev.Cell | None:
    """The cell cached at `path` for `key`, as `run_eval` makes it; None when missing, stale or damaged (the
    file's checksum covers the samples and the metadata)."""
    if not path.is_file():
        return None
    try:
        tensors, meta, checked = read_tensors(path, "it is recomputed")
        if not checked or meta["key"] != key or sorted(meta["cell"]) != sorted(_cell_fields()):
            return None
        cell = ev.Cell(name, key["requested_nfe"], **meta["cell"])
        if meta["result"] is not None:
            cell.result = bespoke.EvalResult(**dict(meta["result"], solver=name), samples=tensors["samples"].to(dev))
        return cell
    except (BespokeError, OSError, RuntimeError, KeyError, TypeError, ValueError, AttributeError):
        return None  # damaged, or written by another version: evaluate it again


def _evaluation(flow, names, nfes, gt, where: Path, dev: str, args, clock: Clock):
    """`ev.run_eval(..., keep_samples=True)` of every solver at every NFE on the pairs `gt`, reusing the cells
    cached in `where` and caching the ones it evaluates. Returns (cells, the NFEs each solver file holds)."""
    held = ev.file_nfes(names, flow, False)
    ids = {name: _solver_id(name) for name in names}
    keys = {(name, n): _cell_key(flow, gt, ids[name], n, dev) for name in names for n in nfes}
    found = {k: _load_cell(_cell_path(where, key), key, k[0], dev) for k, key in keys.items()}
    missing = [k for k, c in found.items() if c is None]
    say(
        args,
        f"[6/{STEPS}] evaluating every solver at NFE {', '.join(map(str, nfes))} on the evaluation pairs "
        f"({len(keys) - len(missing)} of {len(keys)} cells cached) ...",
    )

    def run():
        noise, reference = gt.noise.to(dev, torch.float64), gt.samples.to(dev)
        cond = {k: v.to(dev) for k, v in gt.cond().items()}
        groups: dict[tuple[int, ...], list[str]] = {}  # solvers by the NFEs they miss: one run_eval each
        for name in names:
            todo = tuple(n for n in nfes if (name, n) in missing)
            if todo:
                groups.setdefault(todo, []).append(name)
        for todo, group in groups.items():
            cells, _ = ev.run_eval(
                flow, group, list(todo), noise, reference, cond, quiet=args.quiet, keep_samples=True, files=held
            )
            for c in cells:
                found[c.solver, c.requested] = c
                _save_cell(_cell_path(where, keys[c.solver, c.requested]), keys[c.solver, c.requested], c)

    if missing:
        clock.run("evaluation", run)
    else:
        clock.cached("evaluation")
    return [found[name, n] for name in names for n in nfes], held


# --- report --------------------------------------------------------------------------------------


def _markdown_table(cells, names, nfes, fmt, best=max) -> list[str]:
    """Solver rows, NFE columns; the best value of each column in bold."""
    by = {(c.solver, c.requested): c for c in cells}
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    values = {k: fmt(c) for k, c in by.items()}
    tops = {}
    for n in nfes:
        col = [v for (s, m), v in values.items() if m == n and v is not None]
        tops[n] = best(col) if col else None
    for name in names:
        row = []
        for n in nfes:
            v = values[name, n]
            text = "–" if v is None else f"{v:.2f}" + ("*" if by[name, n].run_at != n else "")
            row.append(f"**{text}**" if v is not None and v == tops[n] else text)
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def _psnr(c):
    return c.result.psnr_db if c.result is not None else None


def _report(args, profile, cells, names, nfes, fd, learned_solvers, clock, gt_eval) -> str:
    total = sum(t for t, _ in clock.steps.values())
    n_eval = len(gt_eval)
    text = "" if gt_eval.manifest.get("prompts") is None else f" --prompts {gt_eval.manifest['prompts']['source']}"
    text += "" if args.guidance is None else f" --guidance {args.guidance:g}"
    lines = [
        f"# bespoke demo: {args.model}",
        "",
        f"Command: `bespoke demo --model {args.model}{text} --nfe {','.join(map(str, args.nfe))}"
        + (" --fast" if args.fast else "")
        + f" --seed {args.seed}` · {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · bespoke {bespoke.__version__}",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if device(args.device) == 'cuda' else 'CPU'}.",
        "",
        f"Evaluation: {n_eval} samples (noise seed {args.seed}), scored against dopri5 ground truth "
        f"(rtol {gt_eval.manifest['rtol']:g}, atol {gt_eval.manifest['atol']:g}, {gt_eval.nfe} NFE per sample) from "
        f"the same noise. The learned solvers were trained on {profile.train} other pairs (seed {args.seed + 1}) and "
        f"selected on {profile.val} more; no evaluation pair was seen in training.",
        "",
        "## PSNR against ground truth (dB, higher is better)" + (" on latents" if args.latent else ""),
        "",
        *_markdown_table(cells, names, nfes, _psnr),
        "",
        "`*`: the solver ran at the largest NFE it takes below the one asked for; `–`: it cannot run there "
        f"(BNS exists only at the NFEs it was trained for; RK2-Bespoke and the dpm++2m schedule are one solver "
        f"each for every NFE of {args.range[0]}-{args.range[1]}, RK2 at the even ones).",
    ]
    if fd is not None:
        lines += [
            "",
            f"## FD-digits (lower is better; ground truth: {fd['ground truth']:.2f})",
            "",
            "Fréchet distance to the held-out real digits in the feature space of the bundled digits classifier, "
            f"on the same {n_eval} samples (small samples bias FD upward: compare with the ground truth's value).",
            "",
            *_markdown_table(cells, names, nfes, lambda c: fd.get(f"{c.solver}@{c.requested}"), best=min),
        ]
    lines += ["", "## Learned solvers", ""]
    entries = {(kind, entry_key(s)): s for kind, by_nfe in learned_solvers.items() for s in by_nfe.values()}
    lines += [f"- {summary_line(s)}" for s in entries.values()]
    lines += ["", "## Timings", "", "| step | wall time |", "|---|---|"]
    lines += [f"| {k} | {'cached' if c else f'{t:.0f} s'} |" for k, (t, c) in clock.steps.items()]
    lines += [f"| **total** | **{total:.0f} s** |"]
    lines += [
        "",
        "## Pictures",
        "",
        "![PSNR against NFE](psnr_vs_nfe.png)",
        "",
        "![Samples from the same noise](samples.png)",
        "",
        "![Learned times and coefficients](learned.png)",
        "",
        "## Use the solvers",
        "",
        "```",
        *[
            f"bespoke sample --model {args.model} --solver {Path(args.out) / (_stem(kind) + '.safetensors')} "
            f"--nfe {args.nfe[0] if kind not in RANGED else args.range[0]} --num 64 --out samples.safetensors "
            "--grid samples.png"
            for kind in LEARNED
        ],
        f"bespoke eval --model {args.model} --gt {Path(args.out) / 'cache' / 'gt-eval'} --solvers "
        + ",".join(["dpm++2m", *[str(Path(args.out) / (_stem(k) + ".safetensors")) for k in LEARNED]])
        + f" --nfe {','.join(map(str, nfes))}",
        f"bespoke export {Path(args.out) / (_stem('schedule:dpm++2m') + '.safetensors')} --nfe {args.range[0]} "
        "--format json   # the learned schedule in the model's own units, for stock samplers",
        "```",
    ]
    return "\n".join(lines) + "\n"


def _pictures(args, flow, cells, learned_solvers, noise, reference, main_nfe, out) -> str:
    """PSNR-vs-NFE curves, the sample grid and the learned-parameter plot; returns the best dedicated solver.
    learned_solvers: {kind: {NFE: solver}}."""
    at = {(c.solver, c.requested): c for c in cells if c.result is not None and c.run_at == c.requested}
    dedicated = [n for n in bespoke.SOLVER_NAMES if (n, main_nfe) in at]
    if not dedicated:
        raise BespokeError(f"no dedicated solver runs at NFE {main_nfe} on {args.model}; choose another --nfe")
    best = max(dedicated, key=lambda n: at[n, main_nfe].result.psnr_db)
    pictures = plots.is_image(flow.sample_shape) or flow.decode is not None  # latents are drawn decoded
    k = min(GRID_COLUMNS, noise.shape[0]) if pictures else noise.shape[0]
    rows = [(f"{best} (best dedicated)", at[best, main_nfe].result.samples[:k])]
    rows += [
        (label, at[_stem(kind), main_nfe].result.samples[:k])
        for kind, label in LEARNED.items()
        if (_stem(kind), main_nfe) in at
    ]
    results = ev.results_of(cells)
    title = f"{args.model}, {noise.shape[0]} evaluation samples"
    plots.psnr_vs_nfe(
        results,
        out / "psnr_vs_nfe.png",
        title=f"{title}: PSNR against ground truth",
        learned=tuple(map(_stem, LEARNED)),
    )
    plots.sample_grid(
        rows,
        out / "samples.png",
        reference=reference[:k],
        data_range=flow.data_range,
        title=f"{args.model} at NFE {main_nfe}",
        decode=flow.decode,
    )
    plots.learned_parameters(
        (best, bespoke.solver(best, main_nfe)),
        [(LEARNED[kind], by_nfe[main_nfe]) for kind, by_nfe in learned_solvers.items() if main_nfe in by_nfe],
        out / "learned.png",
        flow=flow,
        title=f"{args.model} at NFE {main_nfe}: where each solver evaluates the model, and what learning "
        f"changed in how it combines the evaluations (against {best}, the best dedicated solver here)",
    )

    return best


# --- the command ---------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    t_start = time.perf_counter()
    dev = device(args.device)
    profile = PROFILES["fast" if args.fast else "default"]
    out = Path(args.out)
    cache = out / "cache"
    flow = load_flow(args)
    args.latent = flow.decode is not None
    check_training_budget(flow, [*args.nfe, args.range[1]], max(profile.val, bespoke.FitConfig().batch_size), dev)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BespokeError(f"cannot create --out {out}: {e.strerror or e}") from None
    clock = Clock()
    gt_common = dict(shard_size=profile.shard, device=dev, quiet=args.quiet)

    say(args, f"[1/{STEPS}] ground truth for evaluation: {profile.eval} pairs (dopri5) ...")
    gt_eval = _ground_truth(
        clock, "ground truth, evaluation pairs", flow, cache / "gt-eval", num=profile.eval, seed=args.seed, **gt_common
    ).slice(0, profile.eval)
    n_fit = profile.val + profile.train
    say(args, f"[2/{STEPS}] ground truth for training: {n_fit} pairs with trajectories ...")
    gt_fit = _ground_truth(
        clock,
        "ground truth, training pairs",
        flow,
        cache / "gt-train",
        num=n_fit,
        seed=args.seed + 1,
        trajectory=profile.trajectory,
        **gt_common,
    )
    val, train = gt_fit.slice(0, profile.val), gt_fit.slice(profile.val, n_fit)

    files = {}
    lo, hi = args.range
    for step, kind in enumerate(LEARNED, start=3):
        nfes = [args.range] if kind in RANGED else args.nfe
        what = f"one solver for every NFE of {lo}-{hi}" if kind in RANGED else f"NFE {', '.join(map(str, nfes))}"
        say(args, f"[{step}/{STEPS}] {LEARNED[kind]}: {what}")
        stored = _learned(flow, kind, nfes, train, val, cache, profile, args, dev, clock)
        files[kind] = out / f"{_stem(kind)}.safetensors"
        _publish(stored, files[kind])

    nfes = sorted(set(range(lo, hi + 1)) | set(args.nfe))
    names = list(bespoke.SOLVER_NAMES) + [str(f) for f in files.values()]
    noise = gt_eval.noise.to(dev, torch.float64)
    reference = gt_eval.samples.to(dev)
    cells, held = _evaluation(flow, names, nfes, gt_eval, cache / "eval", dev, args, clock)
    short = {str(f): _stem(kind) for kind, f in files.items()}
    for c in cells:
        c.solver = short.get(c.solver, c.solver)
        if c.result is not None:
            c.result.solver = c.solver
    held = {short.get(k, k): v for k, v in held.items()}
    names = [short.get(n, n) for n in names]
    fd = clock.run("FD-digits", lambda: _fd(cells, reference, flow))

    main_nfe = args.nfe[0]
    learned_solvers = {kind: load_solvers(files[kind], flow=flow) for kind in LEARNED}
    best = clock.run("pictures", lambda: _pictures(args, flow, cells, learned_solvers, noise, reference, main_nfe, out))
    settings = dict(
        ev.cache_settings(gt_eval, cache / "gt-eval"),
        num=noise.shape[0],
        model=args.model,
        data_range=flow.data_range,
        bespoke_version=bespoke.__version__,
    )
    data = ev.eval_json(cells, settings, held)
    data["fd_digits"] = fd
    write_json_atomic(out / "results.json", data, "--out")
    report = _report(args, profile, cells, names, nfes, fd, learned_solvers, clock, gt_eval)
    write_text_atomic(out / "report.md", report, "--out")

    header = ev.header(
        args.model,
        flow,
        noise.shape[0],
        f"GT cache {cache / 'gt-eval'}",
        f"from the GT cache (seed {args.seed})",
        settings,
    )
    print(ev.table(cells, names, nfes, header, flow.data_range, held))
    if fd is not None:
        stems = (best, *map(_stem, LEARNED))
        fds = ", ".join(f"{n} {fd[f'{n}@{main_nfe}']:.1f}" for n in stems if f"{n}@{main_nfe}" in fd)
        print(f"\nFD-digits at NFE {main_nfe}: {fds} (ground truth {fd['ground truth']:.1f})")
    print(
        f"\nwrote {out}/: report.md, results.json, psnr_vs_nfe.png, samples.png, learned.png, "
        f"{', '.join(f.name for f in files.values())} ({time.perf_counter() - t_start:.0f} s)"
    )
    return 0
