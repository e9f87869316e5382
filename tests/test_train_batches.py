"""The batch pipeline of stage two: the background prefetch (used on CUDA) keeps order, surfaces
errors and stops cleanly; a resumed epoch skips exactly the batches already trained."""
from __future__ import annotations

import threading

import pytest
import torch

from kdcache.background import Prefetch
from kdcache.train.batches import device_batches


def _raw(i: int) -> tuple:
    return (torch.full((2, 3), float(i)), torch.tensor([i, -1]), None, torch.tensor([2 * i, 2 * i + 1]))


def test_prefetch_keeps_order_and_surfaces_errors():
    assert list(Prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("a damaged chunk")
    it = iter(Prefetch(broken()))
    assert next(it) == 1
    with pytest.raises(ValueError, match="a damaged chunk"):
        next(it)


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    p = Prefetch(iter(range(10_000)), depth=2)
    for i in p:
        if i == 3:
            break
    assert not p.thread.is_alive() and not any(t.name == "kdcache-prefetch" for t in threading.enumerate())


def test_device_batches_skip_count_and_augment_in_order():
    seen = []
    batches = list(device_batches([_raw(i) for i in range(6)], torch.device("cpu"), skip=2,
                                  augment=lambda x: seen.append(float(x[0, 0])) or x + 100))
    assert [float(b.x[0, 0]) for b in batches] == [102, 103, 104, 105] and seen == [2, 3, 4, 5]
    b = batches[0]
    # items, labelled rows, sum of ids, sum of squares, rows
    assert b.counts.tolist() == [2.0, 1.0, 4.0 + 5.0, 16.0 + 25.0, 2.0]
