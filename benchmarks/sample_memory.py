"""Peak memory of `bespoke sample` against the number of samples, before and after streaming batches to the file.

    python benchmarks/sample_memory.py [--sizes 2000,20000] [--before REF]

Each size runs `bespoke sample --model zoo:digits-ot --solver euler --nfe 8 -n N` in a fresh process and reads
that process's peak resident set (ru_maxrss). With --before REF (a git revision, default 8c62888: the last
commit before streaming) the same command also runs on that revision's code, checked out in a temporary git
worktree, for a side-by-side. Writes the section `sample-memory` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import resource, sys, bespoke; from bespoke.cli import main; rc = main(sys.argv[1:]); "
    "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, bespoke.__file__, flush=True); sys.exit(rc)"
)
COMMAND = ["sample", "--model", "zoo:digits-ot", "--solver", "euler", "--nfe", "4", "--quiet"]


def peak_mib(src: Path, num: int, out: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `bespoke sample -n num` run on the code in `src`."""
    argv = [sys.executable, "-c", PROBE, *COMMAND, "-n", str(num), "--out", str(out)]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    seconds = time.perf_counter() - t0
    _, kib, used = next(line.split() for line in done.stdout.splitlines() if line.startswith("PEAK"))
    assert Path(used).is_relative_to(src), f"ran {used}, not the code in {src}"
    kib = int(kib)
    out.unlink()
    return kib / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--before", default="8c62888", help="git revision to compare with ('' for none)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codes = {"streamed (this version)": ROOT / "src"}
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", str(tmp / "old"), args.before], check=True)
            codes[f"all in memory ({args.before})"] = tmp / "old" / "src"
        try:
            for name, src in codes.items():
                rows[name] = [peak_mib(src, n, tmp / "s.safetensors") for n in sizes]
                print(name, rows[name], flush=True)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "old")], check=True)
    header = "| code | " + " | ".join(f"n = {n}" for n in sizes) + " | growth |"
    lines = [header, "|---" * (len(sizes) + 2) + "|"]
    for name, figures in rows.items():
        cells = [f"{mib:.0f} MiB ({s:.0f} s)" for mib, s in figures]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {figures[-1][0] / figures[0][0]:.2f}x |")
    body = "\n".join(
        [
            "## Memory of `bespoke sample` against the number of samples",
            "",
            f"`python benchmarks/sample_memory.py --sizes {args.sizes}` on {machine()}: peak resident memory of one "
            f"`bespoke {' '.join(COMMAND)} -n N` process (ru_maxrss, which includes PyTorch itself, about 300 MiB),"
            " and its wall time. Batches of 256 (the default) go to the output file as they are solved, so memory "
            "no longer grows with N; before, the noise and samples of all N were held in float64 (2 x N x 256 x 8 "
            "bytes: 78 MiB more at N = 20000, as measured). Peaks of the same code vary by some 50-70 MiB from run "
            "to run (allocator caching), which is why the streamed runs are not ordered by N.",
            "",
            *lines,
        ]
    )
    write_section(ROOT / "docs" / "benchmarks.md", "sample-memory", body)


if __name__ == "__main__":
    main()
