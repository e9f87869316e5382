"""The small grammar shared by dataset and model specs: ``KIND:a,b,key=value`` options and
``package.module:callable`` references. Both kdcache.datasets and kdcache.specs read specs with it."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from kdcache.errors import SpecError


def parse_kv(text: str, positional: tuple[str, ...]) -> dict[str, str]:
    """``"100,dim=4"`` with positional ``("n",)`` -> ``{"n": "100", "dim": "4"}``."""
    out: dict[str, str] = {}
    for i, part in enumerate(p for p in text.split(",") if p):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        elif i < len(positional):
            out[positional[i]] = part.strip()
        else:
            raise SpecError(f"cannot read {part!r} in spec {text!r}")
    return out


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable named by ``package.module:attr`` (``attr`` may be dotted); one line when it is not."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"{what} spec {spec!r}: cannot import module {mod_name!r} ({e}); "
                        f"is it installed or on PYTHONPATH?") from None
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise SpecError(f"{what} spec {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise SpecError(f"{what} spec {spec!r}: {attr!r} is not callable")
    return obj
