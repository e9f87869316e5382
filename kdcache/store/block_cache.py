"""A local disk cache of blocks read from remote stores, bounded in bytes.

The first epoch of training on ``s3://...`` reads every block over the network; with a cache, each
block is also written to local disk, and later epochs (and later jobs on the machine) read it from
there. A block's key is the store's URL, its rows, and the stored sha256 of every chunk those rows
touch, so a store re-dumped at the same URL never serves stale rows. Each file carries the sha256
of its own arrays, checked on every load: a damaged file is dropped and the block read again from
the store. The least recently used files are removed once the total passes ``max_bytes``. Files are
``.npz`` written without pickle, renamed into place, so processes can share one directory.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kdcache import sizes
from kdcache.errors import KdcacheError, StoreError


def parse_size(text: str | int) -> int:
    """``"20GB"``, ``"512MiB"``, ``1000000`` -> bytes (:func:`kdcache.sizes.parse_size`)."""
    try:
        return sizes.parse_size(text, "max_bytes")
    except KdcacheError as e:
        raise StoreError(str(e)) from None


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


class BlockCache:
    """Blocks of remote stores in ``directory``, at most about ``max_bytes`` in all."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int | str = "10GB") -> None:
        self.directory = Path(directory)
        self.max_bytes = parse_size(max_bytes)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"block cache {self.directory}: cannot be created ({e.strerror})") from None
        self._lock = threading.Lock()
        self._total = sum(f.stat().st_size for f in self.directory.glob("*.npz"))
        self.hits = self.misses = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["max_bytes"])

    @staticmethod
    def key(path: str, start: int, stop: int, chunk_digests: np.ndarray) -> str:
        h = hashlib.sha256(f"{path}\0{start}\0{stop}\0".encode())
        h.update(np.ascontiguousarray(chunk_digests).data)
        return h.hexdigest()

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None (absent, or damaged: then removed)."""
        f = self.directory / f"{key}.npz"
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            os.utime(f)  # recently used
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception:
            arrays = {}
        want = arrays.pop("__sha256__", None)
        if want is None or str(want) != _digest(arrays):
            self._drop(f)
            self.misses += 1
            return None
        self.hits += 1
        return arrays

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Store ``arrays`` under ``key`` (best effort: a full disk only skips caching)."""
        f = self.directory / f"{key}.npz"
        if f.exists():
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                np.savez(out, __sha256__=np.array(_digest(arrays)), **arrays)
            size = os.path.getsize(tmp)
            os.replace(tmp, f)
        except OSError:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
            return
        with self._lock:
            self._total += size
            if self._total > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        """Remove least recently used files until the total is under 90% of the bound."""
        files = []
        for p in self.directory.glob("*.npz"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        self._total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files, key=lambda t: t[0]):
            if self._total <= 0.9 * self.max_bytes:
                break
            self._drop(p)
            self._total -= size

    @staticmethod
    def _drop(f: Path) -> None:
        try:
            f.unlink()
        except FileNotFoundError:
            pass

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.directory.glob("*.npz"))
