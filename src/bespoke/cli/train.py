"""`bespoke train`: learn BNS or Bespoke (RK1/RK2) solvers, or a learned schedule, and write them to one file.

    bespoke train --model zoo:digits-ot --solver bns --nfe 4,8,16 --out bns.safetensors
                  [--gt GT_DIR] [--init SOLVER] [--precondition SIGMA0] [--resume]
    bespoke train --model zoo:digits-vp --solver schedule:dpm++2m --nfe 4-16 --out sched.safetensors
    bespoke train --model zoo:digits-ot --solver bespoke-rk2 --nfe 4-16 --out rk2.safetensors   (NFE-agnostic)
    bespoke train --model zoo:digits-t2i --prompts P.txt --solver bns --nfe 8 --guidance-scales 1,2,3,5,8
                  [--anchors 1,3,8] --out guided.safetensors     (one solver for every guidance scale in 1-8)

Validation pairs are the first --val-samples of the GT cache, training pairs the next --train-samples.
Without --gt the pairs are made (or reused) in OUT.gt/ (per guidance scale W: OUT.gt/wW/, and --gt DIR
means DIR/wW/). Every validation writes a checkpoint to
OUT.ckpt/; a killed run continues with --resume and ends where an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import bespoke
from bespoke import BespokeError, budget, distributed
from bespoke.solvers.files import KINDS
from bespoke.solvers.ranged import Ranged, parse_nfe_range
from bespoke.solvers.schedule import SCHEDULE_BASES
from bespoke.train.bns import BNS_ITERATIONS
from bespoke.train.schedule import SCHEDULE_ITERATIONS, SCHEDULE_LR

from .common import (
    add_model_args,
    add_run_args,
    check_writable,
    device,
    finite_float,
    int_list,
    load_flow,
    positive_float,
    positive_int,
    say,
)

TRAJECTORY = 65  # dense GT times per sample (Bespoke training; BNS's least-squares starts)
BESPOKE_ITERATIONS = 300


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train BNS or Bespoke solvers and write a solver file",
        description="Train a learned solver per NFE on ground-truth pairs and write them into one solver file "
        "(safetensors + JSON metadata).",
    )
    add_model_args(p, labels=False)
    p.add_argument(
        "--solver",
        required=True,
        type=solver_kind,
        metavar="KIND",
        help=f"what to learn: {', '.join(LEARNED)}, or schedule:METHOD (the time grid of a built-in method for a "
        f"range of NFEs; METHOD one of {', '.join(SCHEDULE_BASES)})",
    )
    p.add_argument(
        "--nfe",
        required=True,
        metavar="N,N,... | LO-HI",
        help="one solver per NFE, e.g. 4,8,16; or a range, e.g. 4-16: one solver for every NFE in it "
        "(schedule:METHOD, and NFE-agnostic bespoke-rk1/rk2)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the solver file to write (*.safetensors)")
    p.add_argument("--gt", metavar="GT_DIR", default=None, help="GT cache to train on (default: made in OUT.gt/)")
    p.add_argument(
        "--init",
        default="auto",
        metavar="SOLVER",
        help="bns: auto (best dedicated solver), a solver name or KIND:FILE; bespoke-rk*: auto, identity or a "
        "path name (condot, cosine, vp, edm); schedule:*: auto (the best fixed grid at each end of the range) or "
        "the grid to warp (uniform, quadratic, logsnr, edm)",
    )
    p.add_argument(
        "--guidance-scales",
        type=scale_list,
        default=None,
        metavar="W,W,...",
        help="bns: one solver for every guidance scale between the lowest and highest of these, trained on GT pairs "
        "at each (in the model's --guidance convention); sample it with any --guidance W in that range",
    )
    p.add_argument(
        "--anchors",
        type=scale_list,
        default=None,
        metavar="W,W,...",
        help="with --guidance-scales: the scales that hold parameters (default: all of them); the solver interpolates "
        "between them, and the scales between anchors train the interpolation",
    )
    p.add_argument(
        "--precondition", type=positive_float, default=1.0, metavar="SIGMA0", help="bns preconditioning σ₀ (default 1)"
    )
    p.add_argument(
        "--loss",
        choices=("bound", "lte", "rmse"),
        default=None,
        help="bespoke-rk* loss (default: bound; rmse for a range of NFEs)",
    )
    p.add_argument("--val-samples", type=positive_int, default=256, help="validation pairs (default 256)")
    p.add_argument(
        "--train-samples", type=positive_int, default=None, help="training pairs (default 512; with --gt: the rest)"
    )
    p.add_argument(
        "--iterations",
        type=positive_int,
        default=None,
        help=f"Adam iterations per solver (default {BNS_ITERATIONS} for bns, after its least-squares start; "
        f"{BESPOKE_ITERATIONS} for bespoke-rk*; {SCHEDULE_ITERATIONS} for schedule:*)",
    )
    p.add_argument("--batch-size", type=positive_int, default=40, help="pairs per iteration (default 40)")
    lr_help = f"peak learning rate (default 0.01; {SCHEDULE_LR:g} for schedule:*)"
    p.add_argument("--lr", type=finite_float, default=None, help=lr_help)
    p.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute each step's network pass in the backward pass: memory flat in NFE, ~1.5x the time",
    )
    p.add_argument("--force", action="store_true", help="use a GT cache or init file made for another model anyway")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in OUT.ckpt/")
    add_run_args(p)
    p.set_defaults(func=cmd_train)


LEARNED = tuple(k for k in KINDS if k != "schedule")  # --solver names besides schedule:METHOD
RANGED = ("schedule", "bespoke-rk1", "bespoke-rk2")  # kinds that take --nfe LO-HI


def solver_kind(text: str) -> str:
    """--solver: a learned kind, or schedule:METHOD."""
    if text in LEARNED:
        return text
    kind, _, base = text.partition(":")
    if kind == "schedule" and base in SCHEDULE_BASES:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown solver kind {text!r}; valid: {', '.join(LEARNED)}, schedule:METHOD with METHOD one of "
        f"{', '.join(SCHEDULE_BASES)}"
    )


def scale_list(text: str) -> list[float]:
    """--guidance-scales / --anchors: 2 or more distinct finite numbers."""
    try:
        values = sorted({float(v) for v in text.split(",")})
    except ValueError:
        values = []
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected 2 or more guidance scales, e.g. 1,2,3,5,8; got {text!r}")
    return values


def nfes_for(kind: str, text: str) -> list:
    """--nfe for `kind`: a list of NFEs (one solver each), or [(LO, HI)]: a range (a schedule always is one)."""
    base = kind.partition(":")[0]
    if base == "schedule" or ("-" in text and base in RANGED):
        return [parse_nfe_range(text)]
    if "-" in text:
        raise BespokeError(
            f"--nfe {text}: a range is for --solver schedule:METHOD and bespoke-rk1/rk2; {kind} trains one solver "
            "per NFE, so list them (e.g. 4,8,16)"
        )
    try:
        return int_list(text)
    except argparse.ArgumentTypeError as e:
        raise BespokeError(f"--nfe: {e}") from None


def train_file(
    flow,
    kind: str,
    nfes,
    train,
    val,
    out,
    *,
    checkpoints,
    init="auto",
    sigma0=1.0,
    loss=None,
    config=None,
    grad_checkpoint=False,
    device=None,
    quiet=False,
) -> list:
    """Train one `kind` solver per NFE (or one per (LO, HI) range), checkpointing in `checkpoints/`, and write
    them all to `out`."""
    solvers, mine = [], [Path(checkpoints) / checkpoint_name(kind, nfe) for nfe in nfes]
    for nfe, ckpt in zip(nfes, mine):
        common = dict(config=config, checkpoint=ckpt, grad_checkpoint=grad_checkpoint, device=device, quiet=quiet)
        if kind.startswith("schedule:"):
            s = bespoke.train_schedule(flow, train, val, kind.partition(":")[2], nfe, init=init, **common)
        elif kind == "bns":
            s = bespoke.train_bns(flow, train, val, nfe, init=init, sigma0=sigma0, **common)
        else:
            s = bespoke.train_bespoke(flow, train, val, nfe, order=int(kind[-1]), init=init, loss=loss, **common)
        solvers.append(s.cpu())
    if distributed.is_main():  # every rank holds the same solvers; one writes them
        bespoke.save_solvers(out, solvers, flow)
        discard_checkpoints(checkpoints, mine)
    distributed.barrier()
    return solvers


def checkpoint_name(kind: str, nfe) -> str:
    """The checkpoint file of one solver: KIND-nfeN.pt, or KIND-nfeLO-HI.pt for a range (schedule:M: schedule-M)."""
    if isinstance(nfe, tuple):
        return f"{kind.replace(':', '-')}-nfe{nfe[0]}-{nfe[1]}.pt"
    return f"{kind}-nfe{nfe}.pt"


def discard_checkpoints(folder, finished) -> None:
    """Delete the checkpoints of the solvers just written, and the folder once nothing else is in it: the
    checkpoints of another run there (other NFEs or kinds, still unfinished) are never touched."""
    for ckpt in map(Path, finished):
        ckpt.unlink(missing_ok=True)
        ckpt.with_name(ckpt.name + ".tmp").unlink(missing_ok=True)  # left by a kill during a checkpoint write
    with contextlib.suppress(OSError):  # not empty: another run's checkpoints stay
        Path(folder).rmdir()


def check_training_budget(flow, nfes, batch: int, dev: str) -> None:
    """Refuse, before any pairs are made, an NFE whose training states cannot fit in memory."""
    need = budget.training_bytes(max(nfes), batch, math.prod(flow.sample_shape))
    what = f"training a solver at NFE {max(nfes)} on batches of {batch} pairs"
    budget.require(need, what=what, fix="lower --nfe (or --batch-size and --val-samples)", device=dev)


def summary_line(s) -> str:
    t = s.training_summary
    kind = f"schedule:{s.base}" if s.kind == "schedule" else s.kind
    what = f"{kind} NFE {s.range_text()}" if isinstance(s, Ranged) else f"{kind} NFE {s.nfe}"
    return (
        f"{what}: {t['val_psnr_init']:.2f} dB ({t['init']}) -> {t['val_psnr']:.2f} dB on "
        f"{t['val_pairs']} validation pairs; {t['iterations']} iterations on {t['train_pairs']} pairs, "
        f"{t['seconds']:.0f} s"
    )


def extend_command(args, cache, num: int) -> str:
    """The `bespoke gt` command that extends `cache` to `num` pairs: the settings it was made with."""
    m = cache.manifest
    words = ["bespoke gt", f"--model {args.model}", f"--num {num}", f"--seed {m['seed']}"]
    words += [f"--shard-size {m['shard_size']}", f"--rtol {m['rtol']:g}", f"--atol {m['atol']:g}"]
    if m.get("trajectory"):
        words.append(f"--trajectory {m['trajectory']}")
    words += [f"--{k} {getattr(args, k)}" for k in ("path", "guidance") if getattr(args, k, None) is not None]
    return " ".join([*words, f"--out {cache.path}"])


def _pairs(args, flow, dev, sub: str = ""):
    """(train, val) slices of the GT cache of --gt, or of OUT.gt/ made here (in their folder `sub` if given)."""
    if args.gt is None:
        num = args.val_samples + (512 if args.train_samples is None else args.train_samples)
        gt_dir = str(Path(f"{args.out}.gt") / sub)
        trajectory = _trajectory(args, flow, num, Path(gt_dir))
        say(args, f"ground truth: {num} pairs in {gt_dir} (reused when present) ...")
        cache = bespoke.generate_gt(
            flow, gt_dir, num=num, seed=args.seed, trajectory=trajectory, device=dev, quiet=args.quiet
        )
    else:
        cache = bespoke.load_gt(Path(args.gt) / sub, flow, force=args.force)
    v = args.val_samples
    stop = len(cache) if args.train_samples is None else v + args.train_samples
    need = max(stop, v + 1)  # at least one training pair
    if need > len(cache):
        asked = f"--val-samples {v}" + (f" and --train-samples {args.train_samples}" if args.train_samples else "")
        raise BespokeError(
            f"the GT cache {cache.path} holds {len(cache)} pairs, but {asked} need {need}: extend it with "
            f"`{extend_command(args, cache, need)}` or ask for fewer"
        )
    return cache.slice(v, stop), cache.slice(0, v)


BNS_TRAJECTORY_BYTES = 2 << 30  # above this, BNS's GT keeps endpoints only (no least-squares starts)


def _trajectory(args, flow, num: int, gt_dir: Path) -> int:
    """Dense trajectory times for a GT cache made here: TRAJECTORY for Bespoke. BNS trains on endpoints alone
    (only its least-squares starts need trajectories) and a schedule needs none, so both keep the setting of a
    cache already there; a new one for a schedule has none, and BNS does without them where they would take
    more than BNS_TRAJECTORY_BYTES (large latents)."""
    if args.solver.startswith("bespoke-rk"):
        return TRAJECTORY
    if (gt_dir / "manifest.json").is_file():
        with contextlib.suppress(Exception):  # unreadable: generate_gt gives the precise error
            return int(json.loads((gt_dir / "manifest.json").read_text()).get("trajectory", 0))
    if args.solver != "bns":
        return 0
    size = num * math.prod(flow.sample_shape) * 4 * 2 * TRAJECTORY  # states and velocities in float32
    if size > BNS_TRAJECTORY_BYTES:
        say(args, f"dense trajectories would take {size / 2**30:.1f} GiB: BNS starts from dedicated solvers only")
        return 0
    return TRAJECTORY


def _other_checkpoints(folder: Path, kind: str, nfes) -> list[str]:
    """The files in the checkpoint folder that this run neither resumes nor writes."""
    mine = {checkpoint_name(kind, n) for n in nfes}
    return sorted(p.name for p in folder.iterdir() if p.name not in mine) if folder.is_dir() else []


def cmd_train(args) -> int:
    t0 = time.perf_counter()
    dev = device(args.device)
    if args.solver != "bns" and args.precondition != 1.0:
        raise BespokeError("--precondition applies to --solver bns only")
    nfes = nfes_for(args.solver, args.nfe)
    most = max(n[1] if isinstance(n, tuple) else n for n in nfes)
    check_writable(args.out, "--out")
    checkpoints = Path(f"{args.out}.ckpt")
    if checkpoints.is_dir() and any(checkpoints.iterdir()) and not args.resume:
        raise BespokeError(
            f"{checkpoints} holds checkpoints of an unfinished run: add --resume to continue it, or delete it"
        )
    others = _other_checkpoints(checkpoints, args.solver, nfes)
    if others:
        say(args, f"{checkpoints} also holds unfinished checkpoints of another run ({', '.join(others)}): kept")
    if args.guidance_scales is not None or args.anchors is not None:
        return cmd_train_guided(args, dev, nfes, checkpoints, t0)
    flow = load_flow(args)
    check_training_budget(flow, [most], max(args.batch_size, args.val_samples), dev)
    train, val = _pairs(args, flow, dev)
    default = {"bns": BNS_ITERATIONS, "schedule": SCHEDULE_ITERATIONS}.get(args.solver.partition(":")[0])
    iterations = args.iterations or default or BESPOKE_ITERATIONS
    lr = SCHEDULE_LR if args.solver.startswith("schedule:") else bespoke.FitConfig.lr
    lr = lr if args.lr is None else args.lr
    config = bespoke.FitConfig(iterations=iterations, batch_size=args.batch_size, lr=lr, seed=args.seed)
    solvers = train_file(
        flow,
        args.solver,
        nfes,
        train,
        val,
        args.out,
        checkpoints=checkpoints,
        init=args.init,
        sigma0=args.precondition,
        loss=args.loss,
        config=config,
        grad_checkpoint=args.grad_checkpoint,
        device=dev,
        quiet=args.quiet,
    )
    for s in solvers:
        print(summary_line(s))
    served = ", ".join(f"NFE {s.range_text() if isinstance(s, Ranged) else s.nfe}" for s in solvers)
    print(f"wrote {args.out} ({served}) in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_train_guided(args, dev, nfes, checkpoints: Path, t0: float) -> int:
    """--guidance-scales: one guided BNS solver per NFE, on GT pairs at every scale (OUT.gt/wW/ or --gt DIR/wW/)."""
    if args.guidance_scales is None:
        raise BespokeError("--anchors goes with --guidance-scales W,W,... (the scales to train on)")
    if args.solver != "bns" or args.guidance is not None:
        raise BespokeError(
            "--guidance-scales trains --solver bns for a range of scales; drop --guidance (it fixes one scale)"
        )
    flows, pairs = {}, {}
    for w in args.guidance_scales:
        flows[w] = load_flow(argparse.Namespace(**{**vars(args), "guidance": w}))
        say(args, f"guidance scale {w:g}:")
        pairs[w] = _pairs(args, flows[w], dev, f"w{w:g}")
    first = flows[args.guidance_scales[0]]
    check_training_budget(first, [max(nfes)], max(args.batch_size, args.val_samples), dev)
    config = bespoke.FitConfig(
        iterations=args.iterations or BNS_ITERATIONS, batch_size=args.batch_size, lr=args.lr or 1e-2, seed=args.seed
    )
    solvers = []
    for nfe in nfes:
        s = bespoke.train_bns_guided(
            flows,
            pairs,
            nfe,
            anchors=args.anchors,
            init=args.init,
            sigma0=args.precondition,
            config=config,
            checkpoint=checkpoints / f"bns-guided-nfe{nfe}",
            grad_checkpoint=args.grad_checkpoint,
            device=dev,
            quiet=args.quiet,
        )
        solvers.append(s.cpu())
        by = s.training_summary["val_psnr_by_guidance"]
        cells = ", ".join(f"w={w}: {v[1]:.2f}" for w, v in by.items())
        print(f"bns NFE {nfe} for guidance {s.range_text()}: {cells} dB on the validation pairs")
    bespoke.save_solvers(args.out, solvers, first)
    discard_checkpoints(checkpoints, [p for p in checkpoints.glob("bns-guided-*")] if checkpoints.is_dir() else [])
    print(
        f"wrote {args.out} (NFE {', '.join(map(str, nfes))}, guidance {solvers[0].range_text()}) in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return 0
