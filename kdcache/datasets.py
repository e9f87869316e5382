"""Built-in datasets, the dataset spec parser, and dataset fingerprints."""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.errors import SpecError
from kdcache.spec_syntax import import_callable, parse_kv

MNIST_IDX = {  # file -> md5 of the public .gz files
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/")
FINGERPRINT_ITEMS = 256


class ArrayDataset(Dataset):
    """Inputs and optional labels held as arrays; uint8 inputs become floats in [0, 1] on access.

    ``get_batch`` fetches many rows in one indexing operation, which the training stream uses
    instead of per-item ``__getitem__``.
    """

    def __init__(self, inputs: np.ndarray, labels: np.ndarray | None) -> None:
        if labels is not None and len(labels) != len(inputs):
            raise SpecError(f"dataset has {len(inputs)} inputs but {len(labels)} labels")
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self._scale = self.inputs.dtype == torch.uint8

    def __len__(self) -> int:
        return len(self.inputs)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if self._scale else x.float()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._convert(self.inputs[i]), (-1 if self.labels is None else int(self.labels[i]))

    def get_batch(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._convert(self.inputs[idx])
        y = torch.full((len(idx),), -1, dtype=torch.long) if self.labels is None else self.labels[idx]
        return x, y


class SyntheticDataset(Dataset):
    """A deterministic classification set computed from the index: O(1) memory for any length.

    Each class has a random centre; a row is its class centre plus one of ``pool`` noise rows,
    picked by a hash of the index. For tests and benchmarks, not for science.
    """

    def __init__(self, n: int, dim: int = 64, classes: int = 10, seed: int = 0, pool: int = 4096) -> None:
        g = np.random.default_rng(seed)
        self.n, self.dim, self.classes = n, dim, classes
        self.centres = torch.from_numpy(g.normal(0, 1.0, (classes, dim)).astype(np.float32))
        self.noise = torch.from_numpy(g.normal(0, 1.0, (pool, dim)).astype(np.float32))
        self._a, self._b = int(g.integers(1, 2**31 - 1)) | 1, int(g.integers(0, 2**31 - 1))

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        h = (idx * self._a + self._b) % 2147483647
        y = h % self.classes
        x = self.centres[y] + self.noise[(h // self.classes) % len(self.noise)]
        return x, y

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0])


@dataclass
class ResolvedDataset:
    """A dataset with what kdcache knows of it."""

    dataset: Any
    spec: str
    name: str
    split: str | None
    num_classes: int | None = None
    class_names: list[str] | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def input_shape(self) -> tuple[int, ...]:
        x, _ = get_batch(self.dataset, np.array([0]))
        return tuple(x.shape[1:])

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.dataset)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """What a store's manifest records of its data; a dataset may add its own identity (``identity()``:
        an ``hf-text:`` corpus adds its tokenizer's name and sha256)."""
        extra = self.dataset.identity() if callable(getattr(self.dataset, "identity", None)) else {}
        return {"spec": self.spec, "name": self.name, "split": self.split, "length": len(self.dataset),
                "fingerprint": self.fingerprint, **extra}


def get_batch(dataset: Any, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[B, ...]`` and labels ``[B]`` (-1 where none) for ``indices``, batched when possible."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    xs, ys = [], []
    for i in np.asarray(indices).tolist():
        item = dataset[i]
        if isinstance(item, (tuple, list)):
            x, y = item[0], (item[1] if len(item) > 1 else -1)
        else:
            x, y = item, -1
        xs.append(torch.as_tensor(x))
        ys.append(int(y) if y is not None else -1)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def fingerprint(dataset: Any) -> str:
    """sha256 over the length and 256 evenly spaced items (inputs and labels), row by row, then what a
    dataset adds with ``fingerprint_extra()`` (``hf-chat:``: the rule that picks its rows).

    Catches another dataset, another split, another preprocessing or a re-ordering, without
    reading every item of a large dataset. A dataset of image files gives its own
    (``content_fingerprint()``: its file listing, not decoded pixels; see kdcache/vision/images.py).
    """
    own = getattr(dataset, "content_fingerprint", None)
    if callable(own):
        return own()
    n = len(dataset)
    idx = np.unique(np.linspace(0, max(n - 1, 0), min(n, FINGERPRINT_ITEMS)).round().astype(np.int64))
    h = hashlib.sha256(f"kdcache-fingerprint-1;n={n}".encode())
    if n:
        x, y = get_batch(dataset, idx)
        x = x.detach().cpu().contiguous()
        h.update(f";{str(x.dtype)};{tuple(x.shape[1:])}".encode())
        h.update(x.numpy().tobytes())
        h.update(y.to(torch.int64).numpy().tobytes())
    extra = getattr(dataset, "fingerprint_extra", None)
    if callable(extra):
        h.update(f";{extra()}".encode())
    return h.hexdigest()


def default_data_root() -> Path:
    return Path(os.environ.get("KDCACHE_DATA") or "data")


def load_mnist(split: str, data_root: str | os.PathLike | None = None, download: bool | None = None) -> ArrayDataset:
    """MNIST from ``mnist.npz`` or the four IDX files under ``data_root``; downloaded (md5-checked) if
    absent and reachable, unless ``download`` is False or KDCACHE_NO_DOWNLOAD is set."""
    if download is None:
        download = not os.environ.get("KDCACHE_NO_DOWNLOAD")
    if split not in ("train", "test"):
        raise SpecError(f"MNIST has splits 'train' and 'test', not {split!r}; use mnist:train or mnist:test")
    root = Path(data_root) if data_root else default_data_root()
    npz = root / "mnist.npz"
    if npz.exists():
        return ArrayDataset(*_npz_arrays(str(npz.resolve()), npz.stat().st_mtime_ns, f"x_{split}", f"y_{split}"))
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = []
    for name in names:
        found = [p for p in (root / name, root / f"{name}.gz", root / "MNIST" / "raw" / name) if p.exists()]
        if not found and download:
            found = [_download_mnist_file(root, f"{name}.gz")]
        if not found or found[0] is None:
            raise SpecError(
                f"MNIST not found under {str(root)!r}: put mnist.npz (keys x_train, y_train, x_test, y_test) or "
                f"the four IDX files (e.g. {name}.gz) there, or pass {{param:data_root}} / set KDCACHE_DATA")
        paths.append(found[0])
    return ArrayDataset(_read_idx(paths[0]), _read_idx(paths[1]))


@functools.lru_cache(maxsize=4)
def _npz_arrays(path: str, mtime_ns: int, *keys: str) -> tuple[np.ndarray, ...]:
    """Decompressed arrays of an .npz, kept for the process (a pipeline opens MNIST once per step)."""
    with np.load(path, allow_pickle=False) as f:
        return tuple(f[k] for k in keys)  # shared: ArrayDataset only ever reads them


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SpecError(f"{path} is not an IDX file of unsigned bytes; re-download it")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _download_mnist_file(root: Path, name: str) -> Path | None:
    """Fetch one IDX file, checking its md5; None when no mirror is reachable."""
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name, timeout=10) as r:
                data = r.read()
        except OSError:
            continue
        if hashlib.md5(data).hexdigest() != MNIST_IDX[name]:
            continue
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / (name + ".part")
        tmp.write_bytes(data)
        tmp.replace(root / name)
        return root / name
    return None


def _load_npz(path: Path, split: str | None) -> ArrayDataset:
    if not path.exists():
        raise SpecError(f"dataset file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        pairs = ([(f"x_{split}", f"y_{split}")] if split else
                 [("x", "y"), ("inputs", "labels"), ("x_train", "y_train")])
        for xk, yk in pairs:
            if xk in keys:
                return ArrayDataset(f[xk], f[yk] if yk in keys else None)
    want = " or ".join(p[0] for p in pairs)
    raise SpecError(f"{path} has arrays {sorted(keys)}; expected {want} (and optionally the matching labels)")


def load_dataset(spec: str, data_root: str | os.PathLike | None = None) -> ResolvedDataset:
    """Resolve a dataset spec: ``mnist:train``, ``synthetic:N[,dim=D,classes=C,seed=S]``,
    ``text:PATH[,split=,seq=,vocab=,test_every=]`` (see :mod:`kdcache.text`), ``file.npz[:split]`` or
    ``package.module:callable`` (returning a map-style Dataset)."""
    name, _, rest = spec.partition(":")
    if name == "mnist":
        return ResolvedDataset(load_mnist(rest or "train", data_root), spec, "mnist", rest or "train", 10,
                               [str(i) for i in range(10)])
    if name == "synthetic":
        kv = parse_kv(rest, ("n",))
        try:
            n = int(kv.pop("n", 10000))
            args = {k: int(kv.pop(k)) for k in ("dim", "classes", "seed") if k in kv}
        except ValueError:
            raise SpecError(f"synthetic dataset spec {spec!r} needs integers, "
                            f"e.g. synthetic:10000,dim=64,classes=10") from None
        if kv:
            raise SpecError(f"synthetic dataset spec {spec!r}: unknown keys {sorted(kv)}; known: n, dim, classes, seed")
        ds = SyntheticDataset(n, **args)
        return ResolvedDataset(ds, spec, "synthetic", None, ds.classes)
    if name == "text":
        return _load_text(spec, rest, data_root)
    if name in ("imagefolder", "hf-image"):
        if name == "imagefolder":
            from kdcache.vision.images import load_imagefolder as load
        else:
            from kdcache.vision.hf_image import load_hf_image as load
        ds = load(spec, rest)
        return ResolvedDataset(ds, spec, name, ds.split, ds.num_classes, ds.class_names)
    if name in ("hf-text", "hf-chat"):
        if name == "hf-text":
            from kdcache.integrations.hf import HFText as kind
        else:
            from kdcache.integrations.hf_chat import HFChat as kind
        ds = kind(spec)
        return ResolvedDataset(ds, spec, name, spec.partition(",split=")[2].split(",")[0] or "train", ds.num_classes)
    if name.endswith(".npz"):
        path = Path(name)
        if not path.is_absolute() and not path.exists() and data_root:
            path = Path(data_root) / path
        ds = _load_npz(path, rest or None)
        classes = int(ds.labels.max()) + 1 if ds.labels is not None and len(ds.labels) else None
        return ResolvedDataset(ds, spec, path.stem, rest or None, classes)
    known = ("use mnist:train, mnist:test, synthetic:N, text:PATH, hf-text:PATH, hf-chat:PATH, imagefolder:DIR, "
             "hf-image:PATH, a .npz file or package.module:callable")
    if rest and "." in name or (rest and name.isidentifier()):
        try:
            fn = import_callable(spec, "dataset")
        except SpecError:
            if "." in name:
                raise
            raise SpecError(f"unknown dataset spec {spec!r} (and no module {name!r} to import); {known}") from None
        obj = fn()
        if not hasattr(obj, "__getitem__") or not hasattr(obj, "__len__"):
            raise SpecError(f"{spec} returned {type(obj).__name__}, not a map-style Dataset "
                            f"with __len__ and __getitem__")
        classes = getattr(obj, "num_classes", None)
        return ResolvedDataset(obj, spec, name, None, classes, getattr(obj, "class_names", None))
    raise SpecError(f"unknown dataset spec {spec!r}; {known}")


def _load_text(spec: str, rest: str, data_root: str | os.PathLike | None) -> ResolvedDataset:
    from kdcache.text import TextSequences
    kv = parse_kv(rest, ("path",))
    path = kv.pop("path", "")
    if not path:
        raise SpecError(f"dataset spec {spec!r}: give the text, e.g. text:corpus.txt,split=train,seq=64,vocab=8192")
    if not Path(path).is_absolute() and not Path(path).exists() and data_root:
        path = str(Path(data_root) / path)
    split = kv.pop("split", "train")
    try:
        args = {k: int(kv.pop(k)) for k in ("seq", "vocab", "test_every") if k in kv}
    except ValueError:
        raise SpecError(f"dataset spec {spec!r}: seq, vocab and test_every are integers") from None
    if kv:
        raise SpecError(f"dataset spec {spec!r}: unknown keys {sorted(kv)}; known: split, seq, vocab, test_every")
    ds = TextSequences(path, split, **args)
    return ResolvedDataset(ds, spec, "text", split, ds.num_classes, ds.class_names)


# -- paths in recorded specs ------------------------------------------------------------------------
def _spec_paths(spec: str) -> list[tuple[int, int]]:
    """(start, end) of each local file path inside a dataset spec: the PATH of ``text:``/``hf-text:``/
    ``hf-chat:``, a ``.npz`` file, and the values of ``tokenizer=`` and ``template=``."""
    spans = []
    kind, sep, rest = spec.partition(":")
    if kind in ("text", "hf-text", "hf-chat", "imagefolder", "hf-image") and sep:
        start = len(kind) + 1
        end = spec.find(",", start)
        spans.append((start, len(spec) if end < 0 else end))
    elif kind.endswith(".npz"):
        spans.append((0, len(kind)))
    for key in (",tokenizer=", ",template="):
        at = spec.find(key)
        if at >= 0:
            start = at + len(key)
            end = spec.find(",", start)
            spans.append((start, len(spec) if end < 0 else end))
    spans.sort()
    return [s for s in spans if s[1] > s[0] and "://" not in spec[s[0]:s[1]]]


def _rewrite_paths(spec: str, fn: Any) -> str:
    out, last = [], 0
    for a, b in _spec_paths(spec):
        out += [spec[last:a], fn(spec[a:b])]
        last = b
    return "".join(out) + spec[last:]


def portable_spec(spec: str, store: str | None) -> str:
    """``spec`` as a store's manifest records it: local paths relative to the directory holding the store
    (a store at a URL keeps them as given), so a manifest names no machine's absolute paths."""
    if not store or "://" in store:
        return spec
    base = os.path.dirname(os.path.abspath(store))
    return _rewrite_paths(spec, lambda p: os.path.relpath(os.path.abspath(p), base))


def portable_model_spec(spec: str, store: str | None) -> str:
    """A teacher spec as a manifest records it: the path of an ``hf:PATH`` model or a checkpoint made
    relative to the directory holding the store, like :func:`portable_spec`."""
    if not store or "://" in store:
        return spec
    base = os.path.dirname(os.path.abspath(store))
    rel = lambda p: os.path.relpath(os.path.abspath(p), base)  # noqa: E731
    if spec.startswith("hf:"):
        head, sep, tail = spec[3:].partition(",")
        return f"hf:{rel(head)}{sep}{tail}" if os.path.exists(head) else spec
    if spec.startswith(("timm:", "torchvision:")):
        return _rewrite_checkpoint(spec, lambda p: rel(p) if os.path.exists(p) else p)
    return rel(spec) if os.path.exists(spec) else spec


def _rewrite_checkpoint(spec: str, fn: Any) -> str:
    """A ``timm:``/``torchvision:`` spec with the value of ``checkpoint=`` passed through ``fn``."""
    at = spec.find(",checkpoint=")
    if at < 0:
        return spec
    start = at + len(",checkpoint=")
    end = spec.find(",", start)
    end = len(spec) if end < 0 else end
    return spec[:start] + fn(spec[start:end]) + spec[end:]


def recorded_spec(spec: str, store: str | None) -> str:
    """The inverse of :func:`portable_spec`: a recorded spec's relative paths joined to the directory of
    ``store`` where they exist there (else left as they are, relative to the working directory)."""
    if not store or "://" in store:
        return spec
    base = os.path.dirname(os.path.abspath(store))

    def resolve(p: str) -> str:
        if os.path.isabs(p):
            return p
        joined = os.path.normpath(os.path.join(base, p))
        return joined if glob.glob(joined) or os.path.exists(joined) else p
    return _rewrite_paths(spec, resolve)


def recorded_model_spec(spec: str, store: str | None) -> str:
    """The inverse of :func:`portable_model_spec`: a recorded teacher path joined to the store's directory
    where it exists there."""
    if not store or "://" in store:
        return spec
    base = os.path.dirname(os.path.abspath(store))
    if spec.startswith(("timm:", "torchvision:")):
        def join(p: str) -> str:
            joined = os.path.normpath(os.path.join(base, p))
            return joined if not os.path.isabs(p) and os.path.exists(joined) else p
        return _rewrite_checkpoint(spec, join)
    hf = spec.startswith("hf:")
    head, sep, tail = (spec[3:] if hf else spec).partition(",") if hf else (spec, "", "")
    joined = os.path.normpath(os.path.join(base, head))
    if os.path.isabs(head) or not os.path.exists(joined):
        return spec
    return ("hf:" if hf else "") + joined + sep + tail


def with_tokenizer(dataset_spec: str | None, teachers: list[str] | None = None, store: str | None = None) -> Any:
    """An ``hf-text:`` or ``hf-chat:`` spec without ``tokenizer=`` gets the first ``hf:`` teacher's (the
    tokenizer saved beside it), else the one of the store's own dataset spec; any other spec is returned
    as it is."""
    if not dataset_spec or not dataset_spec.startswith(("hf-text:", "hf-chat:")) or ",tokenizer=" in dataset_spec:
        return dataset_spec
    from kdcache.integrations.hf import model_tokenizer
    for t in teachers or []:
        found = model_tokenizer(t)
        if found:
            return f"{dataset_spec},tokenizer={found}"
    if store:
        from kdcache.store import open_store
        s = open_store(store)
        recorded = recorded_spec(s.manifest.dataset.get("spec", ""), store)
        s.close()
        if ",tokenizer=" in recorded:
            return f"{dataset_spec},tokenizer={recorded.split(',tokenizer=')[1].split(',')[0]}"
    return dataset_spec
