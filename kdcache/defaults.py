"""What a dataset spec leaves to its models or its store, filled in before the dataset is loaded: the
tokenizer of a text corpus, the preprocessing of an image dataset. Above kdcache.datasets and
kdcache.specs, so that filling from a model may build one."""
from __future__ import annotations

from typing import Any

from kdcache.datasets import with_tokenizer

IMAGE_KINDS = ("imagefolder", "hf-image")


def completed_spec(dataset_spec: str | None, teachers: list[str] | None = None, store: str | None = None,
                   student: str | None = None) -> Any:
    """A dataset spec with what it leaves to its models or its store filled in: the tokenizer of an
    ``hf-text:``/``hf-chat:`` corpus (:func:`with_tokenizer`), the preprocessing of an image dataset
    (:func:`kdcache.vision.fill.with_preprocess`). Other specs are returned as they are."""
    spec = with_tokenizer(dataset_spec, teachers, store)
    if spec and spec.partition(":")[0] in IMAGE_KINDS:
        from kdcache.vision.fill import with_preprocess
        spec = with_preprocess(spec, teachers, store, student)
    return spec
