"""A student that diverges says so: a non-finite loss, or a loss risen far above its early value,
stops that student (the others of the sweep go on) with one line naming the run, T and learning rate."""
from __future__ import annotations

import math
from typing import Any, Callable

CHECK_EVERY = 50   # steps between checks (one host sync each); every epoch end is checked too
FACTOR = 4.0       # a loss this many times its first window's mean has blown up


def check(students: list[Any], window_loss: list[float | None], epoch: int, step: int | None,
          log: Callable[[str], None]) -> list[int]:
    """Compare each live student's mean loss over the last window with its first window's; return
    the indices of the students that diverged now (and mark them)."""
    stopped = []
    for i, (s, loss) in enumerate(zip(students, window_loss)):
        if s.diverged is not None or loss is None:
            continue
        if s.early_loss is None and math.isfinite(loss):
            s.early_loss = loss
            continue
        if math.isfinite(loss) and loss <= FACTOR * max(s.early_loss, 1e-3):
            continue
        what = (f"loss {loss:.4g}, {loss / s.early_loss:.0f} x its early {s.early_loss:.4g}"
                if math.isfinite(loss) and s.early_loss else f"loss {loss}")
        s.diverged = {"epoch": epoch + 1, "step": step, "loss": loss if math.isfinite(loss) else None,
                      "early_loss": s.early_loss}
        log(f"warning: student {s.name} diverged in epoch {epoch + 1} ({what}) at T = {s.temperature:g}, "
            f"lr = {s.lr:g}: stopped; the others go on. The T^2-scaled soft-target gradient grows with T: "
            f"try --lr {s.lr / 4:g}")
        stopped.append(i)
    return stopped
