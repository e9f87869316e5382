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
from kdcache.stream import DistillStream  # noqa: E402
from tests.conftest import ROOT, invoke_kdcache  # noqa: E402
from tests.test_hf import _save_model  # noqa: E402

STUDENT = "hf:llama,hidden=16,layers=1,heads=2"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("hft")
    texts = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if len(p.strip()) > 20]
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:12]))
    teacher = str(_save_model(d / "teacher", texts, 300))
    data = f"hf-text:{corpus},seq=16"
    stores = {}
    for layout, extra in (("dense", ["--dtype", "float32"]), ("topk", ["--layout", "topk", "--k", "8"]),
                          ("sampled", ["--layout", "sampled", "--samples", "16", "--sampling-temperature", "2"])):
        stores[layout] = str(d / f"{layout}.zarr")
        p = invoke_kdcache("dump-logits", "--teacher", f"hf:{teacher}", "--dataset", data, *extra, "--out",
                           stores[layout])
        assert p.returncode == 0, p.stderr
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


@pytest.mark.slow
@pytest.mark.parametrize("layout,batch,accumulate", [("dense", 8, 1), ("topk", 4, 2), ("sampled", 8, 1)])
def test_the_trainer_equals_train_student(lm, tmp_path, layout, batch, accumulate):
    """Two epochs, the same student, data, order (--data-seed) and settings: the same loss each epoch
    and the same final weights. Tolerance 1e-5 on the weights: the two compute the same sums in a
    different order (the Trainer's forward takes the attention mask; with accumulation each half batch
    is its own backward), float32 rounding that Adam carries over ~50 steps; measured 2.5e-7 (dense,
    one batch) and 1.5e-6 (top-k, two half batches)."""
    out = tmp_path / "ts"
    p = invoke_kdcache("train-student", "--dataset", lm["data"], "--store", lm[layout], "--student", STUDENT,
                       "--temperature", "2", "--alpha", "0.7", "--optimizer", "adam", "--lr", "0.003", "--schedule",
                       "constant", "--epochs", "2", "--batch-size", "8", "--data-seed", "3", "--out", str(out))
    assert p.returncode == 0, p.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    model = _student()
    args = _args(tmp_path / "trainer", learning_rate=0.003, num_train_epochs=2, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=accumulate, data_seed=3, logging_strategy="epoch")
    trainer = ht.DistillationTrainer(model=model, args=args, store=lm[layout], temperature=2, alpha=0.7)
    trainer.train()
    logged = [h["distill_loss"] for h in trainer.state.log_history if "distill_loss" in h]
    assert logged == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    from safetensors.torch import load_file
    want = load_file(out / "hf" / "model.safetensors")
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    assert any(not torch.equal(got[k], _student().state_dict()[k]) for k in want)  # it did train


def test_a_lora_student_trains_its_adapter_on_the_distillation_loss(lm, tmp_path):
    peft = pytest.importorskip("peft")
    base = _student()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = _args(tmp_path / "lora", learning_rate=0.01, max_steps=3, per_device_train_batch_size=4,
                 gradient_accumulation_steps=2, logging_steps=1, data_seed=1)
    trainer = ht.DistillationTrainer(model=model, args=args, store=lm["topk"], temperature=2, alpha=0.5)
    # the first optimizer step's loss (two micro-batches), from the untrained model (LoRA starts as the
    # identity) and the store's rows of those sequences
    it = iter(trainer.get_train_dataloader())
    micro = [next(it), next(it)]
    z, y, _ = trainer.teacher.rows(torch.cat([b["sample_id"] for b in micro]).numpy())
    with torch.no_grad():
        logits = []
        for b in micro:
            _, labels, n = trainer.teacher.rows(b["sample_id"].numpy())
            logits.append(base(input_ids=b["input_ids"]).logits[ht.position_mask(n, b["input_ids"], trainer.teacher,
                                                                                 labels)])
        logits = torch.cat(logits)
    want = float(distillation_loss(logits, z, y, 2.0, 0.5))
    ce_alone = float(distillation_loss(logits, None, y, 2.0, 0.0))
    trainer.train()
    first = next(h for h in trainer.state.log_history if "distill_loss" in h)
    assert first["distill_loss"] == pytest.approx(want, rel=1e-5) and abs(want - ce_alone) > 1e-3
    after = model.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora and any(not torch.equal(after[k], 0 * after[k]) for k in lora if "lora_B" in k)  # the adapter moved
    for k, v in before.items():  # the base did not
        key = next(a for a in after if a.endswith(k.replace(".weight", ".base_layer.weight")) or a.endswith(k))
        torch.testing.assert_close(after[key], v, rtol=0, atol=0)
    assert np.isfinite(trainer.evaluate(ht.StoreDataset(lm["topk"]))["eval_loss"])  # the model's own loss


class _NoIds(torch.utils.data.Dataset):
    def __init__(self, store, shift=0, drop=False):
        self.data, self.shift, self.drop = ht.StoreDataset(store), shift, drop

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = dict(self.data[i])
        if self.drop:
            item.pop("sample_id")
        else:
            item["sample_id"] = (item["sample_id"] + self.shift) % len(self.data)
        return item


def test_a_batch_without_sample_ids_is_one_line_and_writes_nothing(lm, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(KdcacheError) as e:
        ht.DistillationTrainer(model=_student(), args=_args(out), store=lm["dense"], train_dataset=_NoIds(lm["dense"],
                                                                                                         drop=True))
    assert "no 'sample_id'" in str(e.value) and "StoreDataset" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KdcacheError, match="no 'sample_id'"):
        ht.batch_ids({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    assert not out.exists()


def test_sample_ids_of_other_text_are_refused_before_a_step(lm, tmp_path):
    model = _student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "never"
    trainer = ht.DistillationTrainer(model=model, args=_args(out, max_steps=2), store=lm["dense"],
                                     train_dataset=_NoIds(lm["dense"], shift=1))
    with pytest.raises(KdcacheError) as e:
        trainer.train()
    assert "not the ones store" in str(e.value) and "\n" not in str(e.value)
    # nothing written (the Trainer itself makes its empty output directory when it is made), nothing changed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and not any(out.iterdir())


def test_another_tokenizer_corpus_or_vocabulary_is_refused(lm, tmp_path):
    other = _save_model(tmp_path / "other", lm["texts"][::-1], 280, seed=1)
    tok = transformers.AutoTokenizer.from_pretrained(other)
    with pytest.raises(KdcacheError, match="tokenizer other .* is not store") as e:
        ht.DistillationTrainer(model=_student(), args=_args(tmp_path / "a"), store=lm["dense"], processing_class=tok)
    assert "\n" not in str(e.value)
    with pytest.raises(KdcacheError, match="pass the dataset the store was dumped from"):
        ht.StoreDataset(lm["dense"], f"hf-text:{lm['corpus']},seq=12,tokenizer={lm['teacher']}")
    with pytest.raises(KdcacheError, match="student has 280 output classes"):
        ht.DistillationTrainer(model=_student(280), args=_args(tmp_path / "b"), store=lm["dense"])
    with pytest.raises(KdcacheError, match="not in the store's grid"):
        ht.DistillationTrainer(model=_student(), args=_args(tmp_path / "c"), store=lm["topk"], temperature=3)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_store_with_a_row_per_sample_is_refused(tmp_path):
    from kdcache.store import Manifest, create_store
    m = Manifest(num_samples=4, num_classes=3, num_members=1, dtype="float32", chunk_rows=4, compression="none",
                 members=[{"name": "t", "spec": "t", "sha256": "0" * 64}],
                 dataset={"spec": "x", "name": "x", "split": None, "length": 4, "fingerprint": "0", "subset": None})
    s = create_store(str(tmp_path / "rows.zarr"), m)
    s.write_block(0, np.zeros((4, 1, 3), np.float32), np.arange(4), np.zeros(4, np.int64))
    s.mark_complete()
    with pytest.raises(KdcacheError, match="has a row per sample") as e:
        ht.TeacherRows(str(tmp_path / "rows.zarr"))
    assert "\n" not in str(e.value)


def test_your_own_datasets_dataset_with_sample_ids_trains(lm, tmp_path):
    """A ``datasets.Dataset`` of your own: its extra columns are dropped by the Trainer, ``sample_id`` is
    kept; the Trainer's own random order (store_order=False) with accumulation."""
    import datasets
    mine = ht.StoreDataset(lm["dense"])
    order = np.random.default_rng(0).permutation(len(mine))[:40]
    table = datasets.Dataset.from_dict({"input_ids": [mine[int(i)]["input_ids"].tolist() for i in order],
                                        "sample_id": order.tolist(), "text": ["unused"] * len(order)})
    model = _student()
    args = _args(tmp_path / "own", max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                 logging_steps=2)
    trainer = ht.DistillationTrainer(model=model, args=args, store=lm["dense"], train_dataset=table,
                                     store_order=False, temperature=2, alpha=0.9)
    assert not isinstance(trainer._get_train_sampler(), ht.StoreOrder)
    trainer.train()
    logged = [h["distill_loss"] for h in trainer.state.log_history if "distill_loss" in h]
    assert len(logged) == 2 and all(np.isfinite(logged))


@pytest.mark.slow
def test_the_trainer_engine_is_train_student_through_the_trainer(lm, tmp_path):
    """`train-student --engine trainer`: the same student, optimizer, cosine lr per epoch and order as the
    default engine, so the same loss each epoch and the same weights (tolerance as above); the run
    directory is one `report` and `evaluate` read, with the eval perplexity of kdcache's evaluation."""
    common = ["train-student", "--dataset", lm["data"], "--store", lm["topk"], "--student", STUDENT, "--temperature",
              "2", "--alpha", "0.7", "--optimizer", "adam", "--lr", "0.003", "--epochs", "2", "--batch-size", "8",
              "--data-seed", "3", "--eval-dataset", lm["data"]]
    runs = {}
    for engine in ("kdcache", "trainer"):
        runs[engine] = tmp_path / engine
        p = invoke_kdcache(*common, "--engine", engine, "--out", str(runs[engine]))
        assert p.returncode == 0, p.stderr
    own, via = (json.loads((runs[e] / "metrics.json").read_text()) for e in ("kdcache", "trainer"))
    assert [m["loss"] for m in via] == pytest.approx([m["loss"] for m in own], rel=1e-6)
    assert [m["lr"] for m in via] == [m["lr"] for m in own] == [0.003, 0.0015]  # cosine, per epoch
    assert via[-1]["eval_perplexity"] == pytest.approx(own[-1]["eval_perplexity"], rel=1e-4)
    assert via[-1]["positions_seen"] == own[-1]["positions_seen"] and via[-1]["coverage_ok"]
    from safetensors.torch import load_file
    want, got = (load_file(runs[e] / "hf" / "model.safetensors") for e in ("kdcache", "trainer"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    assert json.loads((runs["trainer"] / "config.json").read_text())["engine"] == "trainer"
    report = invoke_kdcache("report", str(runs["kdcache"]), str(runs["trainer"]))
    assert report.returncode == 0 and report.stdout.count(STUDENT) == 2 and "perplexity" in report.stdout
    hf = runs["trainer"] / "hf"  # with the store's tokenizer beside the model
    ev = invoke_kdcache("evaluate", f"hf:{hf}", "--dataset", f"{lm['data']},tokenizer={hf}")
    assert ev.returncode == 0 and "errors of" in ev.stdout, ev.stderr


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "1,2"], "it trains one student, this sweep has 2"),
    (["--student", "mlp:32"], "it trains hf: students"),
    (["--store", None], "it distils from a per-token store: give --store"),
    (["--checkpoint-every", "5"], "it writes no checkpoints during the run"),
])
def test_what_the_trainer_engine_cannot_do_is_one_line_and_writes_nothing(lm, tmp_path, extra, message):
    args = {"--dataset": lm["data"], "--store": lm["topk"], "--student": STUDENT, "--temperature": "1",
            "--out": str(tmp_path / "run"), "--engine": "trainer"}
    args.update(dict(zip(extra[::2], extra[1::2])))
    if args["--store"] is None:
        del args["--store"], args["--temperature"]
    p = invoke_kdcache("train-student", *[w for k, v in args.items() for w in (k, v)])
    assert p.returncode == 1 and f"--engine trainer: {message}" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
