"""Work done ahead in background threads, for both stages: reads of store blocks in flight
(:func:`read_ahead`) and an iterator consumed a few items ahead (:class:`Prefetch`). Torch kernels
and file and network reads release the GIL, so threads overlap them with the caller's work; memory
is bounded by how far ahead they run."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


def read_ahead(read: Callable[..., T], items: list[tuple[int, int]], depth: int) -> Iterator[T]:
    """``read(*item)`` for every item, in order, with up to ``depth`` reads running ahead in threads
    (hides the latency of object storage; memory is bounded by ``depth`` blocks). ``depth`` 0 reads
    one after another in this thread."""
    if depth <= 0 or len(items) <= 1:
        for item in items:
            yield read(*item)
        return
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="kdcache-read")
    pending: list[Future] = []
    try:
        nxt = 0
        for _ in range(len(items)):
            while nxt < len(items) and len(pending) < depth:
                pending.append(pool.submit(read, *items[nxt]))
                nxt += 1
            yield pending.pop(0).result()
    finally:  # the consumer stopped early, or a read failed: drop what is queued, wait for what runs
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


class Prefetch:
    """Iterates ``source`` in a background thread, ``depth`` items ahead: the next batch is read and
    assembled (store reads, dataset lookups, pinning) while the current one computes. Exceptions are
    re-raised in the consumer; a consumer that stops early stops the thread."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int = 2) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="kdcache-prefetch")
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self.queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()
            self.thread.join()
