"""Pieces the benchmark scripts share: writing their section of docs/benchmarks.md, the machine line."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch

INTRO = "# Benchmarks\n\nEvery figure here comes from a run of the script named in its section.\n"


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def add_ceiling_pair_args(ap) -> None:
    """The flags of the benchmarks on benchmarks/bns_ceiling.py's GT cache: how many selection (--val),
    evaluation (--eval) and training (--train) pairs, the cache, the document written, and --quiet."""
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache/ceiling"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--tiny-iterations", type=int, default=4000, help="training steps of the tiny UNet (tiny-unet)")


def load_bench_flow(name: str, out: Path, tiny_iterations: int, quiet: bool):
    """zoo:NAME, or `tiny-unet`: benchmarks/diffusers_peers.py's diffusers UNet2DModel, trained (seeded) into
    out/model when missing and loaded as diffusers:out/model."""
    import bespoke

    if name != "tiny-unet":
        return bespoke.load_model(f"zoo:{name}")
    from diffusers_peers import train_tiny_unet

    train_tiny_unet(out / "model", tiny_iterations, quiet)
    return bespoke.load_model(f"diffusers:{out / 'model'}")


def model_label(name: str) -> str:
    """How a benchmark model is named in tables and figures: its spec, or what `tiny-unet` is."""
    return "diffusers tiny UNet2DModel" if name == "tiny-unet" else f"zoo:{name}"


def write_section(doc: Path, mark: str, body: str) -> None:
    """Replace the block between `<!-- BEGIN mark -->` and `<!-- END mark -->` (append it if absent), atomically."""
    begin, end = f"<!-- BEGIN {mark} -->", f"<!-- END {mark} -->"
    block = f"{begin}\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else INTRO
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


def finish_psnr_panels(fig, axes, results: list[dict], nfes, title: str, path: Path, bottom: float) -> None:
    """Label PSNR-vs-NFE panels (one per model), put one legend below them and save the figure."""
    import matplotlib.pyplot as plt

    for ax, res in zip(axes, results):
        ax.set_title(f"zoo:{res['model']}")
        ax.set_xlabel("NFE")
        ax.set_xticks(list(nfes))
        ax.set_ylim(bottom=bottom)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"PSNR vs ground truth [dB] ({results[0]['val']} validation pairs)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, ncol=len(labels), loc="lower center", frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def save_panels(fig, axes, title: str, path: Path) -> None:
    """Label PSNR-against-NFE panels (axes, grid, legend each), title the figure and save it."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xlabel("NFE")
        ax.set_ylabel("PSNR [dB]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, obj) -> dict:
    """Write `obj` as JSON atomically and return it as it reads back (dict keys become str)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return json.loads(path.read_text())


def figure_lines(doc: Path, name: str, alt: str, draw) -> list[str]:
    """Draw the figure into img/`name` beside `doc` (draw(path)) and return the markdown that shows it."""
    img = doc.parent / "img" / name
    draw(img)
    return ["", f"![{alt}]({img.relative_to(doc.parent).as_posix()})"]


def publish(doc: Path, mark: str, lines: list[str], started: float) -> None:
    """Finish a benchmark's report: its wall time, written into its section of `doc`, and printed."""
    lines = lines + [
        "",
        f"Wall time of this invocation: {time.perf_counter() - started:.0f} s (cached parts are not re-run).",
    ]
    write_section(doc, mark, "\n".join(lines))
    print("\n".join(lines))


def trained(file: Path, flow, nfes, make) -> dict:
    """{nfe: solver} from the solver file `file`, training (and saving after each) the NFEs it lacks with make(nfe)."""
    from bespoke.solvers.files import load_solvers, save_solvers

    solvers = load_solvers(file, flow=flow) if file.exists() else {}
    for nfe in nfes:
        if nfe not in solvers:
            solvers[nfe] = make(nfe)
            save_solvers(file, solvers, flow)
    return solvers


def psnr_cell(c: dict, nfe: int, bold: bool = False) -> str:
    """A table cell {"psnr", "nfe"}: the PSNR, the calls it really made where they differ from `nfe`, n/a for NaN."""
    if c["psnr"] != c["psnr"]:
        return "n/a"
    text = f"{c['psnr']:.2f}" + (f" ({c['nfe']})" if c["nfe"] != nfe else "")
    return f"**{text}**" if bold else text


def best_peer(res: dict, nfe: int) -> tuple[str, float]:
    """The best diffusers scheduler among those that spent at most `nfe` network calls."""
    cells = {k: v[str(nfe)] for k, v in res["diffusers"].items() if v[str(nfe)]["nfe"] <= nfe}
    name = max(cells, key=lambda k: cells[k]["psnr"])
    return name, cells[name]["psnr"]
