"""``kdcache run PIPELINE.yaml``: named steps, each one kdcache command with its options, skipped when
their inputs have not changed since they last ran.

A step's ``with:`` is checked against the command's config dataclass (:mod:`kdcache.commands`), and the
step runs the library function the CLI command calls, with the same config."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from kdcache.commands import CLICK_NAMES, STEP_COMMANDS, Command, commands, numbers
from kdcache.errors import ConfigError, KdcacheError

TOP_KEYS = {"pipeline", "description", "vars", "profiles", "steps", "state_dir"}
STEP_KEYS = {"name", "command", "with", "use"}
COMMANDS = STEP_COMMANDS
PIPELINE_DIR = "${pipeline.dir}"
REF = re.compile(r"\$\{(vars|steps)\.([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_-]+))?\}")


@dataclass
class Step:
    name: str
    command: str
    options: dict[str, Any]  # config field -> value as given (checked: see kdcache.commands.Option.check)
    line: int
    needs: list[str] = field(default_factory=list)
    use: str | None = None   # an existing output to use instead of running the step (``use:``)

    @property
    def spec(self) -> Command:
        return commands()[self.command]

    @property
    def config(self) -> Any:
        """The config dataclass the step runs with (the one ``kdcache COMMAND`` builds from its flags)."""
        return self.spec.build(self.options)


@dataclass
class Pipeline:
    path: str
    name: str
    steps: list[Step]
    state_dir: Path

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


def _lines(node: Any, path: tuple = ()) -> dict[tuple, int]:
    """(key path) -> 1-based line, from a composed YAML node tree."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out.update(_lines(v, path + (k.value,)))
            out[path + (k.value,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_lines(v, path + (i,)))
    return out


def _read_yaml(path: str) -> tuple[Any, dict[tuple, int]]:
    """The parsed file and the line of every key path in it."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"pipeline file {path!r} does not exist")
    text = p.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return data, (_lines(node) if node is not None else {})


def _variables(path: str, data: dict[str, Any], profile: str | None, overrides: dict[str, str] | None,
               err: Callable[[tuple, str], ConfigError]) -> dict[str, Any]:
    """The file's ``vars``, then its profile's values, then ``--set`` overrides (numbers stay numbers)."""
    if not isinstance(data.get("vars", {}), dict):
        raise err(("vars",), "expected a mapping of names to values")
    variables = dict(data.get("vars") or {})
    profiles = data.get("profiles") or {}
    if profile:
        if profile not in profiles:
            raise ConfigError(f"{path}: no profile {profile!r}; the file has {', '.join(profiles) or 'none'}")
        for k, v in (profiles[profile] or {}).items():
            if k not in variables:
                raise err(("profiles", profile, k), "sets a variable that vars does not declare")
            variables[k] = v
    for k, v in (overrides or {}).items():
        if k not in variables:
            raise ConfigError(f"{path}: {{param:set}} {k}=...: the file declares no variable {k!r}; it has "
                              f"{', '.join(variables) or 'none'}")
        try:
            parsed = yaml.safe_load(v)
        except yaml.YAMLError:
            parsed = v
        variables[k] = parsed if isinstance(parsed, (int, float, bool)) else v  # numbers stay numbers
    here = str(Path(path).resolve().parent)  # ${pipeline.dir}: files shipped beside the pipeline, from any cwd
    return {k: os.path.normpath(v.replace(PIPELINE_DIR, here)) if isinstance(v, str) and PIPELINE_DIR in v else v
            for k, v in variables.items()}


def load_pipeline(path: str, profile: str | None = None, overrides: dict[str, str] | None = None) -> Pipeline:
    """Parse and validate a pipeline file; every error names the file, the key and the line.

    ``overrides`` (``kdcache run --set NAME=VALUE``) replace declared variables after the profile's."""
    data, lines = _read_yaml(path)

    def err(keys: tuple, msg: str) -> ConfigError:
        line = next((lines[keys[:i]] for i in range(len(keys), -1, -1) if keys[:i] in lines), 1)
        dotted = ".".join(str(k) if not isinstance(k, int) else f"[{k}]" for k in keys).replace(".[", "[")
        return ConfigError(f"{path}:{line}: {dotted or 'file'}: {msg}")

    if not isinstance(data, dict):
        raise err((), "expected a mapping with 'pipeline' and 'steps'")
    for k in data:
        if k not in TOP_KEYS:
            raise err((k,), f"unknown key; expected one of {', '.join(sorted(TOP_KEYS))}")
    if not isinstance(data.get("pipeline"), str):
        raise err(("pipeline",), "expected the pipeline's name, a string")
    variables = _variables(path, data, profile, overrides, err)
    steps_raw = data.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise err(("steps",), "expected a non-empty list of steps")
    steps: list[Step] = []
    for i, raw in enumerate(steps_raw):
        steps.append(_parse_step(i, raw, _StepContext(steps, steps_raw, variables, err), lines.get(("steps", i), 1)))
    state = Path(data.get("state_dir") or Path("runs") / ".pipeline" / data["pipeline"])
    if profile:
        state = state / profile
    return Pipeline(str(path), data["pipeline"], steps, state)


@dataclass
class _StepContext:
    """What a step's parsing sees: the steps parsed before it, every raw step (to tell "defined later"
    from "not defined"), the variables and the file's error maker."""

    steps: list[Step]
    steps_raw: list[Any]
    variables: dict[str, Any]
    err: Callable[[tuple, str], ConfigError]

    def resolve(self, value: Any, keys: tuple, needs: list[str]) -> Any:
        """``value`` with every ``${vars.NAME}`` and ``${steps.NAME[.option]}`` replaced (a whole-string
        reference keeps the referred value's type); earlier steps referred to are added to ``needs``."""
        if isinstance(value, list):
            return [self.resolve(v, keys, needs) for v in value]
        if not isinstance(value, str):
            return value
        whole = REF.fullmatch(value)
        if whole:
            return self._referred(whole, keys, needs)
        return REF.sub(lambda m: str(self._referred(m, keys, needs)), value)

    def _referred(self, m: re.Match, keys: tuple, needs: list[str]) -> Any:
        kind, ref, attr = m.groups()
        err = self.err
        if kind == "vars":
            if ref not in self.variables:
                raise err(keys, f"refers to ${{vars.{ref}}}, which vars does not declare")
            return self.variables[ref]
        target = next((s for s in self.steps if s.name == ref), None)
        if target is None:
            later = any(isinstance(s, dict) and s.get("name") == ref for s in self.steps_raw)
            raise err(keys, f"refers to step {ref!r}, which is " + ("defined later; steps may only use "
                      "earlier steps" if later else "not defined"))
        if ref not in needs:
            needs.append(ref)
        key = target.spec.field_of(attr or "out")
        if key not in target.options:
            raise err(keys, f"refers to ${{steps.{ref}.{attr or 'out'}}}, but step {ref!r} has no option "
                      f"{attr or 'out'!r}")
        return target.options[key]


def _parse_step(i: int, raw: Any, ctx: _StepContext, line: int) -> Step:
    """Step ``i`` of the file, its options checked by its command's spec and its references resolved."""
    err = ctx.err
    if not isinstance(raw, dict):
        raise err(("steps", i), "expected a mapping with name, command and with")
    for k in raw:
        if k not in STEP_KEYS:
            raise err(("steps", i, k), f"unknown key; expected one of {', '.join(sorted(STEP_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise err(("steps", i, "name"), "expected a name of letters, digits, - and _")
    if any(s.name == name for s in ctx.steps):
        raise err(("steps", i, "name"), f"step {name!r} is defined twice")
    command = raw.get("command")
    if command not in COMMANDS:
        raise err(("steps", i, "command"), f"{command!r} is not a step command; use one of {', '.join(COMMANDS)}")
    spec = commands()[command]
    opts_raw = raw.get("with") or {}
    if not isinstance(opts_raw, dict):
        raise err(("steps", i, "with"), "expected a mapping of option names to values")
    needs: list[str] = []
    options: dict[str, Any] = {}
    for k, v in opts_raw.items():
        keys = ("steps", i, "with", k)
        key = spec.field_of(k)
        if key is None:
            known = sorted(o.flag.lstrip("-") for o in spec.options.values())
            raise err(keys, f"{command} has no option {k!r}; known: {', '.join(known)}")
        v = ctx.resolve(v, keys, needs)
        if v is None:  # null: the command's default (unsets an option a YAML merge brought in)
            continue
        try:
            options[key] = spec.options[key].check(v)
        except ConfigError as e:
            raise err(keys, str(e)) from None
    for o in spec.options.values():
        if o.required and options.get(o.name) in (None, []):
            raise err(("steps", i, "with"), f"{command} needs {o.flag}")
    use = ctx.resolve(raw.get("use"), ("steps", i, "use"), needs)
    if use not in (None, ""):
        out_key = next((k for k in ("out", "dst") if k in options), None)
        if not isinstance(use, str) or out_key is None:
            raise err(("steps", i, "use"), "expected the path of an existing output (a run directory or a "
                      "store) standing in for a step that has out")
        options[out_key] = use
    return Step(name, command, options, line, needs, use or None)


def argv(step: Step) -> list[str]:
    """The command line a step runs (what ``--dry-run`` prints), without the leading ``kdcache``."""
    return step.spec.argv(step.options)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _options_digest(step: Step) -> dict[str, Any]:
    """A step's options as its stamp's digest takes them: keyed by the names they had when steps ran
    the CLI, so that stamps written then still count."""
    return {CLICK_NAMES.get(k, k): v for k, v in step.options.items() if k != "temperatures"}


def _fingerprint(path: Path) -> list:
    """What identifies an output the pipeline did not make: each file's name, size and mtime, so that
    the steps after a ``use:`` step rerun when that output is made again."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [(str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in files]


@dataclass
class Action:
    step: Step
    status: str              # "run", "rerun", "skip", "partial", "use"
    digest: str
    base: str = ""           # the digest without the temperature list (train-student sweeps)
    todo: list[float] | None = None  # temperatures still to train, for a partial sweep
    detail: str = ""


class Runner:
    """Plans and runs a pipeline, keeping one stamp file per step under ``state_dir``."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.digests: dict[str, str] = {}

    def _stamp(self, step: Step) -> Path:
        return self.p.state_dir / f"{step.name}.json"

    def _read_stamp(self, step: Step) -> dict[str, Any] | None:
        f = self._stamp(step)
        return json.loads(f.read_text()) if f.exists() else None

    def plan(self) -> list[Action]:
        actions = []
        changed: set[str] = set()
        for step in self.p.steps:
            if step.use is not None:
                given = Path(step.use)
                if not given.exists():
                    raise KdcacheError(f"{self.p.path}: step {step.name!r}: use: {step.use} does not exist; give the "
                                       f"path of a finished output, or leave use empty to run the step")
                digest = _digest({"use": step.use, "files": _fingerprint(given)})
                self.digests[step.name] = digest
                stamp = self._read_stamp(step)
                if stamp is None or stamp.get("digest") != digest:
                    changed.add(step.name)
                actions.append(Action(step, "use", digest, detail=f"given: {step.use}"))
                continue
            base = _digest({"command": step.command, "options": _options_digest(step),
                            "needs": [self.digests[n] for n in step.needs]})
            temps = step.options.get("temperatures") if step.command == "train-student" else None
            digest = _digest([base, temps])
            self.digests[step.name] = digest
            stamp = self._read_stamp(step)
            if stamp is not None and "use" in stamp:
                stamp = None  # it last stood for a given output: what is at out now was not made here
            out = step.options.get("out") or step.options.get("dst") or step.options.get("to")
            exists = out is not None and Path(str(out)).exists()
            if step.command in ("report", "inspect", "verify", "evaluate"):
                actions.append(Action(step, "run", digest, base, detail="always runs (cheap)"))
                continue
            if step.command == "dump-logits" and out in (None, "cache"):
                # the cache keys the store by its inputs: reused when there, so nothing after it reruns
                actions.append(Action(step, "run", digest, base, detail="into the store cache: reused when there"))
                continue
            if stamp is None:
                if exists:
                    raise KdcacheError(f"{self.p.path}: step {step.name!r}: {out} exists but this pipeline did not "
                                       f"make it; move it away or change the step's out")
                actions.append(Action(step, "run", digest, base))
            elif temps and len(temps) > 0 and stamp.get("base") == base and exists:
                done = set(numbers(stamp.get("temperatures", [])))
                todo = [t for t in numbers(temps) if t not in done]
                new = ", ".join(format(t, "g") for t in todo)
                actions.append(Action(step, "partial" if todo else "skip", digest, base, todo or None,
                                      f"new temperatures {new}" if todo else "up to date"))
            elif stamp.get("digest") == digest and exists:
                actions.append(Action(step, "skip", digest, base, detail="up to date"))
            else:
                why = "its inputs changed" if stamp.get("digest") != digest else "its output is missing"
                if set(step.needs) & changed:
                    first = sorted(set(step.needs) & changed)[0]
                    why = f"step {first!r} " + ("was given another output" if self.p.step(first).use else "reran")
                actions.append(Action(step, "rerun", digest, base, detail=why))
            if actions[-1].status != "skip":
                changed.add(step.name)
        return actions

    def run(self, dry_run: bool = False, echo: Callable[[str], None] = print) -> list[Action]:
        """Run what :meth:`plan` says, saying each step's command line; ``echo`` also takes what the steps say."""
        actions = self.plan()
        for a in actions:
            given = self._given(a)
            label = {"run": "run", "rerun": "rerun", "skip": "skip", "partial": "run part", "use": "use"}[a.status]
            echo(f"[{a.step.name}] {label}" + (f" ({a.detail})" if a.detail else "") +
                 ("" if a.status in ("skip", "use") else ": kdcache " + shlex.join(a.step.spec.argv(given))))
            if dry_run or a.status == "skip":
                continue
            if a.status == "use":
                self.p.state_dir.mkdir(parents=True, exist_ok=True)
                self._stamp(a.step).write_text(json.dumps({"digest": a.digest, "use": a.step.use}, indent=2))
                continue
            t0 = time.perf_counter()
            try:
                a.step.spec.call(given, echo)
            except KdcacheError as e:  # the message keeps its {param:NAME}s for the CLI to name flags
                raise type(e)(f"step {a.step.name!r} ({a.step.command}) failed: {e.args[0] if e.args else e}") from None
            except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
                raise KdcacheError(f"step {a.step.name!r} ({a.step.command}) failed: {e.strerror}: "
                                   f"{e.filename}") from None
            stamp: dict[str, Any] = {"digest": a.digest, "argv": a.step.spec.argv(given),
                                     "seconds": time.perf_counter() - t0,
                                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if a.step.command == "train-student":
                old = self._read_stamp(a.step) or {}
                kept = numbers(old.get("temperatures", [])) if a.status == "partial" else []
                stamp.update(base=a.base, temperatures=sorted(set(kept) | set(numbers(a.step.options.get(
                    "temperatures") or []))))
            self.p.state_dir.mkdir(parents=True, exist_ok=True)
            self._stamp(a.step).write_text(json.dumps(stamp, indent=2))
        return actions

    @staticmethod
    def _given(a: Action) -> dict[str, Any]:
        """The options a step runs with: a partial sweep trains only the new temperatures, a rerun
        overwrites what the step made before, and a sweep keeps one directory per run (adding a
        temperature later adds a directory)."""
        given = dict(a.step.options)
        if a.status == "partial":
            given["temperatures"] = a.todo
        if a.status == "rerun" and a.step.command in ("train-student", "dump-logits", "convert", "train-tokenizer",
                                                      "import-logprobs", "export-logprobs"):
            given["overwrite"] = True
        if a.step.command == "train-student":
            c = a.step.config
            if c.temperatures or len(c.seeds) > 1 or len(c.alphas or []) > 1:
                given["sweep_dirs"] = True
        return given
