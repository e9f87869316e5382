"""An image folder of real image files built from what is on disk: MNIST digits pasted at random sizes
and positions on canvases of random sizes, saved as PNG and JPEG (some grayscale, some RGB, some RGBA),
in torchvision's ImageFolder layout. For tests, pipelines and benchmarks: files of varied sizes that
a teacher must decode and cut views from, as real image sets are."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kdcache.errors import SpecError
from kdcache.vision import require


def render_digits(out: str | os.PathLike, per_class: int, split: str = "train", min_side: int = 40,
                  max_side: int = 160, seed: int = 0, data_root: str | None = None) -> Path:
    """Write ``per_class`` images of each digit under ``out/<digit>/``: the digit (MNIST ``split``,
    first images of each class) scaled to 40-90% of a canvas of ``min_side..max_side`` per side, at a
    random place inside the canvas's centred square (what a centre crop of the shorter side keeps, as a
    photograph keeps its subject near the middle), on a tinted noisy background, with a random colour.
    A third of the files are JPEG, one in ten grayscale PNG, one in ten RGBA PNG, the rest RGB PNG.
    Deterministic in ``seed``."""
    pil = require("PIL.Image", "render_digits")
    from kdcache.datasets import load_mnist
    if per_class < 1 or not 8 <= min_side <= max_side:
        raise SpecError("render_digits: need per_class >= 1 and 8 <= min_side <= max_side")
    mnist = load_mnist(split, data_root)
    labels = mnist.labels.numpy()
    g = np.random.default_rng(seed)
    out = Path(out)
    for digit in range(10):
        (out / str(digit)).mkdir(parents=True, exist_ok=True)
        ids = np.flatnonzero(labels == digit)[:per_class]
        if len(ids) < per_class:
            raise SpecError(f"render_digits: MNIST {split} has only {len(ids)} images of digit {digit}")
        for j, i in enumerate(ids):
            h, w = (int(v) for v in g.integers(min_side, max_side + 1, 2))
            canvas = (g.uniform(0, 80, 3)[None, None, :] + g.normal(0, 12, (h, w, 3))).clip(0, 255)
            side = int(min(h, w) * g.uniform(0.4, 0.9))
            digit_img = np.asarray(pil.fromarray(mnist.inputs[i].numpy()).resize((side, side), pil.BILINEAR),
                                   dtype=np.float64) / 255.0
            square = min(h, w)
            top = (h - square) // 2 + int(g.integers(0, square - side + 1))
            left = (w - square) // 2 + int(g.integers(0, square - side + 1))
            colour = g.uniform(150, 255, 3)
            region = canvas[top:top + side, left:left + side]
            ink = digit_img[..., None]
            canvas[top:top + side, left:left + side] = region * (1 - ink) + colour * ink
            rgb = canvas.round().astype(np.uint8)
            kind = j % 10
            name = out / str(digit) / f"{i:05d}"
            if kind < 3:
                pil.fromarray(rgb).save(f"{name}.jpg", quality=90)
            elif kind == 3:
                pil.fromarray(rgb).convert("L").save(f"{name}.png")
            elif kind == 4:
                alpha = np.full((h, w, 1), 255, dtype=np.uint8)
                pil.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(f"{name}.png")
            else:
                pil.fromarray(rgb).save(f"{name}.png")
    return out
