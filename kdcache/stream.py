"""Stage two's reading: stream a store paired with its dataset, shuffled by blocks then in a window."""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdcache.background import read_ahead
from kdcache.datasets import ResolvedDataset, fingerprint, get_batch
from kdcache.errors import StoreError
from kdcache.store import Block, LogitStore, open_store
from kdcache.store.format import SKIPPED_LABEL
from kdcache.text import is_sequence_dataset, row_mask
from kdcache.views import ViewAugmenter, Views, epoch_view

DEFAULT_WINDOW_BYTES = 64 << 20
MIN_BLOCKS = 64
READ_AHEAD = {"local": 2, "remote": 8}  # blocks in flight by default
def check_pairing(store: LogitStore, dataset: Any, spec: str | None = None) -> None:
    """Refuse a dataset that is not the one the store was dumped from (length, then fingerprint)."""
    want = store.manifest.dataset
    name = spec or getattr(dataset, "spec", None) or type(dataset).__name__
    data = dataset.dataset if isinstance(dataset, ResolvedDataset) else dataset
    fp = dataset.fingerprint if isinstance(dataset, ResolvedDataset) else fingerprint(data)
    if fp != want["fingerprint"]:  # a dataset of files says which file changed
        changed = data.explain_change(want.get("files")) if hasattr(data, "explain_change") else None
        if changed:
            raise StoreError(f"store {store.path!r} was dumped from {want['spec']!r}, but {changed} since; pass the "
                             f"files the store was dumped from, or dump a new store")
    if len(data) != want["length"]:
        raise StoreError(
            f"store {store.path!r} was written from {want['length']} "
            f"{'sequences' if store.manifest.per_token else 'samples'} of {want['spec']!r} but the dataset "
            f"given ({name}) has {len(data)}; pass the dataset the store was dumped from")
    if fp != want["fingerprint"]:
        raise StoreError(
            f"store {store.path!r} was written from {want['spec']!r} with fingerprint {want['fingerprint'][:16]} "
            f"but the dataset given ({name}) has fingerprint {fp[:16]}: different data, order or preprocessing; "
            f"pass the dataset the store was dumped from, or dump a new store")


def _shard() -> tuple[int, int]:
    """(index, count) of this reader among DataLoader workers times torch.distributed ranks."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    w = get_worker_info()
    wid, nw = (w.id, w.num_workers) if w is not None else (0, 1)
    return rank * nw + wid, world * nw


class DistillStream(IterableDataset):
    """Yields ``(inputs, labels, teacher_logits)`` batches for the rows of a store.

    A per-token store (a sequence teacher's, a row per position) yields whole sequences instead:
    ``(inputs [B, L], labels [B, L], teacher_logits, mask [B, L])`` where ``batch_size`` counts
    sequences, ``mask`` marks the positions with a stored row (the dataset's
    :func:`kdcache.text.row_mask`: its real positions, or for ``hf-chat:`` with ``rows=assistant`` those
    whose target is an assistant token; padding is False) and ``teacher_logits`` holds one row per True
    entry of ``mask``, in row-major order, so that
    ``distillation_loss(student(inputs)[mask], teacher_logits, labels[mask], T, alpha)`` is the
    per-token loss. Without a dataset, ``mask`` marks the first entries of each sequence, as many as it
    has rows. Shuffling moves whole sequences, never positions.

    A store with augmented views (``dump-logits --augment SPEC --views V``) is replayed: in epoch
    ``e`` every sample is paired with view ``(seed + e) mod V`` (:func:`kdcache.views.epoch_view`), its
    input is augmented with that view's stored parameters, and its teacher logits are that view's, so
    ``inputs`` are already augmented, exactly as the teacher saw them.

    ``teacher_logits`` are the raw stored logits ``[batch, members, classes]`` (float32) of exactly
    the samples in ``inputs`` (for a top-k or sampled store, a :class:`kdcache.sparse.SparseTargets`),
    matched through the store's ``sample_ids``. Each epoch reads the
    store in blocks whose order is shuffled, then shuffles rows within a window of blocks held in
    memory; the order depends only on ``seed`` and the epoch (``set_epoch``). Blocks are dealt
    round-robin to DataLoader workers and torchrun ranks, so an epoch sees every row exactly once
    over all of them. Use it with ``DataLoader(stream, batch_size=None)``.

    Args:
        store: a path or an open :class:`LogitStore`.
        dataset: the dataset the store was dumped from (checked by length and fingerprint);
            ``None`` yields ``(None, labels, teacher_logits)`` for label-free uses.
        window_bytes: logits held in memory for the in-window shuffle (bounds memory).
        return_ids: also yield the batch's dataset indices, as a fourth element.
        allow_interpolation: sparse stores only: serve temperatures between the grid's, interpolated.
        read_ahead: blocks read ahead in background threads, in order (default 2 on local disk, 8 for
            a store at a URL such as ``s3://``, where each read waits on the network); 0 reads in line.
            The blocks and their order do not depend on where the store is: the same seed gives the
            same batches from a local copy and from object storage.
        cache: a :class:`kdcache.store.BlockCache` (or a directory for one) that keeps the blocks of a
            remote store on local disk, bounded in bytes, so later epochs read them from there.
    """

    def __init__(self, store: str | LogitStore, dataset: Any, batch_size: int = 128, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, block_rows: int | None = None,
                 window_bytes: int = DEFAULT_WINDOW_BYTES, check: bool = True, return_ids: bool = False,
                 allow_interpolation: bool = False, read_ahead: int | None = None, cache: Any = None) -> None:
        self.store = store if isinstance(store, LogitStore) else open_store(store)
        if cache is not None:
            self.store.use_cache(cache)
        remote = "://" in self.store.path
        self.read_ahead = READ_AHEAD["remote" if remote else "local"] if read_ahead is None else read_ahead
        m = self.store.manifest
        if dataset is not None and check:
            check_pairing(self.store, dataset)
        self.dataset = dataset.dataset if isinstance(dataset, ResolvedDataset) else dataset
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        row_bytes = sum(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                        for name, (shape, _, dtype, _) in m.arrays().items() if name != "chunk_sha256")
        rows = m.samples_per_view  # what an epoch reads: the whole store, or one view of it
        if block_rows is None and row_bytes * rows <= window_bytes:
            # the whole epoch fits in one window, whose shuffle is then a full shuffle: read whole chunks
            block_rows = m.chunk_rows
        self.block_rows = block_rows or min(m.chunk_rows, max(1024, math.ceil(rows / MIN_BLOCKS)))
        self._seq_blocks = None
        if m.per_token:
            ids, offsets = self.store.sequence_index()
            marks = np.searchsorted(offsets[:-1], np.arange(0, m.num_samples, self.block_rows), side="left")
            self._seq_blocks = np.unique(np.concatenate([marks, [len(ids)]]))
        self.window_blocks = max(1, window_bytes // (row_bytes * self.block_rows))
        self.return_ids = return_ids
        self.allow_interpolation = allow_interpolation
        self.augmenter = None
        if m.views is not None:
            self.augmenter = ViewAugmenter(Views.from_manifest(m.views, self.store.path), self.store.path)
            if self.dataset is not None:
                self.augmenter.check()  # an augmentation that cannot be loaded here is refused now
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def per_token(self) -> bool:
        return self._seq_blocks is not None

    @property
    def view(self) -> int | None:
        """The view this epoch reads (a store with views), else None."""
        if self.augmenter is None:
            return None
        return epoch_view(self.seed, self.epoch, self.augmenter.views.count)

    def blocks(self, shard: int = 0, num_shards: int = 1) -> list[tuple[int, int]]:
        """The ``(start, stop)`` row blocks this shard reads this epoch, in reading order (for a
        per-token store: ranges of sequences, about ``block_rows`` rows each)."""
        if self.per_token:
            bounds = self._seq_blocks
            pairs = np.stack([bounds[:-1], bounds[1:]], axis=1)
        else:
            n = self.store.manifest.samples_per_view
            first = 0 if self.view is None else self.view * n  # one view's rows: a contiguous range
            starts = np.arange(0, n, self.block_rows)
            pairs = first + np.stack([starts, np.minimum(starts + self.block_rows, n)], axis=1)
        if self.shuffle:
            pairs = pairs[np.random.default_rng([self.seed, self.epoch]).permutation(len(pairs))]
        return [(int(a), int(b)) for a, b in pairs[shard::num_shards]]

    def __len__(self) -> int:
        shard, shards = _shard()
        items = sum(b - a for a, b in self.blocks(shard, shards))
        return items // self.batch_size if self.drop_last else math.ceil(items / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        shard, shards = _shard()
        blocks = self.blocks(shard, shards)
        if self.per_token:
            yield from self._iter_sequences(blocks, shard)
            return
        rng = np.random.default_rng([self.seed, self.epoch, shard, 1])
        carry = None
        reader = read_ahead(self.store.read, blocks, self.read_ahead)
        for w in range(0, len(blocks), self.window_blocks):
            reads = [next(reader) for _ in blocks[w:w + self.window_blocks]]
            if carry is not None:
                reads.insert(0, carry)
            window = _concat(reads)
            if self.store.manifest.skipped:  # rows whose inputs could not be read are never trained on
                window = window.rows(np.flatnonzero(np.asarray(window.labels) != SKIPPED_LABEL))
            order = rng.permutation(len(window)) if self.shuffle else np.arange(len(window))
            full = len(order) // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                yield self._batch(window, order[a:a + self.batch_size])
            carry = window.rows(order[full:])
        if carry is not None and len(carry) and not self.drop_last:
            yield self._batch(carry, np.arange(len(carry)))

    def _iter_sequences(self, blocks: list[tuple[int, int]], shard: int) -> Iterator[tuple[Any, ...]]:
        """Per-token stores: windows of sequence blocks, shuffled by sequence, batched by sequence."""
        ids, offsets = self.store.sequence_index()
        rng = np.random.default_rng([self.seed, self.epoch, shard, 1])
        carry: tuple[Block, np.ndarray, np.ndarray] | None = None
        reader = read_ahead(self.store.read_sequences, blocks, self.read_ahead)
        for w in range(0, len(blocks), self.window_blocks):
            parts = [(next(reader), ids[a:b], np.diff(offsets[a:b + 1])) for a, b in blocks[w:w + self.window_blocks]]
            if carry is not None:
                parts.insert(0, carry)
            reads = [p[0] for p in parts]
            window = _concat(reads)
            seq_ids = np.concatenate([p[1] for p in parts])
            lengths = np.concatenate([p[2] for p in parts])
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            order = rng.permutation(len(seq_ids)) if self.shuffle else np.arange(len(seq_ids))
            full = len(order) // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                yield self._sequence_batch(window, seq_ids, starts, lengths, order[a:a + self.batch_size])
            rest = order[full:]
            rows = _rows_of(starts[rest], lengths[rest])
            carry = (window.rows(rows), seq_ids[rest], lengths[rest])
        if carry is not None and len(carry[1]) and not self.drop_last:
            lengths = carry[2]
            yield self._sequence_batch(carry[0], carry[1], np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths,
                                       np.arange(len(lengths)))

    def _sequence_batch(self, window: Block, seq_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                        sel: np.ndarray) -> tuple[Any, ...]:
        sid, n = seq_ids[sel], lengths[sel]
        rows = _rows_of(starts[sel], n)
        if self.dataset is None:
            x, width = None, int(n.max())
        else:
            x = get_batch(self.dataset, sid)[0]
            width = x.shape[1]
            if width < n.max():
                raise StoreError(f"the dataset pads a batch to {width} positions but the store holds sequences of "
                                 f"{int(n.max())}; its get_batch must pad to the longest length in the batch")
        mask = (torch.arange(width)[None, :] < torch.from_numpy(n)[:, None] if x is None
                else row_mask(self.dataset, sid, width))
        labels = torch.full((len(sel), width), -1, dtype=torch.long)
        labels[mask] = torch.from_numpy(window.labels[rows])
        out = (x, labels, self._targets(window, rows), mask)
        return (*out, torch.from_numpy(sid)) if self.return_ids else out

    def _batch(self, window: Block, sel: np.ndarray) -> tuple[Any, ...]:
        sid = window.sample_ids[sel]
        if self.dataset is None:
            x = None
        elif self.augmenter is not None:
            x = self.augmenter.batch(self.dataset, sid, params=window.data["view_params"][sel])[0]
        else:
            x = get_batch(self.dataset, sid)[0]
        out = (x, torch.from_numpy(window.labels[sel]), self._targets(window, sel))
        return (*out, torch.from_numpy(sid)) if self.return_ids else out

    def _targets(self, window: Block, sel: np.ndarray) -> Any:
        """Dense: raw logits ``[batch, members, classes]`` float32. Sparse: :class:`SparseTargets`."""
        m = self.store.manifest
        return m.store_layout.targets({k: window.data[k][sel] for k in m.logit_arrays}, self.allow_interpolation,
                                      self.store.path)


def _concat(blocks: list[Block]) -> Block:
    """One in-memory block of the rows of ``blocks``, in order (a shuffle window)."""
    return Block(0, {k: np.concatenate([b.data[k] for b in blocks]) for k in blocks[0].data},
                 np.concatenate([b.sample_ids for b in blocks]), np.concatenate([b.labels for b in blocks]))


def _rows_of(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The row indices ``starts[i]:starts[i] + lengths[i]`` for every i, concatenated in order."""
    if not len(lengths):
        return np.zeros(0, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))


class DatasetStream(IterableDataset):
    """Plain supervised batches ``(inputs, labels, None)`` over ``indices`` of a dataset, sharded like
    :class:`DistillStream` (ranks and workers), shuffled per epoch from ``seed``. For a sequence dataset
    (one with ``lengths``) it yields ``(inputs, labels, None, mask)``, ``mask`` marking the positions that
    would have a row in a store (:func:`kdcache.text.row_mask`).

    With ``views`` (a :class:`kdcache.views.Views`), inputs are augmented online with the views a
    store dumped with the same augmentation, views and seed holds: in epoch ``e``, view
    ``(seed + e) mod V`` of each sample, its parameters drawn as the dump draws them."""

    def __init__(self, dataset: Any, batch_size: int = 128, *, indices: np.ndarray | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, return_ids: bool = False,
                 views: Any = None) -> None:
        self.augmenter = None if views is None else ViewAugmenter(views, "--augment")
        self.dataset = dataset.dataset if isinstance(dataset, ResolvedDataset) else dataset
        self.return_ids = return_ids
        self.indices = np.arange(len(self.dataset)) if indices is None else np.asarray(indices)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self) -> np.ndarray:
        shard, shards = _shard()
        idx = self.indices
        if self.shuffle:
            idx = idx[np.random.default_rng([self.seed, self.epoch]).permutation(len(idx))]
        return idx[shard::shards]

    def __len__(self) -> int:
        n = len(self._rows())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, None]]:
        rows = self._rows()
        stop = len(rows) // self.batch_size * self.batch_size if self.drop_last else len(rows)
        per_token = is_sequence_dataset(self.dataset)
        for a in range(0, stop, self.batch_size):
            ids = rows[a:a + self.batch_size]
            if self.augmenter is not None:
                view = epoch_view(self.seed, self.epoch, self.augmenter.views.count)
                x, y, _ = self.augmenter.batch(self.dataset, ids, views=np.full(len(ids), view))
            else:
                x, y = get_batch(self.dataset, ids)
            out: tuple[Any, ...] = (x, y, None)
            if per_token:
                out = (*out, row_mask(self.dataset, ids, x.shape[1]))
            yield (*out, torch.from_numpy(ids)) if self.return_ids else out
