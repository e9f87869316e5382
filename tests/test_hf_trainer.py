"""``transformers.Trainer`` distilling from a store (``kdcache.integrations.hf_trainer``): a tiny Llama
teacher and tokenizer saved with ``save_pretrained``, real stores dumped by the CLI, real Trainers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdcache.errors import KdcacheError  # noqa: E402
from kdcache.integrations import hf_trainer as ht  # noqa: E402
from kdcache.losses import distillation_loss  # noqa: E402
from kdcache.specs import load_model  # noqa: E402
from kdcache.store import open_store  # noqa: E402
from kdcache.stream import DistillStream  # noqa: E402
from tests.conftest import ROOT, run_kdcache  # noqa: E402
from tests.test_hf import _save_model  # noqa: E402

STUDENT = "hf:llama,hidden=16,layers=1,heads=2"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("hft")
    texts = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if len(p.strip()) > 20]
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:40]))
    teacher = str(_save_model(d / "teacher", texts, 300))
    data = f"hf-text:{corpus},seq=16"
    stores = {}
    for layout, extra in (("dense", ["--dtype", "float32"]), ("topk", ["--layout", "topk", "--k", "8"])):
        stores[layout] = str(d / f"{layout}.zarr")
        run_kdcache("dump-logits", "--teacher", f"hf:{teacher}", "--dataset", data, *extra, "--out", stores[layout])
    return {"dir": d, "corpus": str(corpus), "teacher": teacher, "data": data, "texts": texts, **stores}


def _student(num_classes=300):
    return load_model(STUDENT, None, num_classes, seed=0).module.model  # train-student's student, seed 0


def _args(out, **kw):
    base = dict(output_dir=str(out), report_to="none", save_strategy="no", use_cpu=True, max_grad_norm=0.0,
                optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_store_order_is_train_students_order(lm):
    # small blocks and windows: several windows per epoch, and sequences carried from one to the next
    for epoch in (0, 1):
        stream = DistillStream(lm["dense"], None, 5, seed=3, block_rows=40, window_bytes=40 * 300 * 4 * 3,
                               return_ids=True)
        stream.set_epoch(epoch)
        want = [i for b in stream for i in b[-1].tolist()]
        assert stream.window_blocks < len(stream.blocks())
        order = ht.StoreOrder(lm["dense"], 5, seed=3, block_rows=40, window_bytes=40 * 300 * 4 * 3)
        order.set_epoch(epoch)
        assert list(order) == want and len(order) == len(want)
