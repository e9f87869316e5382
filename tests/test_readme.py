"""Every command in the README runs: the tour, the torchrun lines, the Python snippet, the quick example."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA_ROOT, ROOT

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "KDCACHE_DATA": DATA_ROOT, "PATH": bindir + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": str(ROOT)}


def test_setup_commands_are_the_makefile_targets_ci_runs():
    setup = re.search(r"## Set-up: two commands\n.*?```\n(.*?)```", README, re.S).group(1)
    targets = [line.split()[1] for line in setup.splitlines() if line.startswith("make ")]
    assert targets == ["example", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "kdcache run pipelines/mnist_hinton.yaml --quick" in makefile and "-m pytest" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    commands = [line for b in blocks("bash") for line in b.strip().splitlines() if line.strip()]
    assert len(commands) >= 10
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")  # the README runs from the repository's root
    (tmp_path / "README.md").symlink_to(ROOT / "README.md")  # the text corpus of the sequence example
    run_env = {**env(), "KDCACHE_CACHE": str(tmp_path / "cache")}  # the cache section's dumps stay in the test
    for line in commands:
        p = subprocess.run(shlex.split(line), cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README command failed: {line}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert (tmp_path / "runs/tour/students/T20-a0.9-s0/model.safetensors").exists()
    assert "| 20 | 0.9 |" in (tmp_path / "runs/tour/report.md").read_text()
    assert (tmp_path / "runs/tour/lm-student/model.safetensors").exists()
    snippets = blocks("python")
    assert len(snippets) == 2  # your own training loop; a store in xarray
    for snippet in snippets:
        p = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env(), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr
    assert (tmp_path / "runs/tour/confusion.png").stat().st_size > 1000


@pytest.mark.slow
def test_make_example_pipeline_runs(tmp_path):
    """`make example` minus the install: the quick MNIST pipeline, then a rerun that skips every step."""
    cmd = [sys.executable, "-m", "kdcache", "run", str(ROOT / "pipelines/mnist_hinton.yaml"), "--quick"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = (tmp_path / "runs/mnist_hinton-quick/report.md").read_text()
    assert "| student 784-800-800-10 distilled | 74 |" in report and "Quick profile" in report
    runs = json.loads((tmp_path / "runs/mnist_hinton-quick/report.json").read_text())["runs"]
    few = {role: [r["test_errors"] for r in runs if "few-" in r["dir"] and r["role"] == role]
           for role in ("baseline", "distilled")}
    assert len(few["baseline"]) == len(few["distilled"]) == 3  # three seeds each
    assert max(few["distilled"]) < min(few["baseline"])  # soft targets help on 3% of the data, for every seed
    # section 3, from the shipped teacher: every distilled setting ahead of the student alone (mean over seeds)
    teacher = next(r for r in runs if r["role"] == "teacher")
    assert teacher["dir"] == str(ROOT / "data/mnist-teacher") and teacher["test_errors"] == 79
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    alone = mean([r["test_errors"] for r in runs if r["dir"].split("/")[-2:-1] == ["student-alone"]])
    settings: dict = {}
    for r in runs:
        if "/distilled/" in r["dir"] or "/logit-matching/" in r["dir"]:
            settings.setdefault((r["soft_loss"], r["temperature"]), []).append(r["test_errors"])
    assert set(settings) == {("kd", 2), ("kd", 20), ("logit-mse", None)} and all(len(v) == 3 for v in settings.values())
    assert all(mean(v) < alone for v in settings.values()), (settings, alone)
    again = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert again.stdout.count("] skip (up to date)") == 8 and "[teacher] use (given:" in again.stdout
