"""Zarr (v3 format, zarr-python 3) backend: a directory, or any fsspec URL."""
from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from kdcache.store.format import MANIFEST_DIGEST_KEY, MANIFEST_KEY, manifest_digest


def _codecs(compression: str) -> Any:
    if compression == "none":
        return None
    from zarr.codecs import GzipCodec, ZstdCodec
    return [ZstdCodec(level=3)] if compression == "zstd" else [GzipCodec(level=4)]


def _is_url(path: str) -> bool:
    return "://" in path


def _url_fs(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL; a missing filesystem package is a user error, not a crash."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:
        from kdcache.errors import StoreError
        raise StoreError(f"cannot open {path!r}: {e} (e.g. pip install s3fs for s3://, gcsfs for gs://)") from None


class ZarrBackend:
    """A zarr group holding the store's arrays, the manifest in the group's attributes."""

    name = "zarr"

    def __init__(self, path: str, mode: str) -> None:
        import zarr
        self.path = path
        self.group = zarr.open_group(store=path, mode=mode)
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
        self = cls(path, "w")
        for name, (shape, chunks, dtype, fill) in arrays.items():
            self._arrays[name] = self.group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                dimension_names=(dims or {}).get(name),
                # sample_ids and labels are 16 of the 36 bytes of a 10-class fp16 row; zstd makes them ~0.
                compressors=_codecs(compression if name in data_arrays else "zstd" if name in ("sample_ids", "labels")
                                    else "none"))
        return self

    def has(self, name: str) -> bool:
        if name in self._arrays:
            return True
        try:
            self._arrays[name] = self.group[name]
        except KeyError:
            return False
        return True

    def array(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self._arrays[name] = self.group[name]
        return a

    def read_manifest(self) -> Any:
        return self.group.attrs.asdict().get(MANIFEST_KEY)

    def read_manifest_digest(self) -> str | None:
        return self.group.attrs.asdict().get(MANIFEST_DIGEST_KEY)

    def has_manifest(self) -> bool:
        return MANIFEST_KEY in self.group.attrs

    def write_manifest(self, d: dict) -> None:
        self.group.attrs.update({MANIFEST_DIGEST_KEY: manifest_digest(d), MANIFEST_KEY: d})  # one metadata put

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

    def flush(self) -> None:
        pass  # every zarr write is a whole-object put

    def close(self) -> None:
        pass
