"""LoRA students (``train-student --student hf:PATH --lora ...``): a tiny Llama saved with ``save_pretrained``
as the pretrained student, distilled from a per-token store; only its adapter trains, the run holds the
adapter (peft) and the merged model (plain transformers), a killed run resumes to the same adapter."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from kdcache.specs import load_model  # noqa: E402
from tests.conftest import DATA_ROOT, ROOT, invoke_kdcache, kill_when, run_kdcache  # noqa: E402
from tests.test_hf import _save_model  # noqa: E402

LORA = "r=4,alpha=8,targets=q_proj+v_proj,dropout=0.1"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    texts = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if len(p.strip()) > 20]
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:12]))
    teacher = str(_save_model(d / "teacher", texts, 300))
    student = str(_save_model(d / "student", texts, 300, seed=1))  # the same tokenizer, other weights
    data = f"hf-text:{corpus},seq=16,tokenizer={teacher}"
    store = str(d / "top.zarr")
    run_kdcache("dump-logits", "--teacher", f"hf:{teacher}", "--dataset", data, "--layout", "topk", "--k", "8",
                "--out", store)
    return {"data": data, "store": store, "student": student}


def _args(lm, out, *extra):
    return ["train-student", "--dataset", lm["data"], "--store", lm["store"], "--student", f"hf:{lm['student']}",
            "--lora", LORA, "--temperature", "2", "--optimizer", "adam", "--lr", "0.01", "--batch-size", "8",
            "--out", str(out), *extra]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's own, in from_pretrained
def test_a_lora_student_trains_only_its_adapter_and_saves_adapter_and_merged_model(lm, tmp_path):
    out = tmp_path / "run"
    p = invoke_kdcache(*_args(lm, out, "--epochs", "2", "--seed", "0,1", "--eval-dataset", lm["data"]))
    assert p.returncode == 0, p.stderr
    assert "training 2 students one by one (--lora: a stack would train the frozen base weights too" in p.stderr
    run = out / "T2-a0.9-s0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics[-1]["loss"] < metrics[0]["loss"] and all(m["coverage_ok"] for m in metrics)
    base = transformers.AutoModelForCausalLM.from_pretrained(lm["student"]).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()  # plain transformers
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(bool(v.abs().sum() > 0) for k, v in adapter.items() if "lora_B" in k)  # lora_B starts at 0: it moved
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    for k, v in merged.state_dict().items():  # the base: bit for bit, but where the adapter was merged in
        if ".q_proj." in k or ".v_proj." in k:  # W + (alpha / r) B A
            a, b = (adapter["base_model.model." + k.replace(".weight", f".lora_{n}.weight")] for n in "AB")
            torch.testing.assert_close(v, before[k] + 2 * b @ a, rtol=0, atol=1e-6)
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k
    tok = transformers.AutoTokenizer.from_pretrained(run / "adapter")
    x = torch.tensor([tok("kdcache caches logits once and trains students")["input_ids"]])
    with torch.no_grad():
        untrained = base(input_ids=x).logits
    trained = peft.PeftModel.from_pretrained(base, run / "adapter").eval()  # the adapter with peft
    assert len(tok) == len(transformers.AutoTokenizer.from_pretrained(run / "hf")) == 300
    with torch.no_grad():
        want = trained(input_ids=x).logits
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(load_model(str(run)).module(x), want, rtol=1e-4, atol=1e-5)  # kdcache's checkpoint
    assert (want - untrained).abs().max() > 1e-3
    other = load_file(out / "T2-a0.9-s1" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(adapter[k], other[k]) for k in adapter)  # each seed its own adapter
    assert "eval_perplexity" in metrics[-1] and json.loads((run / "config.json").read_text())["lora"] == LORA
    ev = invoke_kdcache("evaluate", str(run), "--dataset", lm["data"], "--json", str(tmp_path / "eval.json"))
    assert ev.returncode == 0 and json.loads((tmp_path / "eval.json").read_text())
    rep = invoke_kdcache("report", str(out), "--out", str(tmp_path / "report.md"))
    assert rep.returncode == 0 and "T2-a0.9-s1" in (tmp_path / "report.md").read_text(), rep.stderr


def test_all_linear_adapts_every_linear_layer_but_the_head(lm):
    from kdcache.integrations.lora import LoraSpec, apply_lora
    student = f"hf:{lm['student']}"
    module = apply_lora(load_model(student).module, LoraSpec.parse("r=2,targets=all-linear"), student, seed=0)
    adapted = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert LoraSpec.parse("r=8,targets=q_proj") == LoraSpec(8, 8.0, ("q_proj",), 0.0)  # alpha defaults to r


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_adapter_of_an_uninterrupted_one(lm, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    args = ["--epochs", "2", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]
    assert invoke_kdcache(*_args(lm, ref, *args)).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    resume = out / "resume"
    kill_when([sys.executable, "-m", "kdcache", *_args(lm, out, *args)], env,
              lambda: any(resume.glob("ckpt-*/state.json")))
    assert not (out / "adapter").exists()
    ckpt = next(resume.glob("ckpt-*/state.json")).parent
    saved = load_file(ckpt / "students.safetensors")  # the adapter and its Adam state: no base weights
    assert saved and all("lora_" in k for k in saved)
    p = invoke_kdcache(*_args(lm, out, *args))
    assert p.returncode == 0 and "resuming" in p.stderr, p.stderr
    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((ref / "metrics.json").read_text())[-1]["loss"] == json.loads(
        (out / "metrics.json").read_text())[-1]["loss"]


@pytest.mark.parametrize("student, lora, message", [
    ("mlp:16", LORA, "--lora with --student 'mlp:16': LoRA adapts a pretrained causal LM; give --student hf:PATH"),
    ("hf:llama,hidden=16,layers=1,heads=2", LORA, "LoRA adapts a pretrained causal LM"),
    ("STUDENT", "r=0,targets=q_proj", "r=0; the rank must be at least 1"),
    ("STUDENT", "r=4", "give r= and targets="),
    ("STUDENT", "r=4,targets=q_proj,rank=2", "unknown keys rank; known: r, alpha, targets, dropout"),
    ("STUDENT", "r=4,targets=q_proj,dropout=1", "dropout=1; give a value in [0, 1)"),
    ("STUDENT", "r=4,alpha=x,targets=q_proj", "r is an integer, alpha and dropout numbers"),
    ("STUDENT", "r=4,targets=q_proj+query",
     "--lora targets query: hf:STUDENT has no such linear layers; its linear layers are down_proj, gate_proj, k_proj, "
     "lm_head, o_proj, q_proj, up_proj, v_proj (or give targets=all-linear)"),
])
def test_bad_lora_is_one_line_and_writes_nothing(lm, tmp_path, student, lora, message):
    out = tmp_path / "x"
    spec = f"hf:{lm['student']}" if student == "STUDENT" else student
    args = _args(lm, out)
    args[args.index("--student") + 1] = spec
    args[args.index("--lora") + 1] = lora
    p = invoke_kdcache(*args)
    err = p.stderr.replace(f"hf:{lm['student']}", "hf:STUDENT")
    assert p.returncode == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
