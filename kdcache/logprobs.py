"""Top-k logprob datasets: a teacher's per-token top-k log-probabilities held in dataset columns
(vLLM's ``prompt_logprobs``, Axolotl's KD plugin, Hub datasets such as ``inputs [L]``,
``targets [L, 2, k]``) imported into a per-token top-k store, and a top-k store exported as one.

Logprobs are ``log_softmax(z)`` at T = 1, so an imported store keeps them as its ``topk_values`` with
``log_normalizers`` 0 at T = 1: the kept entries and the tail mass ``1 - sum(exp(logprobs))`` are exact
there. At another T the full vocabulary would be needed; a store only serves one when the import was
told to approximate it (``approximate_temperatures``): the tail's mass is spread evenly over the ``V - k`` ids not
kept (see :func:`uniform_tail_log_normalizer`). The manifest says so in ``layout_params["logprobs"]``.

Record ``r`` of a logprob dataset belongs to sequence ``r`` of the tokenized corpus (an ``hf-text:``
dataset), whose window ``w`` has ``L + 1`` tokens and ``L`` store rows; store row ``j`` is the
teacher's prediction of ``w[j + 1]``. The record's tokens must be ``w[:L]`` or ``w``, and its logprob
row ``j + offset`` is store row ``j`` (``offset`` 1 where entry ``i`` is the logprob of token ``i``
given the tokens before it, as vLLM reports prompt logprobs; 0 where entry ``j`` is the prediction made
at position ``j``).
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kdcache.errors import ConfigError, SpecError, StoreError
from kdcache.layouts.topk import TopK, check_temperatures

SUM_TOLERANCE = 2e-3   # fp16 rounding of 32 logprobs stays below it; raw logits are far above
PAD_LOGPROB = -1e9     # the value Axolotl's KD collator pads target_logprobs with
FORMATS = ("parquet", "jsonl")


@dataclass(frozen=True)
class Columns:
    """Where a logprob dataset keeps each record's data.

    ``tokens``: the token ids ``[n]``. ``logprobs``: ``[rows, k]`` logprobs, or with ``ids`` None
    ``[rows, 2, k]`` pairs (row ``[0]`` the logprobs, ``[1]`` the token ids). ``ids``: ``[rows, k]``
    token ids. ``offset``: the record row of store row 0. ``full_window``: export writes the window's
    ``L + 1`` tokens (else its ``L`` inputs). ``mask``/``labels``: columns export adds (Axolotl's).
    ``pad``: rows export writes outside the window's predictions: ``null`` (vLLM's first entry) or
    ``fill`` (ids ``0..k-1``, logprobs ``PAD_LOGPROB``, mask 0, as Axolotl pads).
    """

    tokens: str
    logprobs: str
    ids: str | None
    offset: int = 0
    full_window: bool = False
    mask: str | None = None
    labels: str | None = None
    pad: str = "fill"


PRESETS = {
    # Hub top-k datasets such as codys12/LlamaKD: inputs [L], targets [L, 2, k] (logprobs, ids);
    # targets[j] is the prediction made at inputs[j].
    "llamakd": Columns("inputs", "targets", None),
    # Axolotl's KD plugin: target_token_ids/target_logprobs/target_mask [L, k] beside input_ids and labels
    # [L]; row j is the distribution over input_ids[j + 1], the last row padding with mask 0.
    "axolotl": Columns("input_ids", "target_logprobs", "target_token_ids", 0, True, "target_mask", "labels"),
    # vLLM's prompt_logprobs (list[None | dict[token id, Logprob]]) in two columns: entry i is token i
    # given tokens < i, entry 0 null.
    "vllm": Columns("prompt_token_ids", "prompt_logprobs", "prompt_logprob_token_ids", 1, True, pad="null"),
}


def columns_for(preset: str | None, tokens: str | None = None, ids: str | None = None, logprobs: str | None = None,
                offset: int | None = None) -> Columns:
    """A preset's columns with any given name or offset replacing its own; without a preset, ``tokens``
    and ``logprobs`` are needed (``ids`` None: ``logprobs`` holds ``[rows, 2, k]`` pairs)."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{{param:preset}} {preset!r}: use one of {', '.join(PRESETS)}")
    if preset is None and not (tokens and logprobs):
        raise ConfigError(f"give a {{param:preset}} ({', '.join(PRESETS)}) or the tokens and logprobs columns "
                          f"({{param:tokens_column}}, {{param:logprobs_column}})")
    base = PRESETS[preset] if preset else Columns(tokens or "", logprobs or "", ids)
    given = {k: v for k, v in {"tokens": tokens, "ids": ids, "logprobs": logprobs, "offset": offset}.items()
             if v is not None}
    cols = replace(base, **given)
    if cols.offset < 0:
        raise ConfigError(f"{{param:offset}} {cols.offset}: the record row of store row 0 is 0 or more")
    return cols


def uniform_tail_log_normalizer(logprobs: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """``log(sum_kept exp(l / T) + (V - k) * (tail / (V - k)) ** (1 / T))`` per row of ``logprobs
    [rows, k]``, ``tail = max(0, 1 - sum(exp(l)))``: the log-normaliser at T when the tail's mass is
    spread evenly over the ``V - k`` ids not kept. Exact at T = 1 (0); for T > 1 it gives the largest
    tail mass any tail of that mass could have (x ** (1/T) is concave), for T < 1 the smallest."""
    lp = np.asarray(logprobs, dtype=np.float64)
    k = lp.shape[-1]
    kept = np.exp(lp / temperature).sum(-1)
    if num_classes <= k:
        return np.log(kept)
    tail = np.clip(1 - np.exp(lp).sum(-1), 0, None)
    rest = num_classes - k
    return np.log(kept + rest * (tail / rest) ** (1 / temperature))


# -- reading a logprob dataset ---------------------------------------------------------------------


def open_records(src: str, split: str = "train") -> Any:
    """The records of a logprob dataset: a ``save_to_disk`` directory, a directory of data files (what
    :func:`export_logprobs` writes), or files (JSONL, Parquet, Arrow; a glob) read with ``datasets``."""
    from kdcache.integrations.hf import _records
    p = Path(src)
    if p.is_dir() and not any((p / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        files = sorted(f for ext in ("parquet", "jsonl", "json", "arrow") for f in glob.glob(str(p / f"*.{ext}")))
        if not files:
            raise SpecError(f"logprob dataset {src}: no .parquet, .jsonl, .json or .arrow files and no save_to_disk "
                            f"dataset there")
        kinds = {Path(f).suffix for f in files}
        src = str(p / f"*{kinds.pop()}") if len(kinds) == 1 else src
    return _records(src, split, f"logprob dataset {src}")


def _levels(col: Any, depth: int, name: str, where: str) -> tuple[list[np.ndarray], np.ndarray]:
    """A nested list column as ``depth`` offset arrays (record -> rows -> ...) and its flat values."""
    import pyarrow as pa
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = []
    for _ in range(depth):
        if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
            raise SpecError(f"{where}: column {name!r} is {col.type}, not a list nested {depth} deep; check the "
                            f"preset or the column options")
        offsets.append(np.asarray(arr.offsets, dtype=np.int64))
        arr = arr.values
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise SpecError(f"{where}: column {name!r} holds {arr.type}, not numbers")
    return offsets, arr.to_numpy(zero_copy_only=False)


@dataclass
class _Batch:
    """One batch of records: tokens and the logprob columns as offsets and flat values."""

    tokens: tuple[list[np.ndarray], np.ndarray]
    logprobs: tuple[list[np.ndarray], np.ndarray]
    ids: tuple[list[np.ndarray], np.ndarray] | None


def _batches(records: Any, cols: Columns, batch: int, where: str) -> Iterator[_Batch]:
    names = [cols.tokens, cols.logprobs] + ([cols.ids] if cols.ids else [])
    missing = [n for n in names if n not in records.column_names]
    if missing:
        raise SpecError(f"{where}: no column {missing[0]!r}; its columns are {', '.join(records.column_names)} "
                        f"(choose a preset or name the columns)")
    for table in records.select_columns(names).with_format("arrow").iter(batch_size=batch):
        yield _Batch(_levels(table.column(cols.tokens), 1, cols.tokens, where),
                     _levels(table.column(cols.logprobs), 2 if cols.ids else 3, cols.logprobs, where),
                     _levels(table.column(cols.ids), 2, cols.ids, where) if cols.ids else None)


def _rows(batch: _Batch, cols: Columns, r: int, positions: np.ndarray, k: int, where: str, record: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Logprobs and ids ``[len(positions), k]`` of record ``r`` of the batch: its rows ``positions +
    cols.offset`` (a sequence's positions with a store row); the rows between them are not read."""
    wanted = np.asarray(positions, dtype=np.int64) + cols.offset

    def grab(level: tuple[list[np.ndarray], np.ndarray], name: str, part: int | None) -> np.ndarray:
        offs, flat = level
        rec = offs[0]
        if rec[r + 1] - rec[r] <= wanted[-1]:
            raise StoreError(f"{where}: record {record} has {rec[r + 1] - rec[r]} rows of {name!r} but its sequence "
                             f"needs rows up to {wanted[-1]}; the records do not line up with the corpus")
        rows = rec[r] + wanted
        if part is not None:  # [rows, 2, k]: each row holds two lists
            two = offs[1][rows + 1] - offs[1][rows]
            if (two != 2).any():
                j = int(np.flatnonzero(two != 2)[0])
                raise StoreError(f"{where}: record {record} position {positions[j]}: {name!r} holds {two[j]} lists, "
                                 f"expected 2 "
                                 f"(logprobs, ids)")
            rows = offs[1][rows] + part
            inner = offs[2]
        else:
            inner = offs[1]
        n = inner[rows + 1] - inner[rows]
        if (n != k).any():
            j = int(np.flatnonzero(n != k)[0])
            raise StoreError(f"{where}: record {record} position {positions[j]} has {n[j]} entries in {name!r}, the "
                             f"first record {k}; every row needs the same top-k")
        return flat[inner[rows][:, None] + np.arange(k)]
    if batch.ids is None:
        return grab(batch.logprobs, cols.logprobs, 0), grab(batch.logprobs, cols.logprobs, 1)
    return grab(batch.logprobs, cols.logprobs, None), grab(batch.ids, cols.ids, None)


def _first_k(batch: _Batch, cols: Columns) -> int:
    """Entries in record 0's first row from ``cols.offset`` on that has any (a response-only record's
    prompt rows are null or padding)."""
    offs, _ = batch.logprobs
    for row in range(offs[0][0] + cols.offset, offs[0][1]):
        if cols.ids is None:
            sub = offs[1][row]
            n = int(offs[2][sub + 1] - offs[2][sub])
        else:
            n = int(offs[1][row + 1] - offs[1][row])
        if n:
            return n
    return 0


def check_rows(logprobs: np.ndarray, ids: np.ndarray, num_classes: int, tolerance: float = SUM_TOLERANCE) -> str | None:
    """What is wrong with the first bad row of ``logprobs``/``ids`` ``[rows, k]`` (as ``"row R: ..."``),
    or None: ids must be whole numbers in ``0..num_classes - 1``, distinct in a row; logprobs finite, with
    ``sum(exp)`` at most ``1 + tolerance``."""
    checks = []
    whole = ids == np.round(ids) if ids.dtype.kind == "f" else np.ones(ids.shape, bool)
    checks.append((~whole.all(-1), lambda r: f"token id {ids[r][~whole[r]][0]} is not a whole number"))
    out = (ids < 0) | (ids >= num_classes)
    checks.append((out.any(-1), lambda r: f"token id {int(ids[r][out[r]][0])} is outside the vocabulary "
                                          f"0..{num_classes - 1} of the corpus's tokenizer"))
    srt = np.sort(ids, axis=-1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(-1) if ids.shape[-1] > 1 else np.zeros(len(ids), bool)
    checks.append((dup, lambda r: "the same token id appears twice"))
    finite = np.isfinite(logprobs).all(-1)
    checks.append((~finite, lambda r: f"logprobs are not finite ({logprobs[r][~np.isfinite(logprobs[r])][0]})"))
    with np.errstate(over="ignore", invalid="ignore"):
        mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    high = finite & (mass > 1 + tolerance)
    checks.append((high, lambda r: f"the probabilities sum to {mass[r]:.4f}, above 1: these are not log-softmax "
                                   f"values at T=1 (raw logits?)"))
    bad = np.zeros(len(ids), bool)
    for b, _ in checks:
        bad |= b
    if not bad.any():
        return None
    r = int(np.flatnonzero(bad)[0])
    return f"row {r}: " + next(msg(r) for b, msg in checks if b[r])


# -- import ----------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    path: str
    records: int
    positions: int
    k: int
    seconds: float
    stream_seconds: float  # reading, checking and writing the records, after the corpus is tokenized
    bytes_on_disk: int
    tail_mean: float

    def lines(self) -> list[str]:
        rate = self.positions / self.stream_seconds if self.stream_seconds > 0 else float("nan")
        return [f"imported {self.records} records ({self.positions} positions, top-{self.k}) into {self.path} in "
                f"{self.seconds:.1f}s ({self.seconds - self.stream_seconds:.1f}s reading the corpus, then "
                f"{rate:,.0f} positions/s; {self.bytes_on_disk / max(1, self.positions):.0f} bytes per position on "
                f"disk); mean tail mass at T=1 {self.tail_mean:.4f}"]


def _relative(path: str, store: str) -> str:
    """``path`` relative to the directory holding ``store`` (as a manifest records paths)."""
    if "://" in path:
        return path
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(store)))


def _local(path: str, param: str) -> None:
    if "://" in path:
        raise ConfigError(f"{{param:{param}}} {path!r}: give a local path (copy the result to object storage "
                          f"afterwards)")


def _temporary(out: str) -> str:
    """A sibling of ``out`` with the same suffix, so the backend is the same and relative paths hold."""
    p = Path(out)
    return str(p.with_name(f".{p.stem}.partial-{os.getpid()}{p.suffix}"))


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def import_logprobs(src: str, dataset: str, out: str, columns: Columns, *, k: int | None = None,
                    dtype: str = "float16", approximate_temperatures: list[float] | None = None,
                    fmt: str | None = None, chunk_rows: int | None = None, split: str = "train",
                    overwrite: bool = False, tolerance: float = SUM_TOLERANCE, teacher: str | None = None,
                    batch_records: int = 64, progress: bool | None = None) -> ImportSummary:
    """Import the logprob dataset ``src`` (records aligned with the sequences of the ``hf-text:`` corpus
    ``dataset``) into a per-token top-k store at ``out``, streaming a batch of records at a time.

    The store is written beside ``out`` and moved there once every record passed its checks: a refused
    import leaves ``out`` as it was."""
    from kdcache.datasets import load_dataset, portable_spec
    from kdcache.store import Manifest, create_store, default_chunk_rows, detect_format
    from kdcache.store.format import sequence_lengths_digest
    from kdcache.text import is_sequence_dataset
    t0 = time.perf_counter()
    where = f"logprob dataset {src}"
    _local(out, "out")
    fmt = detect_format(out, fmt)
    if os.path.exists(out) and not overwrite:
        raise StoreError(f"{out} already exists; pass {{param:overwrite}} to replace it or choose another "
                         f"{{param:out}}")
    approx = sorted({float(t) for t in approximate_temperatures or []} - {1.0})
    if any(t <= 0 for t in approx):
        raise ConfigError(f"{{param:approximate_temperatures}} {approx}: give positive numbers")
    data = load_dataset(dataset)
    if not is_sequence_dataset(data.dataset) or not hasattr(data.dataset, "identity"):
        raise SpecError(f"dataset {dataset!r}: logprobs are imported against a tokenized corpus (hf-text:PATH,"
                        f"tokenizer=DIR,seq=N), the one the teacher scored")
    corpus = data.dataset
    described = data.describe()  # the corpus's fingerprint: work on the corpus, not on the logprobs
    t1 = time.perf_counter()
    records = open_records(src, split)
    n_seq = len(corpus)
    if len(records) != n_seq:
        first = min(len(records), n_seq)
        raise StoreError(f"{where} has {len(records)} records but corpus {dataset!r} has {n_seq} sequences, so "
                         f"record {first} has no partner; give the corpus (and seq=) the logprobs were computed on")
    lengths = np.asarray(corpus.lengths(np.arange(n_seq)), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    V = corpus.num_classes
    batches = _batches(records, columns, batch_records, where)
    head = next(batches)
    found_k = _first_k(head, columns)
    if found_k < 1:
        raise StoreError(f"{where}: record 0 has no logprobs at row {columns.offset}; check the preset's offset")
    keep = k or found_k
    if keep > found_k:
        raise ConfigError(f"{{param:k}} {keep} but {where} holds the top {found_k} per position")
    params = {"k": keep, "temperatures": sorted({1.0, *approx}), "logprobs": {"approximated": approx}}
    name = teacher or Path(src.rstrip("/")).name
    manifest = Manifest(
        num_samples=int(offsets[-1]), num_classes=V, num_members=1, dtype=dtype, chunk_rows=chunk_rows or 1,
        members=[{"name": f"0:{name}", "spec": f"logprobs:{_relative(src, out)}", "sha256": "0" * 64}],
        dataset={**described, "spec": portable_spec(data.spec, out), "subset": None},
        layout="topk", layout_params=params,
        sequences={"count": n_seq, "max_length": int(lengths.max()),
                   "lengths_sha256": sequence_lengths_digest(lengths)})
    if not chunk_rows:
        manifest.chunk_rows = default_chunk_rows(manifest.row_bytes(), manifest.num_samples)
    tmp = _temporary(out)
    _remove(tmp)
    store = create_store(tmp, manifest, fmt, sequence_index=(np.arange(n_seq, dtype=np.int64), offsets))
    bar = _progress(manifest.num_samples, progress, "import-logprobs")
    try:
        tail_sum = _fill(store, corpus, _chain(head, batches), columns, offsets, keep, found_k, approx,
                         tolerance, where, bar)
        # the teacher's identity is its outputs: the sha256 of the chunk digests, in chunk order
        store.manifest.members[0]["sha256"] = hashlib.sha256(store.digests().tobytes()).hexdigest()
        store.mark_complete()
        nbytes = store.nbytes_on_disk()
        store.close()
    except BaseException:
        store.close()
        _remove(tmp)
        raise
    finally:
        bar.close()
    old = f"{tmp}.replaced"
    if os.path.exists(out):  # moved aside, not deleted, until the new store is in place
        os.replace(out, old)
    os.replace(tmp, out)
    _remove(old)
    t2 = time.perf_counter()
    return ImportSummary(out, n_seq, manifest.num_samples, keep, t2 - t0, t2 - t1, nbytes,
                         tail_sum / max(1, manifest.num_samples))


def _chain(head: _Batch, rest: Iterator[_Batch]) -> Iterator[_Batch]:
    yield head
    yield from rest


def _fill(store: Any, corpus: Any, batches: Iterator[_Batch], cols: Columns, offsets: np.ndarray, k: int,
          found_k: int, approx: list[float], tolerance: float, where: str, bar: Any) -> float:
    """Check every record against its sequence and write the rows, a few chunks at a time. Returns the
    sum of the rows' tail mass at T = 1."""
    m = store.manifest
    flush = m.chunk_rows * max(1, (4 << 20) // max(1, m.chunk_rows * k * 8))
    pending: list[dict[str, np.ndarray]] = []
    held = written = record = 0
    tail_sum = 0.0
    for batch in batches:
        n = len(batch.tokens[0][0]) - 1
        idx = np.arange(record, record + n)
        lps, ids, seq, labels = [], [], [], []
        for r, (i, pos) in enumerate(zip(idx, row_positions(corpus, idx))):
            window = corpus.window(int(i))
            t_off, t_flat = batch.tokens
            tokens = t_flat[t_off[0][r]:t_off[0][r + 1]]
            _check_tokens(tokens, window, int(i), where)
            lp, tid = _rows(batch, cols, r, pos, found_k, where, int(i))
            problem = check_rows(lp, tid, m.num_classes, tolerance)
            if problem:
                row, _, why = problem.partition(": ")
                raise StoreError(f"{where}: record {i} position {pos[int(row.split()[1])]}: {why}; nothing was "
                                 f"written")
            lps.append(lp)
            ids.append(tid)
            seq.append(np.full(len(pos), i, dtype=np.int64))
            labels.append(window[pos + 1])
        lp, tid = np.concatenate(lps).astype(np.float64), np.concatenate(ids).astype(np.int64)
        order = np.argsort(-lp, axis=-1, kind="stable")[:, :k]  # largest first, as a dump keeps them
        values = np.take_along_axis(lp, order, -1).astype(m.dtype)
        kept_ids = np.take_along_axis(tid, order, -1).astype(np.int32)
        lse = np.zeros((len(values), len(m.layout_params["temperatures"])), dtype=np.float32)
        for j, t in enumerate(m.layout_params["temperatures"]):
            if t != 1.0:
                lse[:, j] = uniform_tail_log_normalizer(values, m.num_classes, t)
        tail_sum += float(np.clip(1 - np.exp(values.astype(np.float64)).sum(-1), 0, None).sum())
        pending.append({"topk_values": values[:, None], "topk_ids": kept_ids[:, None], "log_normalizers": lse[:, None],
                        "sample_ids": np.concatenate(seq), "labels": np.concatenate(labels)})
        held += len(values)
        record += n
        if held >= flush:
            written, held, pending = _write(store, pending, written, held, final=False)
        bar.update(len(values))
    _write(store, pending, written, held, final=True)
    return tail_sum


def _check_tokens(tokens: np.ndarray, window: np.ndarray, record: int, where: str) -> None:
    L = len(window) - 1
    n = min(len(tokens), len(window))
    same = tokens[:n] == window[:n]
    if len(tokens) not in (L, L + 1) or not same.all():
        at = int(np.flatnonzero(~same)[0]) if not same.all() else n
        found = f"token {int(tokens[at])}" if at < len(tokens) else "its end"
        want = f"token {int(window[at])}" if at < len(window) else "the window's end"
        raise StoreError(f"{where}: record {record} does not line up with corpus sequence {record}: at position {at} "
                         f"it has {found} where the corpus has {want} ({len(tokens)} tokens against {L + 1}); give "
                         f"the corpus, tokenizer and seq= the logprobs were computed on")


def _write(store: Any, pending: list[dict[str, np.ndarray]], written: int, held: int, final: bool
           ) -> tuple[int, int, list[dict[str, np.ndarray]]]:
    """Write the whole chunks held (all of them when ``final``); keep the rest."""
    cr = store.manifest.chunk_rows
    if not pending:
        return written, held, pending
    joined = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
    n = held if final else held // cr * cr
    if n:
        data = {name: joined[name][:n] for name in ("topk_values", "topk_ids", "log_normalizers")}
        store.write_block(written, data, joined["sample_ids"][:n], joined["labels"][:n])
    rest = {name: a[n:] for name, a in joined.items()}
    return written + n, held - n, [rest] if held - n else []


# -- export ----------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    path: str
    records: int
    positions: int
    seconds: float

    def lines(self) -> list[str]:
        return [f"exported {self.records} records ({self.positions} positions) to {self.path} in "
                f"{self.seconds:.1f}s"]


def export_logprobs(store: str, to: str, preset: str = "llamakd", *, fmt: str = "parquet", member: int | None = None,
                    dataset: str | None = None, overwrite: bool = False, batch_sequences: int = 256,
                    progress: bool | None = None) -> ExportSummary:
    """Write a per-token top-k store as a logprob dataset in ``preset``'s columns: ``to/data.parquet``
    (or ``data.jsonl``), one record per sequence in store order, logprobs float32 ``values - lse(T=1)``."""
    from kdcache.datasets import load_dataset, recorded_spec
    from kdcache.store import open_store
    t0 = time.perf_counter()
    cols = columns_for(preset)
    if fmt not in FORMATS:
        raise ConfigError(f"{{param:fmt}} {fmt!r}: use one of {', '.join(FORMATS)}")
    _local(to, "to")
    s = open_store(store)
    m = s.manifest
    p = m.layout_params
    if not m.per_token or not isinstance(m.store_layout, TopK):
        raise StoreError(f"{store} is a {m.layout} store with a row per "
                         f"{'position' if m.per_token else 'sample'}; logprob datasets come from per-token top-k "
                         f"stores (`kdcache convert --layout topk --k K --temperatures 1` "
                         f"makes one from a dense store)")
    if 1.0 not in p["temperatures"]:
        raise StoreError(f"{store}: its grid {p['temperatures']} lacks T=1, where logprobs are taken; re-dump or "
                         f"convert with 1 in {{param:temperatures}}")
    if member is None and m.num_members > 1:
        raise ConfigError(f"{store} holds {m.num_members} members; choose one with {{param:member}}")
    member = member or 0
    if not 0 <= member < m.num_members:
        raise ConfigError(f"{{param:member}} {member}: {store} has members 0..{m.num_members - 1}")
    spec = dataset or recorded_spec(m.dataset["spec"], store)
    data = load_dataset(spec)
    if data.fingerprint != m.dataset["fingerprint"]:
        raise StoreError(f"dataset {spec!r} is not the corpus {store} was dumped from (fingerprints differ); give "
                         f"{{param:dataset}} with the corpus and tokenizer of the dump")
    target = Path(to)
    out = target / f"data.{fmt}"
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass {{param:overwrite}} to replace it or choose another "
                         f"{{param:to}}")
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".data.partial-{os.getpid()}.{fmt}"
    seq_ids, _ = s.sequence_index()
    masked = getattr(data.dataset, "row_mask", None) is not None
    j1 = p["temperatures"].index(1.0)
    bar = _progress(m.num_samples, progress, "export-logprobs")
    writer = None
    try:
        with open(tmp, "wb") as fh:
            for a in range(0, len(seq_ids), batch_sequences):
                b = min(a + batch_sequences, len(seq_ids))
                blk = s.read_sequences(a, b)
                values = np.asarray(blk.data["topk_values"][:, member], dtype=np.float32)
                lse = np.asarray(blk.data["log_normalizers"][:, member, j1], dtype=np.float32)
                lp = values - lse[:, None]
                ids = np.asarray(blk.data["topk_ids"][:, member], dtype=np.int64)
                table = _table(cols, lp, ids, [data.dataset.window(int(i)) for i in seq_ids[a:b]],
                               row_positions(data.dataset, seq_ids[a:b]), masked)
                writer = _append(fh, table, fmt, writer)
                bar.update(len(lp))
            if writer is not None:
                writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        s.close()
    return ExportSummary(str(out), len(seq_ids), m.num_samples, time.perf_counter() - t0)


def _append(fh: Any, table: Any, fmt: str, writer: Any) -> Any:
    import json
    if fmt == "parquet":
        import pyarrow.parquet as pq
        writer = writer or pq.ParquetWriter(fh, table.schema)
        writer.write_table(table)
        return writer
    for row in table.to_pylist():
        fh.write((json.dumps(row, separators=(",", ":")) + "\n").encode())
    return None


def _table(cols: Columns, lp: np.ndarray, ids: np.ndarray, windows: list[np.ndarray], positions: list[np.ndarray],
           masked: bool = False) -> Any:
    """The records of a batch of sequences in ``cols``' layout: ``lp``/``ids`` ``[rows, k]`` in store
    order, ``windows`` each sequence's ``n + 1`` tokens and ``positions`` its positions with a store row
    (the others are written as padding: ``fill`` rows or nulls). ``masked``: the labels column holds
    -100 at the tokens no row predicts (a response-only chat store's prompt, as Axolotl masks it)."""
    import pyarrow as pa
    k = lp.shape[-1]
    tokens, rows_lp, rows_ids, valid, masks, labels = [], [], [], [], [], []
    at = 0
    for window, pos in zip(windows, positions):
        L = len(pos)
        t = window if cols.full_window else window[:-1]
        real = np.zeros(len(t), bool)
        real[pos + cols.offset] = True
        row_lp = np.full((len(t), k), PAD_LOGPROB, np.float32)
        row_ids = np.broadcast_to(np.arange(k, dtype=np.int64), (len(t), k)).copy()
        row_lp[real], row_ids[real] = lp[at:at + L], ids[at:at + L]
        rows_lp.append(row_lp)
        rows_ids.append(row_ids)
        valid.append(real)
        masks.append(real)
        tokens.append(t)
        if masked:
            target = np.zeros(len(t), bool)
            target[(pos + 1)[pos + 1 < len(t)]] = True
            labels.append(np.where(target, t, -100))
        else:
            labels.append(t)
        at += L
    counts = np.array([len(t) for t in tokens])
    rec_off = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    flat_lp, flat_ids = np.concatenate(rows_lp), np.concatenate(rows_ids)
    real = np.concatenate(valid)
    nrows = len(flat_lp)

    def per_row(values: np.ndarray, width: int, null_pad: bool) -> Any:
        off = np.arange(0, nrows * width + 1, width).astype(np.int32)
        mask = pa.array(~real) if null_pad else None
        return pa.ListArray.from_arrays(pa.array(off), pa.array(values.reshape(-1)), mask=mask)
    null_pad = cols.pad == "null"
    out = {cols.tokens: pa.ListArray.from_arrays(rec_off, pa.array(np.concatenate(tokens).astype(np.int64)))}
    if cols.ids is None:
        pairs = np.stack([flat_lp, flat_ids.astype(np.float32)], axis=1)  # [rows, 2, k]
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, nrows * 2 * k + 1, k).astype(np.int32)),
                                         pa.array(pairs.reshape(-1)))
        mid = pa.ListArray.from_arrays(pa.array(np.arange(0, nrows * 2 + 1, 2).astype(np.int32)), inner)
        out[cols.logprobs] = pa.ListArray.from_arrays(rec_off, mid)
    else:
        out[cols.ids] = pa.ListArray.from_arrays(rec_off, per_row(flat_ids, k, null_pad))
        out[cols.logprobs] = pa.ListArray.from_arrays(rec_off, per_row(flat_lp.astype(np.float32), k, null_pad))
    if cols.mask:
        mask_rows = np.repeat(np.concatenate(masks)[:, None], k, axis=1).astype(np.int64)
        out[cols.mask] = pa.ListArray.from_arrays(rec_off, per_row(mask_rows, k, False))
    if cols.labels:
        out[cols.labels] = pa.ListArray.from_arrays(rec_off, pa.array(np.concatenate(labels).astype(np.int64)))
    return pa.table(out)


def row_positions(corpus: Any, indices: np.ndarray) -> list[np.ndarray]:
    """Each sequence's positions that have a store row: ``0..n-1``, or those its dataset's ``row_mask``
    gives (an ``hf-chat:`` corpus's assistant positions)."""
    from kdcache.text import row_mask, widths
    width = int(widths(corpus, np.asarray(indices)).max()) if len(indices) else 0
    return [np.flatnonzero(m) for m in row_mask(corpus, np.asarray(indices), width).numpy()]


def _progress(total: int, show: bool | None, desc: str) -> Any:
    from kdcache.progress import progress_bar
    return progress_bar(total, show if show is not None else sys.stderr.isatty(), desc, "positions")


__all__ = ["Columns", "PRESETS", "columns_for", "import_logprobs", "export_logprobs", "check_rows",
           "check_temperatures", "uniform_tail_log_normalizer", "open_records", "ImportSummary", "ExportSummary"]
