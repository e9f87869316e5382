"""The store cache: a teacher pass is paid once and reused by every later experiment that asks for the
same logits, the way a package or dataset cache is.

A store's **key** is the sha256 of what determines its content: each member's weights sha256 (in
order), the dataset's fingerprint, length and subset, the layout and its parameters, the dtype and
the views (augmentation, count, seed). Not the backend, chunking or codec: those change the bytes,
not the logits. The cache directory (``$KDCACHE_CACHE``, default ``$XDG_CACHE_HOME/kdcache`` or
``~/.cache/kdcache``) holds::

    stores/KEY.zarr (or KEY.h5)   the store
    stores/KEY.lock               flock: held exclusively by the dump writing the store, shared by the
                                  jobs reading it (so `cache rm` refuses a store in use)
    stores/KEY.used               its modification time is when the store was last used
    stores/KEY.repairing          present while damaged chunks are being recomputed
    stores/KEY.verified           JSON: the size, modification and status-change times of each of the
                                  store's files when its chunks last matched their digests (removed
                                  when a reader finds a chunk that does not match)

Reuse checks before it says "complete": the files whose size or times differ from
``KEY.verified`` (changed, deleted or added since) name the chunks to re-read and check against
their digests, a stat of each file when nothing changed. Damaged chunks are recomputed as a
resumed dump recomputes unwritten ones; a change that names no chunk (metadata, an HDF5 file, no
record yet) is checked by a full verify.

Locks are POSIX ``flock``: they hold between processes of one machine and on network file systems
that support it; ranks of one torchrun job do not lock against each other.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kdcache.errors import KdcacheError, StoreError

SUFFIXES = (".zarr", ".h5")
KEY_FIELDS = ("members", "dataset", "layout", "layout_params", "dtype", "views")


def cache_dir() -> Path:
    """``$KDCACHE_CACHE``, else ``$XDG_CACHE_HOME/kdcache``, else ``~/.cache/kdcache``."""
    explicit = os.environ.get("KDCACHE_CACHE")
    if explicit and "://" in explicit:
        raise KdcacheError(f"KDCACHE_CACHE={explicit}: a cache in object storage is not supported yet (its locks are "
                           f"file locks); use a local or network-mounted directory, or pass {{param:out}} with the URL")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdcache"


def key_of(members: list[str], dataset: dict[str, Any], layout: str, layout_params: dict[str, Any], dtype: str,
           views: dict[str, Any] | None) -> str:
    """The cache key: sha256 of the canonical JSON of what determines a store's logits."""
    body = {"members": list(members),
            "dataset": {k: dataset.get(k) for k in ("fingerprint", "length", "subset")},
            "layout": layout, "layout_params": layout_params, "dtype": dtype,
            "views": None if views is None else {k: views[k] for k in ("augment", "count", "seed")}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_key(m: Any) -> str:
    """The key a store's manifest implies."""
    return key_of([mm["sha256"] for mm in m.members], m.dataset, m.layout, m.layout_params, m.dtype, m.views)


def _stores(root: Path) -> Path:
    d = root / "stores"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise KdcacheError(f"the store cache {str(root)!r} is not writable ({e.strerror or e}); set KDCACHE_CACHE to "
                           f"a directory you can write, or pass {{param:out}}") from None
    return d


def store_path(key: str, fmt: str = "zarr", root: Path | None = None) -> Path:
    """Where the store of ``key`` lives: an existing one in either format, else a new one in ``fmt``."""
    d = _stores(root or cache_dir())
    for suffix in SUFFIXES:
        if (d / f"{key}{suffix}").exists():
            return d / f"{key}{suffix}"
    return d / f"{key}.{'h5' if fmt == 'hdf5' else 'zarr'}"


def is_cached(path: str | os.PathLike) -> bool:
    p = Path(path).resolve()
    return p.parent == (cache_dir() / "stores").resolve() and p.suffix in SUFFIXES


@contextlib.contextmanager
def locked(path: str | os.PathLike, exclusive: bool, wait: bool = True) -> Iterator[None]:
    """Hold the lock of a cached store: exclusive to write it, shared to read it. Outside torchrun only
    (the ranks of one job write one store together)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    p = Path(path)
    lock = p.with_suffix(".lock")
    with open(lock, "a") as f:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            raise KdcacheError(f"cached store {p.name} is in use by a running job (a dump or a training run); "
                               f"try again when it has finished") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def file_state(path: Path) -> dict[str, list[int]]:
    """Size, modification and status-change times (ns) of each file of a store, by path relative to it
    (the status-change time catches a file whose modification time was put back, as `touch -r` does)."""
    if path.is_file():
        st = path.stat()
        return {"": [st.st_size, st.st_mtime_ns, st.st_ctime_ns]}
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return out


def record_verified(path: Path) -> None:
    """Record the store's files as they are now: its chunks were just written or checked."""
    path = Path(path)
    tmp = path.with_suffix(f".verified.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"files": file_state(path)}, sort_keys=True))
    os.replace(tmp, path.with_suffix(".verified"))


def changed_chunks(path: Path, store: Any) -> list[int] | None:
    """The chunks whose files changed since the store was last verified; None when that cannot be
    narrowed to chunks (never verified, metadata or an HDF5 file changed): check every chunk."""
    from kdcache.store.format import SEQUENCE_ARRAYS
    from kdcache.store.logit_store import BACKENDS
    try:
        before = json.loads(path.with_suffix(".verified").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    now = file_state(path)
    changed = [f for f in set(now) | set(before) if now.get(f) != before.get(f)]
    m = store.manifest
    arrays = m.arrays()
    chunks: set[int] = set()
    for f in changed:
        hit = BACKENDS[store.format].chunk_of_file(f)
        if hit is None or hit[0] not in arrays or hit[0] in SEQUENCE_ARRAYS:
            return None
        name, i = hit
        rows = arrays[name][1][0]  # the array's chunk length along its first axis
        if name == "chunk_sha256":
            chunks.update(range(i * rows, min((i + 1) * rows, m.num_chunks)))
        else:
            chunks.update(range(i * rows // m.chunk_rows, min(-(-(i + 1) * rows // m.chunk_rows), m.num_chunks)))
    return sorted(chunks)


def damaged_chunks(path: Path, key: str) -> list[int]:
    """The damaged chunks of a complete cached store, re-reading only those whose files changed since
    it was last verified (all of them when that is unknown); the store is recorded as verified when
    none is damaged. Damage that no chunk accounts for is refused with the `cache rm` that clears it."""
    from kdcache.store import open_store
    s = open_store(str(path), allow_partial=True)
    try:
        chunks = changed_chunks(path, s)
        if chunks is None:
            problems = s.verify()
            bad = s.damaged_chunks(range(s.manifest.num_chunks)) if problems else []
            if problems and not bad:
                raise StoreError(f"cached store {key[:12]} is damaged ({problems[0]}); remove it with "
                                 f"`kdcache cache rm {key[:12]}` and dump again")
        else:
            bad = s.damaged_chunks(chunks)
    finally:
        s.close()
    if not bad:
        record_verified(path)
    return bad


def forget_damaged(path: Path, bad: list[int]) -> list[int]:
    """Make a resumed dump recompute the ``bad`` chunks; returns every chunk it will recompute. A file
    that cannot be decoded at all (of an array whose files hold several chunks) is removed, and the
    chunks it held join ``bad``: a partial write would have to read it first."""
    from kdcache.store import LogitStore
    from kdcache.store.logit_store import detect_format
    s = LogitStore(str(path), detect_format(str(path)), allow_partial=True, writable=True)
    try:
        m = s.manifest
        arrays = m.arrays()
        todo = set(bad)
        if s.format == "zarr":
            for c in sorted(bad):
                for name in (*m.data_arrays, "sample_ids", "labels"):
                    rows = arrays[name][1][0]
                    i = c * m.chunk_rows // rows
                    try:
                        s._read(name, i * rows, (i + 1) * rows)
                    except StoreError:
                        f = path / name / "c" / str(i)  # zarr v3's default chunk key: c/i[/j...]
                        if f.is_dir():
                            shutil.rmtree(f)
                        else:
                            f.unlink(missing_ok=True)
                        todo.update(range(i * rows // m.chunk_rows,
                                          min(-(-(i + 1) * rows // m.chunk_rows), m.num_chunks)))
        path.with_suffix(".repairing").touch()  # until the resumed dump completes: its failures say `cache rm`
        s.forget_chunks(sorted(todo))
    finally:
        s.close()
    path.with_suffix(".verified").unlink(missing_ok=True)
    return sorted(todo)


def touch(path: str | os.PathLike) -> None:
    """Record that a cached store was used now."""
    used = Path(path).with_suffix(".used")
    used.touch()
    os.utime(used)


def check_entry(path: Path, key: str) -> None:
    """Refuse a cached store whose manifest does not imply its key (edited, or from another release)."""
    from kdcache.store import open_store
    try:
        s = open_store(str(path), allow_partial=True)
    except StoreError as e:
        raise StoreError(f"cached store {key[:12]} cannot be read ({e}); remove it with `kdcache cache rm {key[:12]}`"
                         ) from None
    got = manifest_key(s.manifest)
    s.close()
    if got != key:
        raise StoreError(f"cached store {key[:12]} holds other logits than its key says (its manifest gives key "
                         f"{got[:12]}); remove it with `kdcache cache rm {key[:12]}`")


@dataclass
class Entry:
    key: str
    path: Path
    teachers: list[str]
    dataset: str
    subset: str | None
    layout: str
    dtype: str
    views: dict[str, Any] | None
    rows: int
    bytes: int
    complete: bool
    created: str
    last_used: float
    problem: str | None = None
    member_sha256: list[str] | None = None
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("member_sha256", "fingerprint")}
        d["path"] = str(self.path)
        d["last_used"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.last_used)) + "+00:00"
        return d


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def entries(root: Path | None = None) -> list[Entry]:
    """Every store in the cache, oldest use first; unreadable ones listed with their problem."""
    from kdcache.store import open_store
    d = (root or cache_dir()) / "stores"
    out = []
    for p in sorted(d.glob("*")) if d.exists() else []:
        if p.suffix not in SUFFIXES:
            continue
        key = p.stem
        used = p.with_suffix(".used")
        last = used.stat().st_mtime if used.exists() else p.stat().st_mtime
        try:
            s = open_store(str(p), allow_partial=True)
        except StoreError as e:
            out.append(Entry(key, p, [], "?", None, "?", "?", None, 0, _size(p), False, "?", last, str(e)))
            continue
        m = s.manifest
        problem = None if manifest_key(m) == key else "manifest does not match its key"
        from kdcache.datasets import recorded_model_spec, recorded_spec  # paths as they are from here
        out.append(Entry(key, p, [recorded_model_spec(mm["spec"], str(p)) for mm in m.members],
                         recorded_spec(m.dataset["spec"], str(p)), m.dataset.get("subset"),
                         m.layout, m.dtype, m.views, m.num_samples, _size(p), m.complete, m.created_at, last, problem,
                         [mm["sha256"] for mm in m.members], m.dataset["fingerprint"]))
        s.close()
    return sorted(out, key=lambda e: e.last_used)


def find(prefix: str, root: Path | None = None) -> Entry:
    """The one entry whose key starts with ``prefix``."""
    found = [e for e in entries(root) if e.key.startswith(prefix)]
    if not found:
        raise KdcacheError(f"no cached store has a key starting with {prefix!r}; `kdcache cache list` shows them")
    if len(found) > 1:
        raise KdcacheError(f"key prefix {prefix!r} matches {len(found)} cached stores "
                           f"({', '.join(e.key[:12] for e in found)}); give more of the key")
    return found[0]


def remove(entry: Entry) -> None:
    """Delete a cached store, refused while a job holds its lock."""
    with locked(entry.path, exclusive=True, wait=False):
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        elif entry.path.exists():
            entry.path.unlink()
        entry.path.with_suffix(".used").unlink(missing_ok=True)
        entry.path.with_suffix(".verified").unlink(missing_ok=True)
        entry.path.with_suffix(".repairing").unlink(missing_ok=True)
    entry.path.with_suffix(".lock").unlink(missing_ok=True)


def lookup(teachers: list[str], dataset_spec: str, data_root: str | None = None, subset: str | None = None) -> Path:
    """The complete cached store of these teachers over this dataset, or over the ``subset`` of it (the
    same transfer set as ``dump-logits --subset``: ``train-student --store auto``); refused with one line
    when there is none (saying which dump makes it) or several."""
    from kdcache.datasets import load_dataset
    from kdcache.specs import load_model
    from kdcache.subset import resolve_subset
    data = load_dataset(dataset_spec, data_root)
    wanted = resolve_subset(subset, data.dataset)[1] if subset else None
    shas = [load_model(t, data.input_shape, data.num_classes).describe()["sha256"] for t in teachers]
    fp = data.fingerprint
    found = [e for e in entries() if not e.problem and e.complete and e.member_sha256 == shas
             and e.fingerprint == fp and e.subset == wanted]
    teacher_args = " ".join(f"--teacher {t}" for t in teachers)
    if not found:
        over = f"{dataset_spec}" + (f" (--subset {subset})" if subset else "")
        raise KdcacheError(f"no cached store of {', '.join(teachers)} over {over}; make it with "
                           f"`kdcache dump-logits {teacher_args} --dataset {dataset_spec}"
                           f"{f' {{param:subset}} {subset}' if subset else ''}`")
    if len(found) > 1:
        which = ", ".join(f"{e.key[:12]} ({e.layout}, {e.dtype}{', views' if e.views else ''})" for e in found)
        raise KdcacheError(f"{len(found)} cached stores of {', '.join(teachers)} over {dataset_spec}: {which}; "
                           f"pass one with {{param:store}} PATH (`kdcache cache list` shows the paths)")
    return found[0].path
