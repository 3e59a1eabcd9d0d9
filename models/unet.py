"""A small U-Net for ε-prediction, after the DDPM network (Ho et al. 2020, §4 and App. B), which follows
PixelCNN++'s backbone: a sinusoidal timestep embedding through an MLP, residual blocks with GroupNorm and
SiLU (swish) into which the embedding is added, self-attention at the lowest resolution, and skip
connections from each block of the downsampling path to the matching block of the upsampling path.
Class conditioning (for classifier-free guidance, Ho & Salimans 2022) adds a learned class embedding to
the timestep embedding; one extra class index, `num_classes`, is the "no label" ∅.

The layers that end a residual branch (each block's last convolution, the attention output projection)
and the output convolution start at zero, as in the DDPM and improved-DDPM code: every block then starts
as the identity, which lets deeper stacks train from the first step.
"""

from __future__ import annotations

import math

import numpy as np

import core
from core import F, nn


def timestep_embedding(t, dim, max_period=10000.0):
    """The sinusoidal embedding of the integer timesteps t (B,) as (B, dim) (Vaswani et al. 2017, §3.5, used by
    DDPM §4): [cos(t·ω_k), sin(t·ω_k)] with ω_k = max_period^(−k/(dim/2)), k = 0 … dim/2 − 1."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
    args = np.asarray(t, dtype=np.float64)[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=1)
    return emb


def zero_(module):
    """Set a module's parameters to zero (in place) and return it."""
    for p in module.parameters():
        p.data[...] = 0
    return module


def norm(channels):
    """GroupNorm with 8 groups (or fewer when the channels do not divide), as the models here are narrow."""
    groups = math.gcd(8, channels)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv(dropout(SiLU(GN(h)))); out = skip(x) + h."""

    def __init__(self, cin, cout, emb_dim, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = norm(cout), zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb)).reshape(h.shape[0], -1, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, residual: x + proj(attn(GN(x)))."""

    def __init__(self, channels, heads=4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"AttentionBlock: channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, HW, C/heads)
        return x + self.proj(out.permute(0, 1, 3, 2).reshape(b, c, h, w))


class Block(nn.Module):
    """A residual block, followed by self-attention when `attention` (the blocks at the lowest resolution)."""

    def __init__(self, cin, cout, emb_dim, dropout, attention, heads):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, dropout)
        self.attn = AttentionBlock(cout, heads) if attention else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3×3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """ε_θ(x_t, t, y): `channels` × `mults[i]` feature channels at level i (resolution halved per level),
    `blocks` residual blocks per level on the way down and `blocks + 1` on the way up (each consuming one
    skip), attention at the lowest resolution and in the middle. `num_classes=None`: unconditional."""

    def __init__(self, in_channels=1, channels=32, mults=(1, 2), blocks=1, num_classes=None, dropout=0.0, heads=4):
        super().__init__()
        emb_dim = 4 * channels
        self.channels, self.num_classes = channels, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # index K is ∅
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        lowest = len(mults) - 1
        self.down, skips, c = nn.ModuleList(), [channels], channels
        for level, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(Block(c, channels * m, emb_dim, dropout, level == lowest, heads))
                c = channels * m
                skips.append(c)
            if level != lowest:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid = Block(c, c, emb_dim, dropout, True, heads)
        self.mid2 = ResBlock(c, c, emb_dim, dropout)
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(Block(c + skips.pop(), channels * m, emb_dim, dropout, level == lowest, heads))
                c = channels * m
            if level != 0:
                self.up.append(Upsample(c))
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero_(nn.Conv2d(c, in_channels, 3, padding=1)))

    def embed(self, t, y):
        """The conditioning vector: MLP(sinusoid(t)) (+ the label's embedding; y = num_classes means ∅)."""
        emb = self.time_mlp(core.tensor(timestep_embedding(t, self.channels), dtype=self.inp.weight.dtype))
        if self.label_emb is not None:
            if y is None:
                y = np.full(len(t), self.num_classes)
            emb = emb + self.label_emb(core.tensor(np.asarray(y, dtype=np.int64)))
        elif y is not None:
            raise ValueError("UNet: labels given to an unconditional model (num_classes=None)")
        return emb

    def forward(self, x, t, y=None):
        """x_t (B, C, H, W), integer timesteps t (B,), labels y (B,) or None → ε̂ (B, C, H, W)."""
        emb = self.embed(np.asarray(t), y)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid(h, emb), emb)
        for layer in self.up:
            h = layer(core.cat([h, hs.pop()], 1), emb) if isinstance(layer, Block) else layer(h)
        return self.out(h)
