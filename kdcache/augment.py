"""Augmentations on batches, written in torch (no torchvision), split in two halves: ``sample`` draws
each item's parameters from a generator, ``apply`` is a deterministic function of the inputs and
those parameters. A store with views keeps the parameters themselves, so a view is replayed from
numbers, never from a random state (see kdcache/store/FORMAT.md, "Views").

The protocol, for a user's own augmentation (``--augment package.module:callable``, the callable
returning such an object)::

    columns: tuple[str, ...]                      # one name per parameter
    def sample(self, generator, n, item_shape) -> torch.Tensor   # float [n, len(columns)]
    def apply(self, x, params) -> torch.Tensor                   # x [n, *item_shape], params [n, P]

``apply`` must give each item the same result whatever else is in the batch, and must not draw
random numbers. ``check_shape(item_shape)`` (optional) raises ``ValueError`` with a reason for items
it cannot handle.

The built-ins also draw from 64-bit keys, one per item (``sample_keyed(keys, item_shape)``), with
counter-based uniforms (:func:`uniforms`): a store's views are drawn for thousands of rows at once
in numpy, not one generator per row.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.errors import SpecError


class Augmentation(Protocol):
    columns: tuple[str, ...]

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor: ...

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor: ...


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """``[n, count]`` float64 in [0, 1): ``u[i, j] = (splitmix64(splitmix64(keys[i]) + j) >> 11) / 2**53``
    (keys are mixed first, so that neighbouring keys do not share counters)."""
    with np.errstate(over="ignore"):
        counters = splitmix64(keys.astype(np.uint64))[:, None] + np.arange(count, dtype=np.uint64)[None, :]
    return (splitmix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def derive_keys(keys: np.ndarray, part: int) -> np.ndarray:
    """The keys of part ``part`` of a composition: ``splitmix64(keys ^ (part + 1) * 0xD1B54A32D192ED03)``."""
    with np.errstate(over="ignore"):
        return splitmix64(keys.astype(np.uint64) ^ (np.uint64(part + 1) * np.uint64(0xD1B54A32D192ED03)))


def _keys_from(generator: torch.Generator, n: int) -> np.ndarray:
    return torch.randint(0, 2 ** 62, (n,), generator=generator).numpy().astype(np.uint64)


def _ints(u: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Integers in ``lo..hi`` from uniforms: ``lo + floor(u * (hi - lo + 1))``."""
    return lo + np.floor(u * (hi - lo + 1))


def _image_shape(name: str, item_shape: Sequence[int]) -> tuple[int, int]:
    if len(item_shape) not in (2, 3) or min(item_shape[-2:]) < 1:
        raise ValueError(f"{name} needs image items [H, W] or [C, H, W], not items of shape {tuple(item_shape)}")
    return int(item_shape[-2]), int(item_shape[-1])


def _sizes(name: str, item_shape: Any, n: int) -> tuple[Any, Any]:
    """``(H, W)`` of every row: one item shape for all (a tensor dataset), or an ``[n, 2]`` integer array
    of each original image's height and width (views cut from original images), as ``[n]`` arrays."""
    if isinstance(item_shape, np.ndarray) and item_shape.ndim == 2:
        return item_shape[:, 0].astype(np.float64), item_shape[:, 1].astype(np.float64)
    h, w = _image_shape(name, item_shape)
    return np.full(n, float(h)), np.full(n, float(w))


def _cut(img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """``img[..., top:top + height, left:left + width]`` of an image ``[C, H, W]``, zero where the box
    falls outside it."""
    h, w = img.shape[-2:]
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return img[..., top:top + height, left:left + width]
    out = img.new_zeros((*img.shape[:-2], height, width))
    y0, y1, x0, x1 = max(top, 0), min(top + height, h), max(left, 0), min(left + width, w)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top:y1 - top, x0 - left:x1 - left] = img[..., y0:y1, x0:x1]
    return out


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``out[i, ..., r, c] = x[i, ..., r + dy[i], c + dx[i]]``, zero where that falls outside the image."""
    h, w = x.shape[-2:]
    s = int(max(dy.abs().max(), dx.abs().max())) if len(dy) else 0
    if s == 0:
        return x.clone()
    padded = F.pad(x, (s, s, s, s))
    out = torch.zeros_like(x)
    for a, b in itertools.product(range(-min(s, h), min(s, h) + 1), range(-min(s, w), min(s, w) + 1)):
        sel = (dy == a) & (dx == b)
        if sel.any():
            out[sel] = padded[sel][..., s + a:s + a + h, s + b:s + b + w]
    return out  # shifts of a whole side or more leave zeros


@dataclass(frozen=True)
class Jitter:
    """The paper's jitter: shift by up to ``max_shift`` pixels in each direction, zero-filled.
    ``out[r, c] = x[r + shift_y, c + shift_x]``."""

    max_shift: int
    columns: tuple[str, ...] = ("shift_y", "shift_x")

    def check_shape(self, item_shape: Sequence[int]) -> None:
        _image_shape(f"jitter:{self.max_shift}", item_shape)

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        s = self.max_shift
        return torch.randint(-s, s + 1, (n, 2), generator=generator).float()

    def sample_keyed(self, keys: np.ndarray, item_shape: tuple[int, ...]) -> torch.Tensor:
        """``shift_y, shift_x = -N + floor(u[0:2] * (2N + 1))``."""
        return torch.from_numpy(_ints(uniforms(keys, 2), -self.max_shift, self.max_shift).astype(np.float32))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        p = params.long()
        return _shift(x, p[:, 0], p[:, 1])

    def cut(self, img: torch.Tensor, row: Sequence[float]) -> torch.Tensor:
        """On an original image: the window of its size shifted by ``(shift_y, shift_x)``, zero-filled."""
        return _cut(img, int(row[0]), int(row[1]), *img.shape[-2:])


@dataclass(frozen=True)
class Crop:
    """Random crop of the input's size after zero padding by ``pad`` on every side:
    ``out[r, c] = padded[top + r, left + c]``, ``top`` and ``left`` in ``0..2 * pad``."""

    pad: int
    columns: tuple[str, ...] = ("top", "left")

    def check_shape(self, item_shape: Sequence[int]) -> None:
        _image_shape(f"crop:{self.pad}", item_shape)

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        return self.sample_keyed(_keys_from(generator, n), item_shape)

    def sample_keyed(self, keys: np.ndarray, item_shape: tuple[int, ...]) -> torch.Tensor:
        """``top, left = floor(u[0:2] * (2 PAD + 1))``."""
        return torch.from_numpy(_ints(uniforms(keys, 2), 0, 2 * self.pad).astype(np.float32))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        p = params.long() - self.pad
        return _shift(x, p[:, 0], p[:, 1])

    def cut(self, img: torch.Tensor, row: Sequence[float]) -> torch.Tensor:
        """On an original image: ``padded[top:top + H, left:left + W]`` of the image padded by PAD."""
        return _cut(img, int(row[0]) - self.pad, int(row[1]) - self.pad, *img.shape[-2:])


@dataclass(frozen=True)
class RandomCrop:
    """A ``size`` x ``size`` window at a random position, without padding (torchvision's RandomCrop):
    ``out[r, c] = x[top + r, left + c]``, ``top`` in ``0..H - size``. On a tensor dataset the window is
    resized back to the input's size (bilinear, as ``resized-crop``); an image smaller than the window
    is refused."""

    size: int
    columns: tuple[str, ...] = ("top", "left")

    def check_shape(self, item_shape: Sequence[int]) -> None:
        h, w = _image_shape(f"random-crop:{self.size}", item_shape)
        if min(h, w) < self.size:
            raise ValueError(f"random-crop:{self.size} needs images of at least {self.size}x{self.size}, "
                             f"not {h}x{w}")

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        return self.sample_keyed(_keys_from(generator, n), item_shape)

    def sample_keyed(self, keys: np.ndarray, item_shape: Any) -> torch.Tensor:
        """``top = floor(u[0] * (H - SIZE + 1))``, ``left = floor(u[1] * (W - SIZE + 1))``."""
        h, w = _sizes(f"random-crop:{self.size}", item_shape, len(keys))
        small = (h < self.size) | (w < self.size)
        if small.any():
            i = int(np.flatnonzero(small)[0])
            raise ValueError(f"random-crop:{self.size} needs images of at least {self.size}x{self.size}, "
                             f"not {int(h[i])}x{int(w[i])} (row {i})")
        u = uniforms(keys, 2)
        top, left = np.floor(u[:, 0] * (h - self.size + 1)), np.floor(u[:, 1] * (w - self.size + 1))
        return torch.from_numpy(np.stack([top, left], axis=1).astype(np.float32))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        s = torch.full((len(params), 1), float(self.size))
        return ResizedCrop(1.0).apply(x, torch.cat([params[:, :2], s, s], dim=1))

    def cut(self, img: torch.Tensor, row: Sequence[float]) -> torch.Tensor:
        return _cut(img, int(row[0]), int(row[1]), self.size, self.size)

    def cut_sizes(self, params: torch.Tensor, sizes: np.ndarray) -> np.ndarray:
        return np.full_like(sizes, self.size)


@dataclass(frozen=True)
class Flip:
    """Horizontal flip where ``flip`` is 1: ``out[r, c] = x[r, W - 1 - c]``."""

    columns: tuple[str, ...] = ("flip",)

    def check_shape(self, item_shape: Sequence[int]) -> None:
        _image_shape("flip", item_shape)

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        return self.sample_keyed(_keys_from(generator, n), item_shape)

    def sample_keyed(self, keys: np.ndarray, item_shape: tuple[int, ...]) -> torch.Tensor:
        """``flip = floor(u[0] * 2)``."""
        return torch.from_numpy(_ints(uniforms(keys, 1), 0, 1).astype(np.float32))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        sel = params[:, 0] > 0.5
        out = x.clone()
        out[sel] = x[sel].flip(-1)
        return out

    def cut(self, img: torch.Tensor, row: Sequence[float]) -> torch.Tensor:
        return img.flip(-1) if row[0] > 0.5 else img


@dataclass(frozen=True)
class ResizedCrop:
    """A crop of random area (``scale`` of the image) and aspect ratio, resized back to the input's
    size with bilinear interpolation (``torchvision``'s RandomResizedCrop parameters). Output pixel
    ``(r, c)`` samples the input at ``y = top + (r + 0.5) * height / H - 0.5``,
    ``x = left + (c + 0.5) * width / W - 0.5``, edges clamped."""

    scale_min: float
    scale_max: float = 1.0
    ratio_min: float = 3 / 4
    ratio_max: float = 4 / 3
    columns: tuple[str, ...] = ("top", "left", "height", "width")

    def check_shape(self, item_shape: Sequence[int]) -> None:
        _image_shape("resized-crop", item_shape)

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        return self.sample_keyed(_keys_from(generator, n), item_shape)

    def sample_keyed(self, keys: np.ndarray, item_shape: tuple[int, ...]) -> torch.Tensor:
        """torchvision's rule on uniforms ``u[0:22]``: ten tries of area ``H W (SMIN + (SMAX - SMIN) u[t])``
        and ratio ``exp(log RMIN + (log RMAX - log RMIN) u[10 + t])``, box ``round(sqrt(area * ratio))``
        wide and ``round(sqrt(area / ratio))`` high; the first that fits is placed at
        ``top = floor(u[20] (H - height + 1))``, ``left = floor(u[21] (W - width + 1))``; if none fits,
        the centred box of the whole image clamped to the ratio range."""
        n = len(keys)
        h, w = _sizes("resized-crop", item_shape, n)
        u = uniforms(keys, 22)
        area = (h * w)[:, None] * (self.scale_min + (self.scale_max - self.scale_min) * u[:, :10])
        lo, hi = math.log(self.ratio_min), math.log(self.ratio_max)
        ratio = np.exp(lo + (hi - lo) * u[:, 10:20])
        cw, ch = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
        ok = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
        first = ok.argmax(1)
        found = ok.any(1)
        rows = np.arange(n)
        ch, cw = ch[rows, first], cw[rows, first]
        top, left = np.floor(u[:, 20] * (h - ch + 1)), np.floor(u[:, 21] * (w - cw + 1))
        r = np.minimum(np.maximum(w / h, self.ratio_min), self.ratio_max)  # no try fitted: the centred box
        wide = w / h > r
        fw = np.where(wide, w, np.minimum(w, np.round(h * r)))
        fh = np.where(wide, np.minimum(h, np.round(w / r)), h)
        ch, cw = np.where(found, ch, fh), np.where(found, cw, fw)
        top, left = np.where(found, top, (h - fh) // 2), np.where(found, left, (w - fw) // 2)
        return torch.from_numpy(np.stack([top, left, ch, cw], axis=1).astype(np.float32))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        squeeze = x.ndim == 3
        img = x.unsqueeze(1) if squeeze else x
        n, _, h, w = img.shape
        top, left, ch, cw = (params[:, i:i + 1].float() for i in range(4))
        rows = top + (torch.arange(h, dtype=torch.float32) + 0.5) * ch / h - 0.5  # [n, H] source row
        cols = left + (torch.arange(w, dtype=torch.float32) + 0.5) * cw / w - 0.5  # [n, W] source column
        gy = (2 * rows + 1) / h - 1
        gx = (2 * cols + 1) / w - 1
        grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=-1)
        out = F.grid_sample(img.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out.to(x.dtype)
        return out.squeeze(1) if squeeze else out

    def cut(self, img: torch.Tensor, row: Sequence[float]) -> torch.Tensor:
        """On an original image: the box itself, ``img[top:top + height, left:left + width]`` (the
        dataset resizes the result to its ``size``)."""
        return _cut(img, int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def cut_sizes(self, params: torch.Tensor, sizes: np.ndarray) -> np.ndarray:
        return params[:, 2:4].numpy().astype(np.int64)


@dataclass(frozen=True)
class Compose:
    """Augmentations applied in order; the parameters are theirs side by side."""

    parts: tuple[Any, ...]
    names: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f"{n}.{c}" for n, p in zip(self.names, self.parts) for c in p.columns)

    def check_shape(self, item_shape: Sequence[int]) -> None:
        for p in self.parts:
            check_shape(p, item_shape)

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([_sampled(p, generator, n, item_shape) for p in self.parts], dim=1)

    @property
    def keyed(self) -> bool:
        return all(hasattr(p, "sample_keyed") for p in self.parts)

    def sample_keyed(self, keys: np.ndarray, item_shape: tuple[int, ...]) -> torch.Tensor:
        """Part ``i`` draws from ``derive_keys(keys, i)``."""
        return torch.cat([p.sample_keyed(derive_keys(keys, i), item_shape) for i, p in enumerate(self.parts)], dim=1)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        a = 0
        for p in self.parts:
            k = len(p.columns)
            x = p.apply(x, params[:, a:a + k])
            a += k
        return x

    @property
    def cuts(self) -> bool:
        return all(hasattr(p, "cut") for p in self.parts)

    def sample_sized(self, keys: np.ndarray, sizes: np.ndarray) -> torch.Tensor:
        """On original images: part ``i`` draws from ``derive_keys(keys, i)`` for the size the parts
        before it leave (a box part leaves its box's size; the others keep the size)."""
        out = []
        for i, p in enumerate(self.parts):
            params = p.sample_keyed(derive_keys(keys, i), sizes)
            out.append(params)
            sizes = p.cut_sizes(params, sizes) if hasattr(p, "cut_sizes") else sizes
        return torch.cat(out, dim=1)

    def cut(self, img: torch.Tensor, row: Sequence[float]) -> torch.Tensor:
        a = 0
        for p in self.parts:
            k = len(p.columns)
            img = p.cut(img, row[a:a + k])
            a += k
        return img


def cuts_originals(aug: Any) -> bool:
    """Whether ``aug`` can cut views from original images of any size (``cut(image, row)``): the
    built-ins and their compositions can; a user's augmentation applies to the resized images."""
    return hasattr(aug, "cut") and getattr(aug, "cuts", True)


def check_shape(aug: Any, item_shape: Sequence[int]) -> None:
    check = getattr(aug, "check_shape", None)
    if check is not None:
        check(tuple(item_shape))


def _sampled(aug: Any, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
    p = aug.sample(generator, n, item_shape)
    if not isinstance(p, torch.Tensor) or p.shape != (n, len(aug.columns)):
        got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise SpecError(f"augmentation {type(aug).__name__}.sample returned {got}, not a float tensor "
                        f"[{n}, {len(aug.columns)}] (one column per name in columns)")
    return p.float()


def _number(text: str, spec: str, kind: type) -> Any:
    try:
        v = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise SpecError(f"{{param:augment}} {spec!r}: {text!r} is not {what}") from None
    if v < 0:
        raise SpecError(f"{{param:augment}} {spec!r}: {text!r} must not be negative")
    return v


BUILTINS = ("jitter:N", "crop:PAD", "random-crop:SIZE", "flip",
            "resized-crop:SCALE_MIN[,SCALE_MAX[,RATIO_MIN,RATIO_MAX]]")


def _one(part: str, spec: str) -> Any:
    name, _, arg = part.partition(":")
    if name == "jitter":
        return Jitter(_number(arg, spec, int))
    if name == "crop":
        return Crop(_number(arg, spec, int))
    if name == "random-crop":
        size = _number(arg, spec, int)
        if size < 1:
            raise SpecError(f"{{param:augment}} {spec!r}: random-crop:SIZE needs a SIZE of at least 1")
        return RandomCrop(size)
    if name == "flip":
        if arg:
            raise SpecError(f"{{param:augment}} {spec!r}: flip takes no argument")
        return Flip()
    if name == "resized-crop":
        vals = [_number(v, spec, float) for v in arg.split(",")] if arg else []
        if len(vals) not in (1, 2, 4):
            raise SpecError(f"{{param:augment}} {spec!r}: use resized-crop:SCALE_MIN[,SCALE_MAX[,RATIO_MIN,RATIO_MAX]]")
        aug = ResizedCrop(*vals)
        if not (0 < aug.scale_min <= aug.scale_max <= 1 and 0 < aug.ratio_min <= aug.ratio_max):
            raise SpecError(f"{{param:augment}} {spec!r}: need 0 < SCALE_MIN <= SCALE_MAX <= 1 and 0 < RATIO_MIN <= "
                            f"RATIO_MAX")
        return aug
    if arg and "." in name or arg and name.isidentifier() and importlib.util.find_spec(name) is not None:
        return _user(name, arg, spec)
    raise SpecError(f"{{param:augment}} {spec!r}: unknown augmentation {part!r}; use {', '.join(BUILTINS)}, a "
                    f"composition "
                    f"such as jitter:2+flip, or package.module:callable")


def _user(module: str, attr: str, spec: str) -> Any:
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"{{param:augment}} {spec!r}: cannot import {module}:{attr} ({e})") from None
    aug = fn() if callable(fn) and not hasattr(fn, "apply") else fn
    missing = [a for a in ("columns", "sample", "apply") if not hasattr(aug, a)]
    if missing:
        raise SpecError(f"{{param:augment}} {spec!r}: {module}:{attr} gives an object without {', '.join(missing)}; an "
                        f"augmentation has columns, sample(generator, n, item_shape) and apply(x, params)")
    return aug


def parse_augment(spec: str) -> Augmentation:
    """An augmentation from its spec: ``jitter:2``, ``crop:4``, ``flip``, ``resized-crop:0.08``, a
    composition ``jitter:2+flip``, or ``package.module:callable``."""
    parts = [p for p in spec.split("+")]
    if not spec or any(not p for p in parts):
        raise SpecError(f"{{param:augment}} {spec!r}: give one augmentation or several joined by '+', e.g. "
                        f"jitter:2+flip")
    if len(parts) == 1:
        return _one(parts[0], spec)
    return Compose(tuple(_one(p, spec) for p in parts), tuple(p.partition(":")[0] for p in parts))


def jitter(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image ``[B, (C,) H, W]`` by up to ``max_shift`` pixels in each direction, zero-filled
    (online: a teacher's own training)."""
    if max_shift <= 0:
        return x
    j = Jitter(max_shift)
    return j.apply(x, j.sample(generator, len(x), tuple(x.shape[1:])))
