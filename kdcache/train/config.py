"""``TrainConfig``: every option of ``train-student``, its defaults, and the checks on combinations."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kdcache.errors import ConfigError
from kdcache.losses import ENSEMBLE_REDUCTIONS, LOSSES

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.9
DEFAULT_LR = 0.05
AMP_MODES = ("off", "bf16")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
ENGINES = ("kdcache", "trainer")  # trainer: kdcache.integrations.hf_trainer.train_with_trainer

# Options that do not change what is trained: a run resumed with other values of these continues the
# same training (see kdcache.train.checkpoint).
NOT_IDENTITY = ("overwrite", "progress", "device", "checkpoint_every", "remote_cache", "remote_cache_size",
                "fail_on_divergence")


@dataclass
class TrainConfig:
    """Everything ``train-student`` needs; the CLI options map onto these fields one to one.

    ``losses``, ``temperatures``, ``alphas``, ``seeds`` and ``lrs`` are sweep axes: one student per
    combination (a ``logit-mse`` student has no temperature: one per alpha, seed and lr).
    """

    dataset: str
    student: str
    out: str
    store: str | None = None
    teachers: list[str] | None = None         # online distillation: the teacher run on every batch, no store
    temperatures: list[float] | None = None   # default [4.0] with a store
    alphas: list[float] | None = None         # default [0.9] with a store, [0.0] without
    seeds: list[int] = field(default_factory=lambda: [0])
    lrs: list[float] = field(default_factory=lambda: [DEFAULT_LR])
    losses: list[str] = field(default_factory=lambda: ["kd"])  # the soft term: kd, logit-mse (kdcache.losses)
    ensemble: str = "mean-prob"
    members: list[int] | None = None
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_norm: float | None = None             # cap on each unit's incoming weight norm (with dropout)
    schedule: str = "cosine"
    warmup: float = 0.0                       # epochs over which the lr rises linearly from 0 (a fraction is fine)
    dropout: float = 0.0
    input_dropout: float = 0.0
    jitter: int = 0
    augment: str | None = None                # without a store: views drawn online (kdcache.views)
    views: int | None = None                  # with augment: views cycled over epochs [default: epochs]
    augment_seed: int = 0                     # with augment: the seed views are drawn from (a dump's --seed)
    subset: str | None = None
    eval_dataset: str | None = None
    eval_store: str | None = None
    data_seed: int = 0
    allow_interpolation: bool = False
    remote_cache: str | None = None           # a directory keeping a remote store's blocks on local disk
    remote_cache_size: str = "10GB"           # its bound
    sweep_dirs: bool | None = None            # a sub-directory per run; default: when there are several
    stack: bool = True                        # students of one architecture train as one stacked model
    stack_group: int | None = None            # students per stack (within memory); default: what memory allows,
                                              # on the CPU cut under 32 MiB a stacked weight (mlp: students)
    amp: str = "off"                          # bf16: students' forward and backward under autocast
    checkpoint_every: int = 0                 # also checkpoint every N steps (0: at epoch ends only)
    device: str = "auto"
    workers: int = 0
    data_root: str | None = None
    overwrite: bool = False
    progress: bool | None = None
    fail_on_divergence: bool = False         # any diverged student fails the command, not only all of them
    lora: str | None = None                   # hf:PATH students: r=8,alpha=16,targets=q_proj+v_proj[,dropout=D]
    engine: str = "kdcache"                   # the loop that trains: kdcache's, or transformers.Trainer (ENGINES)

    def resolved(self) -> "TrainConfig":
        """A copy with list defaults filled in and combinations checked."""
        c = TrainConfig(**asdict(self))
        if c.store and c.teachers:
            raise ConfigError("{param:store} and {param:teacher}: distil from cached logits ({param:store}) or from "
                              "a teacher run on "
                              "every batch ({param:teacher}), not both")
        if c.store and (c.augment or c.views):
            raise ConfigError("{param:augment} with {param:store}: the store decides the augmentation; dump it with "
                              "{param:augment} SPEC {param:views} V and its views are replayed")
        if c.jitter and c.augment:
            raise ConfigError("{param:jitter} and {param:augment}: give the shift as part of {param:augment} "
                              "(jitter:N)")
        if c.views is not None and not c.augment:
            raise ConfigError("{param:views} needs {param:augment}")
        if c.augment:
            c.views = c.epochs if c.views is None else c.views
            if c.views < 1:
                raise ConfigError(f"{{param:views}} {c.views}: give at least 1")
        if not c.distills:
            if c.alphas and any(a > 0 for a in c.alphas):
                raise ConfigError("{param:alpha} above 0 needs {param:store} (or an online {param:teacher}): the "
                                  "soft targets come "
                                  "from a teacher")
            if c.temperatures:
                raise ConfigError("{param:temperature} needs {param:store} (or an online {param:teacher}): without "
                                  "one, training is "
                                  "plain supervised")
            c.alphas, c.temperatures = [0.0], [1.0]
        c.temperatures = c.temperatures or [DEFAULT_TEMPERATURE]
        c.alphas = c.alphas if c.alphas is not None else [DEFAULT_ALPHA]
        if not c.losses:
            raise ConfigError("{param:loss} needs at least one value")
        for name in c.losses:
            if name not in LOSSES:
                raise ConfigError(f"{{param:loss}} {name!r} is unknown; use one of {', '.join(LOSSES)} (or a list "
                                  f"of them)")
        if "logit-mse" in c.losses and not c.distills:
            raise ConfigError("{param:loss} logit-mse needs {param:store} (or an online {param:teacher}): it "
                              "matches the teacher's "
                              "logits")
        if not c.lrs or not c.seeds:
            raise ConfigError("{param:lr} and {param:seed} need at least one value")
        for t in c.temperatures:
            if t <= 0:
                raise ConfigError(f"{{param:temperature}} {t}: temperatures must be positive")
        for a in c.alphas:
            if not 0 <= a <= 1:
                raise ConfigError(f"{{param:alpha}} {a}: alpha must be between 0 and 1")
        for lr in c.lrs:
            if not lr > 0:
                raise ConfigError(f"{{param:lr}} {lr}: learning rates must be positive")
        if c.ensemble not in ENSEMBLE_REDUCTIONS:
            raise ConfigError(f"{{param:ensemble}} {c.ensemble!r}: use one of {', '.join(ENSEMBLE_REDUCTIONS)}")
        if c.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{{param:optimizer}} {c.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if c.schedule not in SCHEDULES:
            raise ConfigError(f"{{param:schedule}} {c.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if not 0 <= c.warmup <= c.epochs:
            raise ConfigError(f"{{param:warmup}} {c.warmup:g}: give a number of epochs between 0 and "
                              f"{{param:epochs}} ({c.epochs})")
        if c.engine not in ENGINES:
            raise ConfigError(f"{{param:engine}} {c.engine!r}: use one of {', '.join(ENGINES)}")
        if c.amp not in AMP_MODES:
            raise ConfigError(f"{{param:amp}} {c.amp!r}: use one of {', '.join(AMP_MODES)}")
        if c.distills and c.jitter:
            raise ConfigError("{param:jitter} when distilling: the teacher's logits must be for the view the student "
                              "sees; dump a store with {param:augment} jitter:N {param:views} V (its views are "
                              "replayed), "
                              "or give {param:augment} jitter:N with an online {param:teacher}")
        if c.store and c.subset:
            raise ConfigError("{param:subset} with {param:store}: the store already defines the transfer set; dump "
                              "a store "
                              "with {param:subset} instead")
        if c.epochs < 1 or c.batch_size < 1:
            raise ConfigError("{param:epochs} and {param:batch_size} must be at least 1")
        if c.stack_group is not None and c.stack_group < 1:
            raise ConfigError(f"{{param:stack_group}} {c.stack_group}: give at least 1")
        if c.lora is not None:
            from kdcache.integrations.lora import LoraSpec
            LoraSpec.parse(c.lora)
            if not c.student.startswith("hf:") or c.student.split(",")[0] == "hf:llama":
                raise ConfigError(f"{{param:lora}} with {{param:student}} {c.student!r}: LoRA adapts a pretrained "
                                  f"causal LM; give {{param:student}} hf:PATH (a directory written by save_pretrained, "
                                  f"or a hub name)")
        if c.checkpoint_every < 0:
            raise ConfigError(f"{{param:checkpoint_every}} {c.checkpoint_every}: give 0 (epoch ends only) or a step "
                              f"count")
        return c

    @property
    def distills(self) -> bool:
        """True when students learn from a teacher: cached (``store``) or online (``teachers``)."""
        return bool(self.store or self.teachers)

    def identity(self) -> dict:
        """The fields that decide what is trained: a checkpoint resumes only under the same identity."""
        d = asdict(self)
        for k in NOT_IDENTITY:
            d.pop(k)
        if d["losses"] == ["kd"]:
            d.pop("losses")  # the identity of runs checkpointed before --loss existed
        if d["lora"] is None:
            d.pop("lora")  # nor --lora
        if d["engine"] == "kdcache":
            d.pop("engine")  # nor --engine
        return d


def lr_at(base_lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of ``epoch`` (0-based): constant, or cosine annealed to 0 over ``epochs``
    (the closed form of ``torch.optim.lr_scheduler.CosineAnnealingLR``, so that it needs no state)."""
    if schedule == "constant":
        return base_lr
    import math
    return base_lr * (1 + math.cos(math.pi * epoch / epochs)) / 2


def warmup_scale(step: int, warmup_steps: int) -> float:
    """The factor on the learning rate of optimizer step ``step`` (0-based, counted from the first
    epoch): rising linearly to 1 over ``warmup_steps``, then 1. A closed form, so a resumed run
    continues the same ramp."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps
