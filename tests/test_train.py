"""train-student through the real CLI: baseline, distillation sweep, outputs, refusals, torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdcache.specs import load_model, read_checkpoint_meta
from tests.conftest import DATA_ROOT, ROOT, run_kdcache
from tests.helpers import SYNTH

TEST = "synthetic:n=500,dim=16,classes=5,seed=0"


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    run_kdcache("train-student", "--dataset", SYNTH, "--student", "mlp:64", "--epochs", "3",
                "--out", str(d / "teacher"))
    run_kdcache("dump-logits", "--teacher", str(d / "teacher"), "--dataset", SYNTH, "--chunk-rows", "128",
                "--out", str(d / "t.zarr"))
    return d


def test_supervised_baseline_learns_and_writes_a_run(teacher_store):
    metrics = json.loads((teacher_store / "teacher" / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all(m["coverage_ok"] and m["samples_seen"] == 2000 for m in metrics)
    assert metrics[-1]["train_accuracy"] > 0.9
    config = json.loads((teacher_store / "teacher" / "config.json").read_text())
    assert config["store_identity"] is None and config["alpha"] == 0.0
    meta = read_checkpoint_meta(teacher_store / "teacher" / "model.safetensors")
    assert meta["arch"] == "mlp:64" and meta["num_classes"] == 5 and meta["input_shape"] == [16]


def test_sweep_trains_every_combination_in_one_pass(teacher_store):
    out = teacher_store / "sweep"
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"),
                    "--student", "mlp:16", "--temperature", "1,4", "--alpha", "0.5,1", "--seed", "0,1",
                    "--epochs", "2", "--eval-dataset", TEST, "--out", str(out))
    runs = sorted(d.name for d in out.iterdir() if d.is_dir())
    assert len(runs) == 8 and "T4-a0.5-s1" in runs
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 8 and all(r["coverage_ok"] for r in summary)
    assert all(r["eval_samples"] == 500 and 0 <= r["eval_errors"] <= 500 for r in summary)
    assert "| T4-a1-s0 | 4 | 1 | 0 |" in (out / "summary.md").read_text()
    assert "| T4-a1-s0 | 4 | 1 | 0 |" in p.stdout
    config = json.loads((out / "T4-a1-s0" / "config.json").read_text())
    assert config["temperature"] == 4.0 and config["alpha"] == 1.0
    assert config["store_identity"]["dataset"]["spec"] == SYNTH
    assert config["store_identity"]["members"][0]["spec"] == "teacher"  # relative to the store's directory
    # seeds give different students, temperatures different training
    a = load_model(str(out / "T4-a1-s0")).module.state_dict()
    b = load_model(str(out / "T4-a1-s1")).module.state_dict()
    c = load_model(str(out / "T1-a1-s0")).module.state_dict()
    key = next(iter(a))
    assert not (a[key] == b[key]).all() and not (a[key] == c[key]).all()


def test_pure_distillation_tracks_the_teacher(teacher_store):
    out = teacher_store / "distilled"
    run_kdcache("dump-logits", "--teacher", str(teacher_store / "teacher"), "--dataset", TEST,
                "--out", str(teacher_store / "test.zarr"))
    run_kdcache("train-student", "--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"),
                "--student", "mlp:64", "--temperature", "2", "--alpha", "1", "--epochs", "3",
                "--eval-dataset", TEST, "--eval-store", str(teacher_store / "test.zarr"), "--out", str(out))
    final = json.loads((out / "metrics.json").read_text())[-1]
    assert final["teacher_agreement"] > 0.9  # never saw a label, yet agrees with the teacher


def test_refusals_are_one_line(teacher_store, tmp_path):
    cases = [
        (["--dataset", "synthetic:n=2000,dim=16,classes=5,seed=3", "--store", str(teacher_store / "t.zarr")],
         "different data, order or preprocessing"),
        (["--dataset", SYNTH, "--alpha", "0.5"], "--alpha above 0 needs --store (or an online --teacher)"),
        (["--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"), "--jitter", "2"],
         "--jitter when distilling: the teacher's logits must be for the view the student sees"),
        (["--dataset", SYNTH, "--store", str(tmp_path / "nope.zarr")], "does not exist"),
        (["--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"), "--members", "3"],
         r"members [3] asked for, the store has members 0..0"),
        (["--dataset", SYNTH, "--out", str(teacher_store / "teacher")], "already holds training results"),
    ]
    for extra, message in cases:
        args = ["train-student", "--student", "mlp:8", "--epochs", "1", *extra]
        if "--out" not in extra:
            args += ["--out", str(tmp_path / "o")]
        p = run_kdcache(*args, check=False)
        assert p.returncode == 1, (extra, p.stdout)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (extra, p.stderr)


@pytest.mark.slow
def test_torchrun_ddp_sees_every_sample_once_per_epoch(teacher_store):
    out = teacher_store / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kdcache",
           "train-student", "--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"), "--student", "mlp:16",
           "--temperature", "2,4", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for run in ("T2-a0.9-s0", "T4-a0.9-s0"):
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert [m["samples_seen"] for m in metrics] == [2000, 2000]
        assert all(m["coverage_ok"] for m in metrics)
    assert p.stdout.count("| T2-a0.9-s0 |") == 1  # only rank 0 reports


def test_adam_weight_decay_unlabelled_rows_and_a_student_checkpoint_as_start(teacher_store, tmp_path):
    """Options beyond the defaults run end to end; a run can start from another run's checkpoint."""
    out = tmp_path / "adam"
    run_kdcache("train-student", "--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"), "--student", "mlp:16",
                "--optimizer", "adam", "--lr", "0.003", "--weight-decay", "0.0001", "--schedule", "constant",
                "--alpha", "1", "--temperature", "3", "--epochs", "2", "--workers", "2", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[-1]["loss"] < metrics[0]["loss"] and all(m["lr"] == 0.003 for m in metrics)
    again = tmp_path / "again"
    run_kdcache("train-student", "--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"), "--student", str(out),
                "--alpha", "1", "--temperature", "3", "--epochs", "1", "--lr", "0.0001", "--optimizer", "adam",
                "--out", str(again))
    first = json.loads((again / "metrics.json").read_text())[0]["loss"]
    assert first < metrics[0]["loss"]  # it started from the trained weights, not from scratch


@pytest.mark.parametrize("stack", ["--stack", "--no-stack"])
def test_max_norm_caps_every_units_incoming_weights(teacher_store, stack):
    from safetensors.torch import load_file

    from tests.conftest import invoke_kdcache
    out = teacher_store / f"maxnorm{stack}"
    invoke_kdcache("train-student", "--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"), "--student", "mlp:32",
                   "--temperature", "1,4", "--epochs", "1", "--lr", "0.5", "--max-norm", "0.7", stack,
                   "--out", str(out))
    norms = [w.norm(dim=1).max().item() for d in ("T1-a0.9-s0", "T4-a0.9-s0")
             for k, w in load_file(str(out / d / "model.safetensors")).items() if k.endswith("weight")]
    assert len(norms) == 4 and max(norms) <= 0.7 + 1e-5 and min(norms) > 0.69  # large lr: every layer hits the cap
    assert json.loads((out / "T4-a0.9-s0" / "config.json").read_text())["max_norm"] == 0.7


@pytest.mark.parametrize("stack", ["--stack", "--no-stack"])
def test_warmup_ramps_the_learning_rate_then_follows_the_schedule(teacher_store, stack):
    from tests.conftest import invoke_kdcache
    out = teacher_store / f"warmup{stack}"
    # 2,000 rows in batches of 100: 20 steps an epoch, a ramp of 30 steps
    invoke_kdcache("train-student", "--dataset", SYNTH, "--store", str(teacher_store / "t.zarr"), "--student", "mlp:8",
                   "--temperature", "1,8", "--epochs", "2", "--batch-size", "100", "--lr", "0.3", "--schedule",
                   "constant", "--warmup", "1.5", stack, "--out", str(out))
    for run in ("T1-a0.9-s0", "T8-a0.9-s0"):
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert metrics[0]["lr"] == pytest.approx(0.3 * 20 / 30)  # after step 20 of 30
        assert metrics[1]["lr"] == pytest.approx(0.3)
        assert json.loads((out / run / "config.json").read_text())["warmup"] == 1.5
    p = run_kdcache("train-student", "--dataset", SYNTH, "--student", "mlp:8", "--epochs", "2", "--warmup", "3",
                    "--out", str(teacher_store / "nowarm"), check=False)
    assert p.returncode == 1 and p.stderr.strip() == ("Error: --warmup 3: give a number of epochs between 0 and "
                                                      "--epochs (2)")
