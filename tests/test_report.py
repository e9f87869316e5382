"""kdcache report: the table from real run directories, the paper side by side, the plot."""
from __future__ import annotations

import pytest

from tests.conftest import run_kdcache
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


def test_several_seeds_get_mean_and_spread(runs):
    run_kdcache("train-student", "--dataset", SYNTH, "--store", str(runs / "t.zarr"), "--student", "mlp:8",
                "--temperature", "2", "--seed", "0,1,2", "--epochs", "1", "--eval-dataset", TEST,
                "--out", str(runs / "seeds"))
    md = run_kdcache("report", str(runs / "seeds")).stdout
    line = next(x for x in md.splitlines() if x.startswith(f"| {runs / 'seeds'} |"))  # the setting, over seeds
    cells = [c.strip() for c in line.strip("|").split("|")]
    errors = [int(x.split(" | ")[6]) for x in md.splitlines() if x.startswith(f"| {runs / 'seeds'}/")]
    assert cells[2:6] == ["plain, cached", "2", "0.9", "3"]
    assert float(cells[6]) == pytest.approx(sum(errors) / 3, abs=0.05)
    assert cells[8] == f"{min(errors)}-{max(errors)}"
