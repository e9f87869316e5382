"""The header of a kdcache checkpoint: ``model.safetensors`` whose metadata key ``kdcache`` holds JSON
describing the architecture (``arch``, ``input_shape``, ``num_classes``) and how the weights were
trained. Low in the layers, so that code below kdcache.specs can read a checkpoint's header."""
from __future__ import annotations

import json
import os
from typing import Any

from kdcache.errors import SpecError

CHECKPOINT_NAME = "model.safetensors"
CHECKPOINT_KEY = "kdcache"


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise SpecError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as e:
        raise SpecError(f"{path} is not a readable safetensors file ({e})") from None
    if CHECKPOINT_KEY not in meta:
        raise SpecError(f"{path} has no kdcache header; it was not written by kdcache train-student, "
                        f"so its architecture is unknown: load it from your own package.module:callable")
    return json.loads(meta[CHECKPOINT_KEY])
