"""`bespoke sample`: draw samples with a built-in or learned solver, into a safetensors file (and a PNG).

    bespoke sample --model zoo:digits-ot --solver bns.safetensors --nfe 8 --num 64 --seed 0 --out s.safetensors
    bespoke sample --model zoo:digits-ot --solver dpm++2m --nfe 8 --noise noise.safetensors --out s.safetensors

Noise i depends only on (seed, i): the same seed gives the same noise whatever the --batch-size, and
the same samples up to the network's float32 rounding, which depends on the batch size (differences of
about 1e-5 on the digits models). The states run in float64 one batch at a time, and each batch goes
straight to --out (`noise`, `samples` and `labels` in --dtype), so memory does not grow with --num.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from tqdm import tqdm

import bespoke
from bespoke import BespokeError, budget
from bespoke.io import StreamedTensors
from bespoke.noise import draw_noise
from bespoke.solvers import METHODS, largest_valid_nfe
from bespoke.solvers.files import load_solver
from bespoke.solvers.learned import Learned

from .common import (
    NoiseFile,
    add_model_args,
    add_run_args,
    check_picture_path,
    check_writable,
    conditioning,
    device,
    is_solver_file,
    load_flow,
    positive_int,
    say,
)

GRID_MAX = 64


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample with a solver (name or solver file) into a safetensors file",
        description="Solve the model from noise (drawn from --seed, or read from --noise) with one solver.",
    )
    add_model_args(p)
    p.add_argument("--solver", required=True, metavar="NAME|FILE", help="a built-in solver name or a solver file")
    p.add_argument("--nfe", type=positive_int, default=None, help="NFE (a solver file with one NFE needs none)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--noise", metavar="IN.safetensors", help="initial noise (a 'noise' tensor, optional 'labels')")
    src.add_argument("-n", "--num", type=positive_int, help="number of samples to draw from --seed")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="where to write noise, samples, labels")
    p.add_argument("--grid", metavar="PNG", default=None, help=f"also draw the first {GRID_MAX} samples as a grid")
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (default 256)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype of --out's tensors")
    p.add_argument("--force", action="store_true", help="use a solver file made for another model anyway")
    add_run_args(p)
    p.set_defaults(func=cmd_sample)


def pick_solver(name: str, nfe: int | None, flow, force: bool):
    """A built-in solver at exactly `nfe`, or the solver for `nfe` in a file (its only one when nfe is None)."""
    if name not in bespoke.SOLVER_NAMES:
        if not is_solver_file(name):
            raise BespokeError(
                f"unknown solver {name!r}; valid names: {', '.join(bespoke.SOLVER_NAMES)}, or a solver file "
                "(*.safetensors) made by `bespoke train`"
            )
        return load_solver(name, nfe, flow=flow, force=force)
    if nfe is None:
        raise BespokeError(f"--solver {name} needs --nfe N")
    if largest_valid_nfe(name, nfe) != nfe:
        hint = largest_valid_nfe(name, nfe)
        raise BespokeError(
            f"--solver {name} cannot run at NFE {nfe}; it takes {METHODS[name].nfe_rule()}"
            + (f" (e.g. --nfe {hint})" if hint else "")
        )
    return bespoke.solver(name, nfe)


def _check_budget(args, flow, solver, num: int, dev: str) -> None:
    """Refuse, before any work, a batch whose solve cannot fit in memory or an --out that cannot fit on disk."""
    numel = math.prod(flow.sample_shape)
    batch = min(args.batch_size, num)
    need = budget.solve_bytes(solver.nfe, batch, numel, history=isinstance(solver, Learned))  # NS form: all u_j
    what = f"sampling at NFE {solver.nfe} in batches of {batch}"
    budget.require(need, what=what, fix="lower --batch-size (or --nfe)", device=dev)
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    budget.require(
        num * (2 * numel * itemsize + 8),
        what=f"--out {args.out} with {num} samples (noise and samples in {args.dtype})",
        fix="ask for fewer samples or write to another disk" + (", or use --dtype float32" if itemsize > 4 else ""),
        disk=args.out,
    )


def cmd_sample(args) -> int:
    t0 = time.perf_counter()
    dev = device(args.device)
    check_writable(args.out, "--out")
    if args.grid is not None:
        check_writable(args.grid, "--grid")
        check_picture_path(args.grid, "--grid")
    flow = load_flow(args)
    solver = pick_solver(args.solver, args.nfe, flow, args.force)
    noise_file = NoiseFile(args.noise, flow) if args.noise is not None else None
    if noise_file is not None and noise_file.has_labels and args.labels is not None:
        raise BespokeError(f"--labels: {args.noise} carries its own labels; drop --labels")
    num = noise_file.num if noise_file is not None else args.num
    source = args.noise if noise_file is not None else f"seed {args.seed}"
    _check_budget(args, flow, solver, num, dev)

    def noise_of(a: int, b: int) -> torch.Tensor:
        """The state at t = 0 of samples a..b-1, in float64."""
        if noise_file is not None:
            return noise_file.noise(a, b).to(torch.float64)
        return flow.initial_state(draw_noise(flow.sample_shape, b - a, args.seed, dtype=torch.float64, start=a))

    def cond_of(a: int, b: int) -> dict:
        if noise_file is not None and noise_file.has_labels:
            return {"labels": noise_file.labels(a, b)}
        return conditioning(args, flow, b - a, start=a)[0]

    dtype = getattr(torch, args.dtype)
    layout = {"noise": ((num, *flow.sample_shape), dtype), "samples": ((num, *flow.sample_shape), dtype)}
    if cond_of(0, 1):
        layout["labels"] = ((num,), torch.long)
    meta = {"model": flow.name, "solver": args.solver, "nfe": solver.nfe, "source": source}
    meta["bespoke_version"] = bespoke.__version__
    shown, shown_labels = [], []
    bar = tqdm(total=num, desc="sample", unit="sample", disable=args.quiet, file=sys.stderr, leave=False)
    with StreamedTensors(args.out, layout, {"bespoke": json.dumps(meta)}) as out, torch.no_grad(), bar:
        for a in range(0, num, args.batch_size):
            b = min(a + args.batch_size, num)
            noise, cond = noise_of(a, b), cond_of(a, b)
            samples = solver.sample(flow, noise.to(dev), **{k: v.to(dev) for k, v in cond.items()})
            out.write("noise", a, noise.to(dtype))
            out.write("samples", a, samples.to("cpu", dtype))
            if "labels" in layout:
                out.write("labels", a, cond["labels"])
            if a < GRID_MAX:
                shown.append(samples[: GRID_MAX - a].cpu())
                shown_labels += cond.get("labels", torch.empty(0))[: GRID_MAX - a].tolist()
            bar.update(b - a)
    say(args, f"wrote {args.out}")
    if args.grid is not None:
        from bespoke.plots import captions, image_grid, pictures

        image_grid(
            pictures(flow, torch.cat(shown)),
            args.grid,
            data_range=flow.data_range,
            title=f"{flow.name}: {args.solver}, NFE {solver.nfe} ({source})",
            captions=captions(flow, shown_labels) if "labels" in layout else None,
        )
        say(args, f"wrote {args.grid}")
    print(
        f"{num} samples of {flow.name} with {args.solver} at NFE {solver.nfe} -> {args.out} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0
