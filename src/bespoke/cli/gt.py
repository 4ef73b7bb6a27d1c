"""`bespoke gt`: make, resume or extend a ground-truth cache (noise -> dopri5 sample pairs).

    bespoke gt --model zoo:digits-ot --num 1024 --out gt/ [--trajectory 65] [--seed 0]

Pair i depends only on (model, seed, i, shard size, tolerances); class-conditional models get labels
drawn from the seed. Run the same command again to resume a killed run or extend the cache.
"""

from __future__ import annotations

import math
import time

import bespoke
from bespoke import budget

from .common import add_model_args, add_run_args, device, integer, load_flow, positive_float, positive_int, say


def register(sub) -> None:
    p = sub.add_parser(
        "gt",
        help="make a ground-truth cache (dopri5 pairs) for training and evaluation",
        description="Solve the model with dopri5 from seeded noise and store the (noise, sample) pairs in "
        "checksummed safetensors shards; resumes and extends.",
    )
    add_model_args(p, labels=False)
    p.add_argument(
        "-n",
        "--num",
        type=positive_int,
        required=True,
        help="number of pairs, rounded up to whole shards (under torchrun write -n: it takes --num for its own "
        "--numa-binding)",
    )
    p.add_argument("--out", required=True, metavar="GT_DIR", help="the cache directory")
    p.add_argument(
        "--trajectory",
        type=integer,
        default=0,
        metavar="K",
        help="also store each solution at K times (needed to train bespoke-rk1/rk2; 65 is a good choice)",
    )
    p.add_argument("--shard-size", type=positive_int, default=128, help="pairs per shard (default 128)")
    p.add_argument("--rtol", type=positive_float, default=1e-5, help="dopri5 rtol (default 1e-5)")
    p.add_argument("--atol", type=positive_float, default=1e-5, help="dopri5 atol (default 1e-5)")
    add_run_args(p)
    p.set_defaults(func=cmd_gt)


def _check_budget(args, flow, dev: str) -> None:
    """Refuse, before any solve, a cache that cannot fit on the disk or a shard whose solve cannot fit in memory.
    Sizes are upper bounds (8 bytes a number; the stored dtypes may be smaller)."""
    numel, k = math.prod(flow.sample_shape), args.trajectory
    pairs = -(-args.num // args.shard_size) * args.shard_size
    stored = pairs * (numel * 8 * (2 + 2 * k) + 8)
    what = f"a GT cache of {pairs} pairs" + (f" with trajectories at {k} times" if k else "")
    budget.require(stored, what=what, fix="ask for fewer pairs or write to another disk", disk=args.out)
    budget.require(stored, what=f"loading {what}", fix="ask for fewer pairs (-n)", device="cpu")
    solve = budget.ground_truth_bytes(args.shard_size, numel, k)
    budget.require(solve, what=f"solving shards of {args.shard_size} pairs", fix="lower --shard-size", device=dev)


def cmd_gt(args) -> int:
    dev = device(args.device)
    flow = load_flow(args)
    _check_budget(args, flow, dev)
    t0 = time.perf_counter()
    cache = bespoke.generate_gt(
        flow,
        args.out,
        num=args.num,
        seed=args.seed,
        shard_size=args.shard_size,
        rtol=args.rtol,
        atol=args.atol,
        trajectory=args.trajectory,
        device=dev,
        quiet=args.quiet,
    )
    traj = f", trajectories at {args.trajectory} times" if args.trajectory else ""
    nfe = f"{min(cache.nfe)}-{max(cache.nfe)}" if cache.nfe else "no"
    print(f"{args.out}: {len(cache)} pairs for {flow.name} (seed {args.seed}, dopri5 {nfe} NFE per sample{traj})")
    say(args, f"done in {time.perf_counter() - t0:.1f} s")
    return 0
