"""Augmentations applied to batches with torch (no torchvision), deterministic given a generator."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def jitter(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image ``[B, (C,) H, W]`` by up to ``max_shift`` pixels in each direction, zero-filled."""
    if max_shift <= 0:
        return x
    s = max_shift
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s))
    shifts = torch.randint(-s, s + 1, (len(x), 2), generator=generator)
    out = torch.empty_like(x)
    for dy, dx in itertools.product(range(-s, s + 1), repeat=2):
        sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        if sel.any():
            out[sel] = padded[sel][..., s + dy:s + dy + h, s + dx:s + dx + w]
    return out
