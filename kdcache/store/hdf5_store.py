"""HDF5 backend: one file, the manifest a JSON string attribute on the root group."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from kdcache.store.format import MANIFEST_DIGEST_KEY, MANIFEST_KEY, manifest_digest


class HDF5Backend:
    """An HDF5 file with one chunked dataset per array."""

    name = "hdf5"

    def __init__(self, path: str, mode: str) -> None:
        import h5py
        self.path = path
        # The 1.8 format allows attributes over 64 KiB (long class_names lists). Newer formats add a
        # "file is open for write" flag that a killed writer leaves set, which would block the resume.
        self.file = h5py.File(path, {"r": "r", "r+": "r+", "w": "w"}[mode], libver=("v108", "v108"))

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(path)

    @staticmethod
    def remove(path: str) -> None:
        os.remove(path)

    @classmethod
    def create(cls, path: str, arrays: dict[str, tuple], compression: str, data_arrays: tuple[str, ...]) -> "HDF5Backend":
        if compression == "zstd":
            from kdcache.errors import StoreError
            raise StoreError("zstd is not available for HDF5 stores without a plugin; use gzip or none, or a .zarr store")
        self = cls(path, "w")
        for name, (shape, chunks, dtype, fill) in arrays.items():
            kw: dict[str, Any] = {}
            if name in data_arrays and compression == "gzip":
                kw = {"compression": "gzip", "compression_opts": 4}
            elif name in ("sample_ids", "labels"):
                kw = {"compression": "lzf", "shuffle": True}  # built into h5py; ids compress to almost nothing
            self.file.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fillvalue=fill, **kw)
        return self

    def has(self, name: str) -> bool:
        return name in self.file

    def array(self, name: str) -> Any:
        return self.file[name]

    def has_manifest(self) -> bool:
        return MANIFEST_KEY in self.file.attrs

    def read_manifest(self) -> Any:
        raw = self.file.attrs.get(MANIFEST_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (TypeError, ValueError, UnicodeDecodeError):
            from kdcache.errors import StoreError
            raise StoreError(f"{self.path}: the manifest attribute {MANIFEST_KEY!r} is not JSON; the store is "
                             f"damaged, re-dump it") from None

    def read_manifest_digest(self) -> str | None:
        raw = self.file.attrs.get(MANIFEST_DIGEST_KEY)
        return raw.decode() if isinstance(raw, bytes) else raw

    def write_manifest(self, d: dict) -> None:
        self.file.attrs[MANIFEST_DIGEST_KEY] = manifest_digest(d)
        self.file.flush()
        self.file.attrs[MANIFEST_KEY] = json.dumps(d)
        self.file.flush()

    def nbytes_on_disk(self) -> int:
        return os.path.getsize(self.path)

    def read_into(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.file[name][start:stop]

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except Exception:  # already closed, or the interpreter is shutting down
            pass
