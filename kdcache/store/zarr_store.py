"""Zarr (v3 format, zarr-python 3) backend: a directory, or any fsspec URL."""
from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from kdcache.store.format import MANIFEST_DIGEST_KEY, MANIFEST_KEY, manifest_digest
from kdcache.store.remote import bounded, fs_options
from kdcache.store.remote import is_url as _is_url
from kdcache.store.remote import url_fs as _url_fs


def _codecs(compression: str) -> Any:
    if compression == "none":
        return None
    from zarr.codecs import GzipCodec, ZstdCodec
    return [ZstdCodec(level=3)] if compression == "zstd" else [GzipCodec(level=4)]


class ZarrBackend:
    """A zarr group holding the store's arrays, the manifest in the group's attributes."""

    name = "zarr"

    def __init__(self, path: str, mode: str) -> None:
        import zarr
        self.path = path
        remote = {"storage_options": fs_options(path)} if _is_url(path) else {}
        if remote:
            _url_fs(path)  # a missing filesystem package: one line
        self.group = bounded(path, lambda: zarr.open_group(store=path, mode=mode, **remote))
        self._arrays: dict[str, Any] = {}  # opening an array reads its metadata: one round trip, done once

    @staticmethod
    def exists(path: str) -> bool:
        if _is_url(path):
            fs, p = _url_fs(path)
            return fs.exists(p)
        return os.path.exists(path)

    @staticmethod
    def remove(path: str) -> None:
        if _is_url(path):
            fs, p = _url_fs(path)
            fs.rm(p, recursive=True)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)

    @classmethod
    def create(cls, path: str, arrays: dict[str, tuple], compression: str, data_arrays: tuple[str, ...],
               dims: dict[str, tuple[str, ...]] | None = None) -> "ZarrBackend":
        """``arrays``: name -> (shape, chunks, dtype, fill_value). ``compression`` applies to ``data_arrays``;
        ``dims``: name -> dimension names."""
        if _is_url(path):
            _check_bucket(path)
        self = cls(path, "w")

        def create(name: str) -> Any:
            shape, chunks, dtype, fill = arrays[name]
            return self._remote(bounded(path, lambda: self.group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                dimension_names=(dims or {}).get(name),
                # sample_ids and labels are 16 of the 36 bytes of a 10-class fp16 row; zstd makes them ~0.
                compressors=_codecs(compression if name in data_arrays else "zstd" if name in ("sample_ids", "labels")
                                    else "none"))))
        if _is_url(path):  # one metadata put per array: all in flight at once, far from the store
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(arrays)) as pool:
                self._arrays.update(zip(arrays, pool.map(create, arrays)))
        else:
            self._arrays.update({name: create(name) for name in arrays})
        return self

    @staticmethod
    def chunk_of_file(relpath: str) -> tuple[str, int] | None:
        """The array and the chunk index along its first axis that a file of a local store holds
        (``logits/c/3/0/0`` -> ``("logits", 3)``: zarr v3's default chunk keys); None for metadata."""
        parts = relpath.replace(os.sep, "/").split("/")
        if len(parts) >= 3 and parts[1] == "c" and parts[2].isdigit():
            return parts[0], int(parts[2])
        return None

    def has(self, name: str) -> bool:
        if name in self._arrays:
            return True
        try:
            self._arrays[name] = self._remote(bounded(self.path, lambda: self.group[name]))
        except KeyError:
            return False
        return True

    def array(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self._arrays[name] = self._remote(bounded(self.path, lambda: self.group[name]))
        return a

    def _remote(self, a: Any) -> Any:
        return _Bounded(self.path, a) if _is_url(self.path) else a

    def read_manifest(self) -> Any:
        return bounded(self.path, lambda: self.group.attrs.asdict()).get(MANIFEST_KEY)

    def read_manifest_digest(self) -> str | None:
        return bounded(self.path, lambda: self.group.attrs.asdict()).get(MANIFEST_DIGEST_KEY)

    def has_manifest(self) -> bool:
        return bounded(self.path, lambda: MANIFEST_KEY in self.group.attrs)

    def write_manifest(self, d: dict) -> None:
        bounded(self.path, lambda: self.group.attrs.update({MANIFEST_DIGEST_KEY: manifest_digest(d),
                                                            MANIFEST_KEY: d}))  # one metadata put

    def nbytes_on_disk(self) -> int:
        if _is_url(self.path):
            fs, p = _url_fs(self.path)
            return int(fs.du(p))
        total = 0
        for root, _, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    def read_into(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.array(name)[start:stop]

    def read_many(self, names: list[str], start: int, stop: int) -> list[np.ndarray]:
        """Rows ``start:stop`` of several arrays, their chunk requests all in flight at once (one round
        trip's latency, not one per array, from object storage)."""
        import asyncio

        from zarr.core.sync import sync
        arrays = [getattr(self.array(n), "array", self.array(n))._async_array for n in names]

        async def gather() -> list[Any]:
            return await asyncio.gather(*(a.getitem(slice(start, stop)) for a in arrays))
        return [np.asarray(a) for a in bounded(self.path, lambda: sync(gather()))]

    def flush(self) -> None:
        pass  # every zarr write is a whole-object put

    def close(self) -> None:
        pass


def _check_bucket(path: str) -> None:
    """Refuse a store in a bucket that is not there (S3, GCS, Azure) before anything is written."""
    from kdcache.errors import StoreError
    from kdcache.store.remote import remote_problem
    protocol, rest = path.split("://", 1)
    if protocol not in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        return
    fs, _ = _url_fs(path)
    bucket = rest.split("/", 1)[0]
    try:
        there = fs.exists(bucket)
    except Exception as e:
        raise StoreError(f"{path}: {remote_problem(path, e) or e}") from None
    if not there:
        raise StoreError(f"{path}: bucket {bucket!r} does not exist at this endpoint: create it, or check the URL "
                         f"and endpoint_url")


class _Bounded:
    """A zarr array of a remote store whose reads and writes each end within the stall bound."""

    def __init__(self, path: str, array: Any) -> None:
        self.path, self.array = path, array

    def __getitem__(self, key: Any) -> Any:
        return bounded(self.path, self.array.__getitem__, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        bounded(self.path, self.array.__setitem__, key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)
