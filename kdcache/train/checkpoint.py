"""Resumable training: the whole state of a ``train-student`` run, written at epoch ends (and every N
steps), read back when the same command runs again.

``OUT/resume/ckpt-<epoch>-<step>/`` (the epoch it is in, the steps of it done) holds
``students.safetensors`` (every student's trainable weights, buffers and optimizer state, under
canonical names; a LoRA student's frozen base is not saved), ``rank-<r>.safetensors`` (each process's RNG states,
data position and the epoch's running sums) and ``state.json``, written last: the command's
identity, epoch, step, metrics so far and the sha256 of every file. A directory without a valid
``state.json`` is not a checkpoint. The two newest checkpoints are kept, so that a damaged newest
one (a checksum that does not match) falls back to the one before, and the log says so. Nothing is
pickled: tensors are safetensors, the rest JSON.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from kdcache.distributed import DistInfo
from kdcache.errors import KdcacheError

CHECKPOINT_FORMAT = 1
RESUME_DIR = "resume"
KEEP = 2


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    # slices of one stacked tensor share its storage, which safetensors refuses: each gets its own copy
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _name(epoch: int, step: int) -> str:
    return f"ckpt-{epoch:05d}-{step:09d}"


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class Checkpoints:
    """The resume checkpoints of one ``--out`` directory.

    Args:
        out: the run's ``--out``.
        identity: what the command trains (:meth:`TrainConfig.identity`); a checkpoint of another
            identity is refused.
        info: the torch.distributed rank and world size.
        log: where notes go (stderr by default).
    """

    def __init__(self, out: Path, identity: dict[str, Any], info: DistInfo,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
        self.root = out / RESUME_DIR
        self.identity = json.loads(json.dumps(identity))  # as it reads back from JSON
        self.info, self.log = info, log

    def exists(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("ckpt-*/state.json"))

    def clear(self) -> None:
        if self.info.is_main and self.root.exists():
            shutil.rmtree(self.root)

    def _candidates(self) -> list[Path]:
        return sorted((p for p in self.root.glob("ckpt-*") if p.is_dir()), reverse=True)

    def _check(self, d: Path) -> dict[str, Any]:
        """The state of checkpoint ``d``, or KdcacheError: refused (another command or format) or
        ValueError: damaged."""
        try:
            state = json.loads((d / "state.json").read_text())
        except FileNotFoundError:
            raise ValueError("no state.json (it was being written when the process stopped)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("state.json is not JSON") from None
        if not isinstance(state, dict) or "kdcache_checkpoint" not in state:
            raise ValueError("state.json is not a kdcache checkpoint")
        if state["kdcache_checkpoint"] != CHECKPOINT_FORMAT:
            raise KdcacheError(f"{d} is a checkpoint of format {state['kdcache_checkpoint']} (another kdcache "
                               f"release); this one reads format {CHECKPOINT_FORMAT}: pass {{param:overwrite}} to "
                               f"start "
                               f"afresh, or resume with the release that wrote it")
        if state["identity"] != self.identity:
            diff = sorted(k for k in set(state["identity"]) | set(self.identity)
                          if state["identity"].get(k) != self.identity.get(k))
            raise KdcacheError(f"{self.root.parent} holds a checkpoint of another train-student command (it differs "
                               f"in {', '.join(diff)}); rerun that command to resume it, pass {{param:overwrite}} "
                               f"to start "
                               f"afresh, or choose another {{param:out}}")
        if state["world_size"] != self.info.world_size:
            raise KdcacheError(f"{d} was written by {state['world_size']} process(es), this run has "
                               f"{self.info.world_size}; resume with as many (torchrun {{param:nproc_per_node}}), "
                               f"or pass "
                               f"{{param:overwrite}} to start afresh")
        for name, digest in state["files"].items():
            f = d / name
            if not f.exists():
                raise ValueError(f"{name} is missing")
            if _sha256(f) != digest:
                raise ValueError(f"{name} does not match its sha256 (truncated or corrupt)")
        return state

    def find(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest good checkpoint (every rank gets the one rank 0 chose), or None."""
        chosen, state = None, None
        if self.info.is_main and self.root.is_dir():
            for d in self._candidates():
                try:
                    state = self._check(d)
                except ValueError as e:
                    if (d / "state.json").exists():
                        self.log(f"warning: checkpoint {d} is damaged ({e}); using the one before it")
                    continue
                chosen = d
                break
            if chosen is None and self.exists():
                self.log(f"warning: no readable checkpoint in {self.root}; training starts from the beginning")
        if self.info.enabled:
            import torch.distributed as dist
            t = torch.tensor([int(x) for x in chosen.name.split("-")[1:]] if chosen else [-1, -1])
            dist.broadcast(t, 0)
            if int(t[0]) < 0:
                return None
            chosen = self.root / _name(int(t[0]), int(t[1]))
            state = json.loads((chosen / "state.json").read_text())
        return (chosen, state) if chosen is not None else None

    def load(self, d: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the students' tensors, this rank's tensors) of checkpoint ``d``."""
        from safetensors.torch import load_file
        return load_file(str(d / "students.safetensors")), load_file(str(d / f"rank-{self.info.rank}.safetensors"))

    def save(self, epoch: int, step: int, shared: dict[str, torch.Tensor], mine: dict[str, torch.Tensor],
             state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` steps into ``epoch``: tensors first (every rank its own file),
        ``state.json`` last (rank 0). Every rank calls it at the same (epoch, step)."""
        d = self.root / _name(epoch, step)
        if self.info.is_main:
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
        self.info.barrier()
        _save_tensors(mine, d / f"rank-{self.info.rank}.safetensors")
        if self.info.is_main:
            _save_tensors(shared, d / "students.safetensors")
        self.info.barrier()
        if self.info.is_main:
            from kdcache._version import __version__
            files = ["students.safetensors", *(f"rank-{r}.safetensors" for r in range(self.info.world_size))]
            _write_json({"kdcache_checkpoint": CHECKPOINT_FORMAT, "kdcache_version": __version__,
                         "identity": self.identity, "world_size": self.info.world_size, "epoch": epoch,
                         "step": step, **state,
                         "files": {f: _sha256(d / f) for f in files}}, d / "state.json")
            for old in self._candidates()[KEEP:]:
                shutil.rmtree(old, ignore_errors=True)
        self.info.barrier()
        return d

