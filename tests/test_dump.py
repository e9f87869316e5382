"""Stage one through the real CLI: resume after kill -9, torchrun, ensembles, refusals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdcache.store import open_store
from tests.conftest import DATA_ROOT, ROOT, TORCHRUN_2, TORCHRUN_THREADS, counted_batches, kill_when, run_kdcache
from tests.helpers import SYNTH

SLOW = "tests.helpers:slow_teacher"


def arrays(path):
    s = open_store(path)
    b = s.read(0, s.num_samples)
    return b.logits, b.sample_ids, b.labels, s.digests(), s.manifest


def assert_same_store(a, b):
    za, ia, ya, da, ma = arrays(a)
    zb, ib, yb, db, mb = arrays(b)
    np.testing.assert_array_equal(za, zb)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(da, db)
    assert ma.identity() == mb.identity()


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_kill_minus_nine_then_resume_gives_identical_store(tmp_path, suffix):
    args = ["dump-logits", "--teacher", SLOW, "--dataset", SYNTH, "--chunk-rows", "100", "--batch-size", "32"]
    ref = str(tmp_path / f"ref{suffix}")
    accuracy = run_kdcache(*args, "--out", ref).stdout.split("teacher accuracy ")[1].split()[0]

    out = str(tmp_path / f"killed{suffix}")
    counter = tmp_path / "batches"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT,
           "KDCACHE_TEST_COUNTER": str(counter), "KDCACHE_TEST_DELAY": "0.02"}
    # 2000 rows = 20 chunks of 4 batches: kill after ~30 batches, mid-way through a chunk.
    status = kill_when([sys.executable, "-m", "kdcache", *args, "--out", out], env,
                       lambda: counted_batches(counter) >= 30)
    assert status == -signal.SIGKILL

    partial = open_store(out, allow_partial=True)
    done = int(partial.written_chunks().sum())
    partial.close()
    assert 0 < done < 20, f"expected a dump killed mid-way, found {done} of 20 chunks written"
    with pytest.raises(Exception, match="incomplete"):
        open_store(out)

    p = run_kdcache(*args, "--out", out)
    assert f"{done} chunks kept from an earlier run" in p.stdout
    assert f"wrote {2000 - done * 100} of 2000 rows" in p.stdout
    assert f"teacher accuracy {accuracy}" in p.stdout  # over the whole store, not the rows this run wrote
    assert_same_store(ref, out)
    assert run_kdcache("verify", out).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_torchrun_two_ranks_equals_single_process(tmp_path, suffix):
    args = ["dump-logits", "--teacher", SLOW, "--teacher", "tests.helpers:other_teacher", "--dataset", SYNTH,
            "--chunk-rows", "50", "--batch-size", "32", "--device", "cpu"]
    single = str(tmp_path / f"single{suffix}")
    run_kdcache(*args, "--out", single, env=TORCHRUN_THREADS)
    multi = str(tmp_path / f"multi{suffix}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    torchrun = TORCHRUN_2
    p = subprocess.run([*torchrun, *args, "--out", multi], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("wrote 2000 of 2000 rows") == 1  # only rank 0 reports, with both ranks' rows
    assert_same_store(single, multi)
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]


def test_ensemble_members_must_agree_on_classes(tmp_path):
    p = run_kdcache("dump-logits", "--teacher", SLOW, "--teacher", "tests.helpers:seven_class_teacher",
                    "--dataset", SYNTH, "--out", str(tmp_path / "e.zarr"), check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "Error: ensemble members disagree on the number of classes: teacher 'tests.helpers:seven_class_teacher' "
        "(member 1) gives 7, teacher 'tests.helpers:slow_teacher' gives 5"]


def test_nan_logits_are_refused_with_sample_ids(tmp_path):
    out = tmp_path / "nan.zarr"
    p = run_kdcache("dump-logits", "--teacher", "tests.helpers:nan_teacher", "--dataset", SYNTH,
                    "--chunk-rows", "500", "--out", str(out), check=False)
    assert p.returncode == 1
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith("Error: non-finite teacher logits") and "sample ids" in line
    assert not open_store(str(out), allow_partial=True).written_chunks().any()


def test_missing_mnist_says_where_to_put_it(tmp_path):
    p = run_kdcache("dump-logits", "--teacher", "mlp:10", "--dataset", "mnist:train", "--out",
                    str(tmp_path / "m.zarr"), "--data-root", str(tmp_path / "empty"),
                    env={"KDCACHE_NO_DOWNLOAD": "1"}, check=False)
    assert p.returncode == 1
    assert "MNIST not found under" in p.stderr and "--data-root" in p.stderr and "Traceback" not in p.stderr


def test_unlabelled_callable_dataset_and_subset_file(tmp_path):
    idx = tmp_path / "idx.npy"
    np.save(idx, np.array([5, 3, 250, 0], dtype=np.int64))
    out = str(tmp_path / "u.h5")
    run_kdcache("dump-logits", "--teacher", SLOW, "--dataset", "tests.helpers:unlabelled_dataset",
                "--subset", str(idx), "--out", out, "--dtype", "float32")
    z, ids, y, _, m = arrays(out)
    assert ids.tolist() == [5, 3, 250, 0] and y.tolist() == [-1] * 4 and m.dtype == "float32"
    from tests.helpers import SlowLinear, TupleFree
    expected = SlowLinear()(TupleFree().x[[5, 3, 250, 0]]).detach().numpy()
    np.testing.assert_allclose(z[:, 0], expected, rtol=1e-6)


def test_student_checkpoint_and_torchscript_are_teachers(tmp_path):
    run_kdcache("train-student", "--dataset", SYNTH, "--student", "mlp:32", "--epochs", "1",
                "--out", str(tmp_path / "t"))
    a = str(tmp_path / "a.zarr")
    run_kdcache("dump-logits", "--teacher", str(tmp_path / "t"), "--dataset", SYNTH, "--out", a)
    from kdcache.specs import load_model
    m = load_model(str(tmp_path / "t")).module.eval()
    ts = tmp_path / "t.pt"
    torch.jit.save(torch.jit.script(m), str(ts))
    b = str(tmp_path / "b.zarr")
    run_kdcache("dump-logits", "--teacher", str(ts), "--dataset", SYNTH, "--out", b)
    np.testing.assert_array_equal(arrays(a)[0], arrays(b)[0])
    assert arrays(a)[4].members[0]["sha256"] == arrays(b)[4].members[0]["sha256"]
    # torch.export (TorchScript is deprecated as of torch 2.13), with a dynamic batch dimension
    program = torch.export.export(m, (torch.zeros(4, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    pt2 = tmp_path / "t.pt2"
    torch.export.save(program, str(pt2))
    c = str(tmp_path / "c.zarr")
    run_kdcache("dump-logits", "--teacher", str(pt2), "--dataset", SYNTH, "--out", c)
    np.testing.assert_array_equal(arrays(a)[0], arrays(c)[0])
    (tmp_path / "bad.pt2").write_bytes(b"not an archive")
    p = run_kdcache("dump-logits", "--teacher", str(tmp_path / "bad.pt2"), "--dataset", SYNTH,
                    "--out", str(tmp_path / "d.zarr"), check=False)
    assert p.returncode == 1 and "is not a torch.export program kdcache can load safely" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "d.zarr").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_second_dump_is_refused_then_overwritten(tmp_path):
    out = str(tmp_path / "s.zarr")
    run_kdcache("dump-logits", "--teacher", SLOW, "--dataset", SYNTH, "--out", out)
    p = run_kdcache("dump-logits", "--teacher", "tests.helpers:other_teacher", "--dataset", SYNTH, "--out", out,
                    check=False)
    assert p.returncode == 1 and "already holds a complete store; pass --overwrite" in p.stderr
    assert arrays(out)[4].members[0]["spec"] == SLOW
    run_kdcache("dump-logits", "--teacher", "tests.helpers:other_teacher", "--dataset", SYNTH, "--out", out,
                "--overwrite")
    assert arrays(out)[4].members[0]["spec"] == "tests.helpers:other_teacher"


def test_dataloader_workers_give_the_same_store_and_amp_stays_close(tmp_path):
    args = ["dump-logits", "--teacher", "mlp:64", "--dataset", SYNTH, "--chunk-rows", "300", "--dtype", "float32",
            "--batch-size", "100"]
    run_kdcache(*args, "--out", str(tmp_path / "plain.zarr"))
    run_kdcache(*args, "--workers", "2", "--out", str(tmp_path / "workers.zarr"))
    assert_same_store(str(tmp_path / "plain.zarr"), str(tmp_path / "workers.zarr"))
    run_kdcache(*args, "--amp", "bf16", "--out", str(tmp_path / "bf16.zarr"))
    a, b = arrays(str(tmp_path / "plain.zarr"))[0], arrays(str(tmp_path / "bf16.zarr"))[0]
    assert not np.array_equal(a, b)  # autocast really ran in bfloat16 ...
    np.testing.assert_allclose(a, b, atol=0.1 * np.abs(a).max())  # ... and stays close to float32


@pytest.mark.slow
def test_a_full_disk_stops_the_dump_with_one_line_and_a_rerun_completes_it(tmp_path):
    """A real full file system: a 5 MB tmpfs for an 8 MB store (root can mount one, as CI runs)."""
    import shutil
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk case is not simulated")
    try:
        args = ["dump-logits", "--teacher", "mlp:64", "--dataset", "synthetic:n=20000,dim=16,classes=200",
                "--chunk-rows", "500"]
        run_kdcache(*args, "--out", str(tmp_path / "ref.zarr"))
        p = run_kdcache(*args, "--out", str(mnt / "t.zarr"), check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and "failed (No space left on device)" in lines[0], p.stderr
        assert "the chunks written before are kept" in lines[0]
        kept = open_store(str(mnt / "t.zarr"), allow_partial=True)
        written = kept.written_chunks()
        assert 0 < written.sum() < len(written) and not kept.manifest.complete
        kept.close()
        subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)  # space is freed
        p = run_kdcache(*args, "--out", str(mnt / "t.zarr"))
        assert f"{int(written.sum())} chunks kept from an earlier run" in p.stdout
        a, b = open_store(str(mnt / "t.zarr")), open_store(str(tmp_path / "ref.zarr"))
        assert np.array_equal(a.digests(), b.digests())
        assert np.array_equal(a.read(0, a.num_samples).logits, b.read(0, b.num_samples).logits)
        a.close()
        b.close()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


@pytest.mark.parametrize("teachers", [[SLOW], [SLOW, "tests.helpers:other_teacher"]])
def test_topk_encoded_where_the_teacher_ran_equals_encoding_on_the_host(tmp_path, teachers):
    """On a GPU the dump keeps dense rows on the device and copies only the top-k arrays; forced here on
    the CPU, that path writes the same bytes and counts the same accuracy."""
    from kdcache.dump import DumpConfig, dump_logits
    runs = {}
    for flag in (False, True):
        out = str(tmp_path / f"k-{flag}.zarr")
        runs[flag] = dump_logits(DumpConfig(teachers=teachers, dataset=SYNTH, out=out, layout="topk", k=3,
                                            chunk_rows=128, batch_size=100, progress=False, encode_on_device=flag))
    a, b = open_store(str(tmp_path / "k-False.zarr")), open_store(str(tmp_path / "k-True.zarr"))
    assert (a.digests() == b.digests()).all()
    assert runs[True].member_accuracy == runs[False].member_accuracy
    assert runs[True].ensemble_accuracy == runs[False].ensemble_accuracy
