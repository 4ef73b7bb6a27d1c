"""What every `bespoke` subcommand shares: argument types and flags, one-line errors, the device,
loading the model and its conditioning, and writes that never leave half a file behind."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

import bespoke
from bespoke import BespokeError
from bespoke.distributed import local_device
from bespoke.flows import autocast_flow
from bespoke.io import atomic_path
from bespoke.models import SPEC_FORMS
from bespoke.noise import draw_labels
from bespoke.paths import SCHEDULERS
from bespoke.prompts import read_prompts

# --- argument parsing ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `bespoke: error: <message> (see 'bespoke eval --help')`, exit 2."""

    def error(self, message):
        print_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def nfe_list(text: str) -> list[int]:
    """--nfe of eval/sample-like commands: comma-separated NFEs and LO-HI ranges (4,8,16 or 4-16 or 3,6-8)."""
    out = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if dash and lo.strip().isdigit() and hi.strip().isdigit() and 1 <= int(lo) <= int(hi):
            out += [n for n in range(int(lo), int(hi) + 1) if n not in out]
        elif dash:
            raise argparse.ArgumentTypeError(f"an NFE range is LO-HI with 1 <= LO <= HI (e.g. 4-16), got {part!r}")
        else:
            out += [n for n in int_list(part) if n not in out]
    return out


def int_list(text: str) -> list[int]:
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


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def positive_float(text: str) -> float:
    x = finite_float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return x


def labels_arg(text: str):
    if text == "random":
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"expected a class label (an integer >= 0) or 'random', got {text!r}")
    return k


def add_model_args(p, *, labels: bool = True) -> None:
    """--model, --path, --guidance (and --labels): which model, and how it is conditioned."""
    p.add_argument("--model", required=True, metavar="SPEC", help=f"{SPEC_FORMS} (e.g. zoo:gmm2d)")
    p.add_argument(
        "--path",
        default=None,
        choices=list(SCHEDULERS),
        help="Gaussian path of the analytic models (default condot); trained models keep their own",
    )
    p.add_argument(
        "--guidance",
        type=finite_float,
        default=None,
        metavar="W",
        help="classifier-free guidance weight: fm convention (1+W)*cond - W*uncond for zoo/python models, "
        "diffusers' uncond + W*(cond - uncond) for text-to-image pipelines (default: the model's own)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="prompt set of a text-to-image model: one prompt per line (or .json list, .csv with a 'prompt' column)",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        metavar="TEXT",
        help="negative prompt, the null condition of guidance (default: the empty prompt, as diffusers)",
    )
    p.add_argument(
        "--autocast",
        choices=("bf16", "fp16"),
        default=None,
        help="run the network under torch.autocast in this dtype (the solver's math keeps float32/64)",
    )
    if labels:
        p.add_argument(
            "--labels",
            type=labels_arg,
            default=None,
            metavar="K|random",
            help="class label K for every sample (prompt K of --prompts for a text-to-image model), or 'random' "
            "(drawn from the seed); default: none, or random for a model that samples with guidance or prompts",
        )


def add_run_args(p, *, seed: bool = True) -> None:
    """--seed, --device, --quiet."""
    if seed:
        p.add_argument("--seed", type=integer, default=0, help="seed of the noise (and labels) (default 0)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available, else cpu"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")


# --- messages, device, model ---------------------------------------------------------------------


def print_error(message: str) -> None:
    print(f"bespoke: error: {' '.join(str(message).split())}", file=sys.stderr)


def say(args, message: str) -> None:
    """A progress line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def device(name: str) -> str:
    """--device resolved: auto = cuda when available, else cpu; under torchrun each rank its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BespokeError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return local_device(name)


def load_flow(args):
    """The model of --model, with --path, --guidance and --prompts applied; it must declare its sample shape."""
    prompts = getattr(args, "prompts", None)
    negative = getattr(args, "negative_prompt", None)
    if prompts is not None:
        prompts = read_prompts(prompts, negative=negative)
    elif negative is not None:
        raise BespokeError("--negative-prompt goes with --prompts FILE (the prompts it is the null condition of)")
    flow = bespoke.load_model(
        args.model,
        path=args.path,
        guidance="default" if args.guidance is None else args.guidance,
        prompts=prompts,
    )
    if "pipeline" in flow.info and flow.prompts is None:
        raise BespokeError(f"{args.model} is a text-to-image model: give its prompts with --prompts FILE")
    if flow.sample_shape is None:
        raise BespokeError(f"{args.model} does not declare its sample shape, so noise cannot be drawn for it")
    return autocast_flow(flow, args.autocast) if getattr(args, "autocast", None) else flow


def conditioning(args, flow, num: int, start: int = 0) -> tuple[dict, str | None]:
    """The `labels` keyword for `num` samples from `start`, and how to describe it (None when unconditional).

    Without --labels a model runs unconditionally, unless it samples with guidance, which needs
    labels: then they are drawn from --seed (as GT caches draw them). A text-to-image model's labels
    index its prompts (--labels K: prompt K for every sample; default random)."""
    choice = getattr(args, "labels", None)
    if choice is None and flow.prompts is not None:
        choice = "random"
    if choice is None:
        if flow.guidance is None:
            return {}, None
        if flow.num_classes is None or "labels" not in flow.cond_keys:
            raise BespokeError(
                f"{args.model} samples with guidance (w={flow.guidance.weight:g}), which needs class labels: "
                "add --labels K (one class for all)"
            )
        choice = "random"
    if "labels" not in flow.cond_keys:
        raise BespokeError(f"--labels: {args.model} is not class-conditional (it takes no labels)")
    n = flow.num_classes
    if choice == "random":
        if n is None:
            raise BespokeError(f"--labels random: {args.model} does not say how many classes it has; pass --labels K")
        what = f"drawn from {flow.prompts.describe()}" if flow.prompts else f"random 0..{n - 1}"
        return {"labels": draw_labels(num, n, args.seed, start=start)}, what
    if n is not None and choice >= n:
        have = f"prompts 0..{n - 1} (--prompts)" if flow.prompts else f"classes 0..{n - 1}"
        raise BespokeError(f"--labels {choice}: {args.model} has {have}")
    what = f"{choice} ({flow.prompts.texts[choice]!r}) for every sample" if flow.prompts else str(choice)
    return {"labels": torch.full((num,), choice, dtype=torch.long)}, what


def solver_names(text: str) -> list[str]:
    """Built-in names ('all' = every one) and solver files, in order, without repeats."""
    names = []
    items = [n.strip() for n in text.split(",")]
    for name in [m for n in items for m in (bespoke.SOLVER_NAMES if n == "all" else [n])]:
        if name not in bespoke.SOLVER_NAMES and not is_solver_file(name):
            raise BespokeError(
                f"unknown solver {name!r}; valid names: {', '.join(bespoke.SOLVER_NAMES)} "
                "(or 'all'), or a solver file (*.safetensors) made by `bespoke train`"
            )
        if name not in names:
            names.append(name)
    return names


def is_solver_file(name: str) -> bool:
    return name.endswith(".safetensors") or os.path.isfile(name)


# --- files ---------------------------------------------------------------------------------------


def check_writable(path, flag: str) -> None:
    """Fail now, not after the work, if `path` cannot be written (same test as the final write)."""
    path = str(path)
    if os.path.isdir(path):
        raise BespokeError(f"cannot write {flag} {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".bespoke-", suffix=".tmp")
    except OSError as e:
        raise BespokeError(f"cannot write {flag} {path}: {e.strerror or e} ({parent})") from None
    os.close(fd)
    os.unlink(tmp)


def check_picture_path(path, flag: str) -> None:
    """Pictures are PNGs: refuse a name that says otherwise (p.txt would hold a PNG)."""
    if not str(path).lower().endswith(".png"):
        raise BespokeError(f"{flag} {path}: pictures are written as PNG; give a file name ending in .png")


def write_json_atomic(path, obj, flag: str = "--json") -> None:
    with atomic_path(path, flag) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path, text: str, flag: str) -> None:
    with atomic_path(path, flag) as tmp:
        Path(tmp).write_text(text)


class NoiseFile:
    """The `noise` (and optional `labels`) of a safetensors file, validated up front and read batch by batch,
    so a noise file larger than memory can be sampled from."""

    def __init__(self, path, flow):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise BespokeError(f"--noise {path}: no such file")
        try:
            self._file = safe_open(str(path), "pt")
            names = set(self._file.keys())
            shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in names & {"noise", "labels"}}
            dtypes = {k: self._file.get_slice(k).get_dtype() for k in shapes}
        except Exception as e:
            raise BespokeError(f"--noise {path} is not a safetensors file ({type(e).__name__}: {e})") from None
        if "noise" not in names:
            has = ", ".join(sorted(names)) or "nothing"
            raise BespokeError(f"--noise {path} has no 'noise' tensor (it has: {has})")
        shape, sample = shapes["noise"], tuple(flow.sample_shape)
        if dtypes["noise"] not in ("F64", "F32", "F16", "BF16") or shape[1:] != sample or not shape:
            raise BespokeError(
                f"--noise {path}: 'noise' is {dtypes['noise']} {shape}, but {flow.name} takes floating-point "
                f"(batch, {', '.join(map(str, sample))})"
            )
        self.num, self.has_labels = shape[0], "labels" in shapes
        if self.has_labels and (dtypes["labels"] != "I64" or shapes["labels"] != (self.num,)):
            raise BespokeError(
                f"--noise {path}: 'labels' must be int64 of shape ({self.num},), got {dtypes['labels']} "
                f"{shapes['labels']}"
            )

    def noise(self, start: int, stop: int) -> torch.Tensor:
        return self._file.get_slice("noise")[start:stop]

    def labels(self, start: int, stop: int) -> torch.Tensor:
        return self._file.get_slice("labels")[start:stop]
