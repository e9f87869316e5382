"""Augmented views: built-in augmentations, stores of views (dump, replay, verify --teacher), online
distillation with the same views, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdcache.augment import Crop, Flip, Jitter, ResizedCrop, jitter, parse_augment
from kdcache.datasets import load_dataset
from kdcache.dump import DumpConfig, dump_logits
from kdcache.errors import KdcacheError, SpecError, StoreError
from kdcache.store import open_store
from kdcache.stream import DatasetStream, DistillStream
from kdcache.teacher_check import check_teacher
from kdcache.views import Views, draw_params, epoch_view
from tests import helpers
from tests.conftest import TORCHRUN_2, TORCHRUN_THREADS, invoke_kdcache, run_kdcache

TEACHER = "tests.helpers:image_teacher"
RECORDING = "tests.helpers:recording_image_teacher"
DATA = "mnist:test"
SUBSET = "0:600"   # 600 samples in chunks of 128 rows: views start inside chunks


def _images(n=6, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, 28, 28)).astype(np.float32))


def _numpy_shift(x, dy, dx):
    """FORMAT.md's jitter: out[r, c] = x[r + dy, c + dx], 0 outside."""
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    ys, xs = np.arange(h) + dy, np.arange(w) + dx
    oky, okx = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
    out[..., np.flatnonzero(oky)[:, None], np.flatnonzero(okx)[None, :]] = x[..., ys[oky][:, None], xs[okx][None, :]]
    return out


def test_builtins_follow_their_documented_formulas():
    x = _images()
    g = torch.Generator().manual_seed(1)
    j = Jitter(3)
    p = j.sample(g, len(x), (28, 28))
    assert p.shape == (6, 2) and p.abs().max() <= 3 and p.dtype == torch.float32
    out = j.apply(x, p)
    for i in range(len(x)):
        np.testing.assert_array_equal(out[i].numpy(), _numpy_shift(x[i].numpy(), int(p[i, 0]), int(p[i, 1])))
    c = Crop(4)
    p = c.sample(g, len(x), (28, 28))
    assert p.min() >= 0 and p.max() <= 8
    out = c.apply(x, p)
    for i in range(len(x)):
        padded = np.pad(x[i].numpy(), 4)
        t, left = int(p[i, 0]), int(p[i, 1])
        np.testing.assert_array_equal(out[i].numpy(), padded[t:t + 28, left:left + 28])
    f = Flip()
    out = f.apply(x, torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0], [1.0]]))
    np.testing.assert_array_equal(out[0].numpy(), x[0].numpy()[:, ::-1])
    np.testing.assert_array_equal(out[1].numpy(), x[1].numpy())


def test_resized_crop_params_stay_in_the_image_and_the_full_box_is_the_identity():
    rc = ResizedCrop(0.08)
    g = torch.Generator().manual_seed(0)
    x = _images(4)
    p = rc.sample(g, 200, (1, 28, 28))
    top, left, h, w = p.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert (h * w >= 0.07 * 784).all() and (h * w <= 784).all()
    full = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).repeat(4, 1)
    torch.testing.assert_close(rc.apply(x, full), x, atol=1e-5, rtol=0)  # float32 rounding
    assert rc.apply(x[:, None], full).shape == (4, 1, 28, 28)


def test_apply_gives_each_item_the_same_result_whatever_the_batch():
    x = _images(16)
    for aug in (parse_augment("jitter:2+flip"), parse_augment("crop:3"), parse_augment("resized-crop:0.2,1")):
        p = draw_params(aug, 0, np.arange(16), np.zeros(16, dtype=int), (28, 28))
        whole = aug.apply(x, p)
        for i in (0, 7, 15):
            assert torch.equal(aug.apply(x[i:i + 1], p[i:i + 1])[0], whole[i])


def test_online_jitter_draws_as_before():
    """Teacher training with --jitter: the same draws and shifts as the earlier implementation."""
    x = _images(8)
    a = jitter(x, 2, torch.Generator().manual_seed(5))
    shifts = torch.randint(-2, 3, (8, 2), generator=torch.Generator().manual_seed(5))
    for i in range(8):
        np.testing.assert_array_equal(a[i].numpy(), _numpy_shift(x[i].numpy(), int(shifts[i, 0]), int(shifts[i, 1])))


def test_parameters_depend_on_seed_sample_and_view_only():
    aug = parse_augment("jitter:2+flip")
    ids = np.array([5, 9, 200, 3])
    a = draw_params(aug, 7, ids, np.array([0, 1, 2, 3]), (28, 28))
    b = draw_params(aug, 7, ids[::-1].copy(), np.array([3, 2, 1, 0]), (28, 28))
    assert torch.equal(a, b.flip(0))  # order and batching do not matter
    assert not torch.equal(a, draw_params(aug, 8, ids, np.array([0, 1, 2, 3]), (28, 28)))
    many = draw_params(aug, 7, np.zeros(50, dtype=int), np.arange(50), (28, 28))
    assert len(torch.unique(many, dim=0)) > 10  # the views of one sample differ
    assert [epoch_view(3, e, 4) for e in range(6)] == [3, 0, 1, 2, 3, 0]


@pytest.mark.parametrize("suffix,layout", [(".zarr", "dense"), (".h5", "dense"), (".zarr", "topk"),
                                           (".h5", "topk")])
def test_replay_is_exact_and_the_live_teacher_gives_the_stored_logits(tmp_path, suffix, layout):
    """For every view of every chunk, the input the stream gives is bit for bit the one the teacher was
    given; the live teacher on the replayed views gives the stored logits."""
    helpers.SEEN_INPUTS.clear()
    out = str(tmp_path / f"v{suffix}")
    extra = {"k": 3} if layout == "topk" else {}
    dump_logits(DumpConfig(teachers=[RECORDING], dataset=DATA, subset=SUBSET, out=out, augment="jitter:2+flip",
                           views=3, chunk_rows=128, batch_size=100, dtype="float32", layout=layout, progress=False,
                           seed=11, **extra))
    seen = torch.cat(helpers.SEEN_INPUTS[1:])  # the first call is the dump's probe of the output shape
    s = open_store(out)
    m = s.manifest
    assert m.views["count"] == 3 and m.num_samples == 1800 and len(seen) == 1800
    assert m.views["columns"] == ["jitter.shift_y", "jitter.shift_x", "flip.flip"]
    ids = s.read(0, 600).sample_ids
    np.testing.assert_array_equal(s.read(0, 1800).sample_ids, np.tile(ids, 3))
    data = load_dataset(DATA)
    stream = DistillStream(s, data, 64, seed=0, return_ids=True)
    for epoch in range(3):
        stream.set_epoch(epoch)
        v = stream.view
        rows = 0
        for x, _y, _z, sid in stream:  # shuffled: find each row by its id
            pos = v * 600 + np.searchsorted(ids, sid.numpy())
            assert torch.equal(x, seen[pos]), f"view {v}: replayed inputs differ from the teacher's"
            rows += len(x)
        assert rows == 600
    assert sorted(epoch_view(0, e, 3) for e in range(3)) == [0, 1, 2]
    found = check_teacher(out, [TEACHER], rows=300)
    assert found.ok and found.rows == 300 and set(found.views) == {0, 1, 2}
    assert found.max_abs_diff < 1e-4 and min(found.top1_agreement) == 1.0


def test_views_store_trains_and_online_kd_sees_the_same_views(tmp_path):
    out = str(tmp_path / "v.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--subset", SUBSET, "--augment", "crop:2",
                "--views", "2", "--seed", "4", "--chunk-rows", "128", "--out", out)
    data = load_dataset(DATA)
    cached = DistillStream(out, data, 50, seed=1, return_ids=True, shuffle=False)
    views = Views(**open_store(out).manifest.views)
    online = DatasetStream(data, 50, indices=np.arange(600), seed=1, return_ids=True, shuffle=False, views=views)
    for epoch in range(3):
        cached.set_epoch(epoch)
        online.set_epoch(epoch)
        for (xa, _, _, ia), (xb, _, _, ib) in zip(cached, online):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
    run = tmp_path / "student"
    run_kdcache("train-student", "--dataset", DATA, "--store", out, "--student", "mlp:16", "--epochs", "2",
                "--out", str(run))
    config = json.loads((run / "config.json").read_text())
    assert config["store_identity"]["views"]["augment"] == "crop:2"
    assert [m["samples_seen"] for m in json.loads((run / "metrics.json").read_text())] == [600, 600]
    assert all(m["coverage_ok"] for m in json.loads((run / "metrics.json").read_text()))
    online_run = tmp_path / "online"
    run_kdcache("train-student", "--dataset", DATA, "--subset", SUBSET, "--teacher", TEACHER, "--augment", "crop:2",
                "--views", "2", "--augment-seed", "4", "--student", "mlp:16", "--epochs", "2", "--out", str(online_run))
    config = json.loads((online_run / "config.json").read_text())
    assert config["store_identity"]["views"]["augment"] == "crop:2"
    assert config["store_identity"]["online_teachers"][0]["spec"] == TEACHER


def test_user_augmentation_sparse_layout_and_ensemble(tmp_path):
    out = str(tmp_path / "u.h5")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--teacher", "mlp:20", "--dataset", DATA, "--subset", "0:200",
                "--augment", "tests.helpers:brightness", "--views", "2", "--layout", "sampled", "--samples", "8",
                "--out", out)
    assert run_kdcache("verify", out, "--teacher", TEACHER, "--teacher", "mlp:20").returncode == 0
    assert open_store(out).manifest.views["columns"] == ["gain"]
    p = run_kdcache("inspect", out)
    assert "views       2 per sample (200 samples), augment tests.helpers:brightness" in p.stdout


def test_verify_teacher_refuses_other_weights_and_changed_inputs(tmp_path):
    out = str(tmp_path / "v.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--subset", "0:200", "--out", out)
    p = run_kdcache("verify", out, "--teacher", TEACHER, "--rows", "50")
    assert p.returncode == 0 and "live teacher on 50 rows" in p.stdout
    p = run_kdcache("verify", out, "--teacher", "mlp:16", check=False)
    assert p.returncode == 1 and "are not the weights that wrote the store" in p.stderr
    # the same weights, another dataset behind the same spec: refused as other data before anything runs
    with pytest.raises(KdcacheError, match="one per member"):
        check_teacher(out, [TEACHER, TEACHER])


def _one_line_error(args, message):
    p = invoke_kdcache(*args)
    assert p.returncode == 1, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], p.stderr


def test_bad_view_requests_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "x.zarr"
    base = ["dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--subset", "0:100", "--out", str(out)]
    _one_line_error(["dump-logits", "--teacher", "mlp:8", "--dataset", "synthetic:100", "--augment", "jitter:2",
                     "--out", str(out)], "cannot augment dataset 'synthetic:100': jitter:2 needs image items")
    _one_line_error([*base, "--augment", "jitter:2", "--views", "0"], "--views 0: give at least 1")
    _one_line_error([*base, "--views", "3"], "--views needs --augment")
    _one_line_error([*base, "--augment", "rotate:5"], "unknown augmentation 'rotate:5'")
    _one_line_error([*base, "--augment", "jitter:x"], "'x' is not an integer")
    _one_line_error([*base, "--augment", "tests.helpers:wrong_width_augment"], "not a float tensor [1, 1]")
    assert not out.exists()
    run_kdcache(*base, "--augment", "jitter:1", "--views", "2")
    _one_line_error(["train-student", "--dataset", DATA, "--store", str(out), "--student", "mlp:8", "--jitter", "2",
                     "--out", str(tmp_path / "o")], "--jitter when distilling")
    _one_line_error(["train-student", "--dataset", DATA, "--store", str(out), "--student", "mlp:8", "--augment",
                     "flip", "--out", str(tmp_path / "o")], "the store decides the augmentation")
    assert not (tmp_path / "o").exists()


def test_a_store_whose_columns_do_not_match_its_augmentation_is_refused():
    v = Views(2, "jitter:2", ["shift_y", "shift_x", "extra"], 0, [28, 28])
    with pytest.raises(StoreError, match="view_params have columns shift_y, shift_x, extra but augmentation "
                                         "'jitter:2' takes shift_y, shift_x"):
        v.augmentation("s.zarr")
    with pytest.raises(SpecError, match="flip takes no argument"):
        parse_augment("flip:1")


@pytest.mark.slow
def test_killed_and_multi_process_view_dumps_equal_one_uninterrupted_dump(tmp_path):
    """Parameters are drawn per (seed, sample, view): a dump resumed after kill -9 and a dump by two
    torchrun ranks write the same bytes as one process."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import DATA_ROOT, ROOT
    from tests.test_dump import assert_same_store
    args = ["dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--subset", "0:1000", "--augment",
            "jitter:2+flip", "--views", "2", "--seed", "3", "--chunk-rows", "100", "--batch-size", "32",
            "--device", "cpu"]
    ref = str(tmp_path / "ref.zarr")
    run_kdcache(*args, "--out", ref, env=TORCHRUN_THREADS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT, **TORCHRUN_THREADS}

    killed = str(tmp_path / "killed.zarr")
    counter = tmp_path / "batches"
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args, "--out", killed], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**env, "KDCACHE_TEST_COUNTER": str(counter),
                                                            "KDCACHE_TEST_DELAY": "0.02"})
    deadline = time.time() + 120
    while time.time() < deadline and (not counter.exists() or len(counter.read_text()) < 30):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = int(open_store(killed, allow_partial=True).written_chunks().sum())
    assert 0 < done < 20
    assert f"{done} chunks kept" in run_kdcache(*args, "--out", killed, env=TORCHRUN_THREADS).stdout
    assert_same_store(ref, killed)

    multi = str(tmp_path / "multi.zarr")
    torchrun = TORCHRUN_2
    p = subprocess.run([*torchrun, *args, "--out", multi], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_store(ref, multi)
    for path in (killed, multi):
        np.testing.assert_array_equal(open_store(path).read(0, 2000).data["view_params"],
                                      open_store(ref).read(0, 2000).data["view_params"])
