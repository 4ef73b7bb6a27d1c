"""Solver files (DESIGN §6): learned solvers as safetensors tensors plus JSON metadata, never a pickle.

One file holds one solver per NFE. Tensors are named `nfe{N}.{parameter}` and hold the raw float64
parameters, so a loaded solver samples bit for bit like the one that was saved. The metadata says
what the file is for (model fingerprint, guidance, path), what each solver is (kind, NFE, init,
preconditioning, times for reading) and how it was trained. Loading validates all of it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .._version import __version__
from ..errors import BespokeError
from ..io import read_tensors, save_tensors
from ..records import OPTIONAL, REQUIRED, fields_problem, is_guidance, is_int, is_real, is_str, short
from .bns import BNSSolver
from .learned import guidance_record
from .scale_time import BespokeSolver

__all__ = ["FORMAT", "VERSION", "KINDS", "save_solvers", "load_solvers", "load_solver", "read_metadata", "model_record"]

FORMAT = "bespoke-solver"
VERSION = 2  # 2: the file carries a SHA-256 of its metadata and tensors (bespoke.io)
READS = (1, 2)  # version 1 files (no checksum) still load, with a warning
KINDS = {"bns": BNSSolver, "bespoke-rk1": BespokeSolver, "bespoke-rk2": BespokeSolver}
_FIX = "train a new one with `bespoke train ... --out FILE`"


def model_record(flow) -> dict:
    """What a solver file records of the model it was trained for."""
    return {
        "name": flow.name,
        "fingerprint": flow.fingerprint,
        "scheduler": repr(flow.scheduler) if flow.scheduler is not None else None,
        "guidance": guidance_record(flow),
        "prompts": _prompts_record(flow),
    }


def _prompts_record(flow) -> dict | None:
    """The prompt set a text-to-image solver was trained on (its hash, size and source): a record, not a check,
    since a solver serves other prompts of the same model too."""
    prompts = getattr(flow, "prompts", None)
    if prompts is None:
        return None
    return {k: v for k, v in prompts.record().items() if k != "prompts"}


def save_solvers(path, solvers, flow) -> None:
    """Write learned solvers (one per NFE) for `flow` to `path` atomically; an existing file is replaced whole."""
    solvers = list(solvers.values()) if isinstance(solvers, dict) else list(solvers)
    nfes = [s.nfe for s in solvers]
    if len(set(nfes)) != len(nfes):
        raise BespokeError(f"a solver file holds one solver per NFE; got NFEs {sorted(nfes)}")
    tensors, entries = {}, {}
    for s in solvers:
        if getattr(s, "kind", None) not in KINDS:
            raise BespokeError(f"{type(s).__name__} is not a learned solver kind ({', '.join(KINDS)})")
        s.validate()
        tensors.update({f"nfe{s.nfe}.{k}": v for k, v in s.state_tensors().items()})
        entries[str(s.nfe)] = s.file_entry()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "library_version": __version__,
        "model": model_record(flow),
        "solvers": entries,
    }
    save_tensors(Path(path), tensors, meta)


def read_metadata(path) -> dict:
    """The validated metadata of a solver file (format, version, model, one entry per NFE)."""
    return _read(path)[1]


# --- validation: every field a reader uses has the type it expects, or the file is refused -----------

_OPT_STR = (lambda v: v is None or is_str(v), "a string or null")
_COUNT = (lambda v: is_int(v, 1), "an integer >= 1")
_STEPS = (lambda v: is_int(v, 0), "an integer >= 0")
_PSNR = (lambda v: is_real(v, finite=False), "a number")  # inf where a solver is exact
_TIMES = (lambda v: isinstance(v, list) and all(is_real(x) for x in v), "a list of finite numbers")
_MODEL_FIELDS = (
    ("name", *_OPT_STR, OPTIONAL),
    ("fingerprint", *_OPT_STR, REQUIRED),
    ("scheduler", *_OPT_STR, OPTIONAL),
    ("guidance", is_guidance, 'null or {"weight": number, "convention": string}', None),  # absent: none
    ("prompts", lambda v: v is None or (isinstance(v, dict) and is_str(v.get("sha256"))), "null or an object", None),
)
_ENTRY_FIELDS = (
    ("nfe", *_COUNT, REQUIRED),
    ("init", is_str, "a string", OPTIONAL),
    ("parameters", *_COUNT, OPTIONAL),
    ("times", *_TIMES, OPTIONAL),
    ("training", lambda v: isinstance(v, dict), "an object", OPTIONAL),
    ("sigma0", lambda v: is_real(v) and v > 0, "a positive number", OPTIONAL),
    ("start_scale", is_real, "a finite number", OPTIONAL),
    ("base", is_str, "a string", OPTIONAL),
    ("steps", *_COUNT, OPTIONAL),
)
_TRAINING_FIELDS = (  # a summary may lack any of these (say, one written from Python), never mistype them
    ("objective", is_str, "a string", OPTIONAL),
    ("init", is_str, "a string", OPTIONAL),
    ("train_pairs", *_STEPS, OPTIONAL),
    ("val_pairs", *_STEPS, OPTIONAL),
    ("val_psnr_init", *_PSNR, OPTIONAL),
    ("val_psnr", *_PSNR, OPTIONAL),
    ("best_iteration", *_STEPS, OPTIONAL),
    ("iterations", *_STEPS, OPTIONAL),
    ("seconds", is_real, "a finite number", OPTIONAL),
)


def _check_fields(path, record: dict, fields, where: str) -> None:
    problem = fields_problem(record, fields, where)
    if problem is not None:
        raise BespokeError(f"{path} is damaged: {problem}; {_FIX}")


def _check_metadata(path, meta) -> None:
    """Raise a one-line BespokeError unless `meta` has the shape this version writes (DESIGN §6)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BespokeError(f"{path} is not a bespoke solver file (format {got!r}); {_FIX}")
    if type(meta.get("version")) is not int or meta["version"] not in READS:
        raise BespokeError(
            f"{path} has solver-file version {short(meta.get('version'))}, but this bespoke ({__version__}) reads "
            f"versions {', '.join(map(str, READS))}; upgrade bespoke-solvers or re-train the solver"
        )
    if not isinstance(meta.get("model"), dict):
        raise BespokeError(f"{path} does not say which model it is for (no 'model' record); {_FIX}")
    _check_fields(path, meta["model"], _MODEL_FIELDS, " of the model record")
    entries = meta.get("solvers")
    if not isinstance(entries, dict) or not entries:
        raise BespokeError(f"{path} holds no solvers; {_FIX}")
    for key, entry in entries.items():
        if not (key.isdigit() and key.isascii() and str(int(key)) == key and int(key) >= 1):
            raise BespokeError(f"{path} is damaged: solvers are keyed by NFE (1, 2, ...), not {short(key)}; {_FIX}")
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            kind = entry.get("kind") if isinstance(entry, dict) else entry
            raise BespokeError(f"{path}: solver {key} has unknown kind {short(kind)}; valid: {', '.join(KINDS)}")
        _check_fields(path, entry, _ENTRY_FIELDS, f" of solver {key}")
        if entry["nfe"] != int(key):
            raise BespokeError(f"{path} is damaged: solver {key} says it has NFE {entry['nfe']}; {_FIX}")
        _check_fields(path, entry.get("training", {}), _TRAINING_FIELDS, f" of solver {key}'s training summary")


def _read(path) -> tuple[dict, dict]:
    path = Path(path)
    tensors, meta, checked = read_tensors(path, _FIX)
    _check_metadata(path, meta)
    if meta["version"] >= 2 and not checked:
        raise BespokeError(f"{path} is damaged: its checksum is missing; {_FIX}")
    if not checked:
        warnings.warn(
            f"{path} is a solver file of version {meta['version']}, written without a checksum: damage to it cannot "
            "be detected; save it again with bespoke.save_solvers to add one",
            stacklevel=3,
        )
    return tensors, meta


def _build(path, tensors: dict, meta: dict, nfe: int, flow, force: bool):
    entry = meta["solvers"][str(nfe)]
    kind = KINDS[entry["kind"]]
    state = {}
    try:
        shapes = kind.state_shapes(nfe)
    except BespokeError as e:
        raise BespokeError(f"{path}: the NFE-{nfe} solver is invalid ({e}); {_FIX}") from None
    for name, shape in shapes.items():
        v = tensors.get(f"nfe{nfe}.{name}")
        if v is None or tuple(v.shape) != shape or v.dtype != torch.float64:
            got = "missing" if v is None else f"{v.dtype} {tuple(v.shape)}"
            raise BespokeError(f"{path}: tensor nfe{nfe}.{name} should be float64 {shape}, is {got}; {_FIX}")
        if not torch.isfinite(v).all():
            raise BespokeError(f"{path}: tensor nfe{nfe}.{name} contains NaN or inf; {_FIX}")
        state[name] = v
    try:
        solver = kind.from_state(state, entry, meta["model"]["fingerprint"])
    except BespokeError as e:
        raise BespokeError(f"{path}: the NFE-{nfe} solver is invalid ({e}); {_FIX}") from None
    solver.model_guidance = meta["model"]["guidance"]
    solver.force = force
    if flow is not None:
        try:
            solver.check_model(flow)
        except BespokeError as e:
            raise BespokeError(f"{path}: {e}") from None
    return solver


def load_solvers(path, *, flow=None, force: bool = False) -> dict:
    """Every solver in a solver file, by NFE; refuses a file for another model than `flow` unless forced."""
    tensors, meta = _read(path)
    nfes = sorted(int(k) for k in meta["solvers"])
    return {n: _build(path, tensors, meta, n, flow, force) for n in nfes}


def load_solver(path, nfe: int | None = None, *, flow=None, force: bool = False):
    """The solver for `nfe` from a solver file (the only one if the file holds one and nfe is None)."""
    tensors, meta = _read(path)
    have = sorted(int(k) for k in meta["solvers"])
    if nfe is None:
        if len(have) > 1:
            raise BespokeError(f"{path} holds solvers for NFE {', '.join(map(str, have))}; choose one with nfe=/--nfe")
        nfe = have[0]
    if nfe not in have:
        raise BespokeError(
            f"{path} has no solver for NFE {nfe}; it has NFE {', '.join(map(str, have))} "
            f"(train one with `bespoke train --nfe {nfe}`)"
        )
    return _build(path, tensors, meta, nfe, flow, force)
