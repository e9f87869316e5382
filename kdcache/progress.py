"""Progress bars on stderr (tqdm), or nothing when they are off."""
from __future__ import annotations

import sys
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, show: bool, desc: str, unit: str, done: int = 0, leave: bool = True) -> Any:
    """A tqdm bar of ``total`` ``unit`` on stderr, or a bar that shows nothing when ``show`` is false."""
    if not show:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=done, unit=unit, unit_scale=unit == "rows", desc=desc, file=sys.stderr,
                leave=leave)
