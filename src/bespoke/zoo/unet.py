"""A compact class-conditional convolutional UNet for the 16x16 demo models.

16x16 -> 8x8 -> 4x4 and back, one residual block per level, a sinusoidal time embedding and a class
embedding with one extra row for the null (unconditional) label, used by classifier-free guidance.
Sized so that one forward pass of a batch of 256 takes well under 0.1 s on a 2-core CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["UNet"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of a (batch,) time in [0, ~1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """forward(x, t, labels=None): x (B, 1, 16, 16), t (B,) time in the model's own units."""

    def __init__(
        self, channels: tuple[int, int] = (32, 48), emb: int = 128, num_classes: int = 10, time_scale: float = 1000.0
    ):
        super().__init__()
        c, c2 = channels
        self.num_classes = num_classes
        self.time_scale = time_scale  # maps the model's time onto ~[0, 1000] for the embedding
        self.emb_dim = emb
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes + 1, emb)  # last row: the null label
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb)
        self.pool1 = nn.Conv2d(c, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid = ResBlock(c2, c2, emb)
        self.up2 = ResBlock(2 * c2, c2, emb)
        self.up1 = ResBlock(c2 + c, c, emb)
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x, t, labels=None):
        if labels is None:
            labels = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
        e = self.time_mlp(timestep_embedding(t * self.time_scale, self.emb_dim)) + self.label_emb(labels.long())
        h0 = self.down1(self.conv_in(x), e)  # 16x16
        h1 = self.down2(self.pool1(h0), e)  # 8x8
        h = self.mid(self.pool2(h1), e)  # 4x4
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up2(torch.cat([h, h1], 1), e)
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up1(torch.cat([h, h0], 1), e)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
