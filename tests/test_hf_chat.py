"""Chat corpora (``hf-chat:``): conversations rendered with a chat template, a row per position whose target
is an assistant token (``rows=assistant``) or per position (``rows=all``). A tokenizer trained on local text
with a ChatML template, a tiny Llama teacher from a config (no network). The assistant positions are
recomputed independently with transformers' own ``{% generation %}`` mask."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdcache.datasets import load_dataset  # noqa: E402
from kdcache.dump import DumpConfig, dump_logits  # noqa: E402
from kdcache.errors import SpecError, StoreError  # noqa: E402
from kdcache.store import open_store  # noqa: E402
from kdcache.stream import check_pairing  # noqa: E402
from kdcache.teacher_check import check_teacher  # noqa: E402
from kdcache.train import TrainConfig, train_students  # noqa: E402
from tests.conftest import ROOT, run_kdcache  # noqa: E402

SPECIAL = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]
# ChatML; the {% generation %} tags render nothing: they let transformers mark the assistant tokens its own way
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")  # no tags
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
          "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SEQ = 56
WORDS = ("the cat sat on a mat while dogs ran far and wide over hills near rivers under blue skies; "
         "kdcache caches logits once and trains students from them at any temperature").split()


def _conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "answer briefly"}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            messages += [{"role": "user", "content": say(rng.randint(2, 8))},
                         {"role": "assistant", "content": say(rng.randint(1, 10))}]
        out.append({"messages": messages, "id": i})
    return out


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("chat")
    records = _conversations(24)
    texts = [m["content"] for r in records for m in r["messages"]] + ["user", "assistant", "system"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="<|eot_id|>",
                                                additional_special_tokens=SPECIAL[3:])
    fast.save_pretrained(d / "plain")  # the same tokenizer without a chat template
    fast.chat_template = CHATML
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                      pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(d / "teacher")
    fast.save_pretrained(d / "teacher")
    (d / "llama3.jinja").write_text(LLAMA3)
    (d / "mistral.jinja").write_text(MISTRAL)
    return {"dir": d, "records": records, "corpus": _write(d / "chat.jsonl", records), "teacher": str(d / "teacher"),
            "plain": str(d / "plain"), "tokenizer": fast}


def expected_rows(tokenizer, records, rows: str, seq: int = SEQ, template: str | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per record with a row: its tokens (cut to seq + 1) and the positions that must have a row, from
    transformers' own assistant mask: a position has a row when the token after it is an assistant token."""
    out = []
    for r in records:
        enc = tokenizer.apply_chat_template(r["messages"], chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = np.asarray(enc["input_ids"])[:seq + 1]
        assistant = np.asarray(enc["assistant_masks"], dtype=bool)[:seq + 1]
        pos = np.arange(len(ids) - 1)
        pos = pos[assistant[1:]] if rows == "assistant" else pos
        if len(pos):
            out.append((ids, pos))
    return out


def _spec(chat, rows="assistant", **extra) -> str:
    opts = "".join(f",{k}={v}" for k, v in extra.items())
    return f"hf-chat:{chat['corpus']},seq={SEQ},rows={rows}{opts}"


@pytest.mark.parametrize("fmt,rows", [("zarr", "assistant"), ("h5", "assistant"), ("zarr", "all"), ("h5", "all")])
def test_stored_rows_are_the_assistant_positions_recomputed_independently(chat, tmp_path, fmt, rows):
    out = str(tmp_path / f"s.{fmt}")
    dump_logits(DumpConfig(teachers=[f"hf:{chat['teacher']}"], dataset=_spec(chat, rows), out=out, dtype="float32",
                           chunk_rows=40, batch_size=5, progress=False))
    s = open_store(out)
    m = s.manifest
    want = expected_rows(chat["tokenizer"], chat["records"], rows)
    ids, offsets = s.sequence_index()
    assert ids.tolist() == list(range(len(want)))
    assert np.diff(offsets).tolist() == [len(p) for _, p in want]
    assert m.num_samples == sum(len(p) for _, p in want)
    block = s.read(0, m.num_samples)
    model = transformers.AutoModelForCausalLM.from_pretrained(chat["teacher"]).eval()
    for i, (tokens, pos) in enumerate(want):
        rows_i = slice(int(offsets[i]), int(offsets[i + 1]))
        np.testing.assert_array_equal(block.labels[rows_i], tokens[pos + 1])
        with torch.no_grad():
            z = model(input_ids=torch.from_numpy(tokens[None, :-1])).logits[0, torch.from_numpy(pos)]
        np.testing.assert_allclose(block.logits[rows_i, 0], z.numpy(), rtol=0, atol=1e-4)
    assert m.dataset["chat"] == {"rows": rows, "rule": "prefix-render-1", "skipped": m.dataset["chat"]["skipped"],
                                 "template_sha256": hashlib.sha256(CHATML.encode()).hexdigest(),
                                 "truncated": sum(len(t) > SEQ for t, _ in want)}
    assert m.dataset["chat"]["truncated"] > 0 and not any(m.dataset["chat"]["skipped"].values())
    check = check_teacher(out, [f"hf:{chat['teacher']}"], rows=64)
    assert check.ok and check.top1_agreement == [1.0]
    from kdcache.summary import format_inspect, inspect_store
    shown = format_inspect(inspect_store(out))
    assert (f"a row per position{' whose target is an assistant token' if rows == 'assistant' else ''}, up to "
            in shown and f"  chat        rows={rows}, rule prefix-render-1" in shown)


def test_a_student_is_trained_on_exactly_the_assistant_positions(chat, tmp_path):
    store = str(tmp_path / "a.zarr")
    dump_logits(DumpConfig(teachers=[f"hf:{chat['teacher']}"], dataset=_spec(chat), out=store, dtype="float32",
                           progress=False))
    out = tmp_path / "student"
    # one batch of every sequence, and a step too small to move a float32 weight: the checkpoint holds the
    # weights the recorded loss was computed with; evaluated on the same data and store
    train_students(TrainConfig(dataset=_spec(chat), store=store, student="hf:llama,hidden=16,layers=1,heads=2",
                               temperatures=[2.0], alphas=[0.5], optimizer="sgd", lrs=[1e-30], batch_size=64, epochs=1,
                               eval_dataset=_spec(chat), eval_store=store, out=str(out), progress=False))
    metrics = json.loads((out / "metrics.json").read_text())
    from kdcache.specs import load_model
    student = load_model(str(out)).module.eval()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(chat["teacher"]).eval()
    want = expected_rows(chat["tokenizer"], chat["records"], "assistant")
    kl = ce = n = agree = 0.0
    t = 2.0
    with torch.no_grad():
        for tokens, pos in want:
            x, p = torch.from_numpy(tokens[None, :-1]), torch.from_numpy(pos)
            s, z = student(x)[0, p].double(), teacher(input_ids=x).logits[0, p].double()
            log_p, log_q = torch.log_softmax(z / t, -1), torch.log_softmax(s / t, -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            ce += float(torch.nn.functional.cross_entropy(s, torch.from_numpy(tokens[pos + 1]), reduction="sum"))
            n += len(pos)
            agree += float((s.argmax(-1) == z.argmax(-1)).sum())
    assert metrics[0]["positions_seen"] == n and metrics[0]["coverage_ok"] and metrics[0]["eval_samples"] == n
    assert metrics[0]["loss"] == pytest.approx(0.5 * t * t * kl / n + 0.5 * ce / n, rel=1e-5)
    assert metrics[0]["teacher_agreement"] == pytest.approx(agree / n)


def test_the_tokenizer_template_a_template_file_and_a_bos_template(chat, tmp_path):
    own = load_dataset(_spec(chat, tokenizer=chat["teacher"]))
    (tmp_path / "chatml.jinja").write_text(CHATML)
    from_file = load_dataset(_spec(chat, tokenizer=chat["plain"], template=tmp_path / "chatml.jinja"))
    assert own.fingerprint == from_file.fingerprint
    assert own.describe()["chat"]["template_sha256"] == from_file.describe()["chat"]["template_sha256"]
    # a Llama 3 style template (BOS written by the template, trimmed content) from a file
    data = load_dataset(_spec(chat, tokenizer=chat["plain"], template=chat["dir"] / "llama3.jinja")).dataset
    want = expected_rows(chat["tokenizer"], chat["records"], "assistant", template=LLAMA3)
    assert data.lengths().tolist() == [len(p) for _, p in want]
    idx = np.arange(len(want))
    x, y = data.get_batch(idx)
    mask = data.row_mask(idx)
    for i, (tokens, pos) in enumerate(want):
        assert tokens[0] == chat["tokenizer"].bos_token_id and x[i, 0] == tokens[0]
        assert np.flatnonzero(mask[i].numpy()).tolist() == pos.tolist()
        assert y[i][mask[i]].tolist() == tokens[pos + 1].tolist() and (y[i][~mask[i]] == -1).all()


def test_rows_all_and_rows_assistant_are_different_datasets(chat, tmp_path):
    store = str(tmp_path / "a.zarr")
    dump_logits(DumpConfig(teachers=[f"hf:{chat['teacher']}"], dataset=_spec(chat), out=store, progress=False))
    a, b = load_dataset(_spec(chat, tokenizer=chat["teacher"])), load_dataset(_spec(chat, "all",
                                                                                     tokenizer=chat["teacher"]))
    assert a.fingerprint != b.fingerprint and len(a) == len(b)
    with pytest.raises(StoreError, match="fingerprint"):
        check_pairing(open_store(store), b)
    check_pairing(open_store(store), a)


def test_a_record_without_an_assistant_turn_is_skipped_and_counted(chat, tmp_path, capfd):
    late = [{"role": "user", "content": " ".join(WORDS * 3)}, {"role": "assistant", "content": "too late"}]
    records = [*chat["records"][:5], {"messages": [{"role": "user", "content": "hello there"}], "id": 99},
               *chat["records"][5:8], {"messages": late, "id": 100}]
    corpus = _write(tmp_path / "some.jsonl", records)
    out = str(tmp_path / "s.zarr")
    dump_logits(DumpConfig(teachers=[f"hf:{chat['teacher']}"], dataset=f"hf-chat:{corpus},seq={SEQ}", out=out,
                           progress=False))
    err = [line for line in capfd.readouterr().err.splitlines() if "skipped" in line]
    assert err == ["hf-chat: 1 of 10 records have no assistant message and are skipped (first: record 5)",
                   f"hf-chat: 1 of 10 records have no assistant token within their first {SEQ + 1} tokens and are "
                   f"skipped (first: record 9)"]
    m = open_store(out).manifest
    assert m.sequences["count"] == 8
    assert m.dataset["chat"]["skipped"] == {"no_assistant_turn": 1, "no_assistant_token_within_seq": 1}
    data = load_dataset(f"hf-chat:{corpus},seq={SEQ},tokenizer={chat['teacher']}").dataset
    assert data.record_ids.tolist() == [0, 1, 2, 3, 4, 6, 7, 8]
    everything = load_dataset(f"hf-chat:{corpus},seq={SEQ},rows=all,tokenizer={chat['teacher']}").dataset
    assert len(everything) == 10  # with rows=all they have rows like any other record


def test_bad_chat_input_is_one_line_and_writes_nothing(chat, tmp_path):
    out = tmp_path / "x.zarr"
    share_gpt = _write(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                        {"from": "gpt", "value": "hello"}]}])
    rewriting = tmp_path / "rewrites.jinja"  # shows earlier assistant turns as "(earlier)": not a prefix of itself
    rewriting.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and "
                         "not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    failing = tmp_path / "fails.jinja"
    failing.write_text("{{ raise_exception('roles must alternate user/assistant') }}")
    cases = [
        (_spec(chat, tokenizer=chat["plain"]), "has no chat template; give template=FILE"),
        (_spec(chat, template=tmp_path / "nope.jinja"), "is not a file"),
        (f"hf-chat:{share_gpt},messages=conversations", "has a message with keys from, value"),
        (f"hf-chat:{share_gpt}", "has no field 'messages'; its fields are conversations"),
        (_spec(chat, rows="prompt"), "use rows=assistant"),
        (_spec(chat, template=rewriting), "renders the conversation up to this assistant message differently"),
        (_spec(chat, template=failing), "the chat template fails (TemplateError: roles must alternate"),
        (f"hf-chat:{chat['corpus']},messages=id", "'id' holds int, not a list of messages"),
    ]
    for dataset, message in cases:  # in-process (transformers loads once); the CLI prints these as one line
        with pytest.raises(SpecError) as e:
            dump_logits(DumpConfig(teachers=[f"hf:{chat['teacher']}"], dataset=dataset, out=str(out), progress=False))
        assert message in str(e.value) and "\n" not in str(e.value), (dataset, str(e.value))
        assert not out.exists()
    p = run_kdcache("dump-logits", "--teacher", f"hf:{chat['teacher']}", "--dataset", cases[0][0], "--out", str(out),
                    check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and cases[0][1] in p.stderr
    assert not out.exists()


def test_format_md_recomputes_the_stored_positions_of_a_template_without_generation_tags(chat, tmp_path):
    """The recomputation FORMAT.md gives, run as written, on a Mistral-style template (no {% generation %})."""
    from tests.conftest import ROOT
    doc = (ROOT / "kdcache" / "store" / "FORMAT.md").read_text()
    snippet = doc.split("Recomputing them\nfrom the document")[1].split("```python\n")[1].split("```")[0]
    out = str(tmp_path / "m.zarr")
    spec = f"hf-chat:{chat['corpus']},seq={SEQ},template={chat['dir'] / 'mistral.jinja'}"
    dump_logits(DumpConfig(teachers=[f"hf:{chat['teacher']}"], dataset=spec, out=out, progress=False))
    s = open_store(out)
    assert f",template=../{chat['dir'].name}/mistral.jinja" in s.manifest.dataset["spec"]  # relative to the store
    assert check_teacher(out, [f"hf:{chat['teacher']}"], rows=32).ok  # the dataset found again from the manifest
    ids, offsets = s.sequence_index()
    labels = s.read(0, s.num_samples).labels
    tok = chat["tokenizer"]

    def render(messages, gen):
        return tok.apply_chat_template(messages, chat_template=MISTRAL, tokenize=False, add_generation_prompt=gen)
    for i, r in enumerate(chat["records"]):
        scope = {"render": render, "tok": tok, "messages": r["messages"], "seq": SEQ, "np": np}
        exec(snippet, scope)
        t, positions = scope["t"], scope["positions"]
        assert ids[i] == i and offsets[i + 1] - offsets[i] == len(positions) > 0
        assert labels[offsets[i]:offsets[i + 1]].tolist() == t[positions + 1].tolist()
        if len(scope["enc"]["input_ids"]) <= SEQ + 1:  # not cut: the end of the last answer is learnt too
            assert tok.decode(t[positions[-1] + 1]) == "<|eot_id|>"


def test_positions_stored_per_sequence_response_only_against_all(chat, tmp_path):
    """The README's figures: tests/data/chat_kdcache.jsonl holds 27 conversations made from the README's
    sections (a system prompt, a question, one to three paragraphs as answers, short follow-ups), read with
    a 1,000-token BPE tokenizer trained on it and a ChatML template; and the short answers of this module's
    corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.conftest import ROOT
    corpus = ROOT / "tests" / "data" / "chat_kdcache.jsonl"
    texts = [m["content"] for line in corpus.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts + ["user", "assistant", "system"], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                additional_special_tokens=SPECIAL[3:])
    fast.chat_template = CHATML
    fast.save_pretrained(tmp_path / "tok")
    stored = {}
    for name, path, tokenizer in (("readme", corpus, tmp_path / "tok"), ("short", chat["corpus"], chat["teacher"])):
        for rows in ("assistant", "all"):
            n = load_dataset(f"hf-chat:{path},rows={rows},tokenizer={tokenizer}").dataset.lengths()
            stored[name, rows] = (len(n), int(n.sum()), int(np.median(n)))
    assert stored == {("readme", "assistant"): (27, 11374, 360), ("readme", "all"): (27, 13201, 411),
                      ("short", "assistant"): (24, 382, 14), ("short", "all"): (24, 1031, 40)}


def test_the_fingerprint_recomputes_from_format_md(chat):
    """FORMAT.md's fingerprint of an hf-chat corpus, from transformers' own assistant mask, numpy and hashlib."""
    for rows in ("assistant", "all"):
        want = expected_rows(chat["tokenizer"], chat["records"], rows)
        n = len(want)
        idx = np.unique(np.linspace(0, n - 1, min(n, 256)).round().astype(np.int64))
        width = max(len(want[i][0]) - 1 for i in idx)
        x = np.full((len(idx), width), chat["tokenizer"].pad_token_id, dtype=np.int64)
        y = np.full((len(idx), width), -1, dtype=np.int64)
        for r, i in enumerate(idx):
            tokens, pos = want[i]
            x[r, :len(tokens) - 1] = tokens[:-1]
            y[r, pos] = tokens[pos + 1]
        h = hashlib.sha256(f"kdcache-fingerprint-1;n={n}".encode())
        h.update(f";torch.int64;{(width,)}".encode())
        h.update(x.tobytes() + y.tobytes())
        rule = {"rows": rows, "rule": "prefix-render-1", "template_sha256": hashlib.sha256(CHATML.encode()).hexdigest()}
        h.update((";" + json.dumps({"chat": rule}, sort_keys=True, separators=(",", ":"))).encode())
        assert load_dataset(_spec(chat, rows, tokenizer=chat["teacher"])).fingerprint == h.hexdigest()


def test_the_trainer_integration_distils_exactly_the_assistant_positions(chat, tmp_path):
    from kdcache.integrations import hf_trainer as ht
    from kdcache.specs import load_model
    store = str(tmp_path / "a.zarr")
    dump_logits(DumpConfig(teachers=[f"hf:{chat['teacher']}"], dataset=_spec(chat), out=store, dtype="float32",
                           progress=False))
    student = load_model("hf:llama,hidden=16,layers=1,heads=2", None, len(chat["tokenizer"]), seed=0).module.model
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", save_strategy="no",
                                          use_cpu=True, max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                                          disable_tqdm=True, dataloader_num_workers=0)
    trainer = ht.DistillationTrainer(model=student, args=args, store=store, temperature=2.0, alpha=0.5)
    ids = next(iter(trainer.get_train_dataloader()))["sample_id"].tolist()
    want = expected_rows(chat["tokenizer"], chat["records"], "assistant")  # item i is the i-th record with a row
    teacher = transformers.AutoModelForCausalLM.from_pretrained(chat["teacher"]).eval()
    kl = ce = n = 0.0
    with torch.no_grad():
        for i in ids:
            tokens, pos = want[i]
            x, p = torch.from_numpy(tokens[None, :-1]), torch.from_numpy(pos)
            s, z = student(input_ids=x).logits[0, p].double(), teacher(input_ids=x).logits[0, p].double()
            log_p, log_q = torch.log_softmax(z / 2, -1), torch.log_softmax(s / 2, -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            ce += float(torch.nn.functional.cross_entropy(s, torch.from_numpy(tokens[pos + 1]), reduction="sum"))
            n += len(pos)
    trainer.train()
    first = next(h for h in trainer.state.log_history if "distill_loss" in h)
    assert first["distill_loss"] == pytest.approx(0.5 * 4 * kl / n + 0.5 * ce / n, rel=1e-5)


@pytest.mark.slow
def test_quick_chat_pipeline_distils_students_on_answers_by_both_engines(tmp_path, monkeypatch):
    """The shipped chat pipeline, quick profile, from copies of its files and the README its tokenizer is
    trained on: a response-only top-k store exported and imported back, students by kdcache's loop and
    by the Trainer with held-out perplexity on assistant tokens, and the positions a response-only store
    keeps against every position (the README's figures for this profile)."""
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    run_kdcache("run", "pipelines/hf_chat.yaml", "--quick", cwd=str(tmp_path))
    root = tmp_path / "runs" / "hf_chat-quick"
    monkeypatch.chdir(tmp_path)  # the runs record paths relative to it
    runs = {Path(r["dir"]).parts[2]: r for r in json.loads((root / "report.json").read_text())["runs"]}
    own, via = runs["student-kdcache"], runs["student-trainer"]
    for r in (own, via, runs["labels-only"], runs["teacher"]):
        assert np.isfinite(r["test_perplexity"]) and r["test_perplexity"] > 1
    assert via["teacher"] == own["teacher"] == "logprobs:top8-axolotl"  # the re-imported store
    assert via["test_perplexity"] == pytest.approx(own["test_perplexity"], rel=1e-3)
    cfg = json.loads((root / "student-trainer" / "T1-a0.9-s0" / "config.json").read_text())
    assert cfg["engine"] == "trainer" and cfg["store"].endswith("imported-top8.zarr")
    test = json.loads((root / "student-trainer" / "T1-a0.9-s0" / "metrics.json").read_text())[-1]
    spec = cfg["eval_dataset"]
    assert ",split=test" in spec and "rows=" not in spec  # rows=assistant: the answers' tokens
    assert test["eval_samples"] == int(load_dataset(spec).dataset.lengths().sum())
    dumped, imported = open_store(str(root / "top8.zarr")), open_store(str(root / "imported-top8.zarr"))
    assert (dumped.sequence_index()[1] == imported.sequence_index()[1]).all()
    stored = np.diff(imported.sequence_index()[1])
    every = load_dataset(cfg["dataset"].replace("rows=assistant", "rows=all")).dataset.lengths()
    assert (len(stored), int(stored.sum()), int(every.sum())) == (22, 6039, 8176)
    assert (float(np.median(stored)), float(np.median(every))) == (274.5, 384.0)
