"""The writer thread: assembles the teacher's batches into whole chunks, encodes them in the store's
layout and writes them, so the teacher never waits on the disk; and the accuracy a dump reports."""
from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from kdcache.distributed import DistInfo
from kdcache.dump.samplers import SequenceIndex
from kdcache.layouts import encode_rows
from kdcache.losses import teacher_log_probs
from kdcache.store import LogitStore

QUEUE_BATCHES = 8


QUEUE_BYTES = 256 << 20


class ChunkWriter(threading.Thread):
    """Assembles batches into chunks and writes them, so the teacher never waits on the disk."""

    def __init__(self, store: LogitStore, rows: Any, num_members: int, written: np.ndarray,
                 index: SequenceIndex | None = None, unit_rows: int | None = None) -> None:
        super().__init__(daemon=True, name="kdcache-writer")
        self.layout = store.manifest.store_layout
        self.store, self.rows, self.index, self.written = store, rows, index, written
        self.unit_rows = unit_rows or store.manifest.chunk_rows
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.queued_bytes = 0  # logits waiting in the queue: bounded by QUEUE_BYTES (beyond one batch)
        self._room = threading.Condition()
        self.error: BaseException | None = None
        self.rows_written = 0
        self.correct = np.zeros(num_members + 1, dtype=np.int64)
        self.labelled = 0
        self._parts: list[Any] = []

    def put(self, item: Any) -> None:
        nbytes = _nbytes(item[2])
        with self._room:  # a large-vocabulary batch is big: queue at most QUEUE_BYTES of them (or one)
            while self.queued_bytes and self.queued_bytes + nbytes > QUEUE_BYTES and self.error is None:
                self._room.wait(0.5)
            self.queued_bytes += nbytes
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                with self._room:
                    self.queued_bytes -= _nbytes(item[2])
                    self._room.notify()
                self._take(*item)
        except BaseException as e:  # surfaced on the main thread by put() / finish()
            self.error = e
            while self.q.get() is not None:  # drain, so the producer never blocks
                pass

    def _take(self, unit: int, pos: int, logits: Any, labels: torch.Tensor, params: torch.Tensor | None,
              event: Any, last: bool) -> None:
        """``logits``: raw ``[rows, members, classes]``, or (encoded where the teacher ran) a dict of the
        layout's arrays plus ``_top1`` ``[rows, members]`` and ``_ens_top1`` ``[rows]`` for the accuracy."""
        if event is not None:
            event.synchronize()
        z_part = {k: v.numpy() for k, v in logits.items()} if isinstance(logits, dict) else logits.numpy()
        self._parts.append((z_part, labels.numpy(), None if params is None else params.numpy()))
        if not last:
            return
        start = unit * self.unit_rows
        encoded = isinstance(self._parts[0][0], dict)
        z: Any = ({k: np.concatenate([p[0][k] for p in self._parts]) for k in self._parts[0][0]} if encoded
                  else np.concatenate([p[0] for p in self._parts]))
        y = np.concatenate([p[1] for p in self._parts])
        v = None if self._parts[0][2] is None else np.concatenate([p[2] for p in self._parts])
        self._parts = []
        cr = self.store.manifest.chunk_rows
        # a unit is one chunk, or for per-token stores a group of them: its runs of chunks not written by an
        # earlier run are written one write per run (a partly written group is recomputed, never rewritten)
        first = start // cr
        todo = ~self.written[first:first + -(-len(y) // cr)]
        for c0, c1 in _runs(todo):
            a, b = c0 * cr, min(c1 * cr, len(y))
            yc = y[a:b]
            ids = (self.rows[start + a:start + b] if self.index is None
                   else self.index.sample_ids(start + a, start + b))
            if encoded:
                data = {k: arr[a:b] for k, arr in z.items() if not k.startswith("_")}
                top1, ens_top1 = z["_top1"][a:b], z["_ens_top1"][a:b]
            else:
                zc = z[a:b]
                data = encode_rows(self.layout, first + c0, zc, cr)
                top1, ens_top1 = (t.numpy() for t in predictions(torch.from_numpy(zc)))
            if v is not None:  # a store with views: each row's view parameters beside its logits
                data = {**data, "view_params": v[a:b]}
            self.store.write_block(start + a, data, ids, yc)
            self.rows_written += len(yc)
            has = yc >= 0
            if has.any():
                self.correct[:-1] += (top1[has] == yc[has, None]).sum(0)
                self.correct[-1] += (ens_top1[has] == yc[has]).sum()
                self.labelled += int(has.sum())

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _runs(todo: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True in ``todo``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], todo, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _nbytes(logits: Any) -> int:
    return sum(v.nbytes for v in logits.values()) if isinstance(logits, dict) else logits.nbytes


def predictions(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's predicted class ``[rows, members]`` and the ensemble's (mean probability at T = 1)
    ``[rows]`` from raw logits ``z`` ``[rows, members, classes]``, for the dump's accuracy."""
    top1 = z.argmax(-1)
    # one member: the ensemble is the member (no softmax over the chunk)
    return top1, top1[:, 0] if z.shape[1] == 1 else teacher_log_probs(z, 1.0).argmax(-1)


def to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def count_kept(store: LogitStore, kept: np.ndarray, writer: ChunkWriter) -> None:
    """Add the teacher's correct rows of the chunks an earlier run wrote (``kept``) to ``writer``'s counts,
    read back chunk by chunk: the ensemble is the members' mean probability at T = 1, as when dumping
    (a sparse store with several members: the layout's estimate, see ``Layout.ensemble_top1``)."""
    m = store.manifest
    for c in np.flatnonzero(kept):
        a, b = m.chunk_range(int(c))
        blk = store.read(a, b)
        y = np.asarray(blk.labels)
        has = y >= 0
        if not has.any():
            continue
        top1, ens = m.store_layout.top1(blk.data), m.store_layout.ensemble_top1(blk.data)
        writer.correct[:-1] += (top1[has] == y[has, None]).sum(0)
        writer.correct[-1] += int((ens[has] == y[has]).sum())
        writer.labelled += int(has.sum())


def gather_counts(writer: ChunkWriter, info: DistInfo) -> tuple[list[float | None], int]:
    """Accuracy per member then for the ensemble, and rows written, summed over ranks."""
    counts = torch.tensor(list(writer.correct) + [writer.labelled, writer.rows_written], dtype=torch.float64)
    if info.enabled:
        import torch.distributed as dist
        dist.all_reduce(counts)
    n = counts[-2].item()
    return [float(c / n) if n else None for c in counts[:-2].tolist()], int(counts[-1].item())
