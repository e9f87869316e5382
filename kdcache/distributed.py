"""torch.distributed set-up for commands run under torchrun."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.errors import KdcacheError

AMP_MODES = ("off", "bf16", "fp16")  # what autocast takes; train-student allows fewer (TrainConfig)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> the local GPU when there is one, else the CPU."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdcacheError(f"{{param:device}} {name} asked for, but torch sees no CUDA device; use {{param:device}} "
                           f"cpu or auto")
    return torch.device(name)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``--amp``: off, or the forward under ``torch.autocast`` in bf16 (or fp16 where a caller allows it)."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise KdcacheError(f"{{param:amp}} {amp!r}: use one of {', '.join(AMP_MODES)}")
    return torch.autocast(device_type=device.type, dtype=dtype)
