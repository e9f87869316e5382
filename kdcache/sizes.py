"""Byte sizes as people write them (``20GB``, ``512MiB``) and as kdcache prints them."""
from __future__ import annotations

import re

from kdcache.errors import KdcacheError

UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """``"20GB"``, ``"512MiB"``, ``1000000`` -> bytes; ``what`` names the setting in the error."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise KdcacheError(f"{what}={text!r}: give a size such as 8GB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """``1234567`` -> ``1.23 MB`` (decimal units, three significant digits)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
