"""The store cache: dumps without --out are keyed by teacher and data, reused, resumed, locked, listed
and pruned, through the real CLI and real stores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdcache import cache
from kdcache.store import open_store
from tests.conftest import DATA_ROOT, ROOT, invoke_kdcache, kill_when, run_kdcache
from tests.helpers import SYNTH

SLOW = "tests.helpers:slow_teacher"


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KDCACHE_CACHE", str(root))
    return root


def dump(*extra, env=None, check=True):
    return run_kdcache("dump-logits", "--teacher", SLOW, "--dataset", SYNTH, "--chunk-rows", "100",
                       "--batch-size", "100", *extra, env=env, check=check)


def batches(counter: Path) -> int:
    return len(counter.read_text()) if counter.exists() else 0


def counted(tmp_path, name="batches"):
    counter = tmp_path / name
    return counter, {"KDCACHE_TEST_COUNTER": str(counter), "KDCACHE_TEST_DELAY": "0"}


def test_second_identical_dump_reuses_the_store_without_running_the_teacher(cache_env, tmp_path):
    counter, env = counted(tmp_path)
    first = dump(env=env).stdout
    assert "wrote 2000 of 2000 rows" in first and batches(counter) == 21  # a probe of the output shape, 20 batches
    path = first.split(" to ")[1].split(" in ")[0]
    assert Path(path).parent == cache_env / "stores"
    second = dump(env=env).stdout
    assert f"reusing cached store {path}" in second and batches(counter) == 21  # the teacher did not run
    assert dump("--out", "cache", env=env).stdout == second
    assert run_kdcache("verify", path).returncode == 0
    third = dump("--overwrite", env=env).stdout  # recomputed on request, in place
    assert f"wrote 2000 of 2000 rows to {path}" in third and batches(counter) == 42


def test_what_changes_the_logits_changes_the_key(cache_env):
    from kdcache.dump import DumpConfig, dump_logits
    base = dict(teachers=[SLOW], dataset=SYNTH, chunk_rows=100, batch_size=100, progress=False)
    keys = set()
    for extra in ({}, {"teachers": [SLOW, "tests.helpers:other_teacher"]}, {"subset": "0:1000"},
                  {"layout": "topk", "k": 2}, {"dtype": "float32"}, {"layout": "sampled", "samples": 4},
                  {"layout": "sampled", "samples": 4, "seed": 1}):
        s = dump_logits(DumpConfig(**{**base, **extra}))
        assert not s.reused and s.rows_written, extra
        keys.add(s.cache_key)
    assert len(keys) == 7
    # the backend, chunking and codec change bytes, not logits: the store is reused whatever their values
    again = dump_logits(DumpConfig(**{**base, "format": "hdf5", "chunk_rows": 50, "compression": "zstd"}))
    assert again.reused and again.cache_key in keys
    assert len(cache.entries()) == 7


def test_two_concurrent_identical_dumps_give_one_correct_store(cache_env, tmp_path):
    counter, env = counted(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT, **env, "KDCACHE_TEST_DELAY": "0.05"}
    cmd = [sys.executable, "-m", "kdcache", "dump-logits", "--teacher", SLOW, "--dataset", SYNTH, "--chunk-rows",
           "100", "--batch-size", "100"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = sorted(o[0].split(" ")[0] for o in outs)
    assert said == ["reusing", "wrote"]  # one computed it, the other waited and reused it
    assert batches(counter) == 21
    (entry,) = cache.entries()
    assert entry.complete and run_kdcache("verify", str(entry.path)).returncode == 0


@pytest.mark.slow
def test_a_killed_cached_dump_is_resumed(cache_env, tmp_path):
    counter, env = counted(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT, **env, "KDCACHE_TEST_DELAY": "0.05"}
    cmd = [sys.executable, "-m", "kdcache", "dump-logits", "--teacher", SLOW, "--dataset", SYNTH, "--chunk-rows",
           "100", "--batch-size", "50"]
    kill_when(cmd, env, lambda: batches(counter) >= 15)
    (entry,) = cache.entries()
    assert not entry.complete
    assert "incomplete (the same dump-logits resumes it)" in run_kdcache("cache", "list").stdout
    done = int(open_store(str(entry.path), allow_partial=True).written_chunks().sum())
    assert 0 < done < 20
    out = dump("--batch-size", "50").stdout
    assert f"{done} chunks kept from an earlier run" in out
    assert run_kdcache("verify", str(entry.path)).returncode == 0


def test_list_du_and_rm_on_both_backends(cache_env):
    dump()
    dump("--format", "hdf5", "--subset", "0:500")
    listed = json.loads(invoke_kdcache("cache", "list", "--json").stdout)
    assert sorted(Path(e["path"]).suffix for e in listed) == [".h5", ".zarr"]
    assert all(e["complete"] and e["teachers"] == [SLOW] and e["dataset"] == SYNTH for e in listed)
    assert {e["rows"] for e in listed} == {2000, 500}
    total = sum(e["bytes"] for e in listed)
    assert f"{total / 1e6:.1f} MB in 2 store(s)" in invoke_kdcache("cache", "du").stdout
    h5 = next(e for e in listed if e["path"].endswith(".h5"))
    zarr_entry = next(e for e in listed if e["path"].endswith(".zarr"))

    with cache.locked(zarr_entry["path"], exclusive=False):  # a job reading it: rm is refused
        p = invoke_kdcache("cache", "rm", zarr_entry["key"][:10])
        assert p.returncode == 1 and "is in use by a running job" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert Path(zarr_entry["path"]).exists()

    assert f"removed {h5['key'][:12]}" in invoke_kdcache("cache", "rm", h5["key"][:10]).stdout
    assert not Path(h5["path"]).exists()
    old = time.time() - 10 * 86400
    os.utime(Path(zarr_entry["path"]).with_suffix(".used"), (old, old))
    assert "removed" not in invoke_kdcache("cache", "rm", "--older-than", "30").stdout
    assert "removed" in invoke_kdcache("cache", "rm", "--older-than", "5").stdout
    assert cache.entries() == []


def test_train_student_store_auto(cache_env, tmp_path):
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", "auto", "--teacher", SLOW, "--student", "mlp:8",
                    "--epochs", "1", "--out", str(tmp_path / "s"), check=False)
    assert p.returncode == 1 and f"make it with `kdcache dump-logits --teacher {SLOW} --dataset {SYNTH}`" in p.stderr
    dump()
    run_kdcache("train-student", "--dataset", SYNTH, "--store", "auto", "--teacher", SLOW, "--student", "mlp:8",
                "--epochs", "1", "--out", str(tmp_path / "s"))
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert Path(config["store"]).parent == cache_env / "stores" and config["teachers"] is None
    dump("--dtype", "float32")
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", "auto", "--teacher", SLOW, "--student", "mlp:8",
                    "--epochs", "1", "--out", str(tmp_path / "s2"), check=False)
    assert p.returncode == 1 and "2 cached stores of" in p.stderr and "pass one with --store PATH" in p.stderr
    # a store of a subset is found for that subset, and only for it
    args = ["train-student", "--dataset", SYNTH, "--store", "auto", "--teacher", SLOW, "--student", "mlp:8",
            "--epochs", "1"]
    p = run_kdcache(*args, "--subset", "0:500", "--out", str(tmp_path / "sub"), check=False)
    assert p.returncode == 1 and "over synthetic:n=2000,dim=16,classes=5 (--subset 0:500)" in p.stderr
    assert f"--dataset {SYNTH} --subset 0:500`" in p.stderr
    dump("--subset", "0:500")
    run_kdcache(*args, "--subset", "0:500", "--out", str(tmp_path / "sub"))
    config = json.loads((tmp_path / "sub" / "config.json").read_text())
    assert config["store_identity"]["dataset"]["subset"] == "range:0:500" and config["subset"] is None


def test_bad_cache_input_is_one_line(cache_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = dump(env={"KDCACHE_CACHE": str(blocker / "cache")}, check=False)
    assert p.returncode == 1 and "is not writable" in p.stderr and "set KDCACHE_CACHE" in p.stderr
    p = dump(env={"KDCACHE_CACHE": "s3://bucket/cache"}, check=False)
    assert p.returncode == 1 and "not supported yet" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    a = dump().stdout.split(" to ")[1].split(" in ")[0]
    b = dump("--teacher", "tests.helpers:other_teacher").stdout.split(" to ")[1].split(" in ")[0]
    import shutil
    shutil.rmtree(b)
    shutil.copytree(a, b)  # key b now holds the first teacher's logits
    p = dump("--teacher", "tests.helpers:other_teacher", check=False)
    assert p.returncode == 1 and "holds other logits than its key says" in p.stderr
    assert f"kdcache cache rm {Path(b).stem[:12]}" in p.stderr and Path(b).exists()
    shutil.copytree(a, cache_env / "stores" / ("abc" + "0" * 61 + ".zarr"))
    shutil.copytree(a, cache_env / "stores" / ("abc" + "1" * 61 + ".zarr"))
    p = run_kdcache("cache", "rm", "abc", check=False)
    assert p.returncode == 1 and "key prefix 'abc' matches 2 cached stores" in p.stderr
    assert len(cache.entries()) == 4


def _arrays(path: Path) -> dict:
    s = open_store(str(path))
    out = {name: s._read(name, 0, s.manifest.arrays()[name][0][0]) for name in s.manifest.arrays()}
    s.close()
    return out


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_damaged_cached_store_is_repaired_not_reused(cache_env, tmp_path, fmt):
    counter, env = counted(tmp_path)
    path = Path(dump("--format", fmt, env=env).stdout.split(" to ")[1].split(" in ")[0])
    before = _arrays(path)
    assert path.with_suffix(".verified").exists()
    # unchanged, or only touched: reused without running the teacher
    os.utime(path / "logits" / "c" / "3" / "0" / "0" if fmt == "zarr" else path)
    assert "reusing cached store" in dump("--format", fmt, env=env).stdout and batches(counter) == 21

    if fmt == "zarr":
        _flip(path / "logits" / "c" / "5" / "0" / "0", 7)  # one byte of one chunk's logits
        (path / "logits" / "c" / "12" / "0" / "0").unlink()  # one chunk file gone
        _flip(path / "labels" / "c" / "1", 3)  # compressed labels of chunks 16-19: cannot be decoded
        expected = "5, 12, 16-19"
    else:
        import h5py
        with h5py.File(path, "r") as f:
            offsets = [f["logits"].id.get_chunk_info(c).byte_offset for c in (5, 12)]
        for o in offsets:
            _flip(path, o + 7)
        expected = "5, 12"
    p = dump("--format", fmt, env=env)
    assert f"chunks {expected} are damaged (changed since the store was last verified); recomputing them" in p.stderr
    assert f"damaged chunks {expected} recomputed" in p.stdout and "reusing" not in p.stdout
    recomputed = 2 if fmt == "hdf5" else 6
    assert batches(counter) == 21 + 1 + recomputed  # a probe, then only the damaged chunks
    after = _arrays(path)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # as the uninterrupted dump wrote it
    assert run_kdcache("verify", str(path)).returncode == 0
    assert "reusing cached store" in dump("--format", fmt, env=env).stdout and batches(counter) == 22 + recomputed


def test_a_cached_store_never_verified_is_checked_whole_and_lost_ids_are_recomputed(cache_env, tmp_path):
    path = Path(dump().stdout.split(" to ")[1].split(" in ")[0])
    path.with_suffix(".verified").unlink()  # never verified (a cache from an older kdcache): a full check
    assert "reusing cached store" in dump().stdout and path.with_suffix(".verified").exists()
    (path / "sample_ids" / "c" / "0").unlink()  # the ids of chunks 0-15 gone: recomputed, ids and all
    p = dump()
    assert "chunks 0-15 are damaged" in p.stderr and run_kdcache("verify", str(path)).returncode == 0


def test_a_cached_store_that_cannot_be_repaired_is_refused_with_cache_rm(cache_env, tmp_path):
    import h5py
    path = Path(dump("--format", "hdf5").stdout.split(" to ")[1].split(" in ")[0])
    with h5py.File(path, "r") as f:
        info = f["sample_ids"].id.get_chunk_info(0)
    for o in range(info.byte_offset + 2, info.byte_offset + info.size, 5):
        _flip(path, o)  # compressed ids that no longer decode: HDF5 cannot rewrite part of that chunk
    p = dump("--format", "hdf5", check=False)
    assert p.returncode == 1, p.stderr
    said = p.stderr.strip().splitlines()
    assert said[0] == (f"cached store {path.stem[:12]}: chunks 0-15 are damaged "
                       f"(changed since the store was last verified); recomputing them")
    assert len(said) == 2 and said[1].startswith(f"Error: cached store {path.stem[:12]} could not be repaired "
                                                 f"(writing rows 0:100")
    assert said[1].endswith(f"remove it with `kdcache cache rm {path.stem[:12]}` and dump again")
    again = dump("--format", "hdf5", check=False)  # the same advice, not an endless resume
    assert again.returncode == 1 and again.stderr.strip().splitlines() == said[1:]
    assert f"removed {path.stem[:12]}" in run_kdcache("cache", "rm", path.stem[:12]).stdout
    assert "wrote 2000 of 2000 rows" in dump("--format", "hdf5").stdout


def test_damage_a_stat_cannot_see_is_caught_by_a_reader_which_voids_the_record(cache_env, tmp_path):
    counter, env = counted(tmp_path)
    path = Path(dump(env=env).stdout.split(" to ")[1].split(" in ")[0])
    chunk = path / "logits" / "c" / "4" / "0" / "0"
    st = chunk.stat()
    _flip(chunk, 5)
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and modification time put back (`touch -r`)
    p = dump(env=env)
    assert "chunk 4 is damaged" in p.stderr and batches(counter) == 21 + 2  # the status-change time saw it
    before = _arrays(path)
    _flip(chunk, 5)
    cache.record_verified(path)  # as if no stat could see it: reused as complete...
    assert "reusing cached store" in dump(env=env).stdout
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", str(path), "--student", "mlp:8", "--epochs", "1",
                    "--out", str(tmp_path / "s"), check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1  # ...until a reader checks the chunk
    assert "chunk 4 (rows 400:500) does not match its stored sha256" in p.stderr
    assert "it is a cached store, so the same `kdcache dump-logits` (without --out) recomputes" in p.stderr
    assert not path.with_suffix(".verified").exists()
    p = dump(env=env)  # no record: every chunk checked, the damaged one recomputed
    assert "chunk 4 is damaged" in p.stderr and batches(counter) == 23 + 2
    assert all(np.array_equal(before[k], v) for k, v in _arrays(path).items())
