"""Per-token stores for sequence teachers: a row per real position, sequence_ids/offsets, padding never stored."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from kdcache import DistillStream
from kdcache.datasets import load_dataset
from kdcache.store import open_store
from kdcache.text import TextSequences
from tests.conftest import DATA_ROOT, ROOT, TORCHRUN_2, TORCHRUN_THREADS, counted_batches, kill_when, run_kdcache
from tests.helpers import TOKEN_VOCAB, TokenTeacher, write_corpus

TEACHER = "tests.helpers:token_teacher"


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def _teacher_rows(spec: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the store must hold for sequences ``ids``: the teacher's logits and the labels at real positions only."""
    data = load_dataset(spec).dataset
    x, y = data.get_batch(ids)
    mask = torch.arange(x.shape[1])[None, :] < torch.from_numpy(data.lengths(ids))[:, None]
    with torch.no_grad():
        z = TokenTeacher()(x)
    return z[mask].numpy(), y[mask].numpy()


def test_text_dataset_is_next_token_windows_with_padding(corpus):
    train, test = load_dataset(corpus), load_dataset(corpus.replace("seq=24", "seq=24,split=test"))
    d = train.dataset
    assert isinstance(d, TextSequences) and train.num_classes == TOKEN_VOCAB == len(train.class_names)
    assert train.class_names[:2] == ["<pad>", "<unk>"]
    lengths = d.lengths()
    assert lengths.min() >= 1 and lengths.max() == 24 and len(np.unique(lengths)) > 10  # real variety
    x, y = d.get_batch(np.arange(len(d)))
    valid = torch.arange(x.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
    assert (y[~valid] == -1).all() and (x[~valid] == 0).all() and (y[valid] >= 0).all()
    inner = valid[:, 1:]  # inside a window, the label at t is the input at t + 1
    assert torch.equal(y[:, :-1][inner], x[:, 1:][inner])
    assert len(test) > 0 and test.fingerprint != train.fingerprint
    with pytest.raises(Exception, match="split"):
        load_dataset(corpus + ",split=valid")


@pytest.mark.parametrize("suffix,layout", [(".zarr", "dense"), (".h5", "dense"), (".zarr", "topk")])
def test_dump_stores_a_row_per_real_position_only(corpus, tmp_path, suffix, layout):
    out = str(tmp_path / f"t{suffix}")
    extra = ["--layout", "topk", "--k", "7"] if layout == "topk" else ["--dtype", "float32"]
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", out, "--chunk-rows", "50",
                "--batch-size", "5", *extra)
    store = open_store(out)
    m = store.manifest
    data = load_dataset(corpus).dataset
    ids, offsets = store.sequence_index()
    np.testing.assert_array_equal(ids, np.arange(len(data)))
    np.testing.assert_array_equal(np.diff(offsets), data.lengths())
    assert m.num_samples == data.lengths().sum() < len(data) * 24  # padding takes no rows
    assert m.sequences["count"] == len(data) and m.sequences["max_length"] == 24
    blk = store.read(0, m.num_samples)
    np.testing.assert_array_equal(blk.sample_ids, np.repeat(ids, np.diff(offsets)))
    want_z, want_y = _teacher_rows(corpus, ids)
    np.testing.assert_array_equal(blk.labels, want_y)
    if layout == "dense":
        np.testing.assert_allclose(blk.logits[:, 0], want_z, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(blk.data["topk_ids"][:, 0], torch.from_numpy(want_z).topk(7).indices.numpy())
        lse = torch.logsumexp(torch.from_numpy(want_z) / 4.0, -1).numpy()
        np.testing.assert_allclose(blk.data["log_normalizers"][:, 0, 2], lse, rtol=1e-5)
    part = store.read_sequences(3, 5)
    assert len(part) == offsets[5] - offsets[3] and set(part.sample_ids) == {3, 4}
    assert run_kdcache("verify", out).returncode == 0
    info = run_kdcache("inspect", out).stdout
    assert f"{len(data)} (a row per position" in info and "positions x 1 members" in info


def test_verify_names_rows_placed_in_the_wrong_sequence(corpus, tmp_path):
    out = str(tmp_path / "t.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", out)
    ids = zarr.open_array(f"{out}/sequence_ids", mode="r+")
    a = ids[:]
    a[[0, 1]] = a[[1, 0]]  # two sequences swapped in the index: their rows no longer belong where it says
    ids[:] = a
    p = run_kdcache("verify", out, check=False)
    assert p.returncode != 0 and "disagree with sequence_ids/sequence_offsets" in p.stdout + p.stderr


def test_convert_dense_to_topk_keeps_the_sequence_index(corpus, tmp_path):
    dense, topk = str(tmp_path / "d.zarr"), str(tmp_path / "k.h5")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", dense, "--chunk-rows", "64")
    run_kdcache("convert", dense, topk, "--layout", "topk", "--k", "5")
    a, b = open_store(dense), open_store(topk)
    for x, y in zip(a.sequence_index(), b.sequence_index()):
        np.testing.assert_array_equal(x, y)
    assert b.manifest.sequences == a.manifest.sequences
    assert run_kdcache("verify", topk).returncode == 0
    for store in (dense, topk):  # the live teacher on whole sequences gives the stored rows
        p = run_kdcache("verify", store, "--teacher", TEACHER, "--rows", "400")
        assert "top-1 agreement 1.0000" in p.stdout


def test_stream_yields_whole_sequences_each_once_aligned_with_their_rows(corpus, tmp_path):
    out = str(tmp_path / "t.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", out, "--chunk-rows", "40",
                "--dtype", "float32")
    data = load_dataset(corpus)
    ref = open_store(out).read(0, 10**9)
    _, offsets = open_store(out).sequence_index()
    orders = []
    for workers in (0, 2):
        stream = DistillStream(out, data, batch_size=8, block_rows=64, window_bytes=1 << 16, return_ids=True)
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            seen = []
            for x, y, z, mask, sid in DataLoader(stream, batch_size=None, num_workers=workers):
                assert z.shape == (int(mask.sum()), 1, TOKEN_VOCAB) and x.shape == mask.shape == y.shape
                rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in sid.numpy()])
                np.testing.assert_array_equal(z[:, 0].numpy(), ref.logits[rows, 0])
                np.testing.assert_array_equal(y[mask].numpy(), ref.labels[rows])
                assert (y[~mask] == -1).all()
                seen.append(sid.numpy())
            seen = np.concatenate(seen)
            assert sorted(seen) == list(range(len(data)))  # every sequence, once, whole
            orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled per epoch


def test_students_distil_a_sequence_teacher_position_by_position(corpus, tmp_path):
    """The teacher depends on each position's token and the one before: a student only matches it
    if every stored row meets its own position (a shift or shuffle of rows would not be learnable)."""
    test = corpus.replace("seq=24", "seq=24,split=test")
    train_store, test_store = str(tmp_path / "train.h5"), str(tmp_path / "test.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", train_store, "--layout", "topk",
                "--k", "20", "--temperatures", "1,2")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", test, "--out", test_store)
    out = tmp_path / "students"
    run_kdcache("train-student", "--dataset", corpus, "--store", train_store, "--student", "lstm:32,64",
                "--temperature", "1,2", "--alpha", "1", "--epochs", "4", "--optimizer", "adam", "--lr", "0.01",
                "--batch-size", "16", "--eval-dataset", test, "--eval-store", test_store, "--out", str(out))
    rows = open_store(train_store).num_samples
    for run in ("T1-a1-s0", "T2-a1-s0"):
        hist = json.loads((out / run / "metrics.json").read_text())
        assert all(h["coverage_ok"] and h["positions_seen"] == rows for h in hist)
        assert hist[-1]["loss"] < hist[0]["loss"]
        assert hist[-1]["teacher_agreement"] > 0.8, hist[-1]
        assert hist[-1]["eval_perplexity"] > 1
    assert "eval perplexity" in (out / "summary.md").read_text()


def test_refusals(corpus, tmp_path):
    out = str(tmp_path / "t.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", out)
    p = run_kdcache("train-student", "--dataset", corpus, "--store", out, "--student", "mlp:10", "--out",
                    str(tmp_path / "s"), check=False)
    assert p.returncode != 0 and "output per position, e.g. lstm" in p.stderr and len(p.stderr.splitlines()) == 1
    p = run_kdcache("train-student", "--dataset", "synthetic:n=50,dim=4,classes=3", "--store", out, "--student",
                    "mlp:10", "--out", str(tmp_path / "s"), check=False)
    assert p.returncode != 0 and "pass the dataset the store was dumped from" in p.stderr
    p = run_kdcache("dump-logits", "--teacher", "mlp:10", "--dataset", corpus, "--out", str(tmp_path / "m.zarr"),
                    check=False)
    assert p.returncode != 0 and "[batch, length, classes]" in p.stderr
    p = run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", str(tmp_path / "e.zarr"),
                    "--subset", "exclude-classes:3", check=False)
    assert p.returncode != 0 and "label per position" in p.stderr
    p = run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", f"text:{tmp_path}/nothing.txt",
                    "--out", str(tmp_path / "n.zarr"), check=False)
    assert p.returncode != 0 and "no text files" in p.stderr


@pytest.mark.slow
def test_kill_minus_nine_then_resume_gives_identical_token_store(corpus, tmp_path):
    args = ["dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--chunk-rows", "300", "--batch-size", "4"]
    ref = str(tmp_path / "ref.zarr")
    run_kdcache(*args, "--out", ref)
    out = str(tmp_path / "killed.zarr")
    counter = tmp_path / "batches"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT,
           "KDCACHE_TEST_COUNTER": str(counter), "KDCACHE_TEST_DELAY": "0.01"}
    chunks = open_store(ref).manifest.num_chunks
    # killed once some chunks are written (under load the writer lags the teacher's forwards)
    digests = tmp_path / "killed.zarr" / "chunk_sha256" / "c"
    kill_when([sys.executable, "-m", "kdcache", *args, "--out", out], env,
              lambda: counted_batches(counter) >= 60 and sum(len(f) for _, _, f in os.walk(digests)) >= 2)
    partial = open_store(out, allow_partial=True)
    done = int(partial.written_chunks().sum())
    assert 0 < done < chunks, (done, chunks)
    run_kdcache(*args, "--out", out)
    a, b = open_store(ref), open_store(out)
    np.testing.assert_array_equal(a.read(0, a.num_samples).logits, b.read(0, b.num_samples).logits)
    np.testing.assert_array_equal(a.digests(), b.digests())
    assert run_kdcache("verify", out).returncode == 0


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_token_store(corpus, tmp_path):
    args = ["dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--chunk-rows", "50", "--batch-size", "4",
            "--device", "cpu", "--layout", "topk", "--k", "5"]
    single, multi = str(tmp_path / "single.h5"), str(tmp_path / "multi.h5")
    run_kdcache(*args, "--out", single, env=TORCHRUN_THREADS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    torchrun = TORCHRUN_2
    p = subprocess.run([*torchrun, *args, "--out", multi], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = open_store(single), open_store(multi)
    for name in a.manifest.data_arrays:
        np.testing.assert_array_equal(a.read(0, a.num_samples).data[name], b.read(0, b.num_samples).data[name])
    np.testing.assert_array_equal(a.digests(), b.digests())
    for x, y in zip(a.sequence_index(), b.sequence_index()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_torchrun_training_on_a_token_store_sees_every_sequence_once(corpus, tmp_path):
    store = str(tmp_path / "t.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", corpus, "--out", store, "--chunk-rows", "64")
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kdcache",
           "train-student", "--dataset", corpus, "--store", store, "--student", "lstm:16,32", "--epochs", "2",
           "--batch-size", "8", "--device", "cpu", "--optimizer", "adam", "--lr", "0.01", "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    hist = json.loads((out / "metrics.json").read_text())
    s = open_store(store)
    assert all(h["coverage_ok"] and h["samples_seen"] == s.manifest.sequences["count"]
               and h["positions_seen"] == s.num_samples for h in hist)
