"""kdcache report: the table from real run directories, the paper side by side, the plot."""
from __future__ import annotations

import json

import pytest

from tests.conftest import invoke_kdcache, run_kdcache
from tests.helpers import SYNTH

TEST = "synthetic:n=300,dim=16,classes=5,seed=0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    run_kdcache("train-student", "--dataset", SYNTH, "--student", "mlp:32", "--epochs", "1", "--eval-dataset", TEST,
                "--out", str(d / "teacher"))
    run_kdcache("dump-logits", "--teacher", str(d / "teacher"), "--dataset", SYNTH, "--out", str(d / "t.zarr"))
    run_kdcache("train-student", "--dataset", SYNTH, "--store", str(d / "t.zarr"), "--student", "mlp:8",
                "--temperature", "1,3,10", "--epochs", "1", "--eval-dataset", TEST, "--out", str(d / "students"))
    return d


def test_table_lists_every_run_sorted_by_temperature(runs):
    md = run_kdcache("report", str(runs / "teacher"), str(runs / "students"), "--out", str(runs / "r.md")).stdout
    rows = [line for line in md.splitlines() if line.startswith(f"| {runs}")]
    assert len(rows) == 4
    assert [r.split(" | ")[4] for r in rows] == ["-", "1", "3", "10"]
    assert [r.split(" | ")[3] for r in rows] == ["plain", "plain, cached", "plain, cached", "plain, cached"]
    assert "Over seeds" not in md  # one seed per setting: no spread to show
    assert (runs / "r.md").read_text().startswith("# kdcache report")
    # report.json beside it: the teacher found as the run the students were distilled from
    listed = json.loads((runs / "r.json").read_text())["runs"]
    assert [r["role"] for r in listed] == ["teacher", "distilled", "distilled", "distilled"]
    assert [r["temperature"] for r in listed] == [None, 1, 3, 10] and listed[0]["spec"] == "mlp:32"
    assert all(isinstance(r["test_errors"], int) and 0 <= r["test_accuracy"] <= 1 for r in listed)
    assert {r["alpha"] for r in listed[1:]} == {0.9} and {r["seed"] for r in listed} == {0}


def test_evaluate_a_checkpoint_with_a_class_bias_chosen_on_held_out_rows(runs, tmp_path):
    student = str(runs / "students" / "T3-a0.9-s0")
    out = tmp_path / "e.json"
    store = str(runs / "t-test.zarr")
    invoke_kdcache("dump-logits", "--teacher", str(runs / "teacher"), "--dataset", TEST, "--out", store)
    p = invoke_kdcache("evaluate", student, "--dataset", TEST, "--eval-store", store, "--json", str(out))
    plain = json.loads(out.read_text())
    assert plain["eval_samples"] == 300 and sum(plain["errors_by_class"]) == plain["eval_errors"]
    assert sum(plain["samples_by_class"]) == 300 and 0 <= plain["teacher_agreement"] <= 1
    assert f"{plain['eval_errors']} errors of 300" in p.stdout
    # a huge bias for class 2: every prediction becomes 2
    invoke_kdcache("evaluate", student, "--dataset", TEST, "--class-bias", "2=1000", "--json", str(out))
    biased = json.loads(out.read_text())
    assert biased["class_bias"] == {"2": 1000.0}
    assert biased["errors_by_class"][2] == 0 and biased["eval_errors"] == 300 - biased["samples_by_class"][2]
    p = invoke_kdcache("evaluate", student, "--dataset", TEST, "--class-bias", "2=auto", "--tune-dataset", SYNTH,
                       "--tune-subset", "1000:2000", "--json", str(out))
    tuned = json.loads(out.read_text())["tuned"][0]
    assert tuned["class"] == 2 and tuned["tune_errors"] <= tuned["tune_errors_at_0"] and "chosen on 1000" in p.stdout
    (tmp_path / "before.json").write_text(json.dumps(plain))
    md = invoke_kdcache("report", student, "--evaluation", str(tmp_path / "before.json"), "--evaluation", str(out),
                        "--note", "Omitted class.", "--out", str(tmp_path / "r.md")).stdout
    assert "Omitted class." in md and "| errors on 2 |" in md
    rows = [line for line in md.splitlines() if line.startswith(f"| {student} | {TEST} |")]
    assert len(rows) == 2 and f"| {plain['errors_by_class'][2]}/{plain['samples_by_class'][2]} |" in rows[0]
    assert len(json.loads((tmp_path / "r.json").read_text())["evaluations"]) == 2
    for args, message in ((["--class-bias", "9=1"], "outside 0..4"), (["--class-bias", "2=auto"], "--tune-dataset"),
                          (["--class-bias", "two"], "expected CLASS=BIAS")):
        p = invoke_kdcache("evaluate", student, "--dataset", TEST, *args)
        assert p.returncode == 1 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_paper_side_by_side(runs):
    md = run_kdcache("report", str(runs / "teacher"), str(runs / "students"), "--paper", "hinton-mnist",
                     "--role", f"teacher={runs / 'teacher'}", "--role", f"distilled={runs / 'students'}").stdout
    assert "| teacher 784-1200-1200-10 | 67 |" in md and "| student 784-800-800-10 alone | 146 | - | - |" in md


def test_plot_is_a_png_or_a_note(runs):
    png = runs / "plot.png"
    md = run_kdcache("report", str(runs / "students"), "--plot", str(png)).stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot: matplotlib is not installed" in md
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![test error against temperature]" in md


def test_not_a_run_directory(tmp_path):
    p = run_kdcache("report", str(tmp_path), check=False)
    assert p.returncode == 1 and "holds no kdcache run" in p.stderr


def test_several_seeds_get_mean_and_spread_for_each_setting(runs):
    run_kdcache("train-student", "--dataset", SYNTH, "--store", str(runs / "t.zarr"), "--student", "mlp:8",
                "--temperature", "2", "--seed", "0,1,2", "--lr", "0.05,0.2", "--epochs", "1", "--eval-dataset", TEST,
                "--out", str(runs / "seeds"))
    md = run_kdcache("report", str(runs / "seeds")).stdout
    settings = [x for x in md.splitlines() if x.startswith(f"| {runs / 'seeds'} |")]  # a setting over seeds each
    assert len(settings) == 2
    means = []
    for line, lr in zip(settings, ("0.05", "0.2")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        errors = [int(x.split(" | ")[7]) for x in md.splitlines()
                  if x.startswith(f"| {runs / 'seeds'}/") and x.split(" | ")[0].endswith(f"-lr{lr}")]
        assert cells[2:7] == ["plain, cached", "2", "0.9", lr, "3"] and len(errors) == 3
        assert float(cells[7]) == pytest.approx(sum(errors) / 3, abs=0.05)
        assert cells[9] == f"{min(errors)}-{max(errors)}"
        means.append(f"T=2, lr={lr}: {cells[7]} ± {cells[8]} (3 seeds)")
    # beside the paper: each setting's mean and spread over seeds, not one run
    md = run_kdcache("report", str(runs / "seeds"), "--paper", "hinton-mnist", "--role", f"distilled={runs / 'seeds'}",
                     "--plot", str(runs / "seeds.png")).stdout
    row = next(x for x in md.splitlines() if x.startswith("| student 784-800-800-10 distilled | 74 |"))
    assert row.endswith(f" | {means[0]}; {means[1]} |") and ", 1 epochs |" in row


def test_an_ensemble_distilled_into_one_model_side_by_side_with_section_4(tmp_path):
    """Members from several seeds, one store of them all per split, a student distilled from the
    ensemble: the ensemble's own errors (the eval store's mean of probabilities, recomputed here with
    numpy) and the fraction of its gain the student keeps."""
    import numpy as np

    from kdcache.datasets import load_dataset
    from kdcache.store import open_store
    d = tmp_path
    run_kdcache("train-student", "--dataset", SYNTH, "--student", "mlp:16", "--seed", "0,1,2", "--epochs", "1",
                "--eval-dataset", TEST, "--out", str(d / "members"))
    members = [str(d / "members" / f"supervised-s{s}") for s in range(3)]
    for data, name in ((SYNTH, "train"), (TEST, "test")):
        run_kdcache("dump-logits", *[a for m in members for a in ("--teacher", m)], "--dataset", data,
                    "--out", str(d / f"{name}.zarr"))
    run_kdcache("train-student", "--dataset", SYNTH, "--store", str(d / "train.zarr"), "--student", "mlp:16",
                "--temperature", "2,4", "--epochs", "1", "--eval-dataset", TEST, "--eval-store", str(d / "test.zarr"),
                "--out", str(d / "distilled"))
    s = open_store(str(d / "test.zarr"))
    z = s.read(0, s.num_samples).logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(1)
    y = np.asarray([load_dataset(TEST).dataset[i][1] for i in s.read(0, s.num_samples).sample_ids])
    ensemble_errors = int((p.argmax(-1) != y).sum())
    md = run_kdcache("report", str(d / "members"), str(d / "distilled"), "--paper", "hinton-ensemble", "--role",
                     f"baseline={d / 'members'}", "--role", f"distilled={d / 'distilled'}").stdout
    metrics = json.loads((d / "distilled" / "T2-a0.9-s0" / "metrics.json").read_text())[-1]
    assert metrics["teacher_errors"] == ensemble_errors
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in md.splitlines() if line.startswith("| ")}
    assert rows["a single model alone"][1] == "58.9" and "(3 seeds)" in rows["a single model alone"][2]
    assert rows["the ensemble of its 3 (mean of probabilities)"][1:3] == ["61.1", str(ensemble_errors)]
    assert rows["one model of the same size, distilled from the ensemble"][1] == "60.8"
    base = [json.loads((d / "members" / f"supervised-s{s}" / "metrics.json").read_text())[-1]["eval_errors"]
            for s in range(3)]
    best = min(json.loads((d / "distilled" / f"T{t}-a0.9-s0" / "metrics.json").read_text())[-1]["eval_errors"]
               for t in (2, 4))
    gain, kept = np.mean(base) - ensemble_errors, np.mean(base) - best
    assert ("Gain kept: in the paper the ensemble gains 2.2 points over a single model and the distilled model "
            "keeps 1.9 of them (86%).") in md
    assert f"Here the ensemble makes {gain:.1f} fewer test errors than a single model (mean over the members) " \
           f"and the distilled model {kept:.1f} fewer" in md
