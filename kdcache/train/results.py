"""What a training run leaves on disk: per run a checkpoint, config.json and metrics.json; per sweep
summary.json and summary.md."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from kdcache.datasets import ResolvedDataset
from kdcache.specs import save_checkpoint
from kdcache.train.config import TrainConfig
from kdcache.train.students import Student


def write_run(r: Student, module: nn.Module, c: TrainConfig, arch: str, input_shape: tuple[int, ...],
              num_classes: int, store_ident: dict[str, Any] | None, data: ResolvedDataset) -> dict[str, Any]:
    """Write one run's checkpoint, config.json and metrics.json; return its line of the summary."""
    r.out.mkdir(parents=True, exist_ok=True)
    config = {**asdict(c), "run": r.name, "soft_loss": r.loss if c.distills else None, "temperature": r.temperature,
              "alpha": r.alpha, "seed": r.seed, "lr": r.lr, "arch": arch, "input_shape": list(input_shape),
              "num_classes": num_classes, "store_identity": store_ident, "dataset_identity": data.describe()}
    for k in ("losses", "temperatures", "alphas", "seeds", "lrs", "overwrite", "progress"):
        config.pop(k)
    tokenizer = getattr(data.dataset, "tokenizer", None)
    if c.lora is not None:  # adapter/ for peft; the checkpoint and hf/ hold the student merged into its base
        from kdcache.integrations.lora import save_lora
        module = save_lora(module, r.out, tokenizer)
    save_checkpoint(module, r.out, arch, input_shape, num_classes,
                    extra={"dropout": c.dropout, "run": r.name, "soft_loss": r.loss if c.distills else None,
                           "temperature": r.temperature, "alpha": r.alpha,
                           "seed": r.seed, "lr": r.lr, "store": c.store,
                           "preprocess": data.describe().get("preprocess")})
    from kdcache.integrations.hf import save_pretrained
    save_pretrained(module, r.out, tokenizer)  # hf: students, for plain transformers
    from kdcache.vision.models import save_library_files
    # timm's hub keys join kdcache's (timm reads the run directory); an image classifier gets hf/
    config = {**save_library_files(module, r.out, arch, data.describe().get("preprocess")), **config}
    (r.out / "config.json").write_text(json.dumps(config, indent=2))
    (r.out / "metrics.json").write_text(json.dumps(r.history, indent=2))
    final = {("last_lr" if k == "lr" else k): v for k, v in r.history[-1].items()}  # lr: the configured one
    return {"run": r.name, "dir": str(r.out), "student": c.student, "teacher": (store_ident or {}).get("members"),
            "soft_loss": r.loss if c.distills else None, "temperature": r.temperature if c.distills else None,
            "alpha": r.alpha, "seed": r.seed,
            "lr": r.lr, "epochs": c.epochs, "wall_seconds": sum(h["seconds"] for h in r.history), **final}


def write_summary(out: Path, results: list[dict[str, Any]], c: TrainConfig) -> None:
    """summary.json and summary.md of the runs in ``out``: runs trained earlier into the same sweep
    directory (and not retrained now) are kept."""
    out.mkdir(parents=True, exist_ok=True)
    old = out / "summary.json"
    if old.exists():
        new = {r["run"] for r in results}
        kept = [r for r in json.loads(old.read_text()) if r["run"] not in new and Path(r["dir"]).exists()]
        results = sorted(kept + results, key=lambda r: (r["temperature"] or 0, r["alpha"], r["seed"], r.get("lr") or 0))
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(format_table(results) + "\n")


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of runs; a learning-rate sweep adds the lr, token-level runs (sequence data) the
    eval perplexity."""
    ppl = any(r.get("eval_perplexity") is not None for r in results)
    lrs = len({r.get("lr") for r in results}) > 1
    losses = any(r.get("soft_loss") == "logit-mse" for r in results)
    head = ("| run |" + (" soft loss |" if losses else "") + " T | alpha | seed |" + (" lr |" if lrs else "")
            + " loss | train acc | eval acc | eval errors | teacher agreement |"
            + (" eval perplexity |" if ppl else ""))
    rows = [head, "|" + "---|" * (9 + ppl + lrs + losses)]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in results:
        name = r["run"] + (" (diverged)" if r.get("diverged") else "")
        rows.append(f"| {name} |" + (f" {r.get('soft_loss') or '-'} |" if losses else "")
                    + f" {f(r['temperature'], 'g')} | {f(r['alpha'], 'g')} | {r['seed']} |"
                    + (f" {f(r.get('lr'), 'g')} |" if lrs else "")
                    + f" {f(r['loss'], '.4f')} | {f(r['train_accuracy'], '.4f')} | "
                    f"{f(r.get('eval_accuracy'), '.4f')} | "
                    f"{f(r.get('eval_errors'), 'd')} | {f(r.get('teacher_agreement'), '.4f')} |"
                    + (f" {f(r.get('eval_perplexity'), '.2f')} |" if ppl else ""))
    return "\n".join(rows)
