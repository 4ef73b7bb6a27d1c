"""`bespoke sample`: draw samples with a built-in or learned solver, into a safetensors file (and a PNG).

    bespoke sample --model zoo:digits-ot --solver bns.safetensors --nfe 8 --num 64 --seed 0 --out s.safetensors
    bespoke sample --model zoo:digits-ot --solver dpm++2m --nfe 8 --noise noise.safetensors --out s.safetensors

Sample i depends only on (seed, i) and the solver: the same seed gives the same samples whatever the
--batch-size. The states run in float64; --out holds `noise`, `samples` (and `labels`) in --dtype.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

import bespoke
from bespoke import BespokeError
from bespoke.noise import draw_noise
from bespoke.solvers import METHODS, largest_valid_nfe
from bespoke.solvers.files import load_solver

from .common import (
    add_model_args,
    add_run_args,
    check_writable,
    conditioning,
    device,
    is_solver_file,
    load_flow,
    positive_int,
    read_noise,
    say,
    write_samples,
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


def sample_batches(solver, flow, noise, cond, batch_size: int, quiet: bool) -> torch.Tensor:
    """`solver` on `noise` in batches; every sample depends only on its own noise (and labels)."""
    out = []
    with torch.no_grad(), tqdm(total=noise.shape[0], desc="sample", unit="sample", disable=quiet) as bar:
        for a in range(0, noise.shape[0], batch_size):
            part = {k: v[a : a + batch_size] for k, v in cond.items()}
            out.append(solver.sample(flow, noise[a : a + batch_size], **part))
            bar.update(out[-1].shape[0])
    return torch.cat(out)


def cmd_sample(args) -> int:
    t0 = time.perf_counter()
    dev = device(args.device)
    check_writable(args.out, "--out")
    if args.grid is not None:
        check_writable(args.grid, "--grid")
    flow = load_flow(args)
    solver = pick_solver(args.solver, args.nfe, flow, args.force)
    if args.noise is not None:
        noise, labels = read_noise(args.noise, flow)
        if labels is not None and args.labels is not None:
            raise BespokeError(f"--labels: {args.noise} carries its own labels; drop --labels")
        cond = {"labels": labels} if labels is not None else conditioning(args, flow, noise.shape[0])[0]
        source = args.noise
    else:
        noise = flow.initial_state(draw_noise(flow.sample_shape, args.num, args.seed, dtype=torch.float64))
        cond = conditioning(args, flow, args.num)[0]
        source = f"seed {args.seed}"
    noise = noise.to(dev, torch.float64)
    cond = {k: v.to(dev) for k, v in cond.items()}
    samples = sample_batches(solver, flow, noise, cond, args.batch_size, args.quiet)
    dtype = getattr(torch, args.dtype)
    tensors = {"noise": noise.to(dtype), "samples": samples.to(dtype), **cond}
    meta = {
        "model": flow.name,
        "solver": args.solver,
        "nfe": solver.nfe,
        "source": source,
        "bespoke_version": bespoke.__version__,
    }
    write_samples(args.out, tensors, meta)
    say(args, f"wrote {args.out}")
    if args.grid is not None:
        from bespoke.plots import image_grid

        image_grid(
            samples[:GRID_MAX],
            args.grid,
            data_range=flow.data_range,
            title=f"{flow.name}: {args.solver}, NFE {solver.nfe} ({source})",
            captions=[f"label {k}" for k in cond["labels"][:GRID_MAX].tolist()] if "labels" in cond else None,
        )
        say(args, f"wrote {args.grid}")
    print(
        f"{noise.shape[0]} samples of {flow.name} with {args.solver} at NFE {solver.nfe} -> {args.out} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0
