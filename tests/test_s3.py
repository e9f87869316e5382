"""Stores in object storage: a real S3 endpoint on 127.0.0.1 (moto's server in a child process,
kdcache.testing.s3_loopback), spoken to over HTTP through s3fs. Nothing is mocked in the processes under test."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from kdcache.store import open_store  # noqa: E402
from kdcache.store.block_cache import BlockCache  # noqa: E402
from kdcache.store.remote import ENV  # noqa: E402
from kdcache.stream import DistillStream  # noqa: E402
from kdcache.testing.s3_loopback import LoopbackS3  # noqa: E402
from tests.conftest import DATA_ROOT, ROOT, counted_batches, invoke_kdcache, kill_when, run_kdcache  # noqa: E402
from tests.helpers import SYNTH  # noqa: E402

SLOW = "tests.helpers:slow_teacher"
DUMP = ["dump-logits", "--teacher", SLOW, "--dataset", SYNTH, "--chunk-rows", "100", "--batch-size", "50"]


@pytest.fixture(scope="module")
def s3():
    with LoopbackS3() as server, pytest.MonkeyPatch.context() as mp:
        server.make_bucket("kdcache")
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server


@pytest.fixture
def url(s3, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "{}")  # restored after the test: --storage-option in-process sets it
    return lambda name: f"s3://kdcache/{tmp_path.name}/{name}"


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT, **extra}


def _same(a, b):
    a, b = open_store(a), open_store(b)
    assert (a.digests() == b.digests()).all() and a.manifest.identity() == b.manifest.identity()
    x, y = a.read(0, a.num_samples), b.read(0, b.num_samples)
    assert x.data.keys() == y.data.keys()
    for name in x.data:
        np.testing.assert_array_equal(x.data[name], y.data[name])
    np.testing.assert_array_equal(x.sample_ids, y.sample_ids)
    np.testing.assert_array_equal(x.labels, y.labels)


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    invoke_kdcache(*DUMP, "--out", out)
    return out


def test_dump_inspect_verify_convert_stream_and_train_against_s3(s3, url, local_ref, tmp_path, monkeypatch):
    remote = url("a.zarr")
    # --storage-option, as s3fs users pass endpoint_url (the environment has no endpoint here)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    p = invoke_kdcache(*DUMP, "--out", remote, "--storage-option", f"endpoint_url={s3.url}")
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)  # from here on: the standard environment variable
    monkeypatch.setenv(ENV, "{}")
    _same(local_ref, remote)
    assert "2000 samples" in invoke_kdcache("inspect", remote).stdout
    assert "ok (2000 rows, 20 chunks verified)" in invoke_kdcache("verify", remote).stdout
    back = str(tmp_path / "back.h5")
    invoke_kdcache("convert", remote, back)  # s3 -> local
    up = url("top3.zarr")
    invoke_kdcache("convert", local_ref, up, "--layout", "topk", "--k", "3")  # local -> s3
    invoke_kdcache("convert", local_ref, str(tmp_path / "top3.zarr"), "--layout", "topk", "--k", "3")
    _same(back, local_ref)
    _same(up, str(tmp_path / "top3.zarr"))

    # the stream: the same batches from S3 as from disk, with read-ahead; the cache serves epoch 2
    cache = BlockCache(tmp_path / "blocks", "1MB")
    far = DistillStream(remote, None, batch_size=64, seed=3, block_rows=200, cache=cache)
    near = DistillStream(local_ref, None, batch_size=64, seed=3, block_rows=200, read_ahead=0)
    assert far.read_ahead == 8
    for epoch in (0, 1):
        far.set_epoch(epoch)
        near.set_epoch(epoch)
        for (_, ya, za), (_, yb, zb) in zip(far, near, strict=True):
            torch.testing.assert_close(za, zb, rtol=0, atol=0)
            assert torch.equal(ya, yb)
    assert cache.hits == 10 and cache.misses == 10  # 10 blocks read once from S3, then from disk
    damaged = next(cache.directory.glob("*.npz"))
    damaged.write_bytes(damaged.read_bytes()[:-40])  # a damaged cache file is dropped and read again
    far.set_epoch(2)
    assert sum(len(y) for _, y, _ in far) == 2000 and cache.misses == 11

    # train-student from the S3 store: the same student as from the local store, bit for bit
    args = ["train-student", "--dataset", SYNTH, "--student", "mlp:16", "--epochs", "2", "--temperature", "2"]
    invoke_kdcache(*args, "--store", remote, "--remote-cache", str(tmp_path / "train-cache"), "--out",
                   str(tmp_path / "far"))
    invoke_kdcache(*args, "--store", local_ref, "--out", str(tmp_path / "near"))
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("far", "near"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_dump_killed_or_cut_off_from_s3_resumes_and_no_partial_store_looks_complete(s3, url, local_ref, tmp_path):
    remote = url("killed.zarr")
    counter = tmp_path / "batches"
    env = _env(KDCACHE_TEST_COUNTER=str(counter), KDCACHE_TEST_DELAY="0.05")
    kill_when([sys.executable, "-m", "kdcache", *DUMP, "--out", remote], env, lambda: counted_batches(counter) >= 12)
    done = int(open_store(remote, allow_partial=True).written_chunks().sum())
    assert 0 < done < 20
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", remote, "--student", "mlp:8", "--out",
                    str(tmp_path / "s"), check=False)
    assert p.returncode == 1 and "store is incomplete" in p.stderr and len(p.stderr.strip().splitlines()) == 1

    # the endpoint goes away in the middle of the resumed dump: one line, nothing lost
    counter.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *DUMP, "--out", remote], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and counted_batches(counter) < 6:
        time.sleep(0.01)
    s3.pause()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        s3.resume()
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "cannot reach the object store" in err and "run the same command again to resume" in err
    kept = int(open_store(remote, allow_partial=True).written_chunks().sum())
    assert kept >= done
    p = run_kdcache(*DUMP, "--out", remote)
    assert f"{kept} chunks kept from an earlier run" in p.stdout
    _same(local_ref, remote)
    assert run_kdcache("verify", remote).returncode == 0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_torchrun_write_one_s3_store_equal_to_one_process(s3, url, local_ref, tmp_path):
    remote = url("two-nodes.zarr")
    port = _port()
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "kdcache-test", "-m", "kdcache", *DUMP, "--device", "cpu", "--out", remote]
        nodes.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    _same(local_ref, remote)


def test_bad_remote_input_is_one_line_and_writes_nothing(s3, url, tmp_path, monkeypatch):
    cases = []
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    cases.append(({"AWS_ENDPOINT_URL": dead}, url("x.zarr"), "cannot reach the object store"))
    cases.append(({}, "s3://no-such-bucket/x.zarr", "bucket 'no-such-bucket' does not exist"))
    cases.append(({}, url("x.h5"), "an HDF5 store is a local file"))
    cases.append(({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE":
                   str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}, url("x.zarr"), "no credentials"))
    import s3fs
    for env, target, message in cases:
        with monkeypatch.context() as mp:
            for k, v in env.items():
                mp.delenv(k) if v is None else mp.setenv(k, v)
            s3fs.S3FileSystem.clear_instance_cache()  # in-process: a fresh client sees the changed environment
            p = invoke_kdcache(*DUMP, "--out", target)
        s3fs.S3FileSystem.clear_instance_cache()
        assert p.returncode == 1 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(url("x.zarr").removeprefix("s3://"))
    p = invoke_kdcache(*DUMP, "--out", url("y.zarr"), "--storage-option", "endpoint_url")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "Error: --storage-option 'endpoint_url': expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000"]
    with LoopbackS3(auth=True) as strict:  # an endpoint that knows no key: wrong credentials
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.url)
        s3fs.S3FileSystem.clear_instance_cache()
        p = invoke_kdcache(*DUMP, "--out", "s3://kdcache/x.zarr")
        s3fs.S3FileSystem.clear_instance_cache()
    assert p.returncode == 1 and "was refused (wrong or expired credentials" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_timeout_that_is_not_seconds_above_zero_is_refused_in_one_line(tmp_path):
    base = ["dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH, "--out",
            "s3://kdcache/never.zarr"]
    for key in ("read_timeout", "connect_timeout"):
        for value in ("0", "-1", "abc", "true", "inf"):
            p = run_kdcache(*base, "--storage-option", f"{key}={value}", check=False)
            said = p.stderr.strip().splitlines()
            assert p.returncode == 1 and len(said) == 1 and said[0].startswith(f"Error: --storage-option {key}="), said
            assert said[0].endswith(f": a timeout is a number of seconds above 0, e.g. --storage-option {key}=10")
    p = run_kdcache(*base, env={"KDCACHE_S3_READ_TIMEOUT": "true", "AWS_ACCESS_KEY_ID": "x",
                                "AWS_SECRET_ACCESS_KEY": "y"}, check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "KDCACHE_S3_READ_TIMEOUT='true': a timeout is a number of seconds above 0" in p.stderr
