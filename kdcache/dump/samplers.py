"""The order stage one reads a dataset in: whole store chunks per batch, so that each chunk is written
once, by one process; and the wrapper that loads (and, for views, augments) a batch in the DataLoader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler

from kdcache.datasets import get_batch
from kdcache.store import Manifest
from kdcache.store.format import INDEX_CHUNK_FACTOR
from kdcache.views import ViewAugmenter


class Batches(Dataset):
    """Map-style wrapper whose items are whole batches: ``(chunk, pos, dataset indices, first store
    row)`` in, ``(chunk, pos, x, y, view params or None)`` out. In a store with views, each row's
    view is drawn and applied here (in the DataLoader's workers when there are some)."""

    def __init__(self, dataset: Any, augmenter: ViewAugmenter | None = None, per_view: int = 0) -> None:
        self.dataset, self.augmenter, self.per_view = dataset, augmenter, per_view

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, Any, np.ndarray, int]) -> tuple[Any, ...]:
        chunk, pos, indices, first = item
        if self.augmenter is None:
            x, y = get_batch(self.dataset, indices)
            return chunk, pos, x, y, None
        views = (first + np.arange(len(indices))) // self.per_view
        x, y, params = self.augmenter.batch(self.dataset, indices, views=views)
        return chunk, pos, x, y, params


class TiledRows:
    """The dataset rows of a store with views, in store order (view-major), without a copy per view."""

    def __init__(self, rows: np.ndarray, count: int) -> None:
        self.rows, self.count = rows, count

    def __len__(self) -> int:
        return len(self.rows) * self.count

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.rows[np.arange(*sl.indices(len(self))) % len(self.rows)]


class ChunkBatches(Sampler):
    """Batches cut from each chunk's start, so a chunk always sees the same batches (bitwise resume)."""

    def __init__(self, rows: Any, chunks: list[int], chunk_rows: int, batch_size: int) -> None:
        self.rows, self.chunks, self.chunk_rows, self.batch_size = rows, chunks, chunk_rows, batch_size

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, int]]:
        for c in self.chunks:
            start, stop = c * self.chunk_rows, min((c + 1) * self.chunk_rows, len(self.rows))
            for a in range(start, stop, self.batch_size):
                yield c, a - start, self.rows[a:min(a + self.batch_size, stop)], a

    def __len__(self) -> int:
        return sum(-(-(min((c + 1) * self.chunk_rows, len(self.rows)) - c * self.chunk_rows) // self.batch_size)
                   for c in self.chunks)


class SequenceChunkBatches(Sampler):
    """A per-token store's batches: the sequences whose positions fall in each unit (a group of
    ``unit_rows`` rows, whole chunks), ``batch_size`` sequences at a time from the unit's first one
    (a sequence cut by a unit boundary is run for both units, each keeping its own positions), so a
    unit always sees the same batches and a resumed dump writes the same bytes."""

    def __init__(self, index: "SequenceIndex", units: list[int], unit_rows: int, batch_size: int) -> None:
        self.index, self.units, self.unit_rows, self.batch_size = index, units, unit_rows, batch_size

    def _span(self, u: int) -> tuple[int, int]:
        """The sequences ``first:stop`` with a position in unit ``u``."""
        off = self.index.offsets
        a, b = u * self.unit_rows, min((u + 1) * self.unit_rows, int(off[-1]))
        return int(np.searchsorted(off, a, side="right")) - 1, int(np.searchsorted(off, b, side="left"))

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int], np.ndarray, int]]:
        for u in self.units:
            first, stop = self._span(u)
            for s in range(first, stop, self.batch_size):
                e = min(s + self.batch_size, stop)
                yield u, (s, e), self.index.ids[s:e], -1

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for a, b in map(self._span, self.units))


@dataclass
class SequenceIndex:
    """Where a per-token store's rows come from: sequence ``i`` is dataset item ``ids[i]`` and owns
    rows ``offsets[i]:offsets[i + 1]``, one per position."""

    ids: np.ndarray
    offsets: np.ndarray

    def sample_ids(self, start: int, stop: int) -> np.ndarray:
        return self.ids[np.searchsorted(self.offsets, np.arange(start, stop), side="right") - 1]


def token_unit_chunks(m: Manifest, batch_size: int) -> int:
    """Chunks per unit of work of a per-token dump: a multiple of INDEX_CHUNK_FACTOR holding about
    ``batch_size`` sequences of the longest length."""
    target = batch_size * m.sequences["max_length"]
    group = INDEX_CHUNK_FACTOR * m.chunk_rows
    return INDEX_CHUNK_FACTOR * max(1, -(-target // group))
