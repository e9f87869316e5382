"""Built-in reference models."""
from __future__ import annotations

import math

from torch import nn


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers with dropout, then a linear layer to the classes.

    ``MLP((28, 28), [1200, 1200], 10, dropout=0.5)`` is the paper's MNIST teacher.
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: list[int], num_classes: int,
                 dropout: float = 0.0, input_dropout: float = 0.0) -> None:
        super().__init__()
        # Dropout layers are always present (p may be 0) so that parameter names do not depend on it.
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
