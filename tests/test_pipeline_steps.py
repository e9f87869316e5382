"""Pipeline steps are checked against the commands' config dataclasses (kdcache.commands) and run the
library functions the CLI calls: a command's options are its CLI flags, a bad option is one line with
file:line, a step's output equals the CLI's, and stamps written when steps ran the CLI still count."""
from __future__ import annotations

import shlex

import click
import numpy as np
import pytest
from safetensors.numpy import load_file

from kdcache.cli import cli
from kdcache.commands import CLICK_NAMES, STEP_COMMANDS, commands, numbers, words
from kdcache.errors import ConfigError
from kdcache.layouts import LAYOUTS
from kdcache.pipeline import Runner, load_pipeline
from kdcache.store import open_store
from tests.conftest import run_kdcache
from tests.helpers import SYNTH


def _click_range(p: click.Parameter) -> tuple | None:
    t = p.type
    if not isinstance(t, click.types._NumberRangeBase):
        return None
    return t.min, t.max, t.min_open, t.max_open


@pytest.mark.parametrize("name", STEP_COMMANDS)
def test_a_commands_options_are_its_cli_flags(name):
    """Same fields, flags, kinds, choices, ranges and defaults: the CLI and a step cannot drift apart."""
    spec, cmd = commands()[name], cli.commands[name]
    params = {p.name: p for p in cmd.params}
    options = {CLICK_NAMES.get(f, f): o for f, o in spec.options.items()}
    defaults = cmd.make_context(name, [], resilient_parsing=True).params  # what the command gets when not given
    assert sorted(params) == sorted(options)
    for key, p in params.items():
        o = options[key]
        assert o.required == p.required and o.argument == isinstance(p, click.Argument), key
        if o.argument:
            assert (o.kind == "repeat") == (p.nargs == -1), key
            continue
        assert o.flag == p.opts[0], key
        default = None if p.required else defaults[key]
        assert (o.kind == "flag") == (p.is_flag and not p.secondary_opts), key
        assert (o.kind == "switch") == bool(p.secondary_opts), key
        assert (o.kind == "repeat") == p.multiple, key
        if o.kind in ("numbers", "words"):
            assert isinstance(p.type, click.types.StringParamType), key  # comma-separated text on the command line
            parse = (lambda v: numbers(v, o.number)) if o.kind == "numbers" else words
            assert (parse(default) if default is not None else None) == o.default, key
        elif o.kind == "number":
            assert isinstance(p.type, click.types.IntParamType if o.number is int else click.types.FloatParamType)
            assert default == o.default, key
        elif o.kind == "repeat":
            assert list(default or []) == (o.default or []), key
        else:
            assert default == o.default, key
        if o.kind != "words":
            assert (None if o.choices is None else tuple(o.choices)) == \
                (tuple(p.type.choices) if isinstance(p.type, click.Choice) else None), key
        assert _click_range(p) == (None if o.range is None else
                                   (o.range.low, o.range.high, o.range.low_open, o.range.high_open)), key


ONE_STEP = """pipeline: one
state_dir: {state}
steps:
  - name: s
    command: {command}
    with:
{required}
      {key}: {value}
"""
REQUIRED = {
    "dump-logits": {"teacher": "tests.helpers:slow_teacher", "dataset": SYNTH},
    "train-student": {"dataset": SYNTH, "student": "mlp:8", "out": "runs/x"},
    "evaluate": {"model": "runs/x", "dataset": SYNTH},
    "convert": {"src": "a.zarr", "dst": "b.zarr"},
}


@pytest.mark.parametrize("command,key,value,message", [
    ("dump-logits", "colour", "red", "dump-logits has no option 'colour'; known: amp, augment, batch-size, "),
    ("train-student", "temprature", "[2]", "train-student has no option 'temprature'; known: "),
    ("dump-logits", "batch-size", "many", "'many' is not a valid integer"),
    ("dump-logits", "batch_size", "0", "0 is not in the range x>=1"),
    ("train-student", "dropout", "1", "1.0 is not in the range 0<=x<1"),
    ("train-student", "epochs", "2.5", "expected an integer, got 2.5"),
    ("train-student", "overwrite", "'yes'", "expected true or false, got 'yes'"),
    ("train-student", "seed", "'0,1.5'", "'0,1.5' is not a comma-separated list of integers"),
    ("train-student", "temperature", "[[2]]", "expected a number or a list of numbers, got [2]"),
    ("train-student", "teacher", "[[a]]", "expected a string, got ['a']"),
    ("evaluate", "json", "[a.json, b.json]", "expected a single value, got list"),
    ("dump-logits", "layout", "dense2", "'dense2' is not one of " + ", ".join(map(repr, LAYOUTS))),
    ("convert", "format", "npz", "'npz' is not one of 'zarr', 'hdf5'"),
    ("train-student", "loss", "kd,l2", "'l2' is not one of 'kd', 'logit-mse'"),
    ("train-student", "optimizer", "lbfgs", "'lbfgs' is not one of 'sgd', 'adam'"),
])
def test_a_bad_option_is_one_line_naming_file_line_step_and_key(tmp_path, command, key, value, message):
    required = "\n".join(f"      {k}: {v!r}" for k, v in REQUIRED[command].items())
    f = tmp_path / "one.yaml"
    f.write_text(ONE_STEP.format(state=tmp_path / "state", command=command, required=required, key=key, value=value))
    line = f.read_text().splitlines().index(f"      {key}: {value}") + 1
    with pytest.raises(ConfigError) as e:
        load_pipeline(str(f))
    assert str(e.value).startswith(f"{f}:{line}: steps[0].with.{key}: {message}")
    assert "\n" not in str(e.value)


def test_a_step_takes_the_keys_users_write_and_builds_the_cli_config(tmp_path):
    f = tmp_path / "one.yaml"
    f.write_text(ONE_STEP.format(state=tmp_path / "state", command="train-student", key="batch-size", value=16,
                                 required="\n".join(f"      {k}: {v!r}" for k, v in REQUIRED["train-student"].items())
                                 + "\n      temperature: '1,2'\n      lr: [0.1]\n      loss: kd,logit-mse"
                                 + "\n      teacher: a\n      store: auto\n      sweep_dirs: false"))
    config = load_pipeline(str(f)).steps[0].config
    assert (config.batch_size, config.temperatures, config.lrs, config.losses, config.teachers, config.sweep_dirs) == \
        (16, [1.0, 2.0], [0.1], ["kd", "logit-mse"], ["a"], False)
    assert type(config).__name__ == "TrainConfig"


SAME = f"""pipeline: same
state_dir: {{state}}
vars:
  root: runs
steps:
  - name: logits
    command: dump-logits
    with:
      teacher: [tests.helpers:slow_teacher]
      dataset: "{SYNTH}"
      chunk-rows: 500
      out: ${{vars.root}}/t.zarr
  - name: students
    command: train-student
    with:
      dataset: "{SYNTH}"
      store: ${{steps.logits.out}}
      student: mlp:8
      temperature: [2, 5]
      epochs: 1
      batch-size: 64
      out: ${{vars.root}}/students
"""


def same(root) -> str:
    """SAME with its outputs and stamps under ``root``."""
    return SAME.replace("{state}", str(root / "state")).replace("root: runs", f"root: {root}")


def test_a_step_run_through_the_library_equals_its_dry_run_command_run_by_the_cli(tmp_path):
    lib, by_cli = tmp_path / "lib", tmp_path / "cli"
    for root in (lib, by_cli):
        root.mkdir()
        (root / "same.yaml").write_text(same(root))
    said: list[str] = []
    Runner(load_pipeline(str(lib / "same.yaml"))).run(echo=said.append)
    lines: list[str] = []
    Runner(load_pipeline(str(by_cli / "same.yaml"))).run(dry_run=True, echo=lines.append)
    printed = [run_kdcache(*shlex.split(line.split(": kdcache ", 1)[1])).stdout for line in lines]

    a, b = open_store(str(lib / "t.zarr")), open_store(str(by_cli / "t.zarr"))
    assert np.array_equal(a.read(0, len(a)).logits, b.read(0, len(b)).logits)
    assert {k: v for k, v in a.manifest.to_dict().items() if k != "created_at"} == \
        {k: v for k, v in b.manifest.to_dict().items() if k != "created_at"}
    for run in ("T2-a0.9-s0", "T5-a0.9-s0"):
        x, y = load_file(lib / "students" / run / "model.safetensors"), load_file(by_cli / "students" / run /
                                                                                   "model.safetensors")
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    table = printed[1].strip()
    assert table.startswith("| run |") and table in said, "the step says what the command says"


def test_a_diverging_step_fails_the_pipeline_with_the_commands_exit_status(tmp_path):
    f = tmp_path / "strict.yaml"
    f.write_text(same(tmp_path).replace("temperature: [2, 5]",
                                        "temperature: [20]\n      lr: 0.05,50\n      fail-on-divergence: true"))
    p = run_kdcache("run", str(f), check=False)
    assert p.returncode == 3 and p.stderr.strip().splitlines()[-1] == (
        "Error: step 'students' (train-student) failed: 1 of 2 students diverged (T20-a0.9-s0-lr50); their "
        "metrics.json say where and why")
    assert "--sweep-dirs" in p.stdout and "--fail-on-divergence" in p.stdout


# Digests the runner gave these steps when steps ran the CLI (kdcache before commands.py): a stamp
# written then still counts as up to date.
KINDS = """pipeline: kinds
state_dir: {state}
steps:
  - name: tok
    command: train-tokenizer
    with: {{corpus: a.txt, vocab: 512, out: runs/kinds/tok, overwrite: true}}
  - name: dump
    command: dump-logits
    with: {{teacher: [a, b], dataset: "mnist:train", out: runs/kinds/d.zarr, format: zarr, dtype: float32,
           batch-size: 64, amp: bf16, chunk_rows: 100, layout: topk, k: 5, temperatures: "1,2,4",
           sampling-temperature: 2, seed: 3, augment: "jitter:2", views: 4, progress: false,
           storage-option: ["endpoint_url=http://x"], compression: zstd}}
  - name: dump2
    command: dump-logits
    with: {{teacher: a, dataset: "mnist:test", fmt: hdf5, temperatures: [1, 2.5], samples: 10, out: runs/kinds/e.h5}}
  - name: train
    command: train-student
    with: {{dataset: "mnist:train", student: "mlp:8", store: "${{steps.dump.out}}", out: runs/kinds/s,
           temperature: [1, 2], alpha: "0.5,0.9", loss: "kd,logit-mse", seed: [0, 1], members: "0,1", epochs: 2,
           lr: 0.01, momentum: 1, max-norm: 3, warmup: 1, dropout: 0.5, eval-store: "${{steps.dump2.out}}",
           allow-interpolation: true, sweep-dirs: false, stack: false, fail-on-divergence: true}}
  - name: ev
    command: evaluate
    with: {{model: "${{steps.train.out}}", dataset: "mnist:test", class-bias: ["3=auto"], members: [0, 2],
           json: runs/kinds/e.json}}
  - name: rep
    command: report
    with: {{run-dirs: "${{steps.train.out}}", plot: p.png, role: ["teacher=a"], note: n,
           evaluation: ["${{steps.ev.json_path}}"], out: runs/kinds/r.md}}
  - name: conv
    command: convert
    with: {{src: x, dst: runs/kinds/c.h5, format: hdf5, layout: sampled, samples: 4}}
"""
CLI_ERA_DIGESTS = {"tok": "2bc6ac15eb2fc8ec", "dump": "48f096f348421786", "dump2": "6dcf0462b7405b25",
                   "train": "c2855e57dc8c0d09", "ev": "7cef329cb5e455a1", "rep": "e9a7bd7663cf9a04",
                   "conv": "1eef71ac8afe1e4f"}


def test_stamps_written_when_steps_ran_the_cli_still_count(tmp_path):
    f = tmp_path / "kinds.yaml"
    f.write_text(KINDS.format(state=tmp_path / "state"))
    assert {a.step.name: a.digest[:16] for a in Runner(load_pipeline(str(f))).plan()} == CLI_ERA_DIGESTS
