"""Model specs: ``mlp:1200,1200``, ``package.module:callable``, a kdcache checkpoint, a TorchScript file.

Weights never load through pickle: checkpoints are safetensors with a JSON header describing the
architecture, so a checkpoint written by ``train-student`` is accepted by ``--teacher`` and ``--student``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcache.datasets import ResolvedDataset, get_batch
from kdcache.errors import SpecError
from kdcache.models import MLP, LSTMTagger
from kdcache.spec_syntax import import_callable, parse_kv
from kdcache.text import is_sequence_dataset

CHECKPOINT_NAME = "model.safetensors"
CHECKPOINT_KEY = "kdcache"


@dataclass
class ResolvedModel:
    module: nn.Module
    spec: str          # what the user passed
    arch: str          # the architecture spec a checkpoint records (e.g. "mlp:800,800")
    name: str

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "spec": self.spec, "sha256": weights_sha256(self.module)}


def weights_sha256(module: nn.Module) -> str:
    """sha256 of the state dict: names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k};{t.dtype};{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too (BatchNorm)
    return h.hexdigest()


def _build_arch(arch: str, input_shape: tuple[int, ...] | None, num_classes: int | None,
                dropout: float, input_dropout: float = 0.0) -> nn.Module:
    kind, _, rest = arch.partition(":")
    if kind == "hf":
        from kdcache.integrations.hf import build_model
        return build_model(arch, num_classes)
    if kind == "mlp":
        if input_shape is None or num_classes is None:
            raise SpecError(f"model spec {arch!r} takes its input and output sizes from the dataset, "
                            f"and the dataset did not say its number of classes")
        try:
            hidden = [int(h) for h in rest.split(",") if h.strip()]
        except ValueError:
            raise SpecError(f"model spec {arch!r}: hidden sizes must be integers, e.g. mlp:1200,1200") from None
        if any(h < 1 for h in hidden):
            raise SpecError(f"model spec {arch!r}: hidden sizes must be positive")
        return MLP(input_shape, hidden, num_classes, dropout, input_dropout)
    if kind == "lstm":
        return _build_lstm(arch, rest, num_classes, dropout)
    if ":" in arch and "." in kind or kind.isidentifier() and rest:
        model = import_callable(arch, "model")()
        if not isinstance(model, nn.Module):
            raise SpecError(f"model spec {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise SpecError(f"unknown model spec {arch!r}; use mlp:H1,H2,..., lstm:EMBED,HIDDEN, hf:PATH, "
                    f"package.module:callable, "
                    f"a kdcache checkpoint ({CHECKPOINT_NAME} or its run directory) or a TorchScript file")


def _build_lstm(arch: str, rest: str, num_classes: int | None, dropout: float) -> nn.Module:
    """``lstm:EMBED,HIDDEN[,layers=N][,vocab=V]``: V (input token ids) defaults to the classes."""
    usage = "e.g. lstm:256,512 or lstm:256,512,layers=2,vocab=8192"
    try:
        kv = parse_kv(rest, ("embed", "hidden"))
        sizes = {k: int(kv.pop(k)) for k in ("embed", "hidden", "layers", "vocab") if k in kv}
    except (SpecError, ValueError):
        raise SpecError(f"model spec {arch!r}: sizes must be integers, {usage}") from None
    if kv or "embed" not in sizes or "hidden" not in sizes or min(sizes.values()) < 1:
        raise SpecError(f"model spec {arch!r}: give positive EMBED and HIDDEN sizes (keys layers, vocab optional), "
                        f"{usage}")
    if num_classes is None:
        raise SpecError(f"model spec {arch!r} takes its number of classes from the dataset, which did not say it")
    return LSTMTagger(sizes.get("vocab", num_classes), sizes["embed"], sizes["hidden"], num_classes,
                      sizes.get("layers", 1), dropout)


def load_model(spec: str, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
               dropout: float = 0.0, input_dropout: float = 0.0, seed: int = 0) -> ResolvedModel:
    """Build (fresh, initialised from ``seed``) or load (checkpoint, TorchScript) the model a spec names."""
    path = Path(spec)
    if path.is_dir() and (path / CHECKPOINT_NAME).exists():
        path = path / CHECKPOINT_NAME
    if path.suffix == ".safetensors":
        return load_checkpoint(path, spec)
    if path.suffix == ".pt2":
        return ResolvedModel(_load_exported(path, spec), spec, spec, path.stem)
    if path.suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
        if not path.exists():
            raise SpecError(f"model file {spec!r} does not exist")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise SpecError(f"{spec} is not a TorchScript file ({str(e).splitlines()[0]}); save models with "
                            f"torch.jit.save, or use a kdcache checkpoint ({CHECKPOINT_NAME})") from None
        return ResolvedModel(module, spec, spec, path.stem)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # a fresh built-in model is the same model on every run and rank
        module = _build_arch(spec, input_shape, num_classes, dropout, input_dropout)
    name = Path(spec[3:].split(",")[0]).name if spec.startswith("hf:") else spec
    return ResolvedModel(module, spec, spec, name)


class _Exported(nn.Module):
    """A ``torch.export`` program as a module. Exported programs refuse ``train()``/``eval()``: they are
    inference graphs already, so switching modes here is a no-op."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> "_Exported":
        self.training = mode
        return self

    def forward(self, *args: Any) -> Any:
        return self.program(*args)


def _load_exported(path: Path, spec: str) -> nn.Module:
    """A model saved with ``torch.export.save``, loaded with pickle restricted to tensors: torch's own
    loader falls back to unrestricted unpickling for custom objects, which is forced off here."""
    if not path.exists():
        raise SpecError(f"model file {spec!r} does not exist")
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    import logging
    quiet = [logging.getLogger(n) for n in ("torch.export", "torch._export.serde.serialize")]
    levels = [q.level for q in quiet]
    for q in quiet:  # torch logs a traceback before raising; the error below is the one line
        q.setLevel(logging.CRITICAL)
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise SpecError(f"{spec} is not a torch.export program kdcache can load safely ({str(e).splitlines()[0]}); "
                        f"save it with torch.export.save (tensors and graph only, no custom objects)") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    return _Exported(program.module())


def save_checkpoint(module: nn.Module, path: str | os.PathLike, arch: str, input_shape: tuple[int, ...],
                    num_classes: int, extra: dict[str, Any] | None = None) -> Path:
    """Write ``module``'s weights as safetensors with the architecture in the header."""
    from safetensors.torch import save_file

    from kdcache._version import __version__
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "input_shape": list(input_shape), "num_classes": num_classes,
            "kdcache_version": __version__, **(extra or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={CHECKPOINT_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise SpecError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as e:
        raise SpecError(f"{path} is not a readable safetensors file ({e})") from None
    if CHECKPOINT_KEY not in meta:
        raise SpecError(f"{path} has no kdcache header; it was not written by kdcache train-student, "
                        f"so its architecture is unknown: load it from your own package.module:callable")
    return json.loads(meta[CHECKPOINT_KEY])


def load_checkpoint(path: str | os.PathLike, spec: str | None = None) -> ResolvedModel:
    from safetensors.torch import load_file
    meta = read_checkpoint_meta(path)
    module = _build_arch(meta["arch"], tuple(meta["input_shape"]), meta["num_classes"], meta.get("dropout", 0.0))
    state = load_file(str(path))
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f"{path}: weights do not fit architecture {meta['arch']!r} "
                        f"({str(e).splitlines()[0]})") from None
    return ResolvedModel(module, spec or str(path), meta["arch"], Path(path).parent.name or meta["arch"])


def num_classes_of(members: list[ResolvedModel], dataset: ResolvedDataset, device: torch.device) -> int:
    """The teachers' number of classes, tried on the dataset's first inputs: refused with one line when a
    teacher fails on them, returns the wrong shape, or the members disagree."""
    x, _ = get_batch(dataset.dataset, np.arange(min(2, len(dataset))))
    per_token = is_sequence_dataset(dataset.dataset)
    counts = []
    with torch.inference_mode():
        for m in members:
            want = ("[batch, length, classes] logits for a sequence dataset (inputs " + str(tuple(x.shape)) + ")"
                    if per_token else "[batch, classes] logits")
            try:
                out = m.module(x.to(device))
            except Exception as e:
                raise SpecError(f"teacher {m.spec!r} fails on the dataset's inputs {tuple(x.shape)} {x.dtype} "
                                f"({str(e).splitlines()[0]}); a teacher must return {want}") from None
            if out.ndim != (3 if per_token else 2) or per_token and out.shape[1] != x.shape[1]:
                raise SpecError(f"teacher {m.spec!r} returns shape {tuple(out.shape)}; a teacher must return {want}")
            counts.append(out.shape[-1])
    if len(set(counts)) > 1:
        first = counts[0]
        bad = next(i for i, c in enumerate(counts) if c != first)
        raise SpecError(f"ensemble members disagree on the number of classes: teacher {members[bad].spec!r} "
                        f"(member {bad}) gives {counts[bad]}, teacher {members[0].spec!r} gives {first}")
    if dataset.num_classes is not None and counts[0] < dataset.num_classes:
        raise SpecError(f"teacher {members[0].spec!r} gives {counts[0]} classes but dataset {dataset.spec!r} "
                        f"has {dataset.num_classes}")
    return counts[0]
