"""Errors raised by kdcache. Only ``kdcache.cli`` turns them into a one-line message."""


class KdcacheError(Exception):
    """A user-facing error: the message names what is wrong and how to fix it."""

    exit_code = 1  # the command's exit status when it ends on this error


class StoreError(KdcacheError):
    """A logit store is missing, malformed, incomplete or does not match its data."""


class SpecError(KdcacheError):
    """A model or dataset spec cannot be resolved."""


class ConfigError(KdcacheError):
    """A pipeline file or option combination is invalid."""


class TrainingDiverged(KdcacheError):
    """Students diverged: every one of a sweep, or any when ``fail_on_divergence`` asks."""

    exit_code = 3
