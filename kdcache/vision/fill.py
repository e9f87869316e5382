"""An image dataset spec completed with the preprocessing its models or its store say: what the user
left out is taken from the store's record (train-student: the teacher's input), else from the
teachers' own configuration, else from a student's checkpoint, else the defaults."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kdcache.spec_syntax import parse_kv
from kdcache.vision.preprocess import KEYS, Preprocess, from_model_config

IMAGE_KINDS = ("imagefolder", "hf-image")


def with_preprocess(dataset_spec: str | None, teachers: list[str] | None = None, store: str | None = None,
                    student: str | None = None) -> str | None:
    """An image dataset spec with every preprocessing key: the ones given, the rest from the first teacher
    that says (timm's ``pretrained_cfg``, a transformers image processor), else from the store's recorded
    spec, else from ``student``, else the defaults. Other specs are returned as they are."""
    if not dataset_spec or dataset_spec.partition(":")[0] not in IMAGE_KINDS:
        return dataset_spec
    given = {k for k in KEYS if f",{k}=" in dataset_spec}
    if given == set(KEYS):
        return dataset_spec
    base = _recorded_preprocess(store) if store else None
    if base is not None:
        asked = Preprocess.from_kv(_kv(dataset_spec), dataset_spec, base)
        differs = {k for k in given if getattr(asked, k) != getattr(base, k)}
        if differs:
            print(f"warning: dataset {dataset_spec!r} sets {', '.join(sorted(differs))} other than the teacher saw in "
                  f"store {store!r}; the student sees differently preprocessed images", file=sys.stderr)
    if base is None:
        for spec in [*(teachers or []), *([student] if student else [])]:
            cfg = _model_preprocess(spec)
            if cfg is not None:
                base = from_model_config(cfg)
                break
    base = base or Preprocess()
    kind, _, rest = dataset_spec.partition(":")
    kv = parse_kv(rest, ("path",))
    mine = Preprocess.from_kv({k: v for k, v in kv.items() if k in KEYS}, dataset_spec, base)
    others = ",".join(f"{k}={v}" for k, v in kv.items() if k not in KEYS and k != "path")
    return f"{kind}:{kv.get('path', '')}{',' + others if others else ''},{mine.spec_keys()}"


def _kv(spec: str) -> dict[str, str]:
    return {k: v for k, v in parse_kv(spec.partition(":")[2], ("path",)).items() if k in KEYS}


def _model_preprocess(spec: str) -> dict[str, Any] | None:
    """The preprocessing a model says it takes: a kdcache checkpoint's (what its student was trained on),
    else the model library's own."""
    path = Path(spec)
    path = path / "model.safetensors" if path.is_dir() else path
    if path.suffix == ".safetensors" and path.exists():  # what a student was trained on, if train-student wrote it
        from kdcache.checkpoint_header import read_checkpoint_meta
        recorded = read_checkpoint_meta(path).get("preprocess")
        if recorded:
            return recorded
    try:
        from kdcache.vision.models import model_preprocess
    except ImportError:
        return None
    return model_preprocess(spec)


def _recorded_preprocess(store: str) -> Preprocess | None:
    from kdcache.store import open_store
    s = open_store(store)
    try:
        rec = s.manifest.dataset.get("preprocess")
    finally:
        s.close()
    if not rec:
        return None
    return Preprocess(**{**rec, "mean": tuple(rec["mean"]), "std": tuple(rec["std"])})
