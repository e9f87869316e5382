"""The preprocessing of image inputs: decoded pixels to the float tensor a model takes.

A model was trained with one input size, interpolation and normalisation; a teacher and a student fed
differently normalised pixels disagree silently. :class:`Preprocess` holds those choices; an image
dataset spec carries them as keys (``size=224,mean=0.485/0.456/0.406,std=...,interpolation=bicubic,
crop_pct=0.875``), filled from the teacher's own configuration where the user gave none
(:func:`kdcache.vision.images.with_preprocess`), so the completed spec in a store's manifest says
exactly what the teacher saw, and ``train-student`` and ``evaluate`` reuse it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from kdcache.errors import SpecError
from kdcache.vision import require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
KEYS = ("size", "mean", "std", "interpolation", "crop_pct")


@dataclass(frozen=True)
class Preprocess:
    """``size``: the square side a model takes. Without views an image is resized so that its shorter
    side is ``floor(size / crop_pct)``, then centre-cropped to ``size`` (timm's and torchvision's
    evaluation transform); a view is resized from its box to ``size`` x ``size``. Pixels become
    ``(x / 255 - mean) / std`` per channel, in float32. Resizing is torchvision's ``resize`` on uint8
    pixels with antialiasing."""

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    @classmethod
    def from_kv(cls, kv: dict[str, str], spec: str, base: "Preprocess | None" = None) -> "Preprocess":
        """Read (and remove) the preprocessing keys of a spec's key-values, over ``base``."""
        got: dict[str, Any] = {}
        try:
            if "size" in kv:
                got["size"] = int(kv.pop("size"))
            for k in ("mean", "std"):
                if k in kv:
                    got[k] = tuple(float(v) for v in kv.pop(k).split("/"))
            if "crop_pct" in kv:
                got["crop_pct"] = float(kv.pop("crop_pct"))
        except ValueError:
            raise SpecError(f"dataset spec {spec!r}: size is an integer, crop_pct a number and mean/std three "
                            f"numbers joined by '/', e.g. size=224,mean=0.485/0.456/0.406,crop_pct=0.875") from None
        if "interpolation" in kv:
            got["interpolation"] = kv.pop("interpolation")
        p = cls(**{**(base.asdict() if base else {}), **got})
        p.check(spec)
        return p

    def check(self, spec: str) -> None:
        if self.size < 1 or not 0 < self.crop_pct <= 1:
            raise SpecError(f"dataset spec {spec!r}: need size >= 1 and 0 < crop_pct <= 1")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SpecError(f"dataset spec {spec!r}: mean and std take three values (R/G/B), std positive")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(f"dataset spec {spec!r}: interpolation {self.interpolation!r}; use one of "
                            f"{', '.join(INTERPOLATIONS)}")

    def asdict(self) -> dict[str, Any]:
        """As a manifest holds it (JSON: lists, not tuples)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def spec_keys(self) -> str:
        """The keys as a spec writes them: ``size=224,mean=a/b/c,std=a/b/c,interpolation=..,crop_pct=..``."""
        return (f"size={self.size},mean={'/'.join(map(repr, map(float, self.mean)))},"
                f"std={'/'.join(map(repr, map(float, self.std)))},interpolation={self.interpolation},"
                f"crop_pct={float(self.crop_pct)!r}")

    def _mode(self) -> Any:
        return require("torchvision.transforms.v2.functional", "image preprocessing").InterpolationMode[
            self.interpolation.upper()]

    def resize_eval(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]``: shorter side to ``floor(size / crop_pct)``,
        then the centre ``size`` x ``size``."""
        tvf = require("torchvision.transforms.v2.functional", "image preprocessing")
        short = math.floor(self.size / self.crop_pct)
        return tvf.center_crop(tvf.resize(img, [short], interpolation=self._mode(), antialias=True),
                               [self.size, self.size])

    def resize_view(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, h, w]`` (a view's box) -> uint8 ``[3, size, size]``."""
        tvf = require("torchvision.transforms.v2.functional", "image preprocessing")
        return tvf.resize(img, [self.size, self.size], interpolation=self._mode(), antialias=True)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, 3, size, size]`` -> float32 ``(x / 255 - mean) / std``."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return batch.float().div_(255.0).sub_(mean).div_(std)

    def to_unit(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 in [0, 1] (what a user's augmentation on an image dataset receives)."""
        return batch.float().div_(255.0)

    def normalize_unit(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 in [0, 1] -> ``(x - mean) / std``."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return batch.sub(mean).div_(std)


def from_model_config(cfg: dict[str, Any]) -> Preprocess:
    """A :class:`Preprocess` from a model's own (``kdcache.vision.models.model_preprocess``: ``size``,
    ``mean``, ``std``, ``interpolation``, ``crop_pct``; absent keys keep the defaults)."""
    known = {k: cfg[k] for k in KEYS if cfg.get(k) is not None}
    for k in ("mean", "std"):
        if k in known:
            known[k] = tuple(float(v) for v in known[k])
    if known.get("interpolation") not in INTERPOLATIONS:
        known.pop("interpolation", None)
    return Preprocess(**known)
