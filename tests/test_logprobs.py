"""Top-k logprob datasets: a tiny Llama teacher's top-k store exported in each preset's columns and
imported back, an imported store distilling a student, and bad logprob datasets refused."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from kdcache.errors import ConfigError, StoreError  # noqa: E402
from kdcache.logprobs import PRESETS, columns_for, export_logprobs, import_logprobs, uniform_tail_log_normalizer  # noqa: E402
from kdcache.store import open_store  # noqa: E402
from tests.conftest import ROOT, invoke_kdcache, run_kdcache  # noqa: E402
from tests.test_hf import _save_model  # noqa: E402

K = 6


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A corpus, a tokenizer and a tiny teacher, and the teacher's per-token top-k store (float32)."""
    d = tmp_path_factory.mktemp("lp")
    texts = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if len(p.strip()) > 20]
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:24]))
    teacher = _save_model(d / "teacher", texts, 300)
    data = f"hf-text:{corpus},seq=16,tokenizer={teacher}"
    store = str(d / "top.zarr")
    run_kdcache("dump-logits", "--teacher", f"hf:{teacher}", "--dataset", data, "--layout", "topk", "--k", str(K),
                "--temperatures", "1,2", "--dtype", "float32", "--out", store)
    return {"dir": d, "corpus": str(corpus), "teacher": str(teacher), "data": data, "store": store}


def _logprobs(store):
    """ids, logprobs at T=1 and tail mass at T=1 of every row of a top-k store (one member)."""
    s = open_store(store)
    blk = s.read(0, s.num_samples)
    j = s.manifest.layout_params["temperatures"].index(1.0)
    lp = blk.data["topk_values"][:, 0].astype(np.float32) - blk.data["log_normalizers"][:, 0, j:j + 1]
    return blk.data["topk_ids"][:, 0], lp, 1 - np.exp(lp.astype(np.float64)).sum(-1), s


@pytest.mark.parametrize("preset,fmt", [("llamakd", "parquet"), ("axolotl", "parquet"), ("vllm", "jsonl")])
def test_export_then_import_gives_the_same_topk_and_tail(lm, tmp_path, preset, fmt):
    out = tmp_path / "export"
    export_logprobs(lm["store"], str(out), preset, fmt=fmt, progress=False)
    back = str(tmp_path / "back.zarr")
    summary = import_logprobs(str(out), lm["data"], back, columns_for(preset), dtype="float32", progress=False)
    ids0, lp0, tail0, a = _logprobs(lm["store"])
    ids1, lp1, tail1, b = _logprobs(back)
    np.testing.assert_array_equal(ids1, ids0)
    np.testing.assert_array_equal(lp1, lp0)  # float32 logprobs, written and read back exactly
    np.testing.assert_allclose(tail1, tail0, rtol=0, atol=1e-6)
    assert summary.positions == a.num_samples and abs(summary.tail_mean - tail0.mean()) < 1e-6
    ma, mb = a.manifest, b.manifest
    # the same corpus identity as a dump of it: train-student takes either for this dataset
    assert mb.identity()["dataset"] == ma.identity()["dataset"] and mb.sequences == ma.sequences
    assert mb.layout_params == {"k": K, "temperatures": [1.0], "logprobs": {"approximated": []}}
    np.testing.assert_array_equal(b.read(0, b.num_samples).labels, a.read(0, a.num_samples).labels)
    assert all((x == y).all() for x, y in zip(b.sequence_index(), a.sequence_index()))
    assert not b.verify()


def test_preset_columns_follow_their_tools(lm, tmp_path):
    """Axolotl: row j is the distribution over input_ids[j + 1], its last row padding (mask 0); vLLM:
    entry i is token i given the tokens before it, entry 0 null; llamakd: targets [L, 2, k]."""
    import pyarrow.parquet as pq
    ids, lp, _, s = _logprobs(lm["store"])
    _, offsets = s.sequence_index()
    L = int(offsets[1])
    rows = {}
    for preset in PRESETS:
        export_logprobs(lm["store"], str(tmp_path / preset), preset, progress=False)
        rows[preset] = pq.read_table(tmp_path / preset / "data.parquet").slice(0, 1).to_pylist()[0]
    ax = rows["axolotl"]
    assert len(ax["input_ids"]) == L + 1 and len(ax["target_token_ids"]) == L + 1 and ax["labels"] == ax["input_ids"]
    assert ax["target_token_ids"][0] == ids[0].tolist() and ax["target_mask"][L] == [0] * K
    assert ax["target_mask"][L - 1] == [1] * K and ax["target_logprobs"][L][0] == -1e9
    vl = rows["vllm"]
    assert vl["prompt_logprobs"][0] is None and vl["prompt_logprob_token_ids"][1] == ids[0].tolist()
    assert vl["prompt_token_ids"] == ax["input_ids"]
    lk = rows["llamakd"]
    assert lk["inputs"] == ax["input_ids"][:L] and np.asarray(lk["targets"]).shape == (L, 2, K)
    np.testing.assert_array_equal(np.asarray(lk["targets"])[:, 1], ids[:L])
    np.testing.assert_array_equal(np.asarray(lk["targets"], dtype=np.float32)[:, 0], lp[:L])


def test_imported_store_trains_at_t1_and_refuses_t2_without_the_approximation(lm, tmp_path):
    export_logprobs(lm["store"], str(tmp_path / "x"), "axolotl", progress=False)
    store = str(tmp_path / "imp.zarr")
    p = run_kdcache("import-logprobs", str(tmp_path / "x"), "--preset", "axolotl", "--dataset", lm["data"],
                    "--out", store)
    assert "positions/s" in p.stdout and "bytes per position" in p.stdout
    student = ["--student", "hf:llama,hidden=16,layers=1,heads=2", "--optimizer", "adam", "--lr", "0.003"]
    run = ["train-student", "--dataset", lm["data"], "--store", store, *student, "--epochs", "2"]
    assert invoke_kdcache(*run, "--temperature", "1", "--out", str(tmp_path / "s1")).returncode == 0
    metrics = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    refused = invoke_kdcache(*run, "--temperature", "2", "--out", str(tmp_path / "s2"))
    assert refused.returncode == 1
    assert "exact at T=1 only" in refused.stderr and "--approximate-temperatures 2" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "s2").exists()
    # another corpus (other windows) is refused for this store, as for a dump of the original
    other = invoke_kdcache("train-student", "--dataset", lm["data"].replace("seq=16", "seq=12"), "--store", store,
                           *student, "--temperature", "1", "--out", str(tmp_path / "s3"))
    assert other.returncode == 1 and len(other.stderr.strip().splitlines()) == 1
    # with the opt-in, T=2 is served from the uniform-tail normaliser stored at import
    approx = str(tmp_path / "approx.zarr")
    import_logprobs(str(tmp_path / "x"), lm["data"], approx, columns_for("axolotl"), approximate_temperatures=[2.0],
                    dtype="float32", progress=False)
    m = open_store(approx).manifest
    assert m.layout_params["logprobs"] == {"approximated": [2.0]} and m.layout_params["temperatures"] == [1.0, 2.0]
    ids, lp, _, s = _logprobs(approx)
    lse2 = s.read(0, s.num_samples).data["log_normalizers"][:, 0, 1]
    np.testing.assert_allclose(lse2, uniform_tail_log_normalizer(lp, m.num_classes, 2.0), rtol=0, atol=1e-5)
    p = invoke_kdcache(*[a if a != store else approx for a in run], "--temperature", "2", "--epochs", "1", "--out",
                       str(tmp_path / "s4"))
    assert p.returncode == 0 and (tmp_path / "s4" / "metrics.json").exists()


def test_the_uniform_tail_normaliser_is_exact_for_a_uniform_tail_and_bounds_others():
    rng = np.random.default_rng(0)
    V, k = 50, 5
    z = np.concatenate([rng.normal(3, 1, k), np.zeros(V - k)])  # the tail exactly uniform
    lp = z - np.log(np.exp(z).sum())
    for T in (0.5, 1.0, 2.0, 4.0):
        exact = np.log(np.exp(lp / T).sum())
        assert abs(uniform_tail_log_normalizer(lp[None, :k], V, T)[0] - exact) < 1e-9
    z = np.concatenate([rng.normal(3, 1, k), rng.normal(0, 2, V - k)])  # an uneven tail
    z[:k] += 10
    lp = z - np.log(np.exp(z).sum())
    order = np.argsort(-lp)
    kept = lp[order[:k]]
    exact = np.log(np.exp(lp / 2).sum())
    assert uniform_tail_log_normalizer(kept[None], V, 2.0)[0] >= exact  # T > 1: the tail's largest mass


def _rewrite(src_dir, dst, change):
    """The exported records, with ``change(records)`` applied, as JSONL."""
    import pyarrow.parquet as pq
    rows = pq.read_table(src_dir / "data.parquet").to_pylist()
    change(rows)
    dst.mkdir()
    (dst / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(dst)


def test_bad_logprob_datasets_are_one_line_and_nothing_is_written_or_lost(lm, tmp_path):
    good = tmp_path / "good"
    export_logprobs(lm["store"], str(good), "axolotl", progress=False)

    def vocab(rows):
        rows[3]["target_token_ids"][2][1] = 300

    def shifted(rows):
        rows[2]["input_ids"] = rows[2]["input_ids"][1:] + [0]

    def raw_logits(rows):
        rows[1]["target_logprobs"][4] = [v + 8 for v in rows[1]["target_logprobs"][4]]

    def short(rows):
        del rows[-1]
    cases = [(vocab, "record 3 position 2: token id 300 is outside the vocabulary 0..299"),
             (shifted, "record 2 does not line up with corpus sequence 2: at position 0"),
             (raw_logits, "record 1 position 4: the probabilities sum to"),
             (short, "records but corpus")]
    out = tmp_path / "kept.zarr"
    import_logprobs(str(good), lm["data"], str(out), columns_for("axolotl"), progress=False)
    before = open_store(str(out)).digests()
    for change, message in cases:
        bad = _rewrite(good, tmp_path / change.__name__, change)
        p = invoke_kdcache("import-logprobs", bad, "--preset", "axolotl", "--dataset", lm["data"], "--out",
                           str(tmp_path / "new.zarr"))
        assert p.returncode == 1 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "new.zarr").exists()
        p = invoke_kdcache("import-logprobs", bad, "--preset", "axolotl", "--dataset", lm["data"], "--out",
                           str(out), "--overwrite")
        assert p.returncode == 1 and message in p.stderr
        assert (open_store(str(out)).digests() == before).all()  # the store already there is untouched
    import_logprobs(str(good), lm["data"], str(out), columns_for("axolotl"), k=2, overwrite=True, progress=False)
    assert open_store(str(out)).manifest.layout_params["k"] == 2  # replaced once the import succeeded
    assert sorted(os.listdir(tmp_path)) == sorted(["good", "kept.zarr", *(c.__name__ for c, _ in cases)])
    with pytest.raises(ConfigError, match="give a preset"):
        columns_for(None, tokens="input_ids")
    with pytest.raises(StoreError, match="already exists"):
        import_logprobs(str(good), lm["data"], str(out), columns_for("axolotl"), progress=False)


def test_an_imported_store_reads_with_plain_zarr_as_format_md_says(lm, tmp_path):
    """FORMAT.md "Imported logprobs": values are logprobs, the T=1 normaliser 0, an approximated one the
    uniform-tail formula, and the member's sha256 that of the chunk digests."""
    import hashlib

    import zarr
    export_logprobs(lm["store"], str(tmp_path / "x"), "llamakd", progress=False)
    out = str(tmp_path / "imp.zarr")
    import_logprobs(str(tmp_path / "x"), lm["data"], out, columns_for("llamakd"), approximate_temperatures=[4.0],
                    progress=False)
    g = zarr.open_group(out, mode="r")
    m = dict(g.attrs["kdcache"])
    assert m["layout_params"]["logprobs"] == {"approximated": [4.0]} and m["dtype"] == "float16"
    assert m["members"][0]["sha256"] == hashlib.sha256(g["chunk_sha256"][:].tobytes()).hexdigest()
    assert m["members"][0]["spec"] == "logprobs:x"
    v = g["topk_values"][:, 0].astype(np.float64)
    lse = g["log_normalizers"][:, 0]
    assert (lse[:, 0] == 0).all()
    C, k = m["num_classes"], m["layout_params"]["k"]
    tail = np.clip(1 - np.exp(v).sum(-1), 0, None)
    want = np.log(np.exp(v / 4).sum(-1) + (C - k) * (tail / (C - k)) ** (1 / 4))
    np.testing.assert_allclose(lse[:, 1], want, rtol=0, atol=1e-5)
    _, lp0, _, _ = _logprobs(lm["store"])
    np.testing.assert_array_equal(g["topk_values"][:, 0], lp0.astype(np.float16))  # fp16 by default


def test_a_manifest_with_malformed_logprobs_parameters_is_refused():
    from kdcache.store import Manifest
    base = dict(num_samples=4, num_classes=10, num_members=1, dtype="float16", chunk_rows=4,
                members=[{"name": "0:t", "spec": "logprobs:x", "sha256": "0" * 64}], dataset={}, layout="topk")
    Manifest(**base, layout_params={"k": 2, "temperatures": [1.0, 2.0], "logprobs": {"approximated": [2.0]}})
    for lp, temps in (({"approximated": [2.0]}, [1.0]), ({"approximated": []}, [2.0]), ({}, [1.0]),
                      ({"approximated": [], "tail": "uniform"}, [1.0])):
        with pytest.raises(StoreError, match="give approximated"):
            Manifest(**base, layout_params={"k": 2, "temperatures": temps, "logprobs": lp})
    with pytest.raises(StoreError, match="takes parameters"):
        Manifest(**{**base, "layout": "sampled"}, layout_params={"samples": 2, "sampling_temperature": 1.0,
                                                                 "temperatures": [1.0], "seed": 0,
                                                                 "logprobs": {"approximated": []}})


def test_a_smaller_k_keeps_the_largest_and_moves_the_rest_to_the_tail_in_hdf5(lm, tmp_path):
    export_logprobs(lm["store"], str(tmp_path / "x"), "vllm", progress=False)
    out = str(tmp_path / "top3.h5")
    import_logprobs(str(tmp_path / "x"), lm["data"], out, columns_for("vllm"), k=3, dtype="float32", progress=False)
    ids0, lp0, _, _ = _logprobs(lm["store"])
    ids1, lp1, tail1, s = _logprobs(out)
    assert s.format == "hdf5" and s.manifest.layout_params["k"] == 3
    np.testing.assert_array_equal(ids1, ids0[:, :3])
    np.testing.assert_allclose(tail1, 1 - np.exp(lp0[:, :3].astype(np.float64)).sum(-1), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match=f"holds the top {K} per position"):
        import_logprobs(str(tmp_path / "x"), lm["data"], str(tmp_path / "more.h5"), columns_for("vllm"), k=K + 1,
                        progress=False)
    assert sorted(os.listdir(tmp_path)) == ["top3.h5", "x"]


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory):
    """A response-only (rows=assistant) top-k store of a chat corpus, from test_hf_chat's tokenizer and teacher."""
    from tests.test_hf_chat import SEQ, _conversations, _write
    d = tmp_path_factory.mktemp("lpchat")
    texts = [m["content"] for r in _conversations(24) for m in r["messages"]]
    teacher = _save_model(d / "teacher", texts * 4, 300)
    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<pad>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tok.save_pretrained(teacher)
    corpus = _write(d / "chat.jsonl", _conversations(12))
    data = f"hf-chat:{corpus},seq={SEQ}"
    store = str(d / "chat.zarr")
    run_kdcache("dump-logits", "--teacher", f"hf:{teacher}", "--dataset", data, "--layout", "topk", "--k", str(K),
                "--temperatures", "1", "--dtype", "float32", "--out", store)
    return {"data": f"{data},tokenizer={teacher}", "store": store}


@pytest.mark.parametrize("preset,fmt", [("llamakd", "parquet"), ("axolotl", "jsonl"), ("vllm", "parquet")])
def test_a_response_only_chat_store_exports_and_imports_back_at_its_assistant_positions(chat_store, tmp_path,
                                                                                        preset, fmt):
    import datasets
    out = tmp_path / "export"
    export_logprobs(chat_store["store"], str(out), preset, fmt=fmt, progress=False)
    a = open_store(chat_store["store"])
    data = datasets.load_dataset("parquet" if fmt == "parquet" else "json", data_files=str(out / f"data.{fmt}"),
                                 split="train")
    ids, offsets = a.sequence_index()
    first = a.read(0, int(offsets[1]))
    rec = data[0]
    cols = PRESETS[preset]
    stored = (np.asarray(rec[cols.logprobs])[:, 0] if cols.ids is None else
              np.asarray([np.nan * np.ones(K) if r is None else r for r in rec[cols.logprobs]]))
    real = ~np.isnan(stored).any(-1) & (stored > -1e8).all(-1)
    # one record row per position (a prompt position's row padding), a real row per stored (assistant) row
    assert int(real.sum()) == int(offsets[1]) < len(rec[cols.tokens]) - 1
    if preset == "axolotl":
        assert (np.asarray(rec["target_mask"])[:, 0] == real).all()
        labels = np.asarray(rec["labels"])
        assert (labels[1:][real[:-1]] >= 0).all() and (labels[1:][~real[:-1]] == -100).all()
    back = str(tmp_path / "back.zarr")
    import_logprobs(str(out), chat_store["data"], back, columns_for(preset), dtype="float32", progress=False)
    b = open_store(back)
    ids0, lp0, _, _ = _logprobs(chat_store["store"])
    ids1, lp1, _, _ = _logprobs(back)
    np.testing.assert_array_equal(ids1, ids0)
    np.testing.assert_array_equal(lp1, lp0)
    assert b.manifest.identity()["dataset"] == a.manifest.identity()["dataset"]
    assert all((x == y).all() for x, y in zip(b.sequence_index(), a.sequence_index()))
    np.testing.assert_array_equal(b.read(0, b.num_samples).labels, a.read(0, a.num_samples).labels)
    assert first.labels.min() >= 0
