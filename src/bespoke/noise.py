"""Reproducible initial noise: sample i depends only on (seed, i).

Each sample is drawn from its own CPU `torch.Generator`, seeded with a hash of (seed, i), in
float64, then cast to `dtype` and moved to `device`. Hence, for the same seed:
  - the first k samples of a draw of n are the draw of k (prefix property);
  - how the samples are batched does not matter (draw(…, num=n)[a:b] is a slice of the same numbers);
  - float32 noise is float64 noise rounded, and a CUDA draw equals the CPU draw;
  - `start=a` draws samples a..a+num-1 without drawing the ones before them.
"""

from __future__ import annotations

import hashlib

import torch

from .errors import BespokeError

__all__ = ["draw_noise", "draw_labels", "sample_seed"]


def sample_seed(seed: int, index: int, domain: str = "noise") -> int:
    """The 63-bit generator seed of sample `index` under `seed` (a hash: distinct pairs do not collide in practice)."""
    digest = hashlib.blake2b(f"bespoke-{domain}:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_num_seed(num, seed, start=0) -> None:
    for name, value in (("num", num), ("seed", seed), ("start", start)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise BespokeError(f"{name} must be an integer, got {value!r}")
    if num < 0:
        raise BespokeError(f"num must be >= 0, got {num}")
    if start < 0:
        raise BespokeError(f"start must be >= 0, got {start}")


def draw_noise(
    shape, num: int, seed: int, dtype: torch.dtype = torch.float32, device="cpu", *, start: int = 0
) -> torch.Tensor:
    """Standard normal noise of shape (num, *shape), sample i drawn from its own generator seeded from (seed, i).

    Row j holds sample start + j, so draw_noise(..., num=n, start=a) == draw_noise(..., num=a + n)[a:].
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    _check_num_seed(num, seed, start)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape):
        raise BespokeError(f"shape must be positive integers, got {shape}")
    out = torch.empty((num, *shape), dtype=torch.float64)
    gen = torch.Generator()
    for i in range(num):
        gen.manual_seed(sample_seed(seed, start + i))
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return out.to(device=device, dtype=dtype)


def draw_labels(num: int, num_classes: int, seed: int, device="cpu", *, start: int = 0) -> torch.Tensor:
    """Class labels in 0..num_classes-1 (int64), label i a function of (seed, i) only, like `draw_noise`."""
    _check_num_seed(num, seed, start)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise BespokeError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    labels = [sample_seed(seed, i, "labels") % num_classes for i in range(start, start + num)]
    return torch.tensor(labels, dtype=torch.long, device=device)
