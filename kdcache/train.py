"""Stage two: train students from a store (or plainly, without one), a whole sweep in one pass."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdcache.datasets import ResolvedDataset, get_batch, load_dataset
from kdcache.distributed import DistInfo, init_distributed, resolve_device, shutdown
from kdcache.errors import ConfigError, KdcacheError
from kdcache.losses import ENSEMBLE_REDUCTIONS, distillation_loss, teacher_log_probs
from kdcache.specs import load_model, save_checkpoint
from kdcache.store import open_store
from kdcache.stream import DatasetStream, DistillStream, check_pairing
from kdcache.subset import resolve_subset
from kdcache.text import is_sequence_dataset

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.9


@dataclass
class TrainConfig:
    """Everything ``train-student`` needs; the CLI options map onto these fields one to one."""

    dataset: str
    student: str
    out: str
    store: str | None = None
    temperatures: list[float] | None = None   # default [4.0] with a store
    alphas: list[float] | None = None         # default [0.9] with a store, [0.0] without
    seeds: list[int] = field(default_factory=lambda: [0])
    ensemble: str = "mean-prob"
    members: list[int] | None = None
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    dropout: float = 0.0
    input_dropout: float = 0.0
    jitter: int = 0
    subset: str | None = None
    eval_dataset: str | None = None
    eval_store: str | None = None
    data_seed: int = 0
    allow_interpolation: bool = False
    sweep_dirs: bool | None = None            # a sub-directory per run; default: when there are several
    device: str = "auto"
    workers: int = 0
    data_root: str | None = None
    overwrite: bool = False
    progress: bool | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with list defaults filled in and combinations checked."""
        c = TrainConfig(**asdict(self))
        if c.store is None:
            if c.alphas and any(a > 0 for a in c.alphas):
                raise ConfigError("--alpha above 0 needs --store: the soft targets come from a logit store")
            if c.temperatures:
                raise ConfigError("--temperature needs --store: without one, training is plain supervised")
            c.alphas, c.temperatures = [0.0], [1.0]
        c.temperatures = c.temperatures or [DEFAULT_TEMPERATURE]
        c.alphas = c.alphas if c.alphas is not None else [DEFAULT_ALPHA]
        for t in c.temperatures:
            if t <= 0:
                raise ConfigError(f"--temperature {t}: temperatures must be positive")
        for a in c.alphas:
            if not 0 <= a <= 1:
                raise ConfigError(f"--alpha {a}: alpha must be between 0 and 1")
        if c.ensemble not in ENSEMBLE_REDUCTIONS:
            raise ConfigError(f"--ensemble {c.ensemble!r}: use one of {', '.join(ENSEMBLE_REDUCTIONS)}")
        if c.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"--optimizer {c.optimizer!r}: use sgd or adam")
        if c.schedule not in ("cosine", "constant"):
            raise ConfigError(f"--schedule {c.schedule!r}: use cosine or constant")
        if c.store and c.jitter:
            raise ConfigError("--jitter with --store: cached logits belong to the unjittered inputs, so the student "
                              "would learn from targets for another view; jitter when training the teacher only")
        if c.store and c.subset:
            raise ConfigError("--subset with --store: the store already defines the transfer set; dump a store "
                              "with --subset instead")
        if c.epochs < 1 or c.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be at least 1")
        return c


@dataclass
class _Run:
    name: str
    temperature: float
    alpha: float
    seed: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    out: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        return getattr(self.model, "module", self.model)


def _id_sums(id_blocks: Any) -> tuple[int, int, float]:
    """(count, sum, sum of squares) of the sample ids an epoch must see, read block by block."""
    n = total = 0
    squares = 0.0
    for ids in id_blocks:
        n += len(ids)
        total += int(ids.sum())
        squares += float((ids.astype(np.float64) ** 2).sum())
    return n, total, squares


def _run_name(t: float, a: float, s: int, c: TrainConfig) -> str:
    if c.store is None:
        return f"supervised-s{s}"
    return f"T{t:g}-a{a:g}-s{s}"


def jitter(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image ``[B, (C,) H, W]`` by up to ``max_shift`` pixels in each direction, zero-filled."""
    if max_shift <= 0:
        return x
    s = max_shift
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s))
    shifts = torch.randint(-s, s + 1, (len(x), 2), generator=generator)
    out = torch.empty_like(x)
    for dy, dx in itertools.product(range(-s, s + 1), repeat=2):
        sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        if sel.any():
            out[sel] = padded[sel][..., s + dy:s + dy + h, s + dx:s + dx + w]
    return out


class _Evaluator:
    """Accuracy and error count on an eval dataset, and agreement with the teacher where an eval store exists."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.device = device
        self.data = load_dataset(cfg.eval_dataset, cfg.data_root) if cfg.eval_dataset else None
        self.teacher_pred = None
        if cfg.eval_store:
            if self.data is None:
                raise ConfigError("--eval-store needs --eval-dataset, the data it was dumped from")
            store = open_store(cfg.eval_store)
            check_pairing(store, self.data, cfg.eval_dataset)
            if store.manifest.per_token:  # teacher predictions by position, in dataset order
                from kdcache.stream import _rows_of
                lengths = np.asarray(self.data.dataset.lengths(np.arange(len(self.data))), dtype=np.int64)
                first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                ids, offsets = store.sequence_index()
                where = _rows_of(first[ids], np.diff(offsets))
                pred = np.full(int(lengths.sum()), -1, dtype=np.int64)
                for blk in store.iter_blocks():
                    pred[where[blk.start:blk.start + len(blk)]] = teacher_top1(store, blk, cfg.ensemble,
                                                                               cfg.members).numpy()
            else:
                pred = np.full(len(self.data), -1, dtype=np.int64)
                for blk in store.iter_blocks():
                    pred[blk.sample_ids] = teacher_top1(store, blk, cfg.ensemble, cfg.members).numpy()
            self.teacher_pred = torch.from_numpy(pred)
            store.close()

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch_size: int = 2048) -> dict[str, Any]:
        if self.data is None:
            return {}
        model.eval()
        n = len(self.data)
        per_token = is_sequence_dataset(self.data.dataset)
        if per_token:  # about 4096 positions a batch: their logits over a large vocabulary are what costs
            batch_size = max(1, 4096 // int(self.data.dataset.lengths(np.arange(n)).max()))
        correct = agree = with_teacher = labelled = row = 0
        nll = 0.0
        for a in range(0, n, batch_size):
            idx = np.arange(a, min(a + batch_size, n))
            x, y = get_batch(self.data.dataset, idx)
            logits = model(x.to(self.device))
            if per_token:
                lengths = torch.as_tensor(np.asarray(self.data.dataset.lengths(idx)))
                mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
                logits, y = logits[mask.to(self.device)], y[mask]
                has_d = (y >= 0).to(self.device)
                nll += float(F.cross_entropy(logits[has_d].float(), y.to(self.device)[has_d], reduction="sum"))
            pred = logits.argmax(-1).cpu()
            has = y >= 0
            correct += int((pred[has] == y[has]).sum())
            labelled += int(has.sum())
            if self.teacher_pred is not None:
                t = self.teacher_pred[row:row + len(pred)] if per_token else self.teacher_pred[a:a + len(idx)]
                row += len(pred)
                ok = t >= 0
                agree += int((pred[ok] == t[ok]).sum())
                with_teacher += int(ok.sum())
        out: dict[str, Any] = {"eval_samples": labelled}
        if labelled:
            out.update(eval_accuracy=correct / labelled, eval_errors=labelled - correct)
            if per_token:
                out.update(eval_nll=nll / labelled, eval_perplexity=math.exp(min(nll / labelled, 700.0)))
        if with_teacher:
            out["teacher_agreement"] = agree / with_teacher
        return out


def teacher_top1(store: Any, blk: Any, ensemble: str, members: list[int] | None) -> torch.Tensor:
    """The teacher's (ensemble's) predicted class for each row of a block, for any layout."""
    if store.manifest.layout == "dense":
        return teacher_log_probs(torch.from_numpy(blk.logits), 1.0, ensemble, members).argmax(-1)
    from kdcache.sparse import targets_from_arrays
    return targets_from_arrays(store.manifest, blk.data).member(members).top1()[:, 0]


def _check_sparse_settings(store: Any, c: TrainConfig) -> None:
    """Refuse, before training starts, what a sparse store cannot serve."""
    m = store.manifest
    if m.layout == "dense":
        return
    from kdcache.sparse import SparseTargets
    empty = torch.zeros(1, m.num_members, 1)
    probe = SparseTargets(m.layout, empty.long(), empty, torch.zeros(1, m.num_members, len(m.layout_params["temperatures"])),
                          tuple(m.layout_params["temperatures"]), empty.long(), m.layout_params.get("sampling_temperature"),
                          c.allow_interpolation)
    probe.member(c.members)
    for t in c.temperatures:
        if any(a > 0 for a in c.alphas):
            probe.log_normalizer(t)


def _check_student(model: nn.Module, data: ResolvedDataset, per_token: bool, spec: str, num_classes: int,
                   device: torch.device) -> None:
    """Refuse, before training, a student whose outputs do not fit the rows: ``[batch, classes]`` per
    sample, ``[batch, length, classes]`` per position of a sequence dataset."""
    x, _ = get_batch(data.dataset, np.arange(min(2, len(data))))
    was = model.training
    model.eval()
    hint = (" (a sequence dataset needs a model with an output per position, e.g. lstm:EMBED,HIDDEN)"
            if per_token else "")
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except Exception as e:
        raise ConfigError(f"student {spec!r} fails on the dataset's inputs {tuple(x.shape)} {x.dtype} "
                          f"({str(e).splitlines()[0]}){hint}") from None
    finally:
        model.train(was)
    want = (len(x), x.shape[1], num_classes) if per_token else (len(x), num_classes)
    if tuple(out.shape) != want:
        raise ConfigError(f"student {spec!r} returns shape {tuple(out.shape)} for inputs {tuple(x.shape)}; "
                          f"expected {want}{hint}")


def _store_identity(path: str) -> dict[str, Any]:
    s = open_store(path)
    m = s.manifest
    ident = {"path": path, "format": s.format, "format_version": m.format_version, "created_at": m.created_at,
             "num_samples": m.num_samples, "num_classes": m.num_classes, "dtype": m.dtype,
             "members": m.members, "dataset": m.dataset}
    s.close()
    return ident


def _progress(total: int, show: bool, desc: str) -> Any:
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="batch", desc=desc, file=sys.stderr, leave=False)


def train_students(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train one student per (temperature, alpha, seed), all from one pass over the stream per epoch.

    Returns one summary dict per run (its directory, settings and final metrics).
    """
    c = cfg.resolved()
    device = resolve_device(c.device)
    info = init_distributed(device)
    try:
        return _train(c, device, info)
    finally:
        shutdown(info)


def _train(c: TrainConfig, device: torch.device, info: DistInfo) -> list[dict[str, Any]]:
    out = Path(c.out)
    combos = list(itertools.product(c.temperatures, c.alphas, c.seeds))
    sweep = len(combos) > 1 if c.sweep_dirs is None else c.sweep_dirs
    if info.is_main:
        names = [_run_name(t, a, s, c) for t, a, s in combos]
        existing = [p for p in [out / "config.json", *(out / n / "config.json" for n in names)] if p.exists()]
        if not sweep and (out / "summary.json").exists():
            existing.append(out / "summary.json")
        if existing and not c.overwrite:
            raise KdcacheError(f"{out} already holds training results ({existing[0].name}); pass --overwrite "
                               f"to replace them or choose another --out")
    torch.manual_seed(c.seeds[0])
    data = load_dataset(c.dataset, c.data_root)
    store_ident = None
    if c.store:
        store = open_store(c.store)
        check_pairing(store, data, c.dataset)
        num_classes = store.num_classes
        if c.members is not None:
            teacher_log_probs(torch.zeros(1, store.num_members, num_classes), 1.0, c.ensemble, c.members)
        stream: Any = DistillStream(store, data, c.batch_size, seed=c.data_seed, check=False, return_ids=True,
                                    allow_interpolation=c.allow_interpolation)
        _check_sparse_settings(store, c)
        if store.manifest.per_token:
            expected = _id_sums([store.sequence_index()[0]])
        else:
            expected = _id_sums(store.read(a, a + (1 << 20)).sample_ids for a in range(0, len(store), 1 << 20))
        store_ident = _store_identity(c.store)
    else:
        if data.num_classes is None:
            raise ConfigError(f"dataset {c.dataset!r} does not say its number of classes; train with a --store")
        num_classes = data.num_classes
        rows, _ = resolve_subset(c.subset, data.dataset)
        stream = DatasetStream(data, c.batch_size, indices=rows, seed=c.data_seed, return_ids=True)
        expected = _id_sums([rows])
    input_shape = data.input_shape
    per_token = is_sequence_dataset(data.dataset)
    if c.store and per_token != store.manifest.per_token:
        raise ConfigError(f"store {c.store!r} has a row per {'position' if store.manifest.per_token else 'sample'} "
                          f"but dataset {c.dataset!r} is {'a sequence' if per_token else 'not a sequence'} dataset; "
                          f"pass the dataset the store was dumped from")
    loader = DataLoader(stream, batch_size=None, num_workers=c.workers, pin_memory=device.type == "cuda",
                        persistent_workers=c.workers > 0)
    evaluator = _Evaluator(c, device)

    runs = []
    for t, a, s in combos:
        resolved = load_model(c.student, input_shape, num_classes, c.dropout, c.input_dropout, seed=s)
        model = resolved.module.to(device)
        if info.enabled:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        params = model.parameters()
        opt = (torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
               if c.optimizer == "sgd" else torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, c.epochs) if c.schedule == "cosine" else None
        if not runs:
            _check_student(model, data, per_token, c.student, num_classes, device)
        name = _run_name(t, a, s, c)
        runs.append(_Run(name, t, a, s, model, opt, sched, out / name if sweep else out))
        arch = resolved.arch
    show = (c.progress if c.progress is not None else sys.stderr.isatty()) and info.is_main
    gen = torch.Generator().manual_seed(c.data_seed)

    for epoch in range(c.epochs):
        t0 = time.perf_counter()
        stream.set_epoch(epoch)
        for r in runs:
            r.model.train()
        loss_sum = torch.zeros(len(runs), dtype=torch.float64, device=device)
        correct = torch.zeros(len(runs), dtype=torch.float64, device=device)
        # items (samples or sequences), labelled rows, sum of ids, sum of ids^2, rows (samples or positions)
        seen = torch.zeros(5, dtype=torch.float64)
        bar = _progress(len(stream), show, f"epoch {epoch + 1}/{c.epochs}")
        join: Any = contextlib.nullcontext()
        if info.enabled:
            from torch.distributed.algorithms.join import Join
            join = Join([r.model for r in runs])
        with join:
            for batch in loader:
                x, y, z, *mask, ids = batch  # a sequence batch has a mask of real positions
                mask = mask[0] if mask else None
                if c.jitter:
                    x = jitter(x, c.jitter, gen)
                if mask is not None:
                    y = y[mask]  # one label per stored row, as the teacher rows are
                idf = ids.double()  # coverage is counted on the host, before the copy: no device sync
                seen += torch.stack([torch.tensor(float(len(ids))), (y >= 0).sum().double(), idf.sum(),
                                     (idf ** 2).sum(), torch.tensor(float(len(y)))])
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                z = z.to(device, non_blocking=True) if z is not None else None
                mask = mask.to(device, non_blocking=True) if mask is not None else None
                labelled = y >= 0
                for i, r in enumerate(runs):
                    logits = r.model(x)
                    if mask is not None:
                        logits = logits[mask]
                    loss = distillation_loss(logits, z, y, r.temperature, r.alpha, c.ensemble, c.members)
                    r.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    r.optimizer.step()
                    loss_sum[i] += loss.detach().double() * len(y)
                    correct[i] += ((logits.detach().argmax(-1) == y) & labelled).sum()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if info.enabled:
            import torch.distributed as dist
            seen_dev = seen.to(device)
            for tns in (loss_sum, correct, seen_dev):
                dist.all_reduce(tns)
            seen = seen_dev.cpu()
        coverage_ok = (int(seen[0]) == expected[0] and int(seen[2]) == expected[1]
                       and math.isclose(float(seen[3]), expected[2], rel_tol=1e-12))
        seconds = time.perf_counter() - t0
        for i, r in enumerate(runs):
            lr = r.optimizer.param_groups[0]["lr"]
            if r.scheduler is not None:
                r.scheduler.step()
            m = {"epoch": epoch + 1, "loss": float(loss_sum[i] / max(seen[4].item(), 1)),
                 "train_accuracy": float(correct[i] / max(seen[1].item(), 1)) if seen[1] else None,
                 "samples_seen": int(seen[0]), "coverage_ok": coverage_ok, "lr": lr, "seconds": seconds}
            if per_token:
                m["positions_seen"] = int(seen[4])
            if info.is_main:
                m.update(evaluator(r.module))
            r.history.append(m)
        if info.is_main and not coverage_ok:
            print(f"warning: epoch {epoch + 1} saw {int(seen[0])} rows, expected each of {expected[0]} once",
                  file=sys.stderr)
    results = []
    if info.is_main:
        for r in runs:
            results.append(_write_run(r, c, arch, input_shape, num_classes, store_ident, data))
        _write_summary(out, results, c)
    info.barrier()
    return results


def _write_run(r: _Run, c: TrainConfig, arch: str, input_shape: tuple[int, ...], num_classes: int,
               store_ident: dict[str, Any] | None, data: ResolvedDataset) -> dict[str, Any]:
    r.out.mkdir(parents=True, exist_ok=True)
    config = {**asdict(c), "run": r.name, "temperature": r.temperature, "alpha": r.alpha, "seed": r.seed,
              "arch": arch, "input_shape": list(input_shape), "num_classes": num_classes,
              "store_identity": store_ident, "dataset_identity": data.describe()}
    for k in ("temperatures", "alphas", "seeds", "overwrite", "progress"):
        config.pop(k)
    save_checkpoint(r.module, r.out, arch, input_shape, num_classes,
                    extra={"dropout": c.dropout, "run": r.name, "temperature": r.temperature, "alpha": r.alpha,
                           "seed": r.seed, "store": c.store})
    (r.out / "config.json").write_text(json.dumps(config, indent=2))
    (r.out / "metrics.json").write_text(json.dumps(r.history, indent=2))
    final = r.history[-1]
    return {"run": r.name, "dir": str(r.out), "student": c.student, "teacher": (store_ident or {}).get("members"),
            "temperature": r.temperature if c.store else None, "alpha": r.alpha, "seed": r.seed,
            "epochs": c.epochs, "wall_seconds": sum(h["seconds"] for h in r.history), **final}


def _write_summary(out: Path, results: list[dict[str, Any]], c: TrainConfig) -> None:
    """summary.json and summary.md of the runs in ``out``: runs trained earlier into the same sweep
    directory (and not retrained now) are kept."""
    out.mkdir(parents=True, exist_ok=True)
    old = out / "summary.json"
    if old.exists():
        new = {r["run"] for r in results}
        kept = [r for r in json.loads(old.read_text()) if r["run"] not in new and Path(r["dir"]).exists()]
        results = sorted(kept + results, key=lambda r: (r["temperature"] or 0, r["alpha"], r["seed"]))
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(format_table(results) + "\n")


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of runs; token-level runs (sequence data) add the eval perplexity."""
    ppl = any(r.get("eval_perplexity") is not None for r in results)
    head = ("| run | T | alpha | seed | loss | train acc | eval acc | eval errors | teacher agreement |"
            + (" eval perplexity |" if ppl else ""))
    rows = [head, "|" + "---|" * (10 if ppl else 9)]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in results:
        rows.append(f"| {r['run']} | {f(r['temperature'], 'g')} | {f(r['alpha'], 'g')} | {r['seed']} | "
                    f"{f(r['loss'], '.4f')} | {f(r['train_accuracy'], '.4f')} | {f(r.get('eval_accuracy'), '.4f')} | "
                    f"{f(r.get('eval_errors'), 'd')} | {f(r.get('teacher_agreement'), '.4f')} |"
                    + (f" {f(r.get('eval_perplexity'), '.2f')} |" if ppl else ""))
    return "\n".join(rows)
