"""Stage two's input: the dataset, the stream over it (paired with a store, or plain), and what one
epoch must cover; with the checks that refuse, before training, what cannot be trained."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kdcache.datasets import ResolvedDataset, get_batch, load_dataset
from kdcache.errors import ConfigError
from kdcache.losses import teacher_log_probs
from kdcache.specs import load_model
from kdcache.store import open_store
from kdcache.stream import DatasetStream, DistillStream, check_pairing
from kdcache.subset import resolve_subset
from kdcache.text import is_sequence_dataset
from kdcache.train.config import TrainConfig
from kdcache.views import make_views


@dataclass
class TrainingData:
    """What the loop reads: ``stream`` yields the batches of one epoch; ``expected`` is (count, sum,
    sum of squares) of the sample ids it must see, to check coverage."""

    data: ResolvedDataset
    stream: Any
    num_classes: int
    per_token: bool
    expected: tuple[int, int, float]
    store_identity: dict[str, Any] | None
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None  # online: raw logits [B, members, C] of a batch


def open_training_data(c: TrainConfig, device: torch.device | None = None) -> TrainingData:
    """The dataset and its stream: paired with ``c.store`` (checked to be the store's data), or plain
    (augmented online with ``c.augment``; with an online teacher when ``c.teachers``)."""
    data = load_dataset(c.dataset, c.data_root)
    per_token = is_sequence_dataset(data.dataset)
    store_ident = None
    if c.store:
        store = open_store(c.store)
        check_pairing(store, data, c.dataset)
        if per_token != store.manifest.per_token:
            raise ConfigError(f"store {c.store!r} has a row per {'position' if store.manifest.per_token else 'sample'} "
                              f"but dataset {c.dataset!r} is {'a sequence' if per_token else 'not a sequence'} "
                              f"dataset; pass the dataset the store was dumped from")
        num_classes = store.num_classes
        _check_student_tokenizer(c.student, store.manifest.dataset, c.store)
        if c.members is not None:
            teacher_log_probs(torch.zeros(1, store.num_members, num_classes), 1.0, c.ensemble, c.members)
        if c.remote_cache:
            store.use_cache(c.remote_cache, c.remote_cache_size)
        stream: Any = DistillStream(store, data, c.batch_size, seed=c.data_seed, check=False, return_ids=True,
                                    allow_interpolation=c.allow_interpolation)
        _check_sparse_settings(store, c)
        if store.manifest.per_token:
            expected = _id_sums([store.sequence_index()[0]])
        else:  # an epoch reads every sample once (one view of each, in a store with views)
            n = store.manifest.samples_per_view
            skipped = np.asarray(store.manifest.skipped or [], dtype=np.int64)  # never trained on
            blocks = (store.read_index(a, min(a + (1 << 20), n))[0] for a in range(0, n, 1 << 20))
            expected = _id_sums(ids[~np.isin(ids, skipped)] for ids in blocks)
        store_ident = store_identity(c.store)
        return TrainingData(data, stream, num_classes, per_token, expected, store_ident)
    views = None
    if c.augment:
        if per_token:
            raise ConfigError(f"{{param:augment}} with dataset {c.dataset!r}: sequence datasets are not augmented")
        views = make_views(c.augment, c.views, c.augment_seed, data.input_shape, c.dataset, probe_inputs(data, 1),
                           data.dataset)
    rows, _ = resolve_subset(c.subset, data.dataset)
    stream = DatasetStream(data, c.batch_size, indices=rows, seed=c.data_seed, return_ids=True, views=views)
    teacher, ident = None, None
    if c.teachers:
        teacher, num_classes, ident = _online_teacher(c, data, device)
    elif data.num_classes is None:
        raise ConfigError(f"dataset {c.dataset!r} does not say its number of classes; train with a {{param:store}}")
    else:
        num_classes = data.num_classes
    if views is not None:
        ident = {**(ident or {}), "views": views.asdict()}
    return TrainingData(data, stream, num_classes, per_token, _id_sums([rows]), ident, teacher)


def _online_teacher(c: TrainConfig, data: ResolvedDataset, device: torch.device
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, dict[str, Any]]:
    """The teachers of online distillation, on ``device`` in eval mode, as one function of a batch."""
    from kdcache.specs import num_classes_of
    members = []
    for spec in c.teachers:
        m = load_model(spec, data.input_shape, data.num_classes)
        m.module.eval().to(device)
        members.append(m)
    num_classes = num_classes_of(members, data, device)
    modules = [m.module for m in members]

    def teacher(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.stack([mod(x) for mod in modules], dim=1).float()

    described = [{**m.describe(), "name": f"{i}:{m.name}"} for i, m in enumerate(members)]
    return teacher, num_classes, {"online_teachers": described, "members": described}


def _check_student_tokenizer(student: str, dataset: dict[str, Any], store: str) -> None:
    """A pretrained ``hf:`` student whose tokenizer is not the one the store's token ids came from is refused."""
    want = dataset.get("tokenizer")
    if want is None or not student.startswith("hf:"):
        return
    from kdcache.integrations.hf import load_tokenizer, model_tokenizer, tokenizer_identity
    path = model_tokenizer(student)
    if path is None:
        return  # built from a config: its vocabulary is the store's
    got = tokenizer_identity(load_tokenizer(path, student))
    if got["sha256"] != want["sha256"]:
        raise ConfigError(f"student {student!r} has tokenizer {got['name']} ({got['size']} tokens, sha256 "
                          f"{got['sha256'][:12]}) but store {store!r} holds ids of tokenizer {want['name']} "
                          f"({want['size']} tokens, sha256 {want['sha256'][:12]}); use a student with the teacher's "
                          f"tokenizer")


def probe_inputs(data: ResolvedDataset, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs of the dataset, to try a model on."""
    return get_batch(data.dataset, np.arange(min(n, len(data))))[0]


def _id_sums(id_blocks: Any) -> tuple[int, int, float]:
    """(count, sum, sum of squares) of the sample ids an epoch must see, read block by block."""
    n = total = 0
    squares = 0.0
    for ids in id_blocks:
        n += len(ids)
        total += int(ids.sum())
        squares += float((ids.astype(np.float64) ** 2).sum())
    return n, total, squares


def _check_sparse_settings(store: Any, c: TrainConfig) -> None:
    """Refuse, before training starts, what a sparse store cannot serve."""
    m = store.manifest
    layout = m.store_layout
    if layout.keeps_every_logit:
        return
    if "logit-mse" in c.losses:
        raise ConfigError(f"{{param:loss}} logit-mse matches every logit, and {c.store} is a {m.layout} store, "
                          f"which keeps "
                          f"only some of them; dump a dense store ({{param:layout}} dense) for it, or use "
                          f"{{param:loss}} kd")
    layout.check_serves(c.temperatures if any(a > 0 for a in c.alphas) else [], c.members, c.allow_interpolation,
                        m.num_members)


def check_student(model: nn.Module, data: ResolvedDataset, per_token: bool, spec: str, num_classes: int,
                   device: torch.device) -> None:
    """Refuse, before training, a student whose outputs do not fit the rows: ``[batch, classes]`` per
    sample, ``[batch, length, classes]`` per position of a sequence dataset."""
    x, _ = get_batch(data.dataset, np.arange(min(2, len(data))))
    was = model.training
    model.eval()
    hint = (" (a sequence dataset needs a model with an output per position, e.g. lstm:EMBED,HIDDEN)"
            if per_token else "")
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except Exception as e:
        raise ConfigError(f"student {spec!r} fails on the dataset's inputs {tuple(x.shape)} {x.dtype} "
                          f"({str(e).splitlines()[0]}){hint}") from None
    finally:
        model.train(was)
    want = (len(x), x.shape[1], num_classes) if per_token else (len(x), num_classes)
    if tuple(out.shape) != want:
        raise ConfigError(f"student {spec!r} returns shape {tuple(out.shape)} for inputs {tuple(x.shape)}; "
                          f"expected {want}{hint}")


def store_identity(path: str) -> dict[str, Any]:
    """What a run records of the store it learnt from (``store_identity`` in its config.json)."""
    s = open_store(path)
    m = s.manifest
    ident = {"path": path, "format": s.format, "format_version": m.format_version, "created_at": m.created_at,
             "num_samples": m.num_samples, "num_classes": m.num_classes, "dtype": m.dtype,
             "members": m.members, "dataset": m.dataset, "views": m.views}
    s.close()
    return ident
