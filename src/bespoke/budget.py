"""What a job will need, estimated before it starts: memory for the states a solve holds, disk for the files
it writes. A size that cannot fit is refused at once with the estimate, instead of an out-of-memory error
(or a full disk) half-way through.

The estimates count the float64 states the solvers hold, not the network's own activations, so they are
lower bounds: a job they let through can still run out of memory on a large network.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from .errors import BespokeError

__all__ = [
    "GiB",
    "available_memory",
    "free_disk",
    "require",
    "solve_bytes",
    "training_bytes",
    "ground_truth_bytes",
    "human",
]

GiB = 1024**3
_F64 = 8
_STAGES = 12  # dopri5 holds y, its 7 stages, the error estimate and a few temporaries per sample
_PROGRAM_STATES = 6  # a built-in solver keeps x0, x and at most four earlier velocities (iPNDM)


def human(nbytes: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{math.ceil(nbytes / 1024)} KiB"


def available_memory(device="cpu") -> int | None:
    """Bytes that can still be allocated on `device` (MemAvailable on the CPU), or None where unknown."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path) -> int:
    """Free bytes on the filesystem that will hold `path` (its nearest existing parent)."""
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def require(nbytes: float, *, what: str, fix: str, device="cpu", disk=None) -> None:
    """Refuse `what` if its estimate `nbytes` exceeds the free memory of `device` (or, with disk=PATH, the free
    space where PATH will be written): one line with the estimate, what is free, and `fix`."""
    have = free_disk(disk) if disk is not None else available_memory(device)
    if have is not None and nbytes > have:
        where = f"free on the disk of {disk}" if disk is not None else f"available in {device} memory"
        raise BespokeError(f"{what} needs about {human(nbytes)}, but only {human(have)} is {where}; {fix}")


def solve_bytes(nfe: int, batch: int, numel: int, *, history: bool) -> int:
    """Memory of one solver run over `batch` samples of `numel` numbers: float64 states (an NS-form solver,
    i.e. a learned one, keeps all n velocities and its n x n weights; a built-in one a few states) and the
    time grid."""
    states = nfe + 2 if history else _PROGRAM_STATES
    weights = nfe * nfe * _F64 if history else 0
    return states * batch * numel * _F64 + weights + (nfe + 1) * 32


def training_bytes(nfe: int, batch: int, numel: int) -> int:
    """Memory of training an NS-form solver on `batch` pairs: its forward states, kept for the backward
    pass, and their gradients (a lower bound: the network's activations come on top)."""
    return 3 * solve_bytes(nfe, batch, numel, history=True)


def ground_truth_bytes(batch: int, numel: int, trajectory: int = 0) -> int:
    """Memory of a dopri5 solve of `batch` samples, with dense states and velocities at `trajectory` times."""
    return (_STAGES + 2 * trajectory) * batch * numel * _F64
