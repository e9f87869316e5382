"""Students of one architecture trained as one stacked model: parameters with a leading student
dimension, one batched forward and backward, per-student learning rates, temperatures and alphas.

kdcache's own MLP runs as batched matrix products (the first layer, whose input every student
shares, as one matrix product for the whole stack); any other module through ``torch.func``
(``functional_call`` under ``vmap``), its buffers stacked too (BatchNorm's running statistics are
each student's own, updated in place under ``vmap``) and its ``F.dropout`` calls given masks drawn
from each student's own generator (:class:`_DropoutMasks`). A module that ``vmap`` cannot run, or
that draws other random numbers in training, is trained one by one instead (:func:`try_stack` says
why). The optimizers are ``torch.optim.SGD`` and ``Adam``
written over the stacked tensors, step for step the same arithmetic, so a stacked student ends
where it would have ended alone (a test holds them to float tolerance).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from kdcache.losses import distillation_losses
from kdcache.models import MLP
from kdcache.train.config import TrainConfig, lr_at
from kdcache.train.students import (
    Student,
    autocast,
    correct_count,
    initial_rng,
    linear_weights,
    load_rng_tensors,
    max_norm_,
    own_rng,
    rng_tensors,
)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class StackedOptimizer:
    """``torch.optim.SGD`` (momentum, weight decay) or ``Adam`` over parameters ``[students, ...]``,
    with one learning rate per student; students marked inactive are left exactly as they are."""

    def __init__(self, kind: str, params: dict[str, torch.Tensor], lrs: list[float], momentum: float,
                 weight_decay: float) -> None:
        self.kind, self.params, self.momentum, self.weight_decay = kind, params, momentum, weight_decay
        self.base_lrs = list(lrs)
        self.lrs = list(lrs)
        self._lr_t: dict[int, torch.Tensor] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in params}

    def set_lrs(self, lrs: list[float]) -> None:
        self.lrs = list(lrs)
        self._lr_t = {}

    def _lr(self, p: torch.Tensor) -> torch.Tensor:
        t = self._lr_t.get(p.ndim)
        if t is None:
            t = self._lr_t[p.ndim] = torch.tensor(self.lrs, dtype=p.dtype,
                                                  device=p.device).view(-1, *[1] * (p.ndim - 1))
        return t

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor | None) -> None:
        """One step of every student. The updates are applied in place, with no temporary the size of
        the stack: on the CPU each such tensor costs fresh pages every step once it outgrows the
        allocator's heap (see :func:`cpu_stack_group`)."""
        for (name, p), g in zip(self.params.items(), grads):
            st = self.state[name]
            keep = None if active is None else active.view(-1, *[1] * (p.ndim - 1))
            if self.kind == "sgd":
                d = g if self.weight_decay == 0 else g.add(p, alpha=self.weight_decay)
                if self.momentum != 0:
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(self.momentum).add_(d)
                    d = buf
                # p - lr * d rounded once, as torch.optim.SGD's p.add_(d, alpha=-lr) rounds it
                p.addcmul_(d if keep is None else torch.where(keep, d, 0.0), self._lr(p), value=-1)
            else:
                b1, b2 = ADAM_BETAS
                if self.weight_decay != 0:
                    g = g.add(p, alpha=self.weight_decay)
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                n = float(st["step"])
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                update = st["exp_avg_sq"].sqrt().div_(math.sqrt(1 - b2 ** n)).add_(ADAM_EPS)
                torch.div(st["exp_avg"], update, out=update)
                update.mul_(self._lr(p) / (1 - b1 ** n))
                p.sub_(update if keep is None else torch.where(keep, update, 0.0))


def _mlp_plan(module: nn.Module) -> tuple[list[str], float, float] | None:
    """(names of the Linear layers in order, hidden dropout, input dropout) of a kdcache MLP, or None."""
    if type(module) is not MLP:
        return None
    layers = list(module.net)
    linears = [f"net.{i}" for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    drops = [m.p for m in layers if isinstance(m, nn.Dropout)]
    return linears, (drops[1] if len(drops) > 1 else 0.0), drops[0]


def _mlp_forward(linears: list[str], dropout: float, input_dropout: float) -> Callable[..., torch.Tensor]:
    def forward(params: dict[str, torch.Tensor], x: torch.Tensor, training: bool,
                noise: Callable[[float, int, int, torch.dtype], torch.Tensor]) -> torch.Tensor:
        s_count = params[f"{linears[0]}.weight"].shape[0]
        h = x.flatten(1)
        shared = True  # every student sees the same input until the first layer
        if training and input_dropout > 0:
            h = h * noise(input_dropout, len(h), h.shape[1], h.dtype)
            shared = False
        for i, name in enumerate(linears):
            w, b = params[f"{name}.weight"], params[f"{name}.bias"]
            if shared:  # one matrix product for the whole stack: [B, in] @ [in, S * out]
                out = w.shape[1]
                h = (h @ w.reshape(s_count * out, -1).T).view(len(h), s_count, out).transpose(0, 1) + b[:, None]
                shared = False
            else:
                h = torch.baddbmm(b[:, None], h, w.transpose(1, 2))
            if i < len(linears) - 1:
                h = F.relu(h)
                if training and dropout > 0:
                    h = h * noise(dropout, h.shape[1], h.shape[2], h.dtype)
        return h
    return forward


class _StudentRng:
    """One stacked student's own generator states (CPU and CUDA), as a student trained alone keeps them."""

    def __init__(self, seed: int, rank: int) -> None:
        self.rng = initial_rng(seed, rank)
        self.cuda_rng: torch.Tensor | None = None


class _DropoutMasks(TorchFunctionMode):
    """``F.dropout`` (what ``nn.Dropout`` and timm's ``drop_rate`` call) in a stacked forward: each call in
    training multiplies by the next of ``masks``, each student's drawn beforehand from its own generator
    (vmap would draw every student's from one). While ``calls`` is a list, dropout is the identity and
    each call's ``(p, shape, dtype)`` is noted there instead."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []
        self.calls: list[tuple[float, tuple[int, ...], torch.dtype]] | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.dropout:
            return func(*args, **kwargs)
        named = dict(zip(("input", "p", "training", "inplace"), args), **kwargs)
        x, p, training = named["input"], float(named.get("p", 0.5)), bool(named.get("training", True))
        if not training or p == 0:
            return x
        if self.calls is not None:
            self.calls.append((p, tuple(x.shape), x.dtype))
            return x
        return x * self.masks.pop(0)


def _training_draws(module: nn.Module, probe_x: torch.Tensor, device: torch.device) -> tuple[bool, bool]:
    """(whether ``module`` in training mode draws nothing once its ``F.dropout`` calls are set aside, whether
    it calls ``F.dropout`` at all). Draws other than ``F.dropout`` (stochastic depth, noise) cannot stack:
    vmap would draw for all students from one generator. A draw shows as a generator that moved, or as
    outputs that differ under two seeds."""
    m = copy.deepcopy(module).train()
    outs, moved = [], False
    mode = _DropoutMasks()
    mode.calls = []
    cuda = device.type == "cuda"
    with torch.no_grad(), mode:
        for seed in (1, 2):
            with torch.random.fork_rng(devices=[device] if cuda else []):
                torch.manual_seed(seed)
                before = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
                outs.append(m(probe_x.to(device)))
                moved |= not torch.equal(before[0], torch.get_rng_state())
                moved |= cuda and not torch.equal(before[1], torch.cuda.get_rng_state(device))
    same = all(torch.equal(a, b) for a, b in zip(_tensors(outs[0]), _tensors(outs[1])))
    return same and not moved, bool(mode.calls)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (list, tuple)):
        return [v for v in out if isinstance(v, torch.Tensor)]
    return [t for t in vars(out).values() if isinstance(t, torch.Tensor)] if hasattr(out, "__dict__") else []


class StackedStudents:
    """Several students of one architecture as one model ``[students, ...]``: one forward, one backward."""

    def __init__(self, students: list[Student], modules: list[nn.Module], c: TrainConfig, device: torch.device,
                 rank: int = 0, dropout: bool = False) -> None:
        from torch.func import stack_module_state
        self.students, self.c, self.device = students, c, device
        self.scratch = copy.deepcopy(modules[0]).to(device)  # holds one student's weights for eval and saving
        for m in modules:
            m.train()
        params, buffers = stack_module_state(modules)
        self.params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
        self.buffers = {k: v.to(device) for k, v in buffers.items()}
        # buffers a state dict holds (not the non-persistent ones, such as rotary tables rebuilt on load)
        kept = set(self.scratch.state_dict())
        self.saved_buffers = [k for k in self.buffers if k in kept]
        self.training = True
        # each student draws its dropout masks from its own generator, in the order it would alone, so
        # that its result does not depend on the stack it is in
        self.rngs = [_StudentRng(s.seed, rank) for s in students]
        self.probing = False  # a probe forward (try_stack): dropout masks of ones, no student's generator moves
        plan = _mlp_plan(modules[0])
        if plan is not None:
            fwd = _mlp_forward(*plan)
            self._forward = lambda x: fwd(self.params, x, self.training, self._noise)
            self.how = "batched matrix products"
        else:
            from torch.func import functional_call, vmap
            base = copy.deepcopy(modules[0]).to("meta")
            self._base = base
            self._dropout = _DropoutMasks() if dropout else None
            self._dropout_calls: dict[tuple, list] = {}

            def one(p: dict, b: dict, masks: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
                if self._dropout is not None:
                    self._dropout.masks = list(masks)
                return functional_call(base, (p, b), (x,))
            call = vmap(one, in_dims=(0, 0, 0, None), randomness="different")
            self._forward = self._vmap_forward(call)
            self.how = "torch.func vmap" + (", each student's dropout masks drawn from its own generator"
                                            if dropout else "")
        self.optimizer = StackedOptimizer(c.optimizer, self.params, [s.lr for s in students], c.momentum,
                                          c.weight_decay)
        self.constrained = [self.params[n] for n in linear_weights(modules[0])] if c.max_norm else []
        self.temperatures = [s.temperature for s in students]
        self.alphas = [s.alpha for s in students]
        self.losses = [s.loss for s in students]
        self.active = torch.ones(len(students), dtype=torch.bool, device=device)
        self.all_active = True

    def _vmap_forward(self, call: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self._dropout is None or not self.training:
                return call(self.params, self.buffers, [], x)
            masks = self._dropout_masks(x)
            with self._dropout:
                return call(self.params, self.buffers, masks, x)
        return forward

    def _dropout_masks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[students, *shape]`` multipliers for each ``F.dropout`` call of a training forward on ``x``,
        student j's drawn from its own generator in the order it draws them alone (``F.dropout`` of
        ones). The calls are found once per input shape by a forward on the meta device."""
        key = (tuple(x.shape), x.dtype, torch.is_autocast_enabled(self.device.type))
        calls = self._dropout_calls.get(key)
        if calls is None:
            from torch.func import functional_call
            meta = lambda d: {k: v[0].detach().to("meta") for k, v in d.items()}  # noqa: E731
            self._dropout.calls = calls = []
            try:
                with torch.no_grad(), self._dropout:
                    functional_call(self._base, (meta(self.params), meta(self.buffers)), (x.to("meta"),))
            finally:
                self._dropout.calls = None
            self._dropout_calls[key] = calls
        if self.probing:
            return [torch.ones(len(self.rngs), *shape, dtype=dtype, device=self.device) for _, shape, dtype in calls]
        per_student = []
        for r in self.rngs:
            with own_rng(r, self.device):
                per_student.append([F.dropout(torch.ones(shape, dtype=dtype, device=self.device), p, True)
                                    for p, shape, dtype in calls])
        return [torch.stack(m) for m in zip(*per_student)] if calls else []

    def _noise(self, p: float, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``[students, rows, width]`` dropout multipliers (0 or ``1 / (1 - p)``), student j's drawn from its
        own generator exactly as ``F.dropout`` draws them for a student alone."""
        ones = torch.ones(rows, width, dtype=dtype, device=self.device)
        if self.probing:
            return ones.expand(len(self.rngs), rows, width)
        masks = []
        for r in self.rngs:
            with own_rng(r, self.device):
                masks.append(F.dropout(ones, p, True))
        return torch.stack(masks)

    @property
    def join_modules(self) -> list[nn.Module]:
        return []

    def train(self, mode: bool = True) -> None:
        self.training = mode
        if hasattr(self, "_base"):
            for m in self._base.modules():  # the flag alone: transformers' train() would set up kernels,
                m.training = mode            # which refuses the meta device the base lives on

    def set_epoch_lr(self, epoch: int, scale: float = 1.0) -> None:
        self.optimizer.set_lrs([scale * lr_at(s.lr, epoch, self.c.epochs, self.c.schedule) for s in self.students])

    def lr(self, j: int) -> float:
        return self.optimizer.lrs[j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[students, batch, ...]`` logits."""
        with autocast(self.device, self.c.amp):
            return self._forward(x)

    def step(self, x: torch.Tensor, y: torch.Tensor, z: Any, mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        logits = self.forward(x)
        if mask is not None:
            logits = logits[:, mask]
        losses = distillation_losses(logits, z, y, self.temperatures, self.alphas, c.ensemble, c.members,
                                     self.losses)
        total = losses.sum() if self.all_active else torch.where(self.active, losses, 0.0).sum()
        grads = torch.autograd.grad(total, list(self.params.values()))
        self.optimizer.step(list(grads), None if self.all_active else self.active)
        if self.constrained:
            max_norm_(self.constrained, c.max_norm, None if self.all_active else self.active)
        return losses.detach(), correct_count(logits, y)

    @property
    def stopped(self) -> bool:
        return not bool(self.active.any())

    def sync_ranks(self, src: int) -> None:
        """Stacks train in one process only (see build_units): nothing to sync."""

    def stop(self, j: int) -> None:
        """Freeze student ``j`` (it diverged): its weights stay as they are, the others train on."""
        self.active[j] = False
        self.all_active = False

    def module(self, j: int) -> nn.Module:
        """Student ``j`` as a plain module (one shared scratch module: use it before asking for another)."""
        with torch.no_grad():
            self.scratch.load_state_dict({**{k: v[j] for k, v in self.params.items()},
                                          **{k: self.buffers[k][j] for k in self.saved_buffers}})
        return self.scratch

    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for j, s in enumerate(self.students):
            out.update({f"{s.name}/model/{k}": v[j].detach() for k, v in {**self.params, **self.buffers}.items()})
            for pname, st in self.optimizer.state.items():
                for k, v in st.items():
                    out[f"{s.name}/optim/{pname}/{k}"] = v if k == "step" else v[j]
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for j, s in enumerate(self.students):
                for k, v in {**self.params, **self.buffers}.items():
                    v[j].copy_(tensors[f"{s.name}/model/{k}"])
        for pname, p in self.params.items():
            keys = {k.rsplit("/", 1)[1] for k in tensors
                    if k.startswith(f"{self.students[0].name}/optim/{pname}/")}
            st = self.optimizer.state[pname] = {}
            for key in keys:
                if key == "step":
                    st[key] = tensors[f"{self.students[0].name}/optim/{pname}/step"].clone()
                else:
                    st[key] = torch.stack([tensors[f"{s.name}/optim/{pname}/{key}"]
                                           for s in self.students]).to(p.device)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Each student's generators under its own name, as a student alone keeps them: a checkpoint of a
        stack resumes one by one and the other way round."""
        out: dict[str, torch.Tensor] = {}
        for s, r in zip(self.students, self.rngs):
            out.update(rng_tensors(r, s.name))
        return out

    def load_rng(self, tensors: dict[str, torch.Tensor]) -> bool:
        return all([load_rng_tensors(r, s.name, tensors) for s, r in zip(self.students, self.rngs)])


def try_stack(students: list[Student], modules: list[nn.Module], c: TrainConfig, device: torch.device,
              probe_x: torch.Tensor, rank: int = 0) -> tuple[StackedStudents | None, str]:
    """A stack of these students, or None and the reason they cannot stack (from probe forwards and
    backwards on two rows: in eval mode, then in training mode with the buffers put back and dropout
    masks of ones, so that nothing is drawn or updated)."""
    dropout = False
    if _mlp_plan(modules[0]) is None:
        repeatable, dropout = _training_draws(modules[0], probe_x, device)
        if not repeatable:
            return None, ("it draws random numbers in training other than F.dropout (e.g. stochastic depth): under "
                          "vmap its students would share one generator, so each would depend on the others")
    try:
        stack = StackedStudents(students, modules, c, device, rank, dropout)
        for training in (False, True):
            saved = {k: v.clone() for k, v in stack.buffers.items()}  # BatchNorm's statistics move in training
            stack.train(training)
            stack.probing = True
            out = stack.forward(probe_x.to(device))
            torch.autograd.grad(out.float().sum(), list(stack.params.values()))
            with torch.no_grad():
                for k, v in saved.items():
                    stack.buffers[k].copy_(v)
        stack.probing = False
        stack.train(True)
    except Exception as e:  # any failure to batch the module: it trains one by one instead
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{type(e).__name__}: {msg}"
    return stack, stack.how


def stack_bytes(module: nn.Module, probe_x: torch.Tensor, batch_size: int, optimizer: str) -> int:
    """Bytes one more student adds to a stack: weights, gradients and optimizer state, plus the
    activations of a batch (module outputs of a probe forward, scaled to the batch, kept for backward)."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    acts = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal acts
        if isinstance(out, torch.Tensor):
            acts += out.numel() * out.element_size()
    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    was = module.training
    try:
        with torch.no_grad():
            module.eval()
            module(probe_x)
    except Exception:
        acts = 0
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return params * (3 if optimizer == "sgd" else 4) + 2 * acts * batch_size // max(1, len(probe_x))


CPU_STACK_TENSOR_BYTES = 32 * 2 ** 20


def cpu_stack_group(module: nn.Module, device: torch.device) -> int | None:
    """On the CPU, the most students of kdcache's MLP a stack may hold before a weight that one student
    keeps under ``CPU_STACK_TENSOR_BYTES`` (32 MiB) goes over it when stacked (None: no limit).

    Each step makes a new gradient the size of each stacked weight. glibc's malloc hands out blocks
    over 32 MiB (the ceiling of its mmap threshold) as fresh mappings and unmaps them when freed, so
    every step would fault in and zero each such gradient again, page by page: a stack of 16 students
    784-800-800-10 took 39,600 page faults a step, a third of its time. A linear layer's weight
    gradient costs two operations per element per row of the batch, so the faults weigh as much as
    the arithmetic; activations, and the weights of a convolution (shared by every position of an
    image), cost far more arithmetic per byte, and other modules are not cut (not measured)."""
    if device.type != "cpu" or _mlp_plan(module) is None:
        return None
    sizes = [p.numel() * p.element_size() for p in module.parameters()]
    under = [b for b in sizes if b <= CPU_STACK_TENSOR_BYTES]
    return max(1, CPU_STACK_TENSOR_BYTES // max(under)) if under else None


def stack_budget(device: torch.device) -> tuple[int, str]:
    """(bytes a stack may take, where that figure comes from): ``$KDCACHE_STACK_MEMORY`` (e.g. ``8GB``,
    for a shared GPU), else half of what is free on the device (CUDA) or available on the host."""
    import os
    env = os.environ.get("KDCACHE_STACK_MEMORY")
    if env:
        from kdcache.errors import ConfigError, KdcacheError
        from kdcache.sizes import parse_size
        try:
            return parse_size(env, "KDCACHE_STACK_MEMORY"), "KDCACHE_STACK_MEMORY"
        except KdcacheError as e:
            raise ConfigError(str(e)) from None
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) // 2, f"half of the memory free on {device}"
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free // 2, "half of the host's available memory"
