"""Datasets of image files: ``imagefolder:DIR`` (torchvision's layout) and ``hf-image:PATH`` (a
``datasets`` dataset with an Image column), decoded one image at a time, in whatever DataLoader
worker asks, so memory is bounded by the batch.

An item is the image, decoded with Pillow and converted to RGB, then preprocessed
(:class:`kdcache.vision.preprocess.Preprocess`): the evaluation transform without views; with views,
each view is cut from the original image (its box drawn relative to the original's size, see
:mod:`kdcache.augment`) and resized (:meth:`ImageDataset.get_views`).

The fingerprint does not decode: it hashes every file's name, size and label, and the bytes of 256 of
them (kdcache/store/FORMAT.md, "Image datasets"), so a 100 GB folder is listed, not read twice.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.augment import cuts_originals
from kdcache.errors import SpecError, StoreError
from kdcache.spec_syntax import parse_kv
from kdcache.vision import require
from kdcache.vision.preprocess import KEYS, Preprocess

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SAMPLED_FILES = 256
MAX_GROUPS = 4096
_CONVERTED: set[str] = set()  # datasets whose grayscale/RGBA conversion was said in this process


class BadImage(SpecError):
    """An image file that cannot be decoded."""


class ImageFolderSource:
    """The files of torchvision's ImageFolder layout: one sub-directory per class, classes sorted by
    name, files sorted by their path; or, unlabelled, every image file under ``root``."""

    def __init__(self, root: str, labelled: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SpecError(f"image folder {root!r} does not exist or is not a directory")
        self.labelled = labelled
        names, labels, sizes = [], [], []
        if labelled:
            self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
            if not self.classes:
                raise SpecError(f"image folder {root!r} has no class sub-directories; put each class's images in "
                                f"DIR/CLASS/, or use imagefolder:{root},labels=none for unlabelled images")
            for c, cls in enumerate(self.classes):
                found = _images_under(self.root / cls)
                if not found:
                    raise SpecError(f"class folder {str(self.root / cls)!r} has no image files "
                                    f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
                for rel, size in found:
                    names.append(f"{cls}/{rel}")
                    labels.append(c)
                    sizes.append(size)
        else:
            self.classes = None
            for rel, size in _images_under(self.root):
                names.append(rel)
                labels.append(-1)
                sizes.append(size)
            if not names:
                raise SpecError(f"image folder {root!r} has no image files ({', '.join(IMG_EXTENSIONS)})")
        self.names = names
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def header(self) -> str:
        return f"labelled={int(self.labelled)}"

    def read(self, i: int) -> bytes:
        return (self.root / self.names[i]).read_bytes()

    def entry(self, i: int) -> bytes:
        """``relative path NUL size NUL label LF``, UTF-8."""
        return f"{self.names[i]}\0{int(self.sizes[i])}\0{int(self.labels[i])}\n".encode()

    def where(self, i: int) -> str:
        return str(self.root / self.names[i])


def _images_under(d: Path) -> list[tuple[str, int]]:
    """``(path relative to d with '/', size in bytes)`` of every image file under ``d``, sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames.sort()
        for f in filenames:
            if f.lower().endswith(IMG_EXTENSIONS):
                p = os.path.join(dirpath, f)
                out.append((os.path.relpath(p, d).replace(os.sep, "/"), os.stat(p).st_size))
    out.sort()
    return out


class ImageDataset(Dataset):
    """Images of a source (``names``, ``labels``, ``sizes``, ``read(i)``, ``where(i)``), preprocessed
    with ``preprocess``. ``get_batch`` gives the evaluation view; ``get_views`` views cut from the
    originals."""

    def __init__(self, source: Any, preprocess: Preprocess, spec: str, split: str | None = None) -> None:
        self.source, self.preprocess, self.spec, self.split = source, preprocess, spec, split
        self.skip_bad = False  # dump-logits --skip-bad-images: an unreadable file becomes a skipped row
        self.class_names = list(source.classes) if source.classes else None
        self.num_classes = len(self.class_names) if self.class_names else None

    def __len__(self) -> int:
        return len(self.source)

    def _originals(self, idx: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The decoded images of ``idx`` and their labels; with ``skip_bad``, an unreadable file is a black
        ``size`` x ``size`` image labelled SKIPPED_LABEL (its row is stored, listed in the manifest's
        ``skipped`` and never trained on)."""
        from kdcache.store.format import SKIPPED_LABEL
        y = torch.from_numpy(self.source.labels[idx].copy())
        out = []
        for j, i in enumerate(idx.tolist()):
            try:
                out.append(self.original(i))
            except BadImage as e:
                if not self.skip_bad:
                    raise
                print(f"skipping: {e}", file=sys.stderr)
                out.append(torch.zeros(3, self.preprocess.size, self.preprocess.size, dtype=torch.uint8))
                y[j] = SKIPPED_LABEL
        return out, y

    def original(self, i: int) -> torch.Tensor:
        """Item ``i``'s decoded image, uint8 ``[3, H, W]`` (grayscale and RGBA converted to RGB)."""
        pil = require("PIL.Image", "image datasets")
        try:
            with pil.open(io.BytesIO(self.source.read(i))) as im:
                im.load()
                if im.mode != "RGB":
                    self._converted(im.mode, i)
                    im = im.convert("RGB")
                arr = np.array(im)
        except FileNotFoundError:
            raise StoreError(f"image {self.source.where(i)!r} no longer exists; the dataset changed since it was "
                             f"listed") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise BadImage(f"image {self.source.where(i)!r} cannot be decoded ({e}); replace or remove the "
                           f"file") from None
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()

    def _converted(self, mode: str, i: int) -> None:
        where = self.spec.split(",")[0]
        if where not in _CONVERTED:
            _CONVERTED.add(where)
            print(f"note: {where}: images that are not RGB (first: {self.source.where(i)}, "
                  f"mode {mode}) are converted to RGB", file=sys.stderr)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.get_batch(np.array([i]))
        return x[0], int(y[0])

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        originals, y = self._originals(np.asarray(indices, dtype=np.int64))
        return self.preprocess.normalize(torch.stack([self.preprocess.resize_eval(im) for im in originals])), y

    def get_views(self, indices: np.ndarray, augmenter: Any, params: torch.Tensor | None,
                  views: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items ``indices``, each as one view: a built-in augmentation's box is cut from the decoded
        original (``params`` drawn here for ``views`` when not given), then resized to ``size``; a
        user's augmentation applies to the evaluation view, in [0, 1], before normalisation."""
        idx = np.asarray(indices, dtype=np.int64)
        originals, y = self._originals(idx)
        aug = augmenter.aug
        if not cuts_originals(aug):
            x = self.preprocess.to_unit(torch.stack([self.preprocess.resize_eval(im) for im in originals]))
            if params is None:
                params = augmenter.draw(idx, views)
            return self.preprocess.normalize_unit(aug.apply(x, params)), y, params
        if params is None:
            sizes = np.array([im.shape[-2:] for im in originals], dtype=np.int64).reshape(-1, 2)
            try:
                params = augmenter.draw(idx, views, sizes)
            except ValueError as e:  # e.g. an image smaller than a fixed crop: name the file
                row = int(str(e).rsplit("(row ", 1)[-1].rstrip(")")) if "(row " in str(e) else 0
                raise SpecError(f"{{param:augment}} {augmenter.views.augment!r} cannot cut a view from image "
                                f"{self.source.where(int(idx[row]))!r}: {str(e).split(' (row ')[0]}") from None
        out = []
        for im, row in zip(originals, params.tolist()):
            box = aug.cut(im, row)
            if box.shape[-1] < 1 or box.shape[-2] < 1:
                raise StoreError(f"view parameters {row} give an empty box on an image of {tuple(im.shape[-2:])}; "
                                 f"the store's views were drawn from other images")
            out.append(self.preprocess.resize_view(box))
        return self.preprocess.normalize(torch.stack(out)), y, params

    # -- identity -----------------------------------------------------------------------------------
    def _sampled(self) -> np.ndarray:
        n = len(self)
        return np.unique(np.linspace(0, max(n - 1, 0), min(n, SAMPLED_FILES)).round().astype(np.int64))

    def _listing(self) -> tuple[str, int, list[str], list[str]]:
        """(listing sha256, group size, group digests, sampled files' digests)."""
        n = len(self)
        group = max(1, math.ceil(n / MAX_GROUPS))
        whole = hashlib.sha256(f"kdcache-images-1;n={n};{self.source.header}".encode())
        groups = []
        for a in range(0, n, group):
            g = hashlib.sha256()
            for i in range(a, min(a + group, n)):
                e = self.source.entry(i)
                whole.update(e)
                g.update(e)
            groups.append(g.hexdigest()[:16])
        sampled = [hashlib.sha256(self.source.read(int(i))).hexdigest()[:16] for i in self._sampled()]
        return whole.hexdigest(), group, groups, sampled

    def files(self) -> dict[str, Any]:
        if not hasattr(self, "_files"):
            listing, group, groups, sampled = self._listing()
            self._files = {"count": len(self), "listing_sha256": listing, "group_size": group, "groups": groups,
                           "sampled": sampled}
        return self._files

    def content_fingerprint(self) -> str:
        """sha256 of ``"kdcache-images-1;" + listing_sha256 + ";" + the sampled digests joined by ","``."""
        f = self.files()
        return hashlib.sha256(f"kdcache-images-1;{f['listing_sha256']};{','.join(f['sampled'])}".encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """What the manifest records beside the fingerprint: the preprocessing and the file listing's digests."""
        return {"preprocess": self.preprocess.asdict(), "files": self.files()}

    def explain_change(self, recorded: dict[str, Any] | None) -> str | None:
        """Which file differs from the listing ``recorded`` in a manifest (``files``), in words."""
        if not recorded or "groups" not in recorded:
            return None
        now = self.files()
        if now["count"] != recorded["count"]:
            return f"it has {now['count']} image files now and had {recorded['count']} (files added or removed)"
        group = recorded["group_size"]
        if group == now["group_size"]:
            for g, (a, b) in enumerate(zip(now["groups"], recorded["groups"])):
                if a != b:
                    first, last = g * group, min((g + 1) * group, len(self)) - 1
                    if first == last:
                        return f"file {self.source.where(first)!r} was added, renamed or changed"
                    return (f"one of the {last - first + 1} files from {self.source.where(first)!r} to "
                            f"{self.source.where(last)!r} was added, renamed or changed")
        for i, (a, b) in zip(self._sampled(), zip(now["sampled"], recorded.get("sampled", []))):
            if a != b:
                return f"the content of file {self.source.where(int(i))!r} changed"
        return None


# -- specs --------------------------------------------------------------------------------------------
def load_imagefolder(spec: str, rest: str) -> ImageDataset:
    """``imagefolder:DIR[,labels=none][,size=S,mean=..,std=..,interpolation=..,crop_pct=..]``."""
    kv = parse_kv(rest, ("path",))
    path = kv.pop("path", "")
    if not path:
        raise SpecError(f"dataset spec {spec!r}: give the folder, e.g. imagefolder:images/train,size=224")
    labels = kv.pop("labels", "folders")
    if labels not in ("folders", "none"):
        raise SpecError(f"dataset spec {spec!r}: labels={labels!r}; use labels=none for unlabelled images "
                        f"(the default takes them from the class folders)")
    pre = Preprocess.from_kv(kv, spec)
    if kv:
        raise SpecError(f"dataset spec {spec!r}: unknown keys {sorted(kv)}; known: labels, {', '.join(KEYS)}")
    require("PIL.Image", f"dataset {spec!r}")
    require("torchvision", f"dataset {spec!r}")
    return ImageDataset(ImageFolderSource(path, labels == "folders"), pre, spec)
