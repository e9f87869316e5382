"""A torchvision v2 transform as a kdcache augmentation whose drawn parameters are recorded.

A v2 transform draws its parameters in ``make_params`` (and, for the random-apply ones such as
``RandomHorizontalFlip``, whether to apply at all from ``torch.rand(1) < p``), then applies them in
``transform(inpt, params)``. :func:`recorded` splits it along that line, as kdcache's augmentation
protocol asks (kdcache/augment.py): ``sample`` runs the draws with torch's generator seeded from the
view's key and flattens the parameters into numbered columns; ``apply`` rebuilds them and calls
``transform``. So a store keeps the numbers (``brightness_factor``, ``fn_idx.0``..``fn_idx.3``,
``top``...), not a seed, and a view replays from them::

    # mymodule.py
    from torchvision.transforms import v2
    from kdcache.vision.transforms import recorded
    def jitter():
        return recorded(v2.ColorJitter(0.4, 0.4, 0.4), "jitter")

    kdcache dump-logits ... --dataset imagefolder:DIR --augment mymodule:jitter --views 8

On an image dataset it applies to the resized image in [0, 1], before normalisation. The columns are
those of a first draw on a probe image: a parameter that is None there stays None, and a transform
whose parameters change shape from draw to draw is refused.
"""
from __future__ import annotations

from typing import Any

import torch

from kdcache.errors import SpecError
from kdcache.vision import require

APPLIED = "applied"


class Recorded:
    """``transform`` (a torchvision v2 transform) under kdcache's augmentation protocol."""

    def __init__(self, transform: Any, name: str) -> None:
        v2 = require("torchvision.transforms.v2", "recorded transforms")
        if not isinstance(transform, v2.Transform):
            raise SpecError(f"recorded({type(transform).__name__}): give a torchvision.transforms.v2 transform")
        self.transform, self.name = transform, name
        self._random_apply = hasattr(transform, "p") and type(transform).forward is not v2.Transform.forward
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            probe = transform.make_params([torch.zeros(3, 32, 32)])
        self._schema = {k: _width(v) for k, v in probe.items()}
        self._kinds = {k: _kind(v) for k, v in probe.items()}
        self.columns = ((APPLIED,) if self._random_apply else ()) + tuple(
            k if w == 1 else f"{k}.{j}" for k, w in self._schema.items() if w for j in range(w))

    def __repr__(self) -> str:
        return f"recorded({self.name})"

    def sample(self, generator: torch.Generator, n: int, item_shape: tuple[int, ...]) -> torch.Tensor:
        rows = []
        for _ in range(n):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
                applied = [float(torch.rand(1) < self.transform.p)] if self._random_apply else []
                params = self.transform.make_params([torch.zeros(item_shape)])
            rows.append(applied + self._flatten(params))
        return torch.tensor(rows, dtype=torch.float32).reshape(n, len(self.columns))

    def _flatten(self, params: dict[str, Any]) -> list[float]:
        out: list[float] = []
        for k, w in self._schema.items():
            v = params.get(k)
            if w == 0:
                if v is not None:
                    raise SpecError(f"{self!r}: parameter {k!r} was None in the first draw and is {v!r} now; a "
                                    f"recorded transform needs parameters of one shape")
                continue
            vals = torch.as_tensor(v, dtype=torch.float64).flatten().tolist()
            if len(vals) != w:
                raise SpecError(f"{self!r}: parameter {k!r} has {len(vals)} values, {w} in the first draw")
            out += vals
        return out

    def _params(self, row: list[float]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        a = 1 if self._random_apply else 0
        for k, w in self._schema.items():
            kind = self._kinds[k]
            vals = row[a:a + w]
            a += w
            if w == 0:
                params[k] = None
            elif kind == "tensor":
                params[k] = torch.tensor([int(v) for v in vals])
            elif kind == "list":
                params[k] = [int(v) if float(v).is_integer() else v for v in vals]
            elif kind == "bool":
                params[k] = bool(vals[0])
            elif kind == "int":
                params[k] = int(vals[0])
            else:
                params[k] = vals[0]
        return params

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        out = []
        for xi, row in zip(x, params.double().tolist()):
            if self._random_apply and row[0] < 0.5:
                out.append(xi)
            else:
                out.append(self.transform.transform(xi, self._params(row)))
        return torch.stack(out)


def _width(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, (bool, int, float)):
        return 1
    return int(torch.as_tensor(v).numel())


def _kind(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "tensor"
    if isinstance(v, (list, tuple)):
        return "list"
    return "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float"


def recorded(transform: Any, name: str | None = None) -> Recorded:
    """``transform`` as a kdcache augmentation whose drawn parameters are recorded (see the module)."""
    return Recorded(transform, name or type(transform).__name__)
