"""LoRA students: a pretrained ``hf:PATH`` causal LM wrapped with ``peft``, its base frozen, only the
adapter trained (``train-student --lora``).

- :class:`LoraSpec`: ``r=8,alpha=16,targets=q_proj+v_proj[,dropout=0.05]`` parsed and checked (no
  model, no peft needed: a bad value is refused before anything loads).
- :func:`apply_lora`: the student's ``transformers`` model wrapped with ``peft.get_peft_model``; target
  names the model does not have are refused, naming the ones it has.
- :func:`save_lora`: at the end of a run, the adapter to ``adapter/`` (``PeftModel.from_pretrained``)
  and the student merged into its base, which the run's checkpoint and ``hf/`` then hold.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import ConfigError

ADAPTER_DIR = "adapter"
USAGE = "e.g. {param:lora} r=8,alpha=16,targets=q_proj+v_proj (or targets=all-linear), optionally dropout=0.05"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter: rank ``r``, scale ``alpha / r``, dropout on its input, and the names of the linear
    layers it adapts (a name matches a module whose path ends in it, as in peft; ``all-linear`` is peft's
    every linear layer but the output head)."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``r=8,alpha=16,targets=q_proj+v_proj[,dropout=0.05]``; ``alpha`` defaults to ``r`` (scale 1)."""
        kv: dict[str, str] = {}
        for part in text.split(","):
            k, eq, v = part.partition("=")
            if not eq or not k.strip() or not v.strip():
                raise ConfigError(f"{{param:lora}} {text!r}: cannot read {part!r}; give key=value pairs, {USAGE}")
            kv[k.strip()] = v.strip()
        unknown = sorted(set(kv) - {"r", "alpha", "targets", "dropout"})
        if unknown:
            raise ConfigError(f"{{param:lora}} {text!r}: unknown keys {', '.join(unknown)}; known: r, alpha, targets, "
                              f"dropout ({USAGE})")
        if "r" not in kv or "targets" not in kv:
            raise ConfigError(f"{{param:lora}} {text!r}: give r= and targets=, {USAGE}")
        try:
            r = int(kv["r"])
            alpha = float(kv.get("alpha", r))
            dropout = float(kv.get("dropout", 0))
        except ValueError:
            raise ConfigError(f"{{param:lora}} {text!r}: r is an integer, alpha and dropout numbers, {USAGE}") from None
        if r < 1:
            raise ConfigError(f"{{param:lora}} {text!r}: r={r}; the rank must be at least 1")
        if not alpha > 0:
            raise ConfigError(f"{{param:lora}} {text!r}: alpha={alpha:g}; it must be positive (the scale is alpha/r)")
        if not 0 <= dropout < 1:
            raise ConfigError(f"{{param:lora}} {text!r}: dropout={dropout:g}; give a value in [0, 1)")
        targets = tuple(t.strip() for t in kv["targets"].split("+"))
        if not all(targets) or len(set(targets)) != len(targets):
            raise ConfigError(f"{{param:lora}} {text!r}: targets are distinct module names joined by +, {USAGE}")
        if "all-linear" in targets and len(targets) > 1:
            raise ConfigError(f"{{param:lora}} {text!r}: targets=all-linear stands alone (it is every linear layer)")
        return cls(r, alpha, targets, dropout)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of ``model``'s linear layers (``q_proj``, ``down_proj``, ``lm_head``...):
    what ``targets=`` can name."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}  # Conv1D: GPT-2's linear layers
    return sorted(names)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(module: nn.Module, spec: LoraSpec, student: str, seed: int) -> nn.Module:
    """Wrap the ``transformers`` model of ``module`` (a :class:`~kdcache.integrations.hf.CausalLM`) with a
    LoRA adapter: every base weight frozen, the adapter (``lora_A`` drawn from ``seed``, ``lora_B`` zero:
    the student starts as its base) the only trainable parameters. Returns ``module``, changed in place."""
    from kdcache.integrations.hf import CausalLM
    if not isinstance(module, CausalLM) or module.placed:
        raise ConfigError(f"{{param:lora}} with {{param:student}} {student!r}: LoRA adapts a pretrained transformers "
                          f"causal LM loaded on one device (hf:PATH, without device_map)")
    try:
        import peft
    except ImportError:
        raise ConfigError("{param:lora} needs peft: pip install 'kdcache[hf]'") from None
    base = module.model
    if spec.targets != ("all-linear",):
        layers = [n for n, m in base.named_modules()
                  if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
        missing = [t for t in spec.targets if not any(_matches(n, t) for n in layers)]
        if missing:
            raise ConfigError(f"{{param:lora}} targets {'+'.join(missing)}: {student} has no such linear layers; its "
                              f"linear layers are {', '.join(linear_names(base))} (or give targets=all-linear)")
    targets: Any = "all-linear" if spec.targets == ("all-linear",) else list(spec.targets)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # each student's adapter its own draw, the same on every run and rank
        # peft reads a property newer transformers deprecate: a warning no user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        try:
            module.model = peft.get_peft_model(base, config)
        except ValueError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{{param:lora}} on {student}: peft refuses it ({first})") from None
    return module


def is_lora(module: nn.Module) -> bool:
    """True for a student :func:`apply_lora` wrapped (and not yet merged)."""
    try:
        import peft
    except ImportError:
        return False
    return isinstance(getattr(module, "model", None), peft.PeftModel)


def save_lora(module: nn.Module, out: Path, tokenizer: Any = None) -> nn.Module:
    """Write a LoRA student's adapter (and the tokenizer) to ``out/adapter`` with ``save_pretrained``
    (safetensors; ``peft.PeftModel.from_pretrained(base, out/adapter)`` loads it), then merge the adapter
    into the base and return the student as a plain :class:`~kdcache.integrations.hf.CausalLM`, for
    kdcache's checkpoint and ``hf/``. The merge is in place (no second copy of the model): the student
    trains no more after it. Any other module is returned as it is."""
    if not is_lora(module):
        return module
    from kdcache.integrations.hf import CausalLM
    target = out / ADAPTER_DIR
    module.model.save_pretrained(target, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return CausalLM(module.model.merge_and_unload())
