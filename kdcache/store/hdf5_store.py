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
    def chunk_of_file(relpath: str) -> tuple[str, int] | None:
        return None  # one file: any change is a change to every array

    @staticmethod
    def remove(path: str) -> None:
        os.remove(path)

    @classmethod
    def create(cls, path: str, arrays: dict[str, tuple], compression: str, data_arrays: tuple[str, ...],
               dims: dict[str, tuple[str, ...]] | None = None) -> "HDF5Backend":
        if compression == "zstd":
            from kdcache.errors import StoreError
            raise StoreError("zstd is not available for HDF5 stores without a plugin; use gzip or none, "
                             "or a .zarr store")
        self = cls(path, "w")
        for name, (shape, chunks, dtype, fill) in arrays.items():
            kw: dict[str, Any] = {}
            if name in data_arrays and compression == "gzip":
                kw = {"compression": "gzip", "compression_opts": 4}
            elif name in ("sample_ids", "labels"):
                kw = {"compression": "lzf", "shuffle": True}  # built into h5py; ids compress to almost nothing
            self.file.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fillvalue=fill, **kw)
        if dims:
            self._attach_dimension_scales(arrays, dims)
        return self

    def _attach_dimension_scales(self, arrays: dict[str, tuple], dims: dict[str, tuple[str, ...]]) -> None:
        """netCDF-4 dimensions (what h5netcdf and xarray read): one dimension-scale dataset per name,
        never written (so it takes no space), attached to every array's axes."""
        sizes: dict[str, int] = {}
        for name, names in dims.items():
            for axis, dim in enumerate(names):
                sizes[dim] = arrays[name][0][axis]
        for dim, n in sizes.items():
            scale = self.file.create_dataset(dim, shape=(n,), dtype="f4")
            scale.make_scale(dim)
            scale.attrs["NAME"] = np.bytes_(b"This is a netCDF dimension but not a netCDF variable.%10d" % n)
        for name, names in dims.items():
            for axis, dim in enumerate(names):
                self.file[name].dims[axis].attach_scale(self.file[dim])

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

    def read_many(self, names: list[str], start: int, stop: int) -> list[np.ndarray]:
        return [self.file[n][start:stop] for n in names]

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except Exception:  # already closed, or the interpreter is shutting down
            pass
