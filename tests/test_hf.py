"""Hugging Face teachers and students (``hf:``) and corpora (``hf-text:``): a tiny Llama-style model and a
tokenizer trained with ``tokenizers`` on local text, saved with ``save_pretrained`` (no network)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdcache.datasets import load_dataset  # noqa: E402
from kdcache.errors import SpecError  # noqa: E402
from kdcache.specs import load_model  # noqa: E402
from kdcache.store import open_store  # noqa: E402
from tests.conftest import DATA_ROOT, ROOT, TORCHRUN_2, TORCHRUN_THREADS, kill_when, run_kdcache  # noqa: E402


def _save_model(directory, texts, vocab, seed=0, context=64):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                                      pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    texts = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if len(p.strip()) > 20]
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts[:60])))
    return {"dir": d, "corpus": str(corpus), "teacher": str(_save_model(d / "teacher", texts, 300)),
            "other": str(_save_model(d / "other", texts[::-1], 280, seed=1))}


def _data(hf, seq=24):
    return f"hf-text:{hf['corpus']},seq={seq},tokenizer={hf['teacher']}"


@pytest.mark.parametrize("layout", ["dense", "topk"])
def test_rows_are_the_models_own_logits_at_real_positions(hf, tmp_path, layout):
    out = str(tmp_path / f"{layout}.zarr")
    extra = ["--layout", "topk", "--k", "5"] if layout == "topk" else []
    # no tokenizer= in the spec: the one saved beside the teacher
    run_kdcache("dump-logits", "--teacher", f"hf:{hf['teacher']}", "--dataset", f"hf-text:{hf['corpus']},seq=24",
                "--dtype", "float32", *extra, "--out", out)
    s = open_store(out)
    m = s.manifest
    # portable: the corpus and the tokenizer beside the teacher, relative to the store's directory
    assert m.per_token and m.num_classes == 300 and m.dataset["spec"] == "hf-text:../hf0/corpus.jsonl,seq=24," \
        "tokenizer=../hf0/teacher".replace("hf0", os.path.basename(hf["dir"]))
    assert m.dataset["tokenizer"]["name"] == "teacher" and str(tmp_path) not in json.dumps(m.dataset)
    assert m.dataset["tokenizer"]["size"] == 300 and len(m.dataset["tokenizer"]["sha256"]) == 64
    from kdcache.datasets import recorded_spec
    data = load_dataset(recorded_spec(m.dataset["spec"], out)).dataset
    ids, offsets = s.sequence_index()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf["teacher"]).eval()
    first = slice(0, 40)
    x, y = data.get_batch(ids[first])
    mask = torch.arange(x.shape[1])[None, :] < torch.from_numpy(data.lengths(ids[first]))[:, None]
    with torch.no_grad():
        z = model(input_ids=x).logits[mask].numpy()
    block = s.read(0, int(offsets[40]))
    np.testing.assert_array_equal(block.labels, y[mask].numpy())
    if layout == "dense":
        np.testing.assert_allclose(block.logits[:, 0], z, rtol=0, atol=1e-4)
    else:
        top = torch.from_numpy(z).topk(5, dim=-1)
        np.testing.assert_array_equal(block.data["topk_ids"][:, 0], top.indices.numpy())
        np.testing.assert_allclose(block.data["topk_values"][:, 0], top.values.numpy(), rtol=0, atol=1e-4)
    assert "top-1 agreement 1.0000" in run_kdcache("verify", out, "--teacher", f"hf:{hf['teacher']}").stdout


def test_a_student_from_a_config_distils_and_saves_for_plain_transformers(hf, tmp_path):
    store = str(tmp_path / "top.zarr")
    run_kdcache("dump-logits", "--teacher", f"hf:{hf['teacher']}", "--dataset", _data(hf), "--layout", "topk", "--k",
                "8", "--out", store)
    out = tmp_path / "student"
    # the dataset without tokenizer=: the store's
    run_kdcache("train-student", "--dataset", f"hf-text:{hf['corpus']},seq=24", "--store", store, "--student",
                "hf:llama,hidden=16,layers=1,heads=2", "--temperature", "2", "--optimizer", "adam", "--lr", "0.003",
                "--epochs", "2", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[-1]["loss"] < metrics[0]["loss"] and all(m["coverage_ok"] for m in metrics)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    assert type(reloaded).__name__ == "LlamaForCausalLM" and len(tok) == 300
    ours = load_model(str(out))  # kdcache's own checkpoint: the spec rebuilds it, the weights load, nothing unpickled
    x = torch.tensor([tok("kdcache caches logits")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours.module(x), reloaded(input_ids=x).logits)


def test_a_student_with_another_tokenizer_is_refused(hf, tmp_path):
    store = str(tmp_path / "d.zarr")
    run_kdcache("dump-logits", "--teacher", f"hf:{hf['teacher']}", "--dataset", _data(hf), "--out", store)
    p = run_kdcache("train-student", "--dataset", _data(hf), "--store", store, "--student", f"hf:{hf['other']}",
                    "--epochs", "1", "--out", str(tmp_path / "s"), check=False)
    assert (p.returncode == 1 and "has tokenizer" in p.stderr
            and "use a student with the teacher's tokenizer" in p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_bad_hf_input_is_one_line_and_writes_nothing(hf, tmp_path):
    out = tmp_path / "x.zarr"
    vit = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=8).save_pretrained(vit)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    teacher = ["--teacher", f"hf:{hf['teacher']}"]
    cases = [
        (["--teacher", f"hf:{tmp_path / 'nope'}", "--dataset", _data(hf)], "does not exist"),
        (["--teacher", f"hf:{vit}", "--dataset", _data(hf)], "is not a causal language model"),
        ([*teacher, "--dataset", f"hf-text:{empty}"], "has no text of two tokens or more"),
        ([*teacher, "--dataset", f"hf-text:{hf['corpus']},field=body"], "has no field 'body'; its fields are text, n"),
        ([*teacher, "--dataset", f"hf-text:{hf['corpus']},seq=200"], "has a context of 64"),
        ([*teacher, "--dataset", f"hf-text:{hf['corpus']},seq=24,tokenizer={hf['other']}"],
         "teacher's (drop tokenizer= to use it)"),
    ]
    from kdcache.dump import DumpConfig, dump_logits
    for args, message in cases:  # in-process (transformers loads once); the CLI prints these as one line
        teachers = [args[1]]
        with pytest.raises(SpecError) as e:
            dump_logits(DumpConfig(teachers=teachers, dataset=args[3], out=str(out), progress=False))
        assert message in str(e.value) and "\n" not in str(e.value), (args, str(e.value))
        assert not out.exists()
    p = run_kdcache("dump-logits", *cases[0][0], "--out", str(out), check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and cases[0][1] in p.stderr


def test_without_the_extra_hf_specs_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SpecError, match=r"pip install 'kdcache\[hf\]'"):
        load_model("hf:some/model")


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_hf_store(hf, tmp_path):
    args = ["dump-logits", "--teacher", f"hf:{hf['teacher']}", "--dataset", _data(hf), "--layout", "topk", "--k", "4",
            "--chunk-rows", "64", "--batch-size", "8", "--device", "cpu"]
    single, multi = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    run_kdcache(*args, "--out", single, env=TORCHRUN_THREADS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    torchrun = TORCHRUN_2
    p = subprocess.run([*torchrun, *args, "--out", multi], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = open_store(single), open_store(multi)
    assert (a.digests() == b.digests()).all()


def test_per_token_topk_encoded_where_the_teacher_ran_is_the_same_store(hf, tmp_path):
    from kdcache.dump import DumpConfig, dump_logits
    for flag in (False, True):
        dump_logits(DumpConfig(teachers=[f"hf:{hf['teacher']}"], dataset=_data(hf), out=str(tmp_path / f"{flag}.zarr"),
                               layout="topk", k=6, chunk_rows=100, batch_size=16, progress=False,
                               encode_on_device=flag))
    a, b = open_store(str(tmp_path / "False.zarr")), open_store(str(tmp_path / "True.zarr"))
    assert (a.digests() == b.digests()).all()


def test_holdout_globs_and_paragraphs_split_a_corpus_of_files(hf, tmp_path):
    from kdcache.integrations.hf import corpus_texts
    texts = [json.loads(line)["text"] for line in open(hf["corpus"])]
    spec = f"hf-text:{hf['corpus']}"
    train, test = (corpus_texts(hf["corpus"], "text", spec, split, 5) for split in ("train", "test"))
    assert test == texts[4::5] and len(train) + len(test) == len(texts) and not set(train) & set(test)
    (tmp_path / "a.txt").write_text("first paragraph\nstill the first\n\nsecond one\n")
    (tmp_path / "b.txt").write_text("third paragraph\n")
    assert [t.strip() for t in corpus_texts(f"{tmp_path}/*.txt", "text", spec)] == [
        "first paragraph\nstill the first", "second one", "third paragraph"]
    with pytest.raises(SpecError, match="give holdout=N to hold out every N-th record as split=test"):
        load_dataset(f"{_data(hf)},split=test")
    a = load_dataset(f"{_data(hf)},holdout=5").dataset
    b = load_dataset(f"{_data(hf)},holdout=5,split=test").dataset
    assert a.tokens() + b.tokens() == load_dataset(_data(hf)).dataset.tokens()


def test_a_teacher_placed_with_device_map_auto_dumps_the_same_store(hf, tmp_path):
    pytest.importorskip("accelerate")
    from kdcache.dump import DumpConfig, dump_logits
    for name, spec in (("plain", f"hf:{hf['teacher']}"), ("mapped", f"hf:{hf['teacher']},device_map=auto")):
        dump_logits(DumpConfig(teachers=[spec], dataset=_data(hf), out=str(tmp_path / f"{name}.zarr"), layout="topk",
                               k=4, chunk_rows=200, batch_size=16, progress=False))
    a, b = open_store(str(tmp_path / "plain.zarr")), open_store(str(tmp_path / "mapped.zarr"))
    assert (a.digests() == b.digests()).all()
    assert load_model(f"hf:{hf['teacher']},device_map=auto").module.placed


@pytest.mark.slow
def test_kill_minus_nine_then_resume_gives_the_same_hf_store(hf, tmp_path):
    from kdcache.dump import DumpConfig, dump_logits
    args = ["dump-logits", "--teacher", f"hf:{hf['teacher']}", "--dataset", _data(hf, seq=8), "--layout", "topk",
            "--k", "4", "--chunk-rows", "16", "--batch-size", "4", "--device", "cpu"]
    ref, out = str(tmp_path / "ref.zarr"), tmp_path / "killed.zarr"
    dump_logits(DumpConfig(teachers=[args[2]], dataset=args[4], out=ref, layout="topk", k=4, chunk_rows=16,
                           batch_size=4, device="cpu", progress=False))
    chunks = open_store(ref).manifest.num_chunks
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    written = out / "chunk_sha256" / "c"
    kill_when([sys.executable, "-m", "kdcache", *args, "--out", str(out)], env,
              lambda: sum(len(f) for _, _, f in os.walk(written)) >= 3)
    done = int(open_store(str(out), allow_partial=True).written_chunks().sum())
    assert 0 < done < chunks, (done, chunks)
    assert f"{done} chunks kept from an earlier run" in run_kdcache(*args, "--out", str(out)).stdout
    a, b = open_store(ref), open_store(str(out))
    assert (a.digests() == b.digests()).all()
    for name in a.manifest.data_arrays:
        np.testing.assert_array_equal(a.read(0, a.num_samples).data[name], b.read(0, b.num_samples).data[name])


def test_quick_hf_pipeline_trains_a_tokenizer_a_teacher_and_distils_students(tmp_path):
    """The shipped pipeline, quick profile, from a copy of the repo's README: every step through hf: specs."""
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "hf_causal_lm.yaml").write_text((ROOT / "pipelines" / "hf_causal_lm.yaml").read_text())
    run_kdcache("run", "pipelines/hf_causal_lm.yaml", "--quick", cwd=str(tmp_path))
    root = tmp_path / "runs" / "hf_causal_lm-quick"
    report = (root / "report.md").read_text()
    assert "perplexity" in report and report.count("hf:llama,hidden=16,layers=1,heads=2") == 5
    assert open_store(str(root / "top8.zarr")).manifest.dataset["tokenizer"]["size"] == 400
    teacher = transformers.AutoModelForCausalLM.from_pretrained(root / "teacher" / "hf")
    assert teacher.config.vocab_size == 400 and (root / "from-sampled16" / "T2-a0.9-s0" / "hf").is_dir()
