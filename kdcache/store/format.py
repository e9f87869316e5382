"""The logit store format, version 1: the manifest and the constants every backend shares.

See FORMAT.md beside this file for the on-disk description.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import StoreError
from kdcache.layouts import LAYOUTS, Layout, all_array_dims, layout_of  # noqa: F401  (LAYOUTS: re-exported)

FORMAT_VERSION = 1
MANIFEST_KEY = "kdcache"
DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "zstd", "gzip")
# Per-token stores (``sequences`` in the manifest) add these two, written once when the store is created.
SEQUENCE_ARRAYS = ("sequence_ids", "sequence_offsets")
# Stores with augmented views (``views`` in the manifest) add the parameters of each row's view, a
# per-row data array hashed after the layout's arrays.
VIEW_ARRAYS = ("view_params",)
INDEX_ARRAYS = ("sample_ids", "labels", "chunk_sha256")


def known_arrays() -> tuple[str, ...]:
    """Every array name a store of any registered layout can hold."""
    return tuple(all_array_dims()) + INDEX_ARRAYS + SEQUENCE_ARRAYS + VIEW_ARRAYS
SEQUENCE_INDEX_CHUNK = 1 << 16
DIGEST_BYTES = 32
TARGET_CHUNK_BYTES = 1 << 20
# sample_ids and labels are chunked 16 row chunks at a time: zarr pays per chunk read, and these
# arrays are small. A writer process therefore owns whole groups of 16 row chunks (see kdcache/dump/samplers.py).
INDEX_CHUNK_FACTOR = 16

# Manifest fields that identify what a store holds; a resumed writer must match all of them.
IDENTITY_FIELDS = (
    "format_version", "layout", "layout_params", "num_samples", "num_classes", "num_members", "class_names",
    "dtype", "chunk_rows", "compression", "members", "dataset", "sequences", "views",
)
# Fields a reader fills in when a manifest lacks them, and a writer leaves out at their default, so
# that a store without them reads the same in releases that predate them.
OPTIONAL_FIELDS = {"sequences": None, "views": None, "skipped": None}
SKIPPED_LABEL = -2  # the label of a row whose input could not be read (dump-logits --skip-bad-images)


def default_chunk_rows(row_bytes: int, num_samples: int | None = None) -> int:
    """Rows per chunk so that one chunk of the main array is at most about 1 MB.

    With ``num_samples`` the rows are spread evenly over the chunks, so the last chunk (which
    both backends store at full size) is not mostly padding.
    """
    rows = max(1, TARGET_CHUNK_BYTES // max(1, row_bytes))
    if num_samples:
        rows = -(-num_samples // -(-num_samples // rows))
    return rows


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from kdcache._version import __version__
    return __version__


@dataclass
class Manifest:
    """Everything a store says about itself, stored as a dict under the ``kdcache`` attribute.

    ``members``: one dict per ensemble member: ``name``, ``spec``, ``sha256`` (of its weights).
    ``dataset``: ``spec``, ``split``, ``length`` (of the full dataset), ``fingerprint``
    (see ``kdcache.datasets.fingerprint``) and ``subset`` (a description, or null for all rows).
    ``sequences``: null for a store with a row per sample. For a sequence teacher's store with a row
    per token position: ``count`` (sequences), ``max_length`` and ``lengths_sha256`` (of the int64
    lengths in store order); ``num_samples`` then counts rows, that is positions, and padding has none.
    ``views``: null for a store of unaugmented inputs. For a store of augmented views: ``count`` (V),
    ``augment`` (the spec), ``columns`` (names of the parameters in ``view_params``), ``seed`` and
    ``item_shape``; ``num_samples`` then counts rows, V per sample, view-major (see kdcache.views);
    ``originals: true`` when the views were cut from original images of any size.
    ``skipped``: absent, or the sample ids whose input could not be read (``--skip-bad-images``):
    their rows hold label -2 and are never trained on.
    """

    num_samples: int
    num_classes: int
    num_members: int
    dtype: str
    chunk_rows: int
    members: list[dict[str, Any]]
    dataset: dict[str, Any]
    compression: str = "none"
    class_names: list[str] | None = None
    layout: str = "dense"
    layout_params: dict[str, Any] = field(default_factory=dict)
    sequences: dict[str, Any] | None = None
    views: dict[str, Any] | None = None
    skipped: list[int] | None = None
    format_version: int = FORMAT_VERSION
    kdcache_version: str = field(default_factory=_version)
    created_at: str = field(default_factory=_now)
    complete: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise StoreError(
                f"compression {self.compression!r} is not supported; use one of {', '.join(COMPRESSIONS)}")
        if self.num_samples < 1 or self.num_classes < 1 or self.num_members < 1 or self.chunk_rows < 1:
            raise StoreError(
                f"a store needs at least one sample, class, member and chunk row; got num_samples="
                f"{self.num_samples}, num_classes={self.num_classes}, num_members={self.num_members}, "
                f"chunk_rows={self.chunk_rows}")
        if len(self.members) != self.num_members:
            raise StoreError(f"manifest lists {len(self.members)} members but num_members is {self.num_members}")
        self._check_layout_params()
        if self.sequences is not None:
            q = self.sequences
            if set(q) != {"count", "max_length", "lengths_sha256"} or not 1 <= q["count"] <= self.num_samples:
                raise StoreError(f"sequences {q!r}: give count (1..num_samples), max_length and lengths_sha256")
        if self.skipped is not None and (not isinstance(self.skipped, list)
                                         or not all(isinstance(i, int) and i >= 0 for i in self.skipped)):
            raise StoreError("skipped: give the sample ids whose inputs could not be read, as a list of integers")
        if self.views is not None:
            v = self.views
            known = {"count", "augment", "columns", "seed", "item_shape"}
            if (not isinstance(v, dict) or set(v) - {"originals"} != known
                    or not isinstance(v["count"], int) or v["count"] < 1 or self.num_samples % v["count"]
                    or not v["columns"]):
                raise StoreError(f"views {v!r}: give count (dividing num_samples), augment, columns, seed, item_shape "
                                 f"(and originals: true for views cut from original images)")
            if self.sequences is not None:
                raise StoreError("a store has a row per token position or augmented views, not both")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise StoreError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes")

    def _check_layout_params(self) -> None:
        self.__dict__["_layout"] = layout_of(self)  # validates the parameters

    @property
    def store_layout(self) -> Layout:
        """The layout object (:mod:`kdcache.layouts`) of ``layout`` and ``layout_params``."""
        cached = self.__dict__.get("_layout")
        if cached is None or cached.name != self.layout or cached.params() != self.layout_params:
            cached = self.__dict__["_layout"] = layout_of(self)
        return cached

    def row_bytes(self) -> int:
        """Bytes of the largest per-row data array (what a chunk size is chosen for)."""
        return max(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                   for name, (shape, _, dtype, _) in self.arrays().items() if name in self.data_arrays)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str, Any]]:
        """Every array: name -> (shape, chunk shape, dtype, fill value)."""
        n, m, r = self.num_samples, self.num_members, self.chunk_rows
        row = self.store_layout.row_arrays(m, self.dtype)
        out = {name: ((n, *tail), (r, *tail), dtype, fill) for name, (tail, dtype, fill) in row.items()}
        index_rows = min(r * INDEX_CHUNK_FACTOR, max(r, n))  # HDF5 refuses chunks larger than the array
        out["sample_ids"] = ((n,), (index_rows,), "int64", -1)
        out["labels"] = ((n,), (index_rows,), "int64", -1)
        if self.views is not None:
            p = len(self.views["columns"])
            out["view_params"] = ((n, p), (r, p), "float32", 0)
        out["chunk_sha256"] = ((self.num_chunks, DIGEST_BYTES), (1, DIGEST_BYTES), "uint8", 0)
        if self.sequences is not None:
            s = self.sequences["count"]
            out["sequence_ids"] = ((s,), (min(s, SEQUENCE_INDEX_CHUNK),), "int64", -1)
            out["sequence_offsets"] = ((s + 1,), (min(s + 1, SEQUENCE_INDEX_CHUNK),), "int64", -1)
        return out

    def dimension_names(self) -> dict[str, tuple[str, ...]]:
        """Every array's dimension names (Zarr ``dimension_names``, HDF5 dimension scales), so that
        xarray opens a store as it is: rows are ``sample`` (``position`` in a per-token store, ``row``
        in a store with views, where a sample has a row per view)."""
        row = "position" if self.per_token else "row" if self.views is not None else "sample"
        names = {**{name: (row, *dims) for name, dims in all_array_dims().items()},
                 "sample_ids": (row,), "labels": (row,),
                 "chunk_sha256": ("chunk", "digest_byte"), "sequence_ids": ("sequence",),
                 "sequence_offsets": ("sequence_boundary",), "view_params": (row, "view_param")}
        return {name: names[name] for name in self.arrays()}

    @property
    def per_token(self) -> bool:
        """True for a sequence teacher's store: a row per token position, grouped by sequence."""
        return self.sequences is not None

    @property
    def samples_per_view(self) -> int:
        """Rows per view: ``num_samples`` for a store without views."""
        return self.num_samples // (self.views["count"] if self.views else 1)

    @property
    def data_arrays(self) -> tuple[str, ...]:
        """The per-row arrays a writer gives for each chunk, in the order its digest hashes them."""
        return self.logit_arrays + (VIEW_ARRAYS if self.views is not None else ())

    @property
    def logit_arrays(self) -> tuple[str, ...]:
        """The layout's arrays alone: what teacher targets are built from."""
        return tuple(self.store_layout.array_dims)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, default in OPTIONAL_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d

    def identity(self) -> dict[str, Any]:
        """What two stores of the same thing share: names and paths (the dataset's spec, the tokenizer's
        name) are left out, the hashes carry the identity."""
        d = dataclasses.asdict(self)
        out = {k: d[k] for k in IDENTITY_FIELDS}
        data = {k: v for k, v in (out["dataset"] or {}).items() if k != "spec"}
        if isinstance(data.get("tokenizer"), dict):
            data["tokenizer"] = {k: v for k, v in data["tokenizer"].items() if k != "name"}
        out["dataset"] = data
        return json.loads(json.dumps(out))  # as the manifest holds it: a fresh manifest equals one read back

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Manifest":
        """Validate and build a manifest read from ``where`` (a path, for messages)."""
        if not isinstance(d, dict):
            raise StoreError(f"{where}: attribute {MANIFEST_KEY!r} is not a mapping; this is not a kdcache store")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{where}: format_version {version!r} found, this kdcache reads version {FORMAT_VERSION}; "
                f"use the kdcache release that wrote it, or re-dump the logits")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {**OPTIONAL_FIELDS, **d}
        missing = sorted(names - set(d))
        if missing:
            raise StoreError(f"{where}: manifest lacks {', '.join(missing)}; the store is damaged, re-dump it")
        unknown = sorted(set(d) - names)
        if unknown:
            raise StoreError(f"{where}: manifest has unknown fields {', '.join(unknown)}; "
                             f"it was written by a newer kdcache, upgrade to read it")
        try:
            return cls(**d)
        except StoreError as e:
            raise StoreError(f"{where}: {e.args[0]}") from None
        except TypeError as e:
            raise StoreError(f"{where}: manifest is malformed ({e}); re-dump the store") from None


MANIFEST_DIGEST_KEY = "kdcache_manifest_sha256"


def manifest_digest(d: dict) -> str:
    """sha256 of a manifest as canonical JSON (sorted keys, no spaces), ``complete`` left out: stored
    beside the manifest (attribute ``kdcache_manifest_sha256``, written before it) so that a damaged
    manifest is refused, not trusted. Leaving ``complete`` out keeps it valid when a dump marks the
    store complete, so no kill between two attribute writes can make a sound store look damaged."""
    import json
    body = {k: v for k, v in d.items() if k != "complete"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def chunk_digest(*arrays: np.ndarray) -> np.ndarray:
    """sha256 of one chunk's rows: the layout's data arrays in order (then view_params in a store with
    views), then sample_ids, then labels,
    each little-endian and C-ordered in its stored dtype."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.byteswap().view(a.dtype.newbyteorder("<"))
        h.update(memoryview(a).cast("B"))
    return np.frombuffer(h.digest(), dtype=np.uint8)


def sequence_lengths_digest(lengths: np.ndarray) -> str:
    """sha256 of a per-token store's sequence lengths (int64, little-endian, store order)."""
    return hashlib.sha256(np.ascontiguousarray(lengths, dtype="<i8").tobytes()).hexdigest()
