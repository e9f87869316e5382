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
