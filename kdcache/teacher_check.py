"""``kdcache verify STORE --teacher SPEC``: re-run the live teacher on a random sample of a store's rows
(and views, replayed from their stored parameters) and compare with what the store holds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.datasets import get_batch, load_dataset, recorded_spec
from kdcache.distributed import resolve_device
from kdcache.errors import KdcacheError
from kdcache.specs import load_model
from kdcache.store import LogitStore, open_store
from kdcache.stream import check_pairing
from kdcache.text import row_mask

# Arithmetic slack beyond the store dtype's rounding, relative to 1 + |z|: the same teacher on another
# batch composition, thread count or BLAS path differs in the last float32 bits.
ARITHMETIC_SLACK = 1e-5
HALF_ULP = {"float16": 2.0 ** -11, "float32": 2.0 ** -24}


@dataclass
class TeacherCheck:
    """What ``verify --teacher`` found: rows compared, the largest difference from the stored logits and
    how far beyond the allowed rounding it is (0 when within), top-1 agreement per member."""

    path: str
    rows: int
    views: list[int]
    max_abs_diff: float
    max_excess: float
    top1_agreement: list[float]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        views = (f" (views {', '.join(map(str, self.views[:8]))}{' ...' if len(self.views) > 8 else ''})"
                 if self.views else "")
        agree = ", ".join(f"{a:.4f}" for a in self.top1_agreement)
        return (f"{self.path}: live teacher on {self.rows} rows{views}: largest difference {self.max_abs_diff:.3g} "
                f"from the stored logits, top-1 agreement {agree}")


def check_teacher(path: str, teachers: list[str], rows: int = 256, seed: int = 0, device: str = "auto",
                  data_root: str | None = None, batch_size: int = 256, slack: float = ARITHMETIC_SLACK) -> TeacherCheck:
    """Compare a store with its live teacher(s) on ``rows`` random written rows."""
    store = open_store(path, allow_partial=True)
    m = store.manifest
    if len(teachers) != m.num_members:
        raise KdcacheError(f"{path} holds {m.num_members} ensemble member(s), {len(teachers)} {{param:teacher}} "
                           f"given; give "
                           f"one per member, in order ({', '.join(mm['spec'] for mm in m.members)})")
    data = load_dataset(recorded_spec(m.dataset["spec"], path), data_root)
    check_pairing(store, data)
    dev = resolve_device(device)
    modules = []
    for i, (spec, member) in enumerate(zip(teachers, m.members)):
        t = load_model(spec, data.input_shape, data.num_classes)
        got = t.describe()["sha256"]
        if got != member["sha256"]:
            raise KdcacheError(f"teacher {spec!r} has weights sha256 {got[:16]}, but member {i} of {path} "
                               f"({member['spec']}) has {member['sha256'][:16]}: these are not the weights that "
                               f"wrote the store")
        modules.append(t.module.eval().to(dev))
    picked = _pick_rows(store, rows, seed)
    if not len(picked):
        raise KdcacheError(f"{path}: no chunk is written yet, nothing to compare")
    ulp = HALF_ULP[m.dtype]
    worst = excess = 0.0
    agree = np.zeros(m.num_members)
    n = 0
    augmenter = None
    if m.views is not None:
        from kdcache.views import ViewAugmenter, Views
        augmenter = ViewAugmenter(Views.from_manifest(m.views, path), path)
    for a in range(0, len(picked), batch_size):
        sel = picked[a:a + batch_size]
        stored, live = _stored_and_live(store, sel, data.dataset, modules, augmenter, dev)
        for _name, s_vals, l_vals, quantum in stored_pairs(m, stored, live):
            diff = np.abs(s_vals - l_vals)
            allowed = ulp * np.abs(s_vals) + quantum + slack * (1 + np.abs(l_vals))
            worst = max(worst, float(diff.max(initial=0)))
            excess = max(excess, float((diff - allowed).max(initial=0)))
        agree += _top1(m, stored, live)
        n += len(live)  # rows: samples, or positions of the sequences picked
    views = sorted(set((picked // m.samples_per_view).tolist())) if m.views is not None else []
    problems = []
    if excess > 0:
        problems.append(f"the live teacher differs from the stored logits by up to {worst:.3g}, beyond {m.dtype} "
                        f"rounding: the teacher, its inputs or the store changed since the dump")
    store.close()
    return TeacherCheck(path, n, views, worst, excess, (agree / n).tolist(), problems)


def _pick_rows(store: LogitStore, rows: int, seed: int) -> np.ndarray:
    """Up to ``rows`` random rows of written chunks, sorted (whole sequences' rows in a per-token store)."""
    m = store.manifest
    written = np.flatnonzero(store.written_chunks())
    rng = np.random.default_rng(seed)
    if m.per_token:
        ids, offsets = store.sequence_index()
        first_chunk = offsets[:-1] // m.chunk_rows
        last_chunk = (offsets[1:] - 1) // m.chunk_rows
        ok = np.isin(first_chunk, written) & np.isin(last_chunk, written)
        seqs = np.flatnonzero(ok)
        chosen = np.sort(rng.choice(seqs, size=min(len(seqs), max(1, rows // max(1, m.sequences["max_length"]))),
                                    replace=False)) if len(seqs) else seqs
        return chosen  # sequence numbers
    candidates = (np.concatenate([np.arange(*m.chunk_range(int(c))) for c in written]) if len(written)
                  else np.zeros(0, int))
    if m.skipped:  # rows whose inputs could not be read have nothing to compare
        ids = np.concatenate([store.read_index(*m.chunk_range(int(c)))[0] for c in written])
        candidates = candidates[~np.isin(ids, m.skipped)]
    return np.sort(rng.choice(candidates, size=min(rows, len(candidates)), replace=False))


def _stored_and_live(store: LogitStore, sel: np.ndarray, dataset: Any, modules: list[torch.nn.Module],
                     augmenter: Any, device: torch.device) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The stored arrays of the selected rows and the live teachers' logits ``[rows, members, classes]``."""
    m = store.manifest
    if m.per_token:
        ids, offsets = store.sequence_index()
        blocks = [store.read_sequences(int(s), int(s) + 1) for s in sel]
        data = {k: np.concatenate([b.data[k] for b in blocks]) for k in m.data_arrays}
        x, _ = get_batch(dataset, ids[sel])
        real = row_mask(dataset, ids[sel], x.shape[1])
        with torch.inference_mode():
            out = torch.stack([mod(x.to(device)) for mod in modules], dim=2)  # [B, L, members, C]
        return data, out[real.to(device)].float().cpu().numpy()
    blocks = [store.read(int(r), int(r) + 1) for r in sel]
    data = {k: np.concatenate([b.data[k] for b in blocks]) for k in m.data_arrays}
    sample_ids = np.concatenate([b.sample_ids for b in blocks])
    if augmenter is not None:
        x = augmenter.batch(dataset, sample_ids, params=data["view_params"])[0]
    else:
        x, _ = get_batch(dataset, sample_ids)
    with torch.inference_mode():
        out = torch.stack([mod(x.to(device)) for mod in modules], dim=1)
    return data, out.float().cpu().numpy()


def stored_pairs(m: Any, stored: dict[str, np.ndarray], live: np.ndarray) -> list[tuple[Any, ...]]:
    """(array, stored values, the live values they should equal, the layout's own rounding) for the
    layout's logit arrays."""
    return m.store_layout.live_pairs(stored, live)


def _top1(m: Any, stored: dict[str, np.ndarray], live: np.ndarray) -> np.ndarray:
    """Rows per member where the stored and the live argmax agree."""
    want = live.argmax(-1)
    got = m.store_layout.top1({k: stored[k] for k in m.logit_arrays})
    return (got == want).sum(0)
