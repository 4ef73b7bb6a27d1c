"""The `bespoke` command (DESIGN §5).

    bespoke eval --model zoo:gmm2d --solvers all --nfe 4,8,16 [--json OUT.json]

Exit codes: 0 success; 2 bad input (one line `bespoke: error: ...` on stderr); 1 internal error
(one line; the traceback too when BESPOKE_DEBUG=1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
from tqdm import tqdm

import bespoke
from bespoke import BespokeError
from bespoke.flows import GUIDANCE_CONVENTIONS
from bespoke.noise import draw_labels, draw_noise
from bespoke.paths import SCHEDULERS
from bespoke.solvers import METHODS, largest_valid_nfe
from bespoke.solvers.files import load_solver, load_solvers

__all__ = ["main", "build_parser"]


# --- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `bespoke: error: <message> (see 'bespoke eval --help')`, exit 2."""

    def error(self, message):
        _print_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            n = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers >= 1 (e.g. 4,8,16), got {text!r}"
            ) from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"every NFE must be >= 1, got {n}")
        if n not in out:
            out.append(n)
    return out


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _finite_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def _positive_float(text: str) -> float:
    x = _finite_float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return x


def _labels(text: str):
    if text == "random":
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"expected a class label (an integer >= 0) or 'random', got {text!r}")
    return k


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bespoke", description="Learned few-step ODE solvers for pre-trained diffusion and flow models."
    )
    parser.add_argument("--version", action="version", version=f"bespoke {bespoke.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ev = sub.add_parser(
        "eval",
        help="compare solvers against ground truth (PSNR table)",
        description="Evaluate solvers at several NFE against dopri5 ground truth from the same noise; "
        "print a PSNR table (dB) and optionally write the eval JSON.",
    )
    ev.add_argument("--model", required=True, metavar="SPEC", help="model spec, e.g. zoo:gmm2d")
    ev.add_argument(
        "--solvers",
        required=True,
        metavar="all|A,B,...",
        help=f"'all' or comma-separated names from: {', '.join(bespoke.SOLVER_NAMES)}, or solver files (*.safetensors)",
    )
    ev.add_argument("--force", action="store_true", help="use solver files made for another model anyway")
    ev.add_argument("--nfe", required=True, type=_int_list, metavar="N,N,...", help="NFE values, e.g. 4,8,16")
    ev.add_argument("--num", type=_positive_int, default=1000, help="number of samples (default 1000)")
    ev.add_argument("--seed", type=_int, default=0, help="noise seed (default 0)")
    ev.add_argument(
        "--path",
        default=None,
        choices=list(SCHEDULERS),
        help="Gaussian path of the analytic models (default condot); trained models keep their own",
    )
    ev.add_argument(
        "--guidance",
        type=_finite_float,
        default=None,
        metavar="W",
        help="classifier-free guidance weight, fm convention (1+w)*cond - w*uncond; needs --labels",
    )
    ev.add_argument(
        "--labels",
        type=_labels,
        default=None,
        metavar="K|random",
        help="class label K for every sample, or 'random' (labels drawn from the seed)",
    )
    ev.add_argument("--rtol", type=_positive_float, default=1e-5, help="ground-truth dopri5 rtol (default 1e-5)")
    ev.add_argument("--atol", type=_positive_float, default=1e-5, help="ground-truth dopri5 atol (default 1e-5)")
    ev.add_argument("--json", metavar="OUT.json", default=None, help="write the results as eval JSON")
    ev.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    ev.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available, else cpu"
    )
    ev.set_defaults(func=cmd_eval)
    return parser


# --- helpers --------------------------------------------------------------------------------------


def _print_error(message: str) -> None:
    print(f"bespoke: error: {' '.join(str(message).split())}", file=sys.stderr)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BespokeError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return name


def _is_solver_file(name: str) -> bool:
    return name.endswith(".safetensors") or os.path.isfile(name)


def _solver_names(text: str) -> list[str]:
    """Built-in names ('all' = every one) and solver files, in order, without repeats."""
    if text.strip() == "all":
        return list(bespoke.SOLVER_NAMES)
    names = []
    for name in (n.strip() for n in text.split(",")):
        if name not in bespoke.SOLVER_NAMES and not _is_solver_file(name):
            raise BespokeError(
                f"unknown solver {name!r} in --solvers; valid names: {', '.join(bespoke.SOLVER_NAMES)} "
                "(or 'all'), or a solver file (*.safetensors) made by `bespoke train`"
            )
        if name not in names:
            names.append(name)
    return names


def _file_nfes(names: list[str], flow, force: bool) -> dict[str, list[int]]:
    """The NFEs each solver file holds, after checking the file is valid and made for this model."""
    return {n: sorted(load_solvers(n, flow=flow, force=force)) for n in names if n not in bespoke.SOLVER_NAMES}


def _check_writable(path: str) -> None:
    """Fail now, not after the evaluation, if `path` cannot be written (same test as the final write)."""
    if os.path.isdir(path):
        raise BespokeError(f"cannot write --json {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".bespoke-", suffix=".tmp")
    except OSError as e:
        raise BespokeError(f"cannot write --json {path}: {e.strerror or e} ({parent})") from None
    os.close(fd)
    os.unlink(tmp)


def _write_json_atomic(path: str, obj) -> None:
    """Write to a temporary file in the same directory, then rename over `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it an ordinary file's mode
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise BespokeError(f"cannot write --json {path}: {e.strerror or e}") from None


def _conditioning(args, flow) -> tuple[dict, str | None]:
    """The `labels` keyword for every call, and how to describe it (None when unconditional)."""
    if args.labels is None:
        if flow.guidance is not None:
            raise BespokeError(
                f"{args.model} samples with guidance (w={flow.guidance.weight:g}), which needs class labels: "
                "add --labels K (one class for all) or --labels random"
            )
        return {}, None
    if "labels" not in flow.cond_keys:
        raise BespokeError(f"--labels: {args.model} is not class-conditional (it takes no labels)")
    n = flow.num_classes
    if args.labels == "random":
        if n is None:
            raise BespokeError(f"--labels random: {args.model} does not say how many classes it has; pass --labels K")
        return {"labels": draw_labels(args.num, n, args.seed)}, f"random 0..{n - 1}"
    if n is not None and args.labels >= n:
        raise BespokeError(f"--labels {args.labels}: {args.model} has classes 0..{n - 1}")
    return {"labels": torch.full((args.num,), args.labels, dtype=torch.long)}, str(args.labels)


@dataclass
class _Cell:
    solver: str
    requested: int
    run_at: int | None  # None: no valid NFE <= requested
    result: bespoke.EvalResult | None = None
    error: str | None = None


def _nfe_rule(name: str, files: dict | None = None) -> str:
    method = METHODS.get(name)
    if method is not None:
        return method.nfe_rule()
    if files and name in files:
        return f"the NFEs in the file: {', '.join(map(str, files[name]))}"
    return "other NFE"


# --- output ---------------------------------------------------------------------------------------


def _table(cells: list[_Cell], names: list[str], nfes: list[int], header: str, data_range: float, files=None) -> str:
    by = {(c.solver, c.requested): c for c in cells}

    def text(c: _Cell) -> str:
        if c.run_at is None:
            return "- "
        if c.error is not None:
            return "err "
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
            notes.append(f"* {name} ran at NFE {pairs}: it takes {_nfe_rule(name, files)}")
        missing = [c for c in mine if c.run_at is None]
        if missing:
            asked = ", ".join(str(c.requested) for c in missing)
            notes.append(f"- {name} at NFE {asked}: no valid NFE at or below; it takes {_nfe_rule(name, files)}")
        for c in mine:
            if c.error is not None:
                notes.append(f"err {name} at NFE {c.requested}: {c.error}")
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


def cmd_eval(args) -> int:
    t_start = time.perf_counter()
    device = _device(args.device)
    names = _solver_names(args.solvers)
    if args.json is not None:
        _check_writable(args.json)
    flow = bespoke.load_model(
        args.model, path=args.path, guidance="default" if args.guidance is None else args.guidance
    )
    if flow.sample_shape is None:
        raise BespokeError(f"{args.model} does not declare its sample shape, so noise cannot be drawn for it")
    cond, labels_text = _conditioning(args, flow)
    cond = {k: v.to(device) for k, v in cond.items()}
    noise = draw_noise(flow.sample_shape, args.num, args.seed, dtype=torch.float64, device=device)

    files = _file_nfes(names, flow, args.force)

    def run_at(name: str, n: int) -> int | None:
        if name in files:
            return n if n in files[name] else None
        return largest_valid_nfe(name, n)

    cells = [_Cell(name, n, run_at(name, n)) for name in names for n in args.nfe]

    def say(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    say(f"ground truth: dopri5 (rtol={args.rtol:g}, atol={args.atol:g}) on {args.num} samples ...")
    t0 = time.perf_counter()
    gt = bespoke.ground_truth(flow, noise, rtol=args.rtol, atol=args.atol, **cond)
    gt_seconds = time.perf_counter() - t0

    jobs = sorted(
        {(c.solver, c.run_at) for c in cells if c.run_at is not None}, key=lambda j: (names.index(j[0]), j[1])
    )
    done: dict[tuple[str, int], bespoke.EvalResult | str] = {}
    with tqdm(jobs, desc="eval", unit="run", file=sys.stderr, disable=args.quiet, dynamic_ncols=True) as bar:
        for name, nfe in bar:
            bar.set_postfix_str(f"{name} NFE {nfe}", refresh=False)
            try:
                s = load_solver(name, nfe, flow=flow, force=args.force) if name in files else bespoke.solver(name, nfe)
                done[name, nfe] = bespoke.evaluate(s, flow, noise, gt.samples, name=name, **cond)
            except BespokeError as e:  # this solver cannot run on this model: report it in its cell
                done[name, nfe] = " ".join(str(e).split())
    for c in cells:
        if c.run_at is not None:
            out = done[c.solver, c.run_at]
            c.result, c.error = (None, out) if isinstance(out, str) else (out, None)

    parts = [
        args.model,
        f"path {flow.scheduler.name if flow.scheduler else 'none'}",
        f"{args.num} samples (seed {args.seed}, float64, {device})",
    ]
    if flow.guidance is not None:
        g = flow.guidance
        parts.append(f"guidance w={g.weight:g} ({g.convention}: {GUIDANCE_CONVENTIONS[g.convention].split('  ')[0]})")
    if labels_text is not None:
        parts.append(f"labels {labels_text}")
    parts.append(f"ground truth: dopri5 rtol={args.rtol:g} atol={args.atol:g}, {gt.nfe} NFE per sample")
    print(_table(cells, names, args.nfe, " | ".join(parts), flow.data_range, files), flush=True)

    if args.json is not None:
        settings = dict(gt.settings())
        settings.update(
            seconds=gt_seconds,
            model=args.model,
            path=flow.scheduler.name if flow.scheduler else None,
            num=args.num,
            seed=args.seed,
            noise="bespoke.noise.draw_noise, float64",
            device=device,
            guidance=flow.guidance.as_dict() if flow.guidance is not None else None,
            labels=labels_text,
            data_range=flow.data_range,
            bespoke_version=bespoke.__version__,
        )
        results = [dict(c.result.as_dict(), requested_nfe=c.requested) for c in cells if c.result is not None]
        skipped = [
            {"solver": c.solver, "requested_nfe": c.requested, "reason": f"it takes {_nfe_rule(c.solver, files)}"}
            for c in cells
            if c.run_at is None
        ]
        failed = [
            {"solver": c.solver, "requested_nfe": c.requested, "nfe": c.run_at, "error": c.error}
            for c in cells
            if c.error is not None
        ]
        _write_json_atomic(
            args.json, {"ground_truth": settings, "results": results, "skipped": skipped, "failed": failed}
        )
        say(f"wrote {args.json}")
    say(f"done in {time.perf_counter() - t_start:.1f} s (ground truth {gt_seconds:.1f} s)")
    failures = [c for c in cells if c.error is not None]
    if failures:
        _print_error(f"{len(failures)} of {len(cells)} evaluations failed; see the 'err' notes under the table")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 1 internal error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except BespokeError as e:
        if os.environ.get("BESPOKE_DEBUG") == "1":
            traceback.print_exc()
        _print_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("bespoke: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("BESPOKE_DEBUG") == "1":
            traceback.print_exc()
        message = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"bespoke: internal error: {message} (set BESPOKE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
