"""Teachers and datasets the tests import by spec (``tests.helpers:slow_teacher``): real modules, no mocks."""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

SYNTH = "synthetic:n=2000,dim=16,classes=5"


def _count_batch() -> None:
    """When KDCACHE_TEST_COUNTER is set: sleep, then count this batch in that file (a test kills the
    process once enough batches ran)."""
    counter = os.environ.get("KDCACHE_TEST_COUNTER")
    if counter:
        time.sleep(float(os.environ.get("KDCACHE_TEST_DELAY", "0.05")))
        with open(counter, "a") as f:
            f.write(".")


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
        _count_batch()
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


TOKEN_VOCAB = 200


def write_corpus(path, paragraphs: int = 400, types: int = 600, seed: int = 0) -> str:
    """A plain-text corpus with a Zipf-like long tail of word types and paragraphs of 2..90 words, so
    that sequences have many lengths (and batches padding). Returns the ``text:`` dataset spec."""
    g = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(types)]
    p = 1.0 / np.arange(1, types + 1)
    p /= p.sum()
    text = "\n\n".join(" ".join(words[i] for i in g.choice(types, size=int(g.integers(2, 91)), p=p))
                       for _ in range(paragraphs))
    with open(path, "w") as f:
        f.write(text)
    return f"text:{path},seq=24,vocab={TOKEN_VOCAB}"


class TokenTeacher(nn.Module):
    """A seeded sequence teacher: each position's logits come from its token and the one before, so a
    student that sees positions out of order cannot match it. Counts batches like SlowLinear."""

    def __init__(self, vocab: int = TOKEN_VOCAB, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.now = nn.Embedding(vocab, vocab)
        self.before = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.now.weight.copy_(3 * torch.randn(vocab, vocab, generator=g))
            self.before.weight.copy_(torch.randn(vocab, vocab, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _count_batch()
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return self.now(x) + self.before(prev)


def token_teacher() -> nn.Module:
    return TokenTeacher()


class _Counter(nn.Module):
    """Identity that counts each forward (see _count_batch): lets a test kill a training run mid-way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _count_batch()
        return x


def slow_mlp() -> nn.Module:
    """A student for 16-feature, 5-class data, counted per forward; not kdcache's own MLP, so a sweep of
    it stacks through torch.func vmap (it draws nothing: a module with dropout trains one by one)."""
    return nn.Sequential(_Counter(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))


def dropout_convnet() -> nn.Module:
    """small_convnet with dropout: a stack draws each student's masks from the student's own generator."""
    return nn.Sequential(nn.Unflatten(1, (1, 16)), nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(64, 5))


class _GaussianNoise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x) if self.training else x


def noisy_convnet() -> nn.Module:
    """small_convnet with Gaussian noise in training: vmap would draw every student's noise from one
    generator, so a sweep of it trains one by one."""
    return nn.Sequential(nn.Unflatten(1, (1, 16)), nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         _GaussianNoise(), nn.Linear(64, 5))


def small_convnet() -> nn.Module:
    """A student for 16-feature data through a 1-d convolution: stacks through vmap."""
    return nn.Sequential(nn.Unflatten(1, (1, 16)), nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 5))


def slow_mnist_mlp() -> nn.Module:
    """A 784-32-10 MNIST student with dropout, counted per forward (kill tests with --jitter)."""
    from kdcache.models import MLP
    return nn.Sequential(_Counter(), MLP((28, 28), [32], 10, dropout=0.3))


SEEN_INPUTS: list[torch.Tensor] = []  # what ImageTeacher was given, in order, when recording


class ImageTeacher(nn.Module):
    """A seeded linear teacher on 28x28 images (counted per batch like SlowLinear); with ``record`` it
    keeps every input batch it is given in SEEN_INPUTS, so a test can compare replayed views bit for bit."""

    def __init__(self, record: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(784, 10)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(10, 784, generator=g) * 0.1)
            self.lin.bias.copy_(torch.randn(10, generator=g))
        self.record = record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _count_batch()
        if self.record:
            SEEN_INPUTS.append(x.detach().clone())
        return self.lin(x.flatten(1))


def image_teacher() -> nn.Module:
    return ImageTeacher()


def recording_image_teacher() -> nn.Module:
    return ImageTeacher(record=True)


class Brightness:
    """A user augmentation through the documented protocol: multiply by a gain in [0.5, 1.5)."""

    columns = ("gain",)

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        return 0.5 + torch.rand(n, 1, generator=generator)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return x * params.view(-1, *([1] * (x.ndim - 1)))


def brightness() -> Brightness:
    return Brightness()


class _WrongWidth(Brightness):
    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(n, 3, generator=generator)


def wrong_width_augment() -> Brightness:
    return _WrongWidth()


class Overflowing(nn.Module):
    """A 16-feature, 5-class student whose logits overflow float32 from the start (non-finite at step 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * 1e39


def overflowing_student() -> nn.Module:
    return Overflowing()


class RGBTeacher(nn.Module):
    """A seeded small conv net on ``[B, 3, H, W]`` images of any size (global pooling); with ``record``
    it keeps every input batch in SEEN_INPUTS."""

    def __init__(self, record: bool = False, seed: int = 0, classes: int = 10) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, classes)
        self.record = record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record:
            SEEN_INPUTS.append(x.detach().clone())
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def rgb_teacher() -> nn.Module:
    return RGBTeacher()


def recording_rgb_teacher() -> nn.Module:
    return RGBTeacher(record=True)


def rgb_teacher_5() -> nn.Module:
    return RGBTeacher(classes=5)


def v2_color_jitter():
    """A torchvision v2 transform as a recorded augmentation (kdcache.vision.transforms)."""
    from torchvision.transforms import v2

    from kdcache.vision.transforms import recorded
    return recorded(v2.ColorJitter(0.4, 0.4, 0.4, 0.1))


def v2_flip():
    from torchvision.transforms import v2

    from kdcache.vision.transforms import recorded
    return recorded(v2.RandomHorizontalFlip())
