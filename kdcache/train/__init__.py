"""Stage two: train students from a store (or plainly, without one), a whole sweep in one pass.

``loop`` holds the training loop; ``students`` and ``stacked`` the students it trains (one by one,
or stacked into one model); ``checkpoint`` makes a run resumable; ``source`` is the data it reads,
``evaluate`` the per-epoch evaluation, ``results`` what it writes.
"""
from kdcache.train.config import TrainConfig
from kdcache.train.epoch_eval import teacher_top1
from kdcache.train.loop import train_students
from kdcache.train.results import format_table

__all__ = ["TrainConfig", "train_students", "format_table", "teacher_top1"]
