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
