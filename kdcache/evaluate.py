"""``kdcache evaluate``: any model (a kdcache checkpoint, TorchScript, ``torch.export``, ``hf:``) on any
dataset: test errors and accuracy, errors per class, agreement with a teacher's eval store, and
per-class logit biases.

A bias raises one class's logit by a constant before the argmax: the correction Hinton, Vinyals and
Dean (2015, section 3) apply to a student distilled from a transfer set that holds no example of a
class. ``C=auto`` picks the constant on held-out data (``tune_dataset``): the value of a grid that
makes the fewest errors there, the smallest such value on ties.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcache.errors import ConfigError

BIAS_GRID = np.round(np.arange(0.0, 12.0001, 0.1), 4)


@dataclass
class EvalConfig:
    model: str
    dataset: str
    eval_store: str | None = None
    class_bias: list[str] = field(default_factory=list)   # "C=B" or "C=auto"
    tune_dataset: str | None = None                       # held-out data for C=auto
    tune_subset: str | None = None                        # rows of tune_dataset
    ensemble: str = "mean-prob"
    members: list[int] | None = None
    batch_size: int = 2048
    device: str = "auto"
    data_root: str | None = None
    json_path: str | None = None                          # also write the results here as JSON


class Biased(nn.Module):
    """``model``'s logits plus a constant per class."""

    def __init__(self, model: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.bias.to(x.device)


def parse_class_bias(items: list[str], num_classes: int) -> tuple[dict[int, float], list[int]]:
    """``["3=3.5", "7=auto"]`` -> ({3: 3.5}, [7]), each class checked against ``num_classes``."""
    fixed: dict[int, float] = {}
    auto: list[int] = []
    for item in items:
        c, eq, b = item.partition("=")
        try:
            cls = int(c)
            if not eq:
                raise ValueError
            if b.strip() == "auto":
                auto.append(cls)
            else:
                fixed[cls] = float(b)
        except ValueError:
            raise ConfigError(f"{{param:class_bias}} {item!r}: expected CLASS=BIAS or CLASS=auto, e.g. 3=3.5") from None
        if not 0 <= cls < num_classes:
            raise ConfigError(f"{{param:class_bias}} {item!r}: class {cls} is outside 0..{num_classes - 1}")
    return fixed, auto


@torch.no_grad()
def _logits(model: nn.Module, dataset: Any, rows: np.ndarray, device: torch.device, batch_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    from kdcache.datasets import get_batch
    zs, ys = [], []
    for a in range(0, len(rows), batch_size):
        x, y = get_batch(dataset, rows[a:a + batch_size])
        zs.append(model(x.to(device)).float().cpu())
        ys.append(y)
    return torch.cat(zs), torch.cat(ys)


def tune_bias(model: nn.Module, bias: torch.Tensor, cls: int, dataset: Any, rows: np.ndarray, device: torch.device,
              batch_size: int) -> dict[str, Any]:
    """The grid value of class ``cls``'s bias (others as in ``bias``) with the fewest errors on ``rows``."""
    z, y = _logits(model, dataset, rows, device, batch_size)
    z = z + bias
    errors = []
    for b in BIAS_GRID:
        zb = z.clone()
        zb[:, cls] += float(b)
        errors.append(int((zb.argmax(-1) != y).sum()))
    best = int(np.argmin(errors))
    return {"class": cls, "bias": float(BIAS_GRID[best]), "tune_errors": errors[best], "tune_errors_at_0": errors[0],
            "tune_samples": len(rows), "grid": [float(BIAS_GRID[0]), float(BIAS_GRID[-1]), 0.1]}


def evaluate(c: EvalConfig) -> dict[str, Any]:
    """Errors, accuracy, errors per class (and agreement with ``eval_store``) of ``c.model`` on
    ``c.dataset``, with the class biases applied; a dict ready for JSON."""
    from kdcache.datasets import load_dataset
    from kdcache.defaults import completed_spec
    from kdcache.distributed import resolve_device
    from kdcache.specs import load_model
    from kdcache.subset import resolve_subset
    from kdcache.train.config import TrainConfig
    from kdcache.train.epoch_eval import Evaluator
    device = resolve_device(c.device)
    c = dataclasses.replace(c, dataset=completed_spec(c.dataset, student=c.model),  # the student's preprocessing
                            tune_dataset=completed_spec(c.tune_dataset, student=c.model))
    data = load_dataset(c.dataset, c.data_root)
    model = load_model(c.model, data.input_shape, data.num_classes).module.to(device).eval()
    if data.num_classes is None:
        raise ConfigError(f"dataset {c.dataset!r} does not say how many classes it has")
    fixed, auto = parse_class_bias(c.class_bias, data.num_classes)
    if auto and not c.tune_dataset:
        raise ConfigError("{param:class_bias} C=auto chooses the bias on held-out data: give {param:tune_dataset} (and "
                          "{param:tune_subset}), labelled rows the student did not train on")
    bias = torch.zeros(data.num_classes)
    for cls, b in fixed.items():
        bias[cls] = b
    tuned = []
    if auto:
        tune = load_dataset(c.tune_dataset, c.data_root)
        rows, _ = resolve_subset(c.tune_subset, tune.dataset)
        for cls in auto:
            tuned.append(tune_bias(model, bias, cls, tune.dataset, rows, device, c.batch_size))
            bias[cls] = tuned[-1]["bias"]
    cfg = TrainConfig(dataset=c.dataset, student=c.model, out="", eval_dataset=c.dataset, eval_store=c.eval_store,
                      ensemble=c.ensemble, members=c.members, data_root=c.data_root)
    evaluator = Evaluator(cfg, device, by_class=True)
    out: dict[str, Any] = {"model": c.model, "dataset": c.dataset, "eval_store": c.eval_store,
                           "class_bias": {str(i): float(b) for i, b in enumerate(bias.tolist()) if b != 0}}
    if tuned:
        out["tuned"] = tuned
    out.update(evaluator(Biased(model, bias.to(device)) if bias.any() else model, c.batch_size))
    return out
