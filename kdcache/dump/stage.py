"""Stage one: resolve the dataset and teachers, build the manifest, run the teachers over the chunks
still to write (on every rank), and finish the store; or fill and reuse the store cache."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache.datasets import ResolvedDataset, get_batch, load_dataset, portable_model_spec, portable_spec
from kdcache.distributed import DistInfo, autocast, init_distributed, resolve_device, shutdown
from kdcache.dump.config import DumpConfig, DumpSummary
from kdcache.dump.samplers import (
    Batches,
    ChunkBatches,
    SequenceChunkBatches,
    SequenceIndex,
    TiledRows,
    token_unit_chunks,
)
from kdcache.dump.writer import ChunkWriter, count_kept, gather_counts, predictions, to_pinned
from kdcache.errors import KdcacheError, SpecError, StoreError
from kdcache.progress import progress_bar
from kdcache.specs import ResolvedModel, load_model, num_classes_of
from kdcache.store import LogitStore, Manifest, create_store, default_chunk_rows, detect_format, open_store
from kdcache.store.format import INDEX_CHUNK_FACTOR, SKIPPED_LABEL, sequence_lengths_digest
from kdcache.store.logit_store import _ranges
from kdcache.subset import resolve_subset
from kdcache.text import is_sequence_dataset, row_mask
from kdcache.views import ViewAugmenter, Views, make_views


def prepare(cfg: DumpConfig, device: torch.device, members: list[ResolvedModel] | None = None
            ) -> tuple[ResolvedDataset, list[ResolvedModel], Manifest, Any, SequenceIndex | None]:
    """Resolve the dataset, subset and teachers, and build the manifest the store must carry.

    Returns the dataset rows in store order (each sample once per view in a store with views) and,
    for a sequence dataset (a store with a row per position), the sequence index; items of length 0
    have no rows and are left out."""
    if not cfg.teachers:
        raise SpecError("give at least one {param:teacher}")
    dataset = load_dataset(cfg.dataset, cfg.data_root)
    if cfg.skip_bad_images:
        if not hasattr(dataset.dataset, "skip_bad"):
            raise SpecError(f"{{param:skip_bad_images}} applies to datasets of image files (imagefolder:, hf-image:), "
                            f"not {cfg.dataset!r}")
        dataset.dataset.skip_bad = True
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
        raise SpecError("{param:views} needs {param:augment}: the views of a sample differ by their augmentation")
    if cfg.augment:
        if is_sequence_dataset(dataset.dataset):
            raise SpecError(f"{{param:augment}} with dataset {cfg.dataset!r}: a store with a row per token position "
                            f"cannot "
                            f"hold augmented views; dump without {{param:augment}}")
        probe = get_batch(dataset.dataset, rows[:1])[0]
        views = make_views(cfg.augment, 1 if cfg.views is None else cfg.views, cfg.seed, input_shape, cfg.dataset,
                           probe, dataset.dataset)
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
        sequences=sequences, views=None if views is None else views.asdict())
    if not cfg.chunk_rows:
        manifest.chunk_rows = default_chunk_rows(manifest.row_bytes(), num_rows)
    _warn_dense_size(manifest)
    return dataset, members, manifest, rows if views is None else TiledRows(rows, views.count), index


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
    from kdcache.defaults import completed_spec  # the teacher's tokenizer or preprocessing by default
    cfg = dataclasses.replace(cfg, dataset=completed_spec(cfg.dataset, cfg.teachers))
    if cfg.out in (None, "cache"):
        return _dump_to_cache(cfg)
    t0 = time.perf_counter()
    fmt = detect_format(cfg.out, cfg.format)
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    try:
        dataset, members, manifest, rows, index = prepare(cfg, device, members)
        path = _rank_path(cfg.out, fmt, info)
        store = _open_for_writing(path, fmt, manifest, index, cfg.overwrite, info)
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
        writer = ChunkWriter(store, rows, len(members), written, index, unit_rows)
        writer.start()
        sampler = (ChunkBatches(rows, mine, manifest.chunk_rows, cfg.batch_size) if index is None
                   else SequenceChunkBatches(index, mine, unit_rows, cfg.batch_size))
        augmenter = (None if manifest.views is None
                     else ViewAugmenter(Views.from_manifest(manifest.views, cfg.out), cfg.out))
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
                        logits = ({k: to_pinned(v) for k, v in logits.items()} if isinstance(logits, dict)
                                  else to_pinned(logits))
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
        skipped: list[int] = []
        if info.is_main:
            if fmt == "hdf5" and info.enabled:
                _merge_hdf5_parts(store, cfg.out, info.world_size)
            if cfg.skip_bad_images:
                skipped = skipped_ids(store)
                store.manifest.skipped = skipped or None
            store.mark_complete()
        if info.is_main and resumed:  # the summary covers the whole store, not only what this run wrote
            count_kept(store, written, writer)
        accuracy, rows_written = gather_counts(writer, info)  # a collective: every rank waits for the merge
        if part:
            os.remove(path)
        nbytes = store.nbytes_on_disk() if info.is_main else 0
        store.close()
        return DumpSummary(cfg.out, manifest.num_samples, rows_written, time.perf_counter() - t0, nbytes,
                           accuracy[:-1], accuracy[-1], resumed, skipped=skipped)
    finally:
        shutdown(info)


def _open_for_writing(path: str, fmt: str, manifest: Manifest, index: SequenceIndex | None, overwrite: bool,
                      info: DistInfo) -> LogitStore:
    """This rank's store: created (or reopened to resume) by rank 0 for Zarr, whose ranks share it; an
    HDF5 rank creates its own file (see :func:`_rank_path`)."""
    seq_arrays = None if index is None else (index.ids, index.offsets)
    if fmt != "zarr":
        return create_store(path, manifest, fmt, overwrite=overwrite, sequence_index=seq_arrays)
    if info.is_main:
        store = create_store(path, manifest, fmt, overwrite=overwrite, sequence_index=seq_arrays)
    info.barrier()
    return store if info.is_main else LogitStore(path, fmt, allow_partial=True, writable=True)


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


def skipped_ids(store: LogitStore) -> list[int]:
    """The sample ids of rows labelled SKIPPED_LABEL (inputs that could not be read), read block by block."""
    found: set[int] = set()
    for a in range(0, store.manifest.num_samples, 1 << 20):
        ids, labels = store.read_index(a, min(a + (1 << 20), store.manifest.num_samples))
        found.update(ids[labels == SKIPPED_LABEL].tolist())
    return sorted(found)


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
