"""Teachers and datasets the tests import by spec (``tests.helpers:slow_teacher``): real modules, no mocks."""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

SYNTH = "synthetic:n=2000,dim=16,classes=5"


class SlowLinear(nn.Module):
    """A seeded linear teacher; when KDCACHE_TEST_COUNTER is set, each batch sleeps and is counted in
    that file, so a test can kill the process mid-dump."""

    def __init__(self, dim: int = 16, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(dim, classes)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(classes, dim, generator=g))
            self.lin.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counter = os.environ.get("KDCACHE_TEST_COUNTER")
        if counter:
            time.sleep(float(os.environ.get("KDCACHE_TEST_DELAY", "0.05")))
            with open(counter, "a") as f:
                f.write(".")
        return self.lin(x)


class NaNTeacher(SlowLinear):
    """Returns NaN logits for inputs whose first feature is the largest of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        out[x[:, 0] == x[:, 0].max()] = float("nan")
        return out


def slow_teacher() -> nn.Module:
    return SlowLinear()


def other_teacher() -> nn.Module:
    return SlowLinear(seed=1)


def nan_teacher() -> nn.Module:
    return NaNTeacher()


def seven_class_teacher() -> nn.Module:
    return SlowLinear(classes=7)


class TupleFree(Dataset):
    """A user dataset yielding bare inputs (no labels), the unlabelled transfer-set case."""

    def __init__(self, n: int = 300) -> None:
        self.x = torch.from_numpy(np.random.default_rng(3).normal(size=(n, 16)).astype(np.float32))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def unlabelled_dataset() -> Dataset:
    return TupleFree()
