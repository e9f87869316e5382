"""What a dump is asked to do (:class:`DumpConfig`) and what it reports (:class:`DumpSummary`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdcache.layouts import LAYOUTS, Layout, layout_for
from kdcache.store.logit_store import _ranges


@dataclass
class DumpConfig:
    teachers: list[str]
    dataset: str
    out: str | None = None                    # None or "cache": the store cache, keyed by teacher and data
    format: str | None = None
    dtype: str = "float16"
    batch_size: int = 512
    device: str = "auto"
    amp: str = "off"
    workers: int = 0
    chunk_rows: int | None = None
    subset: str | None = None
    overwrite: bool = False
    data_root: str | None = None
    compression: str = "none"
    layout: str = "dense"
    k: int | None = None                      # topk: entries kept per row and member
    temperatures: list[float] | None = None   # sparse: grid of exact temperatures
    samples: int | None = None                # sampled: draws per row and member
    sampling_temperature: float | None = None  # sampled: the T the ids are drawn at [default: 1]
    seed: int = 0                             # sampled draws and view parameters are seeded from this
    augment: str | None = None                # views: the augmentation spec, e.g. jitter:2+flip
    views: int | None = None                  # views: augmented views per sample (default 1 with augment)
    encode_on_device: bool | None = None      # topk: top-k and normalisers where the teacher ran [default: on a GPU]
    skip_bad_images: bool = False             # image datasets: unreadable files are skipped, not fatal
    progress: bool | None = None  # None: a bar when stderr is a terminal
    layout_extra: dict[str, Any] = field(default_factory=dict)  # options of layouts registered by others

    def make_layout(self, num_classes: int) -> Layout:
        """The layout asked for, its options checked and defaults filled in."""
        options = {name: getattr(self, name) for cls in LAYOUTS.values() for name in cls.options
                   if hasattr(self, name)}
        return layout_for(self.layout, num_classes, **options, **self.layout_extra, seed=self.seed)


@dataclass
class DumpSummary:
    path: str
    rows: int
    rows_written: int
    seconds: float
    bytes_on_disk: int
    member_accuracy: list[float | None] = field(default_factory=list)
    ensemble_accuracy: float | None = None
    resumed_chunks: int = 0
    cache_key: str | None = None
    reused: bool = False
    repaired_chunks: list[int] = field(default_factory=list)  # damaged chunks of a cached store, recomputed
    skipped: list[int] = field(default_factory=list)  # sample ids whose images could not be read

    def lines(self) -> list[str]:
        if self.reused:
            return [f"reusing cached store {self.path} (key {self.cache_key[:12]}, {self.rows} rows, complete): the "
                    f"teacher did not run"]
        acc = ""
        if self.ensemble_accuracy is not None:
            per = ", ".join(f"{a:.4f}" for a in self.member_accuracy if a is not None)
            acc = (f"; teacher accuracy {self.ensemble_accuracy:.4f}"
                   + (f" (members {per})" if len(self.member_accuracy) > 1 else ""))
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        resumed = f", {self.resumed_chunks} chunks kept from an earlier run" if self.resumed_chunks else ""
        if self.repaired_chunks:
            resumed = (f", {self.resumed_chunks} chunks of the cached store kept, damaged chunks "
                       f"{_ranges(self.repaired_chunks)} recomputed")
        key = f", cache key {self.cache_key[:12]}" if self.cache_key else ""
        if self.skipped:
            shown = ", ".join(map(str, self.skipped[:10])) + (" ..." if len(self.skipped) > 10 else "")
            n = len(self.skipped)
            acc += f"; {n} unreadable image{'s' if n > 1 else ''} skipped (sample ids {shown}; in the manifest)"
        return [f"wrote {self.rows_written} of {self.rows} rows to {self.path} in {self.seconds:.1f}s "
                f"({rate:,.0f} rows/s, {self.bytes_on_disk / 1e6:.1f} MB on disk{resumed}{key}){acc}"]
