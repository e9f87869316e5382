"""The sparse layouts' public names, kept where earlier releases had them: they live in
:mod:`kdcache.layouts` (``sparse``, ``topk``, ``sampled``)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from kdcache.layouts import layout_of
from kdcache.layouts.sampled import Sampled
from kdcache.layouts.sparse import DEFAULT_TEMPERATURES, SparseTargets, log_normalizers, sparse_kl
from kdcache.layouts.topk import TopK

__all__ = ["DEFAULT_TEMPERATURES", "SparseTargets", "log_normalizers", "sparse_kl", "topk_rows", "sampled_rows",
           "targets_from_arrays"]


def _numpy(arrays: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in arrays.items()}


def topk_rows(logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> dict[str, np.ndarray]:
    """``logits [rows, members, classes]`` -> the top-k layout's arrays (values sorted, largest first)."""
    return _numpy(TopK(num_classes=logits.shape[-1], k=k, temperatures=list(temperatures)).encode(0, logits))


def sampled_rows(logits: torch.Tensor, samples: int, sampling_temperature: float, temperatures: Sequence[float],
                 generator: torch.Generator) -> dict[str, np.ndarray]:
    """Draw ``samples`` ids per row from ``softmax(z / sampling_temperature)`` with ``generator``."""
    layout = Sampled(num_classes=logits.shape[-1], samples=samples, sampling_temperature=sampling_temperature,
                     temperatures=list(temperatures), seed=0)
    return _numpy(layout.encode_with(generator, logits))


def targets_from_arrays(manifest: Any, data: dict[str, np.ndarray], allow_interpolation: bool = False,
                        where: str = "store") -> SparseTargets:
    """A sparse store's arrays (rows already selected) as :class:`SparseTargets` tensors."""
    return layout_of(manifest).targets(data, allow_interpolation, where)
