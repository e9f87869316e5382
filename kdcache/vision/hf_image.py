"""``hf-image:PATH``: an image classification set read through ``datasets``: Parquet or Arrow files
with an Image column, a ``save_to_disk`` directory, a folder for its ``imagefolder`` builder, or
WebDataset tar shards (local or at a URL), the usual way large image sets are stored.

Images are read undecoded (``Image(decode=False)``: the file's bytes, or its path) and decoded by
:class:`kdcache.vision.images.ImageDataset`, like an ``imagefolder:`` dataset's files.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import SpecError
from kdcache.spec_syntax import parse_kv
from kdcache.vision import require
from kdcache.vision.preprocess import KEYS, Preprocess

BUILDERS = ("parquet", "arrow", "disk", "imagefolder", "webdataset")


class HFImageSource:
    """The rows of a ``datasets.Dataset``: ``read(i)`` gives row ``i``'s image bytes; ``labels`` the label
    column (-1 without one); ``classes`` a ClassLabel's names. Identified by what was loaded
    (:func:`_header`) and each row's label."""

    def __init__(self, ds: Any, image: str, label: str | None, where: str, header: str,
                 num_classes: int | None = None) -> None:
        datasets = require("datasets", "hf-image datasets")
        self.ds = ds.cast_column(image, datasets.Image(decode=False))
        self.image, self.where_base = image, where
        self.header = header
        feature = ds.features.get(label) if label else None
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if label:
            self.labels = np.asarray(ds.with_format("numpy")[label], dtype=np.int64)
        else:
            self.labels = np.full(len(ds), -1, dtype=np.int64)
        if label and len(self.labels):
            self.classes = _classes(self.classes, self.labels, num_classes, where)
        self.names = [f"row {i}" for i in range(len(ds))]
        self.sizes = np.zeros(len(ds), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, i: int) -> bytes:
        item = self.ds[int(i)][self.image]
        if item.get("bytes"):
            return item["bytes"]
        if item.get("path"):
            with open(item["path"], "rb") as f:
                return f.read()
        raise SpecError(f"{self.where(i)} has no image (neither bytes nor a path); remove the row")

    def where(self, i: int) -> str:
        item = self.ds[int(i)][self.image]
        return item.get("path") or f"{self.where_base} row {int(i)}"

    def entry(self, i: int) -> bytes:
        return f"{int(i)}\0{int(self.labels[i])}\n".encode()


def _classes(names: list[str] | None, labels: np.ndarray, given: int | None, where: str) -> list[str]:
    """The class names: a ClassLabel's, else ``0 .. classes-1`` for ``classes=N``, else taken from the
    largest label (said once, since a class no row carries would be left out)."""
    top = int(labels.max())
    if given is not None:
        if names is not None and len(names) != given:
            raise SpecError(f"hf-image dataset {where!r} names {len(names)} classes in its label feature, not "
                            f"classes={given}; drop classes=")
        if top >= given:
            raise SpecError(f"hf-image dataset {where!r} has label {top}, outside classes={given}; give "
                            f"classes={top + 1} or more")
        return names or [str(c) for c in range(given)]
    if names is not None:
        return names
    if where not in _NOTED:
        _NOTED.add(where)
        print(f"note: hf-image dataset {where!r} names no classes: {top + 1} taken from its largest label ({top}); "
              f"give classes=N if it has more", file=sys.stderr)
    return [str(c) for c in range(top + 1)]


_NOTED: set[str] = set()


def _builder(path: str) -> tuple[str, Any]:
    """Which way ``path`` is read and its data files."""
    p = Path(path)
    if "://" not in path and not glob.glob(path):
        raise SpecError(f"hf-image dataset {path!r} does not exist; give a Parquet/Arrow file, a save_to_disk or "
                        f"image directory, or .tar shards")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return "disk", path
        tars = sorted(glob.glob(os.path.join(path, "*.tar")))
        if tars:
            return "webdataset", tars
        parquet = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if parquet:
            return "parquet", parquet
        return "imagefolder", path
    if path.endswith(".tar") or ".tar" in path and "://" in path:
        return "webdataset", sorted(glob.glob(path)) or [path]
    if path.endswith(".parquet") or "*" in path and path.endswith(".parquet"):
        return "parquet", sorted(glob.glob(path)) or [path]
    if path.endswith(".arrow"):
        return "arrow", sorted(glob.glob(path)) or [path]
    raise SpecError(f"hf-image dataset {path!r}: not a directory, .parquet, .arrow or .tar file(s) (or they do not "
                    f"exist); give builder= one of {', '.join(BUILDERS)}")


def _header(ds: Any, kind: str, files: Any) -> str:
    """What identifies the data wherever it is copied to: the data files' names and sizes (a URL as
    given), a ``save_to_disk`` directory's own fingerprint, or an image folder's listing."""
    if kind == "disk":
        return f"disk:{ds._fingerprint}"
    if kind == "imagefolder":
        from kdcache.vision.images import _images_under
        listing = hashlib.sha256("".join(f"{p}\0{n}\n" for p, n in _images_under(Path(files))).encode())
        return f"imagefolder:{listing.hexdigest()}"
    names = [files] if isinstance(files, str) else list(files)
    return kind + ":" + ";".join(f if "://" in f else f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in names)


def open_hf_image(path: str, split: str, builder: str | None) -> tuple[Any, str, str]:
    """The ``datasets.Dataset`` of ``path`` (one split), the way it was read and its identity header."""
    datasets = require("datasets", "hf-image datasets")
    kind, files = (builder, path) if builder else _builder(path)
    if kind not in BUILDERS:
        raise SpecError(f"hf-image builder={kind!r}; use one of {', '.join(BUILDERS)}")
    try:
        if kind == "disk":
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise SpecError(f"hf-image dataset {path!r} has splits {', '.join(ds)}, not {split!r}; give split=")
                ds = ds[split]
        elif kind == "imagefolder":
            ds = datasets.load_dataset("imagefolder", data_dir=path, split=split)
        else:
            ds = datasets.load_dataset(kind, data_files=files, split="train" if kind != "imagefolder" else split)
    except SpecError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise SpecError(f"hf-image dataset {path!r} cannot be read as {kind} ({str(e).splitlines()[0]})") from None
    return ds, kind, _header(ds, kind, files)


def load_hf_image(spec: str, rest: str) -> Any:
    """``hf-image:PATH[,image=COL][,label=COL|none][,split=S][,builder=B][,classes=N][,size=..,mean=..]``."""
    from kdcache.vision.images import ImageDataset
    kv = parse_kv(rest, ("path",))
    path = kv.pop("path", "")
    if not path:
        raise SpecError(f"dataset spec {spec!r}: give the data, e.g. hf-image:images.parquet,image=image,label=label")
    split, builder = kv.pop("split", "train"), kv.pop("builder", None)
    image, label = kv.pop("image", None), kv.pop("label", None)
    num_classes = kv.pop("classes", None)
    if num_classes is not None and (not num_classes.isdigit() or int(num_classes) < 1):
        raise SpecError(f"dataset spec {spec!r}: classes={num_classes!r}; give the number of classes, e.g. classes=10")
    pre = Preprocess.from_kv(kv, spec)
    if kv:
        raise SpecError(f"dataset spec {spec!r}: unknown keys {sorted(kv)}; known: image, label, split, builder, "
                        f"classes, {', '.join(KEYS)}")
    require("PIL.Image", f"dataset {spec!r}")
    require("torchvision", f"dataset {spec!r}")
    ds, kind, header = open_hf_image(path, split, builder)
    datasets = require("datasets", "hf-image datasets")
    images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    image = image or ("image" if "image" in images else images[0] if images else None)
    if image not in ds.features:
        raise SpecError(f"hf-image dataset {path!r} has no image column {image!r}; its columns are "
                        f"{', '.join(ds.column_names)}: give image=COLUMN")
    if label is None:
        classes = [k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
        label = "label" if "label" in ds.features else classes[0] if classes else ("cls" if "cls" in ds.features
                                                                                    else None)
    elif label == "none":
        label = None
    elif label not in ds.features:
        raise SpecError(f"hf-image dataset {path!r} has no label column {label!r}; its columns are "
                        f"{', '.join(ds.column_names)}: give label=COLUMN or label=none")
    given = None if num_classes is None else int(num_classes)
    return ImageDataset(HFImageSource(ds, image, label, path, header, given), pre, spec, split)
