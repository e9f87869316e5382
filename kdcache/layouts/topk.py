"""``topk``: the k largest raw logits of each row and member, their ids, and the exact normalisers
``logsumexp(z / T)`` on a grid of temperatures, so the kept classes and the tail's total mass are exact."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kdcache.errors import ConfigError, SpecError, StoreError
from kdcache.layouts.base import register
from kdcache.layouts.sparse import SparseLayout, SparseTargets, device_normalizers, need, temperature_grid


@register
@dataclass(frozen=True, kw_only=True)
class TopK(SparseLayout):
    name = "topk"
    help = "topk: the k largest plus exact tail normalisers"
    array_dims = {"topk_values": ("member", "k"), "topk_ids": ("member", "k"),
                  "log_normalizers": ("member", "temperature")}
    options = ("k", "temperatures")
    encodes_on_device = True
    prefix = "topk"
    lowest_id = 0
    k: int
    temperatures: list[float]
    # imported logprobs (kdcache.logprobs): the values are log_softmax at T = 1, exact there; the grid's
    # other temperatures ("approximated") hold the uniform-tail approximation. None: raw logits.
    logprobs: dict[str, Any] | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any], num_classes: int) -> "TopK":
        lp = params.get("logprobs")
        layout = super().from_params({"logprobs": None, **params}, num_classes)
        if not (isinstance(layout.k, int) and 1 <= layout.k <= num_classes):
            raise StoreError(f"k={layout.k} but the teacher has {num_classes} classes; "
                             f"k must be between 1 and {num_classes}")
        if "logprobs" in params and (not isinstance(lp, dict) or set(lp) != {"approximated"}
                                     or sorted(set(lp["approximated"]) | {1.0}) != list(layout.temperatures)):
            raise StoreError(f"logprobs {lp!r}: give approximated, the grid temperatures other than 1")
        return layout

    def params(self) -> dict[str, Any]:
        p = super().params()
        if p["logprobs"] is None:  # a store of raw logits keeps the parameters it always had
            del p["logprobs"]
        return p

    def check_serves(self, temperatures: Sequence[float], members: Sequence[int] | None,
                     allow_interpolation: bool, num_members: int) -> None:
        if self.logprobs is not None:
            check_temperatures(self.temperatures, temperatures)
        super().check_serves(temperatures, members, allow_interpolation, num_members)

    @classmethod
    def from_options(cls, num_classes: int, options: dict[str, Any]) -> "TopK":
        cls.refuse_others(options)
        k = need(options.get("k"), "{param:k}", "topk", "the number of logits kept per row")
        if not 1 <= k <= num_classes:
            raise SpecError(f"{{param:k}} {k} but the teacher has {num_classes} classes; k must be between 1 and "
                            f"{num_classes}")
        return cls(num_classes=num_classes, k=k, temperatures=temperature_grid(options.get("temperatures")))

    def row_arrays(self, members: int, dtype: str) -> dict[str, Any]:
        return {"topk_values": ((members, self.k), dtype, 0), "topk_ids": ((members, self.k), "int32", -1),
                "log_normalizers": ((members, len(self.temperatures)), "float32", 0)}

    def encode(self, chunk: int, z: torch.Tensor) -> dict[str, torch.Tensor]:
        z = z.float()
        values, ids = z.topk(self.k, dim=-1)
        return {"topk_values": values, "topk_ids": ids.to(torch.int32),
                "log_normalizers": device_normalizers(z, self.temperatures)}

    def statistics(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tail's mass (outside the kept k, averaged over members) at each grid temperature."""
        t = self.targets(data)
        return {"mean_tail_mass": np.array([float((1 - t.log_probs(x).double().exp().sum(-1)).clamp(0, 1)
                                                  .mean(-1).sum()) for x in self.temperatures])}

    def statistic_labels(self) -> dict[str, list[str]]:
        return {"mean_tail_mass": [f"T={t:g}" for t in self.temperatures]}

    @classmethod
    def best(cls, targets: SparseTargets) -> torch.Tensor:
        return targets.ids[..., 0].long()

    @classmethod
    def kl(cls, student_logits: torch.Tensor, targets: SparseTargets, temperature: float) -> torch.Tensor:
        """The (k+1)-bucket KL (the kept classes and one tail bucket), exact at grid temperatures."""
        s = student_logits.float() / temperature
        log_q = torch.log_softmax(s, dim=-1)
        ids = targets.ids[:, 0].long()
        logp = targets.log_probs(temperature)[:, 0]
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


def check_temperatures(grid: list[float], temperatures: Sequence[float]) -> None:
    """Refuse, with one line, training from imported logprobs (a store of ``grid``) at another T."""
    for t in temperatures:
        if not any(abs(t - g) <= 1e-9 * max(1.0, g) for g in grid):
            raise ConfigError(f"the store holds imported logprobs, exact at T=1 only (the tail's shape is unknown), "
                              f"and temperature {t:g} is not in its grid {list(grid)}; train at {{param:temperature}} "
                              f"1, or re-import with {{param:approximate_temperatures}} {t:g} to accept the "
                              f"uniform-tail approximation")
