"""`bespoke export`: a learned schedule (or a built-in solver's grid) in the units another sampler takes.

bespoke export sched.safetensors --nfe 8 --format timesteps    # diffusers: pipe(..., timesteps=[...])
bespoke export sched.safetensors --nfe 8 --format sigmas       # k-diffusion / ComfyUI SIGMAS (ends in 0)
bespoke export dpm++2m --model zoo:digits-vp --nfe 8 --format json
"""

from __future__ import annotations

import bespoke
from bespoke import BespokeError
from bespoke.export import FORMATS, exported
from bespoke.solvers.files import read_metadata

from .common import positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="print a learned schedule as timesteps or sigmas for diffusers, k-diffusion or ComfyUI",
        description="Print the time grid of a learned schedule (a solver file of kind schedule) or of a built-in "
        "solver at one NFE, in the model's own units.",
    )
    p.add_argument("file", metavar="FILE", help="a schedule file (*.safetensors) or a built-in solver name")
    p.add_argument("--nfe", required=True, type=positive_int, help="the step count to discretise it at")
    p.add_argument("--format", choices=FORMATS, default="timesteps", help="what to print (default timesteps)")
    p.add_argument("--model", default=None, metavar="SPEC", help="the model (default: the one the file was made for)")
    p.add_argument("--path", default=None, help="Gaussian path of an analytic model (as for the other commands)")
    p.add_argument("--force", action="store_true", help="export for another model than the file's anyway")
    p.add_argument("--quiet", action="store_true", help="accepted like every command's; export prints only the list")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if args.file in bespoke.SOLVER_NAMES:
        if args.model is None:
            raise BespokeError(f"exporting the built-in {args.file} needs the model: add --model SPEC")
        flow = bespoke.load_model(args.model, path=args.path, guidance=None)
        solver = bespoke.solver(args.file, args.nfe)
    else:
        record = read_metadata(args.file)["model"]
        spec = args.model or record.get("name")
        if not spec:
            raise BespokeError(f"{args.file} does not name its model: add --model SPEC")
        flow = bespoke.load_model(spec, path=args.path, guidance=None)
        solver = bespoke.load_solver(args.file, args.nfe)
        mine = record["fingerprint"]
        if mine != flow.fingerprint and not args.force:
            raise BespokeError(
                f"{args.file} was trained for the model with fingerprint {mine}, but {spec} has {flow.fingerprint}; "
                "pass the model it was made for with --model, or force it (--force)"
            )
    print(exported(solver, flow, args.format))
    return 0
