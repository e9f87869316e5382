"""A built-in sequence dataset: word-level next-token prediction over plain text files.

``text:PATH[,split=train|test][,seq=64][,vocab=8192][,test_every=10]``: PATH is a file, a directory
(every ``*.txt`` and ``*.md`` under it) or a glob. Paragraphs (blank-line separated) are cut into
windows of at most ``seq + 1`` tokens; each window is one sequence whose inputs are its first
``seq`` tokens and whose per-position labels are the next tokens, so sequences have different
lengths and a batch is padded (inputs with ``<pad>``, labels with -1). Every ``test_every``-th
paragraph is the test split. The vocabulary is the most frequent tokens of the train split, plus
``<pad>`` (id 0) and ``<unk>`` (id 1): ``vocab`` classes in all.

Any dataset with the same two methods works as a sequence dataset in kdcache: ``lengths(indices)``
(rows per item, int: its real positions) and ``get_batch(indices)`` returning ``x [B, L, ...]`` and
``y [B, L]`` padded on the right to at least the longest of those lengths. A dataset whose rows are
not its first positions (``hf-chat:`` with ``rows=assistant``: only the positions whose target is an
assistant token) also has ``row_mask(indices)``, ``[B, L]`` bool with ``lengths(indices)`` True
entries per item, and ``widths(indices)``, the positions a model runs on per item; :func:`row_mask`
and :func:`widths` are where the rest of kdcache asks.
"""
from __future__ import annotations

import collections
import functools
import glob
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.errors import SpecError

TOKEN = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
PAD, UNK = "<pad>", "<unk>"


def is_sequence_dataset(dataset: object) -> bool:
    """True for datasets with a row per position: they say each item's length."""
    return callable(getattr(dataset, "lengths", None))


def row_mask(dataset: object, indices: np.ndarray, width: int) -> torch.Tensor:
    """``[B, width]`` bool: the positions of items ``indices`` that have a row in a per-token store, in a
    batch padded to ``width``. The dataset's ``row_mask`` where it has one, else its first ``lengths``."""
    own = getattr(dataset, "row_mask", None)
    if own is None:
        lengths = torch.as_tensor(np.asarray(dataset.lengths(indices), dtype=np.int64))
        return torch.arange(width)[None, :] < lengths[:, None]
    mask = own(indices)
    if mask.shape[1] > width:
        if mask[:, width:].any():
            raise SpecError(f"the dataset's row_mask marks positions beyond its batch's width {width}; get_batch must "
                            f"pad to at least the last position with a row")
        return mask[:, :width]
    return torch.cat([mask, torch.zeros(len(mask), width - mask.shape[1], dtype=torch.bool)], dim=1)


def widths(dataset: object, indices: np.ndarray) -> np.ndarray:
    """Positions per item that a model runs on: its ``widths`` where it has them (``hf-chat:``), else
    its ``lengths`` (every real position is a row)."""
    own = getattr(dataset, "widths", None)
    return np.asarray(own(indices) if own is not None else dataset.lengths(indices), dtype=np.int64)


def tokenize(text: str) -> list[str]:
    return [t.lower() for t in TOKEN.findall(text)]


def _files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
    elif any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise SpecError(f"text dataset: no text files at {path!r}; give a file, a directory of .txt/.md files "
                        f"or a glob such as 'docs/*.txt'")
    return files


@functools.lru_cache(maxsize=4)
def _corpus(files: tuple[str, ...], stamps: tuple[int, ...], vocab: int, test_every: int
            ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(vocabulary, train paragraphs, test paragraphs) as int32 token ids."""
    paragraphs: list[list[str]] = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        paragraphs += [t for t in (tokenize(p) for p in re.split(r"\n\s*\n", text)) if len(t) >= 2]
    test = [p for i, p in enumerate(paragraphs) if i % test_every == test_every - 1]
    train = [p for i, p in enumerate(paragraphs) if i % test_every != test_every - 1]
    counts = collections.Counter(t for p in train for t in p)
    words = [PAD, UNK] + [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab - 2]]
    index = {w: i for i, w in enumerate(words)}
    encode = lambda p: np.array([index.get(t, 1) for t in p], dtype=np.int32)  # noqa: E731
    return words, [encode(p) for p in train], [encode(p) for p in test]


class TokenWindows(Dataset):
    """Sequences cut from token ids: each window's first tokens are the inputs, the next ones the labels;
    batches are padded on the right (inputs with ``pad_id``, labels with -1). Subclasses call
    :meth:`_set_windows`."""

    pad_id = 0

    def _set_windows(self, windows: list[np.ndarray]) -> None:
        self._lengths = np.array([len(w) - 1 for w in windows], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum([len(w) for w in windows])[:-1]]).astype(np.int64)
        self._tokens = torch.from_numpy(np.concatenate(windows).astype(np.int64))

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self, indices: np.ndarray | None = None) -> np.ndarray:
        return self._lengths if indices is None else self._lengths[np.asarray(indices)]

    def get_batch(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self._lengths[idx]
        width = int(lengths.max()) if len(idx) else 0
        pos = np.arange(width)
        valid = torch.from_numpy(pos[None, :] < lengths[:, None])
        at = torch.from_numpy(self._starts[idx][:, None] + np.minimum(pos[None, :], lengths[:, None] - 1))
        x = torch.where(valid, self._tokens[at], self.pad_id)
        y = torch.where(valid, self._tokens[at + 1], -1)
        return x, y

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(self._lengths[i])
        x, y = self.get_batch(np.array([i]))
        return x[0, :n], y[0, :n]

    def tokens(self) -> int:
        return int(self._lengths.sum())

    def window(self, i: int) -> np.ndarray:
        """The ``n + 1`` tokens of item ``i``: its ``n`` inputs and the last one's next token (whatever
        the labels hide)."""
        a = int(self._starts[i])
        return self._tokens[a:a + int(self._lengths[i]) + 1].numpy()


class TextSequences(TokenWindows):
    """Next-token windows of a tokenised text corpus; see the module docstring."""

    def __init__(self, path: str, split: str = "train", seq: int = 64, vocab: int = 8192, test_every: int = 10) -> None:
        if split not in ("train", "test"):
            raise SpecError(f"text dataset: split {split!r}; use train or test")
        if seq < 1 or vocab < 3 or test_every < 2:
            raise SpecError(f"text dataset: need seq >= 1, vocab >= 3 and test_every >= 2 (got {seq}, {vocab}, "
                            f"{test_every})")
        files = _files(path)
        words, train, test = _corpus(tuple(str(f) for f in files), tuple(os.stat(f).st_mtime_ns for f in files),
                                     vocab, test_every)
        windows = [p[a:a + seq + 1] for p in (train if split == "train" else test)
                   for a in range(0, len(p) - 1, seq)]
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            raise SpecError(f"text dataset {path!r} has no {split} paragraphs of two tokens or more")
        self.class_names = words
        self.num_classes = len(words)
        self.seq = seq
        self._set_windows(windows)
