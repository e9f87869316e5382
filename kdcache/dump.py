"""Stage one: run the teacher (or every member of an ensemble) once over a dataset and fill a store."""
from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdcache.datasets import ResolvedDataset, get_batch, load_dataset, portable_model_spec, portable_spec
from kdcache.distributed import DistInfo, autocast, init_distributed, resolve_device, shutdown
from kdcache.errors import KdcacheError, SpecError, StoreError
from kdcache.layouts import LAYOUTS, Layout, encode_rows, layout_for
from kdcache.losses import teacher_log_probs
from kdcache.progress import progress_bar
from kdcache.specs import ResolvedModel, load_model, num_classes_of
from kdcache.store import LogitStore, Manifest, create_store, default_chunk_rows, detect_format, open_store
from kdcache.store.format import INDEX_CHUNK_FACTOR, sequence_lengths_digest
from kdcache.store.logit_store import _ranges
from kdcache.subset import resolve_subset
from kdcache.text import is_sequence_dataset, row_mask
from kdcache.views import ViewAugmenter, Views, make_views

QUEUE_BATCHES = 8
QUEUE_BYTES = 256 << 20


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
        return [f"wrote {self.rows_written} of {self.rows} rows to {self.path} in {self.seconds:.1f}s "
                f"({rate:,.0f} rows/s, {self.bytes_on_disk / 1e6:.1f} MB on disk{resumed}{key}){acc}"]


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
        x, y = get_batch(self.dataset, indices)
        params = None
        if self.augmenter is not None:
            params = self.augmenter.draw(indices, (first + np.arange(len(indices))) // self.per_view)
            x = self.augmenter.apply(x, params)
        return chunk, pos, x, y, params


class _Tiled:
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


class _Writer(threading.Thread):
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


def prepare(cfg: DumpConfig, device: torch.device, members: list[ResolvedModel] | None = None
            ) -> tuple[ResolvedDataset, list[ResolvedModel], Manifest, Any, SequenceIndex | None]:
    """Resolve the dataset, subset and teachers, and build the manifest the store must carry.

    Returns the dataset rows in store order (each sample once per view in a store with views) and,
    for a sequence dataset (a store with a row per position), the sequence index; items of length 0
    have no rows and are left out."""
    if not cfg.teachers:
        raise SpecError("give at least one --teacher")
    dataset = load_dataset(cfg.dataset, cfg.data_root)
    rows, subset_desc = resolve_subset(cfg.subset, dataset.dataset)
    input_shape = dataset.input_shape
    if members is None:
        members = [load_model(spec, input_shape, dataset.num_classes) for spec in cfg.teachers]
    for m in members:
        m.module.eval().to(device)
    _check_context(members, dataset)
    num_classes = num_classes_of(members, dataset, device)
    dtype = cfg.dtype
    layout = cfg.make_layout(num_classes)
    index, sequences, num_rows, views = None, None, len(rows), None
    if cfg.views is not None and not cfg.augment:
        raise SpecError("--views needs --augment: the views of a sample differ by their augmentation")
    if cfg.augment:
        if is_sequence_dataset(dataset.dataset):
            raise SpecError(f"--augment with dataset {cfg.dataset!r}: a store with a row per token position cannot "
                            f"hold augmented views; dump without --augment")
        probe = get_batch(dataset.dataset, rows[:1])[0]
        views = make_views(cfg.augment, 1 if cfg.views is None else cfg.views, cfg.seed, input_shape, cfg.dataset,
                           probe)
        num_rows = views.count * len(rows)
    if is_sequence_dataset(dataset.dataset):
        lengths = np.asarray(dataset.dataset.lengths(rows), dtype=np.int64)
        rows, lengths = rows[lengths > 0], lengths[lengths > 0]
        if not len(rows):
            raise SpecError(f"dataset {cfg.dataset!r}: every sequence selected has length 0, nothing to dump")
        index = SequenceIndex(rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        num_rows = int(index.offsets[-1])
        sequences = {"count": len(rows), "max_length": int(lengths.max()),
                     "lengths_sha256": sequence_lengths_digest(lengths)}
    names = dataset.class_names if dataset.class_names and len(dataset.class_names) == num_classes else None
    described = []
    for i, m in enumerate(members):
        d = m.describe()
        d["name"] = f"{i}:{d['name']}"
        d["spec"] = portable_model_spec(d["spec"], cfg.out)
        described.append(d)
    manifest = Manifest(
        num_samples=num_rows, num_classes=num_classes, num_members=len(members), dtype=dtype,
        chunk_rows=cfg.chunk_rows or 1, members=described, layout=layout.name, layout_params=layout.params(),
        dataset={**dataset.describe(), "spec": portable_spec(dataset.spec, cfg.out), "subset": subset_desc},
        compression=cfg.compression, class_names=names,
        sequences=sequences, views=None if views is None else dataclasses.asdict(views))
    if not cfg.chunk_rows:
        manifest.chunk_rows = default_chunk_rows(manifest.row_bytes(), num_rows)
    _warn_dense_size(manifest)
    return dataset, members, manifest, rows if views is None else _Tiled(rows, views.count), index


DENSE_WARN_BYTES = 20 << 30


def _check_context(members: list[ResolvedModel], dataset: ResolvedDataset) -> None:
    """Refuse, before anything is written, sequences longer than a teacher's context, and token ids of
    another tokenizer than the one saved beside an ``hf:`` teacher."""
    seq = getattr(dataset.dataset, "seq", None)
    for m in members:
        limit = getattr(m.module, "max_positions", None)
        if seq and limit and seq > limit:
            raise SpecError(f"dataset {dataset.spec!r} has sequences of up to {seq} tokens but teacher {m.spec!r} "
                            f"has a context of {limit}; give the dataset seq={limit} or less")
    used = dataset.describe().get("tokenizer") if hasattr(dataset.dataset, "identity") else None
    if used is None:
        return
    from kdcache.integrations.hf import load_tokenizer, model_tokenizer, tokenizer_identity
    for m in members:
        path = model_tokenizer(m.spec)
        own = tokenizer_identity(load_tokenizer(path, m.spec)) if path else None
        if own is not None and own["sha256"] != used["sha256"]:
            raise SpecError(f"dataset {dataset.spec!r} is tokenized with {used['name']} ({used['size']} tokens) but "
                            f"teacher {m.spec!r} has its own tokenizer ({own['size']} tokens, another vocabulary); "
                            f"tokenize with the teacher's (drop tokenizer= to use it)")


def _warn_dense_size(m: Manifest) -> None:
    """A store of every logit of a large vocabulary: say how big it will be and what top-k would cost."""
    size = m.num_samples * sum(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                               for name, (shape, _, dtype, _) in m.arrays().items() if name in m.logit_arrays)
    if m.store_layout.keeps_every_logit and size > DENSE_WARN_BYTES:
        topk = m.num_samples * m.num_members * (20 * (np.dtype(m.dtype).itemsize + 4) + 5 * 4)
        print(f"warning: this dense store will hold {size / 1e9:,.1f} GB ({m.num_classes:,} classes per row); "
              f"--layout topk --k 20 would take about {topk / 1e9:,.1f} GB with the tail's mass exact",
              file=sys.stderr)


def _rank_path(out: str, fmt: str, info: DistInfo) -> str:
    """Where this rank writes: Zarr ranks share one store, HDF5 ranks other than 0 write a part file."""
    if fmt == "zarr" or info.rank == 0:
        return out
    return f"{out}.rank{info.rank}-of-{info.world_size}.h5"


def dump_logits(cfg: DumpConfig, members: list[ResolvedModel] | None = None) -> DumpSummary:
    """Fill ``cfg.out`` with the teachers' raw logits; resumes an interrupted dump of the same thing.

    Without ``cfg.out`` (or with ``"cache"``) the store goes to the store cache under its key: a
    complete store there is reused without running the teacher, an incomplete one is resumed, and a
    second process asking for the same key waits for the first (see kdcache.cache)."""
    if cfg.dataset.startswith(("hf-text:", "hf-chat:")):
        from kdcache.datasets import with_tokenizer
        cfg = dataclasses.replace(cfg, dataset=with_tokenizer(cfg.dataset, cfg.teachers))
    if cfg.out in (None, "cache"):
        return _dump_to_cache(cfg)
    t0 = time.perf_counter()
    fmt = detect_format(cfg.out, cfg.format)
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    try:
        dataset, members, manifest, rows, index = prepare(cfg, device, members)
        path = _rank_path(cfg.out, fmt, info)
        seq_arrays = None if index is None else (index.ids, index.offsets)
        if fmt == "zarr":
            if info.is_main:
                store = create_store(path, manifest, fmt, overwrite=cfg.overwrite, sequence_index=seq_arrays)
            info.barrier()
            if not info.is_main:
                store = LogitStore(path, fmt, allow_partial=True, writable=True)
        else:
            store = create_store(path, manifest, fmt, overwrite=cfg.overwrite, sequence_index=seq_arrays)
        written = store.written_chunks()
        # The unit of work: a chunk, or for a per-token store a group of chunks holding about a batch of
        # sequences (so a batch is not cut to the few sequences of one small chunk). Ranks own groups of
        # INDEX_CHUNK_FACTOR chunks: one chunk of sample_ids/labels has one writer.
        unit_chunks = 1 if index is None else token_unit_chunks(manifest, cfg.batch_size)
        unit_rows = unit_chunks * manifest.chunk_rows
        num_units = -(-manifest.num_chunks // unit_chunks)
        owner = (lambda u: (u // INDEX_CHUNK_FACTOR) % info.world_size) if index is None else (
            lambda u: u % info.world_size)
        mine = [u for u in range(num_units)
                if owner(u) == info.rank and not written[u * unit_chunks:(u + 1) * unit_chunks].all()]
        resumed = int(written.sum()) if info.is_main else 0
        writer = _Writer(store, rows, len(members), written, index, unit_rows)
        writer.start()
        sampler = (ChunkBatches(rows, mine, manifest.chunk_rows, cfg.batch_size) if index is None
                   else SequenceChunkBatches(index, mine, unit_rows, cfg.batch_size))
        augmenter = None if manifest.views is None else ViewAugmenter(Views(**manifest.views), cfg.out)
        loader = DataLoader(Batches(dataset.dataset, augmenter, manifest.samples_per_view), sampler=sampler,
                            batch_size=None, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if cfg.workers else None)
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        n = manifest.num_samples
        bar = progress_bar(sum(min((u + 1) * unit_rows, n) - u * unit_rows for u in mine), show and info.is_main,
                           "dump-logits", "rows")
        modules = [m.module for m in members]
        layout = manifest.store_layout
        on_device = layout.encodes_on_device and (device.type != "cpu" if cfg.encode_on_device is None
                                                  else cfg.encode_on_device)
        try:
            with torch.inference_mode(), autocast(device, cfg.amp):
                for chunk, pos, x, y, params in loader:
                    x = x.to(device, non_blocking=True)
                    if index is None:
                        logits = torch.stack([mod(x) for mod in modules], dim=1).float()
                    else:
                        logits, y, pos = _token_rows(modules, x, y, index, chunk, pos, unit_rows, device,
                                                     dataset.dataset)
                    if on_device:  # only the layout's arrays go to the host
                        top1, ens_top1 = predictions(logits)
                        logits = {**layout.encode(chunk * unit_rows // manifest.chunk_rows, logits),
                                  "_top1": top1, "_ens_top1": ens_top1}
                    event = None
                    if device.type == "cuda":
                        logits = ({k: _to_pinned(v) for k, v in logits.items()} if isinstance(logits, dict)
                                  else _to_pinned(logits))
                        event = torch.cuda.Event()
                        event.record()
                    last = pos + len(y) >= min(unit_rows, n - chunk * unit_rows)
                    writer.put((chunk, pos, logits, y, params, event, last))
                    bar.update(len(y))
        finally:
            bar.close()
            writer.finish()
        part = fmt == "hdf5" and info.enabled and not info.is_main
        if part:
            store.close()  # HDF5 locks open files: rank 0 can merge this part only once it is closed
        info.barrier()
        if info.is_main:
            if fmt == "hdf5" and info.enabled:
                _merge_hdf5_parts(store, cfg.out, info.world_size)
            store.mark_complete()
        if info.is_main and resumed:  # the summary covers the whole store, not only what this run wrote
            _count_kept(store, written, writer)
        accuracy, rows_written = _gather_counts(writer, info)  # a collective: every rank waits for the merge
        if part:
            os.remove(path)
        nbytes = store.nbytes_on_disk() if info.is_main else 0
        store.close()
        return DumpSummary(cfg.out, manifest.num_samples, rows_written, time.perf_counter() - t0, nbytes,
                           accuracy[:-1], accuracy[-1], resumed)
    finally:
        shutdown(info)


def _dump_to_cache(cfg: DumpConfig) -> DumpSummary:
    from kdcache import cache
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_root)
    members = [load_model(spec, dataset.input_shape, dataset.num_classes) for spec in cfg.teachers]
    _, subset = resolve_subset(cfg.subset, dataset.dataset)
    views = None if not cfg.augment else {"augment": cfg.augment, "count": 1 if cfg.views is None else cfg.views,
                                          "seed": cfg.seed}
    key = cache.key_of([m.describe()["sha256"] for m in members], {**dataset.describe(), "subset": subset},
                       cfg.layout, cfg.make_layout(1 << 31).params(), cfg.dtype, views)
    path = cache.store_path(key, cfg.format or "zarr")
    with cache.locked(path, exclusive=True):  # a second identical dump waits here, then reuses the store
        fmt = detect_format(str(path))
        repaired: list[int] = []
        if _exists(str(path), fmt):
            cache.check_entry(path, key)
            existing = open_store(str(path), allow_partial=True)
            done, rows = existing.manifest.complete, existing.manifest.num_samples
            existing.close()
            if done and not cfg.overwrite:
                bad = cache.damaged_chunks(path, key)  # only the chunks whose files changed since last verified
                if not bad:
                    cache.touch(path)
                    return DumpSummary(str(path), rows, 0, time.perf_counter() - t0, 0, cache_key=key, reused=True)
                repaired = cache.forget_damaged(path, bad)
                which = f"chunk {repaired[0]} is" if len(repaired) == 1 else f"chunks {_ranges(repaired)} are"
                print(f"cached store {key[:12]}: {which} damaged (changed since the store was last verified); "
                      f"recomputing them", file=sys.stderr)
        # --overwrite recomputes it in place (a store the user no longer trusts)
        try:
            summary = dump_logits(dataclasses.replace(cfg, out=str(path), format=fmt), members)
        except StoreError as e:
            if not path.with_suffix(".repairing").exists():
                raise
            why = str(e).split("; the chunks written before")[0].removeprefix(f"{path}: ")
            raise StoreError(f"cached store {key[:12]} could not be repaired ({why}); remove it with "
                             f"`kdcache cache rm {key[:12]}` and dump again") from None
        path.with_suffix(".repairing").unlink(missing_ok=True)
        cache.record_verified(path)
        cache.touch(path)
    summary.cache_key = key
    summary.repaired_chunks = repaired
    return summary


def _exists(path: str, fmt: str) -> bool:
    from kdcache.store.logit_store import BACKENDS
    return BACKENDS[fmt].exists(path)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def token_unit_chunks(m: Manifest, batch_size: int) -> int:
    """Chunks per unit of work of a per-token dump: a multiple of INDEX_CHUNK_FACTOR holding about
    ``batch_size`` sequences of the longest length."""
    target = batch_size * m.sequences["max_length"]
    group = INDEX_CHUNK_FACTOR * m.chunk_rows
    return INDEX_CHUNK_FACTOR * max(1, -(-target // group))


def _token_rows(modules: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, index: SequenceIndex, unit: int,
                span: tuple[int, int], unit_rows: int, device: torch.device, dataset: Any
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run a batch of sequences and keep the rows of their positions with a row (the dataset's
    :func:`kdcache.text.row_mask`) that fall in ``unit``: ``([rows, members, classes], [rows], first
    row's position in the unit)``. Which rows to keep is worked out on the host, so selecting them on
    the device drops padding (and positions without a row) without a sync."""
    first, stop = span
    lengths = np.diff(index.offsets[first:stop + 1])
    if x.shape[1] < lengths.max():
        raise KdcacheError(f"the dataset's batch is {x.shape[1]} positions wide but its lengths() says "
                           f"{int(lengths.max())}; get_batch must pad to at least the longest length")
    base = int(index.offsets[first])
    a, b = unit * unit_rows, min((unit + 1) * unit_rows, int(index.offsets[-1]))
    lo, hi = max(a, base) - base, min(b, int(index.offsets[stop])) - base
    real = row_mask(dataset, index.ids[first:stop], x.shape[1])
    keep = real.flatten().nonzero()[lo:hi, 0]  # flat [batch * length] positions of this unit's rows
    out = torch.stack([mod(x) for mod in modules], dim=2).flatten(0, 1)  # [batch * length, members, classes]
    z = out.index_select(0, keep.to(device, non_blocking=True)).float()
    labels = y.reshape(-1)[keep] if y.ndim == 2 else y.repeat_interleave(torch.from_numpy(lengths))[lo:hi]
    return z, labels, max(a, base) - a


def _count_kept(store: LogitStore, kept: np.ndarray, writer: _Writer) -> None:
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


def _gather_counts(writer: _Writer, info: DistInfo) -> tuple[list[float | None], int]:
    """Accuracy per member then for the ensemble, and rows written, summed over ranks."""
    counts = torch.tensor(list(writer.correct) + [writer.labelled, writer.rows_written], dtype=torch.float64)
    if info.enabled:
        import torch.distributed as dist
        dist.all_reduce(counts)
    n = counts[-2].item()
    return [float(c / n) if n else None for c in counts[:-2].tolist()], int(counts[-1].item())


def _merge_hdf5_parts(store: LogitStore, out: str, world_size: int) -> None:
    """Rank 0 copies every chunk the other ranks wrote into the final HDF5 file."""
    for r in range(1, world_size):
        part_path = f"{out}.rank{r}-of-{world_size}.h5"
        part = open_store(part_path, "hdf5", allow_partial=True)
        done = part.written_chunks() & ~store.written_chunks()
        for c in np.flatnonzero(done):
            a, b = part.manifest.chunk_range(int(c))
            blk = part.read(a, b)
            store.write_block(a, blk.data, blk.sample_ids, blk.labels)
        part.close()
