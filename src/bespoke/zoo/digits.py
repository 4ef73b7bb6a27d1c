"""The digits data of the demo models: scikit-learn's 1,797 8x8 digits, bilinearly upsampled to
16x16 and scaled to [-1, 1], with a fixed, class-stratified train / held-out split.

The data ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import BespokeError

__all__ = ["HELDOUT_PER_CLASS", "NUM_CLASSES", "SIZE", "load_digits16"]

NUM_CLASSES = 10
SIZE = 16
HELDOUT_PER_CLASS = 30  # 300 held-out images, 1,497 for training
_SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _all() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    heldout = torch.zeros(len(y), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        heldout[idx[torch.randperm(len(idx), generator=g)[:HELDOUT_PER_CLASS]]] = True
    return x, y, heldout


def load_digits16(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 16, 16) float32 in [-1, 1] and labels (N,) int64 of split train | heldout | all."""
    x, y, heldout = _all()
    if split == "all":
        return x.clone(), y.clone()
    if split not in ("train", "heldout"):
        raise BespokeError(f"unknown digits split {split!r}; valid: train, heldout, all")
    keep = heldout if split == "heldout" else ~heldout
    return x[keep].clone(), y[keep].clone()
