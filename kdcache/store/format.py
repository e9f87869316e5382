"""The logit store format, version 1: the manifest and the constants every backend shares.

See FORMAT.md beside this file for the on-disk description.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import StoreError

FORMAT_VERSION = 1
MANIFEST_KEY = "kdcache"
LAYOUTS = ("dense",)  # reserved for later: "topk", "sampled", per-token rows
DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "zstd", "gzip")
ARRAYS = ("logits", "sample_ids", "labels", "chunk_sha256")
DIGEST_BYTES = 32
TARGET_CHUNK_BYTES = 1 << 20

# Manifest fields that identify what a store holds; a resumed writer must match all of them.
IDENTITY_FIELDS = (
    "format_version", "layout", "num_samples", "num_classes", "num_members", "class_names",
    "dtype", "chunk_rows", "compression", "members", "dataset",
)


def default_chunk_rows(num_members: int, num_classes: int, dtype: str, num_samples: int | None = None) -> int:
    """Rows per chunk so that one logits chunk is at most about 1 MB.

    With ``num_samples`` the rows are spread evenly over the chunks, so the last chunk (which
    both backends store at full size) is not mostly padding.
    """
    row_bytes = num_members * num_classes * np.dtype(dtype).itemsize
    rows = max(1, TARGET_CHUNK_BYTES // row_bytes)
    if num_samples:
        rows = -(-num_samples // -(-num_samples // rows))
    return rows


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from kdcache import __version__
    return __version__


@dataclass
class Manifest:
    """Everything a store says about itself, stored as a dict under the ``kdcache`` attribute.

    ``members``: one dict per ensemble member: ``name``, ``spec``, ``sha256`` (of its weights).
    ``dataset``: ``spec``, ``split``, ``length`` (of the full dataset), ``fingerprint``
    (see ``kdcache.datasets.fingerprint``) and ``subset`` (a description, or null for all rows).
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
        if self.layout not in LAYOUTS:
            raise StoreError(f"layout {self.layout!r} is not supported by this kdcache; known: {', '.join(LAYOUTS)}")
        if self.num_samples < 1 or self.num_classes < 1 or self.num_members < 1 or self.chunk_rows < 1:
            raise StoreError(
                f"a store needs at least one sample, class, member and chunk row; got num_samples="
                f"{self.num_samples}, num_classes={self.num_classes}, num_members={self.num_members}, "
                f"chunk_rows={self.chunk_rows}")
        if len(self.members) != self.num_members:
            raise StoreError(f"manifest lists {len(self.members)} members but num_members is {self.num_members}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise StoreError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY_FIELDS}

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
        missing = sorted(names - set(d))
        if missing:
            raise StoreError(f"{where}: manifest lacks {', '.join(missing)}; the store is damaged, re-dump it")
        unknown = sorted(set(d) - names)
        if unknown:
            raise StoreError(f"{where}: manifest has unknown fields {', '.join(unknown)}; "
                             f"it was written by a newer kdcache, upgrade to read it")
        try:
            return cls(**d)
        except TypeError as e:
            raise StoreError(f"{where}: manifest is malformed ({e}); re-dump the store") from None


def chunk_digest(logits: np.ndarray, sample_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """sha256 of one chunk's rows: logits, then sample_ids, then labels, little-endian, C order."""
    h = hashlib.sha256()
    for a in (logits, sample_ids, labels):
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.byteswap().view(a.dtype.newbyteorder("<"))
        h.update(memoryview(a).cast("B"))
    return np.frombuffer(h.digest(), dtype=np.uint8)
