"""kdcache: run the teacher once, cache its raw logits, distil any number of students from them.

The public API::

    from kdcache import open_store, DistillStream, distillation_loss, soft_targets, load_dataset
"""
from __future__ import annotations

from typing import Any

from kdcache._version import __version__
from kdcache.errors import ConfigError, KdcacheError, SpecError, StoreError
from kdcache.store import FORMAT_VERSION, LogitStore, Manifest, create_store, open_store

# Names that import torch are loaded on first use, so the CLI starts fast.
_LAZY = {
    "DistillStream": "kdcache.stream", "DatasetStream": "kdcache.stream", "check_pairing": "kdcache.stream",
    "distillation_loss": "kdcache.losses", "soft_targets": "kdcache.losses", "teacher_log_probs": "kdcache.losses",
    "load_dataset": "kdcache.datasets", "fingerprint": "kdcache.datasets",
    "load_model": "kdcache.specs", "save_checkpoint": "kdcache.specs",
    "DumpConfig": "kdcache.dump", "dump_logits": "kdcache.dump",
    "TrainConfig": "kdcache.train", "train_students": "kdcache.train",
    "SparseTargets": "kdcache.sparse", "open_xarray": "kdcache.xarray_view",
    "TextSequences": "kdcache.text", "is_sequence_dataset": "kdcache.text",
    "import_logprobs": "kdcache.logprobs", "export_logprobs": "kdcache.logprobs",
}

__all__ = ["__version__", "KdcacheError", "StoreError", "SpecError", "ConfigError", "FORMAT_VERSION",
           "LogitStore", "Manifest", "create_store", "open_store", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
