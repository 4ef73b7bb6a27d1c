"""Running across processes with torch.distributed (launched by `torchrun`), and alone without it.

Every helper is the identity in a single process, so the code that calls them reads the same either
way: ground truth splits its shards over ranks, training splits each mini-batch and all-reduces the
(tiny) solver's gradients, and only rank 0 writes files and progress.

    torchrun --nproc_per_node 2 -m bespoke gt --model zoo:digits-ot --num 1024 --out gt/
    torchrun --nproc_per_node 2 -m bespoke train --model zoo:digits-ot --gt gt/ --solver bns --nfe 8 --out b.safetensors
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "is_main", "init_from_env", "local_device", "all_reduce_sum", "all_gather", "barrier"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: str) -> bool:
    """Join the process group `torchrun` describes in the environment (WORLD_SIZE > 1): nccl for CUDA,
    gloo otherwise. Returns whether this is a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        return _active()
    dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return True


def local_device(device: str) -> str:
    """Under torchrun each process takes its own GPU (cuda:LOCAL_RANK); CPU stays CPU."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` over ranks in place (nothing alone)."""
    if world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] alone)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
