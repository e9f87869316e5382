"""Vision at real scale: datasets of image files (``imagefolder:``, ``hf-image:``), views cut from each
original image, the preprocessing a model carries, and timm / torchvision / transformers image models.

torchvision, timm and Pillow are the ``[vision]`` extra: nothing here imports them before it needs them,
and :func:`require` says in one line what to install when they are missing.
"""
from __future__ import annotations

import importlib
from typing import Any

from kdcache.errors import SpecError

EXTRA = "pip install 'kdcache[vision]'"


def require(module: str, what: str) -> Any:
    """``module`` imported, or one line naming ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpecError(f"{what} needs {module.split('.')[0]}, which is not installed; {EXTRA}") from None
