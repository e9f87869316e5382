"""A student that diverges says so: it is stopped (the others of the sweep go on) with one line naming
the run, T and learning rate, and marked ``diverged`` in its metrics, the summary and the report.

Three signs, each judged against a reference that cannot itself have exploded:

- a **non-finite loss**. On the very first batch, before any update, the learning rate cannot be the
  cause, and the line says so;
- a loss that has **risen to FACTOR times its initial value**, the student's loss on its first batch,
  before its first update (a healthy student's loss falls from there; a window of a short epoch that
  has already exploded can no longer hide it);
- a **collapse**: after the warm-up, at an epoch end, a training accuracy no better than always
  predicting the most common label, a loss still above STALLED times its initial value, and a loss
  that once rose to KNOCKED times its initial value: a student knocked out (its ReLU units killed by a step too
  large) rather than one that is slow to start (a plateau, a learning rate too low), which is left alone.

Checks run every :func:`check_interval` steps (one host sync each) and at every epoch end.
"""
from __future__ import annotations

import math
from typing import Any, Callable

CHECK_EVERY = 50   # steps between checks at most; short epochs are checked more often (check_interval)
FACTOR = 4.0       # a loss this many times its initial value has blown up
LOSS_FLOOR = 0.1   # the reference is never taken below this (a student that starts near its targets)
CHANCE_MARGIN = 1.05  # a training accuracy within 5% of the majority label's share is chance
STALLED = 0.9         # ... and a loss still above 90% of its initial value,
KNOCKED = 1.5         # ... after rising to 1.5 times it (a batch's noise is far less): a collapsed student


def check_interval(steps_per_epoch: int) -> int:
    """Steps between checks: every CHECK_EVERY steps, and at least four times an epoch."""
    return max(1, min(CHECK_EVERY, steps_per_epoch // 4))


def record_initial(students: list[Any], first_batch_loss: list[float | None]) -> None:
    """Keep each student's loss on its first batch (before any update) as its reference."""
    for s, loss in zip(students, first_batch_loss):
        if s.initial_loss is None and loss is not None:
            s.initial_loss = loss


def check_start(students: list[Any], log: Callable[[str], None]) -> list[int]:
    """The students whose loss was already non-finite on their first batch, before any update (stopped
    now, with a line saying that the learning rate is not the cause: their targets or inputs are)."""
    stopped = []
    for i, s in enumerate(students):
        if s.diverged is not None or s.initial_loss is None or math.isfinite(s.initial_loss):
            continue
        s.diverged = {"epoch": 1, "step": 1, "loss": None, "initial_loss": None, "reason": "non-finite at start"}
        log(f"warning: student {s.name} has loss {s.initial_loss} on its first batch, before any update, so the "
            f"learning rate is not the cause: the teacher's targets or the inputs give a non-finite loss at "
            f"{s.setting} (check the store with `kdcache verify`): stopped; the others go on")
        stopped.append(i)
    return stopped


def check(students: list[Any], window_loss: list[float | None], epoch: int, step: int | None,
          log: Callable[[str], None]) -> list[int]:
    """Compare each live student's mean loss over the last window with its initial loss; return the
    indices of the students that diverged now (and mark them)."""
    stopped = []
    for i, (s, loss) in enumerate(zip(students, window_loss)):
        if s.diverged is not None or loss is None or s.initial_loss is None or not math.isfinite(s.initial_loss):
            continue
        ref = max(s.initial_loss, LOSS_FLOOR)
        if math.isfinite(loss):
            s.peak_loss = loss if s.peak_loss is None else max(s.peak_loss, loss)
        if math.isfinite(loss) and loss <= FACTOR * ref:
            continue
        what = (f"loss {loss:.4g}, {loss / ref:.0f} x its initial {s.initial_loss:.4g}" if math.isfinite(loss)
                else f"loss {loss}")
        _stop(s, epoch, step, loss, "non-finite" if not math.isfinite(loss) else "exploded", what, log)
        stopped.append(i)
    return stopped


def check_collapse(students: list[Any], epoch_loss: list[float | None], train_accuracy: list[float | None],
                   majority: float | None, epoch: int, log: Callable[[str], None]) -> list[int]:
    """At an epoch end after the warm-up: a student whose training accuracy is no better than always
    predicting the most common label (share ``majority``) and whose loss has not fallen below its initial
    value has collapsed. Returns the indices of the students stopped now."""
    stopped = []
    if majority is None:
        return stopped
    for i, (s, loss, acc) in enumerate(zip(students, epoch_loss, train_accuracy)):
        if s.diverged is not None or loss is None or acc is None or s.initial_loss is None:
            continue
        if (acc > CHANCE_MARGIN * majority or not math.isfinite(loss) or loss < STALLED * s.initial_loss
                or s.peak_loss is None or s.peak_loss < KNOCKED * s.initial_loss):
            continue
        what = (f"training accuracy {acc:.4f}, no better than always predicting the most common label "
                f"({majority:.4f}), and loss {loss:.4g} against its initial {s.initial_loss:.4g}: it learned nothing")
        _stop(s, epoch, None, loss, "collapsed", what, log)
        stopped.append(i)
    return stopped


def _stop(s: Any, epoch: int, step: int | None, loss: float, reason: str, what: str,
          log: Callable[[str], None]) -> None:
    s.diverged = {"epoch": epoch + 1, "step": step, "loss": loss if math.isfinite(loss) else None,
                  "initial_loss": s.initial_loss, "reason": reason}
    if reason == "collapsed":
        why = (f"A learning rate far too high kills ReLU units (try --lr {s.lr / 4:g} or --warmup 1); one far too "
               f"low barely moves them")
    else:
        why = f"The T^2-scaled soft-target gradient grows with T: try --lr {s.lr / 4:g}"
    verb = "collapsed" if reason == "collapsed" else "diverged"
    log(f"warning: student {s.name} {verb} in epoch {epoch + 1} ({what}) at {s.setting}, "
        f"lr = {s.lr:g}: stopped; the others go on. {why}")
