"""``kdcache bench``: every stage timed side by side with its physical limit, in one run.

Each benchmark interleaves its two sides over several repetitions and reports medians and their
ratio: these machines are noisy, so the ratio is what counts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache._version import __version__
from kdcache.bench.common import BENCH_NAMES as BENCHES
from kdcache.bench.common import FULL, QUICK, Profile, bare_pass, interleave, interleave_all
from kdcache.losses import teacher_log_probs


# -- 1. store read ------------------------------------------------------------------------------
def bench_store_read(p: Profile, work: Path) -> list[dict[str, Any]]:
    from kdcache.store import Manifest, create_store, open_store
    from kdcache.stream import DistillStream
    n, c = p.read_rows, p.read_classes
    rng = np.random.default_rng(0)
    rows = []
    variants = [("zarr", "float16", "none"), ("zarr", "float32", "none"), ("zarr", "float16", "zstd"),
                ("hdf5", "float16", "none"), ("hdf5", "float32", "none"), ("hdf5", "float16", "gzip")]
    for backend, dtype, codec in variants:
        data = rng.normal(0, 3, (n, 1, c)).astype(dtype)
        raw = work / f"raw-{dtype}.npy"
        if not raw.exists():
            np.save(raw, data)
        path = str(work / f"read-{dtype}-{codec}.{'zarr' if backend == 'zarr' else 'h5'}")
        m = Manifest(num_samples=n, num_classes=c, num_members=1, dtype=dtype, chunk_rows=4096, compression=codec,
                     members=[{"name": "bench", "spec": "bench", "sha256": "0" * 64}],
                     dataset={"spec": "bench", "name": "bench", "split": None, "length": n, "fingerprint": "0",
                              "subset": None})
        s = create_store(path, m, overwrite=True)
        for a in range(0, n, 16 * 4096):
            s.write_block(a, data[a:a + 16 * 4096], np.arange(a, min(a + 16 * 4096, n)),
                          np.zeros(min(16 * 4096, n - a)))
        s.mark_complete()
        s.close()
        store = open_store(path)
        mm = np.load(raw, mmap_mode="r")
        block = 16 * 4096

        def read_store() -> None:
            for a in range(0, n, block):
                store.read(a, a + block)

        def read_mm() -> None:
            for a in range(0, n, block):
                np.array(mm[a:a + block])

        ts, tm = interleave(read_store, read_mm, p.reps)
        stream = DistillStream(store, None, batch_size=1024, seed=0)

        def read_stream() -> None:
            for _ in stream:
                pass

        def mm_shuffled() -> None:
            # the same bytes, the same block shuffle and window, from np.memmap: the ceiling for the stream
            order = np.random.default_rng(0).permutation(np.arange(0, n, stream.block_rows))
            for w in range(0, len(order), stream.window_blocks):
                z = np.concatenate([np.array(mm[a:a + stream.block_rows]) for a in order[w:w + stream.window_blocks]])
                perm = np.random.default_rng(1).permutation(len(z))
                for a in range(0, len(z), 1024):
                    torch.from_numpy(z[perm[a:a + 1024]].astype(np.float32))

        tst, tms = interleave(read_stream, mm_shuffled, p.reps)
        mb = data.nbytes / 1e6
        rows.append({"backend": backend, "dtype": dtype, "compression": codec, "rows": n, "classes": c,
                     "block_MBps": mb / ts, "memmap_MBps": mb / tm, "block_ratio": ts / tm,
                     "stream_rows_per_s": n / tst, "memmap_stream_rows_per_s": n / tms, "stream_ratio": tst / tms})
        store.close()
    return rows


# -- 2. dump -------------------------------------------------------------------------------------
def bench_dump(p: Profile, work: Path, device: str) -> list[dict[str, Any]]:
    from kdcache.dump import DumpConfig, dump_logits
    out = []
    for name, teachers, rows_n in (("mnist 1200-1200", ["mlp:1200,1200"], p.dump_rows),
                                   ("3-member ensemble", ["mlp:1200,1200"] * 3,
                                    p.mnist_rows if p.quick else p.dump_rows)):
        cfg = DumpConfig(teachers=teachers, dataset="mnist:train", out=str(work / "dump.zarr"),
                         subset=f"0:{rows_n}", overwrite=True, device=device, progress=False)
        ta, tb = interleave(lambda: dump_logits(cfg), bare_pass(cfg, device), p.reps)
        out.append({"teacher": name, "rows": rows_n, "dump_s": ta, "bare_inference_s": tb, "ratio": ta / tb,
                    "goal": 1.05})
    return out


_RSS_CHILD = """
import sys
from kdcache.cli import cli
cli.main(args=sys.argv[1:], prog_name="kdcache", standalone_mode=False)
status = open("/proc/self/status").read()
print("VmHWM", next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
"""


def peak_rss(rows: int, work: Path, device: str) -> dict[str, Any]:
    """Peak RSS of a dump-logits process over ``rows`` and ``10 * rows`` synthetic rows (O(1) dataset memory).

    The process reports its own VmHWM: a parent's ``ru_maxrss`` would count the pages a forked
    child shares with this (large) benchmark process before it execs.
    """
    res = {}
    for n in (rows, 10 * rows):
        args = ["dump-logits", "--teacher", "mlp:512", "--dataset", f"synthetic:n={n},dim=256,classes=1000",
                "--out", str(work / f"rss-{n}.zarr"), "--overwrite", "--chunk-rows", "512", "--device", device,
                "--no-progress"]
        p = subprocess.run([sys.executable, "-c", _RSS_CHILD, *args], capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("VmHWM")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"rss dump failed: {p.stderr[-500:]}")
        res[n] = int(line[0].split()[1]) / 1024  # kB -> MiB
    return {"rows": list(res), "peak_rss_MiB": list(res.values()), "ratio_10N_over_N": res[10 * rows] / res[rows],
            "store_MB_at_10N": 10 * rows * 1000 * 2 / 1e6}


# -- 3/4. distilled training and sweeps --------------------------------------------------------
def _teacher_store(p: Profile, work: Path, device: str) -> str:
    from kdcache.dump import DumpConfig, dump_logits
    path = str(work / "teacher.zarr")
    dump_logits(DumpConfig(teachers=["mlp:1200,1200"], dataset="mnist:train", out=path, subset=f"0:{p.mnist_rows}",
                           overwrite=True, device=device, progress=False))
    return path


def _train(work: Path, device: str, p: Profile, store: str | None, temps: list[float] | None, tag: str,
           student: str = "mlp:800,800", seeds: list[int] | None = None, stack: bool = True) -> None:
    from kdcache.train import TrainConfig, train_students
    train_students(TrainConfig(dataset="mnist:train", student=student, out=str(work / tag), store=store,
                               temperatures=temps, seeds=seeds or [0], subset=None if store else f"0:{p.mnist_rows}",
                               epochs=p.epochs, device=device, overwrite=True, progress=False, stack=stack))


def bench_train(p: Profile, work: Path, device: str, store: str) -> dict[str, Any]:
    ta, tb = interleave(lambda: _train(work, device, p, store, [4.0], "distilled"),
                        lambda: _train(work, device, p, None, None, "plain"), p.reps)
    return {"student": "mlp:800,800", "rows": p.mnist_rows, "epochs": p.epochs, "distilled_s": ta,
            "supervised_s": tb, "ratio": ta / tb, "goal": 1.03}


SWEEPS = (  # (student, temperatures, seeds, goal for one stacked pass / separate runs); quick: the first seed
    ("mlp:30,30", [1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0], [0, 1, 2], 0.25),
    ("mlp:800,800", [1.0, 2.0, 5.0, 20.0], [0], 0.9),
)


def bench_sweep(p: Profile, work: Path, device: str, store: str) -> list[dict[str, Any]]:
    """A sweep in one stacked pass, in one pass one student after another (--no-stack), and as separate runs."""
    rows = []
    for student, temps, seeds, goal in SWEEPS:
        seeds = seeds[:1] if p.quick else seeds
        k = len(temps) * len(seeds)

        def stacked() -> None:
            _train(work, device, p, store, temps, "sweep", student, seeds)

        def one_by_one() -> None:
            _train(work, device, p, store, temps, "sweep-nostack", student, seeds, stack=False)

        def separate() -> None:
            for t in temps:
                for s in seeds:
                    _train(work, device, p, store, [t], f"sep-{t:g}-{s}", student, [s])

        if k <= 4:
            ta, tc, tb = interleave_all([stacked, one_by_one, separate], max(1, p.reps - 1))
        else:  # many short runs: a warm-up of each costs as much as a measurement
            ta, tc, tb = interleave_all([stacked, one_by_one, separate], max(1, p.reps // 2), warmup=False)
        rows.append({"student": f"784-{student[4:].replace(',', '-')}-10", "students": k, "stacked_s": ta,
                     "one_pass_unstacked_s": tc, "separate_runs_s": tb, "ratio": ta / tb,
                     "unstacked_ratio": tc / tb, "goal": goal})
    return rows


# -- 5. cached against online -------------------------------------------------------------------
def _online(k: int, p: Profile, device: str) -> float:
    """The way other libraries distil: each student its own run, the teacher in every step (no_grad)."""
    from kdcache.datasets import load_dataset
    from kdcache.distributed import resolve_device
    from kdcache.losses import distillation_loss
    from kdcache.specs import load_model
    from kdcache.stream import DatasetStream
    dev = resolve_device(device)
    data = load_dataset("mnist:train")
    teacher = load_model("mlp:1200,1200", (28, 28), 10).module.to(dev).eval()
    t0 = time.perf_counter()
    for s in range(k):
        student = load_model("mlp:800,800", (28, 28), 10, seed=s).module.to(dev)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        stream = DatasetStream(data, 128, indices=np.arange(p.mnist_rows), seed=0)
        for _ in range(p.epochs):
            for x, y, _ in stream:
                x, y = x.to(dev), y.to(dev)
                with torch.no_grad():
                    z = teacher(x)[:, None]
                loss = distillation_loss(student(x), z, y, 4.0, 0.9)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return time.perf_counter() - t0


def bench_online(p: Profile, work: Path, device: str) -> dict[str, Any]:
    from kdcache.dump import DumpConfig, dump_logits
    rows = []
    temps_all = [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 25.0, 30.0]
    for k in p.online_k:
        def cached() -> None:
            path = str(work / "online-teacher.zarr")
            dump_logits(DumpConfig(teachers=["mlp:1200,1200"], dataset="mnist:train", out=path, overwrite=True,
                                   subset=f"0:{p.mnist_rows}", device=device, progress=False))
            _train(work, device, p, path, temps_all[:k], f"cached-{k}")
        tc, to = interleave(cached, lambda: _online(k, p, device), 1 if k > 4 else max(1, p.reps - 1))
        rows.append({"K": k, "cached_s": tc, "online_s": to, "ratio": tc / to, "cached_s_per_student": tc / k})
    # per-student costs from the two smallest K, and the K from which caching wins
    (k1, c1, o1), (k2, c2, o2) = [(r["K"], r["cached_s"], r["online_s"]) for r in rows[:2]]
    cached_per, online_per = (c2 - c1) / (k2 - k1), (o2 - o1) / (k2 - k1)
    fixed = c1 - cached_per * k1
    breakeven = None if online_per <= cached_per else max(1, int(np.ceil(fixed / (online_per - cached_per))))
    if 16 not in [r["K"] for r in rows]:
        rows.append({"K": 16, "cached_s": fixed + 16 * cached_per, "online_s": 16 * online_per,
                     "ratio": (fixed + 16 * cached_per) / (16 * online_per),
                     "cached_s_per_student": fixed / 16 + cached_per, "extrapolated": True})
    return {"teacher": "mlp:1200,1200 (784-1200-1200-10)", "student": "mlp:800,800 (784-800-800-10)",
            "rows": p.mnist_rows, "epochs": p.epochs, "by_K": rows, "caching_wins_from_K": breakeven}


# -- 6. augmented views: cached against online consistent distillation -------------------------------
VIEWS_AUGMENT = "jitter:2"


def bench_views(p: Profile, work: Path, device: str) -> dict[str, Any]:
    """Views cost: a dump of V jittered views against V bare teacher passes over the plain inputs, and
    bytes per sample per view; then K students for ``epochs`` epochs, from a store of one view per
    epoch (dump included) against online consistent distillation (``train-student --teacher
    --augment``: the teacher on each augmented batch, one forward for all K stacked students)."""
    from kdcache.dump import DumpConfig, dump_logits
    from kdcache.train import TrainConfig, train_students
    epochs = 2 * p.epochs
    views = epochs
    rows = p.mnist_rows
    teacher = "mlp:1200,1200"
    plain = DumpConfig(teachers=[teacher], dataset="mnist:train", out=str(work / "plain.zarr"), subset=f"0:{rows}",
                       overwrite=True, device=device, progress=False)
    viewed = DumpConfig(**{**plain.__dict__, "out": str(work / "views.zarr"), "augment": VIEWS_AUGMENT,
                           "views": views})

    # the dump's fixed costs need a full pass to be measured against (as in bench_dump; quick: its rows)
    dump_rows = p.mnist_rows if p.quick else p.dump_rows
    big = DumpConfig(**{**plain.__dict__, "subset": f"0:{dump_rows}", "out": str(work / "views-big.zarr")})
    big_views = DumpConfig(**{**big.__dict__, "augment": VIEWS_AUGMENT, "views": views})
    bare = bare_pass(big, device)

    def bare_passes() -> None:
        for _ in range(views):
            bare()

    t_views, t_plain = interleave(lambda: dump_logits(big_views), bare_passes, 1 if p.quick else p.reps - 1)
    sizes = []
    for layout, extra in (("dense", {}), ("topk", {"k": 3})):
        cfg = DumpConfig(**{**viewed.__dict__, "out": str(work / f"size-{layout}.zarr"), "layout": layout, **extra})
        s = dump_logits(cfg)
        base = dump_logits(DumpConfig(**{**cfg.__dict__, "out": str(work / f"size-{layout}-plain.zarr"),
                                         "augment": None, "views": None}))
        sizes.append({"layout": layout + (" k=3" if extra else ""),
                      "bytes_per_sample_per_view": s.bytes_on_disk / s.rows,
                      "bytes_per_sample_without_views": base.bytes_on_disk / base.rows})
    by_k = []
    for k in (1, 4):
        seeds = list(range(k))

        def cached() -> None:
            dump_logits(viewed)
            train_students(TrainConfig(dataset="mnist:train", student="mlp:800,800", out=str(work / f"vc-{k}"),
                                       store=viewed.out, seeds=seeds, epochs=epochs, device=device, overwrite=True,
                                       progress=False))

        def online() -> None:
            train_students(TrainConfig(dataset="mnist:train", student="mlp:800,800", out=str(work / f"vo-{k}"),
                                       teachers=[teacher], augment=VIEWS_AUGMENT, views=views, subset=f"0:{rows}",
                                       seeds=seeds, epochs=epochs, device=device, overwrite=True, progress=False))

        def reuse() -> None:  # the store of an earlier experiment: training alone
            train_students(TrainConfig(dataset="mnist:train", student="mlp:800,800", out=str(work / f"vr-{k}"),
                                       store=viewed.out, seeds=seeds, epochs=epochs, device=device, overwrite=True,
                                       progress=False))

        tc, to, tr = interleave_all([cached, online, reuse], 1 if p.quick else p.reps - 1)
        by_k.append({"K": k, "cached_views_s": tc, "online_s": to, "ratio": tc / to, "store_reused_s": tr,
                     "reused_ratio": tr / to})
    return {"teacher": teacher, "augment": VIEWS_AUGMENT, "rows": rows, "dump_rows": dump_rows, "views": views,
            "epochs": epochs,
            "dump_views_s": t_views, "bare_passes_s": t_plain, "dump_per_view_over_bare_pass": t_views / t_plain,
            "sizes": sizes, "by_K": by_k}


# -- 7. a transformers teacher ---------------------------------------------------------------------
def _hf_teacher(work: Path, vocab: int, hidden: int, layers: int, paragraphs: int) -> tuple[str, str]:
    """A Llama-style teacher built from a config (random weights: the cost is what is measured) and a BPE
    tokenizer trained on kdcache's own documentation; returns (model spec, corpus path)."""
    import json as _json

    from kdcache.integrations.hf import _require, train_tokenizer
    transformers = _require()
    root = Path(__file__).resolve().parent.parent  # kdcache/
    texts = [t.strip() for f in (root.parent / "README.md", root / "store" / "FORMAT.md") if f.exists()
             for t in f.read_text().split("\n\n") if len(t.strip()) > 20]
    if not texts:
        from kdcache.errors import KdcacheError
        raise KdcacheError(f"the hf bench builds its corpus from kdcache's README.md and FORMAT.md, and found neither "
                           f"beside {root}; run it from a source checkout")
    texts = (texts * (paragraphs // max(1, len(texts)) + 1))[:paragraphs]
    corpus = work / "hf-corpus.jsonl"
    corpus.write_text("".join(_json.dumps({"text": t}) + "\n" for t in texts))
    path = work / "hf-teacher"
    train_tokenizer(str(corpus), 2000, path)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return f"hf:{path}", str(corpus)


def bench_hf(p: Profile, work: Path, device: str) -> dict[str, Any]:
    """dump-logits of a ``transformers`` causal LM (per-token rows) against its bare forward loop over the
    same batches, dense and top-k; tokens/s and bytes per token."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'kdcache[hf]')"}
    from torch.utils.data import DataLoader

    from kdcache.distributed import resolve_device
    from kdcache.dump import Batches, DumpConfig, SequenceChunkBatches, dump_logits, prepare, token_unit_chunks
    vocab, hidden, layers, paragraphs = (2048, 64, 2, 60) if p.quick else (32000, 512, 8, 200)
    teacher, corpus = _hf_teacher(work, vocab, hidden, layers, paragraphs)
    dev = resolve_device(device)
    rows = []
    for layout, extra in (("dense", {}), ("topk", {"k": 20})):
        cfg = DumpConfig(teachers=[teacher], dataset=f"hf-text:{corpus},seq=128", out=str(work / f"hf-{layout}.zarr"),
                         layout=layout, overwrite=True, device=device, progress=False, batch_size=32, **extra)
        from kdcache.datasets import with_tokenizer
        cfg.dataset = with_tokenizer(cfg.dataset, cfg.teachers)
        dataset, members, manifest, _, index = prepare(cfg, dev)
        module = members[0].module
        unit_rows = token_unit_chunks(manifest, cfg.batch_size) * manifest.chunk_rows
        units = list(range(-(-manifest.num_samples // unit_rows)))

        def bare() -> None:
            sampler = SequenceChunkBatches(index, units, unit_rows, cfg.batch_size)
            loader = DataLoader(Batches(dataset.dataset), sampler=sampler, batch_size=None)
            with torch.inference_mode():
                for _, _, x, _, _ in loader:
                    module(x.to(dev))

        summary: list[Any] = []
        td, tb = interleave(lambda: summary.append(dump_logits(cfg)), bare, 1 if p.quick else p.reps)
        tokens = manifest.num_samples
        rows.append({"layout": layout + (" k=20" if extra else ""), "vocab": vocab, "tokens": tokens, "dump_s": td,
                     "bare_forward_s": tb, "ratio": td / tb, "tokens_per_s": tokens / td,
                     "bytes_per_token": summary[-1].bytes_on_disk / tokens, "goal": 1.10})
    stores = {r["layout"]: str(work / f"hf-{r['layout'].split()[0]}.zarr") for r in rows}
    return {"teacher": f"Llama-style, hidden {hidden}, {layers} layers, vocab {vocab}", "rows": rows,
            "trainer": bench_hf_trainer(p, work, device, stores)}


def bench_hf_trainer(p: Profile, work: Path, device: str, stores: dict[str, str]) -> dict[str, Any]:
    """``transformers.Trainer`` step time of the DistillationTrainer (store rows, T = 2, alpha = 0.9) against
    the same Trainer without distillation (the model's own next-token loss): the same student, data,
    collator and batch size, runs alternated; the time per step after the first (set-up excluded)."""
    import statistics

    import transformers

    from kdcache.distributed import resolve_device
    from kdcache.integrations.hf_trainer import DistillationTrainer, StoreCollator, StoreDataset
    from kdcache.store import open_store
    # the full profile's student has half the teacher's layers (DistilBERT's recipe); the quick one is small
    hidden, layers, steps, batch = (128, 2, 8, 8) if p.quick else (512, 4, 12, 8)
    cpu = resolve_device(device).type == "cpu"

    class StepClock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    rows = []
    for layout, store in stores.items():
        data = StoreDataset(store)
        classes = open_store(store).num_classes  # the teacher's (padded) vocabulary, as the student's
        config = transformers.LlamaConfig(vocab_size=classes, hidden_size=hidden,
                                          intermediate_size=4 * hidden, num_hidden_layers=layers,
                                          num_attention_heads=max(1, hidden // 64), max_position_embeddings=512)
        torch.manual_seed(0)
        init = transformers.AutoModelForCausalLM.from_config(config).state_dict()

        def step_seconds(distil: bool) -> float:
            model = transformers.AutoModelForCausalLM.from_config(config)
            model.load_state_dict(init)
            clock = StepClock()
            args = transformers.TrainingArguments(output_dir=str(work / "hf-trainer"), report_to="none",
                                                  save_strategy="no", logging_strategy="no", max_steps=steps,
                                                  per_device_train_batch_size=batch, use_cpu=cpu, disable_tqdm=True)
            kw = {"store": store, "temperature": 2.0, "alpha": 0.9} if distil else {}
            trainer = (DistillationTrainer if distil else transformers.Trainer)(
                model=model, args=args, train_dataset=data, data_collator=StoreCollator(data.pad_id),
                callbacks=[clock], **kw)
            trainer.remove_callback(transformers.PrinterCallback)  # it prints every log line
            trainer.train()
            return (clock.ends[-1] - clock.ends[0]) / (len(clock.ends) - 1)

        times: dict[bool, list[float]] = {True: [], False: []}
        step_seconds(True)  # warm-up: the page cache, torch's first kernels
        for _ in range(p.reps):
            for distil in (True, False):
                times[distil].append(step_seconds(distil))
        td, tp = statistics.median(times[True]), statistics.median(times[False])
        rows.append({"layout": layout, "student": f"hidden {hidden}, {layers} layers",
                     "batch": f"{batch}x{data.data.seq}", "distil_step_s": td, "plain_step_s": tp,
                     "ratio": td / tp, "goal": 1.10})
    return {"rows": rows}


# -- 8. storage ---------------------------------------------------------------------------------
def bench_storage(p: Profile, work: Path, device: str, teacher: str | None) -> list[dict[str, Any]]:
    """Bytes per sample on real logits of an MNIST teacher (``teacher``, or one trained briefly here)."""
    from kdcache.dump import DumpConfig, dump_logits
    teacher = teacher or str(_bench_teacher(p, work, device))
    out = []
    for fmt, dtype, codec in (("zarr", "float16", "none"), ("zarr", "float16", "zstd"), ("zarr", "float32", "none"),
                              ("zarr", "float32", "zstd"), ("hdf5", "float16", "none"), ("hdf5", "float16", "gzip")):
        path = work / f"storage-{dtype}-{codec}.{'zarr' if fmt == 'zarr' else 'h5'}"
        s = dump_logits(DumpConfig(teachers=[str(teacher)], dataset="mnist:test", out=str(path), dtype=dtype,
                                   compression=codec, overwrite=True, device=device, progress=False))
        out.append({"backend": fmt, "dtype": dtype, "compression": codec, "rows": s.rows,
                    "bytes_per_sample": s.bytes_on_disk / s.rows, "reference_C_x_M_x_2": 10 * 1 * 2})
    return out


# -- 7. sparse layouts: what top-k keeps, with and without the exact tail ------------------------
def long_tail_logits(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    """A synthetic teacher with a realistic long tail: Gaussian logits (std 2.5) over every class plus
    a handful of strongly preferred classes per row."""
    g = np.random.default_rng(seed)
    z = g.normal(0, 2.5, (rows, classes))
    for j in range(5):
        z[np.arange(rows), g.integers(0, classes, rows)] += g.uniform(4, 10, rows) / (j + 1)
    return z.astype(np.float32)


def topk_fidelity(z: np.ndarray, ks: list[int], temperatures: list[float]) -> list[dict[str, Any]]:
    """For each k and T: bytes per row; KL(p_T || p^) where p^ keeps the top-k exactly and spreads the exact
    tail mass evenly (kdcache), and KL(p^_renorm || p_T) for top-k renormalised without a tail (other
    tools; KL(p_T || p^_renorm) is infinite: the tail gets probability zero)."""
    out = []
    rows, classes = z.shape
    z64 = z.astype(np.float64)
    order = np.argsort(-z64, axis=1)
    for k in ks:
        if k > classes:
            continue
        kept = order[:, :k]
        for t in temperatures:
            logp = teacher_log_probs(torch.from_numpy(z64)[:, None], t).numpy()
            p = np.exp(logp)
            pk = np.take_along_axis(p, kept, 1)
            tail = np.clip(1 - pk.sum(1), 0, 1)
            mask = np.ones_like(p, dtype=bool)
            np.put_along_axis(mask, kept, False, 1)
            if k < classes:
                spread = np.where(mask, (tail / (classes - k))[:, None], 0.0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    kl_tail = np.where(mask & (p > 0), p * (logp - np.log(np.maximum(spread, 1e-300))), 0.0).sum(1)
            else:
                kl_tail = np.zeros(rows)
            kl_renorm = -np.log(np.clip(1 - tail, 1e-300, None))
            out.append({"k": k, "T": t, "bytes_per_row_topk": k * (2 + 4) + len(temperatures) * 4,
                        "bytes_per_row_dense": classes * 2, "tail_mass": float(tail.mean()),
                        "kl_full_vs_topk_with_tail": float(kl_tail.mean()),
                        "kl_topk_renormalised_vs_full": float(kl_renorm.mean()),
                        "kl_full_vs_topk_renormalised": float("inf") if tail.max() > 0 else 0.0})
    return out


def store_fidelity(path: str, rows: int = 4000, ks: tuple[int, ...] = (1, 5, 20, 100),
                   temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 20.0)) -> dict[str, Any]:
    """:func:`topk_fidelity` on the first ``rows`` rows (member 0) of a dense store: real teacher logits."""
    from kdcache.errors import StoreError
    from kdcache.store import open_store
    store = open_store(path)
    m = store.manifest
    if not m.store_layout.keeps_every_logit:
        raise StoreError(f"--logits {path}: a {m.layout} store; top-k fidelity is measured against dense logits")
    blk = store.read(0, min(rows, m.num_samples))
    z = m.store_layout.targets({k: blk.data[k] for k in m.logit_arrays}).numpy()[:, 0]
    store.close()
    return {"store": path, "classes": m.num_classes, "rows": len(z), "per_token": m.per_token,
            "teacher": m.members[0]["spec"], "dataset": m.dataset["spec"],
            "table": topk_fidelity(z, list(ks), list(temperatures))}


def bench_sparse(p: Profile, work: Path, device: str, teacher: str | None) -> dict[str, Any]:
    from kdcache.dump import DumpConfig, dump_logits
    from kdcache.store import open_store
    temps = [1.0, 2.0, 4.0, 8.0, 20.0]
    if teacher is None:
        teacher = str(_bench_teacher(p, work, device))
    path = str(work / "sparse-mnist.zarr")
    dump_logits(DumpConfig(teachers=[teacher], dataset="mnist:test", out=path, dtype="float32", overwrite=True,
                           device=device, progress=False))
    z_mnist = open_store(path).read(0, 10_000).logits[:, 0]
    z_tail = long_tail_logits(1000 if p.quick else 4000, 5000)
    return {"mnist_teacher": teacher, "mnist": topk_fidelity(z_mnist, [1, 5], temps),
            "long_tail_5000": topk_fidelity(z_tail, [1, 5, 20, 100], temps)}


def _bench_teacher(p: Profile, work: Path, device: str) -> Path:
    from kdcache.train import TrainConfig, train_students
    teacher = work / "bench-teacher"
    if not (teacher / "model.safetensors").exists():
        train_students(TrainConfig(dataset="mnist:train", student="mlp:1200,1200", out=str(teacher), epochs=1,
                                   subset=f"0:{p.mnist_rows}", device=device, overwrite=True, progress=False))
    return teacher


def run_bench(quick: bool = False, only: list[str] | None = None, device: str = "auto",
              json_path: str | None = None, echo: Callable[[str], None] = print,
              teacher: str | None = None, logit_stores: list[str] | None = None,
              reps: int | None = None) -> dict[str, Any]:
    """Run the benchmarks named in ``only`` (all by default), print a table each, return (and write) JSON."""
    p = QUICK if quick else FULL
    if reps:
        p = dataclasses.replace(p, reps=reps)
    chosen = only or list(BENCHES)
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        from kdcache.errors import KdcacheError
        raise KdcacheError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    result: dict[str, Any] = {
        "kdcache_version": __version__, "date": time.strftime("%Y-%m-%d"), "quick": quick, "reps": p.reps,
        "device": device,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        work = Path(tmp)
        shared: dict[str, Any] = {}  # what several benchmarks use: the MNIST teacher's store
        for name in chosen:
            t0 = time.perf_counter()
            r = _measure(name, p, work, device, teacher, logit_stores or [], shared)
            _show(name, r, echo)
            result[name] = r
            result.setdefault("seconds", {})[name] = time.perf_counter() - t0
    result["total_seconds"] = time.perf_counter() - t_all
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def _measure(name: str, p: Profile, work: Path, device: str, teacher: str | None, logit_stores: list[str],
             shared: dict[str, Any]) -> Any:
    """The figures of benchmark ``name``."""
    if name == "store_read":
        return bench_store_read(p, work)
    if name == "dump":
        return {"ratio": bench_dump(p, work, device), "memory": peak_rss(p.rss_rows, work, device)}
    if name in ("train", "sweep"):
        store = shared["store"] = shared.get("store") or _teacher_store(p, work, device)
        return bench_train(p, work, device, store) if name == "train" else bench_sweep(p, work, device, store)
    if name == "online":
        return bench_online(p, work, device)
    if name == "views":
        return bench_views(p, work, device)
    if name == "hf":
        return bench_hf(p, work, device)
    if name == "s3":
        from kdcache.bench.remote import bench_s3
        return bench_s3(p, work, device)
    if name == "vision":
        from kdcache.bench.vision import FULL as VISION_FULL
        from kdcache.bench.vision import QUICK as VISION_QUICK
        from kdcache.bench.vision import bench_vision
        vp = VISION_QUICK if p.quick else VISION_FULL
        return bench_vision(dataclasses.replace(vp, reps=min(vp.reps, p.reps)), work, device)
    if name == "sparse":
        r = bench_sparse(p, work, device, teacher)
        r["stores"] = [store_fidelity(s) for s in logit_stores]
        return r
    return bench_storage(p, work, device, teacher)


def _show(name: str, r: Any, echo: Callable[[str], None]) -> None:
    """Print benchmark ``name``'s figures as tables."""
    if isinstance(r, dict) and "skipped" in r:
        echo(f"{name}: skipped: {r['skipped']}\n")
    elif name == "store_read":
        echo(_table("store read: block reads and shuffled stream, against np.memmap of the same bytes", r,
                    ["backend", "dtype", "compression", "block_MBps", "memmap_MBps", "block_ratio",
                     "stream_rows_per_s", "memmap_stream_rows_per_s", "stream_ratio"]))
    elif name == "dump":
        echo(_table("dump-logits against a bare teacher-inference loop over the same DataLoader (goal <= 1.05)",
                    r["ratio"], ["teacher", "rows", "dump_s", "bare_inference_s", "ratio"]))
        mem = r["memory"]
        echo(f"  peak RSS: {mem['peak_rss_MiB'][0]:.0f} MiB at {mem['rows'][0]} rows, "
             f"{mem['peak_rss_MiB'][1]:.0f} MiB at {mem['rows'][1]} rows (1000 classes; the 10N store is "
             f"{mem['store_MB_at_10N']:.0f} MB); ratio {mem['ratio_10N_over_N']:.2f}\n")
    elif name == "train":
        echo(_table("distilled training from a store against plain supervised training (goal <= 1.03)", [r], list(r)))
    elif name == "sweep":
        echo(_table("a sweep in one stacked pass (and in one pass, one student after another) against separate runs",
                    r, list(r[0])))
    elif name == "online":
        echo(_table(f"cached (one dump + K students from the store) against online distillation "
                    f"(teacher {r['teacher']}, student {r['student']}, {r['rows']} rows, {r['epochs']} epoch)",
                    r["by_K"], ["K", "cached_s", "online_s", "ratio", "cached_s_per_student", "extrapolated"]))
        echo(f"  caching wins from K = {r['caching_wins_from_K']}\n")
    elif name == "views":
        echo(_table(f"augmented views ({r['augment']}, {r['views']} views of {r['dump_rows']} rows, teacher "
                    f"{r['teacher']}): dump of the views against {r['views']} bare teacher passes over the "
                    f"plain rows", [r], ["dump_views_s", "bare_passes_s", "dump_per_view_over_bare_pass"]))
        echo(_table("  bytes per sample per view", r["sizes"],
                    ["layout", "bytes_per_sample_per_view", "bytes_per_sample_without_views"]))
        echo(_table(f"  K students of 784-800-800-10, {r['epochs']} epochs: a store of one view per epoch "
                    f"(dump included) against online consistent distillation (teacher on every batch)",
                    r["by_K"], ["K", "cached_views_s", "online_s", "ratio", "store_reused_s", "reused_ratio"]))
    elif name == "hf":
        echo(_table(f"dump-logits of a transformers causal LM ({r['teacher']}) against its bare forward "
                    f"loop over the same batches (goal <= 1.10)", r["rows"],
                    ["layout", "tokens", "dump_s", "bare_forward_s", "ratio", "tokens_per_s", "bytes_per_token"]))
        echo(_table("transformers.Trainer step: DistillationTrainer from the store against the same Trainer "
                    "without distillation (goal <= 1.10)", r["trainer"]["rows"],
                    ["layout", "student", "batch", "distil_step_s", "plain_step_s", "ratio"]))
    elif name == "s3":
        echo(_table(f"shuffled stream of a store in S3 (loopback endpoint, {r['rows']} rows x {r['classes']} "
                    f"classes, {r['store_MB']:.0f} MB) against the same store on local disk", r["stream"],
                    ["side", "seconds", "rows_per_s", "s3_over_local_throughput", "server_cpu_s", "client_cpu_s",
                     "cores_busy", "goal"]))
        echo(_table("dump-logits to S3 against dump-logits to local disk", [r["dump"]],
                    ["teacher", "rows", "local_s", "s3_s", "s3_over_local", "goal"]))
    elif name == "sparse":
        kl = ["k", "T", "bytes_per_row_topk", "bytes_per_row_dense", "tail_mass", "kl_full_vs_topk_with_tail",
              "kl_topk_renormalised_vs_full", "kl_full_vs_topk_renormalised"]
        for key, title in (("mnist", "MNIST teacher, 10 classes"),
                           ("long_tail_5000", "synthetic long-tail teacher, 5000 classes")):
            echo(_table(f"sparse top-k ({title}): KL to the full p_T, with the exact tail bucket against "
                        f"top-k renormalised without it", r[key], kl))
        for f in r["stores"]:
            echo(_table(f"sparse top-k ({f['teacher']} on {f['dataset']}, {f['classes']} classes, first "
                        f"{f['rows']} {'positions' if f['per_token'] else 'rows'} of {f['store']})", f["table"], kl))
    elif name == "vision":
        from kdcache.bench.vision import show
        show(r, echo, _table)
    elif name == "storage":
        echo(_table("storage: bytes per sample on real MNIST teacher logits (10 classes, 1 member)", r,
                    ["backend", "dtype", "compression", "bytes_per_sample", "reference_C_x_M_x_2"]))


def _table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title, "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n"
