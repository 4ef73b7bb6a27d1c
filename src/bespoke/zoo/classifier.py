"""The digits classifier behind FD-digits (DESIGN §8): a small CNN trained by our own code on the
TRAIN split of `load_digits16` and shipped as safetensors. `python -m bespoke.zoo.classifier` retrains it.

    conv 1->32 3x3 ReLU -> conv 32->64 3x3 stride 2 ReLU -> conv 64->64 3x3 stride 2 ReLU
    -> flatten (64*4*4) -> Linear 1024->128 ("features") -> ReLU -> dropout -> Linear 128->10

`features` is the penultimate layer before its ReLU (more nearly Gaussian than after it), the role of
Inception's pool3 in FID. Training: seeded, Adam with cosine decay, random +-1 pixel shifts (background
-1 padded in), held-out accuracy measured once at the end (never used to pick a checkpoint).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BespokeError
from ..io import load_tensors, save_tensors
from .digits import NUM_CLASSES, SIZE, load_digits16

__all__ = ["DigitsClassifier", "ClassifierRecipe", "CLASSIFIER_PATH", "train_classifier", "load_classifier"]

CLASSIFIER_PATH = Path(__file__).parent / "weights" / "digits-classifier.safetensors"


class DigitsClassifier(nn.Module):
    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)  # 16x16
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)  # 8x8
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)  # 4x4
        self.fc = nn.Linear(c3 * (SIZE // 4) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) images in [-1, 1] -> (B, feature_dim) penultimate features (pre-ReLU)."""
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.fc(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.features(x))))


@dataclass(frozen=True)
class ClassifierRecipe:
    epochs: int = 30
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    shift: int = 1  # max random translation in pixels
    channels: tuple[int, int, int] = (32, 64, 64)
    feature_dim: int = 128
    dropout: float = 0.3
    seed: int = 0


def _random_shift(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by an independent integer offset in [-shift, shift]^2, padding with -1."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * shift + 1, (b, 1), generator=g) for _ in range(2))
    rows = (torch.arange(h) + dy)[:, :, None]  # (b, h, 1)
    cols = (torch.arange(w) + dx)[:, None, :]  # (b, 1, w)
    return xp[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(net: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = net.training
    net.eval()
    acc = (net(x).argmax(1) == y).double().mean().item()
    net.train(was_training)
    return acc


def train_classifier(
    recipe: ClassifierRecipe = ClassifierRecipe(), path: Path = CLASSIFIER_PATH, *, quiet=False
) -> dict:
    """Train on the train split, write weights + metadata atomically to `path`, return the metadata."""
    torch.manual_seed(recipe.seed)  # init and dropout
    g = torch.Generator().manual_seed(recipe.seed)  # batches and shifts
    x, y = load_digits16("train")
    xh, yh = load_digits16("heldout")
    net = DigitsClassifier(recipe.channels, recipe.feature_dim, recipe.dropout)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-x.shape[0] // recipe.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(recipe.epochs):
        net.train()
        perm, total = torch.randperm(x.shape[0], generator=g), 0.0
        for idx in perm.split(recipe.batch):
            loss = F.cross_entropy(net(_random_shift(x[idx], recipe.shift, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if not quiet:
            print(f"epoch {epoch + 1:3d}/{recipe.epochs}  loss {total / x.shape[0]:.4f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    net.eval()
    meta = {
        "name": "digits-classifier",
        "recipe": {**asdict(recipe), "channels": list(recipe.channels)},
        "arch": {"channels": list(recipe.channels), "feature_dim": recipe.feature_dim, "dropout": recipe.dropout},
        "training": {
            "epochs": recipe.epochs,
            "wall_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "train_images": int(x.shape[0]),
        },
        "train_accuracy": round(accuracy(net, x, y), 4),
        "heldout_accuracy": round(accuracy(net, xh, yh), 4),
        "heldout_images": int(xh.shape[0]),
        "num_params": sum(p.numel() for p in net.parameters()),
    }
    save_tensors(path, net.state_dict(), meta)
    return meta


_RETRAIN = "retrain it: python -m bespoke.zoo.classifier"


def classifier_metadata(path: Path = CLASSIFIER_PATH) -> dict:
    """The JSON metadata stored with the weights (architecture, training time, held-out accuracy, ...)."""
    return load_tensors(path, _RETRAIN)[1]


@lru_cache(maxsize=4)
def load_classifier(path: Path = CLASSIFIER_PATH) -> DigitsClassifier:
    """The shipped classifier (safetensors, no pickle) in eval mode with gradients off; cached per path."""
    state, meta = load_tensors(path, _RETRAIN)
    arch = meta["arch"]
    net = DigitsClassifier(tuple(arch["channels"]), arch["feature_dim"], arch["dropout"])
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise BespokeError(f"{path} does not match the classifier architecture ({e}); {_RETRAIN}") from e
    return net.eval().requires_grad_(False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bespoke.zoo.classifier", description="Train the FD-digits classifier.")
    ap.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    ap.add_argument("--epochs", type=int, default=ClassifierRecipe.epochs)
    ap.add_argument("--seed", type=int, default=ClassifierRecipe.seed)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = train_classifier(ClassifierRecipe(epochs=args.epochs, seed=args.seed), args.out, quiet=args.quiet)
    acc, secs = meta["heldout_accuracy"], meta["training"]["wall_seconds"]
    print(f"{args.out}  held-out accuracy {acc:.4f}  ({secs} s, {meta['num_params']} params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
