"""Solver files (DESIGN §6): learned solvers as safetensors tensors plus JSON metadata, never a pickle.

One file holds one solver per NFE, or per range of NFEs for the solvers that serve one (a learned schedule,
an NFE-agnostic Bespoke solver: key "LO-HI", every NFE in it that its method takes). A file of guided BNS
solvers (one per NFE, each serving a range of guidance scales: fields guidance_anchors, guidance_convention)
records the range in its model record, {"range": [LO, HI], "convention": ...}, instead of one weight.
Tensors are named `nfe{KEY}.{parameter}` and hold the raw float64 parameters, so a loaded solver samples bit
for bit like the one that was saved. The metadata says what the file is for (model fingerprint, guidance,
path), what each solver is (kind, NFE, init, preconditioning, times for reading) and how it was trained.
Loading validates all of it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .._version import __version__
from ..errors import BespokeError
from ..io import read_tensors, save_tensors
from ..records import OPTIONAL, REQUIRED, fields_problem, is_guidance, is_int, is_real, is_str, short
from .bespoke_range import BespokeRangeSolver
from .bns import BNSSolver
from .grids import CONTINUOUS
from .guided import GuidedBNSSolver
from .learned import guidance_record
from .ranged import Ranged, served_text
from .scale_time import BASE, BespokeSolver
from .schedule import SCHEDULE_BASES, ScheduleSolver, nfes_served

__all__ = ["FORMAT", "VERSION", "KINDS", "save_solvers", "load_solvers", "load_solver", "read_metadata", "model_record"]

FORMAT = "bespoke-solver"
VERSION = 2  # 2: the file carries a SHA-256 of its metadata and tensors (bespoke.io)
READS = (1, 2)  # version 1 files (no checksum) still load, with a warning
KINDS = {"bns": BNSSolver, "bespoke-rk1": BespokeSolver, "bespoke-rk2": BespokeSolver, "schedule": ScheduleSolver}
# the solvers of a kind that serve a range of NFEs (entry key "LO-HI", field nfe_range): a schedule always does,
# a Bespoke solver when it is NFE-agnostic
RANGE_CLASSES = {"schedule": ScheduleSolver, "bespoke-rk1": BespokeRangeSolver, "bespoke-rk2": BespokeRangeSolver}
RANGE_KINDS = tuple(RANGE_CLASSES)  # kinds that can serve a range (`bespoke train --nfe LO-HI`)
_FIX = "train a new one with `bespoke train ... --out FILE`"


def model_record(flow, solvers=()) -> dict:
    """What a solver file records of the model it was trained for (with guided `solvers`: their scale range)."""
    guided = [s for s in solvers if isinstance(s, GuidedBNSSolver)]
    return {
        "name": flow.name,
        "fingerprint": flow.fingerprint,
        "scheduler": repr(flow.scheduler) if flow.scheduler is not None else None,
        "guidance": _range_record(guided[0]) if guided else guidance_record(flow),
        "prompts": _prompts_record(flow),
    }


def _range_record(s: GuidedBNSSolver) -> dict:
    return {"range": list(s.guidance_range), "convention": s.convention}


def _check_guided(solvers: list) -> None:
    """A file is for one guidance scale or for one range of them: guided solvers all with the same anchors."""
    guided = [s for s in solvers if isinstance(s, GuidedBNSSolver)]
    if not guided:
        return
    if len(guided) != len(solvers):
        raise BespokeError(
            "a solver file is for one guidance scale or for a range of them: save guided solvers apart from others"
        )
    first = guided[0]
    if any(s.anchor_list != first.anchor_list or s.convention != first.convention for s in guided):
        raise BespokeError("the guided solvers of one file must share their anchor scales and convention")


def _prompts_record(flow) -> dict | None:
    """The prompt set a text-to-image solver was trained on (its hash, size and source): a record, not a check,
    since a solver serves other prompts of the same model too."""
    prompts = getattr(flow, "prompts", None)
    if prompts is None:
        return None
    return {k: v for k, v in prompts.record().items() if k != "prompts"}


def entry_key(s) -> str:
    """A solver's key in a file: its NFE, or "LO-HI" for a solver that serves a range."""
    return s.range_text() if isinstance(s, Ranged) else str(s.nfe)


def is_range_entry(entry: dict) -> bool:
    """Whether a file entry is one solver for a range of NFEs (a schedule, an NFE-agnostic Bespoke solver)."""
    return entry["kind"] == "schedule" or (entry["kind"] in RANGE_CLASSES and "nfe_range" in entry)


def is_guided_entry(entry: dict) -> bool:
    """Whether a file entry is a BNS solver for a range of guidance scales."""
    return entry["kind"] == "bns" and "guidance_anchors" in entry


def _served(s) -> list[int]:
    return s.valid_nfes() if isinstance(s, Ranged) else [s.nfe]


def save_solvers(path, solvers, flow) -> None:
    """Write learned solvers (one per NFE or range) for `flow` to `path` atomically; an existing file is replaced
    whole. A dict may hold the same range solver under each of its NFEs (as load_solvers returns it)."""
    solvers = list(solvers.values()) if isinstance(solvers, dict) else list(solvers)
    unique = {}
    for s in solvers:
        if getattr(s, "kind", None) not in KINDS:
            raise BespokeError(f"{type(s).__name__} is not a learned solver kind ({', '.join(KINDS)})")
        key = entry_key(s)
        if key in unique and not (isinstance(s, Ranged) and _same_parameters(unique[key], s)):
            raise BespokeError(f"a solver file holds one solver per NFE; got two for NFE {key}")
        unique[key] = s
    _check_guided(list(unique.values()))
    nfes = [n for s in unique.values() for n in _served(s)]
    if len(set(nfes)) != len(nfes):
        raise BespokeError(f"a solver file holds one solver per NFE; these solvers overlap at NFE {_twice(nfes)}")
    tensors, entries = {}, {}
    for key, s in unique.items():
        s.validate()
        tensors.update({f"nfe{key}.{k}": v for k, v in s.state_tensors().items()})
        entries[key] = s.file_entry()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "library_version": __version__,
        "model": model_record(flow, list(unique.values())),
        "solvers": entries,
    }
    save_tensors(Path(path), tensors, meta)


def _same_parameters(a, b) -> bool:
    mine, theirs = a.state_tensors(), b.state_tensors()
    return mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())


def _twice(nfes: list[int]) -> int:
    return next(n for n in nfes if nfes.count(n) > 1)


def read_metadata(path) -> dict:
    """The validated metadata of a solver file (format, version, model, one entry per NFE)."""
    return _read(path)[1]


# --- validation: every field a reader uses has the type it expects, or the file is refused -----------

_OPT_STR = (lambda v: v is None or is_str(v), "a string or null")
_COUNT = (lambda v: is_int(v, 1), "an integer >= 1")
_STEPS = (lambda v: is_int(v, 0), "an integer >= 0")
_PSNR = (lambda v: is_real(v, finite=False), "a number")  # inf where a solver is exact
_TIMES = (lambda v: isinstance(v, list) and all(is_real(x) for x in v), "a list of finite numbers")
_GUIDANCE_WHAT = 'null, {"weight": number, "convention": string} or {"range": [LO, HI], "convention": string}'
_CONVENTIONS = ("fm", "diffusers")


def _is_range(v) -> bool:
    ok = isinstance(v, dict) and v.get("convention") in _CONVENTIONS and isinstance(v.get("range"), list)
    return ok and len(v["range"]) == 2 and all(is_real(x) for x in v["range"]) and v["range"][0] < v["range"][1]


def _is_anchors(v) -> bool:
    ok = isinstance(v, list) and len(v) >= 2 and all(is_real(x) for x in v)
    return ok and all(x < y for x, y in zip(v, v[1:]))


_GUIDED_FIELDS = (
    ("guidance_anchors", _is_anchors, "a list of 2 or more increasing numbers", REQUIRED),
    ("guidance_convention", lambda v: v in _CONVENTIONS, "'fm' or 'diffusers'", REQUIRED),
)
_MODEL_FIELDS = (
    ("name", *_OPT_STR, OPTIONAL),
    ("fingerprint", *_OPT_STR, REQUIRED),
    ("scheduler", *_OPT_STR, OPTIONAL),
    ("guidance", lambda v: is_guidance(v) or _is_range(v), _GUIDANCE_WHAT, None),  # absent: none
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
_RANGE_FIELDS = (
    ("nfe_range", lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x, 1) for x in v), "[LO, HI]", REQUIRED),
    ("base", is_str, "a string", REQUIRED),
    ("grid", is_str, "a string", OPTIONAL),
    ("knots", *_COUNT, REQUIRED),
    ("init", is_str, "a string", OPTIONAL),
    ("parameters", *_STEPS, OPTIONAL),
    ("training", lambda v: isinstance(v, dict), "an object", OPTIONAL),
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
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            kind = entry.get("kind") if isinstance(entry, dict) else entry
            raise BespokeError(f"{path}: solver {key} has unknown kind {short(kind)}; valid: {', '.join(KINDS)}")
        if is_range_entry(entry):
            _check_range_entry(path, key, entry)
        else:
            if _nfe_of_key(key) is None:
                raise BespokeError(f"{path} is damaged: solvers are keyed by NFE (1, 2, ...), not {short(key)}; {_FIX}")
            _check_fields(path, entry, _ENTRY_FIELDS, f" of solver {key}")
            if is_guided_entry(entry):
                _check_fields(path, entry, _GUIDED_FIELDS, f" of solver {key}")
            if entry["nfe"] != int(key):
                raise BespokeError(f"{path} is damaged: solver {key} says it has NFE {entry['nfe']}; {_FIX}")
        _check_fields(path, entry.get("training", {}), _TRAINING_FIELDS, f" of solver {key}'s training summary")


def _nfe_of_key(key: str) -> int | None:
    ok = key.isdigit() and key.isascii() and str(int(key)) == key and int(key) >= 1
    return int(key) if ok else None


def _check_range_entry(path, key: str, entry: dict) -> None:
    """A range solver: keyed "LO-HI" (or "N"), its nfe_range [LO, HI] the same, its base and knots valid."""
    lo, _, hi = key.partition("-")
    nfes = (_nfe_of_key(lo), _nfe_of_key(hi or lo))
    if None in nfes or nfes[0] > nfes[1] or (hi and lo == hi):
        raise BespokeError(f"{path} is damaged: a range solver is keyed LO-HI (e.g. 4-16), not {short(key)}; {_FIX}")
    _check_fields(path, entry, _RANGE_FIELDS, f" of solver {key}")
    if entry["nfe_range"] != list(nfes):
        raise BespokeError(f"{path} is damaged: solver {key} says it serves NFE {short(entry['nfe_range'])}; {_FIX}")
    if entry["kind"] != "schedule":  # an NFE-agnostic Bespoke solver: its base method is its order's
        _check_fields(path, entry, (("rows", *_COUNT, REQUIRED),), f" of solver {key}")
        base = BASE[int(entry["kind"].removeprefix("bespoke-rk"))]
        if entry["base"] != base:
            said = f"{entry['kind']} solver {key} says its base is {short(entry['base'])}, not {base}"
            raise BespokeError(f"{path} is damaged: {said}; {_FIX}")
    elif entry["base"] not in SCHEDULE_BASES or entry.get("grid", "uniform") not in CONTINUOUS:
        what = f"{short(entry['base'])} on the grid {short(entry.get('grid'))}"
        raise BespokeError(f"{path}: schedule {key} drives {what}, which this bespoke does not know; {_FIX}")


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


def _build(path, tensors: dict, meta: dict, key: str, flow, force: bool):
    entry = meta["solvers"][key]
    ranged, guided = is_range_entry(entry), is_guided_entry(entry)
    kind = RANGE_CLASSES[entry["kind"]] if ranged else GuidedBNSSolver if guided else KINDS[entry["kind"]]
    state = {}
    try:
        shapes = kind.state_shapes(entry) if ranged or guided else kind.state_shapes(entry["nfe"])
    except BespokeError as e:
        raise BespokeError(f"{path}: the NFE-{key} solver is invalid ({e}); {_FIX}") from None
    for name, shape in shapes.items():
        v = tensors.get(f"nfe{key}.{name}")
        if v is None or tuple(v.shape) != shape or v.dtype != torch.float64:
            got = "missing" if v is None else f"{v.dtype} {tuple(v.shape)}"
            raise BespokeError(f"{path}: tensor nfe{key}.{name} should be float64 {shape}, is {got}; {_FIX}")
        if not torch.isfinite(v).all():
            raise BespokeError(f"{path}: tensor nfe{key}.{name} contains NaN or inf; {_FIX}")
        state[name] = v
    try:
        solver = kind.from_state(state, entry, meta["model"]["fingerprint"])
    except BespokeError as e:
        raise BespokeError(f"{path}: the NFE-{key} solver is invalid ({e}); {_FIX}") from None
    if guided and meta["model"]["guidance"] != _range_record(solver):
        said = short(meta["model"]["guidance"])
        raise BespokeError(
            f"{path} is damaged: its model record says guidance {said}, its NFE-{key} solver serves "
            f"{_range_record(solver)}; {_FIX}"
        )
    solver.model_guidance = meta["model"]["guidance"]
    solver.force = force
    if flow is not None:
        try:
            solver.check_model(flow)
        except BespokeError as e:
            raise BespokeError(f"{path}: {e}") from None
    return solver


def _serves(meta: dict) -> dict[int, str]:
    """{NFE: entry key} of every NFE the file serves (a range solver: each NFE its method takes in the range)."""
    out = {}
    for key, entry in meta["solvers"].items():
        if entry["kind"] == "schedule":
            out.update({n: key for n in nfes_served(entry["base"], entry["nfe_range"])})
        elif is_range_entry(entry):
            out.update({n: key for n in BespokeRangeSolver.nfes_of(entry)})
        else:
            out[int(key)] = key
    return dict(sorted(out.items()))


def _have_text(meta: dict) -> str:
    """The file's NFEs for an error message: fixed NFEs, and ranges with the NFEs they serve where their method
    skips some (RK2: "4-10 (4, 6, 8, 10)")."""
    serves = _serves(meta)
    parts = []
    for key in sorted(meta["solvers"], key=lambda k: int(k.split("-")[0])):
        lo, _, hi = key.partition("-")
        mine = [n for n, k in serves.items() if k == key]
        gaps = bool(hi) and len(mine) != int(hi) - int(lo) + 1
        parts.append(f"{key} ({served_text(mine)})" if gaps else key)
    return ", ".join(parts)


def load_solvers(path, *, flow=None, force: bool = False) -> dict:
    """Every solver in a solver file, by NFE (a range solver under each NFE it serves, as views that share
    its parameters); refuses a file for another model than `flow` unless forced."""
    tensors, meta = _read(path)
    built = {key: _build(path, tensors, meta, key, flow, force) for key in meta["solvers"]}
    return {n: _at(built[key], n) for n, key in _serves(meta).items()}


def _at(solver, nfe: int):
    return solver.at(nfe) if isinstance(solver, Ranged) else solver


def load_solver(path, nfe: int | None = None, *, flow=None, force: bool = False):
    """The solver for `nfe` from a solver file (the only one if the file holds one fixed-NFE solver and nfe is None)."""
    tensors, meta = _read(path)
    serves = _serves(meta)
    if nfe is None:
        keys = list(meta["solvers"])
        if len(keys) > 1 or is_range_entry(meta["solvers"][keys[0]]):
            raise BespokeError(f"{path} holds solvers for NFE {_have_text(meta)}; choose one with nfe=/--nfe")
        nfe = int(keys[0])
    if nfe not in serves:
        ranged = any(is_range_entry(e) for e in meta["solvers"].values())
        how = "one with --nfe LO-HI holding it" if ranged else f"one with `bespoke train --nfe {nfe}`"
        raise BespokeError(f"{path} has no solver for NFE {nfe}; it has NFE {_have_text(meta)} (train {how})")
    return _at(_build(path, tensors, meta, serves[nfe], flow, force), nfe)
