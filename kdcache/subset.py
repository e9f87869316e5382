"""Transfer-set selection: which rows of a dataset a store (or a training run) covers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdcache.datasets import get_batch
from kdcache.errors import SpecError


def dataset_labels(dataset: Any, block: int = 8192) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    n = len(dataset)
    return np.concatenate([get_batch(dataset, np.arange(a, min(a + block, n)))[1].numpy()
                           for a in range(0, n, block)]) if n else np.zeros(0, np.int64)


def resolve_subset(spec: str | None, dataset: Any) -> tuple[np.ndarray, str | None]:
    """Row indices and a canonical description for ``spec``.

    Rows are the dataset's items (for a sequence dataset: whole sequences). ``None``: every row.
    ``START:STOP``: a range. ``exclude-classes:3[,5]``: rows whose label is not
    listed (the paper's transfer set without 3s). ``FILE.npy`` / ``FILE.txt``: explicit indices, in order.
    ``A+B``: the rows of ``A`` that are also in ``B``, in ``A``'s order (``0:50000+exclude-classes:3``).
    """
    n = len(dataset)
    if not spec:
        return np.arange(n, dtype=np.int64), None
    if "+" in spec:
        parts = [resolve_subset(part, dataset) for part in spec.split("+")]
        idx = parts[0][0]
        for other, _ in parts[1:]:
            idx = idx[np.isin(idx, other)]
        if len(idx) == 0:
            raise SpecError(f"{{param:subset}} {spec!r} selects no rows of a dataset of {n}")
        return idx, "+".join(str(d) for _, d in parts)
    if spec.startswith("exclude-classes:"):
        try:
            classes = sorted({int(c) for c in spec.split(":", 1)[1].split(",") if c.strip()})
        except ValueError:
            raise SpecError(f"{{param:subset}} {spec!r}: classes must be integers, e.g. exclude-classes:3") from None
        from kdcache.text import is_sequence_dataset
        if is_sequence_dataset(dataset):
            raise SpecError(f"{{param:subset}} {spec!r}: a sequence dataset has a label per position, not per item; "
                            f"select "
                            f"sequences by range or index file")
        labels = dataset_labels(dataset)
        idx = np.flatnonzero(~np.isin(labels, classes)).astype(np.int64)
        desc = f"exclude-classes:{','.join(map(str, classes))}"
    elif spec.endswith((".npy", ".txt")):
        path = Path(spec)
        if not path.exists():
            raise SpecError(f"{{param:subset}} index file {spec!r} does not exist")
        idx = (np.load(path, allow_pickle=False) if path.suffix == ".npy"
               else np.loadtxt(path, dtype=np.int64, ndmin=1))
        idx = np.asarray(idx, dtype=np.int64).ravel()
        import hashlib
        desc = f"indices:{path.name}:sha256={hashlib.sha256(idx.tobytes()).hexdigest()[:16]}"
        if len(np.unique(idx)) != len(idx):
            raise SpecError(f"{{param:subset}} index file {spec!r} repeats indices; each row may appear once")
    elif ":" in spec:
        a, _, b = spec.partition(":")
        try:
            start, stop = int(a or 0), int(b or n)
        except ValueError:
            raise SpecError(f"{{param:subset}} {spec!r}: expected START:STOP, exclude-classes:C or an index "
                            f"file") from None
        stop = min(stop, n)
        idx = np.arange(start, stop, dtype=np.int64)
        desc = f"range:{start}:{stop}"
    else:
        raise SpecError(f"{{param:subset}} {spec!r}: expected START:STOP, exclude-classes:C[,C...] "
                        f"or an index file (.npy/.txt)")
    if len(idx) == 0:
        raise SpecError(f"{{param:subset}} {spec!r} selects no rows of a dataset of {n}")
    if idx.min() < 0 or idx.max() >= n:
        raise SpecError(f"{{param:subset}} {spec!r} has indices outside 0:{n}")
    return idx, desc
