"""``dense``: every raw logit of every member, ``logits [rows, members, classes]``."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from kdcache.layouts.base import Layout, register
from kdcache.losses import teacher_log_probs

ENTROPY_TEMPERATURES = (1.0, 2.0, 4.0, 10.0, 20.0)  # where ``inspect`` reports the soft targets' entropy


@register
class Dense(Layout):
    name = "dense"
    help = "dense: every logit"
    array_dims = {"logits": ("member", "class")}
    keeps_every_logit = True

    def row_arrays(self, members: int, dtype: str) -> dict[str, Any]:
        return {"logits": ((members, self.num_classes), dtype, 0)}

    def encode(self, chunk: int, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": z}

    def targets(self, data: dict[str, np.ndarray], allow_interpolation: bool = False, where: str = "store") -> Any:
        return torch.from_numpy(data["logits"].astype(np.float32))

    def predicted(self, data: dict[str, np.ndarray], ensemble: str = "mean-prob",
                  members: Sequence[int] | None = None) -> torch.Tensor:
        return teacher_log_probs(self.targets(data), 1.0, ensemble, members).argmax(-1)

    def top1(self, data: dict[str, np.ndarray]) -> np.ndarray:
        return data["logits"].astype(np.float32).argmax(-1)

    def ensemble_top1(self, data: dict[str, np.ndarray]) -> np.ndarray:
        return self.predicted(data).numpy()

    def statistics(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The entropy of the ensemble's soft targets (mean probability) at each of ENTROPY_TEMPERATURES."""
        z = self.targets(data)
        entropy = []
        for t in ENTROPY_TEMPERATURES:
            logp = teacher_log_probs(z, t).double()
            entropy.append(float(-(logp.exp() * logp).sum(-1).sum()))
        return {"mean_entropy": np.array(entropy)}

    def statistic_labels(self) -> dict[str, list[str]]:
        return {"mean_entropy": [f"T={t:g}" for t in ENTROPY_TEMPERATURES]}

    def live_pairs(self, stored: dict[str, np.ndarray], live: np.ndarray) -> list[tuple[Any, ...]]:
        return [("logits", stored["logits"].astype(np.float64), live.astype(np.float64), 0.0)]
