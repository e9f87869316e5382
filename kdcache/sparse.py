"""Sparse layouts: top-k logits with exact per-row log-normalisers, and sampled ids (random-sampling KD).

Both keep temperature exact at load time: the full-vocabulary ``logsumexp(z / T)`` of every row is
computed at dump time, while all logits are in memory, for a declared grid of temperatures.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch

from kdcache.errors import KdcacheError

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)


def log_normalizers(z: torch.Tensor, temperatures: Sequence[float], block_rows: int = 32) -> torch.Tensor:
    """``logsumexp(z / T)`` over the last axis for every ``T`` of the grid: ``[..., len(temperatures)]``.

    Worked out a few rows at a time in one reused buffer, so the scaled copy stays in cache: on a CPU
    memory traffic, not arithmetic, is the cost (3-4x faster than scaling the whole array per T, for
    a 32,000-word vocabulary; the same numbers, row for row)."""
    flat = z.reshape(-1, z.shape[-1])
    out = torch.empty(flat.shape[0], len(temperatures), dtype=flat.dtype, device=flat.device)
    buf = torch.empty(min(block_rows, len(flat)), flat.shape[-1], dtype=flat.dtype, device=flat.device)
    for a in range(0, len(flat), block_rows):
        blk = flat[a:a + block_rows]
        scaled = buf[:len(blk)]
        for j, t in enumerate(temperatures):
            torch.div(blk, t, out=scaled)
            out[a:a + len(blk), j] = torch.logsumexp(scaled, dim=-1)
    return out.reshape(*z.shape[:-1], len(temperatures))


def topk_rows(logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> dict[str, np.ndarray]:
    """``logits [rows, members, classes]`` -> the top-k layout's arrays (values sorted, largest first)."""
    z = logits.float()
    values, ids = z.topk(k, dim=-1)
    lse = log_normalizers(z, temperatures)
    return {"topk_values": values.numpy(), "topk_ids": ids.to(torch.int32).numpy(), "log_normalizers": lse.numpy()}


def sampled_rows(logits: torch.Tensor, samples: int, sampling_temperature: float, temperatures: Sequence[float],
                 generator: torch.Generator) -> dict[str, np.ndarray]:
    """Draw ``samples`` ids per row from ``softmax(z / sampling_temperature)``; keep the distinct ids,
    their counts and raw logits (padding: id -1, count 0)."""
    z = logits.float()
    rows, members, classes = z.shape
    p = torch.softmax(z / sampling_temperature, dim=-1).reshape(-1, classes)
    draws = torch.multinomial(p, samples, replacement=True, generator=generator)
    ordered, _ = draws.sort(dim=-1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = first.long().cumsum(-1) - 1
    ids = torch.full_like(ordered, -1).scatter_(1, group, ordered)
    counts = torch.zeros_like(ordered).scatter_add_(1, group, torch.ones_like(ordered))
    values = z.reshape(-1, classes).gather(1, ids.clamp(min=0)) * (ids >= 0)
    lse = log_normalizers(z, temperatures)
    shape = (rows, members, samples)
    return {"sampled_ids": ids.to(torch.int32).reshape(shape).numpy(),
            "sampled_counts": counts.to(torch.int32).reshape(shape).numpy().astype(np.uint16),
            "sampled_values": values.reshape(shape).numpy(), "log_normalizers": lse.numpy()}


@dataclass
class SparseTargets:
    """A batch of sparse teacher targets, as the stream yields them in place of dense logits.

    ``ids``/``values``: ``[batch, members, K]``; ``log_normalizers``: ``[batch, members, G]`` for the
    store's ``temperatures``; ``counts``: draws per id (sampled layout only).
    """

    layout: str
    ids: torch.Tensor
    values: torch.Tensor
    log_normalizers: torch.Tensor
    temperatures: tuple[float, ...]
    counts: torch.Tensor | None = None
    sampling_temperature: float | None = None
    allow_interpolation: bool = False

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SparseTargets":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("ids", "values", "log_normalizers", "counts"):
            if kw[k] is not None:
                kw[k] = kw[k].to(device, non_blocking=non_blocking)
        return SparseTargets(**kw)

    def pin_memory(self) -> "SparseTargets":
        """Called by ``DataLoader(pin_memory=True)``: the tensors in page-locked host memory."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("ids", "values", "log_normalizers", "counts"):
            if kw[k] is not None:
                kw[k] = kw[k].pin_memory()
        return SparseTargets(**kw)

    def record_stream(self, stream: Any) -> None:
        for t in (self.ids, self.values, self.log_normalizers, self.counts):
            if t is not None:
                t.record_stream(stream)

    def __len__(self) -> int:
        return len(self.ids)

    def member(self, members: Sequence[int] | None) -> "SparseTargets":
        """The one member a sparse loss can use exactly (ensembles need dense logits)."""
        m = self.ids.shape[1]
        if members is None and m == 1:
            return self
        if members is None or len(members) != 1 or not 0 <= members[0] < m:
            raise KdcacheError(f"a {self.layout} store keeps each of its {m} members' own sparse logits; ensemble "
                               f"reductions need dense logits: pick one member with --members i (0..{m - 1}), "
                               f"or distil from a dense store")
        i = members[0]
        pick = lambda t: None if t is None else t[:, i:i + 1]  # noqa: E731
        return SparseTargets(self.layout, pick(self.ids), pick(self.values), pick(self.log_normalizers),
                             self.temperatures, pick(self.counts), self.sampling_temperature, self.allow_interpolation)

    def log_normalizer(self, temperature: float) -> torch.Tensor:
        """``logsumexp(z / T)`` ``[batch, members]``: exact on the grid; interpolated in 1/T between grid
        points only when ``allow_interpolation`` (refused otherwise)."""
        grid = self.temperatures
        for j, t in enumerate(grid):
            if abs(t - temperature) <= 1e-9 * max(1.0, t):
                return self.log_normalizers[..., j]
        if not self.allow_interpolation:
            raise KdcacheError(f"temperature {temperature:g} is not in the store's grid {list(grid)}, so its tail "
                               f"mass is not exact; use a grid temperature, re-dump with --temperatures including it, "
                               f"or allow interpolation (--allow-interpolation)")
        if not grid[0] < temperature < grid[-1]:
            raise KdcacheError(f"temperature {temperature:g} is outside the store's grid {grid[0]:g}..{grid[-1]:g}; "
                               f"interpolation does not extrapolate: re-dump with a wider --temperatures")
        j = next(i for i, t in enumerate(grid) if t > temperature)
        b0, b1, b = 1 / grid[j - 1], 1 / grid[j], 1 / temperature
        w = (b - b1) / (b0 - b1)
        return w * self.log_normalizers[..., j - 1] + (1 - w) * self.log_normalizers[..., j]

    def top1(self) -> torch.Tensor:
        """The teacher's predicted class per row and member ``[batch, members]``."""
        if self.layout == "topk":
            return self.ids[..., 0].long()
        v = self.values.masked_fill(self.ids < 0, float("-inf"))
        return self.ids.gather(-1, v.argmax(-1, keepdim=True))[..., 0].long()


def sparse_kl(student_logits: torch.Tensor, targets: SparseTargets, temperature: float) -> torch.Tensor:
    """``KL(p_T(teacher) || p_T(student))`` from sparse targets, averaged over the batch.

    top-k: the (k+1)-bucket KL (the kept classes and one tail bucket), exact at grid temperatures.
    sampled: the full KL estimated from the drawn ids, importance-weighted from the sampling
    temperature to T with self-normalised weights. At T equal to the sampling temperature the weights
    are the draw frequencies and the estimate is unbiased; at another T it is consistent (bias
    O(1/samples)) and, unlike plain importance weights, bounded: a rare draw cannot blow up a step.
    """
    t = targets
    s = student_logits.float() / temperature
    log_q = torch.log_softmax(s, dim=-1)
    ids = t.ids[:, 0].long()
    values = t.values[:, 0].float()
    lse = t.log_normalizer(temperature)[:, 0]
    if t.layout == "topk":
        logp = values / temperature - lse[:, None]
        p = logp.exp()
        logq_kept = log_q.gather(1, ids)
        if ids.shape[-1] >= s.shape[-1]:  # k = number of classes: every class is kept, the tail is empty
            return (p * (logp - logq_kept)).sum(-1).mean()
        # the kept mass can exceed 1 by rounding (fp16 values); clamp, the tail is then empty
        tail = (1 - p.sum(-1)).clamp(min=0)
        masked = s.scatter(1, ids, float("-inf"))
        logq_tail = torch.logsumexp(masked, dim=-1) - torch.logsumexp(s, dim=-1)
        kept = (p * (logp - logq_kept)).sum(-1)
        tail_term = torch.where(tail > 0, tail * (tail.clamp(min=1e-30).log() - logq_tail), torch.zeros_like(tail))
        return (kept + tail_term).mean()
    valid = ids >= 0
    counts = t.counts[:, 0].float()
    ts = t.sampling_temperature
    logp_t = values / temperature - lse[:, None]
    logp_s = values / ts - t.log_normalizer(ts)[:, 0][:, None]
    logw = torch.where(valid, (logp_t - logp_s) + counts.clamp(min=1).log(), torch.full_like(values, float("-inf")))
    w = torch.softmax(logw, dim=-1)  # c_i p_T(i)/p_Ts(i), normalised over the row's drawn ids
    logq = log_q.gather(1, ids.clamp(min=0))
    est = torch.where(valid, w * (logp_t - logq), torch.zeros_like(w)).sum(-1)
    return est.mean()


def targets_from_arrays(manifest: Any, data: dict[str, np.ndarray], allow_interpolation: bool = False,
                        where: str = "store") -> SparseTargets:
    """A sparse store's arrays (rows already selected) as :class:`SparseTargets` tensors; class ids
    out of range (a corrupt store) are refused."""
    p = manifest.layout_params
    prefix = "topk" if manifest.layout == "topk" else "sampled"
    raw = data[f"{prefix}_ids"]
    if len(raw) and (raw.max() >= manifest.num_classes or raw.min() < (0 if prefix == "topk" else -1)):
        from kdcache.errors import StoreError
        raise StoreError(f"{where}: {prefix}_ids holds class ids outside 0..{manifest.num_classes - 1}; the store is "
                         f"corrupt (`kdcache verify` names the chunks), re-dump it")
    ids = torch.from_numpy(raw.astype(np.int64))
    values = torch.from_numpy(data[f"{prefix}_values"].astype(np.float32))
    counts = torch.from_numpy(data["sampled_counts"].astype(np.int64)) if prefix == "sampled" else None
    return SparseTargets(manifest.layout, ids, values, torch.from_numpy(np.ascontiguousarray(data["log_normalizers"])),
                         tuple(p["temperatures"]), counts, p.get("sampling_temperature"), allow_interpolation)
