"""The ``kdcache`` command: a thin layer that parses options, calls the library, and turns errors
into one line."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from kdcache._version import __version__
from kdcache.bench.common import BENCH_NAMES
from kdcache.errors import KdcacheError
from kdcache.layouts import LAYOUTS, names
from kdcache.losses import ENSEMBLE_REDUCTIONS
from kdcache.store.format import COMPRESSIONS, DTYPES
from kdcache.store.logit_store import BACKENDS


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a KdcacheError (and a few OS errors a user causes) into `Error: ...` and exit 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdcacheError as e:
            error = click.ClickException(_one_line(e.render(_flag)))
            error.exit_code = e.exit_code
            raise error from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            raise click.ClickException(f"{e.strerror}: {e.filename}") from None
        finally:
            from kdcache.store.remote import drain_event_loops
            drain_event_loops()  # nothing of a remote store's requests may print after the one line
    return wrapper


class LayoutChoice(click.Choice):
    """The layouts registered when the command runs, a layout registered by a plugin included."""

    def __init__(self) -> None:
        super().__init__(list(LAYOUTS))

    @property
    def choices(self) -> list[str]:
        return list(names())

    @choices.setter
    def choices(self, value: Any) -> None:
        pass


class LayoutOption(click.Option):
    """``--layout``, its help listing the registered layouts."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = "; ".join(LAYOUTS[n].help for n in names()) + "."
        return super().get_help_record(ctx)


def _flag(param: str) -> str:
    """The flag that sets a library parameter named in an error message."""
    return "--" + param.replace("_", "-")


def _one_line(message: str) -> str:
    """A DataLoader worker re-raises an error with the worker's traceback in its message: keep the
    original message, the traceback's last line."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(("kdcache.errors.", "StoreError", "KdcacheError")) else last


def _floats(text: str, name: str) -> list[float]:
    from kdcache.commands import numbers
    try:
        return numbers(text, float)
    except KdcacheError as e:
        raise click.BadParameter(e.render(_flag), param_hint=name) from None


def _ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    from kdcache.commands import numbers
    try:
        return numbers(text, int)
    except KdcacheError as e:
        raise click.BadParameter(e.render(_flag), param_hint=name) from None


def storage_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--storage-option KEY=VALUE`` (repeatable): options of remote stores (``s3://...``), for this
    command and the processes it starts (see kdcache.store.remote)."""
    @click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                  help="Option of remote (s3://, gs://) stores, e.g. endpoint_url=http://127.0.0.1:9000; repeatable.")
    @functools.wraps(fn)
    def wrapper(*args: Any, storage_options: tuple[str, ...] = (), **kwargs: Any) -> Any:
        from kdcache.store.remote import set_storage_options
        try:
            set_storage_options(storage_options)
        except KdcacheError as e:
            raise click.ClickException(f"--storage-option {e.render(_flag)}") from None  # one line, no usage text
        return fn(*args, **kwargs)
    return wrapper


data_root_option = click.option("--data-root", type=click.Path(file_okay=False), default=None,
                                help="Where built-in datasets are looked for [default: $KDCACHE_DATA or ./data].")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdcache")
def cli() -> None:
    """Run a teacher once, cache its raw logits, distil any number of students from them.

    \b
    kdcache dump-logits --teacher runs/teacher --dataset mnist:train --out teacher.zarr
    kdcache inspect teacher.zarr
    kdcache train-student --dataset mnist:train --store teacher.zarr --student mlp:800,800 \\
        --temperature 2,5,20 --out runs/students
    """


@cli.command("dump-logits")
@click.option("--teacher", "teachers", multiple=True, required=True,
              help="Model spec; repeat for an ensemble: mlp:1200,1200, timm:NAME[,checkpoint=F], torchvision:NAME, "
                   "hf:DIR (a transformers causal LM or image classifier), pkg.mod:fn, "
                   "a train-student checkpoint, or a TorchScript file (deprecated in PyTorch; prefer the others).")
@click.option("--dataset", required=True,
              help="Dataset spec: mnist:train, synthetic:N, text:PATH, hf-text:PATH[,seq=N,tokenizer=DIR], "
                   "hf-chat:PATH[,rows=assistant|all,template=FILE], imagefolder:DIR[,size=S], "
                   "hf-image:PATH[,image=COL,label=COL], FILE.npz, pkg.mod:fn.")
@click.option("--out", default=None,
              help="Store path: DIR.zarr, FILE.h5, or an fsspec URL [default: the store cache, keyed by teacher "
                   "and data; a store already there is reused].")
@click.option("--format", "fmt", type=click.Choice(list(BACKENDS)), default=None,
              help="Backend [default: from the suffix of --out].")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=512, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--chunk-rows", type=click.IntRange(1), default=None, help="Rows per chunk [default: about 1 MB].")
@click.option("--subset", default=None,
              help="Transfer set: START:STOP, exclude-classes:C[,C], or an index file (.npy/.txt).")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True)
@click.option("--layout", cls=LayoutOption, type=LayoutChoice(), default="dense", show_default=True)
@click.option("--k", type=click.IntRange(1), default=None, help="topk: logits kept per row and member.")
@click.option("--temperatures", default=None,
              help="Sparse layouts: temperatures served exactly [default: 1,2,4,8,20].")
@click.option("--samples", type=click.IntRange(1, 65535), default=None, help="sampled: ids drawn per row.")
@click.option("--sampling-temperature", type=click.FloatRange(0, min_open=True), default=None,
              help="sampled: the temperature ids are drawn at [default: 1].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampled layout's draws and of the views' augmentation parameters.")
@click.option("--augment", default=None,
              help="Store augmented views: jitter:N, crop:PAD, random-crop:SIZE, flip, resized-crop:SCALE_MIN[,...], "
                   "a composition such as resized-crop:0.08+flip, or package.module:callable. On image files the "
                   "views are cut from each original image.")
@click.option("--views", type=int, default=None, help="Views per sample with --augment [default: 1].")
@click.option("--overwrite", is_flag=True, help="Replace a complete store at --out.")
@click.option("--skip-bad-images", is_flag=True,
              help="Image datasets: skip files that cannot be decoded (listed in the manifest) instead of stopping.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@data_root_option
@storage_option
@_friendly
def dump_logits_cmd(**kw: Any) -> None:
    """Run the teacher(s) once over a dataset and store their raw logits.

    Killed at any point, the same command resumes from the chunks already written. Under
    `torchrun --standalone --nproc-per-node N --no-python kdcache dump-logits ...` the ranks split the chunks.

    \b
    kdcache dump-logits --teacher runs/teacher --dataset mnist:train --out teacher.zarr
    kdcache dump-logits --teacher a.safetensors --teacher b.safetensors --dataset mnist:train \\
        --subset exclude-classes:3 --out ensemble.h5
    kdcache dump-logits --teacher runs/teacher --dataset mnist:train --augment jitter:2 --views 20 \\
        --out teacher-views.zarr
    kdcache dump-logits --teacher runs/teacher --dataset mnist:train    # into the cache, or reused from it
    """
    from kdcache.commands import run_dump_logits
    from kdcache.dump import DumpConfig
    kw["teachers"] = list(kw["teachers"])
    kw["temperatures"] = _floats(kw["temperatures"], "--temperatures") if kw["temperatures"] else None
    kw["format"] = kw.pop("fmt")
    run_dump_logits(DumpConfig(**kw), echo=click.echo)


@cli.command("train-student")
@click.option("--dataset", required=True, help="Training dataset spec (the one the store was dumped from).")
@click.option("--student", required=True, help="Model spec: mlp:800,800, timm:NAME[,key=value], torchvision:NAME, "
                                                 "hf:DIR, pkg.mod:fn, or a checkpoint to start from.")
@click.option("--store", default=None,
              help="Logit store of the teacher, or `auto` with --teacher: the cached store of that teacher over "
                   "--dataset. Without it, plain supervised training.")
@click.option("--teacher", "teachers", multiple=True,
              help="With --store auto: the teacher whose cached store to use. Without --store: online distillation, "
                   "this teacher (repeat for an ensemble) run on every batch.")
@click.option("--out", required=True, help="Directory for the run (a sub-directory per run in a sweep).")
@click.option("--temperature", "temperatures", default=None, help="T, or a list T1,T2,... for a sweep [default: 4].")
@click.option("--alpha", "alphas", default=None,
              help="Weight of the soft term, or a list [default: 0.9 with --store, 0 without].")
@click.option("--loss", "losses", default="kd", show_default=True,
              help="The soft term: kd (KL at temperature T, times T^2) or logit-mse (Ba & Caruana's logit "
                   "matching, the high-T limit of kd; dense stores only), or a list kd,logit-mse for a sweep.")
@click.option("--seed", "seeds", default="0", show_default=True, help="Seed, or a list for a sweep.")
@click.option("--ensemble", type=click.Choice(ENSEMBLE_REDUCTIONS), default="mean-prob", show_default=True)
@click.option("--members", default=None, help="Use only these ensemble members, e.g. 0,2.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--lr", "lrs", default="0.05", show_default=True, help="Learning rate, or a list for a sweep.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-norm", type=click.FloatRange(0, min_open=True), default=None,
              help="Cap each unit's incoming weight vector at this L2 norm after every step (max-norm, used with "
                   "dropout; the paper's teacher had it: 3.5 is usual).")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--warmup", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Raise the learning rate linearly from 0 over this many epochs (a fraction is fine), then follow "
                   "--schedule: keeps the first large soft-target gradients of high temperatures from killing "
                   "ReLU units of small students.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--input-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--lora", default=None,
              help="hf:PATH students: train a LoRA adapter (peft) on the frozen pretrained model, e.g. "
                   "r=8,alpha=16,targets=q_proj+v_proj[,dropout=0.05] (targets=all-linear: every linear layer). "
                   "The run holds adapter/ and the merged model in hf/.")
@click.option("--jitter", type=click.IntRange(0), default=0, show_default=True,
              help="Shift images by up to N pixels (training without a teacher only).")
@click.option("--augment", default=None,
              help="Without --store: augment inputs online, as dump-logits --augment does (e.g. jitter:2+flip).")
@click.option("--views", type=int, default=None, help="With --augment: views cycled over epochs [default: epochs].")
@click.option("--augment-seed", type=int, default=0, show_default=True,
              help="With --augment: seed of the views (a dump's --seed gives the same views).")
@click.option("--subset", default=None, help="Train on part of the dataset (without --store).")
@click.option("--eval-dataset", default=None, help="Dataset for test accuracy and error count after each epoch.")
@click.option("--eval-store", default=None, help="Teacher logits on the eval dataset, for student-teacher agreement.")
@click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the data order.")
@click.option("--remote-cache", default=None,
              help="Directory keeping the blocks of a remote --store (s3://...) on local disk for later epochs.")
@click.option("--remote-cache-size", default="10GB", show_default=True, help="Bound of --remote-cache (LRU).")
@click.option("--allow-interpolation", is_flag=True,
              help="Sparse stores: serve a temperature between grid points, interpolated (not exact).")
@click.option("--sweep-dirs/--no-sweep-dirs", default=None,
              help="One sub-directory per run [default: only when there are several runs].")
@click.option("--stack/--no-stack", default=True, show_default=True,
              help="Train the students of a sweep as one stacked model (one forward and backward for all).")
@click.option("--stack-group", type=click.IntRange(1), default=None,
              help="N students per stack, within what half the free memory holds [default: as many as it "
                   "holds; on the CPU, mlp: stacks whose weights stay under 32 MiB each].")
@click.option("--amp", type=click.Choice(["off", "bf16"]), default="off", show_default=True,
              help="bf16: the students' forward and backward under autocast.")
@click.option("--checkpoint-every", type=click.IntRange(0), default=0, show_default=True,
              help="Also checkpoint every N steps (0: at epoch ends only). A rerun of the command resumes.")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace results (and checkpoints) already in --out.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on a terminal].")
@click.option("--fail-on-divergence", is_flag=True,
              help="Exit with status 3 when any student diverged [default: only when every student did].")
@click.option("--engine", type=click.Choice(["kdcache", "trainer"]), default="kdcache", show_default=True,
              help="trainer: one hf: student from a per-token store through transformers.Trainer "
                   "(kdcache.integrations.hf_trainer.DistillationTrainer).")
@data_root_option
@storage_option
@_friendly
def train_student_cmd(**kw: Any) -> None:
    """Train students from cached teacher logits, temperature applied at load time.

    Lists of temperatures, alphas, seeds and learning rates train one student per combination, all in
    one pass over the stream; students of one architecture train as one stacked model. Checkpoints
    are written at epoch ends (and every --checkpoint-every steps): killed, the same command resumes
    and ends with the weights an uninterrupted run would have. Under
    `torchrun --standalone --nproc-per-node N --no-python kdcache train-student ...` each rank streams
    its share of the store (DistributedDataParallel).

    A student that diverges (a non-finite loss, a loss four times its initial value, or a collapse to
    chance accuracy) is stopped and marked; the exit status is 3 when every student diverged (with
    --fail-on-divergence, when any did), else 0.

    \b
    kdcache train-student --dataset mnist:train --student mlp:1200,1200 --dropout 0.5 --jitter 2 \\
        --eval-dataset mnist:test --out runs/teacher
    kdcache train-student --dataset mnist:train --store teacher.zarr --student mlp:800,800 \\
        --temperature 1,2,5,10,20 --eval-dataset mnist:test --out runs/distilled
    kdcache train-student --dataset hf-text:corpus.jsonl --store lm.zarr --student hf:models/small \\
        --lora r=8,alpha=16,targets=q_proj+v_proj --optimizer adam --lr 1e-4 --out runs/lora
    """
    from kdcache.commands import run_train_student, words
    from kdcache.train import TrainConfig
    kw["temperatures"] = _floats(kw["temperatures"], "--temperature") if kw["temperatures"] else None
    kw["alphas"] = _floats(kw["alphas"], "--alpha") if kw["alphas"] else None
    kw["losses"] = words(kw["losses"])
    kw["seeds"] = _ints(kw["seeds"], "--seed")
    kw["lrs"] = _floats(kw["lrs"], "--lr")
    kw["members"] = _ints(kw["members"], "--members")
    kw["teachers"] = list(kw["teachers"]) or None
    run_train_student(TrainConfig(**kw), echo=click.echo)


@cli.group("cache")
def cache_group() -> None:
    """The store cache ($KDCACHE_CACHE, default ~/.cache/kdcache): stores dumped without --out.

    \b
    kdcache cache list
    kdcache cache du
    kdcache cache rm 3f2a9c
    kdcache cache rm --older-than 30
    """


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly
def cache_list_cmd(as_json: bool) -> None:
    """Every cached store: key, teachers, dataset, layout, rows, bytes, created, last used."""
    from kdcache.cache import cache_dir, entries
    found = entries()
    if as_json:
        click.echo(json.dumps([e.to_json() for e in found], indent=2))
        return
    click.echo(f"{cache_dir()}: {len(found)} store(s)")
    for e in found:
        js = e.to_json()
        state = e.problem or ("complete" if e.complete else "incomplete (the same dump-logits resumes it)")
        views = f", {e.views['count']} views {e.views['augment']}" if e.views else ""
        click.echo(f"  {e.key[:12]}  {', '.join(e.teachers) or '?'} on {e.dataset}"
                   f"{' subset ' + e.subset if e.subset else ''}: {e.layout} {e.dtype}{views}, {e.rows} rows, "
                   f"{e.bytes / 1e6:.1f} MB, created {e.created}, last used {js['last_used']}; {state}")


@cache_group.command("du")
@_friendly
def cache_du_cmd() -> None:
    """Bytes the cache holds."""
    from kdcache.cache import cache_dir, entries
    found = entries()
    click.echo(f"{sum(e.bytes for e in found) / 1e6:.1f} MB in {len(found)} store(s) under {cache_dir()}")


@cache_group.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--older-than", type=click.FloatRange(0), default=None, help="Remove stores not used for DAYS days.")
@_friendly
def cache_rm_cmd(keys: tuple[str, ...], older_than: float | None) -> None:
    """Remove cached stores by key (a unique prefix is enough) or by age. A store that a running job
    dumps or reads is refused."""
    import time

    from kdcache.cache import entries, find, remove
    if not keys and older_than is None:
        raise click.UsageError("give KEY... or --older-than DAYS")
    chosen = [find(k) for k in keys]
    if older_than is not None:
        cutoff = time.time() - older_than * 86400
        chosen += [e for e in entries() if e.last_used < cutoff and e.key not in {c.key for c in chosen}]
    for e in chosen:
        remove(e)
        click.echo(f"removed {e.key[:12]} ({e.path}, {e.bytes / 1e6:.1f} MB)")


@cli.command("train-tokenizer")
@click.option("--corpus", required=True,
              help="Text as hf-text: reads it: a .txt/.jsonl/.parquet file, a glob of them, "
                   "or a save_to_disk directory.")
@click.option("--vocab", type=click.IntRange(300), default=8192, show_default=True, help="Tokens, specials included.")
@click.option("--field", default="text", show_default=True,
              help="The text field of JSON/Parquet records (a field of chat messages: their contents).")
@click.option("--out", required=True, help="Directory to write the tokenizer to (save_pretrained).")
@click.option("--overwrite", is_flag=True, help="Replace a tokenizer already at --out.")
@_friendly
def train_tokenizer_cmd(corpus: str, vocab: int, field: str, out: str, overwrite: bool) -> None:
    """Train a byte-level BPE tokenizer on a corpus, for hf:llama,... models trained from scratch.

    \b
    kdcache train-tokenizer --corpus 'docs/*.txt' --vocab 4096 --out runs/tokenizer
    kdcache train-student --dataset hf-text:'docs/*.txt',tokenizer=runs/tokenizer \\
        --student hf:llama,hidden=256,layers=4,heads=4 --optimizer adam --lr 0.001 --out runs/teacher
    """
    from kdcache.commands import TokenizerConfig, run_train_tokenizer
    run_train_tokenizer(TokenizerConfig(corpus=corpus, vocab=vocab, field=field, out=out, overwrite=overwrite),
                        echo=click.echo)


@cli.command("render-digits")
@click.argument("out")
@click.option("--per-class", type=click.IntRange(1), default=100, show_default=True, help="Images of each digit.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="The MNIST split the digits are taken from (the first --per-class of each digit).")
@click.option("--min-side", type=click.IntRange(8), default=40, show_default=True, help="Smallest canvas side, px.")
@click.option("--max-side", type=click.IntRange(8), default=160, show_default=True, help="Largest canvas side, px.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds sizes, places, colours and noise.")
@data_root_option
@click.option("--overwrite", is_flag=True, help="Replace a folder already at OUT.")
@_friendly
def render_digits_cmd(out: str, per_class: int, split: str, min_side: int, max_side: int, seed: int,
                      data_root: str | None, overwrite: bool) -> None:
    """Write an image folder of MNIST digits pasted at random sizes and positions on canvases of random
    sizes (PNG and JPEG; some grayscale, some RGBA), one sub-directory per digit: real image files of
    varied sizes for imagefolder: datasets, from what is on disk.

    \b
    kdcache render-digits runs/digits/train --per-class 100 --split train
    kdcache render-digits runs/digits/test --per-class 20 --split test
    kdcache train-student --dataset imagefolder:runs/digits/train,size=32 --student timm:resnet10t ...
    """
    from kdcache.commands import RenderDigitsConfig, run_render_digits
    run_render_digits(RenderDigitsConfig(out=out, per_class=per_class, split=split, min_side=min_side,
                                         max_side=max_side, seed=seed, data_root=data_root, overwrite=overwrite),
                      echo=click.echo)


@cli.command("evaluate")
@click.argument("model")
@click.option("--dataset", required=True, help="Dataset spec to evaluate on, e.g. mnist:test.")
@click.option("--eval-store", default=None, help="The teacher's logits on that dataset: agreement with the teacher.")
@click.option("--class-bias", "class_bias", multiple=True, metavar="C=B",
              help="Add B to class C's logit before the argmax (repeatable); C=auto picks B on --tune-dataset.")
@click.option("--tune-dataset", default=None, help="Held-out labelled data for --class-bias C=auto.")
@click.option("--tune-subset", default=None, help="Rows of --tune-dataset, e.g. 50000:60000.")
@click.option("--ensemble", type=click.Choice(ENSEMBLE_REDUCTIONS), default="mean-prob", show_default=True)
@click.option("--members", default=None, help="With --eval-store: these ensemble members only, e.g. 0,2.")
@click.option("--batch-size", type=click.IntRange(1), default=2048, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", default=None, help="Write the results here as JSON.")
@data_root_option
@storage_option
@_friendly
def evaluate_cmd(model: str, json_path: str | None, members: str | None, class_bias: tuple[str, ...],
                 **kw: Any) -> None:
    """Evaluate a checkpoint, TorchScript, torch.export or hf: model on a dataset: test errors, accuracy,
    errors per class and agreement with the teacher, with optional per-class logit biases.

    \b
    kdcache evaluate runs/mnist_hinton/distilled/T20-a0.9-s0 --dataset mnist:test --json eval.json
    kdcache evaluate runs/omitted/student --dataset mnist:test --class-bias 3=auto \\
        --tune-dataset mnist:train --tune-subset 50000:60000
    """
    from kdcache.commands import run_evaluate
    from kdcache.evaluate import EvalConfig
    run_evaluate(EvalConfig(model=model, members=_ints(members, "--members"), class_bias=list(class_bias),
                            json_path=json_path, **kw), echo=click.echo)


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", default=None,
              help="Write the markdown here as well as to the terminal, and report.json (every run, its role and "
                   "results) beside it.")
@click.option("--plot", "plot_path", default=None, help="PNG of test error against T (needs matplotlib).")
@click.option("--role", "roles", multiple=True,
              help="ROLE=DIR: the role of a run or sweep (teacher, baseline, distilled); repeatable. With --paper "
                   "the first DIR of each role is set beside the paper's figure.")
@click.option("--paper", default=None,
              help="Put a paper's figures side by side: hinton-mnist (section 3) or hinton-ensemble (section 4: an "
                   "ensemble distilled into one model; the ensemble's errors are those of the distilled runs' "
                   "--eval-store).")
@click.option("--note", "notes", multiple=True, help="A paragraph under the title (what was run, and why); repeatable.")
@click.option("--evaluation", "evaluations", multiple=True, metavar="FILE.json",
              help="A `kdcache evaluate --json` result to tabulate below the runs (repeatable).")
@_friendly
def report_cmd(run_dirs: tuple[str, ...], out: str | None, plot_path: str | None, roles: tuple[str, ...],
               paper: str | None, notes: tuple[str, ...], evaluations: tuple[str, ...]) -> None:
    """A markdown table of runs (and a plot of test error against temperature).

    \b
    kdcache report runs/teacher runs/student runs/distilled --plot runs/report.png --out runs/report.md
    """
    from kdcache.commands import ReportConfig, run_report
    run_report(ReportConfig(run_dirs=list(run_dirs), out=out, plot_path=plot_path, roles=list(roles), paper=paper,
                            notes=list(notes), evaluations=list(evaluations)), echo=click.echo)


@cli.command("run")
@click.argument("pipeline_file", metavar="PIPELINE.yaml")
@click.option("--profile", default=None, help="A profile of the file, e.g. quick.")
@click.option("--quick", is_flag=True, help="Same as --profile quick.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the commands, run nothing.")
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Override a variable of the file's vars (after the profile), e.g. --set corpus=my.txt.")
@storage_option
@_friendly
def run_cmd(pipeline_file: str, profile: str | None, quick: bool, dry_run: bool, overrides: tuple[str, ...]) -> None:
    """Run a pipeline of kdcache commands; steps whose inputs did not change are skipped.

    \b
    kdcache run pipelines/mnist_hinton.yaml --quick
    kdcache run pipelines/mnist_hinton.yaml --dry-run
    """
    from kdcache.pipeline import Runner, load_pipeline
    if quick:
        if profile and profile != "quick":
            raise click.UsageError("--quick and --profile name different profiles; give one")
        profile = "quick"
    sets = {}
    for item in overrides:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise click.UsageError(f"--set {item!r}: expected NAME=VALUE")
        sets[name.strip()] = value
    Runner(load_pipeline(pipeline_file, profile, sets)).run(dry_run=dry_run, echo=click.echo)


@cli.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes, under a minute: checks that every benchmark runs.")
@click.option("--json", "json_path", default=None, help="Write the results as JSON here.")
@click.option("--device", default="auto", show_default=True)
@click.option("--only", multiple=True,
              type=click.Choice(list(BENCH_NAMES)),
              help="Run only these benchmarks (repeatable).")
@click.option("--reps", type=click.IntRange(1), default=None,
              help="Measured repetitions of each side, after a warm-up [default: 3 with --quick, else 5].")
@click.option("--teacher", default=None,
              help="An MNIST teacher for the storage and sparse figures [default: one trained briefly].")
@click.option("--logits", "logit_stores", multiple=True, metavar="STORE",
              help="sparse: also measure top-k against full p_T on the first 4000 rows of this dense store "
                   "(repeatable), e.g. a large-vocabulary teacher's.")
@data_root_option
@_friendly
def bench_cmd(quick: bool, json_path: str | None, device: str, only: tuple[str, ...], reps: int | None,
              teacher: str | None, logit_stores: tuple[str, ...], data_root: str | None) -> None:
    """Time every stage side by side with its physical limit, and cached against online distillation.

    Each benchmark alternates its two sides over several repetitions and reports medians and
    their ratio. Uses MNIST from --data-root.

    \b
    kdcache bench --quick
    kdcache bench --json bench.json
    kdcache bench --only sparse --logits runs/text_sparse/test-dense.zarr
    """
    import os

    from kdcache.bench import run_bench
    if data_root:
        os.environ["KDCACHE_DATA"] = data_root
    run_bench(quick, list(only) or None, device, json_path, echo=click.echo, teacher=teacher,
              logit_stores=list(logit_stores), reps=reps)


@cli.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--xarray", "as_xarray", is_flag=True,
              help="Print the store as kdcache.open_xarray opens it (needs kdcache[xarray]).")
@click.option("--format", "fmt", type=click.Choice(list(BACKENDS)), default=None)
@storage_option
@_friendly
def inspect_cmd(store: str, as_json: bool, as_xarray: bool, fmt: str | None) -> None:
    """Show a store's manifest, size, completion and statistics of its logits.

    \b
    kdcache inspect teacher.zarr
    kdcache inspect teacher.zarr --json | jq .accuracy
    kdcache inspect teacher.zarr --xarray
    """
    from kdcache.commands import InspectConfig, run_inspect
    run_inspect(InspectConfig(store=store, as_json=as_json, as_xarray=as_xarray, format=fmt), echo=click.echo)


@cli.command("verify")
@click.argument("store")
@click.option("--format", "fmt", type=click.Choice(list(BACKENDS)), default=None)
@click.option("--teacher", "teachers", multiple=True,
              help="Also re-run this teacher (one per ensemble member, in order) on random rows and compare.")
@click.option("--rows", type=click.IntRange(1), default=256, show_default=True, help="With --teacher: rows compared.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --teacher: which rows.")
@click.option("--tolerance", type=click.FloatRange(0), default=None,
              help="With --teacher: arithmetic slack beyond the store dtype's rounding, relative to 1 + |z| "
                   "[default: 1e-5; raise it for a store dumped with --amp].")
@click.option("--device", default="auto", show_default=True)
@data_root_option
@storage_option
@_friendly
def verify_cmd(store: str, fmt: str | None, teachers: tuple[str, ...], rows: int, seed: int, tolerance: float | None,
               device: str, data_root: str | None) -> None:
    """Check a store: complete, well-formed, finite, every chunk matching its sha256. Exit 0 only if so.

    With --teacher, also the check TinyViT ships: the live teacher on a random sample of rows (each
    view replayed from its stored parameters) must give the stored logits within the store dtype's
    rounding, and its weights must be the ones the manifest names.

    \b
    kdcache verify teacher.zarr
    kdcache verify teacher-views.zarr --teacher runs/teacher --rows 512
    """
    from kdcache.commands import VerifyConfig, run_verify
    run_verify(VerifyConfig(store=store, format=fmt, teachers=list(teachers), rows=rows, seed=seed, tolerance=tolerance,
                            device=device, data_root=data_root), echo=click.echo)


@cli.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="[default: as SRC]")
@click.option("--format", "fmt", type=click.Choice(list(BACKENDS)), default=None, help="Format of DST.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=None)
@click.option("--chunk-rows", type=click.IntRange(1), default=None)
@click.option("--layout", type=LayoutChoice(), default=None,
              help="Sparsify a dense store [default: as SRC].")
@click.option("--k", type=click.IntRange(1), default=None)
@click.option("--temperatures", default=None)
@click.option("--samples", type=click.IntRange(1, 65535), default=None)
@click.option("--sampling-temperature", type=click.FloatRange(0, min_open=True), default=None,
              help="sampled: the temperature ids are drawn at [default: 1].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@storage_option
@_friendly
def convert_cmd(src: str, dst: str, dtype: str | None, fmt: str | None, compression: str | None,
                chunk_rows: int | None, layout: str | None, k: int | None, temperatures: str | None,
                samples: int | None, sampling_temperature: float | None, seed: int, overwrite: bool) -> None:
    """Copy a store to another backend, dtype, codec or (from dense) sparse layout, streaming.

    \b
    kdcache convert teacher.zarr teacher.h5
    kdcache convert teacher.h5 teacher-fp32.zarr --dtype float32
    kdcache convert teacher.zarr teacher-top5.zarr --layout topk --k 5 --temperatures 1,2,4,8,20
    """
    from kdcache.commands import ConvertConfig, run_convert
    temps = _floats(temperatures, "--temperatures") if temperatures else None
    run_convert(ConvertConfig(src=src, dst=dst, dtype=dtype, format=fmt, compression=compression, chunk_rows=chunk_rows,
                              layout=layout, k=k, temperatures=temps, samples=samples,
                              sampling_temperature=sampling_temperature, seed=seed, overwrite=overwrite),
                echo=click.echo)


_preset_help = "Column layout: llamakd (inputs, targets [L, 2, k]), axolotl (Axolotl's KD plugin), vllm."


@cli.command("import-logprobs")
@click.argument("src")
@click.option("--dataset", required=True,
              help="The tokenized corpus the logprobs were computed on: hf-text:PATH,tokenizer=DIR,seq=N.")
@click.option("--out", required=True, help="The top-k store to write (.zarr or .h5).")
@click.option("--preset", type=click.Choice(["llamakd", "axolotl", "vllm"]), default=None, help=_preset_help)
@click.option("--tokens-column", default=None, help="Column of token ids [default: the preset's].")
@click.option("--ids-column", default=None,
              help="Column of top-k token ids [rows, k] [default: the preset's; none: --logprobs-column holds pairs].")
@click.option("--logprobs-column", default=None, help="Column of top-k logprobs [rows, k] (or pairs [rows, 2, k]).")
@click.option("--offset", type=click.IntRange(0), default=None,
              help="Record row of the prediction made at the first position [default: the preset's; vllm: 1].")
@click.option("--k", type=click.IntRange(1), default=None, help="Keep the top k of each row [default: all].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--approximate-temperatures", default=None,
              help="Also serve these T, with the tail's mass spread evenly over the ids not kept (an approximation; "
                   "without it only T=1 is served).")
@click.option("--split", default="train", show_default=True, help="Split of a save_to_disk logprob dataset.")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default=None)
@click.option("--chunk-rows", type=click.IntRange(1), default=None)
@click.option("--teacher-name", default=None, help="The teacher's name in the manifest [default: SRC's name].")
@click.option("--overwrite", is_flag=True, help="Replace a store at --out (once the import succeeded).")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@_friendly
def import_logprobs_cmd(src: str, dataset: str, out: str, preset: str | None, tokens_column: str | None,
                        ids_column: str | None, logprobs_column: str | None, offset: int | None, k: int | None,
                        dtype: str, approximate_temperatures: str | None, split: str, fmt: str | None,
                        chunk_rows: int | None, teacher_name: str | None, overwrite: bool,
                        progress: bool | None) -> None:
    """Import a top-k logprob dataset (vLLM prompt_logprobs, Axolotl KD, Hub) into a top-k store.

    Each record must belong to the corpus sequence of the same index: its token ids are checked
    against the tokenized corpus. The store is exact at T=1 only.

    \b
    kdcache import-logprobs teacher-logprobs/ --preset llamakd \\
        --dataset hf-text:corpus.jsonl,tokenizer=tok,seq=1024 --out teacher.zarr
    kdcache import-logprobs kd.parquet --preset axolotl --dataset hf-text:chat.jsonl,tokenizer=tok \\
        --out teacher.zarr --approximate-temperatures 2
    """
    from kdcache.commands import ImportLogprobsConfig, run_import_logprobs
    temps = _floats(approximate_temperatures, "--approximate-temperatures") if approximate_temperatures else None
    run_import_logprobs(ImportLogprobsConfig(
        src=src, dataset=dataset, out=out, preset=preset, tokens_column=tokens_column, ids_column=ids_column,
        logprobs_column=logprobs_column, offset=offset, k=k, dtype=dtype, approximate_temperatures=temps, split=split,
        format=fmt, chunk_rows=chunk_rows, teacher_name=teacher_name, overwrite=overwrite, progress=progress),
        echo=click.echo)


@cli.command("export-logprobs")
@click.argument("store")
@click.option("--to", "to", required=True, help="Directory to write data.parquet (or data.jsonl) into.")
@click.option("--preset", type=click.Choice(["llamakd", "axolotl", "vllm"]), default="llamakd", show_default=True,
              help=_preset_help)
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True)
@click.option("--member", type=click.IntRange(0), default=None, help="Member to export [default: the only one].")
@click.option("--dataset", default=None, help="The corpus [default: the one the store records].")
@click.option("--overwrite", is_flag=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@_friendly
def export_logprobs_cmd(store: str, to: str, preset: str, fmt: str, member: int | None, dataset: str | None,
                        overwrite: bool, progress: bool | None) -> None:
    """Write a per-token top-k store as a top-k logprob dataset (logprobs at T=1, float32).

    \b
    kdcache export-logprobs teacher.zarr --to teacher-logprobs --preset axolotl
    """
    from kdcache.commands import ExportLogprobsConfig, run_export_logprobs
    run_export_logprobs(ExportLogprobsConfig(store=store, to=to, preset=preset, format=fmt, member=member,
                                             dataset=dataset, overwrite=overwrite, progress=progress), echo=click.echo)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
