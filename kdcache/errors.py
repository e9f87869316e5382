"""Errors raised by kdcache. Only ``kdcache.cli`` turns them into a one-line message."""
from __future__ import annotations

import re
from typing import Callable

PARAM = re.compile(r"\{param:([A-Za-z_]+)\}")


class KdcacheError(Exception):
    """A user-facing error: the message names what is wrong and how to fix it.

    A message names a library parameter as ``{param:NAME}``: ``str()`` shows ``NAME``, and the CLI
    shows the flag that sets it (:meth:`render`), so one message serves the library and the CLI."""

    def render(self, name_of: Callable[[str], str] = lambda p: p) -> str:
        message = str(self.args[0]) if self.args else ""
        return PARAM.sub(lambda m: name_of(m.group(1)), message)

    exit_code = 1  # the command's exit status when it ends on this error

    def __str__(self) -> str:
        return self.render()


class StoreError(KdcacheError):
    """A logit store is missing, malformed, incomplete or does not match its data."""


class SpecError(KdcacheError):
    """A model or dataset spec cannot be resolved."""


class ConfigError(KdcacheError):
    """A pipeline file or option combination is invalid."""


class TrainingDiverged(KdcacheError):
    """Students diverged: every one of a sweep, or any when ``fail_on_divergence`` asks."""

    exit_code = 3
