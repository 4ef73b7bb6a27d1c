"""Pieces the benchmark scripts share: writing their section of docs/benchmarks.md, the machine line."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

INTRO = "# Benchmarks\n\nEvery figure here comes from a run of the script named in its section.\n"


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


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
