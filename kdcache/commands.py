"""The commands a pipeline step can run, as library calls: one config dataclass and one function per
command, and how each field of the config is written as an option (flag, choices, range).

The CLI builds these configs from its flags and calls these functions; ``kdcache run`` checks a step's
``with:`` against the same configs (:func:`commands`) and calls the same functions. Nothing here knows
click, and importing this module imports no torch: the functions import the library they run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from kdcache.errors import ConfigError, KdcacheError, StoreError, TrainingDiverged

if typing.TYPE_CHECKING:
    from kdcache.dump import DumpConfig, DumpSummary
    from kdcache.evaluate import EvalConfig
    from kdcache.train.config import TrainConfig

Echo = Callable[[str], None]

STEP_COMMANDS = ("train-student", "dump-logits", "report", "convert", "inspect", "verify", "train-tokenizer",
                 "evaluate", "import-logprobs", "export-logprobs", "render-digits")
CLICK_NAMES = {"format": "fmt"}  # fields whose click parameter has another name (pipeline stamps use it)
NUMBER_TEXT = re.compile(r"[-+0-9.eE,]+")


# -- the configs of the commands that had none -------------------------------------------------------------

@dataclass(kw_only=True)
class ReportConfig:
    """``kdcache report``: a markdown table of runs, and report.json and a plot beside ``out``."""

    run_dirs: list[str]
    out: str | None = None
    plot_path: str | None = None
    roles: list[str] = field(default_factory=list)        # ROLE=DIR, ROLE one of kdcache.report.ROLES
    paper: str | None = None                               # a key of kdcache.report.PAPERS
    notes: list[str] = field(default_factory=list)
    evaluations: list[str] = field(default_factory=list)   # `kdcache evaluate --json` files


@dataclass(kw_only=True)
class InspectConfig:
    """``kdcache inspect``: a store's manifest, size, completion and statistics."""

    store: str
    as_json: bool = False
    as_xarray: bool = False
    format: str | None = None


@dataclass(kw_only=True)
class VerifyConfig:
    """``kdcache verify``: every chunk against its sha256, and with ``teachers`` the live teacher on
    ``rows`` random rows against the stored logits."""

    store: str
    format: str | None = None
    teachers: list[str] = field(default_factory=list)
    rows: int = 256
    seed: int = 0
    tolerance: float | None = None   # slack beyond the dtype's rounding [default: teacher_check.ARITHMETIC_SLACK]
    device: str = "auto"
    data_root: str | None = None


@dataclass(kw_only=True)
class ConvertConfig:
    """``kdcache convert``: a store copied to another backend, dtype, codec, chunking or sparse layout;
    None keeps the source's."""

    src: str
    dst: str
    dtype: str | None = None
    format: str | None = None
    compression: str | None = None
    chunk_rows: int | None = None
    layout: str | None = None
    k: int | None = None
    temperatures: list[float] | None = None
    samples: int | None = None
    sampling_temperature: float | None = None   # sampled: the T ids are drawn at [default: 1]
    seed: int = 0
    overwrite: bool = False


@dataclass(kw_only=True)
class TokenizerConfig:
    """``kdcache train-tokenizer``: a byte-level BPE tokenizer trained on a corpus."""

    corpus: str
    vocab: int = 8192
    field: str = "text"
    out: str
    overwrite: bool = False


@dataclass(kw_only=True)
class RenderDigitsConfig:
    """``kdcache render-digits``: an image folder (ImageFolder layout) of MNIST digits pasted at random
    sizes and positions on canvases of random sizes, as PNG and JPEG files
    (:func:`kdcache.vision.synth.render_digits`)."""

    out: str
    per_class: int = 100
    split: str = "train"
    min_side: int = 40
    max_side: int = 160
    seed: int = 0
    data_root: str | None = None
    overwrite: bool = False


@dataclass(kw_only=True)
class ImportLogprobsConfig:
    """``kdcache import-logprobs``: a top-k logprob dataset read into a per-token top-k store."""

    src: str
    dataset: str
    out: str
    preset: str | None = None                 # a key of kdcache.logprobs.PRESETS
    tokens_column: str | None = None
    ids_column: str | None = None
    logprobs_column: str | None = None
    offset: int | None = None
    k: int | None = None
    dtype: str = "float16"
    approximate_temperatures: list[float] | None = None
    split: str = "train"
    format: str | None = None
    chunk_rows: int | None = None
    teacher_name: str | None = None
    overwrite: bool = False
    progress: bool | None = None


@dataclass(kw_only=True)
class ExportLogprobsConfig:
    """``kdcache export-logprobs``: a per-token top-k store written as a top-k logprob dataset."""

    store: str
    to: str
    preset: str = "llamakd"
    format: str = "parquet"
    member: int | None = None
    dataset: str | None = None
    overwrite: bool = False
    progress: bool | None = None


# -- one function per command ------------------------------------------------------------------------------

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_dump_logits(c: DumpConfig, echo: Echo = print) -> DumpSummary:
    """``dump-logits``: dump (or reuse from the cache) and say what was written, on rank 0."""
    from kdcache.dump import dump_logits
    summary = dump_logits(c)
    if _rank() == 0:
        for line in summary.lines():
            echo(line)
    return summary


def with_cached_store(c: TrainConfig) -> TrainConfig:
    """``store="auto"``: the cached store of ``c.teachers`` over the dataset (and subset), which then
    defines the transfer set."""
    if c.store != "auto":
        return c
    if not c.teachers:
        raise ConfigError("--store auto needs --teacher: the teacher whose cached store to use")
    from kdcache.cache import lookup
    found = lookup(c.teachers, c.dataset, c.data_root, c.subset)
    return dataclasses.replace(c, store=str(found), teachers=None, subset=None)


def run_train_student(c: TrainConfig, echo: Echo = print) -> list[dict[str, Any]]:
    """``train-student``: train the sweep and print its table (rank 0). Raises TrainingDiverged (exit
    status 3) when every student diverged, or any with ``fail_on_divergence``."""
    from kdcache.train import format_table, train_students
    results = train_students(with_cached_store(c))
    if _rank() == 0:
        echo(format_table(results))
    diverged = [r["run"] for r in results if r.get("diverged")]
    if diverged and (c.fail_on_divergence or len(diverged) == len(results)):
        raise TrainingDiverged(f"{len(diverged)} of {len(results)} students diverged ({', '.join(diverged)}); "
                               f"their metrics.json say where and why")
    return results


def run_evaluate(c: EvalConfig, echo: Echo = print) -> dict[str, Any]:
    """``evaluate``: the results as lines (and as JSON at ``c.json_path``)."""
    from pathlib import Path

    from kdcache.evaluate import evaluate
    result = evaluate(c)
    for t in result.get("tuned", []):
        echo(f"class {t['class']}: bias {t['bias']:g} chosen on {t['tune_samples']} held-out rows "
             f"({t['tune_errors_at_0']} -> {t['tune_errors']} errors there)")
    line = f"{c.model} on {c.dataset}: {result.get('eval_errors')} errors of {result['eval_samples']}"
    if "eval_accuracy" in result:
        line += f", accuracy {result['eval_accuracy']:.4f}"
    if "teacher_agreement" in result:
        line += f", teacher agreement {result['teacher_agreement']:.4f}"
    if "teacher_errors" in result:
        line += f"; the teacher (the eval store) {result['teacher_errors']} errors"
    echo(line)
    if "errors_by_class" in result and len(result["errors_by_class"]) <= 20:
        echo("errors by class: " + ", ".join(f"{k}: {e}/{n}" for k, (e, n) in
                                              enumerate(zip(result["errors_by_class"], result["samples_by_class"]))))
    if c.json_path:
        Path(c.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(c.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_report(c: ReportConfig, echo: Echo = print) -> str:
    """``report``: the markdown, echoed (and written with report.json at ``c.out``)."""
    from kdcache.report import parse_roles, write_report
    text = write_report(list(c.run_dirs), c.out, c.plot_path, parse_roles(c.roles), c.paper, list(c.notes),
                        list(c.evaluations))
    echo(text)
    return text


def run_inspect(c: InspectConfig, echo: Echo = print) -> None:
    """``inspect``: the store's summary, as text, JSON or an xarray Dataset's repr."""
    if c.as_xarray:
        from kdcache.xarray_view import open_xarray
        ds = open_xarray(c.store)
        ds.attrs = {k: ds.attrs[k] for k in ("layout", "num_samples", "num_classes", "num_members", "dtype")}
        echo(repr(ds))
        return
    from kdcache.summary import format_inspect, inspect_store
    info = inspect_store(c.store, c.format)
    echo(json.dumps(info, indent=2) if c.as_json else format_inspect(info))


def run_verify(c: VerifyConfig, echo: Echo = print) -> None:
    """``verify``: raises StoreError naming every problem found; says ok otherwise."""
    from kdcache.store import open_store
    s = open_store(c.store, c.format, allow_partial=True)
    problems = s.verify()
    s.close()
    if problems:
        raise StoreError(f"{c.store}: " + "; ".join(problems))
    echo(f"{c.store}: ok ({s.manifest.num_samples} rows, {s.manifest.num_chunks} chunks verified)")
    if c.teachers:
        from kdcache.teacher_check import ARITHMETIC_SLACK, check_teacher
        found = check_teacher(c.store, list(c.teachers), c.rows, c.seed, c.device, c.data_root,
                              slack=ARITHMETIC_SLACK if c.tolerance is None else c.tolerance)
        echo(found.line())
        if not found.ok:
            raise StoreError(f"{c.store}: " + "; ".join(found.problems))


def run_convert(c: ConvertConfig, echo: Echo = print) -> None:
    """``convert``: the copy, then one line saying what was written."""
    from kdcache.convert import convert_store
    t = convert_store(c.src, c.dst, c.dtype, c.format, c.compression, c.overwrite, c.chunk_rows, layout=c.layout,
                      k=c.k, temperatures=c.temperatures, samples=c.samples,
                      sampling_temperature=c.sampling_temperature, seed=c.seed)
    echo(f"wrote {c.dst} ({t.manifest.num_samples} rows, {t.manifest.dtype}, {t.format})")
    t.close()


def run_train_tokenizer(c: TokenizerConfig, echo: Echo = print) -> None:
    """``train-tokenizer``: trained into a temporary directory beside ``c.out``, then moved there, so
    that a failure leaves what was at ``c.out`` as it was."""
    import shutil
    import tempfile
    from pathlib import Path

    from kdcache.integrations.hf import train_tokenizer
    target = Path(c.out)
    if target.exists() and not c.overwrite:
        raise KdcacheError(f"{c.out} exists; give --overwrite to replace it, or another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        tok = train_tokenizer(c.corpus, c.vocab, Path(tmp) / "tokenizer", c.field)
        if target.exists():
            shutil.rmtree(target)
        (Path(tmp) / "tokenizer").rename(target)
    echo(f"wrote a tokenizer of {len(tok)} tokens to {c.out}")


def run_render_digits(c: RenderDigitsConfig, echo: Echo = print) -> None:
    """``render-digits``: rendered into a temporary directory beside ``c.out``, then moved there, so that
    a failure leaves what was at ``c.out`` as it was."""
    import shutil
    import tempfile
    from pathlib import Path

    from kdcache.vision.synth import render_digits
    target = Path(c.out)
    if target.exists() and not c.overwrite:
        raise KdcacheError(f"{c.out} exists; give {{param:overwrite}} to replace it, or another folder")
    if c.min_side > c.max_side:
        raise ConfigError(f"{{param:min_side}} {c.min_side} is above {{param:max_side}} {c.max_side}; give "
                          f"min-side <= max-side")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        render_digits(Path(tmp) / "images", c.per_class, c.split, c.min_side, c.max_side, c.seed, c.data_root)
        if target.exists():
            shutil.rmtree(target)
        (Path(tmp) / "images").rename(target)
    echo(f"wrote {10 * c.per_class} images ({c.per_class} per digit, MNIST {c.split}, sides {c.min_side}-"
         f"{c.max_side} px) to {c.out}")


def run_import_logprobs(c: ImportLogprobsConfig, echo: Echo = print) -> None:
    """``import-logprobs``: the import, then one line saying what was written."""
    from kdcache.logprobs import columns_for, import_logprobs
    cols = columns_for(c.preset, c.tokens_column, c.ids_column, c.logprobs_column, c.offset)
    summary = import_logprobs(c.src, c.dataset, c.out, cols, k=c.k, dtype=c.dtype,
                              approximate_temperatures=c.approximate_temperatures, fmt=c.format,
                              chunk_rows=c.chunk_rows, split=c.split, overwrite=c.overwrite, teacher=c.teacher_name,
                              progress=c.progress)
    for line in summary.lines():
        echo(line)


def run_export_logprobs(c: ExportLogprobsConfig, echo: Echo = print) -> None:
    """``export-logprobs``: the export, then one line saying what was written."""
    from kdcache.logprobs import export_logprobs
    summary = export_logprobs(c.store, c.to, c.preset, fmt=c.format, member=c.member, dataset=c.dataset,
                              overwrite=c.overwrite, progress=c.progress)
    for line in summary.lines():
        echo(line)


# -- how a config's fields are written as options ----------------------------------------------------------

def numbers(value: Any, number: type = float) -> list:
    """``"1,2,5"``, ``[1, 2, 5]``, ``["1,2", 5]`` or ``5`` as a list of ``number`` (int or float)."""
    what = "integers" if number is int else "numbers"
    out: list = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            for part in item.split(","):
                if part.strip():
                    try:
                        out.append(number(part))
                    except ValueError:
                        raise ConfigError(f"{item!r} is not a comma-separated list of {what}") from None
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and (number is float or
                                                                                 float(item).is_integer()):
            out.append(number(item))
        else:
            raise ConfigError(f"{item!r} is not {'an integer' if number is int else 'a number'}")
    return out


def words(value: str | list[str]) -> list[str]:
    """``"kd,logit-mse"`` or ``["kd", "logit-mse"]`` as a list of words."""
    items = value if isinstance(value, list) else [value]
    return [w.strip() for item in items for w in str(item).split(",") if w.strip()]


@dataclass(frozen=True)
class Range:
    """The bounds of a number option; ``str()`` reads as click writes them (``x>=1``, ``0<=x<1``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, x: float) -> bool:
        return ((self.low is None or (x > self.low if self.low_open else x >= self.low)) and
                (self.high is None or (x < self.high if self.high_open else x <= self.high)))

    def __str__(self) -> str:
        low = "" if self.low is None else f"{self.low:g}{'<' if self.low_open else '<='}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='}{self.high:g}"
        if self.high is None:
            return f"x{'>' if self.low_open else '>='}{self.low:g}"
        return f"{low}x{high}"


# How a field is written: kind -> what the command line holds
KINDS = {
    "text": "one string",
    "number": "one number (``Option.number``: int or float)",
    "flag": "a switch that is off unless given (--overwrite)",
    "switch": "on or off either way (--stack/--no-stack)",
    "repeat": "strings, the option repeated (--teacher A --teacher B); an argument takes several",
    "numbers": "numbers, comma-separated (--temperature 1,2,5)",
    "words": "strings, comma-separated (--loss kd,logit-mse)",
}


@dataclass(frozen=True)
class Option:
    """One field of a command's config as the command line and a pipeline step write it."""

    name: str                                # the config field
    flag: str                                # --temperature; an argument's name, e.g. run-dirs
    kind: str                                # a key of KINDS
    number: type | None = None               # int or float, for number and numbers
    required: bool = False
    argument: bool = False                   # given by position, not by flag
    choices: Collection[str] | None = None   # for text, and for each of words (a registry stays live)
    range: Range | None = None               # for number
    default: Any = None

    def check(self, value: Any) -> Any:
        """``value`` as a pipeline step gives it, checked and brought to the form the stamps' digests have
        always used (click's conversions; numbers and words lists as given). Raises ConfigError."""
        if self.kind == "numbers":
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, bool) or not (isinstance(item, (int, float)) or
                                                  (isinstance(item, str) and NUMBER_TEXT.fullmatch(item))):
                    raise ConfigError(f"expected a number or a list of numbers, got {item!r}")
            numbers(items, self.number)
            return items
        if self.kind == "repeat":
            return [self._text(v) for v in (value if isinstance(value, list) else [value])]
        if self.kind == "words":
            given = [self._text(v) for v in value] if isinstance(value, list) else self._text(value)
            for w in words(given):
                self._choose(w)
            return given
        if isinstance(value, (list, dict)):
            raise ConfigError(f"expected a single value, got {type(value).__name__}")
        if self.kind in ("flag", "switch"):
            if not isinstance(value, bool):
                raise ConfigError(f"expected true or false, got {value!r}")
            return value
        if self.kind == "number":
            return self._number(value)
        return self._choose(self._text(value))

    def _text(self, value: Any) -> str:
        if isinstance(value, (list, dict)):
            raise ConfigError(f"expected a string, got {value!r}")
        return str(value)

    def _choose(self, value: str) -> str:
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{value!r} is not one of {', '.join(map(repr, self.choices))}")
        return value

    def _number(self, value: Any) -> int | float:
        name = "integer" if self.number is int else "float"
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}")
        if self.number is int and isinstance(value, float):
            raise ConfigError(f"expected an integer, got {value!r}")
        try:
            x = self.number(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{value!r} is not a valid {name}") from None
        if self.range is not None and not self.range.holds(x):
            raise ConfigError(f"{x} is not in the range {self.range}")
        return x

    def parse(self, value: Any) -> Any:
        """A checked value as the config field holds it (an empty list as None where None is the default,
        as the CLI gives it)."""
        if self.kind == "numbers":
            value = numbers(value, self.number)
        elif self.kind == "words":
            value = words(value)
        return None if value == [] and self.default is None else value

    def argv(self, value: Any) -> list[str]:
        """The words of the command line that give ``value`` (a checked value)."""
        items = value if isinstance(value, list) else [value]
        if self.argument:
            return [str(v) for v in items]
        if self.kind == "numbers":
            return [self.flag, ",".join(format(v, "g") if isinstance(v, float) else str(v) for v in items)]
        if self.kind == "words":
            return [self.flag, ",".join(map(str, items))]
        if self.kind == "repeat":
            return [w for v in items for w in (self.flag, str(v))]
        if self.kind == "flag":
            return [self.flag] if value else []
        if self.kind == "switch":
            return [self.flag if value else "--no-" + self.flag[2:]]
        return [self.flag, str(value)]


@dataclass(frozen=True)
class Command:
    """A command: its config, the function that runs it, and its options by config field (arguments first,
    then the fields in the config's order, then ``storage_options`` where the command reads stores)."""

    name: str
    config: type
    run: Callable[[Any, Echo], Any]
    options: dict[str, Option]

    @functools.cached_property
    def keys(self) -> dict[str, str]:
        """Every key a step may write (``batch-size``, ``batch_size``, ``temperature`` for ``temperatures``,
        and click's old names such as ``fmt``), with ``-`` as ``_``, -> the field."""
        out = {}
        for o in self.options.values():
            out[o.name] = out[o.flag.lstrip("-").replace("-", "_")] = o.name
            if o.name in CLICK_NAMES:
                out[CLICK_NAMES[o.name]] = o.name
        return out

    def field_of(self, key: str) -> str | None:
        return self.keys.get(str(key).replace("-", "_"))

    def build(self, given: dict[str, Any]) -> Any:
        """The config of checked option values (``storage_options`` apart: it is the process's, see call)."""
        return self.config(**{k: self.options[k].parse(v) for k, v in given.items() if k != "storage_options"})

    def argv(self, given: dict[str, Any]) -> list[str]:
        """The ``kdcache`` command line of checked option values (without the leading ``kdcache``)."""
        return [self.name] + [w for o in self.options.values() if o.name in given for w in o.argv(given[o.name])]

    def call(self, given: dict[str, Any], echo: Echo = print) -> Any:
        """Run the command on checked option values."""
        if given.get("storage_options"):
            from kdcache.store.remote import set_storage_options
            set_storage_options(given["storage_options"])
        return self.run(self.build(given), echo)

    @classmethod
    def of(cls, name: str, config: type, run: Callable[[Any, Echo], Any], *, arguments: tuple[str, ...] = (),
           flags: dict[str, str] | None = None, choices: dict[str, tuple[str, ...]] | None = None,
           ranges: dict[str, Range] | None = None, words: tuple[str, ...] = (), internal: tuple[str, ...] = (),
           remote: bool = True) -> "Command":
        """Options from the config's fields and their types: ``flags`` where the flag is not
        ``--field-name``, ``words`` for string lists written comma-separated, ``internal`` for fields that
        are no option."""
        hints = typing.get_type_hints(config)
        options = []
        for f in dataclasses.fields(config):
            if f.name in internal:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind, number = _kind(hints[f.name], default, f.name in words)
            argument = f.name in arguments
            flag = f.name.replace("_", "-") if argument else (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
            options.append(Option(f.name, flag, kind, number, required, argument, (choices or {}).get(f.name),
                                  (ranges or {}).get(f.name), default))
        if remote:
            options.append(Option("storage_options", "--storage-option", "repeat", default=[]))
        options.sort(key=lambda o: arguments.index(o.name) if o.argument else len(arguments))
        return cls(name, config, run, {o.name: o for o in options})


def _kind(hint: Any, default: Any, comma: bool) -> tuple[str, type | None]:
    """(kind, number type) of a field of type ``hint``."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    t = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if typing.get_origin(t) is list:
        item = typing.get_args(t)[0]
        if item in (int, float):
            return "numbers", item
        return ("words" if comma else "repeat"), None
    if t is bool:
        return ("flag" if default is False else "switch"), None
    if t in (int, float):
        return "number", t
    return "text", None


@functools.cache
def commands() -> dict[str, Command]:
    """Every command a pipeline step can run, by name (imports the library: torch and the stores)."""
    from kdcache.distributed import AMP_MODES
    from kdcache.dump import DumpConfig
    from kdcache.evaluate import EvalConfig
    from kdcache.layouts import LAYOUTS
    from kdcache.logprobs import FORMATS, PRESETS
    from kdcache.losses import ENSEMBLE_REDUCTIONS, LOSSES
    from kdcache.store.format import COMPRESSIONS, DTYPES
    from kdcache.store.logit_store import BACKENDS
    from kdcache.train.config import AMP_MODES as TRAIN_AMP_MODES
    from kdcache.train.config import ENGINES, OPTIMIZERS, SCHEDULES, TrainConfig
    formats = tuple(BACKENDS)
    stores = {"format": formats, "dtype": DTYPES, "compression": COMPRESSIONS, "layout": LAYOUTS}  # LAYOUTS: live
    sparse = {"chunk_rows": Range(1), "k": Range(1), "samples": Range(1, 65535),
              "sampling_temperature": Range(0, low_open=True)}
    fraction = Range(0, 1, high_open=True)
    found = [
        Command.of("train-student", TrainConfig, run_train_student, words=("losses",),
                   flags={"teachers": "--teacher", "temperatures": "--temperature", "alphas": "--alpha",
                          "losses": "--loss", "seeds": "--seed", "lrs": "--lr"},
                   choices={"losses": LOSSES, "ensemble": ENSEMBLE_REDUCTIONS, "optimizer": OPTIMIZERS,
                            "schedule": SCHEDULES, "amp": TRAIN_AMP_MODES, "engine": ENGINES},
                   ranges={"epochs": Range(1), "batch_size": Range(1), "max_norm": Range(0, low_open=True),
                           "warmup": Range(0), "dropout": fraction, "input_dropout": fraction, "jitter": Range(0),
                           "stack_group": Range(1), "checkpoint_every": Range(0), "workers": Range(0)}),
        Command.of("dump-logits", DumpConfig, run_dump_logits, flags={"teachers": "--teacher"},
                   choices={**stores, "amp": AMP_MODES}, internal=("encode_on_device", "layout_extra"),
                   ranges={**sparse, "batch_size": Range(1), "workers": Range(0)}),
        Command.of("report", ReportConfig, run_report, arguments=("run_dirs",), remote=False,
                   flags={"plot_path": "--plot", "roles": "--role", "notes": "--note", "evaluations": "--evaluation"}),
        Command.of("convert", ConvertConfig, run_convert, arguments=("src", "dst"), choices=stores, ranges=sparse),
        Command.of("inspect", InspectConfig, run_inspect, arguments=("store",), choices={"format": formats},
                   flags={"as_json": "--json", "as_xarray": "--xarray"}),
        Command.of("verify", VerifyConfig, run_verify, arguments=("store",), flags={"teachers": "--teacher"},
                   choices={"format": formats}, ranges={"rows": Range(1), "tolerance": Range(0)}),
        Command.of("train-tokenizer", TokenizerConfig, run_train_tokenizer, ranges={"vocab": Range(300)},
                   remote=False),
        Command.of("evaluate", EvalConfig, run_evaluate, arguments=("model",), flags={"json_path": "--json"},
                   choices={"ensemble": ENSEMBLE_REDUCTIONS}, ranges={"batch_size": Range(1)}),
        Command.of("import-logprobs", ImportLogprobsConfig, run_import_logprobs, arguments=("src",), remote=False,
                   choices={"preset": tuple(PRESETS), "dtype": ("float16", "float32"), "format": formats},
                   ranges={"offset": Range(0), "k": Range(1), "chunk_rows": Range(1)}),
        Command.of("export-logprobs", ExportLogprobsConfig, run_export_logprobs, arguments=("store",), remote=False,
                   choices={"preset": tuple(PRESETS), "format": FORMATS}, ranges={"member": Range(0)}),
        Command.of("render-digits", RenderDigitsConfig, run_render_digits, arguments=("out",), remote=False,
                   choices={"split": ("train", "test")},
                   ranges={"per_class": Range(1), "min_side": Range(8), "max_side": Range(8)}),
    ]
    return {c.name: c for c in found}
