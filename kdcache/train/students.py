"""A student's state in one object, and the students trained one by one (each its own module and optimizer).

Every unit of training (one student here, a stack of students in :mod:`kdcache.train.stacked`) is a
:class:`TrainingUnit`, the only thing the loop knows of it. Checkpoint state is written per student under
canonical names (``RUN/model/PARAM``, ``RUN/optim/PARAM/KEY``), so a student checkpointed in a stack
resumes alone and the other way round. Frozen parameters (a LoRA student's base) take no optimizer step
and are left out: the student rebuilt from its spec has them already.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from kdcache.distributed import autocast
from kdcache.errors import KdcacheError
from kdcache.losses import distillation_loss
from kdcache.train.config import TrainConfig, lr_at


class TrainingUnit(Protocol):
    """What the training loop asks of a unit: one student trained alone (:class:`SeparateStudent`) or
    several of one architecture stacked (:class:`kdcache.train.stacked.StackedStudents`)."""

    students: list[Student]

    @property
    def stopped(self) -> bool:
        """True once every student of the unit has stopped (diverged)."""

    @property
    def join_modules(self) -> list[nn.Module]:
        """The modules DDP's Join waits on under torchrun (none for a stack: stacks train in one process)."""

    def train(self) -> None: ...

    def set_epoch_lr(self, epoch: int, scale: float = 1.0) -> None:
        """Each student's learning rate for ``epoch``, times ``scale`` (the warm-up)."""

    def lr(self, j: int) -> float: ...

    def step(self, x: torch.Tensor, y: torch.Tensor, z: Any, mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch; returns each student's loss ``[students]`` and correct rows."""

    def module(self, j: int) -> nn.Module:
        """Student ``j`` as a plain module, for evaluation and saving."""

    def stop(self, j: int) -> None:
        """Student ``j`` diverged: it takes no more steps, the others go on."""

    def sync_ranks(self, src: int) -> None: ...

    def state(self) -> dict[str, torch.Tensor]:
        """Weights and optimizer state under each student's canonical names (for a checkpoint)."""

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def rng_state(self) -> dict[str, torch.Tensor]: ...

    def load_rng(self, tensors: dict[str, torch.Tensor]) -> bool: ...


@dataclass
class Student:
    """One run of a sweep: its settings, where it is written, and its metrics so far."""

    name: str
    temperature: float | None                # None for a logit-mse student (it has none)
    alpha: float
    seed: int
    lr: float
    out: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_loss: float | None = None        # its loss on its first batch, before any update (see divergence)
    peak_loss: float | None = None           # the highest window loss of its divergence checks so far
    diverged: dict[str, Any] | None = None   # where and how it diverged; it trains no more
    loss: str = "kd"                         # the soft term (kdcache.losses.LOSSES)

    @property
    def setting(self) -> str:
        """``T = 4``, or ``logit matching``: what its soft term is, in words."""
        return "logit matching" if self.loss == "logit-mse" else f"T = {self.temperature:g}"


def initial_rng(seed: int, rank: int = 0) -> torch.Tensor:
    """The CPU generator state a unit's dropout starts from: one per student seed and rank."""
    return torch.Generator().manual_seed(seed * 7919 + rank).get_state()


@contextlib.contextmanager
def own_rng(unit: Any, device: torch.device) -> Iterator[None]:
    """Run with ``unit.rng`` as the global RNG, and keep where it ended: each unit's dropout draws
    are its own, whatever else the sweep holds (a student's result does not depend on its neighbours)."""
    torch.set_rng_state(unit.rng)
    if device.type == "cuda" and unit.cuda_rng is not None:
        torch.cuda.set_rng_state(unit.cuda_rng, device)
    try:
        yield
    finally:
        unit.rng = torch.get_rng_state()
        if device.type == "cuda":
            unit.cuda_rng = torch.cuda.get_rng_state(device)


def make_optimizer(params: Any, c: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=c.weight_decay)


def linear_weights(module: nn.Module) -> list[str]:
    """Names of the weights of ``module``'s ``nn.Linear`` layers (what ``--max-norm`` constrains)."""
    return [f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def max_norm_(weights: list[torch.Tensor], bound: float, active: torch.Tensor | None = None) -> None:
    """Scale each unit's incoming weight vector (a row of a Linear weight ``[..., out, in]``) down to L2 norm
    ``bound`` where it is longer: the max-norm constraint of Srivastava, Hinton et al. (2014) used with
    dropout. ``active`` (stacked students ``[S]``) leaves inactive students' weights as they are."""
    for w in weights:
        scale = (bound / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        if active is not None:
            scale = torch.where(active.view(-1, *[1] * (w.ndim - 1)), scale, 1.0)
        w.mul_(scale)


def frozen_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module``'s frozen parameters (a LoRA student's base weights)."""
    return {k for k, v in module.state_dict(keep_vars=True).items()
            if isinstance(v, nn.Parameter) and not v.requires_grad}


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows whose argmax is their label (label -1 rows never count), on the device: no sync."""
    return ((logits.detach().argmax(-1) == labels) & (labels >= 0)).sum(-1)


class SeparateStudent:
    """One student with its own module and ``torch.optim`` optimizer (wrapped in DDP under torchrun)."""

    def __init__(self, student: Student, model: nn.Module, c: TrainConfig, device: torch.device, rank: int,
                 ddp: bool) -> None:
        self.students = [student]
        self.c, self.device = c, device
        self.plain = model.to(device)
        self.model = (nn.parallel.DistributedDataParallel(self.plain, device_ids=[device.index]
                                                          if device.type == "cuda" else None)
                      if ddp else self.plain)
        # a LoRA student's frozen base takes no step and is no part of its checkpoint (it reloads from --student)
        self.frozen = frozen_keys(self.plain)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], c, student.lr)
        self.constrained = ([p for n in linear_weights(self.plain) if (p := self.plain.get_parameter(n)).requires_grad]
                            if c.max_norm else [])
        self.rng = initial_rng(student.seed, rank)
        self.cuda_rng: torch.Tensor | None = None
        self.stopped = False

    @property
    def join_modules(self) -> list[nn.Module]:
        return [self.model]

    def train(self) -> None:
        self.model.train()

    def set_epoch_lr(self, epoch: int, scale: float = 1.0) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = scale * lr_at(self.students[0].lr, epoch, self.c.epochs, self.c.schedule)

    def lr(self, j: int) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, x: torch.Tensor, y: torch.Tensor, z: Any, mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        s, c = self.students[0], self.c
        if self.stopped:
            return torch.zeros(1, device=self.device), torch.zeros(1, device=self.device, dtype=torch.long)
        with own_rng(self, self.device):
            with autocast(self.device, c.amp):
                logits = self.model(x)
            if mask is not None:
                logits = logits[mask]
            loss = distillation_loss(logits, z, y, s.temperature, s.alpha, c.ensemble, c.members, s.loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.constrained:
                max_norm_(self.constrained, c.max_norm)
        return loss.detach().float()[None], correct_count(logits, y)[None]

    def module(self, j: int) -> nn.Module:
        return self.plain

    def stop(self, j: int) -> None:
        """It diverged: no more steps (under DDP every rank stops it at the same epoch end)."""
        self.stopped = True

    def sync_ranks(self, src: int) -> None:
        """Make every rank's weights and optimizer state rank ``src``'s. With uneven inputs a rank that
        ran out of batches skipped the last optimizer steps (DDP's Join syncs the weights, not the
        momentum): without this the ranks' students drift apart, and a resume could not be exact."""
        import torch.distributed as dist
        for p in self.plain.parameters():
            for k in sorted(self.optimizer.state.get(p, {})):
                v = self.optimizer.state[p][k]
                if isinstance(v, torch.Tensor):  # Adam's step lives on the host: NCCL needs it on the device
                    t = v.to(p.device)
                    dist.broadcast(t, src)
                    v.copy_(t)
            dist.broadcast(p.data, src)

    def state(self) -> dict[str, torch.Tensor]:
        name = self.students[0].name
        out = {f"{name}/model/{k}": v for k, v in self.plain.state_dict().items() if k not in self.frozen}
        for pname, p in self.plain.named_parameters():
            for k, v in self.optimizer.state.get(p, {}).items():
                out[f"{name}/optim/{pname}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        return out

    def rng_state(self) -> dict[str, torch.Tensor]:
        return rng_tensors(self, self.students[0].name)

    def load_rng(self, tensors: dict[str, torch.Tensor]) -> bool:
        return load_rng_tensors(self, self.students[0].name, tensors)

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        name = self.students[0].name
        prefix = f"{name}/model/"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not self.frozen:
            self.plain.load_state_dict(state)
        else:
            missing, unexpected = self.plain.load_state_dict(state, strict=False)
            if set(missing) != self.frozen or unexpected:
                raise KdcacheError(f"the checkpoint of {name} does not fit its student (missing "
                                   f"{sorted(set(missing) - self.frozen)[:3]}, unexpected {unexpected[:3]}); pass "
                                   f"{{param:overwrite}} to start afresh")
        self.optimizer.state.clear()
        for pname, p in self.plain.named_parameters():
            pre = f"{name}/optim/{pname}/"
            st = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            if st:
                self.optimizer.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in st.items()}


def rng_tensors(unit: Any, key: str) -> dict[str, torch.Tensor]:
    out = {f"{key}/rng": unit.rng}
    if unit.cuda_rng is not None:
        out[f"{key}/cuda_rng"] = unit.cuda_rng
    return out


def load_rng_tensors(unit: Any, key: str, tensors: dict[str, torch.Tensor]) -> bool:
    """Restore a unit's RNG states; False when the checkpoint has none for it."""
    if f"{key}/rng" not in tensors:
        return False
    unit.rng = tensors[f"{key}/rng"]
    unit.cuda_rng = tensors.get(f"{key}/cuda_rng")
    return True


def run_name(t: float | None, a: float, s: int, lr: float, c: TrainConfig, loss: str = "kd") -> str:
    name = (f"supervised-s{s}" if not c.distills else f"logit-mse-a{a:g}-s{s}" if loss == "logit-mse"
            else f"T{t:g}-a{a:g}-s{s}")
    return name + (f"-lr{lr:g}" if len(c.lrs) > 1 else "")


def plan_students(c: TrainConfig, out: Path) -> list[Student]:
    """One Student per combination of the sweep axes, each with its output directory; a logit-mse
    student has no temperature, so there is one per (alpha, seed, lr)."""
    combos = []
    for loss in c.losses:
        temps = [None] if loss == "logit-mse" else c.temperatures
        combos += [(loss, *x) for x in itertools.product(temps, c.alphas, c.seeds, c.lrs)]
    sweep = len(combos) > 1 if c.sweep_dirs is None else c.sweep_dirs
    students = []
    for loss, t, a, s, lr in combos:
        name = run_name(t, a, s, lr, c, loss)
        students.append(Student(name, t, a, s, lr, out / name if sweep else out, loss=loss))
    return students
