"""Network faults against a real S3 endpoint (moto's server on loopback) behind a TCP proxy of our own
(kdcache.testing.s3_loopback.FaultProxy): the endpoint stopped, the connection cut, the connection stalled
(bytes swallowed), each at store creation, mid-way and at completion, for dump-logits and for
train-student. Each ends in one line within a bounded time, nothing is printed after it, and the
same command run again gives what an uninterrupted run gives."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from kdcache.store import open_store  # noqa: E402
from kdcache.testing.s3_loopback import FaultProxy, LoopbackS3  # noqa: E402
from tests.conftest import DATA_ROOT, ROOT  # noqa: E402
from tests.helpers import SYNTH  # noqa: E402

SLOW = "tests.helpers:slow_teacher"
DUMP = ["dump-logits", "--teacher", SLOW, "--dataset", SYNTH, "--chunk-rows", "100", "--batch-size", "50"]
TRAIN = ["train-student", "--dataset", SYNTH, "--student", "tests.helpers:slow_mlp", "--epochs", "2",
         "--batch-size", "100", "--seed", "0"]
# short timeouts keep the stalled cases quick; the default bound is stated in the README
FAST = ["--storage-option", "read_timeout=1", "--storage-option", "connect_timeout=1"]
BOUND_S = 5 * (1 + 1) + 5  # attempts x (connect + read timeout) + backoff and start-up


@pytest.fixture(scope="module")
def s3():
    with LoopbackS3() as server, pytest.MonkeyPatch.context() as mp:
        server.make_bucket("kdcache")
        with FaultProxy(server.port) as proxy:
            for k, v in server.env.items():  # this process reads the stores too, through the proxy
                mp.setenv(k, proxy.url if k == "AWS_ENDPOINT_URL" else v)
            mp.delenv("KDCACHE_STORAGE_OPTIONS", raising=False)
            yield server, proxy


def _env(proxy: FaultProxy, counter: Path | None = None) -> dict[str, str]:
    from kdcache.testing.s3_loopback import CREDENTIALS
    e = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": str(ROOT),
         "KDCACHE_DATA": DATA_ROOT}
    e.pop("KDCACHE_STORAGE_OPTIONS", None)
    if counter is not None:
        e.update(KDCACHE_TEST_COUNTER=str(counter), KDCACHE_TEST_DELAY="0.03")
    return e


def _run(args: list[str], proxy: FaultProxy, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "kdcache", *args], env=_env(proxy), capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def _fault(server: LoopbackS3, proxy: FaultProxy, kind: str) -> None:
    if kind == "stopped":
        server.pause()
    else:
        proxy.set(kind)


def _heal(server: LoopbackS3, proxy: FaultProxy, kind: str) -> None:
    if kind == "stopped":
        server.resume()
    proxy.set("pass")


def faulted(args: list[str], server: LoopbackS3, proxy: FaultProxy, kind: str, after_batches: int,
            tmp: Path) -> dict:
    """Run ``args``, apply fault ``kind`` once the teacher or student ran ``after_batches`` forwards (0: before
    it starts), and wait for it to end. Returns exit status, seconds from the fault to the exit, and the
    lines of stderr."""
    counter = tmp / f"count-{time.monotonic_ns()}"
    if after_batches == 0:
        _fault(server, proxy, kind)
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args], env=_env(proxy, counter),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        if after_batches:
            while not counter.exists() or counter.stat().st_size < after_batches:
                if proc.poll() is not None:
                    raise AssertionError(f"ended before the fault: {proc.communicate()[1][-2000:]}")
                assert time.monotonic() - t0 < 120
                time.sleep(0.005)
            _fault(server, proxy, kind)
            t0 = time.monotonic()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _heal(server, proxy, kind)
    return {"returncode": proc.returncode, "seconds": time.monotonic() - t0, "stderr": err.strip().splitlines(),
            "stdout": out}


def _same_store(a: str, b: str) -> None:
    x, y = open_store(a), open_store(b)
    assert (x.digests() == y.digests()).all() and x.manifest.identity() == y.manifest.identity()
    np.testing.assert_array_equal(x.read(0, x.num_samples).logits, y.read(0, y.num_samples).logits)


def _one_error_line(r: dict) -> str:
    """The run failed with exit status 1 and printed one line: its error, with nothing after it."""
    errors = [i for i, line in enumerate(r["stderr"]) if line.startswith("Error:")]
    assert r["returncode"] == 1 and errors, r["stderr"][-30:]
    assert r["stderr"][errors[0]:] == [r["stderr"][errors[0]]], r["stderr"][errors[0]:][:30]
    before = [line for line in r["stderr"][:errors[0]] if not line.startswith(("note:", "warning:"))]
    assert not before, before[:10]
    return r["stderr"][errors[0]]


# 40 teacher batches (2,000 rows in batches of 50): creation, mid-way, after the last batch (completion)
MOMENTS = {"creation": 0, "mid-way": 20, "completion": 40}


# every moment for a stall (what the timeouts and deadlines bound); the endpoint stopped and the
# connection cut mid-way (their errors are immediate; tests/test_s3.py covers the stopped endpoint too)
CASES = {"stall": ("creation", "mid-way", "completion"), "stopped": ("mid-way",), "cut": ("mid-way",)}
# KDCACHE_FAULT_MATRIX=full: every fault at every moment (for the figures; about 10 minutes)
FULL = os.environ.get("KDCACHE_FAULT_MATRIX") == "full"
if FULL:
    CASES = {kind: tuple(MOMENTS) for kind in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_a_network_fault_during_a_dump_ends_in_one_line_and_the_rerun_completes_the_store(s3, kind, tmp_path):
    server, proxy = s3
    ref = f"s3://kdcache/{tmp_path.name}-ref.zarr"
    _run([*DUMP, *FAST, "--out", ref], proxy)
    figures = {}
    for moment, batches in ((m, MOMENTS[m]) for m in CASES[kind]):
        url = f"s3://kdcache/{tmp_path.name}-{kind}-{moment}.zarr"
        r = faulted([*DUMP, *FAST, "--out", url], server, proxy, kind, batches, tmp_path)
        line = _one_error_line(r)
        assert "object store" in line and proxy.url in line, line
        assert r["seconds"] < BOUND_S, (moment, r["seconds"])
        again = _run([*DUMP, *FAST, "--out", url], proxy)
        assert "of 2000 rows" in again.stdout
        _same_store(ref, url)
        figures[moment] = round(r["seconds"], 1)
    print(json.dumps({"dump": kind, "seconds to the error": figures}))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stall", "stopped", "cut"] if FULL else ["stall", "cut"])
def test_a_network_fault_during_training_ends_in_one_line_and_the_rerun_ends_with_the_same_weights(
        s3, kind, tmp_path):
    import torch

    from kdcache.specs import load_model
    server, proxy = s3
    store = f"s3://kdcache/{tmp_path.name}-train.zarr"
    _run([*DUMP, *FAST, "--out", store], proxy)
    ref = tmp_path / "ref"
    _run([*TRAIN, *FAST, "--store", store, "--out", str(ref)], proxy)
    figures = {}
    # 40 student forwards (2 epochs of 20): opening the store, mid-way through epoch 1, the start of epoch 2
    moments = {"creation": 0, "mid-way": 10} if kind == "stall" else {"mid-way": 10}
    if FULL:
        moments = {"creation": 0, "mid-way": 10, "completion": 40}
    for moment, batches in moments.items():
        out = tmp_path / f"{kind}-{moment}"
        r = faulted([*TRAIN, *FAST, "--store", store, "--checkpoint-every", "5", "--out", str(out)], server, proxy,
                    kind, batches, tmp_path)
        if r["returncode"] == 0:  # the whole remaining epoch was already read ahead: nothing to fail
            assert moment != "creation"
        else:
            line = _one_error_line(r)
            assert "object store" in line and proxy.url in line, line
            assert r["seconds"] < 2 * BOUND_S, (moment, r["seconds"])  # the read-ahead's request, then the next
            _run([*TRAIN, *FAST, "--store", store, "--checkpoint-every", "5", "--out", str(out)], proxy)
        a, b = load_model(str(ref)).module.state_dict(), load_model(str(out)).module.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        figures[moment] = (r["returncode"], round(r["seconds"], 1))
    print(json.dumps({"train": kind, "exit status and seconds to the error": figures}))


@pytest.mark.slow
def test_a_stall_while_inspecting_or_verifying_a_remote_store_ends_in_one_line(s3, tmp_path):
    server, proxy = s3
    url = f"s3://kdcache/{tmp_path.name}-inspect.zarr"
    _run([*DUMP, *FAST, "--out", url], proxy)
    figures = {}
    for command in (["inspect", url], ["verify", url], ["train-student", "--dataset", SYNTH, "--store", url,
                                                         "--student", "mlp:8", "--epochs", "1", "--out",
                                                         str(tmp_path / "s")]):
        r = faulted([*command[:1], *FAST, *command[1:]], server, proxy, "stall", 0, tmp_path)
        line = _one_error_line(r)
        assert ("object store" in line and proxy.url in line
                and ("stopped answering" in line or "did not answer" in line)), line
        assert r["seconds"] < BOUND_S, (command[0], r["seconds"])
        figures[command[0]] = round(r["seconds"], 1)
        assert r["returncode"] == 1
    assert "complete" in _run(["inspect", url], proxy).stdout  # the network back: the store is as it was
    print(json.dumps({"stalled": figures}))
