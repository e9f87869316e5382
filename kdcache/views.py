"""Augmented views: which store rows hold which view, how a view's parameters are drawn, and which
view an epoch of training reads.

A store with ``V`` views of ``N`` samples has ``V * N`` rows, view-major: rows ``v * N:(v + 1) * N``
are view ``v`` of the samples in the store's order, so an epoch that reads one view reads one
contiguous range, as a store without views is read. Each row keeps the parameters of its view
(``view_params``); the teacher's logits in that row are for the input augmented with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.augment import Augmentation, _sampled, check_shape, parse_augment
from kdcache.errors import SpecError, StoreError

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)
_MASK = (1 << 63) - 1


def view_seed(seed: int, sample_id: int, view: int) -> int:
    """The seed of the generator that draws view ``view`` of dataset item ``sample_id``:
    ``((seed * A + view) * B + sample_id) mod 2**63`` (A, B: the constants of SplitMix64). Any rank,
    any resumed run and any subset draws the same parameters for the same item and view."""
    return ((seed * _MIX[0] + view) * _MIX[1] + sample_id) & _MASK


def view_keys(seed: int, sample_ids: np.ndarray, views: np.ndarray) -> np.ndarray:
    """:func:`view_seed` of many rows at once, as uint64."""
    with np.errstate(over="ignore"):
        k = (np.uint64(seed % 2 ** 64) * np.uint64(_MIX[0]) + np.asarray(views).astype(np.uint64)) * np.uint64(_MIX[1])
        return (k + np.asarray(sample_ids).astype(np.uint64)) & np.uint64(_MASK)


def draw_params(aug: Any, seed: int, sample_ids: np.ndarray, views: np.ndarray,
                item_shape: tuple[int, ...]) -> torch.Tensor:
    """``[n, P]`` float32: row ``i`` drawn from the key ``view_seed(seed, sample_ids[i], views[i])``,
    by the built-ins' ``sample_keyed`` (counter-based, all rows at once), or by ``aug.sample`` with a
    ``torch.Generator`` seeded by the key, one row at a time (a user's augmentation)."""
    if hasattr(aug, "sample_keyed") and getattr(aug, "keyed", True):
        out = aug.sample_keyed(view_keys(seed, sample_ids, views), item_shape)
        if out.shape != (len(sample_ids), len(aug.columns)):
            raise SpecError(f"augmentation {type(aug).__name__}.sample_keyed returned {tuple(out.shape)}, not "
                            f"[{len(sample_ids)}, {len(aug.columns)}]")
        return out.float()
    g = torch.Generator()
    out = torch.empty(len(sample_ids), len(aug.columns))
    for i, (sid, v) in enumerate(zip(np.asarray(sample_ids).tolist(), np.asarray(views).tolist())):
        g.manual_seed(view_seed(seed, sid, v))
        out[i] = _sampled(aug, g, 1, item_shape)[0]
    return out


def epoch_view(seed: int, epoch: int, count: int) -> int:
    """The view every sample is paired with in ``epoch`` (0-based) of a run with data seed ``seed``:
    ``(seed + epoch) mod V``. With V equal to the number of epochs, every epoch sees a fresh view."""
    return (seed + epoch) % count


@dataclass
class Views:
    """A store's views, as its manifest records them (``views``): ``count`` views per sample, the
    ``augment`` spec, its parameter ``columns``, the ``seed`` they were drawn from, and the
    ``item_shape`` of the inputs they apply to."""

    count: int
    augment: str
    columns: list[str]
    seed: int
    item_shape: list[int]

    @classmethod
    def from_manifest(cls, d: dict[str, Any], where: str) -> "Views":
        try:
            v = cls(**d)
        except TypeError:
            raise StoreError(f"{where}: manifest field views {d!r} is malformed; the store is damaged, re-dump it") \
                from None
        if not (isinstance(v.count, int) and v.count >= 1 and v.columns and isinstance(v.seed, int)):
            raise StoreError(f"{where}: manifest field views {d!r} is malformed; the store is damaged, re-dump it")
        return v

    def augmentation(self, where: str = "store") -> Augmentation:
        """The augmentation that replays these views; refused when its parameters are not the stored ones."""
        try:
            aug = parse_augment(self.augment)
        except SpecError as e:
            raise StoreError(f"{where}: its views were drawn by augmentation {self.augment!r}, which cannot be "
                             f"loaded here ({e}); install what provides it") from None
        if list(aug.columns) != list(self.columns):
            raise StoreError(f"{where}: its view_params have columns {', '.join(self.columns)} but augmentation "
                             f"{self.augment!r} takes {', '.join(aug.columns)} ({len(aug.columns)}); the store was "
                             f"written with another version of that augmentation")
        return aug


def make_views(spec: str, count: int, seed: int, item_shape: tuple[int, ...], dataset_spec: str,
               probe: torch.Tensor | None = None) -> Views:
    """Check an ``--augment``/``--views`` request against the dataset's items, before anything runs:
    the augmentation must accept the items, draw ``[n, len(columns)]`` parameters and (on ``probe``,
    a batch of items) give inputs of the items' shape."""
    if count < 1:
        raise SpecError(f"{{param:views}} {count}: give at least 1 view per sample")
    aug = parse_augment(spec)
    try:
        check_shape(aug, item_shape)
    except ValueError as e:
        raise SpecError(f"{{param:augment}} {spec!r} cannot augment dataset {dataset_spec!r}: {e}") from None
    params = draw_params(aug, seed, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), tuple(item_shape))
    if probe is not None:
        try:
            out = aug.apply(probe[:1], params)
        except Exception as e:
            raise SpecError(f"{{param:augment}} {spec!r} fails on dataset {dataset_spec!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probe[:1].shape):
            raise SpecError(f"{{param:augment}} {spec!r}: apply must return inputs of the items' shape "
                            f"{tuple(probe.shape[1:])}, got {tuple(getattr(out, 'shape', ()))[1:]}")
    return Views(count, spec, list(aug.columns), seed, list(item_shape))


class ViewAugmenter:
    """Augments batches of dataset items with the parameters of one view each: drawn here (online) or
    given (replayed from a store). Picklable, so DataLoader workers build their own."""

    def __init__(self, views: Views, where: str = "store") -> None:
        self.views, self.where = views, where
        self._aug: Any = None

    @property
    def aug(self) -> Any:
        if self._aug is None:
            self._aug = self.views.augmentation(self.where)
        return self._aug

    def check(self) -> None:
        """Load the augmentation now: refused here, not in a DataLoader worker, if it cannot be."""
        self.aug  # noqa: B018

    def __getstate__(self) -> dict:
        return {"views": self.views, "where": self.where}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["views"], state["where"])

    def draw(self, sample_ids: np.ndarray, views: np.ndarray) -> torch.Tensor:
        return draw_params(self.aug, self.views.seed, sample_ids, views, tuple(self.views.item_shape))

    def apply(self, x: torch.Tensor, params: torch.Tensor | np.ndarray) -> torch.Tensor:
        p = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params)
        if p.ndim != 2 or p.shape[1] != len(self.views.columns) or p.shape[0] != len(x):
            raise StoreError(f"{self.where}: view parameters of shape {tuple(p.shape)} for {len(x)} inputs; "
                             f"augmentation {self.views.augment!r} takes {len(self.views.columns)} columns per input")
        if list(x.shape[1:]) != list(self.views.item_shape):
            raise StoreError(f"{self.where}: its views were drawn for items of shape {tuple(self.views.item_shape)}, "
                             f"the dataset gives {tuple(x.shape[1:])}; pass the dataset the store was dumped from")
        return self.aug.apply(x, p.float())
