"""Augmented views: which store rows hold which view, how a view's parameters are drawn, and which
view an epoch of training reads.

A store with ``V`` views of ``N`` samples has ``V * N`` rows, view-major: rows ``v * N:(v + 1) * N``
are view ``v`` of the samples in the store's order, so an epoch that reads one view reads one
contiguous range, as a store without views is read. Each row keeps the parameters of its view
(``view_params``); the teacher's logits in that row are for the input augmented with them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.augment import Augmentation, _sampled, check_shape, cuts_originals, parse_augment
from kdcache.datasets import get_batch
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
                item_shape: tuple[int, ...], sizes: np.ndarray | None = None) -> torch.Tensor:
    """``[n, P]`` float32: row ``i`` drawn from the key ``view_seed(seed, sample_ids[i], views[i])``,
    by the built-ins' ``sample_keyed`` (counter-based, all rows at once), or by ``aug.sample`` with a
    ``torch.Generator`` seeded by the key, one row at a time (a user's augmentation).

    With ``sizes`` (``[n, 2]``: each original image's height and width), a built-in draws relative to
    each original image (views cut from the original, see :func:`cuts_originals`)."""
    if sizes is not None and cuts_originals(aug):
        keys = view_keys(seed, sample_ids, views)
        sized = aug.sample_sized if hasattr(aug, "sample_sized") else aug.sample_keyed
        return sized(keys, np.asarray(sizes, dtype=np.int64)).float()
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
    ``item_shape`` of the inputs they apply to (of the views, when ``originals``: the views were cut
    from each original image, of any size, then resized to ``item_shape``)."""

    count: int
    augment: str
    columns: list[str]
    seed: int
    item_shape: list[int]
    originals: bool = False

    def asdict(self) -> dict[str, Any]:
        """The manifest's field; ``originals`` is written only when true (older readers refuse it)."""
        d = dataclasses.asdict(self)
        if not self.originals:
            del d["originals"]
        return d

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
               probe: torch.Tensor | None = None, dataset: Any = None) -> Views:
    """Check an ``--augment``/``--views`` request against the dataset's items, before anything runs:
    the augmentation must accept the items, draw ``[n, len(columns)]`` parameters and (on ``probe``,
    a batch of items) give inputs of the items' shape.

    On a dataset of image files (one with ``get_views``), a built-in augmentation cuts its views from
    each original image (``originals``); the dataset checks them on its first item."""
    if count < 1:
        raise SpecError(f"{{param:views}} {count}: give at least 1 view per sample")
    aug = parse_augment(spec)
    if dataset is not None and hasattr(dataset, "get_views") and cuts_originals(aug):
        views = Views(count, spec, list(aug.columns), seed, list(item_shape), originals=True)
        ViewAugmenter(views, dataset_spec).batch(dataset, np.zeros(1, dtype=np.int64), views=np.zeros(1, np.int64))
        return views
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

    def draw(self, sample_ids: np.ndarray, views: np.ndarray, sizes: np.ndarray | None = None) -> torch.Tensor:
        return draw_params(self.aug, self.views.seed, sample_ids, views, tuple(self.views.item_shape), sizes)

    def batch(self, dataset: Any, sample_ids: np.ndarray, params: Any = None, views: np.ndarray | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, labels, params)`` of dataset items ``sample_ids``, each augmented with its view:
        ``params`` given (replayed from a store), or drawn for view ``views[i]`` of each item. A
        dataset of image files cuts the views from its originals (``get_views``); any other dataset's
        items are fetched and augmented here."""
        if hasattr(dataset, "get_views"):
            p = None if params is None else torch.as_tensor(np.asarray(params)).float()
            x, y, p = dataset.get_views(np.asarray(sample_ids), self, p, views)
            return x, y, p
        x, y = get_batch(dataset, sample_ids)
        p = self.draw(sample_ids, views) if params is None else params
        return self.apply(x, p), y, torch.as_tensor(np.asarray(p) if not isinstance(p, torch.Tensor) else p)

    def apply(self, x: torch.Tensor, params: torch.Tensor | np.ndarray) -> torch.Tensor:
        p = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params)
        if p.ndim != 2 or p.shape[1] != len(self.views.columns) or p.shape[0] != len(x):
            raise StoreError(f"{self.where}: view parameters of shape {tuple(p.shape)} for {len(x)} inputs; "
                             f"augmentation {self.views.augment!r} takes {len(self.views.columns)} columns per input")
        if list(x.shape[1:]) != list(self.views.item_shape):
            raise StoreError(f"{self.where}: its views were drawn for items of shape {tuple(self.views.item_shape)}, "
                             f"the dataset gives {tuple(x.shape[1:])}; pass the dataset the store was dumped from")
        return self.aug.apply(x, p.float())
