"""`bespoke info FILE`: what a solver file (or a GT cache directory) holds, without running anything.

bespoke info bns.safetensors        NFEs, model fingerprint, training summary per solver
bespoke info gt/                    pairs, model, seed, tolerances, trajectories
"""

from __future__ import annotations

import json
from pathlib import Path

import bespoke
from bespoke.solvers.files import is_range_entry, load_solvers, read_metadata


def register(sub) -> None:
    p = sub.add_parser(
        "info",
        help="print what a solver file or GT cache holds",
        description="Validate a solver file (or GT cache directory) and print its metadata.",
    )
    p.add_argument("file", metavar="FILE", help="a solver file (*.safetensors) or a GT cache directory")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    p.add_argument("--quiet", action="store_true", help="accepted like every command's; info prints no progress")
    p.set_defaults(func=cmd_info)


def _model_line(model: dict) -> str:
    g = model.get("guidance")
    if g and "range" in g:  # a guided solver's file: every scale in the range
        guidance = f"guidance scales {g['range'][0]:g}-{g['range'][1]:g} ({g['convention']})"
    else:
        guidance = f"guidance w={g['weight']:g} ({g['convention']})" if g else "no guidance"
    fingerprint, path = model.get("fingerprint"), model.get("scheduler")
    p = model.get("prompts")
    trained = "" if not p else f"; trained on {p.get('count')} prompts (sha256 {str(p.get('sha256'))[:12]})"
    return f"model: {model.get('name')} (fingerprint {fingerprint}, path {path}, {guidance}){trained}"


def _solver_lines(key: str, entry: dict) -> list[str]:
    kind = entry["kind"]
    if kind == "schedule":  # a learned schedule: its base method, and the warp of that method's grid
        extra = f", method {entry['base']}, {entry['knots']} knots"
    elif is_range_entry(entry):  # an NFE-agnostic Bespoke solver: one transform for the whole range
        extra = f", base {entry['base']}, one transform of {entry['knots']} segments for every NFE in the range"
    else:
        extra = f", base {entry['base']} x {entry['steps']} steps" if "base" in entry else ""
    if "guidance_anchors" in entry:
        anchors = ", ".join(f"{w:g}" for w in entry["guidance_anchors"])
        extra += f", guidance anchors {anchors} ({entry['guidance_convention']}), interpolated linearly between them"
    if entry.get("sigma0", 1.0) != 1.0:
        extra += f", preconditioning sigma0={entry['sigma0']:g}"
    lines = [f"NFE {key}: {kind}, {entry.get('parameters')} parameters, init {entry.get('init')}{extra}"]
    trained = _training_text(entry.get("training") or {})
    if trained:
        lines.append(f"  trained: {trained}")
    for nfe, heights in (entry.get("warp") or {}).items():
        lines.append(f"  warp of the method's grid at NFE {nfe}: " + ", ".join(f"{x:.4f}" for x in heights))
    for nfe, times in (entry.get("times_at") or {}).items():
        lines.append(f"  times at NFE {nfe}: " + ", ".join(f"{x:.4f}" for x in times))
    if "times" in entry:
        lines.append("  times: " + ", ".join(f"{x:.4f}" for x in entry["times"]))
    for w, times in (entry.get("guidance_times") or {}).items():
        lines.append(f"  times at guidance {w}: " + ", ".join(f"{x:.4f}" for x in times))
    by = (entry.get("training") or {}).get("val_psnr_by_guidance") or {}
    if by:
        lines.append("  validation PSNR by guidance scale: " + ", ".join(f"w={w} {v[1]:.2f} dB" for w, v in by.items()))
    return lines


def _training_text(t: dict) -> str:
    """The training summary in one line, from whichever of its fields the file has (all are optional)."""
    parts = []
    if "val_psnr" in t:
        start = f"{t['val_psnr_init']:.2f} -> " if "val_psnr_init" in t else ""
        pairs = f" on {t['val_pairs']} pairs" if "val_pairs" in t else ""
        parts.append(f"validation PSNR {start}{t['val_psnr']:.2f} dB{pairs}")
    if "iterations" in t:
        on = f" on {t['train_pairs']} pairs" if "train_pairs" in t else ""
        how = f" ({t['objective']})" if "objective" in t else ""
        parts.append(f"{t['iterations']} iterations{on}{how}")
    if "seconds" in t:
        parts.append(f"{t['seconds']:.0f} s")
    return "; ".join(parts)


def _conditioning_text(m: dict) -> str:
    prompts = m.get("prompts")
    if prompts is not None:
        where = f" from {prompts['source']}" if prompts.get("source") else ""
        negative = f", negative prompt {prompts['negative']!r}" if prompts["negative"] else ""
        return (
            f"prompts: {len(prompts['prompts'])}{where} (sha256 {prompts['sha256'][:12]}{negative}), "
            "one drawn per pair from the seed"
        )
    return f"labels: {'drawn from the seed' if m.get('labels') else 'none'}"


def _gt_lines(path: Path) -> tuple[list[str], dict]:
    cache = bespoke.load_gt(path)
    m = cache.manifest
    traj = f", trajectories at {m['trajectory']} times" if m.get("trajectory") else ""
    g = m.get("guidance")
    return [
        f"{path}: ground-truth cache, {len(cache)} pairs in {len(m['shards'])} shards of {m['shard_size']}{traj}",
        f"model: {m['model']} (fingerprint {m['fingerprint']}, path {m['scheduler']}, "
        + (f"guidance w={g['weight']:g} ({g['convention']}))" if g else "no guidance)"),
        f"noise seed {m['seed']}, {m['dtype']}; {_conditioning_text(m)}",
        f"dopri5 rtol={m['rtol']:g} atol={m['atol']:g}, {min(cache.nfe)}-{max(cache.nfe)} NFE per sample; "
        f"{sum(s['seconds'] for s in m['shards']):.0f} s in all",
    ], m


def cmd_info(args) -> int:
    path = Path(args.file)
    if path.is_dir():
        lines, meta = _gt_lines(path)
    else:
        load_solvers(path)  # validates every tensor, not only the metadata
        meta = read_metadata(path)
        lines = [
            f"{path}: solver file v{meta['version']} (bespoke {meta.get('library_version')})",
            _model_line(meta["model"]),
        ]
        for key in sorted(meta["solvers"], key=lambda k: int(k.split("-")[0])):
            lines += _solver_lines(key, meta["solvers"][key])
    print(json.dumps(meta, indent=2) if args.json else "\n".join(lines))
    return 0
