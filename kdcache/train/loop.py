"""Stage two's loop: set up, then for each epoch and batch one step of every student, then write.

It reads top to bottom (as nanoGPT's ``train.py`` does); each thing it does that has a name is a call:
:func:`open_training_data`, :func:`build_units`, :class:`Checkpoints`, :func:`device_batches`,
:func:`finish_epoch`, :func:`write_run`. A unit is one student (:class:`SeparateStudent`) or a stack
of students trained as one model (:class:`StackedStudents`); the loop treats them alike.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

import kdcache.train.divergence as divergence
from kdcache.augment import jitter
from kdcache.distributed import DistInfo, init_distributed, resolve_device, shutdown
from kdcache.errors import ConfigError, KdcacheError
from kdcache.progress import progress_bar
from kdcache.sizes import format_size
from kdcache.specs import load_model
from kdcache.train.batches import ID_SQUARES, ID_SUM, ITEMS, LABELLED, ROWS, device_batches
from kdcache.train.checkpoint import Checkpoints
from kdcache.train.config import TrainConfig, warmup_scale
from kdcache.train.epoch_eval import Evaluator
from kdcache.train.results import write_run, write_summary
from kdcache.train.source import TrainingData, check_student, open_training_data, probe_inputs
from kdcache.train.stacked import CPU_STACK_TENSOR_BYTES, cpu_stack_group, stack_budget, stack_bytes, try_stack
from kdcache.train.students import SeparateStudent, Student, TrainingUnit, plan_students


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_step_of(units: Any, batch: Any, sums: Any, c: TrainConfig) -> None:
    """One step; a batch of one row that a student's BatchNorm cannot train on is one line, not a traceback."""
    try:
        train_step(units, batch, sums)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise ConfigError(f"a batch of {len(batch.y)} row cannot train a student with BatchNorm (the epoch's last "
                          f"batch: its rows leave one over at {{param:batch_size}} {c.batch_size}); choose a batch "
                          f"size that does not divide the rows with one left over") from None


def train_students(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train one student per (temperature, alpha, seed, lr), all from one pass over the stream per epoch.

    Killed at any point, the same call (or command) resumes from its last checkpoint and ends with
    the weights an uninterrupted run would have. Returns one summary dict per run (its directory,
    settings and final metrics).
    """
    c = cfg.resolved()
    from kdcache.defaults import completed_spec  # the store's (or the teacher's) tokenizer or preprocessing
    c.dataset = completed_spec(c.dataset, c.teachers, c.store, c.student)
    c.eval_dataset = completed_spec(c.eval_dataset, c.teachers, c.store, c.student)
    if c.engine == "trainer":
        from kdcache.integrations.hf_trainer import train_with_trainer
        return train_with_trainer(c)
    device = resolve_device(c.device)
    info = init_distributed(device)
    try:
        with _store_in_use(c.store):
            return _train(c, device, info)
    finally:
        shutdown(info)


@contextlib.contextmanager
def _store_in_use(store: str | None) -> Iterator[None]:
    """A store from the cache is marked used, and held (a shared lock) so that `cache rm` refuses it."""
    from kdcache import cache
    if store is None or not cache.is_cached(store):
        yield
        return
    with cache.locked(store, exclusive=False):
        cache.touch(store)
        yield


@dataclass
class EpochSums:
    """What one epoch adds up, per student (loss, correct rows) and over the batches (see Batch.counts)."""

    loss: torch.Tensor
    correct: torch.Tensor
    seen: torch.Tensor
    seconds: float = 0.0
    mark_loss: torch.Tensor | None = None  # the loss sums and rows at the last divergence check
    mark_rows: float = 0.0
    labels: torch.Tensor | None = None     # labelled rows per class [classes] (what chance accuracy is)

    @classmethod
    def zeros(cls, students: int, classes: int, device: torch.device) -> "EpochSums":
        return cls(torch.zeros(students, dtype=torch.float64, device=device),
                   torch.zeros(students, dtype=torch.float64, device=device),
                   torch.zeros(ROWS + 1, dtype=torch.float64),
                   mark_loss=torch.zeros(students, dtype=torch.float64, device=device),
                   labels=torch.zeros(classes, dtype=torch.float64, device=device))

    def majority(self) -> float | None:
        """The share of the epoch's labelled rows in their most common class (None without labels)."""
        total = float(self.labels.sum())
        return float(self.labels.max()) / total if total > 0 else None

    def window_loss(self) -> list[float | None]:
        """Each student's mean loss per row since the last call (one host sync)."""
        rows = float(self.seen[ROWS]) - self.mark_rows
        loss = ((self.loss - self.mark_loss) / max(rows, 1)).tolist()
        self.mark_loss, self.mark_rows = self.loss.clone(), float(self.seen[ROWS])
        return loss if rows > 0 else [None] * len(loss)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sums/loss": self.loss, "sums/correct": self.correct, "sums/seen": self.seen,
                "sums/seconds": torch.tensor(self.seconds, dtype=torch.float64), "sums/mark_loss": self.mark_loss,
                "sums/mark_rows": torch.tensor(self.mark_rows, dtype=torch.float64), "sums/labels": self.labels}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], classes: int, device: torch.device) -> "EpochSums":
        labels = t.get("sums/labels", torch.zeros(classes, dtype=torch.float64))
        return cls(t["sums/loss"].to(device), t["sums/correct"].to(device), t["sums/seen"],
                   float(t["sums/seconds"]), t["sums/mark_loss"].to(device), float(t["sums/mark_rows"]),
                   labels.to(device))


def _train(c: TrainConfig, device: torch.device, info: DistInfo) -> list[dict[str, Any]]:
    # -- set-up: runs, checkpoints, data, students ----------------------------------------------
    out = Path(c.out)
    students = plan_students(c, out)
    ckpts = Checkpoints(out, c.identity(), info, log)
    claim_out_dir(c, out, students, ckpts, info)
    found = ckpts.find()  # before anything is built: a checkpoint of another command is refused at once
    torch.manual_seed(c.seeds[0])
    src = open_training_data(c, device)
    units, arch = build_units(c, students, src, device, info)
    loader = DataLoader(src.stream, batch_size=None, num_workers=c.workers, pin_memory=device.type == "cuda",
                        persistent_workers=c.workers > 0, generator=torch.Generator().manual_seed(c.data_seed))
    evaluator = Evaluator(c, device)
    jitter_gen = torch.Generator().manual_seed(c.data_seed)
    augment = (lambda x: jitter(x, c.jitter, jitter_gen)) if c.jitter else None
    show = (c.progress if c.progress is not None else sys.stderr.isatty()) and info.is_main

    first_epoch, step, sums = 0, 0, None
    if found is not None:
        first_epoch, step, sums = restore(found, ckpts, units, students, jitter_gen, src.num_classes, device)
        if info.is_main:
            log(f"resuming {out} from {found[0].name}: epoch {first_epoch + 1}, step {step}")

    def save(epoch: int, step: int) -> None:
        shared: dict[str, torch.Tensor] = {}
        mine: dict[str, torch.Tensor] = {"loop/jitter_rng": jitter_gen.get_state()}
        for u in units:
            shared.update(u.state())
            mine.update(u.rng_state())
        if sums is not None and step > 0:
            mine.update(sums.tensors())
        ckpts.save(epoch, step, shared, mine, {"histories": {s.name: s.history for s in students},
                                               "initial_loss": {s.name: s.initial_loss for s in students},
                                               "peak_loss": {s.name: s.peak_loss for s in students},
                                               "diverged": {s.name: s.diverged for s in students}})

    slots = [(u, j) for u in units for j in range(len(u.students))]  # student i is student j of unit u

    say = log if info.is_main else lambda m: None

    def stop(indices: list[int]) -> None:
        for i in indices:
            u, j = slots[i]
            u.stop(j)

    def stop_diverged(window: list[float | None], epoch: int, step: int | None) -> None:
        stop(divergence.check_start(students, say))
        stop(divergence.check(students, window, epoch, step, say))

    # -- the loop ---------------------------------------------------------------------------------
    for epoch in range(first_epoch, c.epochs):
        t0 = time.perf_counter()
        src.stream.set_epoch(epoch)
        for u in units:
            u.set_epoch_lr(epoch)
            u.train()
        if step == 0 or sums is None:
            sums = EpochSums.zeros(len(students), src.num_classes, device)
        safe_steps = _steps_every_rank_takes(src.stream, info)
        per_epoch = safe_steps if info.enabled else len(src.stream)  # the same on every rank: so is the lr
        warmup_steps = round(c.warmup * per_epoch)
        check_every = divergence.check_interval(per_epoch)
        bar = progress_bar(len(src.stream), show, f"epoch {epoch + 1}/{c.epochs}", "batch", done=step, leave=False)
        with _join(units, info):
            for batch in device_batches(loader, device, skip=step, augment=augment):
                if src.teacher is not None:  # online distillation: the teacher on this very batch
                    batch.z = src.teacher(batch.x)
                done = epoch * per_epoch + step  # optimizer steps before this one
                if warmup_steps and done <= warmup_steps:
                    for u in units:
                        u.set_epoch_lr(epoch, warmup_scale(done, warmup_steps))
                _train_step_of(units, batch, sums, c)
                step += 1
                bar.update(1)
                if students[0].initial_loss is None and epoch == 0 and step == 1 and safe_steps >= 1:
                    divergence.record_initial(students, first_batch_losses(sums, info))
                    if not info.enabled:  # under DDP, stops wait for the epoch end (every rank's Join agrees)
                        stop(divergence.check_start(students, say))
                if not info.enabled and step % check_every == 0:
                    stop_diverged(sums.window_loss(), epoch, step)
                if c.checkpoint_every and step % c.checkpoint_every == 0 and step < safe_steps:
                    sums.seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save(epoch, step)
        bar.close()
        sums.seconds += time.perf_counter() - t0
        if info.enabled:
            sync_ranks(units, step, info)
        finish_epoch(epoch, sums, units, src, evaluator, info, stop_diverged,
                     lambda loss, acc, majority: stop(divergence.check_collapse(
                         students, loss, acc, majority, epoch, say)) if epoch + 1 > c.warmup else None)
        step, sums = 0, None
        if epoch + 1 < c.epochs:  # after the last epoch the results themselves are written next
            save(epoch + 1, 0)

    results = write_results(c, units, arch, src, out, info)
    ckpts.clear()
    return results


def write_results(c: TrainConfig, units: list[TrainingUnit], arch: str, src: TrainingData, out: Path,
                  info: DistInfo) -> list[dict[str, Any]]:
    """Each run's checkpoint, config and metrics, and the sweep's summary (by the main rank; every rank
    waits for it)."""
    results = []
    if info.is_main:
        for u in units:
            for j, s in enumerate(u.students):
                results.append(write_run(s, u.module(j), c, arch, src.data.input_shape, src.num_classes,
                                         src.store_identity, src.data))
        write_summary(out, results, c)
    info.barrier()
    return results


def train_step(units: list[TrainingUnit], batch: Any, sums: EpochSums) -> None:
    """One optimizer step of every student on ``batch``; their losses and correct rows go into ``sums``
    (on the device: no sync)."""
    a = 0
    for u in units:
        losses, correct = u.step(batch.x, batch.y, batch.z, batch.mask)
        n = len(u.students)
        sums.loss[a:a + n] += losses.double() * len(batch.y)
        sums.correct[a:a + n] += correct.double()
        a += n
    sums.seen += batch.counts
    y = batch.y.reshape(-1)
    sums.labels.scatter_add_(0, y.clamp(min=0), (y >= 0).double())


def first_batch_losses(sums: EpochSums, info: DistInfo) -> list[float | None]:
    """Each student's mean loss over the run's first batch (of every rank: one all-reduce under torchrun),
    taken before any update: the reference the divergence checks compare with."""
    rows = torch.tensor([float(sums.seen[ROWS])], dtype=torch.float64, device=sums.loss.device)
    both = torch.cat([sums.loss, rows])
    if info.enabled:
        import torch.distributed as dist
        dist.all_reduce(both)
    total, n = both[:-1], float(both[-1])
    sums.mark_loss, sums.mark_rows = sums.loss.clone(), float(sums.seen[ROWS])
    return (total / max(n, 1)).tolist() if n > 0 else [None] * len(total)


def finish_epoch(epoch: int, sums: EpochSums, units: list[TrainingUnit], src: TrainingData, evaluator: Evaluator,
                 info: DistInfo, stop_diverged: Callable[[list[float | None], int, int | None], None],
                 stop_collapsed: Callable[[list[float | None], list[float | None], float | None], None]) -> None:
    """Add up the epoch over ranks, check it saw every row once and that no student diverged or
    collapsed, evaluate, and append each student's metrics (a diverged student's last entry says so)."""
    if info.enabled:
        import torch.distributed as dist
        seen = sums.seen.to(sums.loss.device)
        for t in (sums.loss, sums.correct, seen, sums.labels):
            dist.all_reduce(t)
        sums.seen = seen.cpu()
        sums.mark_loss, sums.mark_rows = torch.zeros_like(sums.loss), 0.0  # the whole epoch, over every rank
    students = [s for u in units for s in u.students]
    before = [s.diverged is not None and s.diverged["epoch"] <= epoch for s in students]  # in an earlier epoch
    stop_diverged(sums.window_loss(), epoch, None)
    seen = sums.seen
    epoch_loss = (sums.loss.cpu() / max(float(seen[ROWS]), 1)).tolist()
    accuracy = (sums.correct.cpu() / float(seen[LABELLED])).tolist() if seen[LABELLED] else [None] * len(students)
    stop_collapsed(epoch_loss, accuracy, sums.majority())
    expected = src.expected
    coverage_ok = (int(seen[ITEMS]) == expected[0] and int(seen[ID_SUM]) == expected[1]
                   and math.isclose(float(seen[ID_SQUARES]), expected[2], rel_tol=1e-12))
    loss, correct = sums.loss.cpu(), sums.correct.cpu()
    i = 0
    for u in units:
        for j, s in enumerate(u.students):
            if before[i]:  # stopped in an earlier epoch: nothing more to record
                i += 1
                continue
            mean = float(loss[i] / max(seen[ROWS].item(), 1))
            m = {"epoch": epoch + 1, "loss": mean if math.isfinite(mean) else None,
                 "train_accuracy": float(correct[i] / max(seen[LABELLED].item(), 1)) if seen[LABELLED] else None,
                 "samples_seen": int(seen[ITEMS]), "coverage_ok": coverage_ok, "lr": u.lr(j), "seconds": sums.seconds}
            if src.per_token:
                m["positions_seen"] = int(seen[ROWS])
            if s.diverged is not None:
                m["diverged"] = s.diverged
            elif info.is_main:
                m.update(evaluator(u.module(j)))
            s.history.append(m)
            i += 1
    if info.is_main and not coverage_ok:
        log(f"warning: epoch {epoch + 1} saw {int(seen[ITEMS])} rows, expected each of {expected[0]} once")


# -- set-up ---------------------------------------------------------------------------------------
def claim_out_dir(c: TrainConfig, out: Path, students: list[Student], ckpts: Checkpoints, info: DistInfo) -> None:
    """Refuse an ``--out`` that holds other results (unless --overwrite); a checkpoint of this same
    command is fine: it is resumed."""
    if not info.is_main:
        return
    if c.overwrite:
        ckpts.clear()
        return
    if ckpts.exists():
        return
    existing = [p for p in [out / "config.json", *(s.out / "config.json" for s in students)] if p.exists()]
    if all(s.out == out for s in students) and (out / "summary.json").exists():  # not a sweep directory
        existing.append(out / "summary.json")
    if existing:
        raise KdcacheError(f"{out} already holds training results ({existing[0].name}); pass {{param:overwrite}} "
                           f"to replace them or choose another {{param:out}}")


def build_units(c: TrainConfig, students: list[Student], src: TrainingData, device: torch.device,
                info: DistInfo) -> tuple[list[TrainingUnit], str]:
    """The students as training units: stacks where they can stack (in groups that fit in memory),
    one by one where they cannot; returns (units, the architecture the checkpoints record)."""
    modules, arch = [], c.student
    lora = None
    if c.lora is not None:
        from kdcache.integrations.lora import LoraSpec, apply_lora
        lora = LoraSpec.parse(c.lora)
    for s in students:
        resolved = load_model(c.student, src.data.input_shape, src.num_classes, c.dropout, c.input_dropout, seed=s.seed)
        modules.append(resolved.module if lora is None else apply_lora(resolved.module, lora, c.student, s.seed))
        arch = resolved.arch
    probe = probe_inputs(src.data)
    check_student(modules[0].to(device), src.data, src.per_token, c.student, src.num_classes, device)
    groups = [list(range(len(students)))]
    why_not = None
    if len(students) < 2 or not c.stack:
        why_not = "" if len(students) < 2 else "--no-stack"
    elif info.enabled:
        why_not = "under torchrun each student trains in DistributedDataParallel"
    elif lora is not None:
        why_not = "--lora: a stack would train the frozen base weights too; each adapter trains on its own base"
    if why_not is None:
        per = stack_bytes(modules[0], probe, min(c.batch_size, len(src.data)), c.optimizer)
        budget, source = stack_budget(device)
        fit = max(1, int(budget // max(per, 1)))
        cpu = None if c.stack_group else cpu_stack_group(modules[0], device)
        size = min(fit, c.stack_group or cpu or len(students))
        if size < len(students):
            groups = _contiguous(len(students), math.ceil(len(students) / size))
            why = (f"--stack-group {c.stack_group}" if size == c.stack_group else
                   f"a stack of {len(students)} needs about {format_size(per * len(students))}, more than "
                   f"{source} ({format_size(budget)})" if size == fit else
                   f"on the CPU a larger stack makes tensors over {CPU_STACK_TENSOR_BYTES // 2 ** 20} MiB, which "
                   f"cost fresh memory pages every step; --stack-group sets the size")
            if info.is_main:
                log(f"note: training the {len(students)} students in {len(groups)} stacks of at most {size} ({why})")
    units: list[TrainingUnit] = []
    for g in groups:
        if why_not is None and len(g) > 1:
            stack, how = try_stack([students[i] for i in g], [modules[i] for i in g], c, device, probe, info.rank)
            if stack is not None:
                if info.is_main:
                    log(f"note: {len(g)} students of {c.student} train as one stacked model ({how})")
                units.append(stack)
                continue
            if info.is_main:
                log(f"note: students of {c.student} cannot be stacked ({how}); training them one by one")
            why_not = how
        elif why_not and info.is_main and g is groups[0]:
            log(f"note: training {len(students)} students one by one ({why_not})")
        units += [SeparateStudent(students[i], modules[i], c, device, info.rank, info.enabled) for i in g]
    return units, arch


def _contiguous(n: int, count: int) -> list[list[int]]:
    """``range(n)`` cut into ``count`` contiguous groups of nearly equal size."""
    bounds = [round(k * n / count) for k in range(count + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(count)]


def restore(found: tuple[Path, dict[str, Any]], ckpts: Checkpoints, units: list[TrainingUnit], students: list[Student],
            jitter_gen: torch.Generator, classes: int, device: torch.device) -> tuple[int, int, EpochSums | None]:
    """Load a checkpoint into the units; returns (epoch, steps of it done, the epoch's sums so far)."""
    d, state = found
    shared, mine = ckpts.load(d)
    for u in units:
        u.load_state(shared)
        u.load_rng(mine)
    for s in students:
        s.history = list(state["histories"][s.name])
        s.initial_loss = state.get("initial_loss", {}).get(s.name)
        s.peak_loss = state.get("peak_loss", {}).get(s.name)
        s.diverged = state["diverged"][s.name]
    for u in units:
        for j, s in enumerate(u.students):
            if s.diverged is not None:
                u.stop(j)
    jitter_gen.set_state(mine["loop/jitter_rng"])
    sums = EpochSums.from_tensors(mine, classes, device) if state["step"] > 0 else None
    return state["epoch"], state["step"], sums


def _steps_every_rank_takes(stream: Any, info: DistInfo) -> int:
    """Batches every rank has this epoch: a checkpoint within an epoch is taken only before any rank
    runs out (DDP's Join then shadows the others), so that every rank is at the same step."""
    if not info.enabled:
        return sys.maxsize
    import torch.distributed as dist
    n = torch.tensor([len(stream)])
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n)


def sync_ranks(units: list[TrainingUnit], steps: int, info: DistInfo) -> None:
    """After an epoch of uneven inputs, every rank takes the state of the rank that took the most steps."""
    import torch.distributed as dist
    counts = torch.zeros(info.world_size, dtype=torch.int64)
    counts[info.rank] = steps
    dist.all_reduce(counts)
    src = int(counts.argmax())
    for u in units:
        u.sync_ranks(src)


def _join(units: list[TrainingUnit], info: DistInfo) -> contextlib.AbstractContextManager:
    if not info.enabled:
        return contextlib.nullcontext()
    from torch.distributed.algorithms.join import Join
    return Join([m for u in units if not u.stopped for m in u.join_modules])


