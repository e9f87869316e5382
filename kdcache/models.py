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


class LSTMTagger(nn.Module):
    """A token model: embedding, LSTM layers, a linear layer to the classes at every position.

    ``x [batch, length]`` int64 token ids -> ``[batch, length, classes]`` logits. Causal (one
    direction), so positions after a sequence's end (padding) cannot change its outputs. With
    ``vocab == num_classes`` and next-token labels it is a language model.
    """

    def __init__(self, vocab: int, embed: int, hidden: int, num_classes: int, layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        h, _ = self.lstm(self.drop(self.embed(x.long())))
        return self.out(self.drop(h))
