"""Benchmark: each solver's own cost, sampling time / (NFE x one bare network forward), on the digit models.

    python benchmarks/overhead.py [--models digits-ot,digits-vp] [--nfe 4,8,16] [--batch 256] [--repeats 5]

Per model (loaded as `bespoke sample` loads it, default guidance included) and NFE: every built-in solver at
the largest NFE it takes, a BNS solver (from midpoint, its b made dense lower-triangular), a preconditioned BNS
solver (sigma0 = 2, where the model's path allows it) and RK1-/RK2-Bespoke solvers (identity transform), all
bound to the model as trained ones are. Each sample() of one batch is timed under torch.no_grad() (one warm-up,
then the median of --repeats runs, same seeded noise and labels); the bare forward is the model's network
called with the inputs the flow adapter hands it (time input, labels) at --batch, timed the same way. A ratio
of 1.00 means the solver costs nothing beyond its network calls.

The direct ratio scatters by about +-10% on a shared 2-core VM, more than the overhead it measures. So each
solver is also run with the network's forward replaced by one elementwise op (a "no-op network"): what is left
is the solver's and the adapter's own work, timed to a fraction of a millisecond, and
    ratio_own = 1 + own time / (NFE x bare forward)
is the overhead this decomposition implies. Nothing is cached: every run re-measures.
Writes the section `overhead` of docs/benchmarks.md (--out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine, publish  # benchmarks/common.py

import bespoke
from bespoke.errors import BespokeError, NonFiniteVelocity
from bespoke.noise import draw_labels, draw_noise
from bespoke.solvers import SOLVER_NAMES, largest_valid_nfe
from bespoke.solvers.bns import BNSSolver
from bespoke.solvers.scale_time import BespokeSolver
from bespoke.zoo.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
MARK = "overhead"
LEARNED = ("bns", "bns σ0=2", "bespoke-rk1", "bespoke-rk2")
T_PROBE = 0.5  # the time of the bare forward and of the single flow call (the network's cost does not depend on it)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn() (the caller has warmed it up)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def adapter_call(flow, x, labels):
    """(network, args, kwargs) of the network call that flow(T_PROBE, x, labels=labels) makes."""
    nets, calls = [], []
    find = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, _: nets.append(m) if isinstance(m, UNet) else None
    )
    try:
        flow(T_PROBE, x, labels=labels)
    finally:
        find.remove()
    grab = nets[0].register_forward_pre_hook(lambda _, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        flow(T_PROBE, x, labels=labels)
    finally:
        grab.remove()
    return nets[0], *calls[0]


def bare_forward(flow, x, labels):
    """(network, args, kwargs) of the bare forward at x's batch, and the batch the adapter calls the network at.

    The inputs are the adapter's own (time input, dtype, labels); a guided flow calls the network at twice
    the batch (conditional half first, then the null labels), so the bare forward keeps the first half."""
    net, args, kwargs = adapter_call(flow, x, labels)
    net_batch = args[0].shape[0]

    def cut(v):
        return v[: len(x)].clone() if torch.is_tensor(v) and v.dim() and len(v) == net_batch else v

    return net, [cut(a) for a in args], {k: cut(v) for k, v in kwargs.items()}, net_batch


def make_solver(kind: str, nfe: int, flow):
    """The solver `kind` for at most `nfe` network calls; learned ones bound to `flow`, as trained ones are."""
    if kind in SOLVER_NAMES:
        return bespoke.solver(kind, nfe=largest_valid_nfe(kind, nfe))
    if kind.startswith("bespoke-rk"):
        order = int(kind[-1])
        return BespokeSolver.identity(order, nfe - nfe % order).bind_model(flow)
    base = bespoke.solver("midpoint" if nfe % 2 == 0 else "euler", nfe=nfe)
    s = BNSSolver.from_solver(base, flow, sigma0=2.0 if "σ0" in kind else 1.0)
    with torch.no_grad():  # a dense lower triangle: its values do not change the cost, but no zero can be skipped
        gen = torch.Generator().manual_seed(nfe)
        s.b.add_(1e-3 * torch.randn(s.b.shape, generator=gen, dtype=s.b.dtype) * s.mask)
    return s


class NoOpNetwork:
    """Within the block, `net` returns 0.5 x its first input instead of running its layers (one elementwise op)."""

    def __init__(self, net):
        self.net = net

    def __enter__(self):
        self.net.forward = lambda x, *args, **kwargs: x * 0.5  # an instance attribute shadows the class's forward

    def __exit__(self, *exc):
        del self.net.forward


def solver_cell(kind: str, nfe: int, flow, noise, labels, args, bare, net) -> dict:
    """{"ratio", "own", "nfe", "seconds", "forward"} of solver `kind` at `nfe` (NFE counted on the flow): the
    measured ratio, and the solver's and adapter's own time with a no-op network; ratio NaN if it cannot run."""
    try:
        s = make_solver(kind, nfe, flow)
    except BespokeError:  # sigma0 != 1 on a path whose SNR does not reach 0 at t = 0 (VP)
        return {"ratio": float("nan"), "nfe": None}
    run = lambda: s.sample(flow, noise, labels=labels)  # noqa: E731
    try:
        with flow.counting() as c:  # also the warm-up
            run()
    except NonFiniteVelocity:  # e.g. heun, rk4 evaluate at t = 1, where a VP path is singular
        return {"ratio": float("nan"), "nfe": None}
    before = median_seconds(bare, args.repeats)  # the bare forward timed next to the solver, before and after:
    seconds = median_seconds(run, args.repeats)  # the machine's speed drifts over minutes, a ratio must not
    forward = (before + median_seconds(bare, args.repeats)) / 2
    with NoOpNetwork(net):
        run()  # warm-up
        own = median_seconds(run, 5 * args.repeats)
    return {"ratio": seconds / (c.nfe * forward), "own": own, "nfe": c.nfe, "seconds": seconds, "forward": forward}


def run_model(name: str, args) -> dict:
    flow = bespoke.load_model(f"zoo:{name}")
    noise = flow.initial_state(draw_noise(flow.sample_shape, args.batch, seed=0))
    labels = draw_labels(args.batch, flow.num_classes, seed=0)
    cells = {}
    with torch.no_grad():
        net, a, k, net_batch = bare_forward(flow, noise, labels)  # its two flow calls warm up the flow call
        net(*a, **k)  # the bare forward's own warm-up (its batch may differ from the adapter's)
        bare = lambda: net(*a, **k)  # noqa: E731
        forward = median_seconds(bare, 3 * args.repeats)
        call = median_seconds(lambda: flow(T_PROBE, noise, labels=labels), 3 * args.repeats)
        for kind in (*SOLVER_NAMES, *LEARNED):
            cells[kind] = {n: solver_cell(kind, n, flow, noise, labels, args, bare, net) for n in args.nfe}
            print(name, kind, " ".join(f"{c['ratio']:.3f}" for c in cells[kind].values()), flush=True)
    for row in cells.values():  # the decomposition, on one forward time per model (the median of all taken)
        for c in row.values():
            if c["nfe"]:
                c["ratio_own"] = 1 + c["own"] / (c["nfe"] * forward)
    return {"model": name, "forward": forward, "call": call, "net_batch": net_batch, "cells": cells}


def cell_text(c: dict, nfe: int) -> str:
    """own-time ratio · measured ratio · own ms per NFE (NFE in brackets where it differs from the column)."""
    if c["ratio"] != c["ratio"]:
        return "n/a"
    text = f"**{c['ratio_own']:.3f}** · {c['ratio']:.2f} · {1e3 * c['own'] / c['nfe']:.2f}"
    return text + (f" ({c['nfe']})" if c["nfe"] != nfe else "")


def table(res: dict, nfes) -> list[str]:
    lines = [f"### zoo:{res['model']}", "", "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |"]
    lines.append("|" + "---|" * (len(nfes) + 1))
    for kind, cells in res["cells"].items():
        lines.append(f"| {kind} | " + " | ".join(cell_text(cells[n], n) for n in nfes) + " |")
    worst = []
    for n in nfes:
        ok = [c[n] for c in res["cells"].values() if c[n]["ratio"] == c[n]["ratio"]]
        own, measured = (max((c[k] for c in ok), default=float("nan")) for k in ("ratio_own", "ratio"))
        worst.append(f"**{own:.3f}** · {measured:.2f}")
    return lines + ["| **max** | " + " | ".join(worst) + " |", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-ot,digits-vp")
    ap.add_argument("--nfe", default="4,8,16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args(argv)
    args.nfe = [int(n) for n in args.nfe.split(",")]
    started = time.perf_counter()
    results = [run_model(m, args) for m in args.models.split(",")]

    cmd = (
        f"python benchmarks/overhead.py --models {args.models} --nfe {','.join(map(str, args.nfe))} "
        f"--batch {args.batch} --repeats {args.repeats}"
    )
    lines = [
        "## Solver overhead: sampling time against the network's own",
        "",
        f"Command: `{cmd}` · machine: {machine()}, no GPU.",
        "",
        f"Ratio = median time of one `solver.sample` of {args.batch} samples / (NFE x median time of one bare network "
        f"forward at batch {args.batch}), under torch.no_grad(), after one warm-up, median of {args.repeats} runs, "
        "the forward timed just before and just after each solver (the mean of the two medians); 1.00 = no cost "
        "beyond the network calls, goal <= 1.02. Each cell: **ratio from own time** · measured ratio · own time "
        "per NFE in ms. *Own time* is a whole `sample` with the network's forward replaced by one elementwise op "
        f"(median of {5 * args.repeats} runs): the solver's and the adapter's work without the network; "
        "ratio from own time = 1 + own time / (NFE x bare forward). The measured ratio scatters by about ±10% on "
        "this shared VM (values below 1 included), far more than the overhead; the own-time ratio does not. The bare "
        "forward is the model's network called directly with the inputs the flow adapter gives it (time input, "
        "labels). Built-in solvers at the largest NFE they take (in brackets where it differs from the column); "
        "BNS from midpoint (euler at an odd NFE) with a dense lower-triangular b; `bns σ0=2`: preconditioned "
        "BNS (n/a on a path whose SNR does not reach 0 at t = 0); RK1/RK2-Bespoke with the identity transform; "
        "n/a also where the solver evaluates where the model is singular (heun, rk4 at t = 1 of a VP path). "
        "`flow call` = one `flow(t, x, labels=...)` / bare forward: the adapter's own cost, which every ratio "
        "includes.",
        "",
        "| model | bare forward | network batch per flow call | flow call / bare forward |",
        "|---|---|---|---|",
        *(
            f"| zoo:{r['model']} | {1e3 * r['forward']:.1f} ms | {r['net_batch']} | {r['call'] / r['forward']:.2f} |"
            for r in results
        ),
        "",
    ]
    for res in results:
        lines += table(res, args.nfe)
    publish(args.out, MARK, lines[:-1], started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
