"""Evaluation after each epoch: accuracy and errors on an eval dataset, perplexity on sequence data,
and agreement with the teacher where an eval store holds its logits."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.datasets import get_batch, load_dataset
from kdcache.errors import ConfigError
from kdcache.store import open_store
from kdcache.stream import check_pairing
from kdcache.text import is_sequence_dataset, row_mask, widths
from kdcache.train.config import TrainConfig


class Evaluator:
    """Accuracy and error count on an eval dataset, and agreement with the teacher where an eval store exists."""

    def __init__(self, cfg: TrainConfig, device: torch.device, by_class: bool = False) -> None:
        self.device = device
        self.by_class = by_class  # also errors and rows per class (sample datasets)
        self.data = load_dataset(cfg.eval_dataset, cfg.data_root) if cfg.eval_dataset else None
        self.teacher_pred = None
        if cfg.eval_store:
            if self.data is None:
                raise ConfigError("{param:eval_store} needs {param:eval_dataset}, the data it was dumped from")
            store = open_store(cfg.eval_store)
            check_pairing(store, self.data, cfg.eval_dataset)
            if store.manifest.per_token:  # teacher predictions by position, in dataset order
                from kdcache.stream import _rows_of
                lengths = np.asarray(self.data.dataset.lengths(np.arange(len(self.data))), dtype=np.int64)
                first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                ids, offsets = store.sequence_index()
                where = _rows_of(first[ids], np.diff(offsets))
                pred = np.full(int(lengths.sum()), -1, dtype=np.int64)
                for blk in store.iter_blocks():
                    pred[where[blk.start:blk.start + len(blk)]] = teacher_top1(store, blk, cfg.ensemble,
                                                                               cfg.members).numpy()
            else:
                pred = np.full(len(self.data), -1, dtype=np.int64)
                for blk in store.iter_blocks():
                    pred[blk.sample_ids] = teacher_top1(store, blk, cfg.ensemble, cfg.members).numpy()
            self.teacher_pred = torch.from_numpy(pred)
            store.close()

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch_size: int = 2048) -> dict[str, Any]:
        if self.data is None:
            return {}
        model.eval()
        n = len(self.data)
        per_token = is_sequence_dataset(self.data.dataset)
        if per_token:  # about 4096 positions a batch: their logits over a large vocabulary are what costs
            batch_size = max(1, 4096 // int(widths(self.data.dataset, np.arange(n)).max()))
        correct = agree = with_teacher = labelled = row = teacher_right = teacher_labelled = 0
        nll = 0.0
        classes = self.data.num_classes or 0
        wrong_by_class, rows_by_class = np.zeros(classes, dtype=np.int64), np.zeros(classes, dtype=np.int64)
        for a in range(0, n, batch_size):
            idx = np.arange(a, min(a + batch_size, n))
            x, y = get_batch(self.data.dataset, idx)
            logits = model(x.to(self.device))
            if per_token:
                mask = row_mask(self.data.dataset, idx, x.shape[1])
                logits, y = logits[mask.to(self.device)], y[mask]
                has_d = (y >= 0).to(self.device)
                nll += float(F.cross_entropy(logits[has_d].float(), y.to(self.device)[has_d], reduction="sum"))
            pred = logits.argmax(-1).cpu()
            has = y >= 0
            correct += int((pred[has] == y[has]).sum())
            labelled += int(has.sum())
            if self.by_class and not per_token:
                rows_by_class += np.bincount(y[has].numpy(), minlength=classes)[:classes]
                wrong_by_class += np.bincount(y[has][pred[has] != y[has]].numpy(), minlength=classes)[:classes]
            if self.teacher_pred is not None:
                t = self.teacher_pred[row:row + len(pred)] if per_token else self.teacher_pred[a:a + len(idx)]
                row += len(pred)
                ok = t >= 0
                agree += int((pred[ok] == t[ok]).sum())
                with_teacher += int(ok.sum())
                both = ok & has  # the teacher's (ensemble's) own errors on the labelled rows
                teacher_right += int((t[both] == y[both]).sum())
                teacher_labelled += int(both.sum())
        out: dict[str, Any] = {"eval_samples": labelled}
        if labelled:
            out.update(eval_accuracy=correct / labelled, eval_errors=labelled - correct)
            if per_token:
                out.update(eval_nll=nll / labelled, eval_perplexity=math.exp(min(nll / labelled, 700.0)))
        if with_teacher:
            out["teacher_agreement"] = agree / with_teacher
        if teacher_labelled:
            out.update(teacher_accuracy=teacher_right / teacher_labelled,
                       teacher_errors=teacher_labelled - teacher_right)
        if self.by_class and not per_token:
            out.update(errors_by_class=wrong_by_class.tolist(), samples_by_class=rows_by_class.tolist())
        return out


def teacher_top1(store: Any, blk: Any, ensemble: str, members: list[int] | None) -> torch.Tensor:
    """The teacher's (ensemble's) predicted class for each row of a block, for any layout."""
    m = store.manifest
    return m.store_layout.predicted({k: blk.data[k] for k in m.logit_arrays}, ensemble, members)


