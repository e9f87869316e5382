"""What the sparse layouts (``topk``, ``sampled``) share: a grid of temperatures whose full-vocabulary
``logsumexp(z / T)`` is computed at dump time, while all logits are in memory, so that temperature stays
exact at load time; and :class:`SparseTargets`, the batch of sparse rows the loss takes."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from kdcache.errors import KdcacheError, SpecError, StoreError
from kdcache.layouts.base import Layout

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


def device_normalizers(z: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """:func:`log_normalizers` with blocks sized for ``z``'s device: all rows at once on a GPU."""
    return log_normalizers(z, temperatures, block_rows=max(1, z.numel() // z.shape[-1]) if z.is_cuda else 32)


def temperature_grid(temperatures: Sequence[float] | None) -> list[float]:
    return sorted(set(float(t) for t in (temperatures or DEFAULT_TEMPERATURES)))


@dataclass(frozen=True, kw_only=True)
class SparseLayout(Layout):
    """A layout keeping some ids per row and member, their raw logits, and exact normalisers on a grid."""

    prefix: ClassVar[str]       # the arrays are ``{prefix}_ids`` and ``{prefix}_values``
    lowest_id: ClassVar[int]    # ids below it are invalid (-1 pads the sampled layout)

    @classmethod
    def from_params(cls, params: dict[str, Any], num_classes: int) -> "Layout":
        layout = super().from_params(params, num_classes)
        t = params["temperatures"]
        if not t or any(not isinstance(x, (int, float)) or x <= 0 for x in t) or sorted(t) != list(t):
            raise StoreError(f"temperatures {t!r}: give an increasing list of positive numbers")
        return layout

    def targets(self, data: dict[str, np.ndarray], allow_interpolation: bool = False,
                where: str = "store") -> "SparseTargets":
        """The rows as :class:`SparseTargets` tensors; class ids out of range (a corrupt store) are refused."""
        raw = data[f"{self.prefix}_ids"]
        if len(raw) and (raw.max() >= self.num_classes or raw.min() < self.lowest_id):
            raise StoreError(f"{where}: {self.prefix}_ids holds class ids outside 0..{self.num_classes - 1}; the "
                             f"store is corrupt (`kdcache verify` names the chunks), re-dump it")
        ids = torch.from_numpy(raw.astype(np.int64))
        values = torch.from_numpy(data[f"{self.prefix}_values"].astype(np.float32))
        counts = torch.from_numpy(data["sampled_counts"].astype(np.int64)) if "sampled_counts" in data else None
        return SparseTargets(type(self), ids, values, torch.from_numpy(np.ascontiguousarray(data["log_normalizers"])),
                             tuple(self.temperatures), counts, getattr(self, "sampling_temperature", None),
                             allow_interpolation)

    def check_serves(self, temperatures: Sequence[float], members: Sequence[int] | None,
                     allow_interpolation: bool, num_members: int) -> None:
        empty = torch.zeros(1, num_members, 1)
        probe = SparseTargets(type(self), empty.long(), empty, torch.zeros(1, num_members, len(self.temperatures)),
                              tuple(self.temperatures), empty.long(), getattr(self, "sampling_temperature", None),
                              allow_interpolation)
        probe.member(members)
        for t in temperatures:
            probe.log_normalizer(t)

    def predicted(self, data: dict[str, np.ndarray], ensemble: str = "mean-prob",
                  members: Sequence[int] | None = None) -> torch.Tensor:
        return self.targets(data).member(members).top1()[:, 0]

    def bad_id_rows(self, data: dict[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
        name = f"{self.prefix}_ids"
        a = data[name]
        ok = (a < self.num_classes) & (a >= self.lowest_id)
        return name, ~ok.reshape(len(a), -1).all(axis=1)

    def top1(self, data: dict[str, np.ndarray]) -> np.ndarray:
        return self.targets(data).top1().numpy()

    def ensemble_top1(self, data: dict[str, np.ndarray]) -> np.ndarray:
        """One member: its top-1. Several: the argmax of the members' mean probability at T = 1 over the
        ids each keeps (the tails left out), which is not exact."""
        t = self.targets(data)
        if t.ids.shape[1] == 1:
            return t.top1()[:, 0].numpy()
        p = torch.exp(t.log_probs(1.0)) if 1.0 in t.temperatures else torch.softmax(t.values.float(), -1)
        mass = torch.zeros(len(t), self.num_classes).scatter_add_(1, t.ids.clamp(min=0).flatten(1),
                                                                 (p * (t.ids >= 0)).flatten(1))
        return mass.argmax(-1).numpy()

    def live_pairs(self, stored: dict[str, np.ndarray], live: np.ndarray) -> list[tuple[Any, ...]]:
        ids = stored[f"{self.prefix}_ids"].astype(np.int64)
        has = ids >= 0
        at = np.take_along_axis(live, np.clip(ids, 0, None), axis=-1)
        lse = log_normalizers(torch.from_numpy(live.astype(np.float64)), self.temperatures).numpy()
        return [(f"{self.prefix}_values", stored[f"{self.prefix}_values"][has].astype(np.float64),
                 at[has].astype(np.float64), 0.0),
                ("log_normalizers", stored["log_normalizers"].astype(np.float64), lse, 0.0)]

    @classmethod
    def kl(cls, student_logits: torch.Tensor, targets: "SparseTargets", temperature: float) -> torch.Tensor:
        """``KL(p_T(teacher) || p_T(student))`` from the rows, averaged over the batch."""
        raise NotImplementedError

    @classmethod
    def best(cls, targets: "SparseTargets") -> torch.Tensor:
        """The predicted class per row and member ``[batch, members]``."""
        raise NotImplementedError


def need(value: Any, option: str, layout: str, what: str) -> Any:
    if value is None:
        raise SpecError(f"layout {layout} needs {option}, {what}")
    return value


@dataclass
class SparseTargets:
    """A batch of sparse teacher targets, as the stream yields them in place of dense logits.

    ``layout``: the :class:`SparseLayout` class (or its name). ``ids``/``values``: ``[batch, members, K]``;
    ``log_normalizers``: ``[batch, members, G]`` for the store's ``temperatures``; ``counts``: draws per
    id (sampled layout only).
    """

    layout: Any
    ids: torch.Tensor
    values: torch.Tensor
    log_normalizers: torch.Tensor
    temperatures: tuple[float, ...]
    counts: torch.Tensor | None = None
    sampling_temperature: float | None = None
    allow_interpolation: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layout, str):
            from kdcache.layouts.base import layout_class
            self.layout = layout_class(self.layout)

    def _map(self, fn: Any) -> "SparseTargets":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("ids", "values", "log_normalizers", "counts"):
            if kw[k] is not None:
                kw[k] = fn(kw[k])
        return SparseTargets(**kw)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SparseTargets":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SparseTargets":
        """Called by ``DataLoader(pin_memory=True)``: the tensors in page-locked host memory."""
        return self._map(lambda t: t.pin_memory())

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
            raise KdcacheError(f"a {self.layout.name} store keeps each of its {m} members' own sparse logits; "
                               f"ensemble reductions need dense logits: pick one member with {{param:members}} i "
                               f"(0..{m - 1}), or distil from a dense store")
        i = members[0]
        return self._map(lambda t: t[:, i:i + 1])

    def log_normalizer(self, temperature: float) -> torch.Tensor:
        """``logsumexp(z / T)`` ``[batch, members]``: exact on the grid; interpolated in 1/T between grid
        points only when ``allow_interpolation`` (refused otherwise)."""
        grid = self.temperatures
        for j, t in enumerate(grid):
            if abs(t - temperature) <= 1e-9 * max(1.0, t):
                return self.log_normalizers[..., j]
        if not self.allow_interpolation:
            raise KdcacheError(f"temperature {temperature:g} is not in the store's grid {list(grid)}, so its tail "
                               f"mass is not exact; use a grid temperature, re-dump with {{param:temperatures}} "
                               f"including it, "
                               f"or allow interpolation ({{param:allow_interpolation}})")
        if not grid[0] < temperature < grid[-1]:
            raise KdcacheError(f"temperature {temperature:g} is outside the store's grid {grid[0]:g}..{grid[-1]:g}; "
                               f"interpolation does not extrapolate: re-dump with a wider {{param:temperatures}}")
        j = next(i for i, t in enumerate(grid) if t > temperature)
        b0, b1, b = 1 / grid[j - 1], 1 / grid[j], 1 / temperature
        w = (b - b1) / (b0 - b1)
        return w * self.log_normalizers[..., j - 1] + (1 - w) * self.log_normalizers[..., j]

    def log_probs(self, temperature: float) -> torch.Tensor:
        """``log p_T`` of the kept ids ``[batch, members, K]``: ``value / T - logsumexp(z / T)``, exact on
        the grid. The one place a sparse row is tempered."""
        return self.values.float() / temperature - self.log_normalizer(temperature)[..., None]

    def top1(self) -> torch.Tensor:
        """The teacher's predicted class per row and member ``[batch, members]``."""
        return self.layout.best(self)


def sparse_kl(student_logits: torch.Tensor, targets: SparseTargets, temperature: float) -> torch.Tensor:
    """``KL(p_T(teacher) || p_T(student))`` from sparse targets (one member), averaged over the batch."""
    return targets.layout.kl(student_logits, targets, temperature)
