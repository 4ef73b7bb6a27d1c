"""The ground-truth cache: (noise, dopri5 sample) pairs in safetensors shards plus a JSON manifest.

    cache = generate_gt(flow, "gt/", num=1000, seed=0)   # resumes / extends an existing directory
    cache = load_gt("gt/", flow)                           # validated: checksums, shapes, model
    x0, x1, cond = cache.noise, cache.samples, cache.cond()

Pair i depends only on (model, seed, i, shard_size, rtol, atol): its noise is sample i of
`draw_noise(sample_shape, ..., seed)` times the flow's `noise_scale` (the state at t = 0; drawn in
float64, stored in the model's dtype, or float64 for models without one), its label
(class-conditional models) label i of `draw_labels` (for a text-to-image model: the index of its prompt in
the prompt set the manifest records, with the set's hash), and its sample
comes from one dopri5 solve over the whole shard that holds it (dopri5's step size depends on the
batch, so the batch is fixed to the shard). Shard k is `shard-0000k.safetensors` and holds pairs
[k * shard_size, (k + 1) * shard_size); shards are always full, so a cache holds `num` rounded up
to a multiple of `shard_size`. The manifest is written (atomically) with the first shard and rewritten
after every shard, with the SHA-256 of each shard file, so a killed run resumes where it stopped and a
damaged shard is caught; a run that fails before its first shard leaves no manifest.

Dense trajectories (`trajectory=K`, for Bespoke training, which needs ground truth at learned times):
each pair also stores the dopri5 solution and the velocity at K times on [0, ode_end], so
`trajectories.gt_at` interpolates the ground truth at any time (cubic Hermite, spec §2.6) with no
solve. They cost K more NFE per shard (one batched call) and K times the storage of a sample.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._version import __version__
from ..distributed import all_gather, barrier, is_main, rank, world_size
from ..errors import BespokeError, NonFiniteVelocity
from ..io import load_tensors, save_tensors
from ..noise import draw_labels, draw_noise
from ..records import OPTIONAL, REQUIRED, fields_problem, is_guidance, is_int, is_prompts, is_real, is_str, short

__all__ = ["GTCache", "generate_gt", "load_gt", "FORMAT", "VERSION", "MANIFEST"]

FORMAT = "bespoke-gt"
VERSION = 1
MANIFEST = "manifest.json"
_HOW_TO_MAKE = "make one with `bespoke gt --model SPEC --num N --out DIR`"
# settings that must agree for a resumed run to add pairs of the same kind (_read_manifest fills in the
# values of caches made before a field existed)
_RESUME_FIELDS = (
    "fingerprint",
    "prompts_sha256",
    "seed",
    "shard_size",
    "rtol",
    "atol",
    "guidance",
    "dtype",
    "sample_shape",
    "scheduler",
    "num_classes",
    "trajectory",
    "noise_scale",
)
_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class GTCache:
    """Pairs loaded from a GT cache, in index order: noise[i] -> samples[i] (with labels[i]).

    path:     the cache directory
    manifest: its manifest, with `stored` (pairs on disk) and `complete` (all requested shards exist)
    noise:    (n, *sample_shape) in the model's dtype (float64 when it has none)
    samples:  (n, *sample_shape), float32 for float32/16/bf16 models, else float64
    labels:   (n,) int64 for class-conditional models, else None
    nfe:      dopri5 NFE of each shard the pairs come from
    start:    index of the first pair in the cache (0 unless this is a `slice`)
    trajectory_times:      (K,) float64 times of the dense trajectories (None without them)
    trajectory_states:     (n, K, *sample_shape) the solution at those times, in the samples' dtype
    trajectory_velocities: (n, K, *sample_shape) the model's velocity there
    """

    path: Path
    manifest: dict
    noise: torch.Tensor
    samples: torch.Tensor
    labels: torch.Tensor | None
    nfe: list[int]
    start: int = 0
    trajectory_times: torch.Tensor | None = None
    trajectory_states: torch.Tensor | None = None
    trajectory_velocities: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.noise.shape[0]

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"GTCache({str(self.path)!r}, {len(self)} pairs from {self.start}, model={m.get('model')!r}, "
            f"seed={m.get('seed')}, rtol={m.get('rtol')}, atol={m.get('atol')})"
        )

    def slice(self, start: int | None = None, stop: int | None = None) -> GTCache:
        """Pairs start..stop-1 (Python slice rules) as a GTCache sharing the manifest; nfe of the shards they touch."""
        r = range(len(self))[start:stop]
        a, b = r.start, max(r.start, r.stop)
        size = int(self.manifest["shard_size"])
        lo, hi = self.start + a, self.start + b
        nfe_all = [e["nfe"] for e in self.manifest["shards"]]
        nfe = nfe_all[lo // size : -(-hi // size)] if hi > lo else []
        cut = lambda v: None if v is None else v[a:b]  # noqa: E731
        return replace(
            self,
            noise=self.noise[a:b],
            samples=self.samples[a:b],
            labels=cut(self.labels),
            nfe=nfe,
            start=lo,
            trajectory_states=cut(self.trajectory_states),
            trajectory_velocities=cut(self.trajectory_velocities),
        )

    def cond(self, start: int | None = 0, stop: int | None = None) -> dict:
        """The conditioning keywords for pairs start..stop-1: {"labels": ...} or {} (pass as **cond)."""
        return {} if self.labels is None else {"labels": self.labels[start:stop]}


# --- helpers ---------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_dtypes(flow) -> tuple[torch.dtype, torch.dtype]:
    """(noise dtype, samples dtype): the model's dtype (float64 if none); samples at least float32."""
    noise = flow.dtype or torch.float64
    if not isinstance(noise, torch.dtype) or not noise.is_floating_point:
        raise BespokeError(f"{flow.name} has dtype {flow.dtype!r}; a GT cache needs a floating-point model")
    samples = torch.float32 if noise in _LOW_PRECISION else torch.float64
    return noise, samples


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    """The value as it reads back from the manifest (tuples -> lists, ...), for comparisons."""
    return json.loads(json.dumps(value))


def _settings(flow, *, seed, shard_size, rtol, atol, trajectory=0) -> dict:
    if flow.sample_shape is None:
        raise BespokeError(f"{flow.name} does not declare its sample shape, so noise cannot be drawn for it")
    if flow.num_classes is not None and "labels" not in flow.cond_keys:
        raise BespokeError(f"{flow.name} declares {flow.num_classes} classes but takes no `labels` keyword")
    noise_dtype, samples_dtype = _storage_dtypes(flow)
    return _jsonable(
        {
            "model": flow.name,
            "fingerprint": flow.fingerprint,
            "scheduler": None if flow.scheduler is None else repr(flow.scheduler),
            "guidance": None if flow.guidance is None else flow.guidance.as_dict(),
            "prompts": None if flow.prompts is None else flow.prompts.record(),
            "prompts_sha256": None if flow.prompts is None else flow.prompts.sha256,
            "sample_shape": list(flow.sample_shape),
            "dtype": _dtype_name(noise_dtype),
            "samples_dtype": _dtype_name(samples_dtype),
            "num_classes": flow.num_classes,
            "labels": flow.num_classes is not None,
            "solver": "dopri5",
            "rtol": float(rtol),
            "atol": float(atol),
            "seed": seed,
            "shard_size": shard_size,
            "trajectory": trajectory,
            "noise_scale": flow.noise_scale,
        }
    )


def trajectory_times(manifest: dict, ode_end: float | None = None) -> torch.Tensor | None:
    """The K times of a cache's dense trajectories (None if it has none): T_k = ode_end (1 - (1 - k/(K-1))^2),
    denser towards the data end, where trajectories bend most (on zoo:gmm2d, K = 65: max interpolation
    error 1e-5 / 3e-5 / 2e-5 for condot / cosine / vp-discrete, against 2e-5 / 2e-4 / 5e-4 uniform)."""
    k = int(manifest.get("trajectory") or 0)
    if k == 0:
        return None
    end = float(manifest["ode_end"] if ode_end is None else ode_end)
    u = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    return end * (1.0 - (1.0 - u) ** 2)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / MANIFEST)
    except OSError as e:
        raise BespokeError(f"cannot write {out / MANIFEST}: {e.strerror or e}") from None


def _read_manifest(out: Path) -> dict:
    """The validated manifest of the cache in `out` (format, version, every field's type, the shard list)."""
    path = out / MANIFEST
    if not out.is_dir():
        raise BespokeError(f"{out} is not a GT cache (no such directory); {_HOW_TO_MAKE}")
    if not path.is_file():
        raise BespokeError(f"{out} is not a GT cache (it has no {MANIFEST}); {_HOW_TO_MAKE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise BespokeError(f"{out} is not a GT cache ({MANIFEST} cannot be read: {e}); {_HOW_TO_MAKE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BespokeError(f"{out} is not a GT cache ({MANIFEST} is not a {FORMAT!r} manifest); {_HOW_TO_MAKE}")
    if not (is_int(manifest.get("version")) and manifest["version"] == VERSION):
        raise BespokeError(
            f"{out} is a GT cache of manifest version {short(manifest.get('version'))}, which bespoke "
            f"{__version__} cannot read (it knows version {VERSION}); regenerate it into a new directory with "
            "`bespoke gt --model SPEC --num N --out NEW_DIR` or use the bespoke version that made it"
        )
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise BespokeError(
            f"{path} is damaged: {problem}; regenerate the cache with `bespoke gt --model SPEC --num N --out DIR` "
            f"into a new directory (or after deleting {out})"
        )
    return manifest


# --- manifest validation: one table of field checks ----------------------------------------------

_FLOAT_DTYPES = frozenset(  # canonical names only: a shard's dtype is compared by name
    _dtype_name(v) for v in vars(torch).values() if isinstance(v, torch.dtype) and v.is_floating_point
)


def _is_dtype(value) -> bool:
    return isinstance(value, str) and value in _FLOAT_DTYPES


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(is_int(d, 1) for d in value)


# (field, check, what it must be, default when absent: REQUIRED, OPTIONAL or what older caches hold)
_FIELDS = (
    ("model", is_str, "a string", REQUIRED),
    ("fingerprint", lambda v: v is None or is_str(v), "a string or null", REQUIRED),
    ("scheduler", lambda v: v is None or is_str(v), "a string or null", REQUIRED),
    ("guidance", is_guidance, 'null or {"weight": number, "convention": string}', REQUIRED),
    ("prompts", is_prompts, 'null or {"sha256", "prompts", "negative", ...}', None),  # None: from before prompts
    ("prompts_sha256", lambda v: v is None or is_str(v), "a string or null", None),
    ("sample_shape", _is_shape, "a list of positive integers", REQUIRED),
    ("dtype", _is_dtype, "a torch floating-point dtype name", REQUIRED),
    ("samples_dtype", _is_dtype, "a torch floating-point dtype name", REQUIRED),
    ("num_classes", lambda v: v is None or is_int(v, 1), "null or an integer >= 1", REQUIRED),
    ("labels", lambda v: isinstance(v, bool), "true or false", REQUIRED),
    ("solver", is_str, "a string", REQUIRED),
    ("rtol", lambda v: is_real(v) and v > 0, "a positive number", REQUIRED),
    ("atol", lambda v: is_real(v) and v > 0, "a positive number", REQUIRED),
    ("seed", is_int, "an integer", REQUIRED),
    ("shard_size", lambda v: is_int(v, 1), "an integer >= 1", REQUIRED),
    ("num", lambda v: is_int(v, 1), "an integer >= 1", REQUIRED),
    ("trajectory", lambda v: is_int(v, 0) and v != 1, "0 or an integer >= 2", 0),  # 0: from before trajectories
    ("ode_end", lambda v: is_real(v) and 0 < v <= 1, "a number in (0, 1]", OPTIONAL),
    ("noise_scale", lambda v: is_real(v) and v > 0, "a positive number", 1.0),  # 1: from before noise_scale
    ("shards", lambda v: isinstance(v, list), "a list", REQUIRED),
)


def _shard_fields(k: int, size: int) -> tuple:
    """The checks of shard entry k, as in _FIELDS (all required)."""
    name, start, stop = _shard_name(k), k * size, (k + 1) * size
    return (
        ("file", lambda v: v == name, repr(name), REQUIRED),
        ("start", lambda v: is_int(v) and v == start, str(start), REQUIRED),
        ("stop", lambda v: is_int(v) and v == stop, str(stop), REQUIRED),
        ("nfe", lambda v: is_int(v, 1), "an integer >= 1", REQUIRED),
        ("seconds", lambda v: is_real(v) and v >= 0, "a number >= 0", REQUIRED),
        ("sha256", lambda v: is_str(v) and re.fullmatch("[0-9a-f]{64}", v) is not None, "64 hex digits", REQUIRED),
    )


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's fields (None if nothing); fills in the defaults of older caches."""
    problem = fields_problem(manifest, _FIELDS)
    if problem is None and manifest["trajectory"] and "ode_end" not in manifest:
        problem = "'ode_end' is missing (a cache with trajectories needs it)"
    if problem is None and manifest["labels"] != (manifest["num_classes"] is not None):
        problem = f"'labels' is {manifest['labels']} but 'num_classes' is {manifest['num_classes']}"
    for k, entry in enumerate(manifest["shards"] if problem is None else []):
        if not isinstance(entry, dict):
            return f"shard entry {k} must be an object, got {short(entry)}"
        problem = fields_problem(entry, _shard_fields(k, manifest["shard_size"]), f" of shard entry {k}")
        if problem is not None:
            return problem
    return problem


def _finish(manifest: dict) -> dict:
    """The manifest with `stored` and `complete` brought up to date."""
    size = manifest["shard_size"]
    manifest["stored"] = len(manifest["shards"]) * size
    manifest["complete"] = len(manifest["shards"]) >= -(-manifest["num"] // size)  # exact for any int
    return manifest


def _check_flow(out: Path, manifest: dict, flow, force: bool) -> None:
    """Refuse a cache made for another model (fingerprint or guidance) unless forced."""
    problems = []
    mine, theirs = flow.fingerprint, manifest.get("fingerprint")
    if mine is None and theirs is None:
        warnings.warn(f"cannot check that {out} was made for {flow.name}: neither has a fingerprint", stacklevel=3)
    elif mine != theirs:
        problems.append(f"model fingerprint {theirs} ({manifest.get('model')}), not {mine} ({flow.name})")
    guidance = None if flow.guidance is None else _jsonable(flow.guidance.as_dict())
    if guidance != manifest.get("guidance"):
        problems.append(f"guidance {manifest.get('guidance')}, not {guidance}")
    prompts = None if flow.prompts is None else flow.prompts.sha256
    if prompts != manifest["prompts_sha256"]:
        problems.append(f"prompts {_prompts_text(manifest['prompts'])}, not {_prompts_text(flow.prompts)}")
    if problems:
        msg = f"{out} holds ground truth for another model: {'; '.join(problems)}"
        if not force:
            raise BespokeError(
                f"{msg}; load it with the model it was made for, make a cache for this one with "
                "`bespoke gt --model SPEC --num N --out NEW_DIR`, or pass force=True (--force)"
            )
        warnings.warn(f"{msg} (loaded anyway: force=True)", stacklevel=3)


def _prompts_text(prompts) -> str:
    """A prompt set (a Prompts or its record) in a few words: count, source, hash."""
    if prompts is None:
        return "none"
    if not isinstance(prompts, dict):
        prompts = prompts.record()
    where = f" from {prompts['source']}" if prompts.get("source") else ""
    return f"{len(prompts['prompts'])}{where} (sha256 {prompts['sha256'][:12]})"


def _load_shard(out: Path, manifest: dict, k: int) -> tuple[dict, dict]:
    """The tensors and metadata of shard k, after checking its checksum, shapes and dtypes."""
    entry = manifest["shards"][k]
    path = out / entry["file"]
    rerun = f"re-run `bespoke gt --model SPEC --num N --out {out}` with the cache's settings to regenerate it"
    fix = f"delete it and {rerun}"
    if not path.is_file():
        raise BespokeError(f"GT shard {path} is missing; {rerun}")
    if _sha256(path) != entry["sha256"]:
        raise BespokeError(f"GT shard {path} is corrupt or truncated (its SHA-256 does not match the manifest); {fix}")
    tensors, meta = load_tensors(path, fix)
    size, shape = manifest["shard_size"], (manifest["shard_size"], *manifest["sample_shape"])
    expect = {"noise": (shape, manifest["dtype"]), "samples": (shape, manifest["samples_dtype"])}
    if manifest["labels"]:
        expect["labels"] = ((size,), "int64")
    if manifest.get("trajectory"):
        dense = ((size, manifest["trajectory"], *manifest["sample_shape"]), manifest["samples_dtype"])
        expect.update(trajectory_states=dense, trajectory_velocities=dense)
    bad = sorted(set(tensors) ^ set(expect)) + [
        f"{name} {tuple(tensors[name].shape)} {_dtype_name(tensors[name].dtype)}"
        for name, (want_shape, want_dtype) in expect.items()
        if name in tensors
        and (tuple(tensors[name].shape) != want_shape or _dtype_name(tensors[name].dtype) != want_dtype)
    ]
    if not isinstance(meta, dict) or (meta.get("index"), meta.get("start"), meta.get("stop")) != (
        k,
        entry["start"],
        entry["stop"],
    ):
        bad.append("metadata")
    if bad:
        raise BespokeError(f"GT shard {path} does not match the manifest ({', '.join(bad)}); {fix}")
    return tensors, meta


def _load(out: Path, manifest: dict) -> GTCache:
    parts = [_load_shard(out, manifest, k)[0] for k in range(len(manifest["shards"]))]
    shape = tuple(manifest["sample_shape"])

    def cat(name, dtype, tail):
        if not parts:
            return torch.empty((0, *tail), dtype=getattr(torch, dtype))
        return torch.cat([p[name] for p in parts])

    labels = cat("labels", "int64", ()) if manifest["labels"] else None
    dense = {}
    if manifest.get("trajectory"):
        tail = (manifest["trajectory"], *shape)
        dense = {
            "trajectory_times": trajectory_times(manifest),
            "trajectory_states": cat("trajectory_states", manifest["samples_dtype"], tail),
            "trajectory_velocities": cat("trajectory_velocities", manifest["samples_dtype"], tail),
        }
    return GTCache(
        path=out,
        manifest=_finish(manifest),
        noise=cat("noise", manifest["dtype"], shape),
        samples=cat("samples", manifest["samples_dtype"], shape),
        labels=labels,
        nfe=[int(e["nfe"]) for e in manifest["shards"]],
        **dense,
    )


# --- public API ------------------------------------------------------------------------------------


def load_gt(out_dir, flow=None, *, force: bool = False) -> GTCache:
    """All pairs stored in the GT cache `out_dir`, validated (checksums, shapes, dtypes; model if `flow` is given).

    A partial cache loads with the shards it has; `cache.manifest["complete"]` says whether it holds all
    that was asked for. A cache made for another model (fingerprint or guidance) is refused unless force=True.
    Loading never modifies the directory.
    """
    out = Path(out_dir)
    manifest = _read_manifest(out)
    if not manifest["shards"]:  # only older versions wrote a manifest before the first shard
        raise BespokeError(
            f"{out} holds no pairs yet (its generation stopped before the first shard); "
            f"make them with `bespoke gt --model SPEC --num N --out {out}`"
        )
    if flow is not None:
        _check_flow(out, manifest, flow, force)
    return _load(out, manifest)


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise BespokeError(f"{name} must be an integer >= {low}, got {value!r}")


def generate_gt(
    flow,
    out_dir,
    *,
    num: int,
    seed: int = 0,
    shard_size: int = 128,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    device=None,
    quiet: bool = False,
    max_shards: int | None = None,
    trajectory: int = 0,
) -> GTCache:
    """Make (or resume, or extend) the GT cache in `out_dir` with at least `num` pairs; return all it holds.

    num is rounded up to whole shards. An existing cache must have been made with the same model and
    settings (else an error names the difference); its intact shards are kept, missing or damaged ones are
    (re)generated. max_shards: stop after generating that many shards (a valid partial cache).
    device: where the solve runs (pairs are stored on the CPU). quiet: no progress bar.
    trajectory: also store each solution and its velocity at this many times on [0, ode_end]
    (>= 2; 0 = endpoints only), for training Bespoke solvers.
    """
    from tqdm import tqdm

    _check_int("num", num, 1)
    _check_int("shard_size", shard_size, 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BespokeError(f"seed must be an integer, got {seed!r}")
    if max_shards is not None:
        _check_int("max_shards", max_shards, 0)
    _check_int("trajectory", trajectory, 0)
    if trajectory == 1:
        raise BespokeError("trajectory needs at least 2 times (or 0 for endpoints only)")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (is_real(value) and value > 0):
            raise BespokeError(f"{name} must be a positive number, got {value!r}")
    settings = _settings(flow, seed=seed, shard_size=shard_size, rtol=rtol, atol=atol, trajectory=trajectory)
    if flow.fingerprint is None:
        warnings.warn(
            f"{flow.name} has no fingerprint, so the cache cannot be checked against the model later",
            stacklevel=2,
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BespokeError(f"{out} exists and is not a directory; choose another --out directory")
    barrier()  # under torchrun every rank reads the directory before any writes to it, so all split alike

    manifest = _resumed(out, settings)
    if manifest is None:
        manifest = {"format": FORMAT, "version": VERSION, **settings, "num": num, "shards": []}
        manifest["ode_end"] = flow.ode_end
        manifest["created"] = _now()
        problem = _manifest_problem(dict(manifest))
        if problem is not None:  # never write a manifest that cannot be read back
            raise BespokeError(f"{flow.name} cannot have a GT cache: its {problem}")
    manifest["num"] = max(manifest["num"], num)
    manifest["library_version"] = __version__

    entries = dict(enumerate(manifest["shards"]))
    wanted = max(-(-num // shard_size), len(entries))
    todo = []
    for k in range(wanted):
        if k in entries:
            path = out / entries[k]["file"]
            if path.is_file() and _sha256(path) == entries[k]["sha256"]:
                continue
            warnings.warn(f"GT shard {path} is missing or damaged; regenerating it", stacklevel=2)
        else:
            adopted = _adopt(out, k, shard_size)
            if adopted is not None:  # written by a run killed before its manifest update, or by another rank
                entries[k] = adopted
                continue
        todo.append(k)
    if max_shards is not None:
        todo = todo[:max_shards]
    barrier()

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BespokeError(f"cannot create {out}: {e.strerror or e}") from None
    _update(out, manifest, entries)
    mine = todo[rank() :: world_size()]  # each rank its own shards; alone: all of them
    bar = tqdm(
        total=wanted,
        initial=wanted - len(todo),
        desc="ground truth",
        unit="shard",
        file=sys.stderr,
        disable=quiet or not is_main(),
    )
    with bar:
        for k in mine:
            entries[k] = _make_shard(flow, settings, out, k, device)
            if world_size() == 1:
                _update(out, manifest, entries)
            bar.set_postfix(nfe=entries[k]["nfe"])
            bar.update(world_size())
    if world_size() > 1:
        for part in all_gather({k: entries[k] for k in mine}):
            entries.update(part)
        _update(out, manifest, entries)
        barrier()
    if not manifest["shards"]:  # nothing solved (max_shards=0): no manifest was written
        return _load(out, _finish(manifest))
    return _load(out, _read_manifest(out))


def _resumed(out: Path, settings: dict) -> dict | None:
    """The manifest of the cache in `out` to resume or extend, or None to start afresh: there is none, or it
    holds no shards and no shard file exists (a run of an older version that failed before its first shard)."""
    if not (out / MANIFEST).exists():
        return None
    manifest = _read_manifest(out)
    diff = [
        f"{key}={manifest[key]!r} (now {settings[key]!r})" for key in _RESUME_FIELDS if manifest[key] != settings[key]
    ]
    if not diff:
        return manifest
    if not manifest["shards"] and not any(out.glob("shard-*.safetensors")):
        return None  # nothing to lose
    raise BespokeError(
        f"{out} holds a GT cache made with other settings: {'; '.join(diff)}; "
        "use another --out directory or the same settings"
    )


def _update(out: Path, manifest: dict, entries: dict) -> None:
    """Write the manifest with the contiguous prefix of shards that exist (rank 0 only), once there is one:
    a run that fails before its first shard leaves no manifest that would refuse other settings."""
    manifest["shards"] = list(itertools.takewhile(lambda e: e is not None, map(entries.get, itertools.count())))
    manifest["updated"] = _now()
    _finish(manifest)
    if is_main() and manifest["shards"]:
        _write_manifest(out, manifest)


def _adopt(out: Path, k: int, shard_size: int) -> dict | None:
    """The manifest entry of shard k if its file exists and says it is shard k (files are written atomically)."""
    path = out / _shard_name(k)
    if not path.is_file():
        return None
    try:
        _, meta = load_tensors(path, "")
    except BespokeError:
        return None
    if not isinstance(meta, dict) or not is_int(meta.get("index")) or meta["index"] != k:
        return None
    entry = {"file": path.name, **{key: meta.get(key) for key in ("start", "stop", "nfe", "seconds")}}
    entry["sha256"] = _sha256(path)
    return entry if fields_problem(entry, _shard_fields(k, shard_size)) is None else None


def _make_shard(flow, settings: dict, out: Path, k: int, device) -> dict:
    """Solve shard k (its noise, labels, dopri5 samples and optional trajectories), write it; its manifest entry."""
    from ..solvers.adaptive import ground_truth

    size, seed = settings["shard_size"], settings["seed"]
    start, stop = k * size, (k + 1) * size
    t0 = time.perf_counter()
    noise = draw_noise(flow.sample_shape, size, seed, dtype=torch.float64, start=start)
    noise = flow.initial_state(noise).to(getattr(torch, settings["dtype"]))  # the state at t = 0
    samples_dtype = getattr(torch, settings["samples_dtype"])
    tensors = {"noise": noise}
    cond = {}
    if settings["labels"]:
        tensors["labels"] = draw_labels(size, flow.num_classes, seed, start=start)
        cond["labels"] = tensors["labels"].to(device or "cpu")
    dense_times = trajectory_times(settings, flow.ode_end)
    gt = ground_truth(
        flow, noise.to(device or "cpu"), rtol=settings["rtol"], atol=settings["atol"], times=dense_times, **cond
    )
    tensors["samples"] = gt.samples.to("cpu", samples_dtype)
    nfe = gt.nfe
    if dense_times is not None:
        velocities = _velocities(flow, dense_times, gt.states, cond)
        nfe += 1
        tensors["trajectory_states"] = gt.states.transpose(0, 1).to("cpu", samples_dtype).contiguous()
        tensors["trajectory_velocities"] = velocities.transpose(0, 1).to("cpu", samples_dtype).contiguous()
    seconds = round(time.perf_counter() - t0, 3)
    path = out / _shard_name(k)
    meta = {"index": k, "start": start, "stop": stop, "nfe": nfe, "seconds": seconds}
    try:
        save_tensors(path, tensors, meta)
    except OSError as e:
        raise BespokeError(f"cannot write {path}: {e.strerror or e}") from None
    return {"file": path.name, "start": start, "stop": stop, "nfe": nfe, "seconds": seconds, "sha256": _sha256(path)}


def _velocities(flow, times: torch.Tensor, states: torch.Tensor, cond: dict) -> torch.Tensor:
    """u(t_k, x(t_k)) for the K dense times in one batched call, (K, B, ...). Where the model cannot be
    evaluated at the last time (the singular data end of a continuous VP path), the slope there is the
    one that makes the last interval's Hermite cubic a quadratic: 2 (x_K - x_{K-1}) / dt - u_{K-1}."""
    k, b = states.shape[:2]
    rows = {key: v.repeat(k) for key, v in cond.items()}
    t = times.to(states.device).repeat_interleave(b)
    try:
        with torch.no_grad():
            u = flow(t, states.flatten(0, 1), **rows)
        return u.reshape(states.shape).to(torch.float64)
    except NonFiniteVelocity:
        rows = {key: v.repeat(k - 1) for key, v in cond.items()}
        with torch.no_grad():
            u = flow(t[: (k - 1) * b], states[:-1].flatten(0, 1), **rows).reshape(k - 1, *states.shape[1:])
        u = u.to(torch.float64)
        dt = float(times[-1] - times[-2])
        last = 2.0 * (states[-1] - states[-2]) / dt - u[-1]
        return torch.cat([u, last[None]])
