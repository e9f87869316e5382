"""Batches on their way to the device: coverage counted on the host, pinned memory, and the next
batch's copy issued on a side CUDA stream while the current one computes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from kdcache.background import Prefetch

# The entries of Batch.counts (and of an epoch's sums of them): items, labelled rows, the sum of the
# item ids and of their squares (with ITEMS, what shows that an epoch saw every item once), stored rows.
ITEMS, LABELLED, ID_SUM, ID_SQUARES, ROWS = range(5)


@dataclass
class Batch:
    """One batch: ``x`` inputs, ``y`` labels (one per stored row), ``z`` teacher targets (None when
    plain), ``mask`` real positions of a sequence batch, and ``counts`` (host, float64): items,
    labelled rows, sum of item ids, sum of their squares, rows (to check that an epoch saw every row once)."""

    x: torch.Tensor
    y: torch.Tensor
    z: Any
    mask: torch.Tensor | None
    counts: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=nb)  # noqa: E731
        return Batch(move(self.x), move(self.y), move(self.z), move(self.mask), self.counts)

    def record_stream(self, stream: Any) -> None:
        for t in (self.x, self.y, self.mask):
            if t is not None:
                t.record_stream(stream)
        if self.z is not None:
            self.z.record_stream(stream)


def from_loader(raw: tuple[Any, ...]) -> Batch:
    """A stream's ``(x, y, z[, mask], ids)`` as a :class:`Batch`, counted before it leaves the host."""
    x, y, z, *mask_, ids = raw
    mask = mask_[0] if mask_ else None
    if mask is not None:
        y = y[mask]  # one label per stored row, as the teacher rows are
    idf = ids.double()
    counts = torch.stack([torch.tensor(float(len(ids)), dtype=torch.float64), (y >= 0).sum().double(),
                          idf.sum(), (idf ** 2).sum(), torch.tensor(float(len(y)), dtype=torch.float64)])
    return Batch(x, y, z, mask, counts)


def device_batches(loader: Iterable[Any], device: torch.device, skip: int = 0,
                   augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[Batch]:
    """The loader's batches on ``device``, after skipping the first ``skip`` (a resumed epoch).

    ``augment`` runs here, in the consumer, in batch order, so that its random state at step n is
    the same whether or not a run was resumed. On CUDA, batches are read and counted in a background
    thread a batch or two ahead, and the copy of batch n+1 (from pinned memory, non-blocking, on a
    side stream) is issued before batch n is handed to the caller, so that both overlap with batch
    n's compute. On the CPU the thread would compete with the compute for the same cores (measured:
    slower), so batches are read in turn.
    """
    def produce() -> Iterator[Batch]:
        it = iter(loader)
        for _ in range(skip):
            if next(it, None) is None:
                return
        for raw in it:
            yield from_loader(raw)

    def augmented(b: Batch) -> Batch:
        if augment is not None:
            b.x = augment(b.x)
        return b

    if device.type != "cuda":
        for b in produce():
            yield augmented(b)
        return
    batches = iter(Prefetch(produce()))
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def load() -> Batch | None:
        b = next(batches, None)
        if b is None:
            return None
        b = augmented(b)
        with torch.cuda.stream(side):
            return b.to(device)

    nxt = load()
    while nxt is not None:
        main.wait_stream(side)
        cur = nxt
        cur.record_stream(main)
        nxt = load()
        yield cur
