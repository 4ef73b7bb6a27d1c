"""Solver files (DESIGN §6): learned solvers as safetensors tensors plus JSON metadata, never a pickle.

One file holds one solver per NFE. Tensors are named `nfe{N}.{parameter}` and hold the raw float64
parameters, so a loaded solver samples bit for bit like the one that was saved. The metadata says
what the file is for (model fingerprint, guidance, path), what each solver is (kind, NFE, init,
preconditioning, times for reading) and how it was trained. Loading validates all of it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._version import __version__
from ..errors import BespokeError
from ..io import load_tensors, save_tensors
from .bns import BNSSolver
from .scale_time import BespokeSolver

__all__ = ["FORMAT", "VERSION", "KINDS", "save_solvers", "load_solvers", "load_solver", "read_metadata", "model_record"]

FORMAT = "bespoke-solver"
VERSION = 1
KINDS = {"bns": BNSSolver, "bespoke-rk1": BespokeSolver, "bespoke-rk2": BespokeSolver}
_FIX = "train a new one with `bespoke train ... --out FILE`"


def model_record(flow) -> dict:
    """What a solver file records of the model it was trained for."""
    return {
        "name": flow.name,
        "fingerprint": flow.fingerprint,
        "scheduler": repr(flow.scheduler) if flow.scheduler is not None else None,
        "guidance": flow.guidance.as_dict() if flow.guidance is not None else None,
    }


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


def _read(path) -> tuple[dict, dict]:
    path = Path(path)
    tensors, meta = load_tensors(path, _FIX)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BespokeError(f"{path} is not a bespoke solver file (format {meta.get('format')!r}); {_FIX}")
    if meta.get("version") != VERSION:
        raise BespokeError(
            f"{path} has solver-file version {meta.get('version')!r}, but this bespoke ({__version__}) reads "
            f"version {VERSION}; upgrade bespoke-solvers or re-train the solver"
        )
    if not isinstance(meta.get("model"), dict):
        raise BespokeError(f"{path} does not say which model it is for (no 'model' record); {_FIX}")
    entries = meta.get("solvers")
    if not isinstance(entries, dict) or not entries:
        raise BespokeError(f"{path} holds no solvers; {_FIX}")
    for key, entry in entries.items():
        if entry.get("kind") not in KINDS:
            raise BespokeError(
                f"{path}: solver {key} has unknown kind {entry.get('kind')!r}; valid: {', '.join(KINDS)}"
            )
    return tensors, meta


def _build(path, tensors: dict, meta: dict, nfe: int, flow, force: bool):
    entry = meta["solvers"][str(nfe)]
    kind = KINDS[entry["kind"]]
    state = {}
    for name, shape in kind.state_shapes(nfe).items():
        v = tensors.get(f"nfe{nfe}.{name}")
        if v is None or tuple(v.shape) != shape or v.dtype != torch.float64:
            got = "missing" if v is None else f"{v.dtype} {tuple(v.shape)}"
            raise BespokeError(f"{path}: tensor nfe{nfe}.{name} should be float64 {shape}, is {got}; {_FIX}")
        if not torch.isfinite(v).all():
            raise BespokeError(f"{path}: tensor nfe{nfe}.{name} contains NaN or inf; {_FIX}")
        state[name] = v
    try:
        solver = kind.from_state(state, entry, meta["model"].get("fingerprint"))
    except BespokeError as e:
        raise BespokeError(f"{path}: the NFE-{nfe} solver is invalid ({e}); {_FIX}") from None
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
    try:
        nfes = sorted(int(k) for k in meta["solvers"])
    except ValueError:
        raise BespokeError(f"{path}: solver entries must be keyed by NFE; {_FIX}") from None
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
