"""The logit store: format logic shared by every backend (create, resume, read, write, verify)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from kdcache.errors import StoreError
from kdcache.store.format import (
    FORMAT_VERSION,
    MANIFEST_DIGEST_KEY,
    SEQUENCE_ARRAYS,
    Manifest,
    chunk_digest,
    known_arrays,
    manifest_digest,
)
from kdcache.store.hdf5_store import HDF5Backend
from kdcache.store.remote import remote_problem
from kdcache.store.zarr_store import ZarrBackend

BACKENDS = {"zarr": ZarrBackend, "hdf5": HDF5Backend}


def detect_format(path: str, fmt: str | None = None) -> str:
    """The backend for ``path``: ``fmt`` when given, else from the suffix."""
    found = _format_of(str(path), fmt)
    if found == "hdf5" and "://" in str(path):
        raise StoreError(f"{path}: an HDF5 store is a local file; in object storage use Zarr (a URL ending in "
                         f".zarr; `kdcache convert` copies an HDF5 store there)")
    return found


def _format_of(path: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in BACKENDS:
            raise StoreError(f"unknown store format {fmt!r}; use zarr or hdf5")
        return fmt
    p = str(path).rstrip("/")
    if p.endswith(".zarr"):
        return "zarr"
    if p.endswith((".h5", ".hdf5")):
        return "hdf5"
    if "://" in p:
        return "zarr"
    raise StoreError(f"cannot tell the format of store {str(path)!r} from its name; "
                     f"end it in .zarr, .h5 or .hdf5, or pass {{param:format}} zarr|hdf5")


@dataclass
class Block:
    """Rows ``start:stop`` of a store: the layout's data arrays by name, ``sample_ids`` and ``labels``.

    For a dense store ``logits`` is ``data["logits"]``, ``[rows, members, classes]``.
    """

    start: int
    data: dict[str, np.ndarray]
    sample_ids: np.ndarray
    labels: np.ndarray

    @property
    def logits(self) -> np.ndarray:
        if "logits" not in self.data:
            raise StoreError(f"this is a sparse store (arrays {', '.join(self.data)}), it has no dense logits")
        return self.data["logits"]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def rows(self, sl: slice | np.ndarray) -> "Block":
        return Block(self.start, {k: v[sl] for k, v in self.data.items()}, self.sample_ids[sl], self.labels[sl])


class LogitStore:
    """An open logit store. Pickles as its path, so DataLoader workers reopen it themselves."""

    def __init__(self, path: str, fmt: str | None = None, *, allow_partial: bool = False,
                 writable: bool = False, _backend: Any = None) -> None:
        self.path = str(path)
        self.format = detect_format(self.path, fmt)
        self.allow_partial = allow_partial
        self.writable = writable
        self._seq_index: tuple[np.ndarray, np.ndarray] | None = None
        self.cache: Any = None  # a BlockCache (use_cache)
        cls = BACKENDS[self.format]
        if _backend is None:
            if not _exists(cls, self.path):
                raise StoreError(f"store {self.path!r} does not exist; create it with `kdcache dump-logits`")
            try:
                _backend = cls(self.path, "r+" if writable else "r")
            except StoreError:
                raise
            except Exception as e:
                raise StoreError(f"{self.path}: " + (remote_problem(self.path, e) or
                                 f"cannot be opened as a {self.format} store ({e}); is it a kdcache store, and was "
                                 f"it written completely?")) from None
        self._b = _backend
        self._verified: set[int] = set()   # chunks whose sha256 this process has checked on read
        self._stored_digests: np.ndarray | None = None
        self._digests_lock = threading.Lock()  # read-ahead threads share this store
        try:
            raw = self._b.read_manifest()
            digest = self._b.read_manifest_digest()
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{self.path}: " + (remote_problem(self.path, e) or
                             f"its manifest cannot be read ({_first_line(e)}); the store is damaged, re-dump it")) \
                from None
        if raw is None:
            raise StoreError(f"{self.path}: no {('kdcache')!r} manifest attribute; this is not a kdcache store "
                             f"(or its creation was interrupted: re-dump with {{param:overwrite}})")
        if (digest is not None and isinstance(raw, dict) and raw.get("format_version") == FORMAT_VERSION
                and digest != manifest_digest(raw)):  # another version is refused as such by from_dict
            raise StoreError(f"{self.path}: the manifest does not match its sha256 ({MANIFEST_DIGEST_KEY}); the store "
                             f"is damaged, re-dump it")
        self.manifest = Manifest.from_dict(raw, self.path)
        self._check_arrays()
        if not self.manifest.complete and not allow_partial:
            done = int(self.written_chunks().sum())
            raise StoreError(
                f"{self.path}: store is incomplete ({done} of {self.manifest.num_chunks} chunks written); "
                f"run the same dump-logits command again to resume it, or accept a partial store explicitly")

    # -- structure ---------------------------------------------------------------------------
    def _check_arrays(self) -> None:
        for name, (shape, _, dtype, _) in self.manifest.arrays().items():
            try:
                present = self._b.has(name)
                a = self._b.array(name) if present else None
            except Exception as e:
                raise StoreError(f"{self.path}: array {name!r} cannot be opened ({_first_line(e)}); the store is "
                                 f"damaged, re-dump it") from None
            if not present:
                raise StoreError(f"{self.path}: array {name!r} is missing; the store is damaged, re-dump it")
            if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dtype):
                raise StoreError(f"{self.path}: array {name!r} has shape {tuple(a.shape)} {np.dtype(a.dtype)}, "
                                 f"the manifest implies {shape} {dtype}; the store is damaged, re-dump it")

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_members(self) -> int:
        return self.manifest.num_members

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        m = self.manifest
        return (f"LogitStore({self.path!r}, {self.format}, {m.num_samples}x{m.num_members}x{m.num_classes} "
                f"{m.dtype}, complete={m.complete})")

    def __getstate__(self) -> dict:
        return {"path": self.path, "format": self.format, "allow_partial": self.allow_partial, "cache": self.cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["format"], allow_partial=state["allow_partial"])
        self.cache = state.get("cache")

    def use_cache(self, cache: Any, max_bytes: int | str = "10GB") -> None:
        """Keep the blocks this store reads in a local :class:`~kdcache.store.block_cache.BlockCache`
        (or a directory for one), so that they are read from there the next time. Complete stores
        only (a partial store is still being written)."""
        from kdcache.store.block_cache import BlockCache
        if self.manifest.complete:
            self.cache = cache if isinstance(cache, BlockCache) else BlockCache(cache, max_bytes)

    def close(self) -> None:
        self._b.close()

    def __enter__(self) -> "LogitStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def nbytes_on_disk(self) -> int:
        return self._b.nbytes_on_disk()

    # -- reading -----------------------------------------------------------------------------
    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """One array's rows, every backend failure (a decode error, a truncated file, a missing
        object) turned into one line naming the store, the array and the chunks."""
        try:
            return self._b.read_into(name, start, stop)
        except Exception as e:
            far = remote_problem(self.path, e)
            if far:
                raise StoreError(f"{self.path}: reading {name!r} rows {start}:{stop} failed: {far}") from None
            cr = self.manifest.chunk_rows if name in (*self.manifest.data_arrays, "sample_ids", "labels") else None
            where = f"rows {start}:{stop}" + (f" (chunks {start // cr}-{max(start, stop - 1) // cr})" if cr else "")
            raise StoreError(f"{self.path}: array {name!r}, {where} cannot be read ({_first_line(e)}); the store is "
                             f"damaged: `kdcache verify {self.path}` lists every bad chunk; re-dump it, or "
                             f"`kdcache convert` what is good") from None

    def read_index(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(sample_ids, labels)`` of rows ``start:stop``, without the logit arrays (unchecked)."""
        return self._read("sample_ids", start, stop), self._read("labels", start, stop)

    def read(self, start: int, stop: int, *, check: bool = True) -> Block:
        """Rows ``start:stop`` in one call per array. Read large blocks: each call has a fixed cost.

        With ``check`` (the default) every written chunk the rows touch is checked against its
        stored sha256 the first time this store object reads it (a chunk only partly in the rows is
        read whole for that), so damaged data is refused, never used.
        """
        stop = min(stop, self.num_samples)
        if not 0 <= start <= stop:
            raise StoreError(f"{self.path}: rows {start}:{stop} are outside 0:{self.num_samples}")
        key = None
        if self.cache is not None and check and stop > start:
            cr = self.manifest.chunk_rows
            key = self.cache.key(self.path, start, stop, self._digests_cached()[start // cr:-(-stop // cr)])
            hit = self.cache.get(key)
            if hit is not None:
                return Block(start, {a: hit[a] for a in self.manifest.data_arrays}, hit["sample_ids"], hit["labels"])
        names = [*self.manifest.data_arrays, "sample_ids", "labels"]
        try:
            arrays = dict(zip(names, self._b.read_many(names, start, stop)))
        except Exception:  # read them one by one: the failure, named by array and chunk
            arrays = {a: self._read(a, start, stop) for a in names}
        block = Block(start, {a: arrays[a] for a in self.manifest.data_arrays}, arrays["sample_ids"], arrays["labels"])
        if check:
            self._check_read(block)
        if key is not None:
            self.cache.put(key, {**block.data, "sample_ids": block.sample_ids, "labels": block.labels})
        return block

    def _digests_cached(self) -> np.ndarray:
        with self._digests_lock:
            if self._stored_digests is None:
                self._stored_digests = self.digests()
        return self._stored_digests

    def _check_read(self, block: Block) -> None:
        m = self.manifest
        cr = m.chunk_rows
        stored = self._digests_cached()
        stop = block.start + len(block)
        for c in range(block.start // cr, -(-stop // cr)):
            if c in self._verified or not stored[c].any():
                continue  # checked already, or not written yet (a partial store)
            a, b = c * cr, min((c + 1) * cr, m.num_samples)
            part = (block.rows(slice(a - block.start, b - block.start)) if a >= block.start and b <= stop
                    else self.read(a, b, check=False))
            if not np.array_equal(chunk_digest(*(part.data[k] for k in m.data_arrays), part.sample_ids,
                                               part.labels), stored[c]):
                if self._forget_verified():
                    raise StoreError(f"{self.path}: chunk {c} (rows {a}:{b}) does not match its stored sha256; the "
                                     f"store is damaged: it is a cached store, so the same `kdcache dump-logits` "
                                     f"(without {{param:out}}) recomputes its damaged chunks")
                raise StoreError(f"{self.path}: chunk {c} (rows {a}:{b}) does not match its stored sha256; the store "
                                 f"is damaged: `kdcache verify {self.path}` lists every bad chunk; re-dump it, or "
                                 f"`kdcache convert` what is good")
            self._verified.add(c)

    def _forget_verified(self) -> bool:
        """A store of the store cache keeps ``KEY.verified`` beside it (see kdcache.cache): damage found
        here voids it, so the next dump into the cache checks every chunk and recomputes the bad ones.
        True when this is such a store."""
        record = os.path.splitext(self.path)[0] + ".verified"
        if "://" in self.path or not os.path.exists(record):
            return False
        try:
            os.remove(record)
        except OSError:
            pass
        return True

    def iter_blocks(self, block_rows: int | None = None) -> Iterator[Block]:
        """Every row in order, in chunk-aligned blocks of about ``block_rows`` (default 8 chunks)."""
        step = self._aligned(block_rows)
        for start in range(0, self.num_samples, step):
            yield self.read(start, start + step)

    def _aligned(self, block_rows: int | None) -> int:
        cr = self.manifest.chunk_rows
        rows = block_rows or 8 * cr
        return max(cr, rows // cr * cr)

    # -- per-token stores --------------------------------------------------------------------
    def sequence_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sequence_ids [S], sequence_offsets [S + 1])`` of a per-token store: the rows of sequence
        ``i`` (dataset index ``sequence_ids[i]``) are ``sequence_offsets[i]:sequence_offsets[i + 1]``,
        one per position, in order. Read once, O(sequences)."""
        if not self.manifest.per_token:
            raise StoreError(f"{self.path}: a store with a row per sample has no sequence index")
        if self._seq_index is None:
            ids = np.asarray(self._read("sequence_ids", 0, self.manifest.sequences["count"]))
            offsets = np.asarray(self._read("sequence_offsets", 0, self.manifest.sequences["count"] + 1))
            if (offsets[0] != 0 or offsets[-1] != self.num_samples or (np.diff(offsets) < 1).any()
                    or ids.min() < 0 or ids.max() >= self.manifest.dataset["length"]):
                raise StoreError(f"{self.path}: sequence_offsets/sequence_ids are inconsistent (the store is "
                                 f"damaged); re-dump it")
            self._seq_index = (ids, offsets)
        return self._seq_index

    def read_sequences(self, first: int, stop: int) -> Block:
        """The rows of sequences ``first:stop`` (store order), in one read per array."""
        _, offsets = self.sequence_index()
        return self.read(int(offsets[first]), int(offsets[min(stop, len(offsets) - 1)]))

    def digests(self) -> np.ndarray:
        return np.asarray(self._read("chunk_sha256", 0, self.manifest.num_chunks))

    def written_chunks(self) -> np.ndarray:
        """Bool per chunk: True once the chunk's rows and digest are written (a zero digest is unwritten)."""
        return self.digests().any(axis=1)

    # -- writing -----------------------------------------------------------------------------
    def write_block(self, start: int, data: np.ndarray | dict[str, np.ndarray], sample_ids: np.ndarray,
                    labels: np.ndarray) -> None:
        """Write whole chunks starting at row ``start``; a chunk's digest is written after its rows.

        ``data`` is the dense ``logits`` array, or a dict of the layout's arrays. Non-finite values
        and class ids out of range are refused, naming the sample ids, before anything is written.
        """
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        m = self.manifest
        if not isinstance(data, dict):
            data = {"logits": data}
        n = len(sample_ids)
        stop = start + n
        if start % m.chunk_rows or (stop % m.chunk_rows and stop != m.num_samples) or stop > m.num_samples:
            raise StoreError(f"{self.path}: block {start}:{stop} is not aligned to chunks of {m.chunk_rows} rows")
        spec = m.arrays()
        if set(data) != set(m.data_arrays):
            raise StoreError(f"{self.path}: a {m.layout} store takes arrays {', '.join(m.data_arrays)}, "
                             f"got {', '.join(data)}")
        clean = {}
        for name in m.data_arrays:
            shape, _, dtype, _ = spec[name]
            a = data[name]
            if tuple(a.shape) != (n, *shape[1:]) or len(labels) != n:
                raise StoreError(f"{self.path}: block has {name} {tuple(a.shape)}, {n} ids and {len(labels)} labels; "
                                 f"expected {(n, *shape[1:])} and {n} each")
            with np.errstate(over="ignore"):  # an overflow to inf is reported below, by sample id
                clean[name] = np.ascontiguousarray(a, dtype=dtype)
        self._refuse_bad_rows(clean, np.asarray(sample_ids))
        sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        first = start // m.chunk_rows
        cr = m.chunk_rows
        digests = np.stack([chunk_digest(*(clean[k][a:a + cr] for k in m.data_arrays), sample_ids[a:a + cr],
                                         labels[a:a + cr]) for a in range(0, n, cr)])
        try:
            for name, a in clean.items():
                self._b.array(name)[start:stop] = a
            self._b.array("sample_ids")[start:stop] = sample_ids
            self._b.array("labels")[start:stop] = labels
            self._b.flush()
            self._b.array("chunk_sha256")[first:first + len(digests)] = digests  # last: the chunk is now written
            self._b.flush()
        except Exception as e:
            raise StoreError(write_failure(self.path, f"rows {start}:{stop} (chunks {first}-{(stop - 1) // cr})", e)) \
                from None

    def _refuse_bad_rows(self, data: dict[str, np.ndarray], sample_ids: np.ndarray) -> None:
        m = self.manifest
        n = len(sample_ids)
        bad = np.zeros(n, dtype=bool)
        for name, a in data.items():
            if a.dtype.kind == "f":
                finite = np.isfinite(a).reshape(n, -1).all(axis=1)
                if name == "view_params" and not finite.all():
                    raise StoreError(f"non-finite view parameters for sample ids {sample_ids[~finite][:10].tolist()}; "
                                     f"check the augmentation's sample()")
                bad |= ~finite
        if bad.any():
            ids = sample_ids[bad]
            shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
            raise StoreError(f"non-finite teacher logits (NaN/inf, or too large for {m.dtype}) for "
                             f"{len(ids)} sample(s), sample ids {shown}; check the teacher and its inputs"
                             + ("" if m.dtype == "float32" else ", or dump with {param:dtype} float32"))
        ids = m.store_layout.bad_id_rows(data)
        if ids is not None and ids[1].any():
            raise StoreError(f"{self.path}: {ids[0]} outside 0..{m.num_classes - 1} for sample ids "
                             f"{sample_ids[ids[1]][:10].tolist()}")

    def mark_complete(self) -> None:
        """Set ``complete`` once every chunk is written: the manifest is the last thing written."""
        missing = np.flatnonzero(~self.written_chunks())
        if len(missing):
            raise StoreError(f"{self.path}: cannot mark complete, chunks {_ranges(missing)} are not written")
        self.manifest.complete = True
        try:
            self._b.write_manifest(self.manifest.to_dict())
        except Exception as e:
            raise StoreError(write_failure(self.path, "the manifest", e)) from None

    # -- verification ------------------------------------------------------------------------
    def verify(self, block_rows: int | None = None) -> list[str]:
        """Problems found by re-reading every chunk; an empty list means the store is sound. It keeps
        going past chunks that cannot be read and lists them all."""
        m = self.manifest
        problems = []
        if not m.complete:
            problems.append("store is not marked complete")
        stored, unreadable_digests = self._digests_for_verify()
        if unreadable_digests:
            problems.append(f"chunk_sha256 entries {_ranges(np.array(unreadable_digests))} cannot be read")
        written = stored.any(axis=1)
        missing = np.setdiff1d(np.flatnonzero(~written), unreadable_digests)
        if len(missing):
            problems.append(f"chunks {_ranges(missing)} are not written")
        unreadable: dict[str, list[int]] = {}
        if m.per_token:
            return problems + self._verify_tokens(written, stored, block_rows, unreadable)
        bad_digest, bad_finite, bad_ids = [], [], []
        length = m.dataset.get("length") or 0
        per_sample = m.views["count"] if m.views else 1  # a store with views holds each sample once per view
        seen = np.zeros(length, dtype=np.uint8 if per_sample < 255 else np.int64)  # per dataset row, not per store row
        out_of_range = repeated = False
        for block in self._verify_blocks(block_rows, unreadable):
            self._check_chunks(block, written, stored, bad_digest, bad_finite, bad_ids)
            ids = block.sample_ids[np.repeat(written[block.start // m.chunk_rows:][:-(-len(block) // m.chunk_rows)],
                                             m.chunk_rows)[:len(block)]]
            if len(ids) and (ids.min() < 0 or ids.max() >= length):
                out_of_range = True
                continue
            np.add.at(seen, ids, 1)
            repeated |= bool(seen[ids].max(initial=0) > per_sample)
        problems += self._unreadable_problems(unreadable) + self._chunk_problems(bad_ids, bad_digest, bad_finite)
        if out_of_range:
            problems.append(f"sample_ids fall outside 0:{length}")
        if repeated:
            problems.append("sample_ids repeat a sample")
        return problems

    def damaged_chunks(self, chunks: Iterator[int] | list[int] | range) -> list[int]:
        """Those of ``chunks`` that are unwritten, cannot be read, or no longer match their digest: the
        cheap re-check of the chunks whose files changed (see kdcache.cache), chunk by chunk."""
        cr = self.manifest.chunk_rows
        bad = []
        for c in sorted(set(int(c) for c in chunks)):
            try:
                stored = np.asarray(self._read("chunk_sha256", c, c + 1))[0]
                part = self.read(c * cr, (c + 1) * cr, check=False)
            except StoreError:
                bad.append(c)
                continue
            if not stored.any() or not np.array_equal(
                    chunk_digest(*(part.data[k] for k in self.manifest.data_arrays), part.sample_ids, part.labels),
                    stored):
                bad.append(c)
        return bad

    def forget_chunks(self, chunks: list[int]) -> None:
        """Mark ``chunks`` unwritten (their digests zeroed) and the store incomplete, so that resuming
        the dump recomputes exactly those chunks."""
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        try:
            for c in chunks:
                self._b.array("chunk_sha256")[c:c + 1] = np.zeros((1, 32), dtype=np.uint8)  # a whole digest chunk
            self._b.flush()
            self.manifest.complete = False
            self._b.write_manifest(self.manifest.to_dict())
        except Exception as e:
            raise StoreError(write_failure(self.path, f"the digests of chunks {_ranges(np.array(chunks))}", e)) \
                from None
        self._stored_digests = None

    def _digests_for_verify(self) -> tuple[np.ndarray, list[int]]:
        """The stored chunk digests, read entry by entry where the array is damaged (those count as unwritten)."""
        try:
            return self.digests(), []
        except StoreError:
            out = np.zeros((self.manifest.num_chunks, 32), dtype=np.uint8)
            bad = []
            for c in range(self.manifest.num_chunks):
                try:
                    out[c] = self._read("chunk_sha256", c, c + 1)[0]
                except StoreError:
                    bad.append(c)
            return out, bad

    def _verify_blocks(self, block_rows: int | None, unreadable: dict[str, list[int]]) -> Iterator[Block]:
        """Blocks of every readable chunk in order; a block that fails is read again chunk by chunk,
        and each array's unreadable chunks are noted in ``unreadable``."""
        cr = self.manifest.chunk_rows
        for start in range(0, self.num_samples, self._aligned(block_rows)):
            try:
                yield self.read(start, start + self._aligned(block_rows), check=False)
                continue
            except StoreError:
                pass
            for a in range(start, min(start + self._aligned(block_rows), self.num_samples), cr):
                bad = False
                for name in (*self.manifest.data_arrays, "sample_ids", "labels"):
                    try:
                        self._read(name, a, a + cr)
                    except StoreError:
                        unreadable.setdefault(name, []).append(a // cr)
                        bad = True
                if not bad:
                    yield self.read(a, a + cr, check=False)

    def _unreadable_problems(self, unreadable: dict[str, list[int]]) -> list[str]:
        return [f"chunks {_ranges(np.array(c))} of {name} cannot be read (damaged)" for name, c in unreadable.items()]

    def _check_chunks(self, block: Block, written: np.ndarray, stored: np.ndarray, bad_digest: list[int],
                      bad_finite: list[int], bad_ids: list[int]) -> None:
        m = self.manifest
        for a in range(0, len(block), m.chunk_rows):
            c = (block.start + a) // m.chunk_rows
            if not written[c]:
                continue
            part = block.rows(slice(a, a + m.chunk_rows))
            if not np.array_equal(chunk_digest(*(part.data[k] for k in m.data_arrays), part.sample_ids,
                                               part.labels), stored[c]):
                bad_digest.append(c)
            if not all(np.isfinite(v).all() for v in part.data.values() if v.dtype.kind == "f"):
                bad_finite.append(c)
            ids = m.store_layout.bad_id_rows(part.data)
            if ids is not None and ids[1].any():
                bad_ids.append(c)

    def _chunk_problems(self, bad_ids: list[int], bad_digest: list[int], bad_finite: list[int]) -> list[str]:
        out = []
        if bad_ids:
            out.append(f"chunks {_ranges(np.array(bad_ids))} hold class ids outside 0..{self.num_classes - 1}")
        if bad_digest:
            out.append(f"chunks {_ranges(np.array(bad_digest))} do not match their stored sha256")
        if bad_finite:
            out.append(f"chunks {_ranges(np.array(bad_finite))} hold non-finite logits")
        return out

    def _verify_tokens(self, written: np.ndarray, stored: np.ndarray, block_rows: int | None,
                       unreadable: dict[str, list[int]]) -> list[str]:
        """A per-token store: chunks as for any store, then the sequence index against the rows'
        sample_ids (each row names the sequence that its offsets place it in)."""
        from kdcache.store.format import sequence_lengths_digest
        m = self.manifest
        problems: list[str] = []
        try:
            ids, offsets = self.sequence_index()
        except StoreError as e:
            return [str(e)]
        if len(np.unique(ids)) != len(ids):
            problems.append("sequence_ids repeat a sequence")
        if sequence_lengths_digest(np.diff(offsets)) != m.sequences["lengths_sha256"]:
            problems.append("sequence_offsets do not match the lengths the manifest records")
        bad_digest: list[int] = []
        bad_finite: list[int] = []
        bad_ids: list[int] = []
        misplaced = 0
        for block in self._verify_blocks(block_rows, unreadable):
            self._check_chunks(block, written, stored, bad_digest, bad_finite, bad_ids)
            rows = np.arange(block.start, block.start + len(block))
            want = ids[np.searchsorted(offsets, rows, side="right") - 1]
            keep = np.repeat(written[block.start // m.chunk_rows:][:-(-len(block) // m.chunk_rows)],
                             m.chunk_rows)[:len(block)]
            misplaced += int((block.sample_ids[keep] != want[keep]).sum())
        problems += self._unreadable_problems(unreadable) + self._chunk_problems(bad_ids, bad_digest, bad_finite)
        if misplaced:
            problems.append(f"{misplaced} rows' sample_ids disagree with sequence_ids/sequence_offsets")
        return problems


def write_failure(path: str, what: str, e: BaseException) -> str:
    """The one line for a write that failed (a full disk, a file-size limit, a lost connection)."""
    far = remote_problem(path, e)
    if far:
        return (f"{path}: writing {what} failed: {far}; the chunks written before are kept: run the same command "
                f"again to resume")
    reason = getattr(e, "strerror", None) or _first_line(e)
    return (f"{path}: writing {what} failed ({reason}); the chunks written before are kept: free space (or raise "
            f"the limit) and run the same command again to resume")


def _exists(cls: Any, path: str) -> bool:
    try:
        return cls.exists(path)
    except StoreError:
        raise
    except Exception as e:
        problem = remote_problem(path, e)
        if problem is None:
            raise
        raise StoreError(f"{path}: {problem}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _ranges(idx: np.ndarray) -> str:
    """``[0,1,2,5]`` -> ``"0-2, 5"`` (at most a few ranges shown)."""
    out, idx = [], sorted(int(i) for i in idx)
    start = prev = idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out[:8]) + (f" (+{len(out) - 8} more ranges)" if len(out) > 8 else "")


def open_store(path: str | os.PathLike, fmt: str | None = None, *, allow_partial: bool = False) -> LogitStore:
    """Open a store for reading. Refuses incomplete stores unless ``allow_partial``."""
    return LogitStore(str(path), fmt, allow_partial=allow_partial)


def create_store(path: str | os.PathLike, manifest: Manifest, fmt: str | None = None, *,
                 overwrite: bool = False, sequence_index: tuple[np.ndarray, np.ndarray] | None = None) -> LogitStore:
    """Create a store for ``manifest``, or reopen an incomplete one that holds the same thing.

    A complete store at ``path`` is refused unless ``overwrite``; an incomplete one is resumed
    when its identity matches ``manifest`` and refused otherwise. Something at ``path`` that is
    not a kdcache store is never deleted. A per-token manifest needs ``sequence_index``
    (``sequence_ids``, ``sequence_offsets``), written before the manifest.
    """
    if manifest.per_token != (sequence_index is not None):
        raise StoreError("a per-token store is created with its sequence index, and only a per-token store has one")
    path = str(path)
    fmt = detect_format(path, fmt)
    cls = BACKENDS[fmt]
    if _exists(cls, path):
        try:
            existing = LogitStore(path, fmt, allow_partial=True, writable=True)
        except StoreError as e:
            if _is_kdcache_leftover(cls, path):  # no manifest yet, so no chunk was written
                cls.remove(path)
                existing = None
            else:
                raise StoreError(f"{path} exists and is not a readable kdcache store ({e}); "
                                 f"move it away or choose another {{param:out}}") from None
        if existing is not None:
            if overwrite:
                existing.close()
                cls.remove(path)
            elif existing.manifest.complete:
                existing.close()
                raise StoreError(f"{path} already holds a complete store; pass {{param:overwrite}} to replace it "
                                 f"or choose another {{param:out}}")
            else:
                ours, theirs = manifest.identity(), existing.manifest.identity()
                diff = [k for k in ours if ours[k] != theirs[k]]
                if diff:
                    existing.close()
                    raise StoreError(
                        f"{path} holds an incomplete store of something else (differs in {', '.join(diff)}); "
                        f"pass {{param:overwrite}} to start it again or choose another {{param:out}}")
                return existing
    m = manifest
    try:
        backend = cls.create(path, m.arrays(), m.compression, m.data_arrays, m.dimension_names())
        if sequence_index is not None:
            for name, a in zip(SEQUENCE_ARRAYS, sequence_index):
                backend.array(name)[:] = np.asarray(a, dtype=np.int64)
            backend.flush()
        m.complete = False
        backend.write_manifest(m.to_dict())  # written after the arrays: a store with a manifest has all arrays
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(write_failure(path, "a new store", e)) from None
    return LogitStore(path, fmt, allow_partial=True, writable=True, _backend=backend)


def _is_kdcache_leftover(cls: Any, path: str) -> bool:
    """True when ``path`` looks like a store whose creation was cut short (arrays, no manifest)."""
    try:
        b = cls(path, "r")
    except Exception:
        return False
    try:
        return not b.has_manifest() and any(b.has(a) for a in known_arrays())
    finally:
        b.close()


__all__ = ["Block", "LogitStore", "open_store", "create_store", "detect_format", "FORMAT_VERSION"]
