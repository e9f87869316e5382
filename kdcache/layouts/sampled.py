"""``sampled`` (random-sampling KD): ids drawn from the teacher's ``softmax(z / sampling_temperature)``,
with their draw counts and raw logits, and exact normalisers on a grid of temperatures."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdcache.errors import StoreError
from kdcache.layouts.base import register
from kdcache.layouts.sparse import SparseLayout, SparseTargets, log_normalizers, need, temperature_grid

SEED_STRIDE = 1_000_003  # chunk c of a store with seed s draws from torch.Generator().manual_seed(s * SEED_STRIDE + c)


@register
@dataclass(frozen=True, kw_only=True)
class Sampled(SparseLayout):
    name = "sampled"
    help = "sampled: ids drawn from the teacher (random-sampling KD)"
    array_dims = {"sampled_ids": ("member", "draw"), "sampled_counts": ("member", "draw"),
                  "sampled_values": ("member", "draw"), "log_normalizers": ("member", "temperature")}
    options = ("samples", "sampling_temperature", "temperatures")
    seeded_by_chunk = True
    prefix = "sampled"
    lowest_id = -1
    samples: int
    sampling_temperature: float
    temperatures: list[float]
    seed: int

    @classmethod
    def from_params(cls, params: dict[str, Any], num_classes: int) -> "Sampled":
        layout = super().from_params(params, num_classes)
        if not (isinstance(layout.samples, int) and 1 <= layout.samples <= 65535):
            raise StoreError(f"samples={layout.samples}: draw between 1 and 65535 ids per row")
        if not layout.sampling_temperature > 0:
            raise StoreError(f"sampling_temperature {layout.sampling_temperature} must be positive")
        return layout

    @classmethod
    def from_options(cls, num_classes: int, options: dict[str, Any]) -> "Sampled":
        cls.refuse_others(options)
        samples = need(options.get("samples"), "{param:samples}", "sampled", "the number of ids drawn per row")
        ts = float(1.0 if options.get("sampling_temperature") is None else options["sampling_temperature"])
        # the sampling temperature joins the grid: re-weighting to another T needs its normaliser
        return cls(num_classes=num_classes, samples=samples, sampling_temperature=ts,
                   temperatures=sorted(set(temperature_grid(options.get("temperatures"))) | {ts}),
                   seed=int(options.get("seed") or 0))

    def row_arrays(self, members: int, dtype: str) -> dict[str, Any]:
        s, g = self.samples, len(self.temperatures)
        return {"sampled_ids": ((members, s), "int32", -1), "sampled_counts": ((members, s), "uint16", 0),
                "sampled_values": ((members, s), dtype, 0), "log_normalizers": ((members, g), "float32", 0)}

    def encode(self, chunk: int, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Draw ``samples`` ids per row from ``softmax(z / sampling_temperature)``; keep the distinct ids,
        their counts and raw logits (padding: id -1, count 0). The rows are one chunk's, drawn on the CPU
        from a generator seeded by the chunk, so a resumed or multi-process dump draws the same."""
        return self.encode_with(torch.Generator().manual_seed(self.seed * SEED_STRIDE + chunk), z)

    def encode_with(self, g: torch.Generator, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`encode` drawing from the generator ``g``."""
        z = z.float().cpu()
        rows, members, classes = z.shape
        p = torch.softmax(z / self.sampling_temperature, dim=-1).reshape(-1, classes)
        draws = torch.multinomial(p, self.samples, replacement=True, generator=g)
        ordered, _ = draws.sort(dim=-1)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        group = first.long().cumsum(-1) - 1
        ids = torch.full_like(ordered, -1).scatter_(1, group, ordered)
        counts = torch.zeros_like(ordered).scatter_add_(1, group, torch.ones_like(ordered))
        values = z.reshape(-1, classes).gather(1, ids.clamp(min=0)) * (ids >= 0)
        shape = (rows, members, self.samples)
        return {"sampled_ids": ids.to(torch.int32).reshape(shape),
                "sampled_counts": counts.to(torch.int32).reshape(shape),
                "sampled_values": values.reshape(shape), "log_normalizers": log_normalizers(z, self.temperatures)}

    @classmethod
    def best(cls, targets: SparseTargets) -> torch.Tensor:
        v = targets.values.masked_fill(targets.ids < 0, float("-inf"))
        return targets.ids.gather(-1, v.argmax(-1, keepdim=True))[..., 0].long()

    @classmethod
    def kl(cls, student_logits: torch.Tensor, targets: SparseTargets, temperature: float) -> torch.Tensor:
        """The full KL estimated from the drawn ids, importance-weighted from the sampling temperature to T
        with self-normalised weights. At T equal to the sampling temperature the weights are the draw
        frequencies and the estimate is unbiased; at another T it is consistent (bias O(1/samples)) and,
        unlike plain importance weights, bounded: a rare draw cannot blow up a step."""
        t = targets
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        ids = t.ids[:, 0].long()
        valid = ids >= 0
        counts = t.counts[:, 0].float()
        logp_t = t.log_probs(temperature)[:, 0]
        logp_s = t.log_probs(t.sampling_temperature)[:, 0]
        logw = torch.where(valid, (logp_t - logp_s) + counts.clamp(min=1).log(),
                           torch.full_like(logp_t, float("-inf")))
        w = torch.softmax(logw, dim=-1)  # c_i p_T(i)/p_Ts(i), normalised over the row's drawn ids
        logq = log_q.gather(1, ids.clamp(min=0))
        return torch.where(valid, w * (logp_t - logq), torch.zeros_like(w)).sum(-1).mean()
