"""Pipelines: every shipped file validates; bad files are refused with file, key and line; reruns skip."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdcache.errors import ConfigError, KdcacheError
from kdcache.pipeline import Runner, argv, load_pipeline
from tests.conftest import ROOT, run_kdcache
from tests.helpers import SYNTH

PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_shipped_pipeline_validates(path):
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "a pipeline file starts with a comment saying what it reproduces"
    assert "minutes" in path.read_text().split("pipeline:")[0], "the header says how long it takes"
    for profile in (None, "quick"):
        p = load_pipeline(str(path), profile)
        assert p.steps and all(argv(s)[0] == s.command for s in p.steps)


TINY = f"""# a tiny pipeline for tests (seconds)
pipeline: tiny
state_dir: {{root}}/state
vars:
  root: {{root}}
  epochs: 1
  teacher: ""
steps:
  - name: teacher
    command: train-student
    use: ${{vars.teacher}}
    with:
      dataset: "{SYNTH}"
      student: mlp:32
      epochs: ${{vars.epochs}}
      out: ${{vars.root}}/teacher
  - name: logits
    command: dump-logits
    with:
      teacher: ["${{steps.teacher.out}}"]
      dataset: "{SYNTH}"
      out: ${{vars.root}}/t.zarr
  - name: students
    command: train-student
    with:
      dataset: "{SYNTH}"
      store: ${{steps.logits.out}}
      student: mlp:8
      temperature: {{temps}}
      epochs: 1
      out: ${{vars.root}}/students
  - name: report
    command: report
    with:
      run-dirs: ["${{steps.students.out}}"]
      out: ${{vars.root}}/report.md
"""


def write(tmp_path, temps="[1, 4]", epochs=None):
    text = TINY.replace("{root}", str(tmp_path / "runs")).replace("{temps}", temps)
    if epochs is not None:
        text = text.replace("epochs: 1\n", f"epochs: {epochs}\n", 1)
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "tiny.yaml"
    f.write_text(text)
    return str(f)


def statuses(path):
    return {a.step.name: a.status for a in Runner(load_pipeline(path)).plan()}


def test_rerun_skips_adding_a_temperature_trains_only_it_and_a_change_reruns_dependents(tmp_path):
    f = write(tmp_path)
    Runner(load_pipeline(f)).run(echo=lambda s: None)
    runs = tmp_path / "runs"
    assert (runs / "students" / "T1-a0.9-s0" / "model.safetensors").exists()
    assert statuses(f) == {"teacher": "skip", "logits": "skip", "students": "skip", "report": "run"}

    t1 = (runs / "students" / "T1-a0.9-s0" / "model.safetensors").stat().st_mtime_ns
    store = (runs / "t.zarr" / "zarr.json").stat().st_mtime_ns
    f = write(tmp_path, temps="[1, 4, 8]")
    assert statuses(f)["students"] == "partial"
    Runner(load_pipeline(f)).run(echo=lambda s: None)
    assert (runs / "students" / "T8-a0.9-s0" / "model.safetensors").exists()
    assert (runs / "students" / "T1-a0.9-s0" / "model.safetensors").stat().st_mtime_ns == t1
    assert (runs / "t.zarr" / "zarr.json").stat().st_mtime_ns == store
    assert "T8" in (runs / "report.md").read_text() and "T1" in (runs / "report.md").read_text()

    f = write(tmp_path, temps="[1, 4, 8]", epochs=2)
    assert statuses(f) == {"teacher": "rerun", "logits": "rerun", "students": "rerun", "report": "run"}


def test_a_step_can_use_an_output_made_elsewhere_and_its_dependents_follow_it(tmp_path):
    first = write(tmp_path / "a")  # trains runs/teacher the usual way
    Runner(load_pipeline(first)).run(echo=lambda s: None)
    teacher = tmp_path / "a" / "runs" / "teacher"
    model = (teacher / "model.safetensors").read_bytes()

    second = write(tmp_path / "b")
    use = {"teacher": str(teacher)}
    lines: list[str] = []
    Runner(load_pipeline(second, overrides=use)).run(echo=lines.append)
    assert lines[0] == f"[teacher] use (given: {teacher})"
    assert not (tmp_path / "b" / "runs" / "teacher").exists(), "the step did not run"
    assert f"--teacher {teacher}" in lines[1]
    assert (tmp_path / "b" / "runs" / "students" / "T4-a0.9-s0" / "model.safetensors").exists()
    assert (teacher / "model.safetensors").read_bytes() == model, "the given output is left as it was"
    assert {a.step.name: a.status for a in Runner(load_pipeline(second, overrides=use)).plan()} == \
        {"teacher": "use", "logits": "skip", "students": "skip", "report": "run"}

    # the given teacher made again (2 epochs): what was made from it reruns, and says why
    Runner(load_pipeline(write(tmp_path / "a", epochs=2))).run(echo=lambda s: None)
    actions = {a.step.name: a for a in Runner(load_pipeline(second, overrides=use)).plan()}
    assert actions["logits"].status == "rerun" and actions["logits"].detail == "step 'teacher' was given another output"

    # no longer given: the step runs here, into its own out
    assert statuses(second)["teacher"] == "run"
    with pytest.raises(KdcacheError, match=r"step 'teacher': use: .*nope does not exist; give the path of a "
                                            r"finished output"):
        Runner(load_pipeline(second, overrides={"teacher": str(tmp_path / "nope")})).plan()


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    f = write(tmp_path)
    p = run_kdcache("run", f, "--dry-run")
    assert "[teacher] run: kdcache train-student --dataset" in p.stdout
    assert "--temperature 1,4" in p.stdout and "--sweep-dirs" in p.stdout
    assert not (tmp_path / "runs").exists()


def test_output_not_made_by_the_pipeline_is_not_overwritten(tmp_path):
    f = write(tmp_path)
    (tmp_path / "runs" / "teacher").mkdir(parents=True)
    (tmp_path / "runs" / "teacher" / "notes.txt").write_text("mine")
    p = run_kdcache("run", f, check=False)
    assert p.returncode == 1 and "exists but this pipeline did not make it" in p.stderr
    assert (tmp_path / "runs" / "teacher" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(stepz=[]), r":\d+: stepz: unknown key"),
    (lambda d: d["steps"][0]["with"].update(epochs="many"),
     r":\d+: steps\[0\]\.with\.epochs: 'many' is not a valid integer"),
    (lambda d: d["steps"][0]["with"].update(colour="red"),
     r":\d+: steps\[0\]\.with\.colour: train-student has no option 'colour'"),
    (lambda d: d["steps"][1]["with"].update(teacher=["${steps.nope.out}"]),
     r"refers to step 'nope', which is not defined"),
    (lambda d: d["steps"][0]["with"].update(out="${steps.logits.out}"),
     r"refers to step 'logits', which is defined later"),
    (lambda d: d["steps"][2].update(command="train"), r"'train' is not a step command"),
    (lambda d: d["steps"][2]["with"].update(temperature=["hot"]), r"expected a number or a list of numbers"),
    (lambda d: d["steps"][0]["with"].pop("student"), r"train-student needs --student"),
])
def test_bad_files_name_file_key_and_line(tmp_path, edit, message):
    data = yaml.safe_load(Path(write(tmp_path)).read_text())
    edit(data)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=message) as e:
        load_pipeline(str(f))
    assert str(e.value).startswith(f"{f}:")


def test_line_number_points_at_the_key(tmp_path):
    f = Path(write(tmp_path))
    lines = f.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if "student: mlp:8" in line)
    lines.insert(n + 1, "      temprature: 3")
    f.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match=rf"tiny.yaml:{n + 2}: steps\[2\]\.with\.temprature"):
        load_pipeline(str(f))


def test_quick_text_pipeline_distils_a_sequence_teacher_from_every_layout(tmp_path):
    """The shipped large-vocabulary pipeline, quick profile, run from a copy of the repo's README."""
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "text_sparse.yaml").write_text((ROOT / "pipelines" / "text_sparse.yaml").read_text())
    run_kdcache("run", "pipelines/text_sparse.yaml", "--quick", cwd=str(tmp_path))
    report = (tmp_path / "runs" / "text_sparse-quick" / "report.md").read_text()
    assert "perplexity" in report and report.count("lstm:16,32") == 11  # labels only, 5 stores x T=1,2
    from kdcache.store import open_store
    assert open_store(str(tmp_path / "runs" / "text_sparse-quick" / "top5.zarr")).manifest.per_token


def test_set_overrides_a_variable_and_null_unsets_an_option(tmp_path):
    f = tmp_path / "p.yaml"
    text = TINY.replace("{root}", str(tmp_path / "runs")).replace("{temps}", "2")
    f.write_text(text.replace("      out: ${vars.root}/teacher",
                                                    "      out: ${vars.root}/teacher\n      subset: null"))
    p = load_pipeline(str(f), None, {"epochs": "3"})
    assert p.steps[0].options["epochs"] == 3 and "subset" not in p.steps[0].options
    with pytest.raises(ConfigError, match="declares no variable 'epoch'"):
        load_pipeline(str(f), None, {"epoch": "3"})
    out = run_kdcache("run", str(f), "--dry-run", "--set", "epochs=2").stdout
    assert "--epochs 2" in out


def test_a_pipeline_can_dump_into_the_cache_and_train_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    text = TINY.replace("{root}", str(tmp_path / "runs")).replace("{temps}", "[2]")
    text = text.replace("      out: ${vars.root}/t.zarr\n", "")
    text = text.replace("      store: ${steps.logits.out}\n",
                        '      store: auto\n      teacher: ["${steps.teacher.out}"]\n')
    f = tmp_path / "cached.yaml"
    f.write_text(text)
    said = []
    Runner(load_pipeline(str(f))).run(echo=said.append)
    assert (tmp_path / "runs" / "students" / "T2-a0.9-s0" / "model.safetensors").exists()
    assert len(list((tmp_path / "cache" / "stores").glob("*.zarr"))) == 1
    assert statuses(str(f)) == {"teacher": "skip", "logits": "run", "students": "skip", "report": "run"}
    assert any("[logits] run (into the store cache" in s for s in said)
