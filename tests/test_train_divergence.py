"""A student that diverges is stopped with one line, marked in its metrics, the summary and the
report, and the other students of its sweep end exactly as they would have without it."""
from __future__ import annotations

import json

import pytest
import torch

from kdcache.specs import load_model
from tests.conftest import run_kdcache
from tests.helpers import SYNTH


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("diverge")
    run_kdcache("dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH, "--out",
                str(d / "t.zarr"), "--chunk-rows", "256")
    return d / "t.zarr"


def _train(store, out, *extra):
    return run_kdcache("train-student", "--dataset", SYNTH, "--store", str(store), "--student", "mlp:32",
                       "--temperature", "4", "--epochs", "3", "--batch-size", "16", "--eval-dataset", SYNTH,
                       "--sweep-dirs", "--out", str(out), *extra)


@pytest.mark.parametrize("stack", ["--stack", "--no-stack"])
def test_a_diverging_student_stops_and_the_others_are_untouched(store, tmp_path, stack):
    p = _train(store, tmp_path / "sweep", "--lr", "0.05,1000", stack)
    warn = [line for line in p.stderr.splitlines() if "diverged" in line]
    assert len(warn) == 1 and warn[0].startswith("warning: student T4-a0.9-s0-lr1000 diverged in epoch 1")
    assert "T = 4, lr = 1000: stopped; the others go on" in warn[0] and "try --lr 250" in warn[0]
    bad = json.loads((tmp_path / "sweep" / "T4-a0.9-s0-lr1000" / "metrics.json").read_text())
    assert len(bad) == 1 and bad[-1]["diverged"]["epoch"] == 1 and "eval_errors" not in bad[-1]
    summary = {r["run"]: r for r in json.loads((tmp_path / "sweep" / "summary.json").read_text())}
    assert summary["T4-a0.9-s0-lr1000"]["diverged"] and "diverged" not in summary["T4-a0.9-s0-lr0.05"]
    assert "| T4-a0.9-s0-lr1000 (diverged) |" in p.stdout
    good = json.loads((tmp_path / "sweep" / "T4-a0.9-s0-lr0.05" / "metrics.json").read_text())
    assert len(good) == 3 and good[-1]["eval_errors"] >= 0
    report = run_kdcache("report", str(tmp_path / "sweep")).stdout
    assert "diverged" in report
    # the healthy student, trained without its diverging neighbour
    _train(store, tmp_path / "alone", "--lr", "0.05", stack)
    a = load_model(str(tmp_path / "sweep" / "T4-a0.9-s0-lr0.05")).module.state_dict()
    b = load_model(str(tmp_path / "alone" / "T4-a0.9-s0")).module.state_dict()
    for k in a:
        if stack == "--no-stack":
            assert torch.equal(a[k], b[k]), k
        else:  # one stack of 2 against a stack of 1: other matrix shapes, the same arithmetic
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [m["loss"] for m in good] == pytest.approx(
        [m["loss"] for m in json.loads((tmp_path / "alone" / "T4-a0.9-s0" / "metrics.json").read_text())], rel=1e-5)


def test_a_first_epoch_that_already_explodes_is_caught_against_the_initial_loss(store, tmp_path):
    """2,000 rows in batches of 128: 16 steps an epoch, fewer than the usual check interval. The lr-50
    student explodes within its first epoch; the reference is its loss before any update, so the
    explosion cannot hide in its own first window."""
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", str(store), "--student", "mlp:64",
                    "--temperature", "20", "--lr", "0.05,50", "--epochs", "2", "--batch-size", "128",
                    "--eval-dataset", SYNTH, "--out", str(tmp_path / "short"))
    assert p.returncode == 0  # one of two diverged: not every student
    warn = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "student T20-a0.9-s0-lr50 diverged in epoch 1" in warn[0]
    assert "x its initial" in warn[0] or "loss nan" in warn[0] or "loss inf" in warn[0]
    bad = json.loads((tmp_path / "short" / "T20-a0.9-s0-lr50" / "metrics.json").read_text())
    assert bad[-1]["diverged"]["step"] is not None and bad[-1]["diverged"]["step"] <= 8  # within 2 checks
    good = json.loads((tmp_path / "short" / "T20-a0.9-s0-lr0.05" / "metrics.json").read_text())
    assert len(good) == 2 and "diverged" not in good[-1]
    summary = {r["run"]: r for r in json.loads((tmp_path / "short" / "summary.json").read_text())}
    assert summary["T20-a0.9-s0-lr0.05"]["lr"] == 0.05 and summary["T20-a0.9-s0-lr50"]["lr"] == 50  # configured
    assert summary["T20-a0.9-s0-lr0.05"]["last_lr"] < 0.05  # the cosine schedule's last value
    report = run_kdcache("report", str(tmp_path / "short")).stdout
    assert "| T | alpha | lr | test errors |" in report and "| 50 | diverged |" in report
    # exit status: 3 when asked to fail on any divergence
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", str(store), "--student", "mlp:64",
                    "--temperature", "20", "--lr", "0.05,50", "--epochs", "1", "--batch-size", "128",
                    "--fail-on-divergence", "--out", str(tmp_path / "strict"), check=False)
    assert p.returncode == 3 and p.stderr.strip().splitlines()[-1] == (
        "Error: 1 of 2 students diverged (T20-a0.9-s0-lr50); their metrics.json say where and why")


def test_a_loss_infinite_before_any_update_is_not_blamed_on_the_learning_rate(store, tmp_path):
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", str(store), "--student",
                    "tests.helpers:overflowing_student", "--epochs", "1", "--out", str(tmp_path / "inf"), check=False)
    assert p.returncode == 3  # every student diverged
    warn = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "has loss nan on its first batch, before any update, so the learning rate is not" \
        in warn[0].replace("loss inf", "loss nan") and "try --lr" not in warn[0]
    assert json.loads((tmp_path / "inf" / "metrics.json").read_text())[-1]["diverged"]["reason"] == \
        "non-finite at start"


def test_healthy_slow_and_stalled_students_are_never_stopped(store, tmp_path):
    """A learning rate far too low (the loss barely moves, accuracy at chance) is a stall, not a
    collapse: the student trains on. So do students at every T of the paper's sweep."""
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", str(store), "--student", "mlp:32",
                    "--temperature", "1,2,5,10,20", "--lr", "1e-6,0.05", "--epochs", "3", "--batch-size", "64",
                    "--warmup", "1", "--out", str(tmp_path / "slow"))
    assert "warning" not in p.stderr and "diverged" not in p.stdout


def test_the_collapse_check():
    """Knocked out (loss rose, then settled near its start at chance accuracy): stopped. Slow (never above
    its start), learning (loss fell) or above chance: left alone."""
    from pathlib import Path

    from kdcache.train import divergence
    from kdcache.train.students import Student

    def student(initial, peak):
        return Student("s", 4.0, 0.9, 0, 0.5, Path("."), initial_loss=initial, peak_loss=peak)
    lines: list[str] = []
    cases = [student(2.0, 5.0), student(2.0, 1.9), student(2.0, 5.0), student(2.0, 5.0)]
    losses, accuracy = [1.95, 1.99, 1.0, 1.95], [0.11, 0.10, 0.10, 0.60]
    stopped = divergence.check_collapse(cases, losses, accuracy, majority=0.1135, epoch=1, log=lines.append)
    assert stopped == [0] and cases[0].diverged["reason"] == "collapsed" and len(lines) == 1
    assert lines[0].startswith("warning: student s collapsed in epoch 2 (training accuracy 0.1100, no better than "
                               "always predicting the most common label (0.1135)")
    assert all(s.diverged is None for s in cases[1:])
    assert divergence.check_collapse([student(2.0, 5.0)], [1.95], [0.11], None, 1, lines.append) == []  # no labels
    assert [divergence.check_interval(n) for n in (1, 8, 16, 1000)] == [1, 2, 4, 50]
