"""What ``kdcache bench`` and its remote benchmarks share, without importing torch: the benchmark
names (the CLI lists them), the profiles, the interleaved timer, and the bare teacher loop a dump is
measured against (torch imported when it is built)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

BENCH_NAMES = ("store_read", "dump", "train", "sweep", "online", "views", "hf", "s3", "storage", "sparse",
               "vision")


@dataclass
class Profile:
    reps: int
    read_rows: int
    read_classes: int
    mnist_rows: int
    epochs: int
    rss_rows: int
    online_k: tuple[int, ...]
    dump_rows: int  # the dump's fixed costs need a full pass to be measured against: 60,000 even when quick
    quick: bool = False


QUICK = Profile(reps=3, read_rows=100_000, read_classes=100, mnist_rows=6_000, epochs=1, rss_rows=4_000,
                online_k=(1, 4), dump_rows=60_000, quick=True)
FULL = Profile(reps=5, read_rows=1_000_000, read_classes=100, mnist_rows=60_000, epochs=1, rss_rows=20_000,
               online_k=(1, 4, 16), dump_rows=60_000)


def interleave(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately ``reps`` times after one warm-up each."""
    ta, tb = interleave_all([a, b], reps)
    return ta, tb


def interleave_all(fns: list[Callable[[], Any]], reps: int, warmup: bool = True) -> list[float]:
    """Median seconds of each of ``fns``, run in turn ``reps`` times (after one warm-up each)."""
    if warmup:
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, ts in zip(fns, times):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def bare_pass(cfg: Any, device: str) -> Callable[[], None]:
    """A bare teacher-inference loop over the batches ``dump_logits(cfg)`` runs (unaugmented inputs)."""
    import torch
    from torch.utils.data import DataLoader

    from kdcache.distributed import autocast, resolve_device
    from kdcache.dump import Batches, ChunkBatches, prepare
    dev = resolve_device(device)
    dataset, members, manifest, rows, _ = prepare(cfg, dev)
    modules = [m.module for m in members]

    def bare() -> None:
        sampler = ChunkBatches(rows, list(range(manifest.num_chunks)), manifest.chunk_rows, cfg.batch_size)
        loader = DataLoader(Batches(dataset.dataset), sampler=sampler, batch_size=None, pin_memory=dev.type == "cuda")
        with torch.inference_mode(), autocast(dev, cfg.amp):
            for _, _, x, _, _ in loader:
                z = torch.stack([mod(x.to(dev, non_blocking=True)) for mod in modules], 1).float().cpu()
        del z
    return bare
