"""Resumable training: kill -9 at a random step, rerun the same command, end with the weights of an
uninterrupted run (stacked and one by one, plain and distilled, under torchrun); damaged checkpoints
fall back; another command on the same --out is refused."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdcache.specs import load_model
from tests.conftest import DATA_ROOT, ROOT, run_kdcache
from tests.helpers import SYNTH

SEED = int(os.environ.get("KDCACHE_KILL_SEED", "20261130"))


def _env(counter: Path | None = None) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    if counter is not None:
        e.update(KDCACHE_TEST_COUNTER=str(counter), KDCACHE_TEST_DELAY="0.02")
    return e


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (torchrun's workers run in sessions of their own)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        grew = bool(more)
        tree |= more
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_at(cmd: list[str], counter: Path, forwards: int, timeout: float = 120) -> None:
    """Run ``cmd`` and SIGKILL all its processes once the student ran ``forwards`` forwards."""
    p = subprocess.Popen(cmd, env=_env(counter), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         )
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if counter.exists() and counter.stat().st_size >= forwards:
            kill_tree(p.pid)
            p.communicate()
            return
        if p.poll() is not None:
            raise AssertionError(f"finished before it was killed: {p.communicate()[1].decode()[-2000:]}")
        time.sleep(0.005)
    kill_tree(p.pid)
    raise AssertionError("timed out before the kill point")


def _kdcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcache", *args]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_model(str(d)).module.state_dict()


def _same(a: Path, b: Path, runs: list[str]) -> None:
    for r in runs:
        wa, wb = _weights(a / r if r else a), _weights(b / r if r else b)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (r, k)
        ma = json.loads(((a / r if r else a) / "metrics.json").read_text())
        mb = json.loads(((b / r if r else b) / "metrics.json").read_text())
        assert [m["loss"] for m in ma] == [m["loss"] for m in mb]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    run_kdcache("dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH, "--out",
                str(d / "t.zarr"), "--chunk-rows", "256")
    return d / "t.zarr"


def _distil(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--dataset", SYNTH, "--store", str(store), "--student", "tests.helpers:slow_mlp",
            "--temperature", "2,4", "--seed", "0,1", "--epochs", "3", "--batch-size", "100",
            "--checkpoint-every", "4", "--warmup", "1.5", "--out", str(out), *extra]  # kills land in the ramp too


@pytest.mark.slow
def test_a_killed_stacked_sweep_resumes_to_the_same_weights(store, tmp_path):
    runs = ["T2-a0.9-s0", "T2-a0.9-s1", "T4-a0.9-s0", "T4-a0.9-s1"]
    run_kdcache(*_distil(store, tmp_path / "ref"))
    rng = random.Random(SEED)
    for trial in range(2):
        out, counter = tmp_path / f"killed{trial}", tmp_path / f"count{trial}"
        kill_at(_kdcache(*_distil(store, out)), counter, rng.randint(5, 55))  # 60 stacked steps in all
        assert not (out / "T2-a0.9-s0" / "model.safetensors").exists()
        p = run_kdcache(*_distil(store, out))
        assert "resuming" in p.stderr
        _same(tmp_path / "ref", out, runs)
        assert not (out / "resume").exists()  # checkpoints go once the results are written


@pytest.mark.slow
def test_a_killed_plain_run_with_jitter_and_dropout_resumes_to_the_same_weights(tmp_path):
    def cmd(out: Path) -> list[str]:
        return ["train-student", "--dataset", "mnist:train", "--subset", "0:1200", "--student",
                "tests.helpers:slow_mnist_mlp", "--jitter", "1", "--epochs", "2", "--batch-size", "100",
                "--warmup", "1", "--checkpoint-every", "5", "--out", str(out)]
    run_kdcache(*cmd(tmp_path / "ref"))
    kill_at(_kdcache(*cmd(tmp_path / "killed")), tmp_path / "count", random.Random(SEED + 1).randint(6, 22))
    p = run_kdcache(*cmd(tmp_path / "killed"))
    assert "resuming" in p.stderr
    _same(tmp_path / "ref", tmp_path / "killed", [""])


@pytest.mark.slow
def test_damaged_checkpoints_other_commands_and_other_formats(store, tmp_path):
    out = tmp_path / "killed"
    kill_at(_kdcache(*_distil(store, out)), tmp_path / "count", 30)
    ckpts = sorted((out / "resume").glob("ckpt-*"))
    # two kept; three when the kill fell between writing a checkpoint and pruning the oldest
    assert len(ckpts) in (2, 3) and all((c / "state.json").exists() for c in ckpts)
    # another command on the same --out: one line, nothing touched
    p = run_kdcache(*_distil(store, out, "--epochs", "4"), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "holds a checkpoint of another train-student command" in lines[0]
    assert "differs in epochs" in lines[0] and sorted((out / "resume").glob("ckpt-*")) == ckpts
    # another checkpoint format: one line
    state = json.loads((ckpts[-1] / "state.json").read_text())
    (ckpts[-1] / "state.json").write_text(json.dumps({**state, "kdcache_checkpoint": 99}))
    p = run_kdcache(*_distil(store, out), check=False)
    assert p.returncode == 1 and "checkpoint of format 99" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    (ckpts[-1] / "state.json").write_text(json.dumps(state))
    # a corrupt newest checkpoint: the one before is used, the log says so, the result is the same
    blob = ckpts[-1] / "students.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    p = run_kdcache(*_distil(store, out))
    assert f"checkpoint {ckpts[-1]} is damaged (students.safetensors does not match its sha256" in p.stderr
    assert f"resuming {out} from {ckpts[-2].name}" in p.stderr
    run_kdcache(*_distil(store, tmp_path / "ref"))
    _same(tmp_path / "ref", out, ["T2-a0.9-s0", "T4-a0.9-s1"])
    # --overwrite starts afresh with another command
    kill_at(_kdcache(*_distil(store, tmp_path / "again")), tmp_path / "count2", 10)
    p = run_kdcache(*_distil(store, tmp_path / "again", "--epochs", "1", "--warmup", "0.5", "--overwrite"))
    assert "resuming" not in p.stderr
    assert len(json.loads((tmp_path / "again" / "T2-a0.9-s0" / "metrics.json").read_text())) == 1


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_to_the_same_weights(store, tmp_path):
    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "kdcache", *_distil(store, out, "--device", "cpu")]
    ref = subprocess.run(cmd(tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # 4 students one by one on each of 2 ranks: 8 forwards per step of each rank
    kill_at(cmd(tmp_path / "killed"), tmp_path / "count", 8 * random.Random(SEED + 2).randint(5, 26))
    p = subprocess.run(cmd(tmp_path / "killed"), env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "resuming" in p.stderr, p.stderr[-3000:]
    _same(tmp_path / "ref", tmp_path / "killed", ["T2-a0.9-s0", "T4-a0.9-s1"])


@pytest.mark.slow
def test_a_killed_stacked_sweep_with_dropout_resumes_to_the_same_weights(store, tmp_path):
    """kdcache's own MLP stacks with each student's dropout masks drawn from its own generator: the
    generators are checkpointed per student, so a kill -9 resumes onto the same masks."""
    def cmd(out: Path) -> list[str]:
        return ["train-student", "--dataset", SYNTH, "--store", str(store), "--student", "mlp:32,16",
                "--dropout", "0.3", "--input-dropout", "0.1", "--temperature", "2,4", "--seed", "0,1",
                "--epochs", "3", "--batch-size", "20", "--checkpoint-every", "3", "--out", str(out)]
    runs = ["T2-a0.9-s0", "T2-a0.9-s1", "T4-a0.9-s0", "T4-a0.9-s1"]
    run_kdcache(*cmd(tmp_path / "ref"))
    out = tmp_path / "killed"
    p = subprocess.Popen(_kdcache(*cmd(out)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not list(out.glob("resume/ckpt-*/state.json")):  # the first checkpoint, then a random moment
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.monotonic() - t0 < 120
        time.sleep(0.002)
    time.sleep(random.Random(SEED + 2).uniform(0, 0.2))
    assert p.poll() is None, "finished before it was killed"
    kill_tree(p.pid)
    p.communicate()
    assert not (out / "T2-a0.9-s0" / "model.safetensors").exists()
    p = run_kdcache(*cmd(out))
    assert "resuming" in p.stderr and "train as one stacked model (batched matrix products)" in p.stderr
    _same(tmp_path / "ref", out, runs)
